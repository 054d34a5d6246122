"""How a chunk of clients runs (vmap, a loop over its clients, a loop over vmapped groups) changes no result, and
mixed precision keeps float32 master weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.client.batched import (
    CPU_CHUNK,
    CPU_SPLIT_FLOPS,
    BatchedTrainer,
    chunk_plan,
    device_shares,
    matmul_flops,
    resolve_execution,
    rows_finite,
    stored_row,
)
from asyncflower_jax.client.local_train import LocalTraining, make_local_train
from asyncflower_jax.client.precision import mixed_precision
from asyncflower_jax.data.store import ClientStore
from asyncflower_jax.engine.reference import run_reference
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from tests.conftest import make_config
from tests.engine.test_simulator import SMALL, max_abs_diff, simulate


def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b"]


def setup(dtype=jnp.float64):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60).astype(np.int32)
    store = ClientStore.from_partition(x, y, [np.arange(i * 10, (i + 1) * 10) for i in range(6)], dtype=dtype)
    versions = [
        {"w1": jnp.asarray(rng.normal(size=(5, 4)), dtype), "w2": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.zeros(3, dtype)}
        for _ in range(2)
    ]
    return store, versions


@pytest.mark.parametrize("execution, map_batch", [("vmap", 1), ("map", 1), ("map", 2), ("map", 3), ("map", 10**6)])  # (beyond a chunk: one group of it)
def test_every_execution_equals_one_at_a_time(execution, map_batch):
    with jax.enable_x64(True):
        store, versions = setup()
        train = make_local_train(mlp, LocalTraining(num_steps=3, batch_size=4, learning_rate=0.3))
        trainer = BatchedTrainer(train, store, jax.random.key(7), chunk_size=4, execution=execution, map_batch=map_batch)
        assert trainer.execution == execution
        traced, train_rows = [], trainer._train_rows
        trainer._train_rows = lambda versions, x, y, inputs: traced.append(inputs.shape[0]) or train_rows(versions, x, y, inputs)
        version_idx, clients, ids = np.array([1, 0, 1, 1, 0, 0]), np.array([5, 2, 0, 3, 1, 4]), np.arange(100, 106)
        chunks = trainer.train(versions, version_idx, clients, ids)
        assert [c.n for c in chunks] == [4, 2]
        assert max(traced) == (4 if execution == "vmap" else min(map_batch, 4))  # groups never larger than a chunk
        rows = [(c, r) for c in chunks for r in range(c.n)]
        for i, (chunk, r) in enumerate(rows):
            alone, loss = trainer.train_one(versions[version_idx[i]], int(clients[i]), int(ids[i]))
            got = jax.tree.map(lambda leaf: leaf[r], chunk.params)
            assert max_abs_diff(got, alone) < 1e-12
            assert float(chunk.loss[r]) == pytest.approx(float(loss), abs=1e-12)


@pytest.mark.parametrize("execution, map_batch", [("vmap", 1), ("map", 1), ("map", 3), ("map", 10**6)])
def test_training_into_rows_writes_what_training_returns_at_the_given_rows(execution, map_batch):
    """The simulator keeps trained results in one store: each chunk's call writes its rows in
    place, the padding rows of the last chunk nowhere (also those "map" adds to make whole groups
    of `map_batch`), and leaves every other row as it was."""
    with jax.enable_x64(True):
        store, versions = setup()
        train = make_local_train(mlp, LocalTraining(num_steps=3, batch_size=4, learning_rate=0.3))
        trainer = BatchedTrainer(train, store, jax.random.key(7), chunk_size=4, execution=execution, map_batch=map_batch)
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *versions)
        version_idx, clients, ids = np.array([1, 0, 1, 1, 0, 0, 1]), np.array([5, 2, 0, 3, 1, 4, 2]), np.arange(100, 107)
        assert [size for _, size in chunk_plan(7, 4)] == [4, 4]  # the last chunk has a padding row
        chunks = trainer.train_from(stacked, version_idx, clients, ids)
        shapes = trainer.result_shapes(stacked)
        assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(lambda x: (x.shape[1:], x.dtype), (chunks[0].params, chunks[0].loss))
        results = jax.tree.map(lambda s: jnp.full((12,) + s.shape, 7.0, s.dtype), stored_row(shapes))
        results = (results[0], results[1], jnp.zeros(12, bool))
        slots = np.array([11, 0, 5, 3, 9, 1, 6], np.int32)
        params, loss, finite = trainer.train_into(results, slots, stacked, version_idx, clients, ids)
        trained = [(jax.tree.map(lambda leaf: leaf[r], c.params), c.loss[r]) for c in chunks for r in range(c.n)]
        for (want, want_loss), slot in zip(trained, slots):
            assert max_abs_diff(jax.tree.map(lambda leaf: leaf[slot], params), want) == 0.0 and float(loss[slot]) == float(want_loss)
        untouched = np.setdiff1d(np.arange(12), slots)
        assert all(bool(jnp.all(leaf[untouched] == 7.0)) for leaf in jax.tree.leaves((params, loss)))
        np.testing.assert_array_equal(np.asarray(finite), np.isin(np.arange(12), slots))  # every trained row is finite, flagged so


def test_training_into_rows_flags_each_row_that_is_not_finite():
    """Each row's finite flag comes from the training call that wrote it: a client whose training
    diverges (a huge learning rate) is flagged, the others are not."""
    store, versions = setup(jnp.float32)
    train = make_local_train(mlp, LocalTraining(num_steps=3, batch_size=4, learning_rate=0.3))
    trainer = BatchedTrainer(train, store, jax.random.key(7), chunk_size=4, execution="vmap")
    bad = jax.tree.map(lambda leaf: leaf.at[(0,) * leaf.ndim].set(jnp.inf), versions[0])  # an infinite weight: training stays non-finite
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), bad, versions[1])
    shapes = stored_row(trainer.result_shapes(stacked))
    results = jax.tree.map(lambda s: jnp.zeros((8,) + s.shape, s.dtype), shapes)
    version_idx, clients, ids = np.array([1, 0, 1, 0, 1]), np.array([0, 1, 2, 3, 4]), np.arange(5)
    params, _, finite = trainer.train_into(results, np.array([2, 3, 4, 5, 6], np.int32), stacked, version_idx, clients, ids)
    np.testing.assert_array_equal(np.asarray(finite), [False, False, True, False, True, False, True, False])
    assert np.asarray(rows_finite(params)).tolist() == [True, True, True, False, True, False, True, True]  # the flags say what the rows hold


def test_result_shapes_trace_local_training_once_per_trainer_and_shape():
    store, versions = setup(jnp.float32)
    train = make_local_train(mlp, LocalTraining(num_steps=2, batch_size=4, learning_rate=0.3))
    traces = []

    def counted(*args):
        traces.append(1)  # runs only while tracing
        return train(*args)

    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *versions)
    for execution, traced in (("vmap", 1), ("auto", 1)):  # on CPU devices the trace that counts a client's flops serves
        traces.clear()
        trainer = BatchedTrainer(counted, store, jax.random.key(0), execution=execution)
        trainer._settle(stacked)
        shapes = [trainer.result_shapes(stacked) for _ in range(3)]
        assert len(traces) == traced and shapes[0] is shapes[2]
        assert shapes[0][0]["w1"].shape == (5, 4) and shapes[0][1].shape == ()
    trainer.result_shapes(jax.tree.map(lambda leaf: leaf.astype(jnp.float16), stacked))  # another shape: traced anew
    assert len(traces) == 2


def test_auto_is_small_map_chunks_on_cpu_and_configured_vmap_chunks_on_accelerators():
    assert resolve_execution("auto", 256, "cpu") == ("map", CPU_CHUNK)
    assert resolve_execution("auto", 2, "cpu") == ("map", 2)
    assert resolve_execution("auto", 256, "gpu") == ("vmap", 256)
    assert resolve_execution("auto", 512, "tpu") == ("vmap", 512)
    assert resolve_execution("auto", 256, "cpu", devices=2) == ("map", 2 * CPU_CHUNK)  # CPU_CHUNK per device
    assert resolve_execution("auto", 256, "gpu", devices=2) == ("vmap", 256)
    assert resolve_execution("map", 256, "cpu") == ("map", 256)
    assert resolve_execution("vmap", 64, "cpu") == ("vmap", 64)
    with pytest.raises(ConfigError, match="execution='scan' is invalid"):
        resolve_execution("scan")


def test_chunk_plans_cut_chunks_of_the_chunk_size_and_compile_the_last_at_a_power_of_two():
    assert chunk_plan(37, 16) == [(16, 16), (16, 16), (5, 8)]
    assert chunk_plan(3, 256) == [(3, 4)]
    assert chunk_plan(3, 16, least=8) == [(3, 8)]  # "map": padding costs no training, and few shapes compile
    assert chunk_plan(3, 4, least=8) == [(3, 4)]  # never above the chunk size
    assert chunk_plan(7, 3) == [(3, 3), (3, 3), (1, 1)]
    for n in range(1, 80):  # every client exactly once; with least 8 and chunks of 16, two compiled sizes
        plan = chunk_plan(n, 16, least=8)
        assert sum(k for k, _ in plan) == n and all(k <= size for k, size in plan) and {size for _, size in plan} <= {8, 16}


def test_matmul_flops_count_products_and_convolutions_with_scan_lengths_and_the_larger_branch():
    x, w = jnp.ones((32, 64)), jnp.ones((64, 200))
    assert matmul_flops(jax.make_jaxpr(lambda x, w: x @ w)(x, w).jaxpr) == 2 * 32 * 200 * 64
    scanned = jax.make_jaxpr(lambda x, w: jax.lax.scan(lambda c, _: (c, jnp.tanh(x @ w)), 0.0, None, length=10)[1])(x, w)
    assert matmul_flops(scanned.jaxpr) == 10 * 2 * 32 * 200 * 64
    image, kernel = jnp.ones((1, 1, 28, 28)), jnp.ones((32, 1, 5, 5))  # NCHW, OIHW: out 1 x 32 x 24 x 24, 25 products each
    conv = jax.make_jaxpr(lambda a, k: jax.lax.conv(a, k, (1, 1), "VALID"))(image, kernel)
    assert matmul_flops(conv.jaxpr) == 2 * 32 * 24 * 24 * 25
    branches = jax.make_jaxpr(lambda p, x, w: jax.lax.cond(p, lambda: x @ w, lambda: jnp.zeros((32, 200))))(True, x, w)
    assert matmul_flops(branches.jaxpr) == 2 * 32 * 200 * 64
    grad = jax.make_jaxpr(jax.grad(lambda w, x: jnp.sum(x @ w)))(w, x)  # the backward product (x^T g) only: no input gradient
    assert matmul_flops(grad.jaxpr) == 2 * (2 * 32 * 200 * 64)


def test_a_batch_is_shared_out_among_the_devices_only_with_enough_clients_and_work():
    assert device_shares(9, 1, client_flops=None) == [9]
    assert device_shares(7, 4, client_flops=None) == [7]  # fewer than 2 clients per device: all on the first
    assert device_shares(8, 4, client_flops=None) == [2, 2, 2, 2]  # accelerators: no work limit
    assert device_shares(11, 4, client_flops=None) == [2, 3, 3, 3]  # the first device (it also aggregates) gets the fewest
    assert device_shares(14, 2, client_flops=None) == [7, 7]
    assert device_shares(8, 4, client_flops=CPU_SPLIT_FLOPS / 2) == [2, 2, 2, 2]  # 2 clients of half the limit each
    assert device_shares(8, 4, client_flops=CPU_SPLIT_FLOPS / 2 - 1) == [8]
    assert device_shares(1024, 2, client_flops=1e4) == [1024]  # a tiny model: 512 clients per device are 5 MFLOP
    for n in range(1, 60):
        for devices in (1, 2, 3, 4):
            shares = device_shares(n, devices, client_flops=None)
            assert sum(shares) == n and max(shares) - min(shares) <= 1 and shares == sorted(shares)


def test_auto_on_the_cpu_loops_over_the_real_clients_of_a_chunk_and_equals_one_at_a_time():
    """On the CPU, `auto` trains a chunk by a loop over its real clients: a chunk compiled at 8 rows
    with 3 clients trains 3 (counted by a callback inside local training), for models with and
    without convolutions, and each client's result is the one it gets alone."""
    import flax.linen as nn

    class TinyConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(2, (3, 3))(x.reshape((x.shape[0], 4, 4, 1))))
            return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    with jax.enable_x64(True):
        store, _ = setup()
        x = jnp.asarray(np.random.default_rng(3).normal(size=(60, 16)))
        store = ClientStore(x, store.y, store.offsets, store.counts)
        for module in (TinyConv(), None):
            if module is None:
                apply, params = mlp, {"w1": jnp.ones((16, 4)), "w2": jnp.ones((4, 3)), "b": jnp.zeros(3)}
            else:
                apply, params = module.apply, module.init(jax.random.key(0), x[:1])
            train = make_local_train(apply, LocalTraining(num_steps=2, batch_size=4, learning_rate=0.1))
            trained = []

            def counted(params, *args, train=train):
                jax.debug.callback(lambda: trained.append(1))
                return train(params, *args)

            trainer = BatchedTrainer(counted, store, jax.random.key(7), chunk_size=16, execution="auto", devices=1)
            chunks = trainer.train([params], np.zeros(3, np.int32), np.array([0, 1, 2]), np.arange(3))
            assert trainer.execution == "map" and [(c.n, c.loss.shape[0]) for c in chunks] == [(3, 8)]
            jax.effects_barrier()
            assert len(trained) == 3
            for i in range(3):
                alone, _ = trainer.train_one(params, i, i)
                assert max_abs_diff(jax.tree.map(lambda leaf: leaf[i], chunks[0].params), alone) < 1e-12
            # into the store: no buffer of the chunk's own, so compiled at the chunk size, still 3 trained
            assert trainer.chunks(3, into_store=True) == [(0, 3, 16)] and trainer.chunks(20, into_store=True) == [(0, 16, 16), (0, 4, 16)]
            stacked = jax.tree.map(lambda leaf: leaf[None], params)
            store_rows = jax.tree.map(lambda s: jnp.zeros((5, *s.shape), s.dtype), stored_row(trainer.result_shapes(stacked)))
            trained.clear()
            stored, _, finite = trainer.train_into(store_rows, np.array([4, 0, 2], np.int32), stacked, np.zeros(3, np.int32), np.array([0, 1, 2]), np.arange(3))
            jax.effects_barrier()
            assert len(trained) == 3 and np.asarray(finite).tolist() == [True, False, True, False, True]
            for i, slot in enumerate([4, 0, 2]):
                want = jax.tree.map(lambda leaf: leaf[i], chunks[0].params)
                assert max_abs_diff(jax.tree.map(lambda leaf: leaf[slot], stored), want) < 1e-12


