"""Checkpoints of a running simulation: arrays in an .npz file, everything else in JSON, written atomically.

A checkpoint is a directory `<run_dir>/checkpoints/ckpt-<version, 9 digits>/` holding

  arrays.npz  every array: the live model versions (the current one and those in-flight clients
              started from), the strategy's server state, trained-but-unaggregated client results
              and their losses, the staleness of all aggregated updates, the training batch sizes,
              the metrics history (one array per column) and, with an availability model, every
              client's current availability interval;
  meta.json   the format number, the config fingerprint, the loop counters, the scheduler (clock,
              next dispatch id, both random generators' states, in-flight tasks with their start
              versions and finish times), the reference counts of the live versions, the pending
              task ids, failure counts and the recorder's byte offsets in its CSV files.

It is written into a hidden temporary directory (files fsynced) that is then renamed into place,
so a directory named ckpt-* is always complete; the newest `keep` are kept. Restoring rebuilds the
exact state of the loop at the end of the aggregation that produced the version, so a resumed run
continues with the same floating-point values as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
PREFIX = "ckpt-"
ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"


@dataclasses.dataclass
class Snapshot:
    """One checkpoint in memory: JSON-ready `meta` and named host `arrays`."""

    meta: dict
    arrays: dict[str, np.ndarray]

    @property
    def version(self) -> int:
        return int(self.meta["loop"]["version"])


# ---- pytrees <-> named arrays ---------------------------------------------------------------------
# (a rule's state can change between releases: MIFA and CA2FL gained their memory's sum)
WRITTEN_ELSEWHERE = "it was written by another configuration, or by a release of asyncflower-jax whose rule keeps other state"


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def put_tree(arrays: dict, prefix: str, tree) -> None:
    """Store the leaves of `tree` as arrays `prefix.0`, `prefix.1`, ... (PRNG keys as their raw data)."""
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        arrays[f"{prefix}.{i}"] = jax.random.key_data(leaf) if _is_key(leaf) else leaf


def get_tree(arrays: dict, prefix: str, template, what: str):
    """The tree stored by `put_tree`, shaped like `template`; a CheckpointError names `what` on a mismatch."""
    leaves, treedef = jax.tree.flatten(template)
    stored = sum(1 for k in arrays if k.rsplit(".", 1)[0] == prefix)
    if stored != len(leaves):
        raise CheckpointError(f"the checkpoint's {what} has {stored} arrays, this run's has {len(leaves)}: {WRITTEN_ELSEWHERE}")
    out = []
    for i, leaf in enumerate(leaves):
        value = np.asarray(arrays[f"{prefix}.{i}"])
        if _is_key(leaf):
            out.append(jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(leaf)))
            continue
        shape = np.shape(leaf)
        dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if value.shape != shape or value.dtype != dtype:
            raise CheckpointError(
                f"the checkpoint's {what} array {i} is {value.dtype}{list(value.shape)}, this run expects {dtype}{list(shape)}: "
                + WRITTEN_ELSEWHERE
            )
        out.append(jnp.asarray(value) if isinstance(leaf, (jax.Array, np.ndarray)) else value.item())
    return jax.tree.unflatten(treedef, out)


def put_stacked(arrays: dict, prefix: str, tree) -> None:
    """Like put_tree, for trees whose leaves carry a leading row axis (no template check on restore)."""
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        arrays[f"{prefix}.{i}"] = leaf


def get_stacked(arrays: dict, prefix: str, template, rows: int, what: str):
    """Trees stored by put_stacked: each leaf is [rows, *template leaf shape]."""
    leaves, treedef = jax.tree.flatten(template)
    out = []
    for i, leaf in enumerate(leaves):
        key = f"{prefix}.{i}"
        if key not in arrays:
            raise CheckpointError(f"the checkpoint lacks {what} array {i}")
        value = np.asarray(arrays[key])
        if value.shape != (rows, *np.shape(leaf)) or value.dtype != np.dtype(leaf.dtype):
            raise CheckpointError(f"the checkpoint's {what} array {i} is {value.dtype}{list(value.shape)}: {WRITTEN_ELSEWHERE}")
        out.append(jnp.asarray(value))
    return jax.tree.unflatten(treedef, out)


def history_to_arrays(arrays: dict, history: list[dict]) -> list[str]:
    """The metrics rows as one array per column (ints stay ints); returns the column order."""
    columns = list(history[0]) if history else []
    for c in columns:
        values = np.asarray([row[c] for row in history])
        if values.dtype == object:
            raise CheckpointError(f"metrics column {c!r} holds non-numeric values and cannot be checkpointed")
        arrays[f"history.{c}"] = values
    return columns


def history_from_arrays(arrays: dict, columns: list[str]) -> list[dict]:
    if not columns:
        return []
    cols = {c: np.asarray(arrays[f"history.{c}"]).tolist() for c in columns}
    return [dict(zip(columns, values)) for values in zip(*(cols[c] for c in columns))]


# ---- files ---------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Writes, lists, prunes and reads the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.keep = int(keep)

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
        return sorted(found, key=self.version_of)

    @staticmethod
    def version_of(path: Path) -> int:
        """The version of a checkpoint directory ckpt-<version>."""
        return int(path.name[len(PREFIX) :])

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, snapshot: Snapshot) -> Path:
        """Write `snapshot` atomically as ckpt-<version>, then drop the checkpoints newer than it and
        all but the newest `keep`. A newer one is one the run's resume skipped as unreadable (the run
        went on from an older one): kept, it outranked every checkpoint written after it, and with
        `keep` of them the one just written was deleted at once."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{PREFIX}{snapshot.version:09d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / ARRAYS_FILE, "wb") as f:
            np.savez(f, **snapshot.arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / META_FILE, "w") as f:
            json.dump({"format": FORMAT, **snapshot.meta}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same version saved again (an interrupt right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        for newer in [p for p in self.paths() if self.version_of(p) > snapshot.version]:
            shutil.rmtree(newer, ignore_errors=True)
        for old in self.paths()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(".tmp-*"):  # left by a process killed while writing
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        return final

    def load_newest(self) -> tuple[Path, Snapshot] | None:
        """The newest checkpoint that can be read (an unreadable one, damaged after it was written,
        is skipped with a warning), or None if there is none; CheckpointError if none can be read."""
        paths = self.paths()
        errors = []
        for path in reversed(paths):
            try:
                snapshot = self.load(path)
            except CheckpointError as exc:
                errors.append(str(exc))
                continue
            if errors:
                log.warning("skipped %d unreadable checkpoint(s) newer than %s: %s", len(errors), path.name, "; ".join(errors))
            return path, snapshot
        if errors:
            raise CheckpointError(f"no checkpoint in {self.directory} can be read: {'; '.join(errors)}")
        return None

    @staticmethod
    def load(path: Path) -> Snapshot:
        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text())
            with np.load(path / ARRAYS_FILE, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}; this version reads format {FORMAT}")
        return Snapshot(meta, arrays)


def config_fingerprint(config: Any) -> str:
    """A short digest of a JSON-ready config, stored in checkpoints to refuse resuming another run."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the simulation loop's state -----------------------------------------------------------------
def capture_run(*, loop: dict, scheduler, versions, pending, state, all_staleness, history) -> Snapshot:
    """Everything the loop needs to continue, taken at the end of an aggregation (one host transfer).

    `loop` holds the loop's JSON-ready counters. Trained-but-unaggregated results are stored as they
    are: retraining them after a resume could batch them differently and change the last bits.
    """
    arrays: dict[str, Any] = {}
    refs = versions.refs()
    held = sorted(refs)
    put_tree(arrays, "state", state)
    untrained, trained_ids, trained = pending.export()
    if trained is not None:
        put_stacked(arrays, "trained", trained[0])
        arrays["trained_loss"] = trained[1]
    arrays["all_staleness"] = np.asarray(all_staleness, np.int64)
    arrays["flush_sizes"] = np.asarray(pending.flush_sizes, np.int64)
    arrays.update(scheduler.state_arrays())
    columns = history_to_arrays(arrays, history)
    meta = {
        "loop": dict(loop),
        "scheduler": scheduler.state_dict(),
        "versions": {str(v): n for v, n in refs.items()},
        "pending": {"untrained": untrained, "trained": trained_ids},
        "history_columns": columns,
    }
    # the held versions come to the host as the rows of one stacked tree (the version table itself
    # when there is one), not a call and a transfer per version: at M = 1000 those cost 0.1 s of
    # each checkpoint. The whole table moves (also its free slots: with FedBuff most are), but
    # the device allocates nothing: a gather of the held rows would need up to a second table.
    stacked, rows = versions.stacked_rows(held) if held else (None, [])
    host, stacked = jax.device_get((arrays, stacked))
    host = {k: np.asarray(v) for k, v in host.items()}
    for i, leaf in enumerate(jax.tree.leaves(stacked)):
        for v, row in zip(held, rows):
            host[f"version.{v}.{i}"] = np.asarray(leaf)[row]
    return Snapshot(meta, host)


def restore_run(snapshot: Snapshot, *, scheduler, versions, pending, params_template, state_template):
    """Load `snapshot` into a fresh scheduler, version cache and pending store.

    Returns (strategy state, loop counters, staleness of all aggregated updates, metrics history).
    """
    meta, arrays = snapshot.meta, snapshot.arrays
    try:
        try:
            scheduler.load_state_dict(meta["scheduler"], arrays)
        except ValueError as exc:
            raise CheckpointError(f"the checkpoint does not fit this run: {exc}: {WRITTEN_ELSEWHERE}") from None
        for v, n in sorted((int(k), int(n)) for k, n in meta["versions"].items()):
            versions.put(v, get_tree(arrays, f"version.{v}", params_template, f"model version {v}"), refs=n)
        state = get_tree(arrays, "state", state_template, "strategy state")
        untrained_ids, trained_ids = meta["pending"]["untrained"], meta["pending"]["trained"]
        missing = [d for d in untrained_ids + trained_ids if d not in scheduler.in_flight]
        if missing:
            raise CheckpointError(f"the checkpoint's pending results {missing[:5]} belong to no in-flight client: the file is inconsistent")
        trained = None
        if trained_ids:
            params = get_stacked(arrays, "trained", params_template, len(trained_ids), "client results")
            trained = (params, jnp.asarray(arrays["trained_loss"]))
        pending.restore([scheduler.in_flight[d] for d in untrained_ids], trained_ids, trained, np.asarray(arrays["flush_sizes"]).tolist())
        history = history_from_arrays(arrays, meta["history_columns"])
        loop = dict(meta["loop"])
        if int(loop["version"]) not in versions:
            raise CheckpointError(f"the checkpoint lacks its own model version {loop['version']}")
    except KeyError as exc:
        raise CheckpointError(f"the checkpoint lacks {exc}: the file is incomplete or from another version of the simulator") from None
    return state, loop, np.asarray(arrays["all_staleness"]).tolist(), history
