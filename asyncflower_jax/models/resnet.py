"""ResNets for 32x32 (CIFAR) and 64x64 (TinyImageNet) images, with GroupNorm instead of BatchNorm.

Why not BatchNorm: its running mean and variance are state, not trained parameters, and are
estimated from each client's own batches; under label skew every client's statistics differ, and
averaging them (or the weights trained against them) across clients of different distributions
degrades the global model (Hsieh et al., ICML 2020, "The Non-IID Data Quagmire"). BatchNorm also
makes a sample's output depend on the rest of its batch, and would make the simulator carry mutable
batch statistics through every client update and aggregation rule. GroupNorm normalises each
sample over groups of channels: no state, no dependence on the batch, the same parameter count
(a scale and a bias per channel).

The layout is the CIFAR ResNet of He et al. (2016) as commonly used in FL papers: a 3x3 stem
without max-pooling, basic blocks, global average pooling and a linear classifier; convolutions
have no bias (the normalisation's bias follows them). ResNet-18 has 11,173,962 parameters for 10
classes, as the BatchNorm original.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ..errors import require
from . import Inputs, positive_int, positive_ints
from .conv import conv_function


class BasicBlock(nn.Module):
    features: int
    stride: int
    groups: int
    conv: str = "auto"

    @nn.compact
    def __call__(self, x):
        norm = lambda: nn.GroupNorm(num_groups=min(self.groups, self.features))  # noqa: E731
        conv = conv_function(self.conv)
        y = nn.Conv(self.features, (3, 3), strides=self.stride, padding=1, use_bias=False, conv_general_dilated=conv)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, conv_general_dilated=conv)(y)
        y = norm()(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = norm()(nn.Conv(self.features, (1, 1), strides=self.stride, use_bias=False, conv_general_dilated=conv)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """`blocks[i]` basic blocks of width `widths[i]`; stages after the first halve the resolution."""

    num_classes: int
    blocks: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    norm_groups: int = 2
    conv: str = "auto"  # models.conv.conv_function
    INPUTS = Inputs("images [H, W] or [H, W, C], e.g. dataset=cifar10 or tinyimagenet", ranks=(2, 3), min_side=1)

    def __post_init__(self):
        positive_ints("model.blocks", self.blocks)
        positive_ints("model.widths", self.widths)
        positive_int("model.norm_groups", self.norm_groups)
        widths = tuple(self.widths)
        divides = all(w % min(self.norm_groups, w) == 0 for w in widths)
        require(divides, "model.norm_groups", self.norm_groups, f"an integer >= 1 that divides every width {widths} (GroupNorm)")
        conv_function(self.conv)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        if x.ndim == 3:
            x = x[..., None]
        x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False, conv_general_dilated=conv_function(self.conv))(x)
        x = nn.relu(nn.GroupNorm(num_groups=min(self.norm_groups, self.widths[0]))(x))
        for stage, (count, width) in enumerate(zip(self.blocks, self.widths)):
            for b in range(count):
                x = BasicBlock(width, stride=2 if stage > 0 and b == 0 else 1, groups=self.norm_groups, conv=self.conv)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def resnet18(num_classes: int, norm_groups: int = 2, conv: str = "auto") -> ResNet:
    """ResNet-18: [2, 2, 2, 2] blocks of widths 64..512."""
    return ResNet(num_classes, (2, 2, 2, 2), (64, 128, 256, 512), norm_groups, conv)


def resnet8(num_classes: int, norm_groups: int = 2, conv: str = "auto") -> ResNet:
    """ResNet-8: a 16-channel stem and one block in each of three stages of widths 16, 32, 64
    (1 + 3 x 2 convolutions + 1 linear layer = 8 weight layers)."""
    return ResNet(num_classes, (1, 1, 1), (16, 32, 64), norm_groups, conv)
