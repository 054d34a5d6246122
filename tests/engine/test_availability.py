"""Availability models (which clients are available when, and the next change), the windowed tracker
against a brute-force evaluation, idle-and-available selection, and the availability trace parser."""

import math

import numpy as np
import pytest

from asyncflower_jax.engine.availability import (
    Always,
    ClientAvailability,
    Diurnal,
    OnOff,
    TraceAvailability,
    counter_uniform,
)
from asyncflower_jax.engine.scheduler import IdleClients
from asyncflower_jax.engine.traces import load_availability_trace
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from tests.conftest import make_config
from tests.engine.test_scheduler import kth

INF = float("inf")


def intervals_of(plan, client, until):
    """Client's intervals from the plan, up to the first one starting after `until`."""
    one = np.asarray([client])
    start, end = plan.first(one)
    out = [(float(start[0]), float(end[0]))]
    while out[-1][0] <= until and out[-1][0] != INF:
        start, end = plan.following(one, np.asarray([len(out)]), np.asarray([out[-1][1]]))
        out.append((float(start[0]), float(end[0])))
    return out


def brute_force(plan, num_clients, t):
    """(available flags, next start after t) of every client, by enumerating its intervals."""
    flags, starts = np.zeros(num_clients, bool), np.full(num_clients, INF)
    for c in range(num_clients):
        ivs = intervals_of(plan, c, t)
        flags[c] = any(s <= t < e for s, e in ivs)
        starts[c] = min((s for s, _ in ivs if s > t), default=INF)
    return flags, starts


