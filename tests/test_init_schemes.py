"""The init schemes against their published formulas, computed here: empirical std and limits on
big tensors, orthogonality, the delta-orthogonal kernel's norm preservation, the bias rule, the
parameter strings and their errors, seeds, the older names' exact draws, and a CLI run."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain import RunConfig
from sparsetrain.cli.main import main
from sparsetrain.errors import SparsetrainError
from sparsetrain.init import INITS, TABLE3_SCHEMES, describe_init, initialize_, list_inits, with_zero_bias
from sparsetrain.models import create_model
from sparsetrain.pipeline import validate


def truncated_unit_normal_std(bound: float = 2.0) -> float:
    """Std of N(0, 1) truncated to [-bound, bound], in closed form."""
    pdf = math.exp(-bound * bound / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(1 - 2 * bound * pdf / math.erf(bound / math.sqrt(2)))


C = truncated_unit_normal_std()  # 0.8796...
# One example string per scheme (the ones with a required parameter need it).
EXAMPLES = {"normal": "normal:std=0.1", "truncated-normal": "truncated-normal:std=0.1", "uniform": "uniform:limit=0.1"}


def example(name: str) -> str:
    return EXAMPLES.get(name, name)


def weight(scheme: str, out_features: int = 400, in_features: int = 800, seed: int = 0) -> torch.Tensor:
    layer = initialize_(nn.Linear(in_features, out_features), scheme, seed)
    return layer.weight.detach().double().flatten()


# --- the laws against their formulas -----------------------------------------------------------------
# A Linear(800 -> 400): fan-in 800, fan-out 400, fan-avg 600; 320,000 draws (std known to ~0.2%).
FAN = {"fan_in": 800, "fan_out": 400, "fan_avg": 600}
NORMAL_CASES = [  # scheme, std of the draw, truncated at (None: untruncated)
    ("lecun-normal", math.sqrt(1 / 800), None),
    ("glorot-normal", math.sqrt(2 / (800 + 400)), None),
    ("he-normal", math.sqrt(2 / 800), None),
    ("normal:std=0.07", 0.07, None),
    ("truncated-normal:std=0.05", 0.05 * C, 0.1),  # TF's truncated_normal: cut at 2 std, no correction
    ("variance-scaling:scale=2,mode=fan_out,distribution=normal", math.sqrt(2 / 400), None),
    ("variance-scaling:mode=fan_avg", math.sqrt(1 / 600), 2 * math.sqrt(1 / 600) / C),
    ("variance-scaling:scale=3,mode=fan_in,distribution=truncated_normal", math.sqrt(3 / 800),
     2 * math.sqrt(3 / 800) / C),
]


@pytest.mark.parametrize("scheme, std, cut", NORMAL_CASES)
def test_normal_laws_have_the_formula_std_and_cut(scheme, std, cut):
    w = weight(scheme)
    assert float(w.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(w.mean())) < 5 * std / math.sqrt(w.numel())
    if cut is None:  # untruncated: some draws beyond 3 std (P = 0.27%, ~860 of 320,000)
        assert float((w.abs() > 3 * std).double().mean()) == pytest.approx(0.0027, abs=0.0006)
    else:
        assert float(w.abs().max()) <= cut * (1 + 1e-6)
        assert float(w.abs().max()) > 0.99 * cut


UNIFORM_CASES = [  # scheme, limit
    ("lecun-uniform", math.sqrt(3 / 800)),
    ("glorot-uniform", math.sqrt(6 / (800 + 400))),
    ("he-uniform", math.sqrt(6 / 800)),
    ("uniform:limit=0.3", 0.3),
    ("variance-scaling:scale=2,mode=fan_in,distribution=uniform", math.sqrt(6 / 800)),
    ("variance-scaling:mode=fan_out,distribution=uniform", math.sqrt(3 / 400)),
]


@pytest.mark.parametrize("scheme, limit", UNIFORM_CASES)
def test_uniform_laws_have_the_formula_limit(scheme, limit):
    w = weight(scheme)
    assert float(w.abs().max()) <= limit and float(w.abs().max()) > 0.999 * limit
    assert float(w.std()) == pytest.approx(limit / math.sqrt(3), rel=0.01)


def test_conv_and_recurrent_fans_follow_torch():
    conv = initialize_(nn.Conv2d(16, 64, 3), "variance-scaling:mode=fan_out,distribution=normal", 0)
    assert float(conv.weight.detach().double().std()) == pytest.approx(math.sqrt(1 / (64 * 9)), rel=0.03)
    conv = initialize_(nn.Conv2d(16, 64, 3), "he-normal", 0)
    assert float(conv.weight.detach().double().std()) == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.03)
    lstm = initialize_(nn.LSTM(50, 200), "he-normal", 0)  # weight_ih (800, 50), weight_hh (800, 200)
    assert float(lstm.weight_ih_l0.detach().double().std()) == pytest.approx(math.sqrt(2 / 50), rel=0.03)
    assert float(lstm.weight_hh_l0.detach().double().std()) == pytest.approx(math.sqrt(2 / 200), rel=0.02)
    lstm = initialize_(nn.LSTM(50, 200), "glorot-uniform", 0)
    limit = math.sqrt(6 / (200 + 800))
    assert float(lstm.weight_hh_l0.detach().abs().max()) <= limit and float(lstm.weight_hh_l0.detach().abs().max()) > 0.99 * limit


# --- biases ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, std", [("he-normal", lambda n: math.sqrt(2 / n)),
                                         ("normal:std=0.2", lambda n: 0.2),
                                         ("variance-scaling:mode=fan_avg,distribution=normal", lambda n: math.sqrt(1 / n))])
def test_biases_are_drawn_from_the_weights_law_with_their_own_fan(scheme, std):
    layer = initialize_(nn.Linear(4, 20000), scheme, 0)  # a bias of n = 20,000 entries: fan-in = fan-out = n
    assert float(layer.bias.detach().double().std()) == pytest.approx(std(20000), rel=0.02)


@pytest.mark.parametrize("name", sorted(set(list_inits()) - {"default", "variance-scaling-zero-bias"}))
def test_zero_bias_for_every_scheme(name):
    scheme = with_zero_bias(example(name))
    model = initialize_(create_model("lstm-tiny"), scheme, 0)
    biases = [p for n, p in model.named_parameters() if "bias" in n.rpartition(".")[2]]
    assert biases and all(bool((b == 0).all()) for b in biases)
    if name != "zeros":
        assert float(model.rnn.weight_hh_l0.detach().abs().sum()) > 0


def test_with_zero_bias_forms():
    assert with_zero_bias("variance-scaling") == "variance-scaling-zero-bias"  # the recorded runs' name
    assert with_zero_bias("normal:std=0.1") == "normal:std=0.1,zero_bias=true"
    assert with_zero_bias("he-normal:zero_bias=false") == "he-normal:zero_bias=true"
    assert with_zero_bias("orthogonal:gain=2") == "orthogonal:gain=2"
    with pytest.raises(SparsetrainError, match="no zero-bias form"):
        with_zero_bias("default")


# --- orthogonal and delta-orthogonal -----------------------------------------------------------------

@pytest.mark.parametrize("out_features, in_features", [(64, 64), (32, 96), (96, 32)])
def test_orthogonal_matrices(out_features, in_features):
    layer = initialize_(nn.Linear(in_features, out_features), "orthogonal:gain=2", 0)
    w = layer.weight.detach().double() / 2
    small = min(out_features, in_features)
    gram = w @ w.T if out_features <= in_features else w.T @ w  # rows of a wide, columns of a tall matrix
    assert torch.allclose(gram, torch.eye(small, dtype=torch.float64), atol=1e-5)
    assert bool((layer.bias == 0).all())


def test_orthogonal_conv_kernel_as_out_by_in_k_k():
    conv = initialize_(nn.Conv2d(4, 8, 3), "orthogonal", 0)
    w = conv.weight.detach().double().reshape(8, 4 * 9)  # wide: orthonormal rows
    assert torch.allclose(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-5)


def test_delta_orthogonal_kernel_and_norm_preservation():
    model = initialize_(nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), nn.Conv1d(3, 5, 4), nn.Linear(7, 3)),
                        "delta-orthogonal", 0)
    conv, conv1d, linear = model
    w = conv.weight.detach().double()  # (16, 6, 3, 3)
    centre = w[:, :, 1, 1]
    outside = w.clone()
    outside[:, :, 1, 1] = 0
    assert bool((outside == 0).all()) and bool((conv.bias == 0).all())
    assert torch.allclose(centre.T @ centre, torch.eye(6, dtype=torch.float64), atol=1e-5)
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = conv(x)
    assert float(y.norm()) == pytest.approx(float(x.norm()), rel=1e-5)  # the point of it
    assert torch.allclose(y, F.conv2d(x, conv.weight, padding=1))
    w1 = conv1d.weight.detach().double()  # (5, 3, 4): even kernel, centre tap (4 - 1) // 2 = 1
    assert bool((w1[:, :, [0, 2, 3]] == 0).all())
    assert torch.allclose(w1[:, :, 1].T @ w1[:, :, 1], torch.eye(3, dtype=torch.float64), atol=1e-5)
    wl = linear.weight.detach().double()  # (3, 7): not a kernel, plain orthogonal (orthonormal rows)
    assert torch.allclose(wl @ wl.T, torch.eye(3, dtype=torch.float64), atol=1e-5)


def test_delta_orthogonal_with_fewer_outputs_than_inputs_has_orthonormal_rows():
    conv = initialize_(nn.Conv2d(8, 4, 3), "delta-orthogonal:gain=3", 0)
    centre = conv.weight.detach().double()[:, :, 1, 1] / 3  # (4, 8)
    assert torch.allclose(centre @ centre.T, torch.eye(4, dtype=torch.float64), atol=1e-5)


def test_zeros_and_normalisation_layers_keep_their_defaults():
    model = create_model("conv-tiny")
    with torch.no_grad():
        model[1].weight.fill_(5.0)
    for scheme in ("zeros", "orthogonal", "he-uniform", "delta-orthogonal"):
        model = initialize_(model, scheme, 0)
        assert torch.equal(model[1].weight, torch.ones(8)) and torch.equal(model[1].bias, torch.zeros(8))
    model = initialize_(model, "zeros", 0)
    others = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    assert others and all(bool((p == 0).all()) for p in others)


# --- every scheme on every kind of layer; seeds ------------------------------------------------------

@pytest.mark.parametrize("name", list_inits())
def test_every_scheme_on_the_tiny_models_same_seed_same_draw(name):
    for model_name in ("mlp-tiny", "conv-tiny", "lstm-tiny", "gru-tiny", "attention-tiny", "resnet-tiny"):
        def draw(seed, noise):
            torch.manual_seed(noise)  # the global RNG's state must not matter
            model = initialize_(create_model(model_name), example(name), seed)
            return {n: p.detach().clone() for n, p in model.named_parameters()}

        a, b, c = draw(3, 0), draw(3, 1), draw(4, 0)
        assert all(torch.equal(a[n], b[n]) for n in a), (name, model_name)
        assert all(bool(torch.isfinite(t).all()) for t in a.values())
        if name != "zeros":
            assert any(not torch.equal(a[n], c[n]) for n in a), (name, model_name)


def test_default_redraws_the_attention_input_projection_from_the_seed():
    # nn.MultiheadAttention has no reset_parameters; the projection used to keep the constructor's draw
    def in_proj(noise):
        torch.manual_seed(noise)
        model = initialize_(create_model("attention-tiny"), "default", seed=0)
        return model.encoder.self_attn.in_proj_weight.detach().clone()

    assert torch.equal(in_proj(1), in_proj(2))


# --- the older names draw exactly what they drew -----------------------------------------------------

def old_initialize(model: nn.Module, scheme: str, seed: int) -> nn.Module:
    """A copy of the three schemes as they were before the others were added."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

    def reset(model):
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def vs_(tensor):
        fan_in = tensor.shape[0] if tensor.dim() == 1 else math.prod(tensor.shape[1:])
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
        nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset(model)
        if scheme != "default":
            with torch.no_grad():
                for name, param in model.named_parameters():
                    owner, _, leaf = name.rpartition(".")
                    if isinstance(model.get_submodule(owner), norms):
                        continue
                    if "bias" in leaf:
                        param.zero_() if scheme == "variance-scaling-zero-bias" else vs_(param)
                    elif param.dim() >= 2:
                        vs_(param)
    return model


