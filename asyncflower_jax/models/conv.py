"""Convolution as one matrix product over image patches, a drop-in for `lax.conv_general_dilated`.

Why: the simulator trains each client with its own weights under `vmap`, and a vmapped convolution
whose kernel is batched becomes one grouped convolution with a group per client, which XLA runs far
below its dense speed (on a 2-core CPU the LEAF CNN trained 12x slower per sample than this
form, and 13x slower with shared weights; BENCHMARKS.md). Written as shifted slices of the padded input stacked into patches and one
matmul with the kernel, a vmapped convolution is a batched matmul instead, and its gradient is
slices, pads and matmuls. The results equal the convolution's up to floating-point rounding.
`models.cnn` and `models.resnet` take it by their `conv` setting (CONV_CHOICES).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..errors import require

CONV_CHOICES = ("auto", "patches", "lax")
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def patches_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                 precision=None, **kwargs):
    """`lax.conv_general_dilated` of NHWC images and an HWIO kernel as slices and one matmul; any
    other case (dilation, feature groups, other layouts or ranks) is passed to lax as it is."""
    plain = lhs.ndim == 4 and not kwargs and feature_group_count == 1 and _unit(lhs_dilation) and _unit(rhs_dilation)
    if not plain or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                        feature_group_count, precision=precision, **kwargs)
    kh, kw, cin, cout = rhs.shape
    sh, sw = window_strides
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
    (top, bottom), (left, right) = padding
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    if kh == kw == 1:
        cols = x[:, : (out_h - 1) * sh + 1 : sh, : (out_w - 1) * sw + 1 : sw, :]
    else:
        taps = [x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :] for i in range(kh) for j in range(kw)]
        cols = jnp.concatenate(taps, axis=-1)  # [N, H', W', kh * kw * C] in the kernel's (i, j, c) order
    return lax.dot_general(cols, rhs.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())), precision=precision)


def _unit(dilation) -> bool:
    return dilation is None or all(d == 1 for d in dilation)


def conv_function(conv: str):
    """The convolution a model's `conv` setting names, for flax's `nn.Conv(conv_general_dilated=...)`:
    `patches` (patches_conv), `lax` (XLA's convolution), `auto` (patches on a CPU, where XLA's
    convolutions of per-client kernels are slowest; lax elsewhere, until measured there)."""
    require(conv in CONV_CHOICES, "model.conv", conv, f"one of {list(CONV_CHOICES)}")
    if conv == "auto":
        conv = "patches" if jax.default_backend() == "cpu" else "lax"
    return patches_conv if conv == "patches" else lax.conv_general_dilated
