"""SNIP Table 2 (`sparsetrain reproduce snip-table2`): its recipes are the paper's rows, the CIFAR-10
rows run end to end on generated CIFAR-format files, the recurrent rows on real MNIST, and a row
whose data is not on the machine is reported as not run while the others run.

The full runs take hours; here they run two or three iterations at a small batch. Two of the eight
CIFAR rows (AlexNet-s and VGG-C, the cheapest per step of the convolutional and VGG families) go
through ``reproduce``; the other six are checked to load and validate (their networks' forward and
backward are the model tests' business).
"""

from __future__ import annotations

import json

import pytest

from fake_datasets import write_cifar10
from sparsetrain.cli.main import main
from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.experiments import EXPERIMENTS, ReproduceOptions
from sparsetrain.experiments import snip_table2 as t2
from sparsetrain.pipeline import validate
from sparsetrain.recipes import list_recipes, recipe_path
from sparsetrain.store import RunStore

# The paper's Table 2 as printed (Lee et al., ICLR 2019): network -> (sparsity, data set); written
# here independently of the experiment's ROWS.
PAPER = {
    "alexnet-s": 0.90, "alexnet-b": 0.90, "vgg-c": 0.95, "vgg-d": 0.95, "vgg-like": 0.97,
    "wrn-16-8": 0.95, "wrn-16-10": 0.95, "wrn-22-8": 0.95,
    "lstm-s": 0.95, "lstm-b": 0.95, "gru-s": 0.95, "gru-b": 0.95,
}
RECURRENT = {"lstm-s", "lstm-b", "gru-s", "gru-b"}
# the figures for the recurrent rows, error % dense -> SNIP
PAPER_RNN_ERRORS = {"lstm-s": (1.88, 1.57), "lstm-b": (1.15, 1.35), "gru-s": (1.87, 2.41), "gru-b": (1.71, 1.52)}


def test_snip_table2_is_a_reproduce_experiment():
    assert EXPERIMENTS.get("snip-table2") is t2.reproduce_snip_table2
    assert list(t2.ROWS) == list(PAPER)
    for name, (dense, snip) in PAPER_RNN_ERRORS.items():
        assert (t2.ROWS[name].paper_dense, t2.ROWS[name].paper_snip) == (dense, snip)


def test_every_row_has_a_dense_and_a_pruned_recipe_as_the_paper():
    table2 = {r for r in list_recipes() if r.startswith("snip-table2-")}
    expected = {f"snip-table2-{n}-dense" for n in PAPER} | {f"snip-table2-{n}-{round(100 * s)}" for n, s in PAPER.items()}
    assert table2 == expected
    for network, sparsity in PAPER.items():
        dense = RunConfig.from_toml(recipe_path(f"snip-table2-{network}-dense"))
        pruned = RunConfig.from_toml(recipe_path(f"snip-table2-{network}-{round(100 * sparsity)}"))
        for config in (dense, pruned):
            validate(config)
            assert config.model == network
            if network in RECURRENT:  # sequential MNIST, Table 1's MNIST recipe
                assert config.dataset == "mnist" and config.data_args == {"view": "rows"}
                assert (config.train.batch_size, config.train.lr, config.train.decay_every) == (100, 0.1, 25000)
            else:  # snip-public's CIFAR command: batch 128, x0.2 every 30k of 150k, translation and flip
                assert config.dataset == "cifar10" and config.data_args == {"random_crop": 4, "flip": True}
                t = config.train
                assert (t.batch_size, t.lr, t.momentum, t.weight_decay) == (128, 0.1, 0.9, 5e-4)
                assert (t.schedule, t.decay_every, t.decay_factor, t.iterations) == ("step", 30000, 0.2, 150000)
        assert dense.prune.method == "dense" and pruned.prune.method == "snip"
        assert pruned.prune.sparsity == sparsity and pruned.prune.include_biases
        assert pruned.prune.reinit == "variance-scaling-zero-bias"
        # the pair differs in the pruning alone (and the init the dense run trains from)
        assert dense.train == pruned.train and dense.data_args == pruned.data_args


def test_unknown_row_is_refused_with_the_rows(tmp_path):
    options = ReproduceOptions(out=tmp_path / "t2.md", store=tmp_path / "store", rows=("vgg-16",))
    with pytest.raises(SparsetrainError, match="unknown row.*vgg-16.*rows are networks: alexnet-s"):
        t2.reproduce(options)
    assert not (tmp_path / "t2.md").exists()


