"""Models: output shapes, parameter counts against published or hand-counted values, and one
training step that lowers the loss on a tiny batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asyncflower_jax.client.local_train import cross_entropy
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.models.cnn import CifarCNN, LeafCNN
from asyncflower_jax.models.linear import LogisticRegression
from asyncflower_jax.models.mlp import MLP, init_params
from asyncflower_jax.models.resnet import resnet8, resnet18
from asyncflower_jax.models.rnn import CharRNN


def num_params(params):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def lstm(i, h):  # flax LSTM cell: per gate an input kernel, a hidden kernel and one bias
    return 4 * (i * h + h * h + h)


def gru(i, h):  # flax GRU cell: input kernels with biases, hidden kernels without, plus the candidate's hidden bias
    return 3 * (i * h + h) + 3 * h * h + h


def resnet8_count(classes):
    conv = lambda i, o, k=3: i * o * k * k  # noqa: E731
    gn = lambda c: 2 * c  # noqa: E731
    stem = conv(3, 16) + gn(16)
    b1 = 2 * (conv(16, 16) + gn(16))
    b2 = conv(16, 32) + conv(32, 32) + 2 * gn(32) + conv(16, 32, 1) + gn(32)
    b3 = conv(32, 64) + conv(64, 64) + 2 * gn(64) + conv(32, 64, 1) + gn(64)
    return stem + b1 + b2 + b3 + 64 * classes + classes


MODELS = [
    # (module, input shape, classes, parameter count, source of the count)
    (LogisticRegression(10), (60,), 10, 60 * 10 + 10, "by hand"),
    (MLP(10, hidden=(200, 200)), (64,), 10, 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10, "by hand"),
    (LeafCNN(62), (28, 28, 1), 62, 6_603_710, "LEAF FEMNIST CNN"),
    (CifarCNN(10), (32, 32, 3), 10, 62_006, "PyTorch CIFAR tutorial net"),
    (resnet18(10), (32, 32, 3), 10, 11_173_962, "CIFAR ResNet-18 (BatchNorm has the same trainable count)"),
    (resnet8(10), (32, 32, 3), 10, resnet8_count(10), "by hand"),
    (CharRNN(80), (80,), 80, 80 * 8 + lstm(8, 256) + lstm(256, 256) + 256 * 80 + 80, "by hand (LEAF Shakespeare LSTM)"),
    (CharRNN(80, cell="gru"), (80,), 80, 80 * 8 + gru(8, 256) + gru(256, 256) + 256 * 80 + 80, "by hand"),
]


@pytest.mark.parametrize("module, shape, classes, count, source", MODELS, ids=lambda v: type(v).__name__ if hasattr(v, "apply") else None)
def test_output_shape_and_parameter_count(module, shape, classes, count, source):
    x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), x)  # shapes only: nothing is computed
    assert num_params(params) == count, source
    assert jax.eval_shape(module.apply, params, x).shape == (3, classes)


SMALL = [
    (LogisticRegression(4), (12,)),
    (LeafCNN(4, features=(4, 8), hidden=16), (12, 12, 1)),
    (CifarCNN(4, features=(4, 8), hidden=(16, 8)), (16, 16, 3)),
    (resnet8(4), (8, 8, 3)),
    (CharRNN(4, embed=4, hidden=8, layers=2), (6,)),
    (CharRNN(4, embed=4, hidden=8, layers=1, cell="gru"), (6,)),
]


@pytest.mark.parametrize("module, shape", SMALL, ids=lambda v: type(v).__name__ if hasattr(v, "apply") else None)
def test_one_sgd_step_lowers_the_loss_on_a_tiny_batch(module, shape):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (8, *shape)).astype(np.float32) if isinstance(module, CharRNN) else rng.normal(size=(8, *shape)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    params = init_params(module, shape, jax.random.key(1))
    loss = jax.jit(lambda p: cross_entropy(module.apply, p, x, y))  # one compilation, not one per operation
    before, grads = jax.jit(jax.value_and_grad(loss))(params)
    after = loss(optax.apply_updates(params, jax.tree.map(lambda g: -0.05 * g, grads)))
    assert float(after) < float(before)


@pytest.mark.parametrize("module, shape", SMALL, ids=lambda v: type(v).__name__ if hasattr(v, "apply") else None)
def test_every_model_runs_in_float64_as_precision_float64_has_it(module, shape):
    """precision=float64 casts the initial parameters to float64; the char RNNs failed there (their
    cells' zero carry stayed float32, and scan refuses a carry whose type the step changes). In
    float64 the outputs and one step's gradients are those of float32 to float32's rounding."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (5, *shape)).astype(np.float64) if isinstance(module, CharRNN) else rng.normal(size=(5, *shape))
    y = rng.integers(0, 4, 5)
    with jax.enable_x64(True):
        params32 = init_params(module, shape, jax.random.key(1))
        params64 = jax.tree.map(lambda p: p.astype(jnp.float64), params32)
        step = jax.jit(jax.value_and_grad(lambda p, x: cross_entropy(module.apply, p, x, y)))  # (one compilation per dtype)
        out64, grads64 = step(params64, jnp.asarray(x))
        out32, grads32 = step(params32, jnp.asarray(x, jnp.float32))
        assert out64.dtype == jnp.float64 and {g.dtype for g in jax.tree.leaves(grads64)} == {jnp.dtype(jnp.float64)}
        np.testing.assert_allclose(out64, out32, rtol=1e-5)
        for g64, g32 in zip(jax.tree.leaves(grads64), jax.tree.leaves(grads32)):
            np.testing.assert_allclose(g64, g32, rtol=1e-3, atol=1e-5)


def test_resnet_uses_group_norm_and_no_batch_statistics():
    params = init_params(resnet8(10), (8, 8, 3), jax.random.key(0))
    assert set(params) == {"params"}  # no "batch_stats" collection
    names = {k for k in jax.tree_util.tree_flatten_with_path(params)[0] for k in [str(k[0])]}
    assert any("GroupNorm" in n for n in names) and not any("BatchNorm" in n for n in names)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    full = resnet8(10).apply(params, x)
    alone = resnet8(10).apply(params, x[:1])
    np.testing.assert_allclose(full[:1], alone, rtol=1e-5, atol=1e-5)  # a sample's output does not depend on its batch


def test_flattened_gray_images_reach_the_cnn_as_images():
    params = init_params(LeafCNN(10, features=(2, 4), hidden=8), (28, 28, 1), jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    module = LeafCNN(10, features=(2, 4), hidden=8)
    np.testing.assert_allclose(module.apply(params, x.reshape(2, 784)), module.apply(params, x), rtol=1e-6)


def test_bad_cell_names_the_key():
    with pytest.raises(ConfigError, match="model.cell='rnn'"):
        init_params(CharRNN(4, cell="rnn"), (5,), jax.random.key(0))


BAD_SETTINGS = [
    (lambda: MLP(10, hidden="abc"), "model.hidden='abc' is invalid: must be a list of integers >= 1"),
    (lambda: MLP(10, hidden=[0]), "model.hidden=[0] is invalid: must be a list of integers >= 1"),
    (lambda: MLP(10, hidden=[-3]), "model.hidden=[-3] is invalid: must be a list of integers >= 1"),
    (lambda: CharRNN(80, hidden=0), "model.hidden=0 is invalid: must be an integer >= 1"),
    (lambda: CharRNN(80, layers=-1), "model.layers=-1 is invalid: must be an integer >= 1"),
    (lambda: LeafCNN(10, hidden=0), "model.hidden=0 is invalid: must be an integer >= 1"),
    (lambda: CifarCNN(10, features=(6, 0)), "model.features=[6, 0] is invalid: must be a list of integers >= 1"),
    (lambda: resnet8(10, norm_groups=3), "model.norm_groups=3 is invalid: must be an integer >= 1 that divides every width (16, 32, 64) (GroupNorm)"),
    (lambda: resnet18(10, norm_groups=0), "model.norm_groups=0 is invalid: must be an integer >= 1"),
    (lambda: LeafCNN(10, conv="cudnn"), "model.conv='cudnn' is invalid: must be one of ['auto', 'patches', 'lax']"),
    (lambda: resnet8(10, conv="im2col"), "model.conv='im2col' is invalid: must be one of ['auto', 'patches', 'lax']"),
]


@pytest.mark.parametrize("make, message", BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_bad_model_settings_name_the_key_and_what_is_allowed(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value) == message


def dataset(x, num_classes=10, name="d"):
    from asyncflower_jax.data.dataset import Dataset

    y = np.zeros(len(x), np.int32)
    return Dataset(x, y, x, y, num_classes=num_classes, name=name)


def test_a_model_that_cannot_take_the_datasets_samples_names_both():
    from asyncflower_jax.models import check_inputs

    digits = dataset(np.random.default_rng(0).random((4, 64)).astype(np.float32), name="digits")
    with pytest.raises(ConfigError) as err:
        check_inputs(CifarCNN(10), digits)
    assert str(err.value).startswith("model CifarCNN does not fit dataset digits: its samples of shape (64,) are images of side 8; CifarCNN takes images")
    assert "of side >= 16" in str(err.value)
    with pytest.raises(ConfigError, match="model CharRNN does not fit dataset digits: its samples are not integer codes in \\[0, 10\\); CharRNN takes sequences"):
        check_inputs(CharRNN(10), digits)
    with pytest.raises(ConfigError, match="model ResNet does not fit dataset digits: its samples have rank 1"):
        check_inputs(resnet8(10), digits)
    with pytest.raises(ConfigError, match="its samples of shape \\(60,\\) are no square image"):
        check_inputs(LeafCNN(10), dataset(np.zeros((4, 60), np.float32)))
    from asyncflower_jax.data.dataset import Dataset

    codes = np.zeros((4, 5), np.float32)
    tokens = Dataset(codes, np.zeros(4, np.int32), codes + 12, np.zeros(4, np.int32), num_classes=10, name="tokens")  # test codes beyond the vocabulary
    with pytest.raises(ConfigError, match="model CharRNN does not fit dataset tokens: its test samples are not integer codes in \\[0, 10\\)"):
        check_inputs(CharRNN(10), tokens)


def test_models_take_the_samples_they_are_made_for():
    from asyncflower_jax.models import check_inputs

    rng = np.random.default_rng(0)
    check_inputs(CifarCNN(10), dataset(rng.random((4, 32, 32, 3)).astype(np.float32)))
    check_inputs(LeafCNN(62), dataset(rng.random((4, 784)).astype(np.float32), num_classes=62))  # flattened 28x28
    check_inputs(resnet8(10), dataset(rng.random((4, 8, 8)).astype(np.float32)))
    check_inputs(CharRNN(80), dataset(rng.integers(0, 80, (4, 80)).astype(np.float32), num_classes=80))
    check_inputs(MLP(10), dataset(rng.random((4, 3, 5)).astype(np.float32)))  # dense models take any shape
