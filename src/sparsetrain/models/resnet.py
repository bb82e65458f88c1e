"""Residual networks for small images: He et al.'s CIFAR ResNets, Zagoruyko & Komodakis's Wide
ResNets, and the batch-norm-free ResNet-8 of the data-parallelism paper.

All share one plan (He et al. 2016, "Deep residual learning", section 4.2): a 3x3 stem
convolution to 16 channels, three stages of ``n`` basic blocks (two 3x3 convolutions) with
``16k, 32k, 64k`` channels, the second and third starting with stride 2, global average pooling
and one fully connected classifier. Every convolution has a bias, as in the papers' public code
(spp-public and effect-dps-public ``network.py``, ``ResNet`` and ``ResNetNB``), which SNIP may
prune with the weights. Global pooling makes any image size work (8x8 feature maps for 32x32).

- ``resnet-32``, ``resnet-56``, ``resnet-110`` (signal propagation paper, spp-public's resnet32/56/110):
  He et al.'s original "post-activation" block, conv-BN-ReLU-conv-BN, add, ReLU; where the width
  doubles, the shortcut is option A: the input average-pooled with stride 2 and zero-padded to
  the new channel count (no parameters). Depth 6n+2; 0.46m, 0.85m and 1.73m parameters.
  ``resnet`` is the same family at any depth 6n+2 (``depth`` model_arg).
- Wide ResNets (Zagoruyko & Komodakis 2016, "Wide residual networks"; snip-public has none, the
  definition follows the paper and spp-public's wide-resnet): "pre-activation" blocks
  BN-ReLU-conv-BN-ReLU-(dropout)-conv plus the shortcut, a 1x1 projection convolution (of the
  pre-activated input) wherever the channel count changes, BN-ReLU before the pooling. Depth 6n+4
  (n blocks per stage), widen factor k. SNIP's Table 2 has ``wrn-16-8``, ``wrn-16-10`` and
  ``wrn-22-8``. The SNIP paper prints 10.0m for WRN-16-8, but WRN-16-8 has 10.96m parameters
  (Zagoruyko's Table: 11.0m) and the paper's own 548k at 95% sparsity is 5% of 10.96m, so it is
  built as the standard network; WRN-16-10 has 17.1m and WRN-22-8 17.2m as printed.
  ``wrn-16`` is the signal propagation paper's (spp-public's wrn-16: k = 6 by default, a
  ``width`` model_arg); ``wrn`` is the family at any depth and width. ``dropout`` between the two
  convolutions of a block is Zagoruyko's (0.3 in some of his runs); the papers train with none.
- ``resnet-8`` (data-parallelism paper, effect-dps-public's ResNetNB): pre-activation blocks with
  no batch-norm at all, one block per stage, option A shortcuts, 75,050 parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SparsetrainError
from .registry import MODELS

ZEROPAD, PROJECTION = "zeropad", "projection"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut: ``pre_activation`` (He et al.'s identity-mapping
    order, as Wide ResNets use) or the original post-activation order; ``batch_norm`` off gives
    the batch-norm-free blocks of ResNet-8."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, pre_activation: bool, batch_norm: bool = True,
                 shortcut: str = ZEROPAD, dropout: float = 0.0):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.pre_activation = pre_activation
        self.stride, self.c_in, self.c_out = stride, c_in, c_out
        self.bn_in = norm(c_in) if pre_activation else nn.Identity()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.bn1 = norm(c_out)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.Identity() if pre_activation else norm(c_out)
        self.projection: nn.Module | None = None
        if (c_in != c_out or stride != 1) and shortcut == PROJECTION:
            conv = nn.Conv2d(c_in, c_out, 1, stride=stride)
            # post-activation projections are followed by batch-norm, as the residual branch is
            self.projection = nn.Sequential(conv, norm(c_out)) if not pre_activation else conv

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.c_in == self.c_out and self.stride == 1:
            return x
        if self.projection is not None:
            return self.projection(x)
        if self.stride > 1:  # option A: subsample by average pooling, pad channels with zeros
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        return F.pad(x, (0, 0, 0, 0, 0, self.c_out - self.c_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H/stride, W/stride)
        if self.pre_activation:
            a = torch.relu(self.bn_in(x))
            # where the shape changes, the shortcut takes the pre-activated input (as in WRN)
            shortcut = x if self.c_in == self.c_out and self.stride == 1 else self.shortcut(a)
            out = self.conv2(self.dropout(torch.relu(self.bn1(self.conv1(a)))))
            return out + shortcut
        out = self.bn2(self.conv2(self.dropout(torch.relu(self.bn1(self.conv1(x))))))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem, three stages of ``n`` blocks with ``16k, 32k, 64k`` channels, global pooling, fc."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, n: int, k: int = 1,
                 pre_activation: bool, batch_norm: bool = True, shortcut: str = ZEROPAD, dropout: float = 0.0):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.stem = nn.Conv2d(input_shape[0], 16, 3, padding=1)  # (B, 16, H, W)
        # post-activation nets normalise the stem; pre-activation blocks do it themselves
        self.stem_bn = nn.Identity() if pre_activation else norm(16)
        self.pre_activation = pre_activation
        blocks: list[nn.Module] = []
        c_in = 16
        for stage in range(3):
            c_out = 16 * 2**stage * k
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride, pre_activation=pre_activation, batch_norm=batch_norm,
                                         shortcut=shortcut, dropout=dropout))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)  # (B, 64k, H/4, W/4)
        self.bn_out = norm(c_in) if pre_activation else nn.Identity()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = self.stem(x)
        if not self.pre_activation:
            x = torch.relu(self.stem_bn(x))
        x = self.blocks(x)
        if self.pre_activation:
            x = torch.relu(self.bn_out(x))
        return self.fc(x.mean(dim=(2, 3)))  # global average pooling: (B, 64k)


def _blocks_per_stage(family: str, depth: int, extra: int, examples: str) -> int:
    n, rest = divmod(depth - extra, 6)
    if rest or n < 1:
        raise SparsetrainError(f"{family} depth must be 6n+{extra} with n >= 1 ({examples}); got {depth}")
    return n


def _check_width(width: int) -> None:
    if width < 1:
        raise SparsetrainError(f"wrn width (the widen factor k) must be a positive integer, got {width}")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise SparsetrainError(f"dropout must be in [0, 1) (the fraction of units dropped), got {dropout}")


@MODELS.register("resnet")
def resnet(*, input_shape=(3, 32, 32), num_classes=10, depth: int = 32) -> nn.Module:
    """He et al.'s CIFAR ResNet of any depth 6n+2 (post-activation, option A shortcuts)."""
    n = _blocks_per_stage("resnet", depth, 2, "8, 14, 20, 32, 44, 56, 110, ...")
    return CifarResNet(input_shape, num_classes, n=n, pre_activation=False)