@pytest.mark.parametrize("scheme", ["default", "variance-scaling", "variance-scaling-zero-bias"])
def test_the_older_names_draw_exactly_what_they_drew(scheme):
    models = ["mlp-tiny", "conv-tiny", "lstm-tiny", "lenet-5-caffe"] + (["attention-tiny"] if scheme != "default" else [])
    for model_name in models:
        new = initialize_(create_model(model_name), scheme, seed=5)
        old = old_initialize(create_model(model_name), scheme, seed=5)
        for (n, p), (_, q) in zip(new.named_parameters(), old.named_parameters()):
            assert torch.equal(p, q), (scheme, model_name, n)


# --- the SNIP paper's Table 3 ------------------------------------------------------------------------

def test_table3_schemes():
    assert list(TABLE3_SCHEMES) == ["random normal", "truncated normal", "glorot", "he"]
    for scheme in TABLE3_SCHEMES.values():
        INITS.get(scheme)
    he = weight(TABLE3_SCHEMES["he"])  # TF1's he_normal: truncated, std sqrt(2 / fan-in) after correction
    assert float(he.std()) == pytest.approx(math.sqrt(2 / 800), rel=0.01)
    assert float(he.abs().max()) <= 2 * math.sqrt(2 / 800) / C * (1 + 1e-6)
    glorot = weight(TABLE3_SCHEMES["glorot"])
    assert float(glorot.std()) == pytest.approx(math.sqrt(2 / 1200), rel=0.01)


