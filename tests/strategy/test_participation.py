"""Participation-probability estimators: hand-computed sequences, smoothing, floors, validation."""

import jax
import numpy as np
import pytest

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.strategy.participation import Frequency, GroupLookup, Interval, Maximum, Scalar, Uniform

from .zoo_helpers import fedau_weights


def run(est, num_clients, rounds):
    """p after each aggregation; `rounds` lists (round index, participants)."""
    state = est.init(num_clients)
    update = jax.jit(est.update)
    out = []
    for r, clients in rounds:
        mask = np.zeros(num_clients, bool)
        mask[list(clients)] = True
        state = update(state, r, mask)
        out.append(np.asarray(est.probabilities_for(state, num_clients)))
    return out


def test_maximum_and_scalar():
    np.testing.assert_array_equal(run(Maximum(), 3, [(0, [1])])[0], [1, 1, 1])
    np.testing.assert_allclose(run(Scalar(probability=0.25), 2, [(0, [0])])[0], [0.25, 0.25])
    np.testing.assert_allclose(run(Scalar(probability=0.25, smoothing=2.0), 2, [(0, [0])])[0], [0.5, 0.5])
    np.testing.assert_allclose(run(Scalar(probability=0.25, smoothing=8.0), 2, [(0, [0])])[0], [1, 1])  # min(r p, 1)


def test_uniform_is_participants_over_clients_seen():
    # known {0,1}: 2/2; known {0,1,2}: 1/3; known {0..3}: 2/4
    p = run(Uniform(), 4, [(0, [0, 1]), (1, [2]), (2, [3, 0])])
    np.testing.assert_allclose([q[0] for q in p], [1.0, 1 / 3, 0.5], rtol=1e-6)
    assert np.all(p[1] == p[1][0])  # the same for every client
    np.testing.assert_allclose(run(Uniform(min_probability=0.6), 4, [(0, [0, 1]), (1, [2])])[1], 0.6)


def test_per_client_frequency():
    # counts [1,0,0] / 1; [2,1,0] / 2; [2,2,0] / 3 (never seen: the floor 0.001)
    p = run(Frequency(), 3, [(0, [0]), (1, [0, 1]), (2, [1])])
    np.testing.assert_allclose(p[0], [1, 0.001, 0.001], rtol=1e-6)
    np.testing.assert_allclose(p[1], [1, 0.5, 0.001], rtol=1e-6)
    np.testing.assert_allclose(p[2], [2 / 3, 2 / 3, 0.001], rtol=1e-6)


