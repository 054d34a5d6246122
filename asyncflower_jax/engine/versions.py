"""Live model versions, reference-counted: a version is freed when nobody holds it any more.

With `stacked=True` (the simulator's setting) the versions live in one device table with a
leading slot axis: a new version is written into a free slot in place (the table is donated), a
freed version's slot is reused, and the table doubles when full (never beyond `capacity`, the
most versions that can be live at once). Training and aggregation then gather the start
versions they need by slot in one call, instead of stacking one pytree per version, whose cost
and compile time grow with the number of live versions (thousands at large concurrency).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..compilation import jit
from ..strategy.updates import PyTree, tree_bytes, zero_rows

FIRST_CAPACITY = 16  # slots of a new table at least ...
FIRST_TABLE_BYTES = 2 << 30  # ... and as many more as fit in this (also the first size of the pending results' store): growing copies the table and compiles the programs that read it again


def first_rows(row_bytes: int) -> int:
    """Rows of a new table (of versions, or of trained results) with rows of `row_bytes`: at least
    FIRST_CAPACITY and as many more as fit in FIRST_TABLE_BYTES; for a model so large that
    FIRST_CAPACITY rows do not fit there, as many as do, at least 2 (the table grows when needed)."""
    fits = FIRST_TABLE_BYTES // max(1, row_bytes)
    return max(FIRST_CAPACITY, fits) if fits >= FIRST_CAPACITY else max(2, fits)


def write_row(table, params, slot):
    """The table with `params` in row `slot` (traceable: the simulator's aggregation step uses it)."""
    return jax.tree.map(lambda t, p: jax.lax.dynamic_update_index_in_dim(t, p.astype(t.dtype), slot, 0), table, params)


_write_row = jit(write_row, donate_argnums=(0,))


@jit
def _read_row(table, slot):
    return jax.tree.map(lambda t: jax.lax.dynamic_index_in_dim(t, slot, 0, keepdims=False), table)


@jit
def _read_rows(table, slots):
    return jax.tree.map(lambda t: t[slots], table)


@functools.partial(jit, static_argnums=(1,))
def grow_rows(table, capacity: int):
    """`table` (leading row axis) extended with zero rows to `capacity` rows, on its device."""
    return jax.tree.map(lambda t: jnp.concatenate([t, jnp.zeros((capacity - t.shape[0], *t.shape[1:]), t.dtype)]), table)


class VersionCache:
    """version -> params for every version the server or an unaggregated client still holds."""

    def __init__(self, stacked: bool = False, capacity: int | None = None, device=None):
        self.stacked = stacked
        self.capacity = capacity  # stacked: the table never grows past this many slots (None: no bound)
        self.device = device  # stacked: the device the table is committed to (None: JAX's default, uncommitted)
        self._params: dict[int, PyTree] = {}  # unstacked storage
        self._refs: dict[int, int] = {}
        self._table: PyTree | None = None  # stacked storage: leaves [slots, ...]
        self._slot: dict[int, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, version: int) -> bool:
        return version in self._refs

    @property
    def slots(self) -> int:
        """Slots of the stacked table (0 before the first version, or unstacked)."""
        return 0 if self._table is None else jax.tree.leaves(self._table)[0].shape[0]

    def _new_slot(self, params: PyTree) -> int:
        if not self._free:
            size = self.slots
            if size == 0:
                grown = FIRST_CAPACITY
                if self.capacity is not None:  # bounded: start with what fits the byte budget
                    grown = first_rows(tree_bytes(params))
            else:
                grown = 2 * size
            if self.capacity is not None:
                grown = max(min(grown, self.capacity), size + 1)
            if self._table is None:
                self._table = zero_rows(params, grown, self.device)
            else:
                self._table = grow_rows(self._table, grown)
            self._free = list(range(grown - 1, size - 1, -1))  # lowest slot first
        return self._free.pop()

    def stacked_rows(self, versions: list[int]) -> tuple[PyTree, np.ndarray]:
        """(a pytree with a leading version axis, the row of each listed version in it): what batched
        training gathers its start versions from. Stacked: the table itself and the slots."""
        if self.stacked:
            return self._table, self.slots_of(versions)
        from ..client.batched import bucket_size, stack_trees

        live = sorted(set(versions))
        row = {v: i for i, v in enumerate(live)}
        padded = [self._params[v] for v in live] + [self._params[live[0]]] * (bucket_size(len(live)) - len(live))
        return stack_trees(padded), np.asarray([row[v] for v in versions], np.int32)

    def gather(self, versions: list[int]) -> PyTree:
        """The listed versions (repeats allowed) stacked on a leading axis, in order."""
        if self.stacked:
            return _read_rows(self._table, self.slots_of(versions))
        from ..client.batched import stack_trees

        return stack_trees([self._params[v] for v in versions])

    def slot_of(self, version: int) -> int:
        """Stacked: the table row of a version."""
        return self._slot[version]

    def slots_of(self, versions: list[int]) -> np.ndarray:
        """Stacked: the table row of each listed version (repeats allowed)."""
        return np.asarray([self._slot[v] for v in versions], np.int32)

    @property
    def table(self) -> PyTree | None:
        """Stacked: the device table (leaves [slots, ...]); set it to a table with rows written."""
        return self._table

    @table.setter
    def table(self, table: PyTree) -> None:
        self._table = table

    def reserve(self, version: int, refs: int = 1, template: PyTree | None = None) -> int:
        """Stacked: add a new version (held `refs` times) whose row the caller writes later, and
        return its slot. Until the row is in `table`, only device code that runs after that write
        may read it (the simulator's queued aggregation steps write their rows in order).
        `template` (a model) shapes the table if there is none yet."""
        assert self.stacked and (self._table is not None or template is not None), "reserve on an empty table needs a template"
        assert version not in self._refs, f"version {version} already cached"
        slot = self._new_slot(template)
        self._slot[version] = slot
        self._refs[version] = refs
        return slot

    def put_by(self, version: int, write, template: PyTree | None = None, refs: int = 1) -> Any:
        """Stacked: add a new version (held `refs` times, like `put`) that `write(table, slot)`
        writes into the table itself, in the same device call as whatever else it computes: it
        returns (the new table, anything else), and the latter is returned. The table passed may
        be donated. `template` (a model) shapes the table if there is none yet."""
        slot = self.reserve(version, refs, template)
        self._table, out = write(self._table, np.int32(slot))
        return out

    def put(self, version: int, params: PyTree, refs: int = 1) -> None:
        """Add a new version, held once by its creator (release it when it stops being current);
        `refs` > 1 restores a version that clients also hold (from a checkpoint)."""
        if self.stacked:
            self.put_by(version, lambda table, slot: (_write_row(table, params, slot), None), template=params, refs=refs)
            return
        assert version not in self._refs, f"version {version} already cached"
        self._params[version] = params
        self._refs[version] = refs

    def refs(self) -> dict[int, int]:
        """version -> how many holders it has (the server for the current one, one per in-flight client)."""
        return dict(self._refs)

    def get(self, version: int) -> PyTree:
        if self.stacked:
            return _read_row(self._table, np.int32(self._slot[version]))
        return self._params[version]

    def acquire(self, version: int) -> None:
        self._refs[version] += 1

    def release(self, version: int) -> None:
        self._refs[version] -= 1
        if self._refs[version] == 0:
            del self._refs[version]
            if self.stacked:
                self._free.append(self._slot.pop(version))  # the row is overwritten by a later version
            else:
                del self._params[version]
