"""`sparsetrain signal`: Jacobian singular values before pruning, after pruning and after
approximate isometry, checked on a linear network against the singular values of the product of
its (masked) weight matrices, computed here by hand."""

from __future__ import annotations

import json

import pytest
import torch

from sparsetrain import RunConfig
from sparsetrain.cli.main import main
from sparsetrain.pipeline import build, find_mask, init_under_mask
from sparsetrain.signal.stages import STAGES, signal_stages

CONFIG = RunConfig(model="mlp-3", dataset="synthetic", model_args={"activation": "linear", "width": 20},
                   init="variance-scaling", seed=1).replace(
    prune={"method": "snip", "sparsity": 0.5, "reinit": "variance-scaling-zero-bias"})


def _product(model) -> torch.Tensor:
    j = None
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            j = layer.weight.detach() if j is None else layer.weight.detach() @ j
    return j.double()


def test_stages_of_a_linear_network_are_the_svd_of_its_weight_product():
    report = signal_stages(CONFIG, examples=3, layer_examples=2)
    assert list(report.input_output) == list(STAGES) and report.sparsity == pytest.approx(0.5, abs=1e-3)
    built = build(CONFIG.replace(prune={"isometry": False}))
    before = torch.linalg.svdvals(_product(built.model))
    mask = find_mask(CONFIG, built)
    model, _ = init_under_mask(CONFIG, built, mask)
    for name, m in mask.items():  # the weights that train are masked
        assert not dict(model.named_parameters())[name].detach()[~m].any()
    after = torch.linalg.svdvals(_product(model))
    for stage, expected in ((STAGES[0], before), (STAGES[1], after)):
        got = report.input_output[stage].values.reshape(3, -1)  # 3 examples, the same J each (linear)
        for row in got:
            torch.testing.assert_close(row.sort(descending=True).values, expected, rtol=1e-4, atol=1e-6)
    # isometry: every layer's kept matrix nearer an isometry, so the product's values nearer 1
    iso = report.input_output[STAGES[2]]
    assert abs(iso.mean - 1) < abs(report.input_output[STAGES[1]].mean - 1)
    assert report.isometry.penalty_after < report.isometry.penalty_before
    assert len(report.layerwise[STAGES[1]]) == 3  # the three Linear layers


def test_signal_command_prints_and_writes(tmp_path, capsys):
    out = tmp_path / "sig"
    assert main(["signal", "--model", "mlp-3", "--dataset", "synthetic", "--model-arg", "width=20",
                 "--sparsity", "0.5", "--examples", "4", "--layer-examples", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| before pruning |" in text and "| after isometry |" in text and "Approximate isometry" in text
    data = json.loads((out / "signal.json").read_text())
    assert set(data["input_output"]) == set(STAGES)
    hist = data["input_output"]["after pruning"]["histogram"]
    assert sum(hist["counts"]) == data["input_output"]["after pruning"]["count"] == 4 * 10
    assert (out / "signal.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "signal.md").read_text().startswith("# Signal propagation: mlp-3")


def test_signal_refuses_a_file_as_out_and_bad_counts(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    assert main(["signal", "--model", "mlp-3", "--dataset", "synthetic", "--out", str(f)]) == 2
    assert "is a file; name a folder" in capsys.readouterr().err
    assert main(["signal", "--model", "mlp-3", "--dataset", "synthetic", "--examples", "0"]) == 2
    assert "examples and layer_examples must be >= 1" in capsys.readouterr().err