# --- parameter strings and their errors --------------------------------------------------------------

BAD = [
    ("variance-scalng", "'variance-scaling'"),
    ("xavier-uniform", "called 'glorot-uniform' here"),
    ("kaiming-normal", "called 'he-normal' here"),
    ("normal", "needs parameter std, e.g. normal:std="),
    ("normal:std=-1", "'std' must be a positive finite number; got -1"),
    ("normal:std=nan", "'std' must be a positive finite number"),
    ("normal:std=abc", "parameter 'std' of init scheme 'normal' must be a float, got 'abc'"),
    ("normal:sd=0.1", "unknown parameter 'sd' of init scheme 'normal'; valid parameters: std, zero_bias"),
    ("variance-scaling:mode=fan-in", "must be one of 'fan_in', 'fan_out', 'fan_avg', got 'fan-in'"),
    ("variance-scaling:distribution=gaussian", "one of 'truncated_normal', 'normal', 'uniform'"),
    ("variance-scaling:scale=0", "'scale' must be a positive finite number; got 0"),
    ("he-normal:", "nothing after ':'"),
    ("normal:std", "'std' is not key=value"),
    ("normal:std=0.1,std=0.2", "'std' is given twice"),
    ("he-normal:zero_bias=1", "'zero_bias' of init scheme 'he-normal' must be a bool"),
    ("default:std=1", "init scheme 'default' takes no parameters; got 'std'"),
    ("orthogonal:zero_bias=true", "valid parameters: gain"),
]


