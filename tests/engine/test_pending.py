"""Which pending clients a flush trains near the end of a run (`training_limit`), by hand."""

from types import SimpleNamespace

import heapq

from asyncflower_jax.engine.pending import training_limit

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


def test_no_rate_before_the_first_update():
    assert training_limit(scheduler(0.0, [1.0, 2.0]), needed=5, seen=0) == (INF, INF)
