"""Paper experiments: their configs are what they claim, and their tables come out right.

The real experiments take hours; here they run for a handful of iterations, or not at all
(tables are written from fake records).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

from sparsetrain.recipes import recipe_path
from sparsetrain.cli.main import main
from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.experiments import EXPERIMENTS
from sparsetrain.measure import Provenance
from sparsetrain.run import run
from sparsetrain.experiments import structured_cost as sc
from sparsetrain.models import create_model
from sparsetrain.pruning.structured import parse_structure, structured_sparsity
from sparsetrain.run import validate
from sparsetrain.store import RunStore

# --- structured-cost: configs -----------------------------------------------------------------

# every training setting the rows may change: the length and what moves with it, plus the
# network's stated shared changes (NETWORKS[...].train)
LENGTH_SETTINGS = {"iterations", "epochs", "decay_every", "val_every", "test_every"}


def test_structured_cost_is_a_reproduce_experiment():
    assert EXPERIMENTS.get("structured-cost") is sc.reproduce_structured_cost


@pytest.mark.parametrize("row_name", list(sc.ROWS))
def test_each_row_is_its_recipe_with_the_rows_mask(row_name):
    row, config = sc.ROWS[row_name], sc.row_config(row_name, seed=3)
    net = sc.NETWORKS[row.network]
    recipe = RunConfig.from_toml(recipe_path(net.dense_recipe if row.shape == "dense" else net.snip_recipe))
    assert config.model == net.model and config.seed == 3 and config.dataset == net.dataset
    # pruning: the recipe's settings (init, biases, re-draw, batches), the row's shape and sparsity
    assert config.init == recipe.init
    assert dataclasses.replace(config.prune, structure="", sparsity=0.0, scope="global") == \
        dataclasses.replace(recipe.prune, structure="", sparsity=0.0, scope="global")
    assert config.prune.structure == ("" if row.shape in ("dense", "unstructured") else row.shape)
    assert config.prune.scope == row.scope
    if row.shape == "dense":
        assert config.prune.method == "dense"
    else:
        assert config.prune.method == "snip" and config.prune.include_biases and config.prune.reinit
        assert config.prune.sparsity == row.sparsity
    # training: the recipe's, except the length (and what scales with it) and the stated changes
    changed = {k for k in dataclasses.asdict(recipe.train)
               if getattr(config.train, k) != getattr(recipe.train, k)}
    assert changed <= LENGTH_SETTINGS | set(net.train)
    assert all(getattr(config.train, k) == v for k, v in net.train.items())
    assert config.train.iterations == net.iterations and config.train.epochs == 0
    if config.dataset != sc.SYNTHETIC:
        validate(config)  # the recorded rows go through sparsetrain.run


def test_structured_rows_match_their_unstructured_baselines():
    for name, row in sc.ROWS.items():
        if row.baseline is None:
            assert row.shape in ("dense", "unstructured")
            continue
        base = sc.ROWS[row.baseline]
        assert base.network == row.network and base.shape == "unstructured" and base.scope == "global"
        assert base.sparsity == row.sparsity  # matched sparsity
        layout = parse_structure(row.shape)
        assert layout is not None
        assert structured_sparsity(layout, row.sparsity) == pytest.approx(row.sparsity)
        mine, theirs = sc.row_config(name, 0), sc.row_config(row.baseline, 0)
        assert mine.train == theirs.train  # only the mask differs
        assert dataclasses.replace(mine.prune, structure="", scope="global") == theirs.prune


def test_the_rows_cover_the_issue():
    shapes = {(r.network, r.shape, r.sparsity) for n, r in sc.ROWS.items() if n in sc.DEFAULT_ROWS}
    for net in ("lenet300", "lenet5", "vgg"):
        wanted = {(net, "dense", 0.0), (net, "unstructured", 0.5), (net, "2:4", 0.5), (net, "unstructured", 0.9)}
        assert wanted <= shapes
        assert any(s[0] == net and s[1].startswith("block") and s[2] == 0.9 for s in shapes)
    assert ("lenet300", "block32x32", 0.9) in shapes and ("lenet5", "block8x8", 0.9) in shapes


def test_all_rows_of_a_network_train_alike():
    for net in sc.NETWORKS:
        trains = {sc.row_config(n, 0).train for n, r in sc.ROWS.items() if r.network == net}
        assert len(trains) == 1, net


def test_shortened_recipe_keeps_its_schedule_shape():
    full = RunConfig.from_toml(recipe_path("snip-table1-lenet300-95")).train  # 60k, x0.1 every 25k
    t = sc.row_config("lenet300-snip50", 0).train
    assert t.iterations == 10_000 and t.decay_every == round(25_000 * 10_000 / 60_000)
    assert t.val_every == full.val_every == 1000 and t.lr == full.lr == 0.1
    short = sc.row_config("lenet5-2:4", 0, iterations=20).train
    assert short.iterations == 20 and short.decay_every == round(25_000 * 20 / 30_000) and short.val_every == 5
    assert short.lr == 0.01  # LeNet-5-Caffe's shared lr (its dense recipe's); stated in the table


def test_configs_for_seeds_order_and_identity():
    configs = sc.configs_for(list(sc.ROWS), [0, 1], iterations=None)
    assert len(configs) == 2 * len(sc.ROWS)
    assert len({c.key() for c in configs}) == len(configs)
    models = [c.model for c in configs]
    assert models[: models.count("lenet-5-caffe")] == ["lenet-5-caffe"] * models.count("lenet-5-caffe")
    assert {sc.row_of(c) for c in configs} == set(sc.ROWS)
    assert {c.train.iterations for c in sc.configs_for(["lenet300-dense", "vgg-2:4"], [0], 7)} == {7}


@pytest.mark.parametrize("rows, seeds, iterations", [(["nosuch"], [0], None), (["vgg-dense"], [], None),
                                                     (["vgg-dense"], [0], 0)])
def test_configs_for_refuses_bad_input(rows, seeds, iterations):
    with pytest.raises(SparsetrainError):
        sc.configs_for(rows, seeds, iterations)


def test_left_dense_says_which_layers_cannot_take_the_structure():
    assert sc.left_dense((20, 1, 5, 5), "2:4") == "rows of 25, not a multiple of 4"
    assert sc.left_dense((50, 20, 5, 5), "2:4") is None
    assert sc.left_dense((300,), "block32x32").startswith("1-D")
    assert sc.left_dense((20, 1, 5, 5), "block32x32") is None  # one (edge) tile, but a tile
    assert sc.left_dense((20, 1, 5, 5), "unstructured") is None
    assert sc.view_2d((50, 20, 5, 5)) == "50x500"


# --- structured-cost: the table ---------------------------------------------------------------

def fake_outcomes(configs):
    """Final error 1% + 0.5% per structured row + 0.1% per seed; best-val 0.2% lower."""
    outcomes = {}
    for c in configs:
        row = sc.ROWS[sc.row_of(c)]
        error = 0.01 + (0.005 if row.baseline else 0.0) + 0.001 * c.seed
        layers = {"1.weight": {"shape": [300, 784], "kept": 0 if row.shape == "block32x32" else 10,
                               "total": 235200, "sparsity": 1.0 if row.shape == "block32x32" else 0.9},
                  "1.bias": {"shape": [300], "kept": 300, "total": 300, "sparsity": 0.0}}
        outcomes[c.key()] = {
            "results": {"test_error_final": error, "test_error_best_val": error - 0.002,
                        "sparsity": row.sparsity, "test_error_min_over_checks": None},
            "layers": layers,
        }
    return outcomes


def test_table_has_the_promised_columns_and_paired_deltas(tmp_path):
    rows = ["lenet300-dense", "lenet300-snip50", "lenet300-2:4", "lenet300-snip90", "lenet300-block32x32"]
    configs = sc.configs_for(rows, [0, 1], None)
    out = tmp_path / "t.md"
    provenance = Provenance.now(["sparsetrain", "reproduce", "structured-cost"])
    text = sc.write_table(rows, configs, fake_outcomes(configs), out, 90.0, provenance)
    assert out.read_text() == text
    header = next(line for line in text.splitlines() if line.startswith("| network |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["network", "data", "mask shape", "sparsity: target / achieved", "iterations", "seeds",
                       "final", "best val", "Δ final vs unstructured", "Δ best val vs unstructured"]
    table = {line.split("|")[3].strip() + " " + line.split("|")[4].strip().split()[0]: line
             for line in text.splitlines() if line.startswith("| LeNet-300-100 |")}
    assert len(table) == 5
    assert "| 10,000 | 2 | 1.05 ± 0.07 | 0.85 ± 0.07 | (reference) |" in table["dense 0%"]
    assert "(baseline)" in table["unstructured 50%"]
    # 1.5% + 0.1% per seed against 1% + 0.1% per seed: +0.50 pp on each seed, so no spread
    assert "| 1.55 ± 0.07 | 1.35 ± 0.07 | +0.50 ± 0.00 | +0.50 ± 0.00 |" in table["2:4 (N:M) 50%"]
    assert "50% / 50.00%" in table["2:4 (N:M) 50%"]
    assert "+0.50" in table["block 32x32 90%"]
    assert "Removed entirely" in text and "`1.weight` under block 32x32 90%" in text
    assert "Command: `sparsetrain reproduce structured-cost`" in text and "Machine: " in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["provenance"]["command"] == "sparsetrain reproduce structured-cost"
    entry = data["rows"]["lenet300-2:4"]
    assert entry["shape"] == "2:4" and entry["baseline"] == "lenet300-snip50" and entry["iterations"] == 10_000
    assert [r["seed"] for r in entry["runs"]] == [0, 1]
    assert entry["runs"][0]["test_error_final"] == pytest.approx(0.015)


def test_table_with_missing_runs_and_baselines(tmp_path):
    rows = ["lenet5-block8x8", "vgg-2:4"]  # their baselines not run
    configs = sc.configs_for(rows, [0], 20)
    outcomes = fake_outcomes([c for c in configs if c.model == "vgg-cifar-small"])
    text = sc.write_table(rows, configs, outcomes, tmp_path / "t.md", 1.0, None)
    lenet5 = next(line for line in text.splitlines() if line.startswith("| LeNet-5-Caffe |"))
    assert "| 20 | 0 | - | - | - | - |" in lenet5
    vgg = next(line for line in text.splitlines() if line.startswith("| VGG"))
    assert "synthetic 3x32x32 (not CIFAR-10)" in vgg and "| 20 | 1 | 1.50 | 1.30 | - | - |" in vgg
    assert "not** what the structures cost on CIFAR-10" in text


def test_paired_delta_pairs_seeds():
    runs = [{"seed": 0, "e": 0.03}, {"seed": 1, "e": 0.05}, {"seed": 2, "e": 0.04}]
    base = [{"seed": 0, "e": 0.02}, {"seed": 1, "e": 0.02}]
    assert sc.paired_delta(runs, base, "e") == "+2.00 ± 1.41"  # seeds 0 and 1 only: +1, +3
    assert sc.paired_delta(runs[:1], base, "e") == "+1.00"
    assert sc.paired_delta(runs, [], "e") == "-"


# --- structured-cost: end to end, a few iterations ------------------------------------------

@pytest.fixture
def small_synthetic(monkeypatch):
    """The synthetic VGG rows on 300 examples in batches of 20 (the real ones: 5,000, of 100)."""
    vgg = sc.NETWORKS["vgg"]
    small = vgg.data_args | {"n_train": 300, "n_test": 50}
    monkeypatch.setitem(sc.NETWORKS, "vgg", dataclasses.replace(vgg, data_args=small,
                                                                train={**vgg.train, "batch_size": 20}))


def test_synthetic_vgg_row_prunes_and_trains(small_synthetic, tmp_path):
    # the synthetic rows go through the same pipeline as every run (they used to have a copy of it)
    config = sc.row_config("vgg-block32x32-layerwise", 0, iterations=2)
    assert config.dataset == "synthetic" and config.data_args["shape"] == [3, 32, 32]
    outcome = run(config, store=tmp_path / "store", progress=False)
    results, layers = outcome.results, outcome.layer_sparsity
    assert results["sparsity"] == pytest.approx(0.9, abs=0.03) and results["steps"] == 2
    assert 0 <= results["test_error_final"] <= 1
    assert layers["0.0.weight"]["sparsity"] == 0.0  # one 16x27 tile: per-layer kappa keeps it
    assert layers["2.weight"]["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_reproduce_command_end_to_end(capsys, tmp_path, mnist_root, small_synthetic):
    out_md = tmp_path / "sc.md"
    argv = ["reproduce", "structured-cost", "--rows", "lenet300-block32x32-layerwise", "vgg-snip90",
            "--seeds", "0", "--iterations", "2", "--store", tmp_path / "store", "--out", out_md,
            "--data-dir", mnist_root, "--no-progress"]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    text = out_md.read_text()
    assert "block 32x32, per-layer kappa" in text and "| 2 | 1 |" in text and "VGG (vgg-cifar-small)" in text
    data = json.loads(out_md.with_suffix(".json").read_text())
    assert [len(data["rows"][r]["runs"]) for r in ("lenet300-block32x32-layerwise", "vgg-snip90")] == [1, 1]
    records = {r.name: r for r in RunStore(tmp_path / "store").list(group=("experiment", "structured-cost"))}
    assert set(records) == {"structured-cost/lenet300-block32x32-layerwise", "structured-cost/vgg-snip90"}
    record = records["structured-cost/lenet300-block32x32-layerwise"]
    assert record.status == "finished"
    assert record.key == data["rows"]["lenet300-block32x32-layerwise"]["runs"][0]["key"]
    # the table again from the store alone: every row is there, unchanged
    assert main([str(a) for a in argv] + ["--report-only"]) == 0
    again = json.loads(out_md.with_suffix(".json").read_text())["rows"]
    assert again == data["rows"]


def test_reproduce_unknown_row_writes_nothing(capsys, tmp_path):
    code = main(["reproduce", "structured-cost", "--rows", "nosuch", "--store", str(tmp_path / "s"),
                 "--out", str(tmp_path / "t.md")])
    assert code == 2 and "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()


# --- the VGG model ----------------------------------------------------------------------------

def vgg_parameter_count(c: int, h: int, w: int, classes: int, hidden: int = 128) -> int:
    widths = [c, 16, 16, 32, 32, 64, 64]
    convs = sum(9 * a * b for a, b in zip(widths, widths[1:]))
    batch_norm = 2 * sum(widths[1:])
    head = 64 * (h // 8) * (w // 8) * hidden + hidden + hidden * classes + classes
    return convs + batch_norm + head


@pytest.mark.parametrize("shape, classes", [((3, 32, 32), 10), ((3, 32, 32), 100), ((1, 28, 28), 10),
                                            ((3, 16, 24), 5)])
def test_vgg_cifar_small_shapes_and_size(shape, classes):
    torch.manual_seed(0)
    model = create_model("vgg-cifar-small", input_shape=shape, num_classes=classes)
    assert model(torch.randn(2, *shape)).shape == (2, classes)
    assert sum(p.numel() for p in model.parameters()) == vgg_parameter_count(*shape, classes)


def test_vgg_cifar_small_is_the_documented_network():
    model = create_model("vgg-cifar-small", input_shape=(3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 204_794  # the docstring's figure
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [16, 16, 32, 32, 64, 64]
    assert all(m.kernel_size == (3, 3) and m.bias is None for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6
    # 2:4 fits every weight's rows but the first convolution's (3*3*3 = 27)
    rows = [p[0].numel() for n, p in model.named_parameters() if p.dim() >= 2]
    assert [r % 4 == 0 for r in rows] == [False] + [True] * (len(rows) - 1)


def test_vgg_cifar_small_refuses_too_small_images():
    with pytest.raises(SparsetrainError, match="at least 8x8"):
        create_model("vgg-cifar-small", input_shape=(3, 4, 4))
