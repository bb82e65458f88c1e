"""``reproduce spp-init``, ``spp-jsv-sparsity`` and ``spp-sculpt`` (signal-propagation paper,
experiments 1, 2 and 6): end to end on tiny settings, each against an oracle computed here."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsetrain.cli.main import main
from sparsetrain.data import load_dataset, preprocess
from sparsetrain.init import initialize_
from sparsetrain.models import create_model
from sparsetrain.pruning import prune_at_init


def _cli(name, tmp_path, *extra):
    out = tmp_path / f"{name}.md"
    code = main(["reproduce", name, "--store", str(tmp_path / "s"), "--out", str(out), "--seeds", "0", *extra])
    return code, out


@pytest.mark.parametrize("name", ["spp-init", "spp-jsv-sparsity", "spp-sculpt"])
def test_refuses_iterations_and_unknown_rows_with_exit_2(name, tmp_path, capsys):
    code, out = _cli(name, tmp_path, "--iterations", "5")
    assert code == 2 and "trains nothing" in capsys.readouterr().err
    code, out = _cli(name, tmp_path, "--rows", "resnet-9000")
    assert code == 2 and "rows are networks" in capsys.readouterr().err
    assert not out.exists()


def _mnist_batch(root, seed=0, n=100):
    raw = load_dataset("mnist", str(root))
    train_x, test_x, _, _ = preprocess(raw)
    idx = torch.randperm(len(raw.train_y), generator=torch.Generator().manual_seed(seed))[:n]
    return (train_x[idx], raw.train_y[idx]), test_x


def test_spp_init_kept_fraction_per_layer_matches_the_mask(mnist_root, tmp_path, monkeypatch):
    from sparsetrain.experiments import spp_init

    monkeypatch.setattr(spp_init, "INITS", ("normal:std=0.001",))
    code, out = _cli("spp-init", tmp_path, "--rows", "mlp-7-tanh", "--data-dir", str(mnist_root))
    assert code == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and "![kept per layer](spp-init.png)" in out.read_text()
    batch, _ = _mnist_batch(mnist_root)
    model = initialize_(create_model("mlp-7", input_shape=(1, 28, 28), num_classes=10, activation="tanh"),
                        "normal:std=0.001", 0)
    mask = prune_at_init(model, "snip", sparsity=0.9, batches=batch)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    expected = [mask[f"{n}.weight"].sum().item() / mask[f"{n}.weight"].numel() for n in linears]
    assert data["kept"]["mlp-7-tanh"]["normal:std=0.001"] == pytest.approx(expected)
    # the paper's point, on a tiny init: the signal vanishes, so the first layers are emptied
    assert expected[0] < 0.01 and expected[-1] > 0.5


def test_spp_jsv_at_sparsity_0_are_the_weight_products_singular_values(mnist_root, tmp_path, monkeypatch):
    from sparsetrain.experiments import spp_sparsity

    monkeypatch.setattr(spp_sparsity, "SPARSITIES", (0.0, 0.9))
    monkeypatch.setattr(spp_sparsity, "EXAMPLES", 4)
    code, out = _cli("spp-jsv-sparsity", tmp_path, "--rows", "mlp-7-linear", "--data-dir", str(mnist_root))
    assert code == 0
    jsv = json.loads(out.with_suffix(".json").read_text())["jsv"]["mlp-7-linear"]
    model = initialize_(create_model("mlp-7", input_shape=(1, 28, 28), num_classes=10, activation="linear"),
                        "variance-scaling", 0)
    product = torch.eye(784, dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            product = m.weight.detach().double() @ product
    sv = torch.linalg.svdvals(product)  # a linear network: the same Jacobian for every example
    assert jsv["0.0"]["count"] == 4 * 10
    assert jsv["0.0"]["mean"] == pytest.approx(float(sv.mean()), rel=1e-4)
    assert jsv["0.0"]["max"] == pytest.approx(float(sv.max()), rel=1e-4)
    assert jsv["0.0"]["min"] == pytest.approx(float(sv.min()), rel=1e-4)
    assert jsv["0.9"]["mean"] < jsv["0.0"]["mean"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_surviving_units_counted_by_hand():
    from sparsetrain.experiments.spp_init import surviving_units

    conv1, conv2, fc1, fc2 = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 2, 3), nn.Linear(2 * 4, 5), nn.Linear(5, 2)
    layers = [("c1.weight", conv1), ("c2.weight", conv2), ("f1.weight", fc1), ("f2.weight", fc2)]
    mask = {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in layers}
    mask["c1.weight"][0, 0, 1, 1] = mask["c1.weight"][2, 0, 0, 0] = True  # channels 0, 2 have inputs
    mask["c2.weight"][1, 2, 0, 0] = True  # only channel 2 feeds on; c2's channel 1 has an input
    mask["f1.weight"][3, 4 + 2] = True  # column 6 = channel 1 (4 positions per channel); unit 3
    mask["f1.weight"][4, 0] = True  # unit 4 reads channel 0, but has no outgoing weight
    mask["f2.weight"][:, 3] = True
    assert surviving_units(mask, layers) == [1, 1, 1]


def test_spp_sculpt_widths_match_a_count_by_hand(mnist_root, tmp_path, monkeypatch):
    from sparsetrain.experiments import spp_init

    monkeypatch.setattr(spp_init, "SCULPT_SPARSITIES", (0.99,))
    code, out = _cli("spp-sculpt", tmp_path, "--rows", "mlp-7-tanh", "--data-dir", str(mnist_root))
    assert code == 0
    widths = json.loads(out.with_suffix(".json").read_text())["widths"]["mlp-7-tanh"]
    batch, _ = _mnist_batch(mnist_root)
    model = initialize_(create_model("mlp-7", input_shape=(1, 28, 28), num_classes=10, activation="tanh"),
                        "variance-scaling", 0)
    mask = prune_at_init(model, "snip", sparsity=0.99, batches=batch)
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    expected = []
    for a, b in zip(names, names[1:]):
        expected.append(sum(1 for j in range(mask[a].shape[0]) if mask[a][j].any() and mask[b][:, j].any()))
    assert widths == {"dense": [100] * 6, "99%": expected}
    assert min(expected) < 100  # at 99% some units lose every connection
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_spp_isometry_tiny_run_reports_curves_and_jsv_stages(mnist_root, tmp_path, monkeypatch):
    from sparsetrain.experiments import spp_isometry
    from sparsetrain.store import RunStore

    monkeypatch.setattr(spp_isometry, "JSV_EXAMPLES", 5)
    code, out = _cli("spp-isometry", tmp_path, "--rows", "mlp-7-linear", "--iterations", "50",
                     "--data-dir", str(mnist_root))
    assert code == 0
    data = json.loads(out.with_suffix(".json").read_text())
    plain, iso = data["rows"]["spp-isometry-mlp-7-linear-plain"], data["rows"]["spp-isometry-mlp-7-linear-iso"]
    for row in (plain, iso):  # the reported end loss is the store's last logged training loss
        (key,) = row["keys"]
        logged = RunStore(tmp_path / "s").metrics(key)["train_loss"]
        assert row["train_loss_end"] == [logged[-1][1]]
    jsv = plain["jsv"]
    # SNIP at 90% shrinks a linear MLP-7's JSV by orders of magnitude; isometry brings it back near 1
    assert jsv["after pruning"]["mean"] < 0.1 * jsv["before pruning"]["mean"]
    assert 0.5 < jsv["after isometry"]["mean"] < 2
    assert "shortened" in out.read_text().splitlines()[0]
    assert out.with_name("spp-isometry_mlp-7-linear.png").read_bytes()[:4] == b"\x89PNG"
