"""Helpers shared by the tests of CA2FL, FADAS, MIFA and the named server optimizers.

Pytrees are {"w": [2], "b": []}; numpy references work in float64 on dicts of arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np

from asyncflower_jax.strategy import UpdateBatch

RTOL, ATOL = 2e-5, 2e-6


def tree(w, b):
    return {"w": np.asarray(w, np.float64), "b": np.asarray(b, np.float64)}


def to_jax(t):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)


def to_np(t):
    return {key: np.asarray(val, np.float64) for key, val in t.items()}


def sub(a, b):
    return {key: a[key] - b[key] for key in a}


def zeros_tree():
    return tree([0.0, 0.0], 0.0)


def make_batch(starts, ys, staleness, client_id=None, mask=None, num_examples=None):
    """An UpdateBatch from lists of start and trained trees (client ids 0..K-1 unless given)."""
    k = len(ys)
    stack = lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])  # noqa: E731
    return UpdateBatch(
        params=jax.tree.map(stack, *ys),
        start=jax.tree.map(stack, *starts),
        staleness=jnp.asarray(staleness, jnp.int32),
        num_examples=jnp.asarray(np.ones(k) if num_examples is None else num_examples, jnp.float32),
        client_id=jnp.asarray(np.arange(k) if client_id is None else client_id, jnp.int32),
        mask=jnp.asarray(np.ones(k, bool) if mask is None else mask, bool),
    )


def assert_tree_close(got, expected, rtol=RTOL, atol=ATOL):
    assert set(got) == set(expected)
    for key in expected:
        g = np.asarray(got[key])
        assert g.shape == np.shape(expected[key]), key
        np.testing.assert_allclose(g, expected[key], rtol=rtol, atol=atol, err_msg=key)


def assert_trees_equal(got, expected):
    """Every leaf bit-for-bit equal (works for any pytree, states included)."""
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(expected)
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def run_multistep(aggregate, state, ref_step, *, k, num_clients=4, steps=4, seed=0, examples=None):
    """Drive `aggregate` and `ref_step` through `steps` aggregations with staleness >= 1 each time.

    Versions 0..2 exist before the first step; every update starts from an older version
    x_{v_i} (from the kernel's own history), so staleness = v - v_i is between 1 and 4. Client ids
    are drawn from `num_clients` with replacement; the second step always has a client twice (it
    returned, was sent out again and returned again within one buffer).
    `ref_step(x, ref_state, starts, ys, staleness, client_ids) -> (x, ref_state)` in numpy.
    `examples` (optional, one per client) gives each update's num_examples.
    Returns the final params and state of the kernel.
    """
    rng = np.random.default_rng(seed)
    history = [tree(rng.normal(size=2), rng.normal()) for _ in range(3)]
    version = 2
    params = to_jax(history[-1])
    x_ref = to_np(history[-1])
    ref_state = None
    for step in range(steps):
        start_versions = rng.integers(max(0, version - 4), version, size=k)
        staleness = version - start_versions
        assert np.all(staleness >= 1)
        ids = rng.integers(0, num_clients, size=k)
        if step == 1 and k >= 2:
            ids[-1] = ids[0]
        starts = [history[v] for v in start_versions]
        ys = [{key: st[key] + rng.normal(scale=0.5, size=np.shape(st[key])) for key in st} for st in starts]
        n = None if examples is None else np.asarray(examples)[ids]
        params, state = aggregate(params, state, make_batch(starts, ys, staleness, ids, num_examples=n))
        x_ref, ref_state = ref_step(x_ref, ref_state, starts, ys, staleness, ids)
        assert_tree_close(params, x_ref)
        history.append(to_np(params))
        version += 1
    return params, state


# Padding: dyadic values keep every sum exact, so "bit-for-bit equal" cannot depend on the order
# of summation. Client 2 appears twice among the real rows; the padding rows copy real rows
# (client 2's *first* delta among them, after the real rows) with an absurd staleness: if a padding
# row were written to memory it would overwrite client 2's latest delta (or fill client 4's row),
# and if its staleness counted FADAS would take a smaller step.
PAD_X = tree([1.0, -2.0], 0.5)
PAD_STARTS = [tree([1.0, -2.0], 0.5), tree([0.5, 1.0], 0.25), tree([2.0, 0.0], -1.0), tree([0.0, 0.5], 0.75)]
PAD_YS = [tree([0.5, -1.0], 0.75), tree([1.5, 2.0], 0.0), tree([1.0, 0.25], -0.5), tree([0.25, 0.5], 1.0)]
PAD_STALENESS = [1, 2, 4, 3]
PAD_IDS = [2, 0, 1, 2]
# a first buffer that fills part of the memory before the padded one
PRE_STARTS = [tree([0.0, 0.0], 0.0), tree([0.0, 0.0], 0.0)]
PRE_YS = [tree([0.5, 0.25], -0.5), tree([-1.0, 0.5], 0.25)]
PRE_IDS = [2, 3]


def padded_batches():
    """The same 4 real updates, unpadded and padded to 8 rows (padding in the middle and at the end)."""
    real = make_batch(PAD_STARTS, PAD_YS, PAD_STALENESS, PAD_IDS)
    order = [0, 1, 0, 2, 3, 0, 0, 1]
    mask = [True, True, False, True, True, False, False, False]
    padded = make_batch(
        [PAD_STARTS[i] for i in order],
        [PAD_YS[i] for i in order],
        [PAD_STALENESS[i] if m else 100 for i, m in zip(order, mask)],
        [PAD_IDS[i] for i in order[:-1]] + [4],  # the last padding row even names an unseen client
        mask=mask,
        num_examples=[1.0 if m else 100.0 for m in mask],
    )
    return real, padded


def check_padding_changes_nothing(strat, jit):
    """One warm-up buffer, then the real and the padded batch give bit-identical params and state."""
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x = to_jax(PAD_X)
    state = strat.init(x)
    x, state = agg(x, state, make_batch(PRE_STARTS, PRE_YS, [0, 0], PRE_IDS))
    real, padded = padded_batches()
    want = agg(x, state, real)
    got = agg(x, state, padded)
    assert_trees_equal(got, want)
    return got


def assert_kept_sum(memory, kept):
    """A rule's running sum over clients equals the sum of its memory's rows."""
    assert_tree_close(kept, {key: np.asarray(rows).sum(axis=0) for key, rows in memory.items()}, rtol=1e-5, atol=1e-6)


def fedau_weights(participation: np.ndarray, cutoff: int) -> np.ndarray:
    """FedAU's online estimate, one round at a time: weights [clients, rounds], 1 until a first
    interval closes; at round t >= 1 the open interval grows by one and closes when the client
    took part in round t - 1 or when it reaches `cutoff`; the weight is the mean closed length."""
    clients, rounds = participation.shape
    weights = np.ones((clients, rounds))
    for i in range(clients):
        closed, length = 0, 0
        for t in range(1, rounds):
            length += 1
            weights[i, t] = weights[i, t - 1]
            if participation[i, t - 1] or length == cutoff:
                weights[i, t] = length if closed == 0 else (closed * weights[i, t - 1] + length) / (closed + 1)
                closed, length = closed + 1, 0
    return weights
