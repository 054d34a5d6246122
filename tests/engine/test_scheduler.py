"""IdleClients (Fenwick k-th idle) against a naive reference; Scheduler event order, clock and bookkeeping."""

import numpy as np
import pytest

from asyncflower_jax.engine.availability import Always, TraceAvailability
from asyncflower_jax.engine.latency import ClientGroups, Constant, Exponential
from asyncflower_jax.engine.scheduler import KTH_BY_HEAP, IdleClients, Scheduler


# ---- IdleClients ----------------------------------------------------------------------------------
def kth(idle: IdleClients, k: int) -> int:
    """The k-th idle (and available) client, the set left as it was: take_kth, then put back."""
    client = idle.take_kth(k)
    idle.put(client)
    return client


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 13, 64, 100])
def test_kth_matches_naive_after_random_take_put(n):
    rng = np.random.default_rng(n)
    idle = IdleClients(n)
    naive = np.ones(n, bool)
    for _ in range(600):
        busy = np.flatnonzero(~naive)
        free = np.flatnonzero(naive)
        if len(free) and (not len(busy) or rng.random() < 0.55):
            c = int(rng.choice(free))
            idle.take(c)
            naive[c] = False
        else:
            c = int(rng.choice(busy))
            idle.put(c)
            naive[c] = True
        assert idle.count == naive.sum()
        np.testing.assert_array_equal(idle.idle, naive)
        free = np.flatnonzero(naive)
        for k in range(len(free)):
            assert kth(idle, k) == free[k]


@pytest.mark.parametrize("n", [1, 2, 7, 8, 13, 100])
def test_take_kth_takes_the_kth_idle_client_and_leaves_the_tree_of_take(n):
    """take_kth(k) takes the k-th idle client, and leaves the same set and the same Fenwick nodes
    as a set that took that client by `take`."""
    rng = np.random.default_rng(n)
    idle, by_take = IdleClients(n), IdleClients(n)
    naive = np.ones(n, bool)
    for _ in range(300):
        if naive.any() and (naive.all() or rng.random() < 0.5):
            k = int(rng.integers(naive.sum()))
            c = idle.take_kth(k)
            assert c == np.flatnonzero(naive)[k]
            by_take.take(c)
            naive[c] = False
        else:
            c = int(rng.choice(np.flatnonzero(~naive)))
            idle.put(c)
            by_take.put(c)
            naive[c] = True
        assert idle.count == by_take.count == naive.sum()
        np.testing.assert_array_equal(idle.idle, naive)
        assert list(idle._tree) == list(by_take._tree)


def test_kth_on_fresh_set_is_identity():
    idle = IdleClients(10)
    assert [kth(idle, k) for k in range(10)] == list(range(10))


def test_kth_when_only_last_client_idle():
    idle = IdleClients(9)
    for c in range(8):
        idle.take(c)
    assert idle.count == 1 and kth(idle, 0) == 8


def test_take_busy_and_put_idle_are_refused():
    idle = IdleClients(3)
    idle.take(1)
    with pytest.raises(AssertionError):
        idle.take(1)
    with pytest.raises(AssertionError):
        idle.put(0)


# ---- Scheduler ------------------------------------------------------------------------------------
def test_constant_latency_ties_pop_in_dispatch_order():
    sched = Scheduler(num_clients=10, latency=Constant(1.0), seed=0)
    tasks = [sched.dispatch(version=0) for _ in range(6)]
    assert [t.dispatch_id for t in tasks] == [0, 1, 2, 3, 4, 5]
    assert all(t.dispatch_time == 0.0 and t.finish_time == 1.0 for t in tasks)
    assert len({t.client for t in tasks}) == 6  # six distinct clients
    popped = [sched.pop() for _ in range(3)]
    assert [t.dispatch_id for t in popped] == [0, 1, 2]  # exact ties: by dispatch id
    assert sched.clock == 1.0
    # dispatched now, at clock 1.0, finishes at 2.0: after the three remaining ties at 1.0
    late = sched.dispatch(version=1)
    assert (late.dispatch_id, late.dispatch_time, late.finish_time, late.start_version) == (6, 1.0, 2.0, 1)
    order = [sched.pop().dispatch_id for _ in range(4)]
    assert order == [3, 4, 5, 6]
    assert sched.clock == 2.0
    assert sched.num_in_flight == 0 and sched.next_finish_time() == float("inf")


def test_pop_returns_the_task_and_frees_its_client():
    sched = Scheduler(num_clients=4, latency=Constant(0.5), seed=1)
    t = sched.dispatch(version=3)
    assert not sched.idle.idle[t.client] and sched.idle.count == 3
    assert sched.in_flight == {t.dispatch_id: t}
    assert sched.next_finish_time() == 0.5
    assert sched.pop() == t
    assert sched.idle.idle[t.client] and sched.idle.count == 4 and sched.in_flight == {}


