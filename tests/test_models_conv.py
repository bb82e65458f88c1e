"""The convolutional and residual networks of the three papers: parameter counts against the
papers' figures and against the architectures' formulas written out here, forward/backward on
their own input shapes, the residual blocks' order and shortcuts, bad model_args, and what SNIP
may prune in them."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from sparsetrain.errors import SparsetrainError
from sparsetrain.models import create_model, default_input_shape
from sparsetrain.models.resnet import BasicBlock
from sparsetrain.pruning import prune_at_init


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(name: str, **model_args) -> int:
    """Parameters of the model built on the meta device (shapes only: no memory, no init)."""
    with torch.device("meta"):
        return n_params(create_model(name, **model_args))


# --- counts by hand, from each architecture's definition -------------------------------------

def conv(c_in: int, c_out: int, k: int) -> int:  # k x k kernel with a bias
    return k * k * c_in * c_out + c_out


def bn(c: int) -> int:  # batch-norm's scale and shift
    return 2 * c


def fc(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def alexnet_count(k: int, classes: int = 10) -> int:
    # AlexNet's convolutions (snip-public), each with batch-norm; 32x32 -> 1x1 after five stride-2 convs
    convs = [(3, 96, 11), (96, 256, 5), (256, 384, 3), (384, 384, 3), (384, 256, 3)]
    width = 1024 * k
    return (sum(conv(i, o, s) + bn(o) for i, o, s in convs)
            + fc(256, width) + bn(width) + fc(width, width) + bn(width) + fc(width, classes))


def vgg_count(plan: list[tuple[int, int]], hidden_layers: int, classes: int = 10) -> int:
    total, c = 0, 3
    for k, out in plan:
        total += conv(c, out, k) + bn(out)
        c = out
    features = 512  # 512 channels x 1 x 1 after five poolings of a 32x32 image
    for _ in range(hidden_layers):
        total += fc(features, 512) + bn(512)
        features = 512
    return total + fc(features, classes)


VGG_C = [(3, 64), (3, 64), (3, 128), (3, 128), (3, 256), (3, 256), (1, 256),
         (3, 512), (3, 512), (1, 512), (3, 512), (3, 512), (1, 512)]
VGG_D = [(3, 64), (3, 64), (3, 128), (3, 128), (3, 256), (3, 256), (3, 256)] + [(3, 512)] * 6


def resnet_count(n: int) -> int:
    # He et al.: stem conv-BN, blocks conv-BN-ReLU-conv-BN with parameter-free (option A) shortcuts
    total, c = conv(3, 16, 3) + bn(16), 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(c, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            c = width
    return total + fc(64, 10)


def wrn_count(n: int, k: int) -> int:
    # Zagoruyko: stem conv; blocks BN-ReLU-conv-BN-ReLU-conv, a 1x1 projection where the width
    # changes; BN-ReLU before the pooling
    total, c = conv(3, 16, 3), 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(c) + conv(c, width, 3) + bn(width) + conv(width, width, 3)
            total += conv(c, width, 1) if c != width else 0
            c = width
    return total + bn(c) + fc(c, 10)


def resnet8_count() -> int:
    # effect-dps-public's ResNetNB: no batch-norm, one block per stage, option A shortcuts
    total, c = conv(3, 16, 3), 16
    for width in (16, 32, 64):
        total += conv(c, width, 3) + conv(width, width, 3)
        c = width
    return total + fc(64, 10)


def simple_cnn_count() -> int:
    # effect-dps-public's SimpleCNN on 1x28x28: 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4
    return conv(1, 32, 5) + conv(32, 64, 5) + fc(64 * 4 * 4, 10)


BY_FORMULA = {
    "alexnet-s": alexnet_count(1), "alexnet-b": alexnet_count(2),
    "vgg-c": vgg_count(VGG_C, 2), "vgg-d": vgg_count(VGG_D, 2), "vgg-like": vgg_count(VGG_D, 1),
    "wrn-16-8": wrn_count(2, 8), "wrn-16-10": wrn_count(2, 10), "wrn-22-8": wrn_count(3, 8),
    "wrn-16": wrn_count(2, 6), "resnet-32": resnet_count(5), "resnet-56": resnet_count(9),
    "resnet-110": resnet_count(18), "resnet-8": resnet8_count(), "simple-cnn": simple_cnn_count(),
}

# The papers' figures: SNIP Table 2 (wrn-16-8: see test_wrn_16_8_is_the_standard_network), He et
# al. 2016 Table 6 for the CIFAR ResNets, effect-dps-public's counts for simple-cnn and resnet-8.
PAPER = {
    "alexnet-s": 5.1e6, "alexnet-b": 8.5e6, "vgg-c": 10.5e6, "vgg-d": 15.2e6, "vgg-like": 15.0e6,
    "wrn-16-8": 10.96e6, "wrn-16-10": 17.1e6, "wrn-22-8": 17.2e6,
    "resnet-32": 0.46e6, "resnet-56": 0.85e6, "resnet-110": 1.7e6,
    "simple-cnn": 62_346, "resnet-8": 75_050,
}

NEW_MODELS = sorted(BY_FORMULA)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameter_count_is_the_papers(name):
    assert count(name) == pytest.approx(PAPER[name], rel=0.02)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_parameter_count_is_the_architectures_formula(name):
    assert count(name) == BY_FORMULA[name]


def test_wrn_16_8_is_the_standard_network():
    # SNIP's Table 2 prints 10.0m for WRN-16-8 but 548k parameters left at 95% sparsity: 5% of
    # the standard network's 10.96m, not of 10.0m (which would leave 500k).
    total = count("wrn-16-8")
    assert 0.05 * total == pytest.approx(548_000, rel=0.002)
    assert abs(total - 10.0e6) / 10.0e6 > 0.09


def test_papers_configurations_of_the_families():
    assert count("resnet", depth=56) == BY_FORMULA["resnet-56"]
    assert count("wrn", depth=22, width=8) == BY_FORMULA["wrn-22-8"]
    assert count("wrn-16", width=8) == BY_FORMULA["wrn-16-8"]
    assert count("wrn", depth=10, width=1) == wrn_count(1, 1)


# Forward and backward at batch 2 on each model's own input shape, SNIP at 90% and two masked
# training steps: tests/test_models_registry.py, over every registered model.


@pytest.mark.parametrize("name", NEW_MODELS)
def test_default_input_shape_is_the_papers(name):
    assert default_input_shape(name) == ((1, 28, 28) if name == "simple-cnn" else (3, 32, 32))


FAMILIES = [("alexnet-s", {}), ("vgg-c", {}), ("resnet", {"depth": 8}), ("wrn", {"depth": 10, "width": 1}),
            ("resnet-8", {}), ("simple-cnn", {})]


@pytest.mark.parametrize("name, args", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 17, 23)])
def test_other_image_sizes_and_class_counts(name, args, shape):
    # Odd sizes: pools and strided convolutions round up as the papers' "same" padding does
    model = create_model(name, input_shape=shape, num_classes=100, **args)
    assert model(torch.randn(2, *shape)).shape == (2, 100)


def test_option_a_shortcut_is_the_pooled_input_padded_with_zeros():
    torch.manual_seed(0)
    block = BasicBlock(4, 8, 2, pre_activation=False)
    x = torch.randn(2, 4, 6, 6)
    pooled = (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) / 4
    expected = torch.cat([pooled, torch.zeros(2, 4, 3, 3)], dim=1)
    torch.testing.assert_close(block.shortcut(x), expected)


def _zero_second_conv(block: BasicBlock) -> BasicBlock:
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    return block


def test_post_activation_block_adds_then_applies_relu():
    # conv2 = 0: the residual branch is BN(0) = 0, so the block is relu(x) (He et al.'s order)
    x = torch.randn(2, 8, 5, 5)
    block = _zero_second_conv(BasicBlock(8, 8, 1, pre_activation=False))
    torch.testing.assert_close(block(x), torch.relu(x))


def test_pre_activation_block_keeps_the_identity_path_clean():
    # conv2 = 0: a pre-activation block passes x through untouched (no ReLU after the addition)
    x = torch.randn(2, 8, 5, 5)
    block = _zero_second_conv(BasicBlock(8, 8, 1, pre_activation=True))
    torch.testing.assert_close(block(x), x)


def test_resnet8_has_no_batch_norm_and_the_wrns_do():
    assert not any(isinstance(m, nn.BatchNorm2d) for m in create_model("resnet-8").modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in create_model("wrn-16", width=1).modules())


def test_vgg_like_dropout_is_a_model_arg_off_by_default():
    assert not any(isinstance(m, nn.Dropout) for m in create_model("vgg-like").modules())
    drops = [m.p for m in create_model("vgg-like", dropout=0.5).modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.5]
    drops = [m.p for m in create_model("wrn", depth=10, width=1, dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.3] * 3  # one per block


@pytest.mark.parametrize("name, args, message", [
    ("wrn", {"depth": 17}, "wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...); got 17"),
    ("wrn", {"depth": 4}, "wrn depth must be 6n+4 with n >= 1"),
    ("resnet", {"depth": 30}, "resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...); got 30"),
    ("wrn", {"width": 0}, "width (the widen factor k) must be a positive integer, got 0"),
    ("wrn-16", {"width": -2}, "width (the widen factor k) must be a positive integer, got -2"),
    ("vgg-like", {"dropout": 1.0}, "dropout must be in [0, 1)"),
    ("wrn-16-8", {"dropout": -0.1}, "dropout must be in [0, 1)"),
    ("resnet", {"depth": "deep"}, "model_args 'depth' of model 'resnet' must be"),
    ("resnet-32", {"depth": 56}, "unknown model_args 'depth' for model 'resnet-32'"),
])
def test_bad_model_args_are_explained(name, args, message):
    with pytest.raises(SparsetrainError, match=re.escape(message)):
        create_model(name, **args)


def test_simple_cnn_refuses_images_too_small_for_its_convolutions():
    with pytest.raises(SparsetrainError, match="at least 16x16 pixels, got 8x8"):
        create_model("simple-cnn", input_shape=(1, 8, 8))
    assert create_model("simple-cnn", input_shape=(1, 16, 16))(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name, args", [("alexnet-s", {}), ("wrn", {"depth": 10, "width": 2})])
def test_snip_prunes_convolutions_and_fc_layers_never_batch_norm(name, args):
    torch.manual_seed(0)
    model = create_model(name, input_shape=(3, 8, 8), **args)
    batch = (torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    mask = prune_at_init(model, "snip", sparsity=0.9, batches=batch, include_biases=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    expected = {f"{n}.{p}" for n, m in layers.items() for p in ("weight", "bias")}
    assert set(mask) == expected
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             for p in ("weight", "bias")}
    assert norms and not norms & set(mask)
    m = sum(model.get_parameter(n).numel() for n in expected)
    assert sum(int(v.sum()) for v in mask.values()) == round(0.1 * m)