@MODELS.register("resnet-32")
def resnet_32(*, input_shape=(3, 32, 32), num_classes=10) -> nn.Module:
    """ResNet-32 (He et al. 2016; spp-public's resnet32): 5 blocks per stage, 0.46m parameters."""
    return resnet(input_shape=input_shape, num_classes=num_classes, depth=32)


@MODELS.register("resnet-56")
def resnet_56(*, input_shape=(3, 32, 32), num_classes=10) -> nn.Module:
    """ResNet-56 (He et al. 2016; spp-public's resnet56): 9 blocks per stage, 0.85m parameters."""
    return resnet(input_shape=input_shape, num_classes=num_classes, depth=56)


@MODELS.register("resnet-110")
def resnet_110(*, input_shape=(3, 32, 32), num_classes=10) -> nn.Module:
    """ResNet-110 (He et al. 2016; spp-public's resnet110): 18 blocks per stage, 1.7m parameters."""
    return resnet(input_shape=input_shape, num_classes=num_classes, depth=110)


@MODELS.register("wrn")
def wrn(*, input_shape=(3, 32, 32), num_classes=10, depth: int = 16, width: int = 8,
        dropout: float = 0.0) -> nn.Module:
    """Wide ResNet WRN-depth-width (Zagoruyko & Komodakis 2016): depth 6n+4, widen factor ``width``."""
    n = _blocks_per_stage("wrn", depth, 4, "10, 16, 22, 28, 40, ...")
    _check_width(width)
    _check_dropout(dropout)
    return CifarResNet(input_shape, num_classes, n=n, k=width, pre_activation=True, shortcut=PROJECTION,
                       dropout=dropout)


@MODELS.register("wrn-16-8")
def wrn_16_8(*, input_shape=(3, 32, 32), num_classes=10, dropout: float = 0.0) -> nn.Module:
    """WRN-16-8 of SNIP's Table 2: 10.96m parameters (the paper prints 10.0m; see the module)."""
    return wrn(input_shape=input_shape, num_classes=num_classes, depth=16, width=8, dropout=dropout)


@MODELS.register("wrn-16-10")
def wrn_16_10(*, input_shape=(3, 32, 32), num_classes=10, dropout: float = 0.0) -> nn.Module:
    """WRN-16-10 of SNIP's Table 2: 17.1m parameters."""
    return wrn(input_shape=input_shape, num_classes=num_classes, depth=16, width=10, dropout=dropout)


@MODELS.register("wrn-22-8")
def wrn_22_8(*, input_shape=(3, 32, 32), num_classes=10, dropout: float = 0.0) -> nn.Module:
    """WRN-22-8 of SNIP's Table 2: 17.2m parameters."""
    return wrn(input_shape=input_shape, num_classes=num_classes, depth=22, width=8, dropout=dropout)


@MODELS.register("wrn-16")
def wrn_16(*, input_shape=(3, 32, 32), num_classes=10, width: int = 6, dropout: float = 0.0) -> nn.Module:
    """WRN-16 of the signal propagation paper (spp-public's wrn-16, widen factor 6 there)."""
    return wrn(input_shape=input_shape, num_classes=num_classes, depth=16, width=width, dropout=dropout)


@MODELS.register("resnet-8")
def resnet_8(*, input_shape=(3, 32, 32), num_classes=10) -> nn.Module:
    """ResNet-8 without batch-norm of the data-parallelism paper (effect-dps-public's ResNetNB):
    one pre-activation block per stage, option A shortcuts, 75,050 parameters."""
    return CifarResNet(input_shape, num_classes, n=1, pre_activation=True, batch_norm=False)
