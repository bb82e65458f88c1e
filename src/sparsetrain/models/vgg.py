"""VGG-like networks for CIFAR-shaped inputs (3x32x32).

``vgg-cifar-small``: three stages of two 3x3 convolutions (16, 32, 64 channels; no bias, each
followed by batch-norm and ReLU) and a 2x2 max-pool, then fc 128 with ReLU and fc ``num_classes``.
It has the VGG shape the SNIP paper prunes on CIFAR-10 (stacked 3x3 convolutions with batch-norm,
a small fully connected head) at a width a 2-core CPU trains in minutes: 204,794 parameters for
3x32x32 inputs and 10 classes::

    convs: 9 * sum(c_in * c_out) = 9 * (3*16 + 16*16 + 16*32 + 32*32 + 32*64 + 64*64)
    batch-norm: 2 * sum(c_out);  head: 64 * (H/8) * (W/8) * 128 + 128 + 128 * classes + classes

Every convolution weight viewed as (out, in*3*3) has rows that are a multiple of 4 long except
the first (in = 3: rows of 27), so 2:4 sparsity fits all layers but the first.

The SNIP paper's Table 2 VGGs, ``vgg-c``, ``vgg-d`` and ``vgg-like`` (snip-public's definitions),
follow it; the comment above :func:`snip_vgg` says where each comes from.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import SparsetrainError
from .registry import MODELS

POOL = "M"
SMALL = (16, 16, POOL, 32, 32, POOL, 64, 64, POOL)


def vgg_features(channels: int, plan: tuple) -> tuple[nn.Sequential, int, int]:
    """Conv-BN-ReLU layers (3x3, padding 1) and max-pools as ``plan`` says;
    returns (layers, output channels, number of pools)."""
    layers: list[nn.Module] = []
    pools = 0
    for item in plan:
        if item == POOL:
            layers.append(nn.MaxPool2d(2))  # (B, C, H/2, W/2)
            pools += 1
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers), channels, pools


@MODELS.register("vgg-cifar-small")
def vgg_cifar_small(*, input_shape=(3, 32, 32), num_classes=10, hidden: int = 128) -> nn.Module:
    c, h, w = input_shape
    features, out_channels, pools = vgg_features(c, SMALL)
    if min(h, w) < 2**pools:
        raise SparsetrainError(
            f"vgg-cifar-small halves the image {pools} times, so it needs at least "
            f"{2**pools}x{2**pools} pixels; got {h}x{w}"
        )
    fh, fw = h >> pools, w >> pools  # 4x4 for 32x32 inputs
    return nn.Sequential(
        features,  # (B, 64, H/8, W/8)
        nn.Flatten(),  # (B, 64 * H/8 * W/8)
        nn.Linear(out_channels * fh * fw, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


# SNIP Table 2's VGGs. Definitions from snip-public (``snip/network.py``, ``VGG``): the
# convolutions of Simonyan & Zisserman's configurations C and D (widths 64-128-256-512-512, five
# max-pools), each with a bias, batch-norm and ReLU; fully connected layers of 512 units (4096 in
# the original) with batch-norm and ReLU instead of dropout; the first sees a 1x1 image for
# 32x32 inputs. VGG-C: three 1x1 convolutions (the last of stages 3, 4, 5), three fc layers,
# 10.5m parameters. VGG-D (VGG-16): all 3x3, three fc layers, 15.2m. VGG-like (Zagoruyko's
# CIFAR-10 VGG, torch.ch/blog/2015/07/30/cifar.html): D's convolutions with two fc layers,
# 15.0m. Zagoruyko's original uses dropout between its convolutions and before each fc layer;
# snip-public and so the SNIP paper use batch-norm and no dropout, which is the default here:
# ``dropout`` (VGG-like's model_arg) puts it back after the hidden fc layer (Zagoruyko: 0.5).
# Pools round up (as the original's "same" pooling), so inputs of any size from 1x1 work and the
# first fc layer sees 512 * ceil(H/32) * ceil(W/32) inputs.
ONE = "1x1"  # in a plan, (ONE, c): a 1x1 convolution to c channels
PLAN_C = (64, 64, POOL, 128, 128, POOL, 256, 256, (ONE, 256), POOL,
          512, 512, (ONE, 512), POOL, 512, 512, (ONE, 512), POOL)
PLAN_D = (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL)


def snip_vgg(input_shape: tuple[int, ...], num_classes: int, plan: tuple, hidden_layers: int,
             dropout: float = 0.0, hidden: int = 512) -> nn.Sequential:
    """Conv(bias)-BN-ReLU layers and max-pools as ``plan`` says, then ``hidden_layers`` fc layers
    of ``hidden`` units (Linear-BN-ReLU, then dropout if any) and the classifier."""
    if not 0.0 <= dropout < 1.0:
        raise SparsetrainError(f"dropout must be in [0, 1) (the fraction of units dropped), got {dropout}")
    channels, h, w = input_shape
    layers: list[nn.Module] = []
    for item in plan:
        if item == POOL:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))  # (B, C, ceil(H/2), ceil(W/2))
            h, w = -(-h // 2), -(-w // 2)
            continue
        size, out = (1, item[1]) if isinstance(item, tuple) else (3, item)
        layers += [nn.Conv2d(channels, out, size, padding=size // 2), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    layers.append(nn.Flatten())  # (B, 512 * ceil(H/32) * ceil(W/32))
    features = channels * h * w
    for _ in range(hidden_layers):
        layers += [nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        features = hidden
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("vgg-c")
def vgg_c(*, input_shape=(3, 32, 32), num_classes=10) -> nn.Module:
    """VGG-C of SNIP's Table 2 (snip-public's vgg-c): 13 convolutions, three of them 1x1, fc 512-512."""
    return snip_vgg(input_shape, num_classes, PLAN_C, hidden_layers=2)


@MODELS.register("vgg-d")
def vgg_d(*, input_shape=(3, 32, 32), num_classes=10) -> nn.Module:
    """VGG-D (VGG-16) of SNIP's Table 2 (snip-public's vgg-d): 13 3x3 convolutions, fc 512-512."""
    return snip_vgg(input_shape, num_classes, PLAN_D, hidden_layers=2)


@MODELS.register("vgg-like")
def vgg_like(*, input_shape=(3, 32, 32), num_classes=10, dropout: float = 0.0) -> nn.Module:
    """VGG-like of SNIP's Table 2 (snip-public's vgg-like, after Zagoruyko): VGG-D's
    convolutions, fc 512; ``dropout`` after the fc layer (0: as the SNIP paper trains it)."""
    return snip_vgg(input_shape, num_classes, PLAN_D, hidden_layers=1, dropout=dropout)
