"""Host-side discrete-event scheduler: who trains, from which version, and when each finishes.

Per-client state lives in flat numpy arrays; each dispatch or arrival costs O(log N) (idle-client
selection) plus O(log M) (the event heap). Randomness comes from two numpy streams derived from
the seed, so the schedule never depends on how training is batched.

With an availability model (engine/availability.py) a dispatch chooses among the clients that are
idle and available at the clock, with the same draw; `next_wake()` is the next moment an idle
client becomes available (the simulator moves the clock there when slots are empty and nobody can
fill them), and with `drop_on_leave` a task whose client leaves before it is done becomes a dropout
at the leave time. Without one (or with `always`) nothing of this runs.
"""

from __future__ import annotations

import copy
import heapq
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError
from .availability import INF, AvailabilityModel, ClientAvailability
from .faults import DROPOUT, FAULT_STREAM, Faults
from .latency import LatencyModel, check_profile, remedies

PROFILE_STREAM = 1
SCHEDULE_STREAM = 2
KTH_BY_HEAP = 256  # kth_finish below this k walks the heap; above, numpy partitions the finish times


def client_profile(latency: LatencyModel, num_clients: int, seed: int) -> np.ndarray:
    """Every client's latency profile (speed) for `seed`, checked finite and > 0 (ConfigError):
    an experiment checks it before writing anything, the scheduler draws the same."""
    profile = latency.client_profile(np.random.default_rng([seed, PROFILE_STREAM]), num_clients)
    check_profile(profile, latency)
    return profile


class Task(NamedTuple):
    """One dispatched piece of client work."""

    dispatch_id: int
    client: int
    start_version: int
    dispatch_time: float
    finish_time: float  # when the server learns the outcome (its arrival, or its failure)
    fault: str | None = None  # an injected fault (engine/faults.py), None for a normal task


class IdleClients:
    """The set of idle clients with O(log N) 'k-th smallest idle id' (a Fenwick tree over 0/1 flags).

    Selecting the k-th smallest idle id with k uniform is a canonical rule: any implementation
    (see engine/reference.py) makes the same choice from the same random draw. Clients marked
    unavailable (`set_available`) stay idle but leave the choice: `count` and `take_kth` cover the
    clients that are idle and available.
    """

    def __init__(self, num_clients: int):
        self.size = num_clients
        self.idle = np.ones(num_clients, dtype=bool)
        self.available = np.ones(num_clients, dtype=bool)
        self.count = num_clients  # idle and available
        index = np.arange(num_clients + 1, dtype=np.int64)
        # Fenwick tree over all-ones: node i covers lowbit(i) clients. A list until `_add_many`
        # first needs array operations (availability): take_kth and _add, a Python loop per event, read
        # and write a list twice as fast as a numpy array.
        self._tree = (index & -index).tolist()
        self._top = 1 << (num_clients.bit_length() - 1) if num_clients else 0

    def __deepcopy__(self, memo) -> IdleClients:
        """A copy of its own (the simulator copies its scheduler before an optimistic run): the
        tree's list copied as a list, not int by int (1.5 s at N = 1e6)."""
        new = copy.copy(self)
        new.idle, new.available = self.idle.copy(), self.available.copy()
        new._tree = list(self._tree) if isinstance(self._tree, list) else self._tree.copy()
        memo[id(self)] = new
        return new

    def _add(self, client: int, delta: int) -> None:
        i = client + 1
        tree, n = self._tree, self.size
        while i <= n:
            tree[i] += delta
            i += i & -i

    def _add_many(self, clients: np.ndarray, deltas: np.ndarray) -> None:
        """`_add` for many distinct clients at once, in a few array operations; a rebuild from the
        flags (O(N)) when they are many.

        The nodes `_add(c, d)` visits are i = c + 1 and, for every bit b of i above its lowest set
        bit that is 0, i with its bits below b cleared and bit b set (while <= N)."""
        n = self.size
        if len(clients) > n // 16:
            flags = np.zeros(n + 1, np.int64)
            np.cumsum(self.idle & self.available, out=flags[1:])
            index = np.arange(n + 1, dtype=np.int64)
            self._tree = flags - flags[index - (index & -index)]
            return
        if isinstance(self._tree, list):
            self._tree = np.asarray(self._tree, np.int64)
        i, deltas = clients.astype(np.int64) + 1, deltas.astype(np.int64)
        bits = np.arange(n.bit_length() + 1, dtype=np.int64)
        power = np.left_shift(1, bits)
        shifted = i[:, None] >> bits
        above = (shifted << bits) + power  # clear the bits below b, set bit b
        visited = ((shifted & 1) == 0) & (power > (i & -i)[:, None]) & (above <= n)
        np.add.at(self._tree, np.concatenate([i, above[visited]]), np.concatenate([deltas, np.broadcast_to(deltas[:, None], above.shape)[visited]]))

    def take_kth(self, k: int) -> int:
        """Take the k-th (0-based) smallest idle and available client id, and return it. One
        descent finds it and takes it: the nodes the descent does not step past are exactly those
        whose range holds the client."""
        pos, step, tree, n = 0, self._top, self._tree, self.size
        while step:
            nxt = pos + step
            if nxt <= n:
                if tree[nxt] <= k:
                    pos = nxt
                    k -= int(tree[nxt])
                else:
                    tree[nxt] -= 1
            step >>= 1
        self.idle[pos] = False
        self.count -= 1
        return pos

    def take(self, client: int) -> None:
        assert self.idle[client], f"client {client} is not idle"
        self.idle[client] = False
        if self.available[client]:
            self.count -= 1
            self._add(client, -1)

    def put(self, client: int) -> None:
        assert not self.idle[client], f"client {client} is already idle"
        self.idle[client] = True
        if self.available[client]:
            self.count += 1
            self._add(client, 1)

    def set_available(self, clients: np.ndarray, flags: np.ndarray) -> None:
        """Mark distinct `clients` available (True) or not (False); idle ones join or leave the choice."""
        clients, flags = np.asarray(clients, np.int64), np.asarray(flags, bool)
        changed = flags != self.available[clients]
        clients, flags = clients[changed], flags[changed]
        self.available[clients] = flags
        counted = self.idle[clients]
        clients, flags = clients[counted], flags[counted]
        if clients.size:
            deltas = np.where(flags, 1, -1)
            self.count += int(deltas.sum())
            self._add_many(clients, deltas)


