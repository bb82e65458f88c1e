"""Signal propagation's MLPs (spp-public): depth counts weight layers, width 100, the activation
a typed model argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsetrain.errors import SparsetrainError
from sparsetrain.models import create_model


def expected_count(depth: int, width: int = 100, inputs: int = 784, classes: int = 10) -> int:
    """784*w + w, then (depth - 2) layers of w*w + w, then w*10 + 10."""
    return (inputs * width + width) + (depth - 2) * (width * width + width) + (width * classes + classes)


@pytest.mark.parametrize("depth", [3, 5, 7])
def test_counts_and_layers_follow_spp_publics_depth(depth):
    model = create_model(f"mlp-{depth}")
    assert sum(p.numel() for p in model.parameters()) == expected_count(depth)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == depth  # spp-public: w1 .. w<depth>
    sizes = [(fc.in_features, fc.out_features) for fc in linears]
    assert sizes == [(784, 100)] + [(100, 100)] * (depth - 2) + [(100, 10)]
    assert sum(p.numel() for p in create_model(f"mlp-{depth}", width=30).parameters()) == expected_count(depth, 30)


def test_counts_written_out():
    assert [sum(p.numel() for p in create_model(n).parameters()) for n in ("mlp-3", "mlp-5", "mlp-7")] == [
        89_610, 109_810, 130_010]


def test_linear_by_default_is_the_product_of_the_affine_maps():
    # Oracle: with the linear activation (spp-public's default MLP-7-linear) the network is
    # x -> W7(...(W1 x + b1)...) + b7, computed here layer by layer without the model's forward.
    torch.manual_seed(0)
    model = create_model("mlp-5")
    x = torch.randn(3, 1, 28, 28)
    h = x.flatten(1)
    for fc in [m for m in model.modules() if isinstance(m, nn.Linear)]:
        h = h @ fc.weight.T + fc.bias
    torch.testing.assert_close(model(x), h)


@pytest.mark.parametrize("activation, kind, fn", [("tanh", nn.Tanh, torch.tanh), ("relu", nn.ReLU, torch.relu)])
def test_the_activation_follows_every_layer_but_the_last(activation, kind, fn):
    model = create_model("mlp-3", activation=activation)
    assert [type(m) for m in model.children()] == [nn.Flatten, nn.Linear, kind, nn.Linear, kind, nn.Linear]
    x = torch.randn(2, 1, 28, 28)
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    h = x.flatten(1)
    for i, fc in enumerate(fcs):
        h = h @ fc.weight.T + fc.bias
        h = fn(h) if i < len(fcs) - 1 else h
    torch.testing.assert_close(model(x), h)


def test_an_unknown_activation_or_size_is_refused():
    wrong = "model_args 'activation' of model 'mlp-7' must be one of 'linear', 'tanh', 'relu'"
    with pytest.raises(SparsetrainError, match=wrong):
        create_model("mlp-7", activation="sigmoid")
    with pytest.raises(SparsetrainError, match="width >= 1"):
        create_model("mlp-3", width=0)
