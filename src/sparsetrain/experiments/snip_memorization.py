"""SNIP paper, section 5.3 (preventing memorization): dense and SNIP-pruned networks trained on
the true labels and on random labels, with their training loss and accuracy curves.

The paper's claim: a dense network fits random labels (memorises), while the network pruned by
SNIP at initialization, which kept the connections that matter for the true task, fails to fit
them, yet fits the true labels as well as the dense one. ``sparsetrain reproduce
snip-memorization`` trains LeNet-300-100 (SNIP at 95%) and LeNet-5-Caffe (SNIP at 98%, both Table 1
sparsities) with Table 1's recipes, dense and pruned, on MNIST with the true labels and with
random ones (data arg ``random_labels``: each training and validation label drawn uniformly,
fixed per example; the test labels stay true), three seeds. With random labels SNIP scores the
network on a batch of random labels too, as the paper does (the pruning batch comes from the
same training set).

It writes a table (the final training error on the training labels, i.e. how much of the random
labels the network fitted, and the test error) and one figure per network beside it
(``<out stem>_<network>.png``): training loss and training accuracy against the iteration, the
mean over the seeds, one line per (dense or SNIP, true or random labels).

    >>> sorted({c.info["network"] for c in CELLS}), len(CELLS)
    (['lenet-300-100', 'lenet-5-caffe'], 8)
"""

from __future__ import annotations

import statistics

from .common import EXPERIMENTS, ReproduceOptions, mean_std, titled
from .grid import Cell, GridResult, curves_of, raise_failures, run_grid
from ..measure import new_figure, png_beside, save_png

GROUP = ("experiment", "snip-memorization")
#: network -> (its Table 1 dense recipe, its SNIP recipe at the Table 1 sparsity used here)
NETWORKS = {
    "lenet-300-100": ("snip-table1-lenet300-dense", "snip-table1-lenet300-95"),
    "lenet-5-caffe": ("snip-table1-lenet5-dense", "snip-table1-lenet5-98"),
}


def _cells() -> list[Cell]:
    cells = []
    for network, (dense, snip) in NETWORKS.items():
        for method, recipe in (("dense", dense), ("snip", snip)):
            for labels in ("true", "random"):
                changes = {"data_args": {"random_labels": True}} if labels == "random" else {}
                cells.append(Cell(f"snip-memorization-{network}-{method}-{labels}", recipe, changes,
                                  tags=(network, method, f"{labels}-labels"),
                                  info={"network": network, "method": method, "labels": labels}))
    return cells


CELLS = _cells()


@EXPERIMENTS.register("snip-memorization")
def reproduce_snip_memorization(options: ReproduceOptions) -> None:
    grid = run_grid(CELLS, options, GROUP)
    print(write_table(grid, options.out, options.store))
    raise_failures(grid.failures)


def _last(curve):
    return curve[-1][1] if curve else None


def write_table(grid: GridResult, out, store) -> str:
    """The table (Markdown, JSON beside it) and one figure per network of ``grid``."""

    lines = [
        "# " + titled("SNIP paper: preventing memorization (dense and SNIP, true and random labels)", grid.shortened),
        "",
        "*train error*: the error on the training batches over the last 50 iterations, against the labels trained "
        "on (random ones for the random-label runs: a low value means the network memorised them); *test error*: "
        "the true test labels. Mean ± std over the seeds (their number in brackets).",
        "",
        "| network | method | sparsity | labels | train error (end) | train loss (end) | test error |",
        "|---|---|---|---|---|---|---|",
    ]
    data: dict = {"rows": {}}
    by_network: dict[str, list] = {}
    for cell in grid.cells:
        records = grid.records.get(cell.name, [])
        curves = [curves_of(store, r) for r in records]
        train_error = [_last(c.get("train_error")) for c in curves]
        train_loss = [_last(c.get("train_loss")) for c in curves]
        test = grid.results(cell.name, "test_error_final")
        sparsity = grid.configs[cell.name][0].prune.sparsity if cell.info["method"] != "dense" else 0.0
        loss_text = (f"{statistics.fmean(v for v in train_loss if v is not None):.3f}"
                     if any(v is not None for v in train_loss) else "-")
        lines.append(f"| {cell.info['network']} | {cell.info['method']} | {sparsity:.0%} | {cell.info['labels']} | "
                     f"{mean_std(train_error)} ({len(records)}) | {loss_text} | {mean_std(test)} |")
        data["rows"][cell.name] = {**cell.info, "sparsity": sparsity, "train_error_end": train_error,
                                   "train_loss_end": train_loss, "test_error_final": test,
                                   "keys": [r.key for r in records]}
        if curves:
            by_network.setdefault(cell.info["network"], []).append((cell, curves))
    lines += ["", "Recipes: Table 1's (`snip-table1-*`: SGD momentum 0.9, batch 100, weight decay 5e-4, lr 0.1 "
                  "x0.1 every 25,000 iterations; LeNet-300-100 60,000 iterations, LeNet-5-Caffe 30,000), random "
                  "labels by the data arg `random_labels`."]
    for network, entries in by_network.items():
        path = png_beside(out, f"_{network}")
        _plot(network, entries, path, grid.shortened)
        lines += ["", f"![{network}: training loss and accuracy]({path.name})"]
    return grid.publish(out, lines, data)


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over runs at each iteration every run logged."""
    common = set.intersection(*(set(s for s, _ in c) for c in curves)) if curves else set()
    tables = [dict(c) for c in curves]
    return [(s, statistics.fmean(t[s] for t in tables)) for s in sorted(common)]


def _plot(network, entries, path, shortened) -> None:
    fig = new_figure(7.5, 3.0)
    loss_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for cell, curves in entries:
        label = f"{cell.info['method']}, {cell.info['labels']} labels"
        style = "-" if cell.info["labels"] == "true" else "--"
        color = "tab:blue" if cell.info["method"] == "dense" else "tab:red"
        loss = mean_curve([c["train_loss"] for c in curves if c.get("train_loss")])
        error = mean_curve([c["train_error"] for c in curves if c.get("train_error")])
        if loss:
            loss_ax.plot(*zip(*loss), style, color=color, label=label, linewidth=1)
        if error:
            acc_ax.plot([s for s, _ in error], [1 - v for _, v in error], style, color=color, label=label, linewidth=1)
    loss_ax.set_xlabel("iteration")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    acc_ax.set_xlabel("iteration")
    acc_ax.set_ylabel("training accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.legend(fontsize=7)
    fig.suptitle(f"{network}: memorization of random labels" + (" (shortened)" if shortened else ""), fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
