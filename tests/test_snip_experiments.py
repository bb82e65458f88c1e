"""The SNIP paper's experiments beyond its tables, as commands: the pruning batch size
(`reproduce snip-prune-batch`) and memorization (`reproduce snip-memorization`), each run here
for a few iterations on real MNIST through the real command; and the grid they share."""

from __future__ import annotations

import json

import pytest
import torch

from sparsetrain.cli.main import main
from sparsetrain.errors import SparsetrainError
from sparsetrain.experiments import EXPERIMENTS
from sparsetrain.experiments import grid as g
from sparsetrain.experiments import snip_memorization as mem
from sparsetrain.experiments import snip_prune_batch as pb
from sparsetrain.masks import load_mask
from sparsetrain.store import RunStore

# The paper's figures for the pruning batch size (LeNet-300-100 at 90%), written here apart from
# the experiment's own table.
PAPER_BATCH = {1: 1.94, 10: 1.72, 100: 1.64, 1000: 1.56, 10000: 1.40}


def test_the_experiments_are_registered_with_the_papers_cells():
    assert EXPERIMENTS.get("snip-prune-batch") is pb.reproduce_snip_prune_batch
    assert EXPERIMENTS.get("snip-memorization") is mem.reproduce_snip_memorization
    assert pb.PAPER == PAPER_BATCH
    configs = [c.config() for c in pb.CELLS]
    assert [c.prune.batch_size for c in configs] == list(PAPER_BATCH)
    assert {(c.model, c.prune.method, c.prune.sparsity, c.train.iterations) for c in configs} == {
        ("lenet-300-100", "snip", 0.9, 60_000)}
    memo = {(c.info["network"], c.info["method"], c.info["labels"]): c.config() for c in mem.CELLS}
    assert len(memo) == 8
    assert memo["lenet-300-100", "snip", "random"].data_args == {"random_labels": True}
    assert memo["lenet-300-100", "snip", "true"].data_args == {}
    assert memo["lenet-5-caffe", "snip", "random"].prune.sparsity == 0.98
    assert memo["lenet-300-100", "dense", "random"].prune.method == "dense"


def test_grid_rows_select_by_name_or_tag_and_refuse_unknown_ones():
    assert [c.name for c in g.select(mem.CELLS, ["lenet-5-caffe"])] == [
        c.name for c in mem.CELLS if c.info["network"] == "lenet-5-caffe"]
    assert len(g.select(mem.CELLS, ["random-labels"])) == 4
    with pytest.raises(SparsetrainError, match="unknown row.*lenet-7.*tags"):
        g.select(mem.CELLS, ["lenet-7"])


