"""Which pending clients a flush trains near the end of a run (`training_limit`), by hand."""

from types import SimpleNamespace

import heapq

from asyncflower_jax.engine.pending import RATE_SAMPLES, training_limit

INF = float("inf")


def scheduler(clock, finishes):
    """What training_limit reads of a scheduler: the clock, the in-flight count and the k-th finish."""
    heap = [(t, i) for i, t in enumerate(finishes)]
    return SimpleNamespace(clock=clock, num_in_flight=len(heap), kth_finish=lambda k: heapq.nsmallest(k, heap)[-1])


def test_nothing_needed_trains_nothing_in_flight():
    assert training_limit(scheduler(5.0, [6.0, 7.0]), needed=0, seen=10) == (-INF, -INF)


def test_at_most_the_earliest_needed_in_flight():
    # 2 more updates, 4 in flight finishing at 9, 6, 8, 20: never beyond the 2nd earliest (8.0, id 2);
    # the expected end, 5 + 2 x 5 / 1 = 15, is later, so it does not bind
    assert training_limit(scheduler(5.0, [9.0, 6.0, 8.0, 20.0]), needed=2, seen=1) == (8.0, 2)


def test_only_clients_finishing_by_the_expected_end():
    # 10 updates in 5 time units so far (2 per unit); 3 more are expected by 5 + 3 / 2 = 6.5
    assert training_limit(scheduler(5.0, [9.0, 6.0, 8.0, 20.0]), needed=3, seen=10) == (6.5, INF)
    # more needed than in flight: only the rate bounds it (5 + 8 / 2 = 9)
    assert training_limit(scheduler(5.0, [9.0, 6.0]), needed=8, seen=10) == (9.0, INF)


def test_before_enough_arrivals_the_rate_of_the_finishes_in_flight_counts_when_higher():
    # no update yet: the 2 in flight finish within 2 time units (1 per unit): 5 more by 0 + 5 / 1 = 5
    assert training_limit(scheduler(0.0, [1.0, 2.0]), needed=5, seen=0) == (5.0, INF)
    # one update at 0.5 (2 per unit) is higher than the in-flight rate (2 finishes in 3.5 units)
    assert training_limit(scheduler(0.5, [1.0, 4.0]), needed=5, seen=1) == (3.0, INF)
    # one update at 5.0 (0.2 per unit): 4 finishes in the next 2 units are the higher rate (2 per unit)
    assert training_limit(scheduler(5.0, [5.5, 6.0, 6.5, 7.0]), needed=6, seen=1) == (8.0, INF)
    # everything in flight finishes now (identical durations): train those, not later ones
    assert training_limit(scheduler(5.0, [5.0, 5.0, 5.0]), needed=6, seen=1) == (5.0, INF)


def test_after_enough_arrivals_only_the_observed_rate_counts():
    # 64 updates in 64 units (1 per unit); the 4 in flight would say 2 per unit, but 64 arrivals suffice
    assert training_limit(scheduler(64.0, [64.5, 65.0, 65.5, 66.0]), needed=6, seen=RATE_SAMPLES) == (70.0, INF)