@pytest.mark.parametrize("latency", [Exponential(1.0, 0.5), ClientGroups(), Constant(1.0)], ids=lambda m: type(m).__name__)
def test_random_run_order_clock_bookkeeping_and_no_busy_dispatch(latency):
    n, concurrency = 12, 5
    sched = Scheduler(num_clients=n, latency=latency, seed=3)
    rng = np.random.default_rng(0)
    ref_in_flight = {}  # dispatch_id -> task, kept independently
    last_clock, version, popped_ids = 0.0, 0, []
    for _ in range(concurrency):
        t = sched.dispatch(version)
        ref_in_flight[t.dispatch_id] = t
    for step in range(400):
        # the next pop is the earliest (finish time, dispatch id) of the tasks in flight
        expected = min(ref_in_flight.values(), key=lambda t: (t.finish_time, t.dispatch_id))
        assert sched.next_finish_time() == expected.finish_time
        task = sched.pop()
        assert task == expected
        del ref_in_flight[task.dispatch_id]
        popped_ids.append(task.dispatch_id)
        assert sched.clock >= last_clock  # never backwards
        assert sched.clock == max(last_clock, task.finish_time)
        last_clock = sched.clock
        if step % 7 == 0:
            sched.advance_to(sched.clock + 0.25)  # e.g. the end of a time window
            assert sched.clock == last_clock + 0.25
            last_clock = sched.clock
        if step % 11 == 0:
            sched.advance_to(sched.clock - 5.0)  # an earlier time is ignored
            assert sched.clock == last_clock
        if step % 5 == 0:
            version += 1
        # refill to the concurrency (sometimes one short, sometimes two at once)
        for _ in range(int(rng.integers(0, 3))):
            if len(ref_in_flight) >= concurrency:
                break
            busy_clients = {t.client for t in ref_in_flight.values()}
            new = sched.dispatch(version)
            assert new.client not in busy_clients  # a busy client is never dispatched
            assert new.dispatch_time == sched.clock and new.finish_time >= new.dispatch_time
            assert new.start_version == version
            ref_in_flight[new.dispatch_id] = new
        if not ref_in_flight:
            new = sched.dispatch(version)
            ref_in_flight[new.dispatch_id] = new
        # bookkeeping
        assert sched.in_flight == ref_in_flight
        assert sched.num_in_flight == len(ref_in_flight)
        assert sched.idle.count + sched.num_in_flight == n
        busy = np.zeros(n, bool)
        busy[[t.client for t in ref_in_flight.values()]] = True
        np.testing.assert_array_equal(sched.idle.idle, ~busy)
    assert len(set(popped_ids)) == len(popped_ids)  # each task completes once


def test_exponential_ties_impossible_but_order_by_finish_time():
    sched = Scheduler(num_clients=50, latency=Exponential(2.0, 0.3), seed=9)
    tasks = [sched.dispatch(0) for _ in range(50)]
    order = [sched.pop() for _ in range(50)]
    assert order == sorted(tasks, key=lambda t: (t.finish_time, t.dispatch_id))
    assert sched.clock == max(t.finish_time for t in tasks)


def test_dispatch_with_no_idle_client_raises():
    sched = Scheduler(num_clients=3, latency=Constant(1.0), seed=0)
    clients = {sched.dispatch(0).client for _ in range(3)}
    assert clients == {0, 1, 2}
    with pytest.raises(RuntimeError):
        sched.dispatch(0)


def test_schedule_is_determined_by_seed():
    def trace(seed):
        sched = Scheduler(num_clients=20, latency=Exponential(1.0, 0.5), seed=seed)
        out = [sched.dispatch(0) for _ in range(8)]
        for v in range(30):
            out.append(sched.pop())
            out.append(sched.dispatch(v))
        return out

    assert trace(4) == trace(4)
    assert trace(4) != trace(5)


@pytest.mark.parametrize("as_arrays", [False, True])
def test_a_deep_copy_of_the_scheduler_replays_the_same_events_and_shares_no_state(as_arrays):
    """The simulator copies its scheduler before an optimistic run, to rerun from it: the copy
    must go on exactly as the original and not see the original's later changes (the idle
    clients' tree is copied as a list or an array, not element by element)."""
    import copy

    sched = Scheduler(num_clients=30, latency=Exponential(1.0, 0.5), seed=3)
    for _ in range(6):
        sched.dispatch(0)
    if as_arrays:  # (availability turns the tree into an array)
        sched.idle._add_many(np.array([20, 21]), np.array([0, 0]))
    twin = copy.deepcopy(sched)

    def run(s):
        out = []
        for v in range(40):
            out.append(s.pop())
            out.append(s.dispatch(v))
        return out

    assert run(sched) == run(twin)
    assert twin.idle._tree is not sched.idle._tree and twin.idle.idle is not sched.idle.idle


def test_profile_drawn_once_per_scheduler():
    sched = Scheduler(num_clients=100, latency=ClientGroups(), seed=2)
    profile = sched.profile.copy()
    assert np.sum(profile == 2.0) == 80 and np.sum(profile == 1.0) == 20
    for _ in range(10):
        sched.dispatch(0)
        sched.pop()
    np.testing.assert_array_equal(sched.profile, profile)


