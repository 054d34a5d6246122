"""The patch-and-matmul convolution against XLA's, and the models that take it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from asyncflower_jax.models.cnn import CifarCNN, LeafCNN
from asyncflower_jax.models.conv import conv_function, patches_conv
from asyncflower_jax.models.mlp import init_params
from asyncflower_jax.models.resnet import resnet8

NHWC = ("NHWC", "HWIO", "NHWC")


def naive_conv(x, k, stride, pads):
    """A convolution by its definition: out[n, a, b, o] = sum over i, j, c of the padded
    x[n, a*s + i, b*s + j, c] * k[i, j, c, o]."""
    x = np.pad(x, ((0, 0), *pads, (0, 0)))
    kh, kw, _, cout = k.shape
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, cout))
    for a in range(out_h):
        for b in range(out_w):
            window = x[:, a * stride : a * stride + kh, b * stride : b * stride + kw, :]
            out[:, a, b, :] = np.einsum("nijc,ijco->no", window, k)
    return out


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, pads",
    [
        ((2, 7, 7, 1), (5, 5, 1, 3), 1, "SAME", [(2, 2), (2, 2)]),
        ((2, 8, 6, 3), (5, 5, 3, 4), 1, "VALID", [(0, 0), (0, 0)]),
        ((1, 9, 9, 2), (3, 3, 2, 5), 2, [(1, 1), (1, 1)], [(1, 1), (1, 1)]),
        ((1, 8, 8, 2), (3, 3, 2, 2), 2, "SAME", [(0, 1), (0, 1)]),  # (SAME with stride 2 pads after only)
        ((3, 6, 6, 4), (1, 1, 4, 2), 2, "VALID", [(0, 0), (0, 0)]),
    ],
)
def test_patches_conv_equals_the_definition_and_xla(shape, kernel, stride, padding, pads):
    rng = np.random.default_rng(0)
    x, k = rng.normal(size=shape).astype(np.float32), rng.normal(size=kernel).astype(np.float32)
    ours = patches_conv(jnp.asarray(x), jnp.asarray(k), (stride, stride), padding, dimension_numbers=NHWC)
    np.testing.assert_allclose(ours, naive_conv(x.astype(np.float64), k.astype(np.float64), stride, pads), rtol=1e-5, atol=1e-5)
    xla = lax.conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=NHWC)
    np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=1e-5)


def test_patches_conv_gradients_equal_xlas_under_a_vmap_over_clients():
    """Per-client kernels under vmap (how the simulator trains): the same values and gradients."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 2, 8, 8, 3)), jnp.float32)  # 4 clients, 2 images each
    k = jnp.asarray(rng.normal(size=(4, 5, 5, 3, 6)), jnp.float32)

    def loss(conv, k, x):
        return jnp.sum(jnp.tanh(conv(x, k, (1, 1), "SAME", dimension_numbers=NHWC)))

    for argnums in (0, 1):
        ours = jax.vmap(jax.grad(lambda k, x: loss(patches_conv, k, x), argnums))(k, x)
        xla = jax.vmap(jax.grad(lambda k, x: loss(lax.conv_general_dilated, k, x), argnums))(k, x)
        np.testing.assert_allclose(ours, xla, rtol=1e-4, atol=1e-4)


def test_cases_it_does_not_rewrite_go_to_xla():
    x, k = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))
    for kwargs in ({"rhs_dilation": (2, 2)}, {"lhs_dilation": (2, 2)}):
        np.testing.assert_array_equal(
            patches_conv(x, k, (1, 1), [(0, 0), (0, 0)], dimension_numbers=NHWC, **kwargs),
            lax.conv_general_dilated(x, k, (1, 1), [(0, 0), (0, 0)], dimension_numbers=NHWC, **kwargs),
        )
    grouped = jnp.ones((3, 3, 1, 2))
    np.testing.assert_array_equal(
        patches_conv(x, grouped, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2),
        lax.conv_general_dilated(x, grouped, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2),
    )


@pytest.mark.parametrize(
    "make, shape",
    [(lambda conv: LeafCNN(10, features=(4, 8), hidden=16, conv=conv), (28, 28)),
     (lambda conv: CifarCNN(10, conv=conv), (32, 32, 3)),
     (lambda conv: resnet8(10, conv=conv), (16, 16, 3))],
)
def test_a_models_outputs_and_parameters_do_not_depend_on_its_convolution(make, shape):
    params = init_params(make("lax"), shape, jax.random.key(0))
    assert jax.tree.structure(init_params(make("patches"), shape, jax.random.key(0))) == jax.tree.structure(params)
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    np.testing.assert_allclose(make("patches").apply(params, x), make("lax").apply(params, x), rtol=1e-4, atol=1e-5)


def test_auto_is_patches_on_the_cpu():
    assert jax.default_backend() != "cpu" or conv_function("auto") is patches_conv
    assert conv_function("lax") is lax.conv_general_dilated
