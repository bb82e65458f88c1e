"""Initialization schemes, checked against the truncated-normal distribution computed here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sparsetrain.errors import SparsetrainError
from sparsetrain.init import initialize_, list_inits
from sparsetrain.models import create_model


def truncated_unit_normal_std(bound: float = 2.0) -> float:
    """Std of N(0, 1) truncated to [-bound, bound] (closed form), independent of the library."""
    pdf = math.exp(-bound * bound / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(bound / math.sqrt(2))  # Phi(b) - Phi(-b)
    return math.sqrt(1 - 2 * bound * pdf / mass)


CORRECTION = truncated_unit_normal_std()  # 0.87962566...


def test_correction_constant():
    assert CORRECTION == pytest.approx(0.8796256610342398, abs=1e-12)


def test_list_inits():
    assert {"default", "variance-scaling", "variance-scaling-zero-bias"} <= set(list_inits())


@pytest.fixture(scope="module")
def big_linear() -> nn.Linear:
    return initialize_(nn.Linear(1000, 1000), "variance-scaling", seed=0)


def test_variance_scaling_linear_weight_distribution(big_linear):
    w = big_linear.weight.detach().double().flatten()
    target = math.sqrt(1 / 1000)  # fan-in mode, scale 1
    assert float(w.std()) == pytest.approx(target, rel=0.01)
    assert abs(float(w.mean())) < 3 * target / 1000
    bound = 2 * target / CORRECTION  # truncated at two standard deviations of the untruncated normal
    assert float(w.abs().max()) <= bound * (1 + 1e-6)
    assert float(w.abs().max()) > 0.99 * bound  # truncated there, not narrower
    # Shape of the truncated normal: P(|z| > 1 | |z| <= 2) = (erf(2/v2) - erf(1/v2)) / erf(2/v2)
    beyond_one_sigma = float((w.abs() > target / CORRECTION).double().mean())
    expected = (math.erf(2 / math.sqrt(2)) - math.erf(1 / math.sqrt(2))) / math.erf(2 / math.sqrt(2))
    assert beyond_one_sigma == pytest.approx(expected, abs=0.005)


def test_variance_scaling_draws_biases_with_their_own_fan_in(big_linear):
    b = big_linear.bias.detach().double()
    assert float(b.std()) == pytest.approx(math.sqrt(1 / 1000), rel=0.1)  # a bias of n entries: fan-in n
    assert float(b.abs().max()) <= 2 * math.sqrt(1 / 1000) / CORRECTION * (1 + 1e-6)


def test_variance_scaling_conv_fan_in_is_in_channels_times_kernel():
    conv = initialize_(nn.Conv2d(64, 128, 3), "variance-scaling", seed=1)
    fan_in = 64 * 3 * 3
    w = conv.weight.detach().double()
    assert float(w.std()) == pytest.approx(math.sqrt(1 / fan_in), rel=0.02)
    assert float(w.abs().max()) <= 2 * math.sqrt(1 / fan_in) / CORRECTION * (1 + 1e-6)


def test_zero_bias_variant_zeroes_every_bias_and_keeps_weight_law():
    model = initialize_(create_model("lenet-300-100"), "variance-scaling-zero-bias", seed=0)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert len(biases) == 3 and all(bool((b == 0).all()) for b in biases)
    first = model[1].weight.detach().double()
    assert float(first.std()) == pytest.approx(math.sqrt(1 / 784), rel=0.01)


def test_zero_bias_covers_recurrent_and_attention_biases():
    for name in ("lstm-tiny", "attention-tiny"):
        model = initialize_(create_model(name), "variance-scaling-zero-bias", seed=0)
        biases = {n: p for n, p in model.named_parameters() if "bias" in n.rpartition(".")[2]}
        assert biases, name
        norm_biases = {f"{n}.bias" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
        for n, p in biases.items():
            if n not in norm_biases:
                assert bool((p == 0).all()), n
    lstm = initialize_(create_model("lstm-tiny"), "variance-scaling", seed=0)
    w_ih = lstm.rnn.weight_ih_l0.detach().double()  # (4 * hidden, 28): fan-in 28
    assert float(w_ih.std()) == pytest.approx(math.sqrt(1 / 28), rel=0.05)


@pytest.mark.parametrize("scheme", ["default", "variance-scaling", "variance-scaling-zero-bias"])
def test_normalisation_layers_keep_their_defaults(scheme):
    model = create_model("conv-tiny")
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():
        bn.weight.fill_(5.0)
        bn.bias.fill_(3.0)
    initialize_(model, scheme, seed=0)
    assert torch.equal(bn.weight, torch.ones(8))
    assert torch.equal(bn.bias, torch.zeros(8))
    model = initialize_(create_model("attention-tiny"), scheme, seed=0)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))


@pytest.mark.parametrize("scheme", ["default", "variance-scaling", "variance-scaling-zero-bias"])
def test_same_seed_same_weights_other_seed_other_weights(scheme):
    def draw(seed):
        model = initialize_(create_model("mlp-tiny"), scheme, seed)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    a, b, c = draw(3), draw(3), draw(4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])


def test_initialize_leaves_global_rng_alone():
    model = create_model("mlp-tiny")  # building it draws from the global RNG; initialize_ must not
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    initialize_(model, "variance-scaling", seed=7)
    assert torch.equal(torch.rand(5), expected)


def test_initialize_redraws_every_parameter_in_place():
    model = create_model("mlp-tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    assert initialize_(model, "variance-scaling", seed=11) is model
    for n, p in model.named_parameters():
        assert id(p) == ids[n]
        assert not torch.equal(p, before[n]), n


def test_unknown_scheme():
    with pytest.raises(SparsetrainError) as info:
        initialize_(create_model("mlp-tiny"), "variance-scalin", seed=0)
    assert "'variance-scaling'" in str(info.value)
