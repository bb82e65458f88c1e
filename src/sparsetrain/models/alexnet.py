"""The AlexNets of the SNIP paper's Table 2 (CIFAR-10): ``alexnet-s`` and ``alexnet-b``.

Definition from snip-public (``snip/network.py``, ``AlexNet``, archs ``alexnet-v1`` and
``alexnet-v2``): AlexNet's five convolutions with the original kernel sizes and filter counts
(96@11x11, 256@5x5, 384@3x3, 384@3x3, 256@3x3), each with a bias, batch-norm and ReLU, but every
one with stride 2 (CIFAR images are small: 32x32 becomes 16, 8, 4, 2, 1); then two fully
connected layers of ``1024 * k`` units (the original has k = 4, 4096 units), each with
batch-norm and ReLU, and the classifier. AlexNet-s has k = 1 (5.1m parameters), AlexNet-b
k = 2 (8.5m). Padding keeps the "same" rule of the original code (kernel // 2), so the image
side is halved, rounded up, at each convolution and any image of at least 1x1 pixel works:
the first fully connected layer sees 256 * ceil(H/32) * ceil(W/32) inputs (256 for 32x32)::

    convs: sum(k*k*c_in*c_out + c_out) = 3,747,200;  conv batch-norm: 2 * 1,376
    fc (k): 256*1024k + 1024k + (1024k)^2 + 1024k + 1024k*classes + classes;  fc batch-norm: 4 * 1024k

AlexNet-s: 5,077,066 parameters, AlexNet-b: 8,501,322 (batch-norm included; the paper's
counts, 5.1m and 8.5m, are those of the weights and biases).
"""

from __future__ import annotations

import math

import torch.nn as nn

from .registry import MODELS

# (out channels, kernel size) of AlexNet's five convolutions, each with stride 2 here
CONVS = ((96, 11), (256, 5), (384, 3), (384, 3), (256, 3))


def alexnet(input_shape: tuple[int, ...], num_classes: int, k: int) -> nn.Sequential:
    """AlexNet for small images with fully connected layers of ``1024 * k`` units."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out, size in CONVS:
        layers += [nn.Conv2d(c, out, size, stride=2, padding=size // 2), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    fh, fw = math.ceil(h / 2 ** len(CONVS)), math.ceil(w / 2 ** len(CONVS))  # 1x1 for 32x32 inputs
    width = 1024 * k
    return nn.Sequential(
        *layers,  # (B, 256, ceil(H/32), ceil(W/32))
        nn.Flatten(),
        nn.Linear(c * fh * fw, width), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )


@MODELS.register("alexnet-s")
def alexnet_s(*, input_shape=(3, 32, 32), num_classes=10) -> nn.Module:
    """AlexNet-s of SNIP's Table 2: fully connected layers of 1024 units (snip-public's alexnet-v1)."""
    return alexnet(input_shape, num_classes, k=1)


@MODELS.register("alexnet-b")
def alexnet_b(*, input_shape=(3, 32, 32), num_classes=10) -> nn.Module:
    """AlexNet-b of SNIP's Table 2: fully connected layers of 2048 units (snip-public's alexnet-v2)."""
    return alexnet(input_shape, num_classes, k=2)