def test_prune_batch_runs_each_batch_size_and_writes_table_and_figure(tmp_path, mnist_root, capsys):
    out, store = tmp_path / "pb.md", tmp_path / "store"
    assert main(["reproduce", "snip-prune-batch", "--rows", "1", "1000", "--seeds", "0", "--iterations", "5",
                 "--data-dir", str(mnist_root), "--store", str(store), "--out", str(out), "--no-progress"]) == 0
    text = out.read_text()
    assert text.startswith("# SNIP paper: pruning batch size") and "shortened" in text.splitlines()[0]
    assert "| 1 | " in text and "| 1,000 | " in text and "| 10 | " not in text
    assert (tmp_path / "pb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "pb.json").read_text())
    assert set(data["rows"]) == {"1", "1000"}
    runs = RunStore(store).list()
    assert sorted(r.config["prune"]["batch_size"] for r in runs) == [1, 1000]
    assert {r.group_name for r in runs} == {"snip-prune-batch"}
    # the masks differ: one example and a thousand do not give the same sensitivities
    masks = [load_mask(store / "runs" / r.key / "mask.safetensors") for r in runs]
    assert any(not torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_memorization_fits_true_labels_better_than_random_ones(tmp_path, mnist_root):
    out, store = tmp_path / "mem.md", tmp_path / "store"
    assert main(["reproduce", "snip-memorization", "--rows", "lenet-300-100", "--seeds", "0", "--iterations", "100",
                 "--data-dir", str(mnist_root), "--store", str(store), "--out", str(out), "--no-progress"]) == 0
    data = json.loads((tmp_path / "mem.json").read_text())["rows"]
    assert len(data) == 4
    for method in ("dense", "snip"):
        true = data[f"snip-memorization-lenet-300-100-{method}-true"]
        random = data[f"snip-memorization-lenet-300-100-{method}-random"]
        # after 100 iterations the true labels are half learnt, the random ones are at chance (9 in 10 wrong)
        assert true["train_error_end"][0] < 0.5 and random["train_error_end"][0] > 0.8
        assert random["test_error_final"][0] > 0.7  # trained on random labels, tested on the true ones
    assert (tmp_path / "mem_lenet-300-100.png").exists()
    runs = {r.name: r for r in RunStore(store).list()}
    assert runs["snip-memorization-lenet-300-100-snip-random"].config["data_args"] == {"random_labels": True}


def test_table3_cells_are_the_papers_grid():
    from sparsetrain.experiments import snip_table3 as t3
    from sparsetrain.pipeline import validate

    assert EXPERIMENTS.get("snip-table3") is t3.reproduce_snip_table3
    cells = {(c.info["network"], c.info["label"]): c.config() for c in t3.CELLS}
    assert set(cells) == {(n, lab) for n in ("lenet-300-100", "lenet-5-caffe", "lstm-s", "gru-s")
                          for lab in ("RN", "TN", "VS-X", "VS-H")}
    for (network, label), config in cells.items():
        validate(config)
        assert config.model == network and config.prune.method == "snip" and config.prune.sparsity == 0.9
        assert (config.train.optimizer, config.train.lr) == ("adam", 1e-3)
        assert config.prune.reinit.startswith(config.init.split(":")[0])  # the same law, zero biases
    assert cells["lenet-300-100", "RN"].init == "normal:std=0.1"
    assert cells["gru-s", "VS-H"].init == "variance-scaling:scale=2"
    assert cells["lstm-s", "TN"].data_args == {"view": "rows"}
    assert t3.PAPER[("lenet-300-100", "he")] == 1.88
    # lengths fitted to this CPU, schedules compressed: 60,000 x0.1 every 25,000; 30,000 x0.1 every 25,000
    lengths = {n: (c.train.iterations, c.train.decay_every) for (n, lab), c in cells.items() if lab == "RN"}
    assert lengths == {"lenet-300-100": (60_000, 25_000), "lenet-5-caffe": (10_000, 8_333),
                       "lstm-s": (15_000, 6_250), "gru-s": (15_000, 6_250)}


def test_table3_runs_a_network_row_end_to_end(tmp_path, mnist_root):
    out, store = tmp_path / "t3.md", tmp_path / "store"
    assert main(["reproduce", "snip-table3", "--rows", "lenet-300-100", "--seeds", "0", "--iterations", "5",
                 "--data-dir", str(mnist_root), "--store", str(store), "--out", str(out), "--no-progress"]) == 0
    first = out.read_text().splitlines()[0]
    assert "shortened" in first and "rows lenet-300-100 (4 of 16 cells)" in first
    runs = RunStore(store).list()
    assert sorted(r.config["init"] for r in runs) == sorted(
        ["normal:std=0.1", "truncated-normal:std=0.1", "variance-scaling:mode=fan_avg", "variance-scaling:scale=2"])
    assert (tmp_path / "t3.png").exists()


def test_sparsity_grid_has_every_method_and_the_papers_range():
    from sparsetrain.experiments import snip_sparsity as sp
    from sparsetrain.pipeline import validate
    from sparsetrain.pruning import METHODS

    at_init = {"snip", "random", "magnitude", "grasp", "synflow", "iter-snip", "force"}
    assert at_init <= set(METHODS.list())
    cells = {(c.info["network"], c.info["method"], c.info["sparsity"]): c.config() for c in sp.CELLS}
    for network in ("lenet-300-100", "lenet-5-caffe"):
        methods = {m for n, m, _ in cells if n == network}
        after = {"lwc", "lottery"} if network == "lenet-300-100" else set()
        assert methods == at_init | after | {"dense"}
        assert {s for n, m, s in cells if n == network and m == "snip"} == {0.90, 0.95, 0.97, 0.98, 0.99}
    for config in cells.values():
        validate(config)
    assert cells["lenet-300-100", "snip", 0.99].train.iterations == 60_000
    short = cells["lenet-5-caffe", "grasp", 0.95].train
    assert (short.iterations, short.decay_every) == (10_000, 8_333)  # 30,000 x0.1 every 25,000, compressed


def test_sparsity_runs_lwc_on_the_dense_cells_run(tmp_path, mnist_root):
    from sparsetrain.experiments import snip_sparsity as sp

    out, store = tmp_path / "sp.md", tmp_path / "store"
    rows = ["snip-sparsity-lenet-300-100-dense", "snip-sparsity-lenet-300-100-snip-95",
            "snip-sparsity-lenet-300-100-lwc-95", "snip-sparsity-lenet-5-caffe-synflow-99"]
    assert main(["reproduce", "snip-sparsity", "--rows", *rows, "--seeds", "0", "--iterations", "5",
                 "--data-dir", str(mnist_root), "--store", str(store), "--out", str(out), "--no-progress"]) == 0
    text = out.read_text()
    assert "## lenet-300-100" in text and "## lenet-5-caffe" in text and "| lwc | " in text
    dense_key = next(c for c in sp.CELLS if c.name == rows[0]).config().replace(seed=0)
    dense_key = g.shorten(dense_key, 5).key()
    runs = RunStore(store).list()
    lwc = [r for r in runs if r.config["prune"]["method"] == "lwc"]
    assert len(lwc) == 1 and lwc[0].parent == dense_key  # one dense run, pruned by lwc
    assert sum(r.config["prune"]["method"] == "dense" for r in runs) == 1
    assert (tmp_path / "sp.png").exists()
