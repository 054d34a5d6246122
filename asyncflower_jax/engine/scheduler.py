"""Host-side discrete-event scheduler: who trains, from which version, and when each finishes.

Per-client state lives in flat numpy arrays; each dispatch or arrival costs O(log N) (idle-client
selection) plus O(log M) (the event heap). Randomness comes from two numpy streams derived from
the seed, so the schedule never depends on how training is batched.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import numpy as np

from .latency import LatencyModel

PROFILE_STREAM = 1
SCHEDULE_STREAM = 2


class Task(NamedTuple):
    """One dispatched piece of client work."""

    dispatch_id: int
    client: int
    start_version: int
    dispatch_time: float
    finish_time: float


class IdleClients:
    """The set of idle clients with O(log N) 'k-th smallest idle id' (a Fenwick tree over 0/1 flags).

    Selecting the k-th smallest idle id with k uniform is a canonical rule: any implementation
    (see engine/reference.py) makes the same choice from the same random draw.
    """

    def __init__(self, num_clients: int):
        self.size = num_clients
        self.idle = np.ones(num_clients, dtype=bool)
        self.count = num_clients
        index = np.arange(num_clients + 1, dtype=np.int64)
        self._tree = index & -index  # Fenwick tree over all-ones: node i covers lowbit(i) clients
        self._top = 1 << (num_clients.bit_length() - 1) if num_clients else 0

    def _add(self, client: int, delta: int) -> None:
        i = client + 1
        tree, n = self._tree, self.size
        while i <= n:
            tree[i] += delta
            i += i & -i

    def kth(self, k: int) -> int:
        """The k-th (0-based) smallest idle client id."""
        pos, step, tree, n = 0, self._top, self._tree, self.size
        while step:
            nxt = pos + step
            if nxt <= n and tree[nxt] <= k:
                pos = nxt
                k -= int(tree[nxt])
            step >>= 1
        return pos

    def take(self, client: int) -> None:
        assert self.idle[client], f"client {client} is not idle"
        self.idle[client] = False
        self.count -= 1
        self._add(client, -1)

    def put(self, client: int) -> None:
        assert not self.idle[client], f"client {client} is already idle"
        self.idle[client] = True
        self.count += 1
        self._add(client, 1)


class Scheduler:
    """Dispatches idle clients, orders their completions by (finish time, dispatch id), keeps the clock."""

    def __init__(self, num_clients: int, latency: LatencyModel, seed: int):
        self.num_clients = num_clients
        self.latency = latency
        self.profile = latency.client_profile(np.random.default_rng([seed, PROFILE_STREAM]), num_clients)
        self.rng = np.random.default_rng([seed, SCHEDULE_STREAM])
        self.idle = IdleClients(num_clients)
        self.clock = 0.0
        self.next_dispatch_id = 0
        self._heap: list[tuple[float, int]] = []
        self.in_flight: dict[int, Task] = {}

    @property
    def num_in_flight(self) -> int:
        return len(self.in_flight)

    def dispatch(self, version: int) -> Task:
        """Start a uniformly chosen idle client on model `version` at the current clock."""
        if self.idle.count == 0:
            raise RuntimeError("no idle client to dispatch")
        client = self.idle.kth(int(self.rng.integers(self.idle.count)))
        self.idle.take(client)
        duration = float(self.latency.sample(self.rng, self.profile[client : client + 1])[0])
        task = Task(self.next_dispatch_id, client, version, self.clock, self.clock + duration)
        self.next_dispatch_id += 1
        self.in_flight[task.dispatch_id] = task
        heapq.heappush(self._heap, (task.finish_time, task.dispatch_id))
        return task

    def next_finish_time(self) -> float:
        """Finish time of the earliest in-flight task (inf if none)."""
        return self._heap[0][0] if self._heap else float("inf")

    def pop(self) -> Task:
        """Complete the earliest task: advance the clock to its finish and make its client idle."""
        finish_time, dispatch_id = heapq.heappop(self._heap)
        task = self.in_flight.pop(dispatch_id)
        self.clock = max(self.clock, finish_time)
        self.idle.put(task.client)
        return task

    def advance_to(self, time: float) -> None:
        """Move the clock forward (never backwards) to `time`."""
        self.clock = max(self.clock, time)
