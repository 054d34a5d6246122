"""Convolutional networks of the federated-learning benchmarks, on NHWC images."""

from __future__ import annotations

import flax.linen as nn

from . import Inputs, positive_int, positive_ints
from .conv import conv_function

IMAGES = "images [H, W] or [H, W, C] (or square gray images flattened)"


def _images(x):
    """[B, H, W] or [B, H*W] (a square gray image flattened) inputs become [B, H, W, 1]."""
    if x.ndim == 2:
        side = int(round(x.shape[1] ** 0.5))
        x = x.reshape((x.shape[0], side, side))
    return x[..., None] if x.ndim == 3 else x


class LeafCNN(nn.Module):
    """The LEAF FEMNIST CNN (Caldas et al. 2018): conv5x5(32) - maxpool2 - conv5x5(64) - maxpool2 -
    dense(2048) - dense(num_classes), ReLU, 'SAME' padding. 6,603,710 parameters for 28x28x1 inputs
    and 62 classes. Also the Fashion-MNIST CNN preset (10 classes)."""

    num_classes: int
    features: tuple[int, int] = (32, 64)
    hidden: int = 2048
    conv: str = "auto"  # models.conv.conv_function
    INPUTS = Inputs(f"{IMAGES} of side >= 4 (two 2x2 poolings), e.g. dataset=femnist or fashion_mnist", min_side=4)

    def __post_init__(self):
        positive_ints("model.features", self.features)
        positive_int("model.hidden", self.hidden)
        conv_function(self.conv)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        x = _images(x)
        for width in self.features:
            x = nn.relu(nn.Conv(width, (5, 5), padding="SAME", conv_general_dilated=conv_function(self.conv))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class CifarCNN(nn.Module):
    """The small CIFAR CNN of McMahan et al. (2017) and the PyTorch tutorial (LeNet-5 style):
    conv5x5(6) - maxpool2 - conv5x5(16) - maxpool2 - dense(120) - dense(84) - dense(num_classes),
    ReLU, 'VALID' padding. 62,006 parameters for 32x32x3 inputs and 10 classes."""

    num_classes: int
    features: tuple[int, int] = (6, 16)
    hidden: tuple[int, int] = (120, 84)
    conv: str = "auto"  # models.conv.conv_function
    INPUTS = Inputs(f"{IMAGES} of side >= 16 (two unpadded 5x5 convolutions and 2x2 poolings), e.g. dataset=cifar10", min_side=16)

    def __post_init__(self):
        positive_ints("model.features", self.features)
        positive_ints("model.hidden", self.hidden)
        conv_function(self.conv)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        x = _images(x)
        for width in self.features:
            x = nn.relu(nn.Conv(width, (5, 5), padding="VALID", conv_general_dilated=conv_function(self.conv))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)
