"""SNIP paper, "SNIP can prune for a range of sparsity levels": test error against sparsity, 90 to
99%, SNIP beside every baseline, LeNet-300-100 and LeNet-5-Caffe on MNIST.

``sparsetrain reproduce snip-sparsity`` trains every (network, method, sparsity) cell for three
seeds and writes a table per network (methods by sparsity, mean ± std) and a figure (test error
against sparsity, one line per method, the dense network's error as a band).

- Methods at initialization: SNIP, random, magnitude, GraSP, SynFlow, iterative SNIP and FORCE,
  each with its defaults (``sparsetrain list methods``), scored on the recipe's initialization and
  trained as the SNIP cells are (Table 1's recipe: the scored weights' fresh draw trains).
- Pruning after training (LeNet-300-100 only, as the issue fits it to this CPU): LWC (magnitude
  pruning of the trained dense network, survivors retrained) and the lottery ticket (20% of the
  remaining weights per round, rewound to the initialization); their dense parent is the dense
  cell's run, trained once.
- Recipes: LeNet-300-100 has Table 1's full recipe (60,000 iterations); LeNet-5-Caffe has Table 1's
  recipe fitted to this CPU: 10,000 of its 30,000 iterations, the schedule compressed with it
  (x0.1 every 8,333 instead of 25,000), stated in the table.

Rows (``--rows``) select cells by name (``snip-sparsity-<network>-<method>-<sparsity %>``) or by a
tag: a network, a method, or a sparsity in percent (``--rows lenet-300-100 snip random 95``
selects every cell tagged with any of them).

    >>> len(CELLS), sorted({c.info["method"] for c in CELLS if c.info["network"] == "lenet-5-caffe"})
    (82, ['dense', 'force', 'grasp', 'iter-snip', 'magnitude', 'random', 'snip', 'synflow'])
"""

from __future__ import annotations

import statistics

from .common import EXPERIMENTS, ReproduceOptions, mean_std, titled
from .grid import Cell, GridResult, raise_failures, run_grid
from ..measure import new_figure, png_beside, save_png

GROUP = ("experiment", "snip-sparsity")
SPARSITIES = (0.90, 0.95, 0.97, 0.98, 0.99)
AT_INIT = ("snip", "random", "magnitude", "grasp", "synflow", "iter-snip", "force")
AFTER_TRAINING = ("lwc", "lottery")
#: network -> (its Table 1 SNIP recipe, the length fitted to this CPU (None: the recipe's), the
#: methods after training it gets)
NETWORKS = {
    "lenet-300-100": ("snip-table1-lenet300-95", None, AFTER_TRAINING),
    "lenet-5-caffe": ("snip-table1-lenet5-98", 10_000, ()),
}


def _cells() -> list[Cell]:
    cells = []
    for network, (recipe, length, after) in NETWORKS.items():
        # the dense network of the same recipe: the run lwc and lottery prune (posttrain.dense_parent)
        cells.append(Cell(f"snip-sparsity-{network}-dense", recipe, {"prune": {"method": "dense", "sparsity": 0.0}},
                          tags=(network, "dense"), info={"network": network, "method": "dense", "sparsity": 0.0},
                          length=length))
        for method in AT_INIT + after:
            for s in SPARSITIES:
                pct = f"{round(100 * s)}"
                cells.append(Cell(f"snip-sparsity-{network}-{method}-{pct}", recipe,
                                  {"prune": {"method": method, "sparsity": s}}, tags=(network, method, pct),
                                  info={"network": network, "method": method, "sparsity": s}, length=length))
    return cells


CELLS = _cells()


@EXPERIMENTS.register("snip-sparsity")
def reproduce_snip_sparsity(options: ReproduceOptions) -> None:
    grid = run_grid(CELLS, options, GROUP)
    print(write_table(grid, options.out))
    raise_failures(grid.failures)


def write_table(grid: GridResult, out) -> str:
    """A table per network (Markdown, JSON beside them) and the figure (``<out stem>.png``)."""

    lines = ["# " + titled("SNIP paper: test error against sparsity, SNIP and the baselines (MNIST)", grid.shortened),
             "",
             "Test error (%) at the end of training, mean ± std over the seeds (their number in brackets). "
             "Methods at initialization score the recipe's initialization and train a fresh draw under the mask "
             "(Table 1's recipe); lwc and lottery prune the trained dense network (see docs/pruning.md)."]
    data: dict = {"sparsities": list(SPARSITIES), "rows": {}}
    networks = list(dict.fromkeys(c.info["network"] for c in grid.cells))
    for network in networks:
        cells = [c for c in grid.cells if c.info["network"] == network]
        sparsities = sorted({c.info["sparsity"] for c in cells if c.info["method"] != "dense"})
        methods = list(dict.fromkeys(c.info["method"] for c in cells))
        by = {(c.info["method"], c.info["sparsity"]): c for c in cells}
        iterations = sorted({cfg.train.iterations for c in cells for cfg in grid.configs[c.name]})
        lines += ["", f"## {network} ({', '.join(f'{n:,}' for n in iterations)} iterations)", "",
                  "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|" + "---|" * len(sparsities)]
        for method in methods:
            row = []
            for s in ([0.0] if method == "dense" else sparsities):
                cell = by.get((method, s))
                values = grid.results(cell.name, "test_error_final") if cell else []
                row.append(f"{mean_std(values)} ({len(values)})" if cell else "-")
                if cell:
                    data["rows"][cell.name] = {**cell.info, "test_error_final_pct": [100 * v for v in values],
                                               "keys": [r.key for r in grid.records.get(cell.name, [])]}
            if method == "dense":
                row = row * len(sparsities) if sparsities else row
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    if NETWORKS["lenet-5-caffe"][1] and "lenet-5-caffe" in networks:
        lines += ["", f"LeNet-5-Caffe's recipe is Table 1's fitted to this CPU: {NETWORKS['lenet-5-caffe'][1]:,} of "
                      "its 30,000 iterations, the learning-rate schedule compressed with it."]
    if any(v["test_error_final_pct"] for v in data["rows"].values()):
        path = png_beside(out)
        _plot(networks, data["rows"], path, grid.shortened)
        lines += ["", f"![test error against sparsity]({path.name})"]
    return grid.publish(out, lines, data)


def _plot(networks, rows, path, shortened) -> None:
    fig = new_figure(4.2 * len(networks), 3.4)
    for j, network in enumerate(networks):
        ax = fig.add_subplot(1, len(networks), j + 1)
        mine = [r for r in rows.values() if r["network"] == network and r["test_error_final_pct"]]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["sparsity"], r["test_error_final_pct"]) for r in mine if r["method"] == method)
            means = [statistics.fmean(v) for _, v in points]
            if method == "dense":
                ax.axhline(means[0], color="gray", linestyle=":", label="dense")
                continue
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
            style = dict(linewidth=2.0, color="black") if method == "snip" else dict(linewidth=1.0)
            ax.errorbar([100 * s for s, _ in points], means, yerr=stds, marker="o", markersize=3, capsize=2,
                        label=method, **style)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test error (%)")
        ax.set_title(network, fontsize=9)
        ax.legend(fontsize=6)
    if shortened:
        fig.suptitle("(shortened)", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