@pytest.mark.parametrize("overrides, message", [(["execution=loop"], "execution='loop' is invalid"), (["map_batch=0"], "map_batch=0 is invalid"), (["devices=9"], "devices=9 is invalid"), (["compute_dtype=int8"], "compute_dtype='int8' is invalid")])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Experiment(make_config(*SMALL, *overrides))


@pytest.mark.parametrize("execution", ["vmap", "map"])
def test_simulation_with_either_execution_matches_the_reference(execution):
    with jax.enable_x64(True):
        exp = Experiment(make_config(*SMALL, "strategy=fedbuff", "strategy.buffer_size=3", "max_versions=30", "max_updates=null", "precision=float64", "latency=lognormal", f"execution={execution}"))
        result, _ = simulate(exp)
        ref_params, _ = run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
        assert result.summary["mean_train_batch"] > 1
        assert max_abs_diff(result.params, ref_params) < 1e-9


def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_weights():
    store, versions = setup(jnp.float32)
    settings = LocalTraining(num_steps=5, batch_size=8, learning_rate=0.1)
    full = jax.jit(make_local_train(mlp, settings))
    low = jax.jit(make_local_train(mixed_precision(mlp, "bfloat16"), settings))
    args = (versions[0], store.x, store.y, 0, 10, jax.random.key(0))
    a, loss_a = full(*args)
    b, loss_b = low(*args)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(b))  # master weights stay float32
    assert 0 < max_abs_diff(a, b) < 0.05  # bfloat16 rounding: close, not equal
    assert float(loss_b) == pytest.approx(float(loss_a), rel=0.05)
    # The products really run in bfloat16: the compiled program has bf16 dot products.
    hlo = low.lower(*args).as_text()
    assert "bf16" in hlo
    assert mixed_precision(mlp, None) is mlp


