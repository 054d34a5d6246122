"""Train many clients in one jitted call; each client's key comes from fold_in(seed key, dispatch id).

Clients may start from different model versions: the versions come stacked on a leading axis
(the simulator's version table, engine/versions.py, or a list stacked once) and each client
gathers its own inside the jitted call. Batches are cut into chunks of at most `chunk_size`
clients, the last one compiled at a power of two, so only a few shapes are ever compiled.

How a chunk runs (`execution`), chosen per backend by measurement (benchmarks/throughput.py):
  "vmap": one vectorized program over the chunk's clients (per-client weights become batched
          matrix products); fast on accelerators; padding rows are trained like real ones;
  "map":  a loop over the chunk's real clients inside the same jitted call: each client's steps
          run as unbatched matrix products, one after another, with one dispatch per chunk; the
          loop stops at the last real client, so padding rows cost no training, and a chunk is
          compiled at MIN_ROWS rows or more (one program serves every chunk of up to 8 clients),
          at `chunk_size` where its results go straight into the results store (`chunks`);
          with `map_batch` b > 1, b clients at a time are vmapped inside the loop;
  "auto": on the CPU "map" in chunks of at most CPU_CHUNK clients (measured on a 2-core Intel
          Xeon, the digits MLP on two CPU devices: 1501 clients/s by the loop, 1200 vmapped in
          chunks of 16, 735 one per call; and a cold run compiles one training program per
          device instead of one per chunk size); on GPUs and TPUs "vmap" in chunks of
          `chunk_size` (a padded row costs little there; fewer calls matter more).
With several devices (`devices`) in one process, a batch is shared out among them before it is
cut into chunks, each device getting its clients' start models: only batches of at least two
clients per device, and on CPU devices (one per core: `expose_cpu_cores`) only batches with
enough work to pay for the split (`device_shares`); the others run on the first device. Each
chunk is a program on one device: the first device's train from the version table where it lies,
the others' results are moved back to it. Over several processes each chunk is one program
sharded over all their devices (client/sharding.py).
None of these choices changes any client's result beyond float rounding (tests/client).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..compilation import jit
from ..data.store import ClientStore
from ..errors import is_integer, require
from ..strategy.updates import PyTree, tree_bytes
from .sharding import ClientMesh, select_devices

EXECUTIONS = ("auto", "vmap", "map")
CPU_CHUNK = 16  # clients per call and device that `auto` uses on the CPU (at most)
MIN_SPLIT_PER_DEVICE = 2  # in one process, a batch is shared out among the devices when each gets at least this many clients ...
CPU_SPLIT_FLOPS = 50e6  # ... and, on CPU devices, at least this much work (matrix-product flops: about a millisecond of a core)
# another device's start models, and a "map" chunk, take at least this many rows (if they take at
# most MIN_ROWS_BYTES): every share of a few clients then compiles the same program (the default
# experiment's shares of 2 to 5 clients compiled 5 training programs for the other device, 2 with
# vmapped chunks, 1 with "map")
MIN_ROWS = 8
MIN_ROWS_BYTES = 64 << 20


def resolve_execution(execution: str, chunk_size: int = 256, backend: str | None = None, devices: int = 1) -> tuple[str, int]:
    """(execution, chunk size) that `execution` means on `backend` (default: JAX's default backend)
    when chunks are split over `devices` devices."""
    require(execution in EXECUTIONS, "execution", execution, f"one of {EXECUTIONS}")
    if execution != "auto":
        return execution, chunk_size
    if (backend or jax.default_backend()) == "cpu":
        return "map", min(chunk_size, CPU_CHUNK * devices)
    return "vmap", chunk_size


def chunk_plan(n: int, chunk_size: int, least: int = 1) -> list[tuple[int, int]]:
    """How a batch of n clients is cut into chunks: (clients, compiled size) per chunk, in order:
    chunks of `chunk_size`, the last one compiled at the power of two that holds it, at least
    `least` and at most `chunk_size` (a few compiled shapes)."""
    return [(k, min(chunk_size, max(least, bucket_size(k)))) for k in (min(chunk_size, n - lo) for lo in range(0, n, chunk_size))]


def bucket_size(n: int, cap: int | None = None) -> int:
    """Smallest power of two >= n (at least 1), capped at `cap`."""
    size = 1 << max(0, int(n) - 1).bit_length()
    return min(size, cap) if cap else size


INPUT_COLUMNS = 5  # `_chunk`'s per-client inputs: start version row, data offset, sample count, dispatch id, real (1) or padding (0)
STACK_BLOCK = 32  # trees stacked by one compiled call; longer lists are written block by block


@jit
def _stack(trees: list[PyTree]) -> PyTree:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@functools.partial(jit, donate_argnums=(0,))
def _write_block(buffer: PyTree, block: PyTree, offset) -> PyTree:
    return jax.tree.map(lambda b, x: jax.lax.dynamic_update_slice_in_dim(b, x, offset, 0), buffer, block)


@jit
def _take_rows(tree: PyTree, rows) -> PyTree:
    return jax.tree.map(lambda leaf: leaf[rows], tree)


@jit
def _take_parts(tree: PyTree, rows: list) -> list[PyTree]:
    """`_take_rows` of each index array of `rows`: one tree per array, in one call."""
    return [jax.tree.map(lambda leaf: leaf[part], tree) for part in rows]


def row_shapes(stacked: PyTree) -> PyTree:
    """One row of a stacked pytree, as ShapeDtypeStructs."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), stacked)


def row_bytes(stacked: PyTree) -> int:
    """Bytes of one row of a stacked pytree (arrays, tracers or ShapeDtypeStructs)."""
    return tree_bytes(row_shapes(stacked))


def _group_rows(rows: int, group: int) -> int:
    """`rows` rounded up to whole groups of `group`."""
    return -(-rows // group) * group


def _shapes_key(shapes: PyTree):
    leaves, treedef = jax.tree.flatten(shapes)
    return treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves)


def put_rows(results, chunk, positions):
    """`results` (a pytree with a leading row axis) with rows `positions` set to `chunk`'s rows
    (traceable; positions out of range are padding, dropped)."""
    return jax.tree.map(lambda out, leaf: out.at[positions].set(leaf, mode="drop"), results, chunk)


def rows_finite(tree):
    """Per row (leading axis): True when every entry of every leaf is finite (traceable)."""
    flags = [jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1) for leaf in jax.tree.leaves(tree)]
    return jnp.stack(flags).all(axis=0)


