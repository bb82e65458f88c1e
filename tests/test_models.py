"""Models by name: shapes, the LeNets of the SNIP paper, unknown names."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsetrain.errors import SparsetrainError
from sparsetrain.models import check_model_args, create_model, default_input_shape, list_models

ALL_MODELS = list_models()


def test_registry_holds_the_paper_models_and_the_tiny_families():
    expected = {"lenet-300-100", "lenet-5-caffe", "mlp-tiny", "conv-tiny", "resnet-tiny",
                "lstm-tiny", "gru-tiny", "attention-tiny"}
    assert expected <= set(ALL_MODELS)
    assert list_models("lenet*") == ["lenet-300-100", "lenet-5-caffe"]


# Forward and backward at each model's own default shape: tests/test_models_registry.py.


@pytest.mark.parametrize("name", ALL_MODELS)
def test_other_input_shape_and_class_count(name):
    # LeNet-5-Caffe's and simple-cnn's two 5x5 convolutions and two poolings need inputs of at least 16x16.
    shape = (3, 32, 32) if name in ("lenet-5-caffe", "simple-cnn") else (3, 8, 8)
    if len(default_input_shape(name)) == 2:  # sequences: 8 steps of 6 features
        shape = (8, 6)
    model = create_model(name, input_shape=shape, num_classes=5)
    assert model(torch.randn(2, *shape)).shape == (2, 5)


def test_lenet5_caffe_rejects_inputs_too_small_for_its_convolutions():
    # 8x8 -> conv 4x4 -> pool 2x2 -> conv 5x5 cannot work. It must not pass silently.
    with pytest.raises((SparsetrainError, RuntimeError)):
        create_model("lenet-5-caffe", input_shape=(3, 8, 8), num_classes=5)(torch.randn(2, 3, 8, 8))


def test_lenet5_caffe_too_small_input_is_refused_at_construction():
    with pytest.raises(SparsetrainError):
        create_model("lenet-5-caffe", input_shape=(3, 8, 8), num_classes=5)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet_300_100_matches_the_paper():
    model = create_model("lenet-300-100")
    assert n_params(model) == 266_610  # 784*300+300 + 300*100+100 + 100*10+10 (paper: 267k)
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")]
    assert shapes == [(300, 784), (100, 300), (10, 100)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2


def test_lenet_5_caffe_matches_the_paper_and_snip_public():
    model = create_model("lenet-5-caffe")
    assert n_params(model) == 431_080  # paper: 431k
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)), (20, 50, (5, 5))]
    assert [(fc.in_features, fc.out_features) for fc in linears] == [(800, 500), (500, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2

    # snip-public: no nonlinearity after the convolutions; the only ReLU follows fc 500.
    layers = list(model.children())
    flatten_at = next(i for i, m in enumerate(layers) if isinstance(m, nn.Flatten))
    assert not any(isinstance(m, (nn.ReLU, nn.Tanh, nn.Sigmoid)) for m in layers[:flatten_at])
    relus = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 and layers[relus[0] - 1] is linears[0]

    # the feature map reaching the Flatten is 50 x 4 x 4 for a 28x28 input
    features = nn.Sequential(*layers[:flatten_at])(torch.randn(1, 1, 28, 28))
    assert features.shape == (1, 50, 4, 4)


def test_lenet_5_caffe_convolutions_are_linear():
    # With no nonlinearity before fc 500, the map input -> flattened features is affine:
    # f(a + b) - f(0) == (f(a) - f(0)) + (f(b) - f(0)).
    torch.manual_seed(0)
    layers = list(create_model("lenet-5-caffe").children())
    conv1, conv2 = layers[0], layers[2]
    f = nn.Sequential(conv1, conv2)  # without the max-pools, which are not linear
    a, b, zero = torch.randn(1, 1, 28, 28), torch.randn(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(f(a + b) - f(zero), (f(a) - f(zero)) + (f(b) - f(zero)), atol=1e-4, rtol=1e-4)


def test_unknown_model_names_close_matches():
    with pytest.raises(SparsetrainError) as info:
        create_model("lenet-300")
    message = str(info.value)
    assert "'lenet-300-100'" in message and "lenet-300" in message
    assert "Did you mean" in message


def test_unknown_model_without_close_match_lists_known_models():
    with pytest.raises(SparsetrainError) as info:
        create_model("zzzzzzzz")
    assert "Did you mean" not in str(info.value)
    assert all(name in str(info.value) for name in ALL_MODELS)


@pytest.mark.parametrize("name", ["lstm-tiny", "gru-tiny", "attention-tiny"])
def test_sequence_models_refuse_images_and_say_how_to_fix_it(name):
    with pytest.raises(SparsetrainError, match="view = 'rows'"):
        create_model(name, input_shape=(1, 28, 28))


def test_model_args_change_the_model_and_are_checked():
    assert create_model("mlp-tiny", hidden=7)[1].out_features == 7
    assert create_model("lstm-tiny", hidden=5).rnn.hidden_size == 5
    with pytest.raises(SparsetrainError, match="unknown model_args 'depth'.*valid: hidden"):
        create_model("mlp-tiny", depth=3)
    with pytest.raises(SparsetrainError, match="takes no arguments"):
        check_model_args("lenet-300-100", {"width": 2})
    with pytest.raises(SparsetrainError, match="model_args 'hidden' of model 'mlp-tiny' must be an int"):
        check_model_args("mlp-tiny", {"hidden": "wide"})