def test_character_codes_reach_the_model_uncast_in_bfloat16():
    """Codes are stored as floats; bfloat16 holds integers exactly only up to 256, so code 257 was
    read as 256 in training (and not in evaluation)."""
    from asyncflower_jax.client.precision import model_apply
    from asyncflower_jax.models.rnn import CharRNN

    module = CharRNN(num_classes=300, embed=4, hidden=4, layers=1)
    params = module.init(jax.random.key(0), jnp.zeros((1, 3), jnp.float32))
    codes = jnp.asarray([[1.0, 2.0, 257.0], [1.0, 2.0, 256.0]], jnp.float32)
    low = model_apply(module, "bfloat16")(params, codes)
    assert not np.array_equal(np.asarray(low[0]), np.asarray(low[1]))  # (they were equal)
    np.testing.assert_allclose(low, module.apply(params, codes), atol=0.05)
    assert mixed_precision(module.apply, "bfloat16")(params, codes)[0].tolist() == mixed_precision(module.apply, "bfloat16")(params, codes)[1].tolist()  # (casting: the two codes meet)


@pytest.mark.parametrize("distinct, length", [(3, 40), (40, 40), (70, 150)])
def test_stack_trees_of_long_lists_with_repeats_equals_numpy(distinct, length):
    from asyncflower_jax.client.batched import stack_trees

    trees = [{"w": jnp.full((2, 3), float(i)), "b": jnp.arange(3.0) + i} for i in range(distinct)]
    picks = np.random.default_rng(distinct).integers(0, distinct, length)
    picks[:distinct] = np.arange(distinct)  # every tree at least once
    listed = [trees[i] for i in picks]
    got = stack_trees(listed)
    assert got["w"].shape == (length, 2, 3)
    np.testing.assert_array_equal(np.asarray(got["w"])[:, 0, 0], picks.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got["b"]), np.stack([np.asarray(t["b"]) for t in listed]))