def test_group_frequency_is_the_mean_over_seen_group_members():
    # groups [0,0,0,1,1] (fractions 0.6/0.4).
    # r0 P={0,3}: freq [1,0,0,1,0]; g0 over seen {0}: 1, g1 over {3}: 1
    # r1 P={1}:   freq [.5,.5,0,.5,0]; g0 over {0,1}: .5, g1 over {3}: .5
    # r2 P={0,4}: freq [2/3,1/3,0,1/3,1/3]; g0 over {0,1}: .5, g1 over {3,4}: 1/3
    p = run(Frequency(fractions=[0.6, 0.4]), 5, [(0, [0, 3]), (1, [1]), (2, [0, 4])])
    np.testing.assert_allclose(p[0], [1, 1, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(p[1], [0.5] * 5, rtol=1e-6)
    np.testing.assert_allclose(p[2], [0.5, 0.5, 0.5, 1 / 3, 1 / 3], rtol=1e-6)
    # a group nobody from has taken part gets the floor
    np.testing.assert_allclose(run(Frequency(fractions=[0.6, 0.4], min_probability=0.01), 5, [(0, [0])])[0], [1, 1, 1, 0.01, 0.01])


def test_frequency_as_of_last_participation():
    # groups [0,0,0,1,1] (fractions 0.6/0.4), the rounds above; each client's frequency is kept
    # from right after its last participation:
    # r0 P={0,3}: at_last [1,-,-,1,-];         g0 over {0}: 1,     g1 over {3}: 1
    # r1 P={1}:   at_last [1,1/2,-,1,-];       g0 over {0,1}: 3/4, g1 over {3}: 1 (now: 1/2 above)
    # r2 P={0,4}: at_last [2/3,1/2,-,1,1/3];   g0: 7/12,           g1 over {3,4}: 2/3
    est = Frequency(fractions=[0.6, 0.4], as_of_last_participation=True)
    p = run(est, 5, [(0, [0, 3]), (1, [1]), (2, [0, 4])])
    np.testing.assert_allclose(p[0], [1] * 5, rtol=1e-6)
    np.testing.assert_allclose(p[1], [0.75, 0.75, 0.75, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(p[2], [7 / 12, 7 / 12, 7 / 12, 2 / 3, 2 / 3], rtol=1e-6)
    # per client: [1, 0.5, floor] after r1, then client 1 keeps 1/2 while its frequency now is 1/3
    p = run(Frequency(as_of_last_participation=True), 3, [(0, [0]), (1, [0, 1]), (2, [0])])
    np.testing.assert_allclose(p[1], [1, 0.5, 0.001], rtol=1e-6)
    np.testing.assert_allclose(p[2], [1, 0.5, 0.001], rtol=1e-6)


def test_group_lookup_with_smoothing():
    p = run(GroupLookup(fractions=[0.6, 0.4], probabilities=[0.5, 0.1]), 5, [(0, [0])])[0]
    np.testing.assert_allclose(p, [0.5, 0.5, 0.5, 0.1, 0.1], rtol=1e-6)
    p = run(GroupLookup(fractions=[0.6, 0.4], probabilities=[0.5, 0.1], smoothing=3.0), 5, [(0, [0])])[0]
    np.testing.assert_allclose(p, [1, 1, 1, 0.3, 0.3], rtol=1e-6)


def test_interval_is_fedaus_estimate_by_hand():
    # cutoff 3; client 0 takes part in rounds 0, 1 and 5, client 1 in round 2.
    # client 0: t=1 closes 1 (part. 0), t=2 closes 1 (part. 1), t=5 closes 3 (cutoff): mean 5/3,
    #           t=6 closes 1 (part. 5): mean 6/4.  client 1: t=3 closes 3 (part. 2), t=6 closes 3.
    rounds = [(0, [0]), (1, [0]), (2, [1]), (3, []), (4, []), (5, [0]), (6, []), (7, [])]
    p = run(Interval(cutoff=3), 2, rounds)
    expected = [[1, 1], [1, 1], [1, 1], [1, 1 / 3], [1, 1 / 3], [3 / 5, 1 / 3], [2 / 3, 1 / 3], [2 / 3, 1 / 3]]
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    # rounds without an update count as rounds without participation: 0, 1, then 7
    np.testing.assert_allclose(run(Interval(cutoff=3), 2, [(0, [0]), (1, [0]), (7, [])])[-1], [3 / 5, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize("cutoff", [1, 4, 10])
def test_interval_equals_fedaus_estimate_round_by_round(cutoff):
    rng = np.random.default_rng(cutoff)
    rates = np.array([0.9, 0.5, 0.2, 0.05, 0.0, 1.0])
    participation = rng.random((len(rates), 60)) < rates[:, None]
    p = run(Interval(cutoff=cutoff, min_probability=0.0), len(rates), [(t, np.flatnonzero(participation[:, t])) for t in range(60)])
    np.testing.assert_allclose(np.stack(p, axis=1), 1 / fedau_weights(participation, cutoff), rtol=1e-6)
    # the same with the rounds nobody took part in left out of the calls
    called = [t for t in range(60) if participation[:, t].any() or t == 59]
    q = run(Interval(cutoff=cutoff, min_probability=0.0), len(rates), [(t, np.flatnonzero(participation[:, t])) for t in called])
    np.testing.assert_allclose(np.stack(q, axis=1), 1 / fedau_weights(participation, cutoff)[:, called], rtol=1e-6)


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: Scalar(probability=0.0), "participation.probability"),
        (lambda: Scalar(probability=1.5), "participation.probability"),
        (lambda: Maximum(smoothing=0.0), "participation.smoothing"),
        (lambda: Uniform(min_probability=2.0), "participation.min_probability"),
        (lambda: Interval(cutoff=0), "participation.cutoff"),
        (lambda: Frequency(fractions=[0.5, 0.4]), "participation.fractions"),
        (lambda: Frequency(as_of_last_participation="yes"), "participation.as_of_last_participation"),
        (lambda: GroupLookup(fractions=[0.5, 0.5], probabilities=[0.5]), "participation.probabilities"),
        (lambda: GroupLookup(fractions=[0.5, 0.5], probabilities=[0.5, 0.0]), "participation.probabilities"),
        (lambda: GroupLookup(fractions=[-0.5, 1.5], probabilities=[0.5, 0.5]), "participation.fractions"),
    ],
)
def test_bad_settings_name_the_key(make, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make()