# ---- availability ---------------------------------------------------------------------------------
TRACE = "client,start,end\n0,6,7\n1,2,10\n2,9,10\n3,0,0.5\n4,2.5,3\n"  # only client 3 is available at time 0


def trace_scheduler(tmp_path, drop_on_leave=False, seed=0):
    path = tmp_path / "availability.csv"
    path.write_text(TRACE)
    return Scheduler(5, Constant(1.0), seed=seed, availability=TraceAvailability(path=str(path), drop_on_leave=drop_on_leave))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_only_available_client_is_chosen_and_waits_reach_the_next(tmp_path, seed):
    sched = trace_scheduler(tmp_path, seed=seed)
    assert sched.num_dispatchable() == 1
    first = sched.dispatch(0)
    assert (first.client, first.dispatch_time, first.finish_time, first.fault) == (3, 0.0, 1.0, None)  # it outlasts its interval, and completes
    assert sched.num_dispatchable() == 0
    with pytest.raises(RuntimeError, match="no idle and available client"):
        sched.dispatch(0)
    assert sched.next_wake() == 2.0  # client 1
    assert sched.pop() == first and sched.clock == 1.0
    assert sched.num_dispatchable() == 0 and sched.next_wake() == 2.0  # client 3 is idle again, but gone since 0.5
    sched.wake(2.0)
    second = sched.dispatch(1)
    assert (second.client, second.dispatch_time) == (1, 2.0)
    assert sched.next_wake() == 2.5
    sched.wake(2.5)
    assert sched.dispatch(1).client == 4
    assert sched.next_wake() == 6.0 and sched.waits == 2
    sched.advance_to(9.5)  # client 0 came and went; client 2 is there
    assert sched.num_dispatchable() == 1 and sched.dispatch(2).client == 2
    assert sched.next_wake() == float("inf")  # nobody idle will ever be available again


def test_drop_on_leave_turns_tasks_outlasting_their_interval_into_dropouts_at_the_leave_time(tmp_path):
    sched = trace_scheduler(tmp_path, drop_on_leave=True)
    lost = sched.dispatch(0)
    assert (lost.client, lost.finish_time, lost.fault) == (3, 0.5, "dropout")
    sched.wake(2.0)
    kept = sched.dispatch(0)
    assert (kept.client, kept.finish_time, kept.fault) == (1, 3.0, None)  # 3.0 <= 10: done in time
    sched.wake(2.5)
    late = sched.dispatch(0)
    assert (late.client, late.finish_time, late.fault) == (4, 3.0, "dropout")  # would finish at 3.5, leaves at 3
    assert sched.left == 2 and sched.injected == {}  # not an injected fault


def test_dispatch_picks_the_kth_idle_and_available_client_with_the_usual_draw(tmp_path):
    path = tmp_path / "availability.csv"
    path.write_text("client,start,end\n" + "".join(f"{c},{0 if c in (1, 4, 5) else 1},2\n" for c in range(6)))
    sched = Scheduler(6, Constant(1.0), seed=7, availability=TraceAvailability(path=str(path)))
    draws = np.random.default_rng([7, 2])  # the schedule stream: k, then the duration's draws
    k = int(draws.integers(3))
    assert sched.dispatch(0).client == [1, 4, 5][k]


def test_always_available_dispatches_exactly_as_without_a_model():
    plain = Scheduler(20, Exponential(1.0, 0.5), seed=4)
    always = Scheduler(20, Exponential(1.0, 0.5), seed=4, availability=Always())
    assert always.availability is None
    a = [plain.dispatch(0) for _ in range(8)] + [plain.pop() for _ in range(3)] + [plain.dispatch(1) for _ in range(3)]
    b = [always.dispatch(0) for _ in range(8)] + [always.pop() for _ in range(3)] + [always.dispatch(1) for _ in range(3)]
    assert a == b and always.next_wake() == float("inf")


@pytest.mark.parametrize("latency", [Constant(duration=1.0), Exponential(rate=1.0, client_sigma=0.0)], ids=["ties", "exponential"])
def test_kth_finish_by_heap_and_by_partition_equal_sorting_the_in_flight_tasks(latency):
    sched = Scheduler(3000, latency, seed=5)
    for _ in range(600):  # two dispatch times: with constant durations, finish times tie in blocks of 600
        sched.dispatch(0)
    sched.advance_to(0.5)
    for _ in range(600):
        sched.dispatch(0)
    for _ in range(100):
        sched.pop()
    ordered = sorted((t.finish_time, t.dispatch_id) for t in sched.in_flight.values())
    for k in (1, 2, KTH_BY_HEAP, KTH_BY_HEAP + 1, 499, 500, 501, 777, len(ordered)):
        assert sched.kth_finish(k) == ordered[k - 1], k