@pytest.mark.parametrize("scheme, message", BAD)
def test_bad_init_strings_are_refused_at_validation(scheme, message):
    for config in (RunConfig(model="mlp-tiny", dataset="synthetic", init=scheme),
                   RunConfig(model="mlp-tiny", dataset="synthetic").replace(prune={"reinit": scheme})):
        with pytest.raises(SparsetrainError) as info:
            validate(config)
        assert message in str(info.value)


def test_parameter_values_and_spacing():
    a = weight("variance-scaling:scale=2, mode = fan_in ,distribution=normal")
    b = weight("he-normal")
    assert torch.equal(a, b)
    assert torch.equal(weight("normal:std=1e-1"), weight("normal:std=0.1"))


def test_list_inits_shows_parameters_and_defaults(capsys):
    assert main(["list", "inits"]) == 0
    out = capsys.readouterr().out
    for name in list_inits():
        assert re.search(rf"^  {re.escape(name)}\s", out, re.M), name
    assert "parameter std (a float), required" in out
    assert "parameter mode (one of 'fan_in', 'fan_out', 'fan_avg') = 'fan_in'" in out
    assert describe_init("orthogonal")[1].startswith("gain (a float) = 1.0")


def test_run_with_init_and_reinit_end_to_end(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in list_inits():  # the choices come from the registry
        assert name in help_text
    argv = ["run", "--model", "mlp-tiny", "--dataset", "synthetic", "--no-progress", "--iterations", "20",
            "--val-every", "10", "--sparsity", "0.9", "--init", "he-normal", "--reinit", "glorot-uniform:zero_bias=true",
            "--store", str(tmp_path / "store")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert re.search(r"run [0-9a-f]{16} finished", out)
    assert main(argv[:-2] + ["--init", "normal:std=-1", "--store", str(tmp_path / "store2")]) == 2
    err = capsys.readouterr().err
    assert "'std' must be a positive finite number" in err and "Traceback" not in err
    assert not (tmp_path / "store2").exists()