FINITE_FLAG = jax.ShapeDtypeStruct((), jnp.bool_)


def stored_row(result_shapes):
    """The shapes of one row of a results store: a result's (params, loss) and its finite flag."""
    params, loss = result_shapes
    return params, loss, FINITE_FLAG


def flagged(chunk):
    """Trained (params, losses) with each row's finite flag: a stored result's row (traceable).
    Computed where a result is made, not in every aggregation step that reads it (on a 2-core CPU
    the check took half of a FedAsync step's time)."""
    params, loss = chunk
    return params, loss, rows_finite(params)


def put_trained(results, chunk, positions):
    """`put_rows` of trained (params, losses) into a results store (params, losses, finite flags),
    each row's flag computed here (traceable)."""
    return put_rows(results, flagged(chunk), positions)


put_trained_in_place = jit(put_trained, donate_argnums=(0,))
# another device's chunk, flagged there (`_chunk_flagged`): the first device only writes its rows
# (measured on a 2-core CPU, MLP 64-200-200-10, 8 rows: 0.42 to 0.58 ms of its time instead of
# 0.65 to 0.82 ms, and compiled in 0.12 to 0.15 s instead of 0.48 to 0.52 s)
put_flagged_in_place = jit(put_rows, donate_argnums=(0,))


def stack_trees(trees: list[PyTree]) -> PyTree:
    """Stack a list of same-shaped pytrees on a new leading axis.

    A short list is one device call. A tree that appears several times (the same object, e.g. a
    model version many clients started from) is stored once and gathered; more than STACK_BLOCK
    distinct trees are written block by block into one buffer (donated, so in place). A jitted
    stack over n trees would compile a program of n x leaves arguments for every new n, which
    takes minutes at a few thousand; here only power-of-two buffer sizes are compiled."""
    if len(trees) <= STACK_BLOCK:
        return _stack(trees)
    first: dict[int, int] = {}
    unique: list[PyTree] = []
    index = np.empty(len(trees), np.int32)
    for i, tree in enumerate(trees):
        key = id(tree)
        if key not in first:
            first[key] = len(unique)
            unique.append(tree)
        index[i] = first[key]
    if len(unique) <= STACK_BLOCK:
        stacked = _stack(unique + [unique[-1]] * (bucket_size(len(unique)) - len(unique)))
    else:
        size = bucket_size(len(unique))  # a multiple of STACK_BLOCK: full blocks never run past the end
        stacked = jax.tree.map(lambda leaf: jnp.zeros((size, *jnp.shape(leaf)), jnp.result_type(leaf)), unique[0])
        for lo in range(0, len(unique), STACK_BLOCK):
            block = unique[lo : lo + STACK_BLOCK]
            block = block + [block[-1]] * (STACK_BLOCK - len(block))
            stacked = _write_block(stacked, _stack(block), np.int32(lo))
    if len(unique) == len(trees) and jax.tree.leaves(stacked)[0].shape[0] == len(trees):
        return stacked
    return _take_rows(stacked, index)


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for inner in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr holds its Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def matmul_flops(jaxpr) -> float:
    """Floating-point operations of a jaxpr's matrix products and convolutions (the rest is cheap
    beside them), a scan's body counted `length` times, a loop's body and a branch once."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_features]
        elif name == "cond":
            total += max((matmul_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
        else:
            inner = sum(matmul_flops(sub) for sub in _sub_jaxprs(eqn))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def device_shares(n: int, devices: int, client_flops: float | None) -> list[int]:
    """How many of a batch's n clients each of one process's `devices` devices trains, in order (the
    batch's first clients on the first device): all on the first device unless each would get at
    least MIN_SPLIT_PER_DEVICE clients (on a 2-core CPU one client per device took longer than both
    on one device) and, given the flops of one client (CPU devices), CPU_SPLIT_FLOPS of work
    (splitting costs the host about half a millisecond per batch there, so a tiny model trains
    faster on one device); else shares as even as can be, the first device's the smallest (it also
    aggregates and evaluates). The batch is shared out before it is cut into chunks: chunks split
    one by one left each batch's last small chunks to the first device, the others idle."""
    share = n // devices
    if devices == 1 or share < MIN_SPLIT_PER_DEVICE or (client_flops is not None and share * client_flops < CPU_SPLIT_FLOPS):
        return [n]
    extra = n - share * devices
    return [share + (k >= devices - extra) for k in range(devices)]


