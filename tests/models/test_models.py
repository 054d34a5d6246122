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