class Scheduler:
    """Dispatches idle clients, orders their completions by (finish time, dispatch id), keeps the clock."""

    def __init__(
        self, num_clients: int, latency: LatencyModel, seed: int, faults: Faults | None = None, availability: AvailabilityModel | None = None
    ):
        self.num_clients = num_clients
        self.latency = latency
        self.profile = client_profile(latency, num_clients, seed)
        self.rng = np.random.default_rng([seed, SCHEDULE_STREAM])
        self.faults = faults if faults is not None and faults.enabled else None
        self.fault_rng = np.random.default_rng([seed, FAULT_STREAM])
        self.injected: dict[str, int] = {}  # fault kind -> dispatches it was drawn for
        self.idle = IdleClients(num_clients)
        self.clock = 0.0
        self.next_dispatch_id = 0
        self._heap: list[tuple[float, int]] = []
        self.in_flight: dict[int, Task] = {}
        self.held: list[int] = []  # clients out of the draw until release_held (pop(hold=True))
        # availability (None: every client always available, and none of its work is done)
        self.availability: ClientAvailability | None = None
        self.drop_on_leave = False
        self.waits = 0  # clock moves to the moment an idle client became available (slots were empty)
        self.left = 0  # tasks that became dropouts because their client left (drop_on_leave)
        if availability is not None and not availability.always:
            self.availability = ClientAvailability(availability.plan(num_clients, seed), num_clients)
            self.drop_on_leave = bool(getattr(availability, "drop_on_leave", False))
            self.idle.set_available(np.arange(num_clients), self.availability.available)

    @property
    def num_in_flight(self) -> int:
        return len(self.in_flight)

    def _sync(self) -> None:
        """Bring the clients' availability to the clock."""
        changed, flags = self.availability.sync(self.clock)
        if changed.size:
            self.idle.set_available(changed, flags)

    def num_dispatchable(self) -> int:
        """Clients that are idle and available at the clock."""
        if self.availability is not None:
            self._sync()
        return self.idle.count

    def next_wake(self) -> float:
        """The earliest time after the clock at which an idle client becomes available (inf: never,
        or no availability model). An O(N) scan: for when no idle client is available."""
        if self.availability is None:
            return float("inf")
        self._sync()
        return self.availability.next_start(self.idle.idle)

    def wake(self, time: float) -> None:
        """Move the clock forward to `time`, a `next_wake()`, to fill empty slots then."""
        self.waits += 1
        self.clock = max(self.clock, time)

    def dispatch(self, version: int) -> Task:
        """Start a uniformly chosen idle (and available) client on model `version` at the current clock."""
        if self.availability is not None:
            self._sync()
        if self.idle.count == 0:
            raise RuntimeError("no idle client to dispatch" if self.availability is None else "no idle and available client to dispatch")
        client = self.idle.take_kth(int(self.rng.integers(self.idle.count)))
        duration = self.latency.sample_one(self.rng, self.profile[client])
        if not duration < INF:  # (NaN too)
            raise ConfigError(
                f"latency: client {client}'s task took {duration} (beyond float64's range) under {self.latency}; choose settings "
                f"whose durations are finite: {remedies(self.latency)}"
            )
        fault = None
        if self.faults is not None:
            fault, duration = self.faults.draw(self.fault_rng, duration)
            if fault is not None:
                self.injected[fault] = self.injected.get(fault, 0) + 1
        finish = self.clock + duration
        if not finish < INF:
            raise ConfigError(
                f"latency: the simulated clock passed float64's range at {self.clock:.6g} + {duration:.6g} (client {client}'s task) "
                f"under {self.latency}; choose shorter durations (a smaller duration, median or minimum)"
            )
        if self.drop_on_leave:
            leave = float(self.availability.end[client])  # the end of the interval the client is in
            if finish > leave:
                fault, finish = DROPOUT, leave
                self.left += 1
        task = Task(self.next_dispatch_id, client, version, self.clock, finish, fault)
        self.next_dispatch_id += 1
        self.in_flight[task.dispatch_id] = task
        heapq.heappush(self._heap, (task.finish_time, task.dispatch_id))
        return task

    def next_finish_time(self) -> float:
        """Finish time of the earliest in-flight task (inf if none)."""
        return self._heap[0][0] if self._heap else float("inf")

    def kth_finish(self, k: int) -> tuple[float, int]:
        """(finish time, dispatch id) of the k-th earliest in-flight task (1-based): O(M log k) by
        the heap for small k, O(M) by a numpy partition for large k (thousands in flight)."""
        if k <= KTH_BY_HEAP:
            return heapq.nsmallest(k, self._heap)[-1]
        finishes, ids = np.array(self._heap).T
        finish = np.partition(finishes, k - 1)[k - 1]
        earlier = int(np.count_nonzero(finishes < finish))
        return float(finish), int(np.sort(ids[finishes == finish])[k - 1 - earlier])

    def pop(self, hold: bool = False) -> Task:
        """Complete the earliest task: advance the clock to its finish and make its client idle, or
        with `hold`, keep it out of the draw until `release_held` (a synchronous round's cohort:
        a client whose task ended in this round is not drawn again to refill it)."""
        finish_time, dispatch_id = heapq.heappop(self._heap)
        task = self.in_flight.pop(dispatch_id)
        self.clock = max(self.clock, finish_time)
        if hold:
            self.held.append(task.client)
        else:
            self.idle.put(task.client)
        return task

    def release_held(self) -> None:
        """Make the clients held by `pop(hold=True)` idle (the round they were in has ended)."""
        for client in self.held:
            self.idle.put(client)
        self.held = []

    def advance_to(self, time: float) -> None:
        """Move the clock forward (never backwards) to `time`."""
        self.clock = max(self.clock, time)

    def state_dict(self) -> dict:
        """Everything that evolves during a run, as JSON-ready values (the client profile is derived
        from the seed and rebuilt; the heap and the idle set follow from the in-flight tasks; the
        clients' availability intervals are arrays: `state_arrays()`)."""
        state = {
            "clock": self.clock,
            "next_dispatch_id": self.next_dispatch_id,
            "rng": self.rng.bit_generator.state,
            "fault_rng": self.fault_rng.bit_generator.state,
            "injected": dict(self.injected),
            "in_flight": [list(task) for task in sorted(self.in_flight.values())],
        }
        if self.held:
            state["held"] = list(self.held)
        if self.availability is not None:
            state["availability"] = {"time": self.availability.time, "waits": self.waits, "left": self.left}
        return state

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the state (every client's current availability interval; none without availability)."""
        if self.availability is None:
            return {}
        return {f"availability.{name}": value for name, value in self.availability.state_arrays().items()}

    def load_state_dict(self, state: dict, arrays: dict | None = None) -> None:
        """Continue from `state_dict()`'s and `state_arrays()`'s output (on a scheduler built with the
        same settings). A mismatch in availability raises ValueError; a missing entry KeyError."""
        if (self.availability is not None) != ("availability" in state):
            raise ValueError(
                "the state was saved " + ("without" if self.availability is not None else "with") + " an availability model, this scheduler has "
                + ("one" if self.availability is not None else "none")
            )
        self.clock = float(state["clock"])
        self.next_dispatch_id = int(state["next_dispatch_id"])
        self.rng.bit_generator.state = state["rng"]
        self.fault_rng.bit_generator.state = state["fault_rng"]
        self.injected = {str(k): int(v) for k, v in state["injected"].items()}
        self.idle = IdleClients(self.num_clients)
        if self.availability is not None:
            saved, arrays = state["availability"], arrays if arrays is not None else {}
            self.availability.load(
                float(saved["time"]), arrays["availability.start"], arrays["availability.end"], arrays["availability.index"]
            )
            self.waits, self.left = int(saved["waits"]), int(saved["left"])
            self.idle.set_available(np.arange(self.num_clients), self.availability.available)
        self.in_flight, self._heap = {}, []
        for d, client, start, dispatched, finish, fault in state["in_flight"]:
            task = Task(int(d), int(client), int(start), float(dispatched), float(finish), fault)
            self.idle.take(task.client)
            self.in_flight[task.dispatch_id] = task
            self._heap.append((task.finish_time, task.dispatch_id))
        heapq.heapify(self._heap)
        self.held = [int(c) for c in state.get("held", ())]
        for client in self.held:
            self.idle.take(client)