class TrainedChunk(NamedTuple):
    """Results of one chunk: `params` with a leading client axis, rows [:n] real, the rest padding."""

    params: PyTree
    loss: jnp.ndarray
    n: int


class BatchedTrainer:
    """Runs `local_train` for a batch of (start version, client, dispatch id) triples.

    `devices`: None trains on every device JAX sees (all processes' after jax.distributed.initialize),
    an int k on the first k, or a list of devices; with one device nothing is sharded."""

    def __init__(
        self,
        local_train,
        store: ClientStore,
        base_key: jax.Array,
        chunk_size: int = 256,
        execution: str = "auto",
        map_batch: int = 1,
        devices=None,
    ):
        self.local_train = local_train
        self.store = store
        self.base_key = base_key
        selected = select_devices(devices, replica_bytes=store.x.nbytes + store.y.nbytes)
        self.mesh = ClientMesh(selected) if len(selected) > 1 else None
        spanned = self.mesh.size if self.mesh is not None and self.mesh.multiprocess else 1  # devices one chunk spans
        self.execution, self.chunk_size = resolve_execution(execution, int(chunk_size), devices=spanned)
        self.least_rows = None  # a "map" chunk's or another device's start models' fewest rows (`_settle`)
        self.client_flops = None  # one client's local training, in matrix-product flops (`_settle`, for the CPU's split rule)
        require(is_integer(map_batch) and map_batch >= 1, "map_batch", map_batch, "an integer >= 1")
        self.map_batch = map_batch
        self.chunk_traces = 0
        self.split_batches = 0  # batches trained on several devices
        self._result_shapes: dict = {}  # `result_shapes` per start-model shapes
        self._train_one = jit(self._one)
        self._train_chunk = jit(self._chunk)
        self._train_chunk_flagged = jit(self._chunk_flagged)
        self._train_chunk_into = jit(self._chunk_into, donate_argnums=(0,))
        if self.mesh is not None and self.mesh.multiprocess:
            self._train_sharded = self.mesh.shard_map(self._chunk, split=(True, False, False, True))  # (start models, x, y, inputs)
            self._x, self._y = self.mesh.replicate((store.x, store.y))
        elif self.mesh is not None:  # the devices besides the first, each with its copy of the client data
            self._others = [d for d in self.mesh.devices if d != self.mesh.home][: self.mesh.size - 1]
            self._data_on_others = jax.device_put([(store.x, store.y)] * len(self._others), self._others)

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def home(self):
        """With several devices in one process, the first: where the models and the results store
        live, committed to it from the start. Other devices' results come back committed, and a jitted
        program compiles anew for committed arguments where it had uncommitted ones (measured: the
        default experiment's aggregation step, training-into-the-store and evaluation programs twice
        each). None otherwise: arrays stay uncommitted."""
        return self.mesh.home if self.mesh is not None and not self.mesh.multiprocess else None

    def _settle(self, stacked: PyTree) -> None:
        """At the first chunk: the fewest rows of a "map" chunk and of start models sent to another
        device (MIN_ROWS where they are small), and on CPU devices of one process the flops of one
        client, from local training's jaxpr (`device_shares`)."""
        if self.least_rows is None:
            self.least_rows = MIN_ROWS if MIN_ROWS * row_bytes(stacked) <= MIN_ROWS_BYTES else 1
        cpu_mesh = self.mesh is not None and not self.mesh.multiprocess and self.mesh.devices[0].platform == "cpu"
        if cpu_mesh and self.client_flops is None:
            one = row_shapes(stacked)
            jaxpr, shapes = jax.make_jaxpr(self._one, return_shape=True)(one, self.store.x, self.store.y, np.int32(0), np.int32(1), np.uint32(0))
            self._result_shapes[_shapes_key(one)] = shapes  # (the trace `result_shapes` would make)
            self.client_flops = matmul_flops(jaxpr.jaxpr)

    def _client_key(self, dispatch_id):
        return jax.random.fold_in(self.base_key, dispatch_id)

    def _chunk(self, versions, x, y, inputs):
        """`inputs` [rows, INPUT_COLUMNS] int32 (`_chunk_inputs`): per row its client's start version
        row, data offset, sample count, dispatch id (its uint32 bits) and whether it is a real client
        (1) or padding (0). Returns (params, losses) with a leading row axis."""
        self.chunk_traces += 1
        if self.execution == "vmap":
            return self._train_rows(versions, x, y, inputs)
        rows = _group_rows(inputs.shape[0], self._map_group(inputs.shape[0]))
        out = jax.tree.map(lambda s: jnp.zeros((rows, *s.shape), s.dtype), self.result_shapes(versions))

        def write(out, lo, group):
            return jax.tree.map(lambda o, r: jax.lax.dynamic_update_slice_in_dim(o, r, lo, 0), out, self._train_rows(versions, x, y, group))

        return jax.tree.map(lambda o: o[: inputs.shape[0]], self._over_real_clients(inputs, write, out))

    def _chunk_flagged(self, versions, x, y, inputs):
        """`_chunk` with each row's finite flag (`flagged`): a chunk trained on another device, whose
        rows the first device then only writes into the store."""
        return flagged(self._chunk(versions, x, y, inputs))

    def _chunk_into(self, results, inputs, versions, x, y):
        """`_chunk`, its rows written into rows `inputs[:, 0]` of `results` (params, losses, finite
        flags; donated: in place; rows out of range are padding, dropped); `inputs[:, 1:]` are
        `_chunk`'s. Under "map" each group's results go straight into `results`."""
        if self.execution == "vmap":
            return put_trained(results, self._chunk(versions, x, y, inputs[:, 1:]), inputs[:, 0])
        self.chunk_traces += 1
        train = lambda res, lo, group: put_trained(res, self._train_rows(versions, x, y, group[:, 1:]), group[:, 0])  # noqa: E731
        return self._over_real_clients(inputs, train, results, slot=results[1].shape[0])

    def _map_group(self, rows: int) -> int:
        """Clients vmapped together in a "map" chunk of `rows`: `map_batch`, at most the chunk (a
        larger group would only be padding)."""
        return min(self.map_batch, rows)

    def _over_real_clients(self, inputs, step, carry, slot=None):
        """`carry = step(carry, lo, group)` for each group of `map_batch` rows of `inputs` starting at
        row lo, in a loop that stops after the chunk's last real client (real clients come first;
        the last column says which rows are): padding rows cost no training, and one compiled
        program serves every number of real clients up to the chunk's size. Rows added to make
        whole groups are padding, their first column `slot` if given (a store row out of range)."""
        b = self._map_group(inputs.shape[0])
        rows = _group_rows(inputs.shape[0], b)
        if rows > inputs.shape[0]:
            pad = jnp.tile(inputs[:1], (rows - inputs.shape[0], 1)).at[:, -1].set(0)
            inputs = jnp.concatenate([inputs, pad if slot is None else pad.at[:, 0].set(slot)])
        groups = (jnp.sum(inputs[:, -1]) + b - 1) // b
        return jax.lax.fori_loop(0, groups, lambda g, c: step(c, g * b, jax.lax.dynamic_slice_in_dim(inputs, g * b, b)), carry)

    def _train_rows(self, versions, x, y, inputs):
        """Local training of every row of `inputs` (`_chunk`'s columns), each from its own start
        version: vmapped, or unbatched for a single row."""
        version_idx, offsets, counts = inputs[:, 0], inputs[:, 1], inputs[:, 2]
        dispatch_ids = jax.lax.bitcast_convert_type(inputs[:, 3], jnp.uint32)
        start = jax.tree.map(lambda v: v[version_idx], versions)
        if inputs.shape[0] == 1:
            out = self.local_train(jax.tree.map(lambda leaf: leaf[0], start), x, y, offsets[0], counts[0], self._client_key(dispatch_ids[0]))
            return jax.tree.map(lambda leaf: leaf[None], out)
        keys = jax.vmap(self._client_key)(dispatch_ids)
        return jax.vmap(self.local_train, in_axes=(0, None, None, 0, 0, 0))(start, x, y, offsets, counts, keys)

    def _one(self, params, x, y, offset, count, dispatch_id):
        return self.local_train(params, x, y, offset, count, self._client_key(dispatch_id))

    def train(self, versions: list[PyTree], version_idx: np.ndarray, clients: np.ndarray, dispatch_ids: np.ndarray) -> list[TrainedChunk]:
        """Train every listed client; client i starts from versions[version_idx[i]]."""
        padded_versions = versions + [versions[0]] * (bucket_size(len(versions)) - len(versions))
        return self.train_from(stack_trees(padded_versions), version_idx, clients, dispatch_ids)

    def train_from(self, stacked: PyTree, version_idx: np.ndarray, clients: np.ndarray, dispatch_ids: np.ndarray) -> list[TrainedChunk]:
        """Train every listed client; client i starts from row version_idx[i] of `stacked` (a pytree
        with a leading version axis, e.g. the simulator's version table)."""
        plan = self._chunk_inputs(stacked, version_idx, clients, dispatch_ids)
        elsewhere = iter(self._train_elsewhere(stacked, [(device, inputs) for device, _, inputs in plan if device]))
        chunks = []
        for device, n, inputs in plan:
            if device == 0:
                params, loss = self._train_chunk(stacked, self.store.x, self.store.y, inputs)
            elif device is None:
                params, loss = self.mesh.gather(self._sharded_chunk(stacked, inputs))
            else:
                params, loss = next(elsewhere)
            chunks.append(TrainedChunk(params, loss, n))
        return chunks

    def train_into(self, results, slots: np.ndarray, stacked: PyTree, version_idx: np.ndarray, clients: np.ndarray, dispatch_ids: np.ndarray):
        """`train_from`, client i's result and whether it is finite everywhere written into row
        slots[i] of `results` (params with a leading row axis, losses, finite flags: rows of
        `stored_row(result_shapes(...))`), which is donated and returned: on the first device each
        chunk's call writes its rows in place, with no call or copy of its own; another device's
        chunk is moved back and written by one call."""
        results, writes = self.train_into_first(results, slots, stacked, version_idx, clients, dispatch_ids)
        for chunk, positions in writes:
            results = put_flagged_in_place(results, chunk, positions)
        return results

    def train_into_first(self, results, slots: np.ndarray, stacked: PyTree, version_idx: np.ndarray, clients: np.ndarray, dispatch_ids: np.ndarray):
        """`train_into` that writes only the first device's rows: returns (results, the other
        devices' chunks as (stored rows on the first device, store rows) for `put_flagged_in_place`).
        Written when first read, they let the first device go on with the rows it has while the
        others still train (a run's earliest arrivals are in the batch's first share)."""
        plan = self._chunk_inputs(stacked, version_idx, clients, dispatch_ids, slots, results[1].shape[0])
        elsewhere = [(device, inputs) for device, _, inputs in plan if device]
        trained = self._train_elsewhere(stacked, [(device, inputs[:, 1:]) for device, inputs in elsewhere], flagged=True)  # (dispatched first: they start at once)
        for device, _, inputs in plan:
            if device == 0:
                results = self._train_chunk_into(results, inputs, stacked, self.store.x, self.store.y)
            elif device is None:
                results = put_trained_in_place(results, self.mesh.gather(self._sharded_chunk(stacked, inputs[:, 1:])), inputs[:, 0])
        return results, [(chunk, inputs[:, 0]) for (_, inputs), chunk in zip(elsewhere, trained)]

    def result_shapes(self, stacked: PyTree):
        """(params, loss) of one client's result as ShapeDtypeStructs, from a stacked pytree of
        start models (local training traced once per trainer and shape, nothing compiled)."""
        one = row_shapes(stacked)
        key = _shapes_key(one)
        if key not in self._result_shapes:
            self._result_shapes[key] = jax.eval_shape(self._one, one, self.store.x, self.store.y, np.int32(0), np.int32(1), np.uint32(0))
        return self._result_shapes[key]

    def chunks(self, n: int, into_store: bool = False) -> list[tuple[int | None, int, int]]:
        """How a batch of n clients is trained: (device, clients, compiled size) per chunk, in the
        batch's order. `device` indexes this process's training devices (0: the first, where the
        models are; in one process the batch is shared out among them first, `device_shares`, then
        each share cut into chunks, `chunk_plan`), or is None: the chunk is split over every
        process's devices (several processes: each takes part in every chunk), its compiled size
        then a multiple of their number. `into_store` (`train_into`): the first device's "map"
        chunks write their results into the store, with no buffer of their own, so they are all
        compiled at the chunk size: one program."""
        least = (self.least_rows or 1) if self.execution == "map" else 1  # padding costs "map" no training
        if self.mesh is not None and self.mesh.multiprocess:
            return [(None, n, self.mesh.padded_size(size)) for n, size in chunk_plan(n, self.chunk_size, least)]
        shares = [n] if self.mesh is None else device_shares(n, self.mesh.size, self.client_flops)
        home_least = self.chunk_size if into_store and self.execution == "map" else least
        return [(device, m, size) for device, share in enumerate(shares) for m, size in chunk_plan(share, self.chunk_size, least if device else home_least)]

    def chunk_sizes(self, n: int) -> list[int]:
        """The compiled sizes of the chunks a batch of n clients is trained in."""
        return [size for _, _, size in self.chunks(n)]

    def _chunk_inputs(self, stacked, version_idx, clients, dispatch_ids, slots=None, capacity=None) -> list[tuple[int | None, int, np.ndarray]]:
        """(device, clients, inputs) per chunk of the listed clients (`chunks`), in order: `inputs`
        is `_chunk`'s int32 array of per-client inputs (start version rows of `stacked`; padding
        rows repeat the chunk's first client, marked padding in the last column), one
        host-to-device transfer per chunk instead of five (on a GPU each costs the host tens of
        microseconds). With `slots`, the array starts with a column of the store rows the results
        go to (`_chunk_into`; padding rows get `capacity`: out of range, dropped)."""
        version_idx = np.asarray(version_idx)
        self._settle(stacked)
        plan = self.chunks(len(clients), into_store=slots is not None)
        if len({device for device, _, _ in plan}) > 1:
            self.split_batches += 1
        first = 0 if slots is None else 1
        out, lo = [], 0
        for device, n, size in plan:
            hi = lo + n
            rows = np.concatenate([np.arange(lo, hi), np.full(size - n, lo)])
            c = clients[rows]
            inputs = np.empty((size, first + INPUT_COLUMNS), np.int32)
            if slots is not None:
                inputs[:, 0] = capacity
                inputs[:n, 0] = slots[lo:hi]
            inputs[:, first] = version_idx[rows]
            inputs[:, first + 1] = self.store.offsets[c]
            inputs[:, first + 2] = self.store.counts[c]
            inputs[:, first + 3] = np.asarray(dispatch_ids[rows], np.uint32).view(np.int32)
            inputs[:, first + 4] = np.arange(size) < n
            out.append((device, n, inputs))
            lo = hi
        return out

    def _data_on(self, device: int):
        """The client data's copy on this process's training device `device` (> 0)."""
        return self._data_on_others[device - 1]

    def _place_elsewhere(self, stacked, chunks: list[tuple[int, np.ndarray]]) -> list:
        """For chunks (device, `_chunk`'s inputs: start version rows of `stacked`) of this process's
        devices besides the first: (device, start models, inputs) on that device, the inputs then
        indexing its own clients' start models. Those are gathered from `stacked` in one call (each
        device's rows padded to a power of two, at least `least_rows`: few shapes compile) and put
        on their devices with the inputs in one more; the version table stays on the first device."""
        devices = list(dict.fromkeys(device for device, _ in chunks))
        rows = {device: [] for device in devices}
        local = []
        for device, inputs in chunks:
            taken = sum(len(part) for part in rows[device])
            rows[device].append(inputs[:, 0])
            inputs = np.array(inputs)
            inputs[:, 0] = np.arange(taken, taken + len(inputs))
            local.append(inputs)
        least = self.least_rows
        gathered = []
        for device in devices:
            part = np.concatenate(rows[device])
            gathered.append(np.concatenate([part, np.full(max(least, bucket_size(len(part))) - len(part), part[0])]))
        starts = _take_parts(stacked, gathered)
        placed = jax.device_put(starts + local, [self._others[d - 1] for d in devices] + [self._others[d - 1] for d, _ in chunks])
        on = dict(zip(devices, placed))
        return [(device, on[device], inputs) for (device, _), inputs in zip(chunks, placed[len(devices) :])]

    def _train_elsewhere(self, stacked, chunks: list[tuple[int, np.ndarray]], flagged: bool = False) -> list:
        """`_chunk` of each (device, inputs) of this process's devices besides the first, from its own
        clients' start models (`_place_elsewhere`); their (params, loss), with `flagged` also the
        rows' finite flags (computed there), moved back to the first device, in order. Each chunk is
        a program on one device: one program over several CPU devices waited in its call for the
        one before it, leaving the devices idle while the host caught up."""
        if not chunks:
            return []
        placed = self._place_elsewhere(stacked, chunks)
        train = self._train_chunk_flagged if flagged else self._train_chunk
        return jax.device_put([train(start, *self._data_on(device), inputs) for device, start, inputs in placed], self.mesh.home)

    def _sharded_chunk(self, stacked, inputs: np.ndarray):
        """The chunk's results from one program sharded over every process's devices along the
        client axis, each device training from its own clients' start models."""
        parts = self.mesh.size
        share = len(inputs) // parts
        starts = self.mesh.shard_parts(_take_parts(stacked, list(inputs[:, 0].reshape(parts, share))))
        local = np.array(inputs)
        local[:, 0] = np.tile(np.arange(share, dtype=np.int32), parts)
        return self._train_sharded(starts, self._x, self._y, self.mesh.shard(local))

    def train_one(self, params: PyTree, client: int, dispatch_id: int) -> tuple[PyTree, jnp.ndarray]:
        """One client alone, unbatched (the reference path)."""
        return self._train_one(
            params,
            self.store.x,
            self.store.y,
            np.int32(self.store.offsets[client]),  # numpy scalars: no conversion call per argument
            np.int32(self.store.counts[client]),
            np.uint32(dispatch_id),
        )