def write(tmp_path, text, name="availability.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- diurnal ---------------------------------------------------------------------------------------
def test_diurnal_time_zones_by_hand():
    """Period 10, windows of 3: zone 0 (clients 0, 1) from 0 to 3, 10 to 13, ...; zone 1 (clients 2,
    3) from 5 to 8, 15 to 18, ..."""
    plan = Diurnal(period=10, fraction=0.3, offsets=[0, 5], shuffle=False).plan(4, seed=0)
    assert intervals_of(plan, 0, 11)[:3] == [(-10.0, -7.0), (0.0, 3.0), (10.0, 13.0)]
    assert intervals_of(plan, 3, 6)[:2] == [(-5.0, -2.0), (5.0, 8.0)]
    av = ClientAvailability(plan, 4)
    assert av.available.tolist() == [True, True, False, False] and av.quiet_until == 3.0
    changed, flags = av.sync(2.9)
    assert changed.size == 0 and av.quiet_until == 3.0
    changed, flags = av.sync(3.0)  # [0, 3): gone at 3
    assert changed.tolist() == [0, 1] and flags.tolist() == [False, False] and av.quiet_until == 5.0
    assert av.next_start(np.ones(4, bool)) == 5.0  # clients 2 and 3 start at 5
    assert av.next_start(np.array([True, True, False, False])) == 10.0
    changed, flags = av.sync(6.0)
    assert changed.tolist() == [2, 3] and flags.tolist() == [True, True] and av.quiet_until == 8.0
    changed, flags = av.sync(12.5)  # zone 1 left at 8, zone 0 is back from 10
    assert sorted(zip(changed.tolist(), flags.tolist())) == [(0, True), (1, True), (2, False), (3, False)]
    assert av.available.tolist() == [True, True, False, False] and av.quiet_until == 13.0
    assert (av.start[0], av.end[0], av.end[2], av.start[2]) == (10.0, 13.0, 18.0, 15.0)


def test_diurnal_offset_outside_the_period_and_window_across_time_zero():
    plan = Diurnal(period=10, fraction=0.3, offsets=[-1.0]).plan(2, seed=0)  # phase 9: windows [-1, 2), [9, 12)
    av = ClientAvailability(plan, 2)
    assert av.available.tolist() == [True, True] and av.quiet_until == 2.0
    av.sync(2.0)
    assert av.available.tolist() == [False, False] and av.next_start(np.ones(2, bool)) == 9.0


def test_a_diurnal_window_too_small_for_float64_is_still_an_interval():
    """fraction * period below the spacing of floats at the window's start gave intervals with
    end == start: the loop waiting for a client woke at each start and found none, forever."""
    plan = Diurnal(period=24, fraction=1e-17, offsets=[10.0]).plan(3, seed=0)
    start, end = plan.following(np.arange(3), np.full(3, 5), np.zeros(3))
    assert (end > start).all() and (end == np.nextafter(start, np.inf)).all()
    av = ClientAvailability(plan, 3)
    at = av.next_start(np.ones(3, bool))
    changed, flags = av.sync(at)
    assert av.available.all() and flags.all()


def test_diurnal_random_phases_share_and_zone_fractions():
    n = 20000
    plan = Diurnal(period=24, fraction=0.25).plan(n, seed=1)
    assert plan.phase.min() >= 0 and plan.phase.max() < 24
    assert abs(ClientAvailability(plan, n).available.mean() - 0.25) < 0.02
    zones = Diurnal(period=24, fraction=0.5, offsets=[0, 8, 16], fractions=[0.5, 0.3, 0.2]).plan(100, seed=1)
    assert sorted(np.unique(zones.phase, return_counts=True)[1].tolist()) == [20, 30, 50]


# ---- on/off ----------------------------------------------------------------------------------------
def test_on_off_follows_its_documented_rule():
    """Interval 0: on at 0 with probability mean_on / (mean_on + mean_off), for an Exp(mean_on)
    residual; else after an Exp(mean_off) wait. Then off Exp(mean_off), on Exp(mean_on), from the
    counter-based uniforms of (client, interval, slot)."""
    plan = OnOff(mean_on=2.0, mean_off=6.0).plan(50, seed=3)
    for c in (0, 7, 49):
        u = lambda i, slot: float(counter_uniform(plan.key, [c], [i], slot)[0])  # noqa: E731
        start = 0.0 if u(0, 0) < 0.25 else -6.0 * math.log(u(0, 2))
        end = start - 2.0 * math.log(u(0, 1))
        expected = [(start, end)]
        for i in (1, 2, 3):
            start = end - 6.0 * math.log(u(i, 2))
            end = start - 2.0 * math.log(u(i, 1))
            expected.append((start, end))
        got = intervals_of(plan, c, expected[-1][0])[:4]
        assert np.asarray(got) == pytest.approx(np.asarray(expected), rel=1e-12)


def test_on_off_statistics_and_groups():
    n = 20000
    plan = OnOff(mean_on=2.0, mean_off=6.0).plan(n, seed=0)
    av = ClientAvailability(plan, n)
    assert abs(av.available.mean() - 0.25) < 0.02  # the stationary share at time 0
    ons, offs = [], []
    for c in range(300):
        ivs = intervals_of(plan, c, 200.0)
        ons += [e - s for s, e in ivs[1:]]
        offs += [b[0] - a[1] for a, b in zip(ivs, ivs[1:])]
    assert abs(np.mean(ons) - 2.0) < 0.15 and abs(np.mean(offs) - 6.0) < 0.4
    grouped = OnOff(mean_on=[1.0, 10.0], mean_off=5.0, fractions=[0.5, 0.5], shuffle=False).plan(10, seed=0)
    assert grouped.mean_on.tolist() == [1.0] * 5 + [10.0] * 5 and grouped.mean_off.tolist() == [5.0] * 10


def test_counter_uniforms_do_not_depend_on_the_batch():
    clients, index = np.arange(1000), np.arange(1000) % 7
    batch = counter_uniform(12345, clients, index, 1)
    one_by_one = [counter_uniform(12345, [c], [i], 1)[0] for c, i in zip(clients[:50], index[:50])]
    assert batch[:50].tolist() == one_by_one
    assert 0 < batch.min() and batch.max() < 1 and abs(batch.mean() - 0.5) < 0.03
    assert not np.array_equal(batch, counter_uniform(12345, clients, index, 2))
    assert not np.array_equal(batch, counter_uniform(54321, clients, index, 1))


# ---- the windowed tracker against brute force -------------------------------------------------------
@pytest.mark.parametrize(
    "model",
    [OnOff(mean_on=1.0, mean_off=3.0), Diurnal(period=5, fraction=0.4), Diurnal(period=5, fraction=0.4, offsets=[0, 2.5])],
    ids=["on_off", "diurnal", "zones"],
)
@pytest.mark.parametrize("window", [2, 10, None])
def test_tracker_matches_brute_force_at_increasing_times(model, window):
    n = 60
    plan = model.plan(n, seed=5)
    av = ClientAvailability(plan, n, window=window)
    flags = av.available.copy()
    rng = np.random.default_rng(0)
    t = 0.0
    for step in range(80):
        t += float(rng.exponential(0.3)) if step % 9 else 0.0  # sometimes the same time again
        if step == 40:
            t += 12.0  # a long jump over several intervals
        changed, new = av.sync(t)
        flags[changed] = new
        expected, starts = brute_force(plan, n, t)
        np.testing.assert_array_equal(av.available, expected)
        np.testing.assert_array_equal(flags, expected)  # the reported changes add up
        assert len(set(changed.tolist())) == len(changed)
        idle = rng.random(n) < 0.5
        waiting = idle & ~expected
        assert av.next_start(idle) == (starts[waiting].min() if waiting.any() else INF)
        nxt = min(min(e for s, e in intervals_of(plan, c, t) if s <= t < e) if expected[c] else starts[c] for c in range(n))
        assert av.quiet_until <= nxt and (av.quiet_until == nxt or window is not None)  # the window's end may come first


def test_tracker_state_reloads_exactly():
    plan = OnOff(mean_on=1.0, mean_off=2.0).plan(30, seed=2)
    a = ClientAvailability(plan, 30, window=4)
    a.sync(7.3)
    b = ClientAvailability(plan, 30, window=4)
    b.load(a.time, **a.state_arrays())
    for t in (7.9, 8.5, 20.0):
        ca, fa = a.sync(t)
        cb, fb = b.sync(t)
        assert sorted(zip(ca.tolist(), fa.tolist())) == sorted(zip(cb.tolist(), fb.tolist()))
        np.testing.assert_array_equal(a.available, b.available)
    with pytest.raises(ValueError, match="start"):
        b.load(1.0, np.zeros(3), a.end, a.index)


# ---- idle and available ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 64, 100])
def test_kth_idle_and_available_matches_naive(n):
    rng = np.random.default_rng(n)
    idle = IdleClients(n)
    naive_idle, naive_avail = np.ones(n, bool), np.ones(n, bool)
    for _ in range(400):
        r = rng.random()
        if r < 0.15 and idle.count:  # (the scheduler's way: the k-th idle and available client)
            k = int(rng.integers(idle.count))
            c = idle.take_kth(k)
            assert c == np.flatnonzero(naive_idle & naive_avail)[k]
            naive_idle[c] = False
        elif r < 0.3 and naive_idle.any():
            c = int(rng.choice(np.flatnonzero(naive_idle)))
            idle.take(c)
            naive_idle[c] = False
        elif r < 0.6 and not naive_idle.all():
            c = int(rng.choice(np.flatnonzero(~naive_idle)))
            idle.put(c)
            naive_idle[c] = True
        else:  # a few changes (vectorized Fenwick steps) or many (a rebuild)
            k = int(rng.integers(1, n + 1)) if rng.random() < 0.3 else int(rng.integers(1, max(2, n // 20)))
            clients = rng.choice(n, size=min(k, n), replace=False)
            flags = rng.random(len(clients)) < 0.5
            idle.set_available(clients, flags)
            naive_avail[clients] = flags
        eligible = np.flatnonzero(naive_idle & naive_avail)
        assert idle.count == len(eligible)
        assert [kth(idle, k) for k in range(len(eligible))] == eligible.tolist()


# ---- trace files ----------------------------------------------------------------------------------
def test_availability_trace_by_hand(tmp_path):
    path = write(
        tmp_path,
        "# measured\nclient,start,end\n1,4.25,inf\n0,0,8.5\n\n0,20,31\n2,1,2\n2,2,3\n2,10,11\n",
    )
    starts, ends, offsets = load_availability_trace(path, 3)
    assert offsets.tolist() == [0, 2, 3, 5]
    assert starts.tolist() == [0.0, 20.0, 4.25, 1.0, 10.0]  # client 2's [1, 2) and [2, 3) merged
    assert ends.tolist() == [8.5, 31.0, INF, 3.0, 11.0]
    plan = TraceAvailability(path=path).plan(3, seed=0)
    av = ClientAvailability(plan, 3)
    assert av.available.tolist() == [True, False, False] and av.quiet_until == 1.0
    expected = {2.5: [True, False, True], 5.0: [True, True, False], 8.5: [False, True, False], 10.5: [False, True, True], 40.0: [False, True, False]}
    for t, flags in expected.items():
        av.sync(t)
        assert av.available.tolist() == flags, t
    assert av.quiet_until == INF  # nothing changes after 40: client 1 stays, the others are done
    assert av.next_start(np.ones(3, bool)) == INF


BAD_TRACES = [
    ("client,start,end\n0,0,1\n0,0.5,2\n1,0,1\n", r":3: client 0's interval \[0.5, 2.0\) overlaps its interval \[0.0, 1.0\) on line 2"),
    ("client,start,end\n0,5,6\n1,0,1\n0,1,2\n", r":4: client 0's intervals are not in time order: \[1.0, 2.0\) starts before its interval \[5.0, 6.0\) on line 2"),
    ("# c\nclient,start,end\n0,0,1\n\n1,3,3\n", r":5: end must be > start"),
    ("client,start,end\n0,0,1\n1,2,1\n", r":3: end must be > start"),
    ("client,start,end\n0,0,1\n", r"1 of the 2 clients have no interval \(clients 1\)"),
    ("client,start,end\n0,0,1\n2,0,1\n", r":3: client 2 is out of range: num_clients=2 allows 0..1"),
    ("client,begin,end\n0,0,1\n", r":1: the header must be client,start,end"),
    ("client,start,end\n0,0,1\n1,x,2\n", r":3: not numbers"),
    ("client,start,end\n0,0,1\n1,0\n", r":3: expected 3 comma-separated values"),
    ("client,start,end\n0,0,1\n1,-inf,2\n", r":3: start must be a finite number"),
    ("# nothing\n", r"empty availability trace"),
]


@pytest.mark.parametrize("text, message", BAD_TRACES)
def test_bad_availability_traces_are_rejected_with_the_line_number(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load_availability_trace(path, 2)


def test_missing_availability_trace_file(tmp_path):
    with pytest.raises(ConfigError, match=r"availability\.path=.*no such file"):
        load_availability_trace(tmp_path / "none.csv", 2)


# ---- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (("availability=diurnal", "availability.fraction=1.5"), r"availability\.fraction=1\.5 is invalid: must be in \(0, 1\)"),
        (("availability=diurnal", "availability.period=0"), r"availability\.period=0 is invalid: must be a finite number > 0"),
        (("availability=diurnal", "availability.fractions=[0.5,0.5]"), r"availability\.fractions=\[0\.5, 0\.5\] is invalid: must be null unless"),
        (("availability=diurnal", "availability.offsets=[0,8]", "availability.fractions=[1.0]"), r"availability\.fractions=\[1\.0\] is invalid: must be one share per offset"),
        (("availability=on_off", "availability.mean_on=-1"), r"availability\.mean_on=-1 is invalid: must be a finite number > 0"),
        (("availability=on_off", "availability.fractions=[0.5,0.5]", "availability.mean_on=[1,2,3]"), r"availability\.mean_on=\[1, 2, 3\] is invalid: must be a number or a list of 2"),
        (("availability=on_off", "availability.drop_on_leave=maybe"), r"availability\.drop_on_leave='maybe' is invalid: must be true or false"),
        (("availability=trace", "availability.path=/no/such/availability.csv"), r"availability\.path='/no/such/availability\.csv' is invalid: no such file"),
    ],
)
def test_bad_availability_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Experiment(make_config("num_clients=10", "concurrency=2", "max_updates=10", *overrides))


def test_the_default_is_always_and_builds_no_plan_in_the_scheduler():
    exp = Experiment(make_config("num_clients=10", "concurrency=2", "max_updates=10"))
    assert isinstance(exp.settings.availability, Always)
    assert exp.scheduler().availability is None


def test_batched_fenwick_update_equals_one_by_one():
    rng = np.random.default_rng(3)
    for n in (5, 64, 1000, 4097):
        batched, single = IdleClients(n), IdleClients(n)
        for c in rng.choice(n, size=n // 3, replace=False):
            batched.take(int(c))
            single.take(int(c))
        clients = rng.choice(n, size=max(1, n // 17), replace=False)  # below the rebuild threshold
        batched.set_available(clients, np.zeros(len(clients), bool))
        for c in clients:
            single.available[c] = False
            if single.idle[c]:
                single.count -= 1
                single._add(int(c), -1)
        np.testing.assert_array_equal(batched._tree, single._tree)
        assert batched.count == single.count
