"""Signal-propagation paper (Lee et al., ICLR 2020), section 5.3: transfer of sparsity.

A mask found on one data set trains a network on another: SNIP scores the first pruning batch of
the source data set (``prune.dataset``; the mask is then an ordinary recorded run's, the field
recorded in its key) and the network trains on the target, against the mask found on the target
itself. ``sparsetrain reproduce spp-transfer`` does the four combinations of MNIST and
Fashion-MNIST (same input shape, ten classes each) for LeNet-300-100 and LeNet-5-Caffe at
:data:`SPARSITY`, with Table 1's recipe compressed to :data:`LENGTH` iterations (its step
schedule compressed with it), three seeds, and writes the table and a figure (test error on each
target, own mask beside transferred mask).

    >>> sorted({(c.info["source"], c.info["target"]) for c in CELLS})  # doctest: +NORMALIZE_WHITESPACE
    [('fashion-mnist', 'fashion-mnist'), ('fashion-mnist', 'mnist'), ('mnist', 'fashion-mnist'),
     ('mnist', 'mnist')]
    >>> [(c.dataset, c.prune.dataset) for c in (CELLS[0].config(), CELLS[1].config())]
    [('mnist', ''), ('mnist', 'fashion-mnist')]
"""

from __future__ import annotations

from .common import EXPERIMENTS, ReproduceOptions, mean_std, titled
from .grid import Cell, GridResult, raise_failures, run_grid
from ..measure import new_figure, png_beside, save_png

GROUP = ("experiment", "spp-transfer")
#: Table 1's recipes (network -> recipe); the sparsity, the target and the source change.
RECIPES = {"lenet-300-100": "snip-table1-lenet300-95", "lenet-5-caffe": "snip-table1-lenet5-98"}
DATASETS = ("mnist", "fashion-mnist")
SPARSITY = 0.95
#: Iterations per run: Table 1's recipes (60,000 and 30,000) compressed to fit a CPU.
LENGTH = 5000

CELLS = [Cell(f"spp-transfer-{net}-{source}-to-{target}", recipe,
              # the target's own mask leaves prune.dataset unset: the ordinary run, its usual key
              {"dataset": target, "prune": {"sparsity": SPARSITY, "dataset": "" if source == target else source}},
              tags=(net, f"to-{target}", f"from-{source}"),
              info={"network": net, "source": source, "target": target}, length=LENGTH)
         for net, recipe in RECIPES.items() for target in DATASETS for source in (target, *(d for d in DATASETS
                                                                                             if d != target))]


@EXPERIMENTS.register("spp-transfer")
def reproduce_spp_transfer(options: ReproduceOptions) -> None:
    grid = run_grid(CELLS, options, GROUP)
    print(write_table(grid, options.out))
    raise_failures(grid.failures)


def write_table(grid: GridResult, out) -> str:
    """The table (Markdown, JSON beside it) and the figure (``<out stem>.png``) of ``grid``."""

    lines = [
        "# " + titled(f"Signal-propagation paper: transfer of sparsity (SNIP {SPARSITY:.0%}, MNIST and Fashion-MNIST)",
                      grid.shortened),
        "",
        "The mask is found by SNIP on the first pruning batch (100 examples) of the source data set and trains on "
        "the target data set (`prune.dataset`); source = target is the ordinary run. Everything else is Table 1's "
        f"recipe for the network at {SPARSITY:.0%} sparsity, compressed to {LENGTH:,} iterations (step schedule "
        "compressed with it). Test error (%) on the target at the end of training, mean ± std over the seeds "
        "(their number in brackets).",
        "",
        "| network | target | mask from target | mask from the other data set |",
        "|---|---|---|---|",
    ]
    by = {(c.info["network"], c.info["source"], c.info["target"]): c for c in grid.cells}
    data: dict = {"sparsity": SPARSITY, "length": LENGTH, "recipes": RECIPES, "rows": {}}
    for net in RECIPES:
        for target in DATASETS:
            other = next(d for d in DATASETS if d != target)
            cells = {"own": by.get((net, target, target)), "transferred": by.get((net, other, target))}
            if not any(cells.values()):
                continue
            finals = {k: grid.results(c.name, "test_error_final") if c else [] for k, c in cells.items()}
            lines.append(f"| {net} | {target} | " + " | ".join(
                f"{mean_std(v)} ({len(v)})" if v else "-" for v in finals.values()) + " |")
            data["rows"][f"{net}-{target}"] = {
                "network": net, "target": target, "transferred_from": other,
                "test_error_final_pct": {k: [100 * x for x in v] for k, v in finals.items()},
                "keys": {k: [r.key for r in grid.records.get(c.name, [])] for k, c in cells.items() if c}}
    if any(v for row in data["rows"].values() for v in row["test_error_final_pct"].values()):
        lines += ["", f"![test error with the target's own and a transferred mask]({png_beside(out).name})"]
        _plot(data["rows"], png_beside(out), grid.shortened)
    return grid.publish(out, lines, data)


def _plot(rows: dict, path, shortened) -> None:
    import statistics

    fig = new_figure(6.0, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    labels = list(rows)
    for j, (kind, name) in enumerate((("own", "mask from the target"), ("transferred", "mask from the other set"))):
        values = [rows[k]["test_error_final_pct"][kind] for k in labels]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(labels))]
        ax.bar(xs, [statistics.fmean(v) if v else 0.0 for v in values], width=0.38, label=name,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values], capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{rows[k]['network']}\non {rows[k]['target']}" for k in labels], fontsize=7)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"SNIP {SPARSITY:.0%}: transfer of sparsity" + (" (shortened)" if shortened else ""), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