def _options(tmp_path, rows, data_dir, **kw):
    return ReproduceOptions(out=tmp_path / "out" / "t2.md", store=tmp_path / "store", rows=tuple(rows),
                            seeds=(0,), iterations=2, data_dir=str(data_dir), progress=False, **kw)


@pytest.mark.slow  # two CIFAR rows, four runs of 2 iterations: ~10 s quiet, ~25 s on a loaded 2-core machine
def test_cifar_rows_run_end_to_end_on_generated_cifar_files(tmp_path, capsys):
    root = tmp_path / "data"
    write_cifar10(root, per_batch=20, n_test=20)
    options = _options(tmp_path, ["alexnet-s", "vgg-c"], root)
    t2.reproduce(options, train_overrides={"batch_size": 8})
    store = RunStore(options.store)
    runs = {(r.config["name"], r.status): r for r in store.list()}
    for name in ("snip-table2-alexnet-s-dense", "snip-table2-alexnet-s-90",
                 "snip-table2-vgg-c-dense", "snip-table2-vgg-c-95"):
        assert (name, "finished") in runs, sorted(runs)
    # SNIP kept the paper's fraction of the prunable connections; the dense runs kept all
    assert runs[("snip-table2-alexnet-s-90", "finished")].results["sparsity"] == pytest.approx(0.90, abs=1e-4)
    assert runs[("snip-table2-vgg-c-95", "finished")].results["sparsity"] == pytest.approx(0.95, abs=1e-4)
    assert runs[("snip-table2-vgg-c-dense", "finished")].results["sparsity"] == 0.0
    text = options.out.read_text()
    assert text.startswith("# SNIP paper, Table 2") and "shortened" in text.splitlines()[0]
    assert "train.batch_size 8 (the recipes: 128)" in text.splitlines()[0]
    line = next(l for l in text.splitlines() if l.startswith("| AlexNet-s |"))
    assert "CIFAR-10" in line and "| 90% |" in line and "not run here" not in line and "14.12 -> 14.99" in line
    data = json.loads(options.out.with_suffix(".json").read_text())
    assert [x["seed"] for x in data["vgg-c"]["snip"]] == [0] and data["vgg-c"]["dense"][0]["test_error_final"] is not None


def test_rnn_rows_run_on_real_mnist_and_cifar_rows_without_data_are_reported(tmp_path, capsys, mnist_root):
    """`reproduce snip-table2` on a machine with MNIST only: the LSTM row runs, the AlexNet row is
    reported as not run (its data is missing) and the command succeeds."""
    out = tmp_path / "t2.md"
    code = main(["reproduce", "snip-table2", "--rows", "alexnet-s", "lstm-s", "--seeds", "0", "--iterations", "2",
                 "--data-dir", str(mnist_root), "--store", str(tmp_path / "store"), "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    lines = out.read_text().splitlines()
    alexnet = next(l for l in lines if l.startswith("| AlexNet-s |"))
    assert "not run here (CIFAR-10 not on this machine; see below)" in alexnet
    assert "Rows on CIFAR-10 were not run: cifar10 data not found in" in out.read_text()  # the reason, once
    lstm = next(l for l in lines if l.startswith("| LSTM-s |"))
    assert "sequential MNIST" in lstm and "137.1k (137k)" in lstm and "1.88 -> 1.57" in lstm
    cells = [c.strip() for c in lstm.split("|")]
    assert cells[6].endswith("(1)") and cells[7].endswith("(1)")  # dense and SNIP: one seed each
    runs = RunStore(tmp_path / "store").list()
    assert sorted(r.config["name"] for r in runs) == ["snip-table2-lstm-s-95", "snip-table2-lstm-s-dense"]
    assert all(r.config["dataset"] == "mnist" for r in runs)


def test_missing_and_damaged_data_are_told_apart(tmp_path, mnist_root):
    """A data set that is absent is 'not on this machine'; one whose files are damaged is reported
    with the loader's reason, so a user with a broken copy is not told to fetch what they have."""
    configs = t2.configs_for(["alexnet-s", "lstm-s"], [0], None)
    assert set(t2.missing_data(configs, mnist_root)) == {"cifar10"}  # MNIST is there, CIFAR-10 not
    assert "cifar10 data not found" in t2.missing_data(configs, mnist_root)["cifar10"]
    root = tmp_path / "data"
    fake = write_cifar10(root, per_batch=10, n_test=10)
    batch = fake.folder / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])  # truncated
    why = t2.missing_data(t2.configs_for(["alexnet-s"], [0], None), root)["cifar10"]
    assert "not found" not in why and "data_batch_3" in why
