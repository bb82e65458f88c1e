"""SNIP paper, section 5 (pruning batch size): the test error of LeNet-300-100 pruned to 90% by
SNIP on one pruning batch of 1, 10, 100, 1,000 or 10,000 training examples.

The paper (LeNet-300-100 at 90%): 1.94 / 1.72 / 1.64 / 1.56 / 1.40 % for batches of 1 / 10 / 100 /
1,000 / 10,000: the bigger the batch, the better the sensitivities estimate the data set's, and
the better the pruned network. ``sparsetrain reproduce snip-prune-batch`` trains each batch size
with Table 1's LeNet-300-100 recipe (``snip-table1-lenet300-95`` at 90%, its schedule and length),
three seeds, and writes the table and a figure (test error against the pruning batch size, log
scale, the paper's values beside). Only the pruning batch differs between the cells: the pruning
examples are the first of the training stream's first epoch (``prune.batch_size``), so a batch of
10 is the first ten examples of the batch of 100.

    >>> [c.name for c in CELLS]  # doctest: +NORMALIZE_WHITESPACE
    ['snip-prune-batch-1', 'snip-prune-batch-10', 'snip-prune-batch-100', 'snip-prune-batch-1000',
     'snip-prune-batch-10000']
"""

from __future__ import annotations

from .common import EXPERIMENTS, ReproduceOptions, mean_std, titled
from .grid import Cell, GridResult, raise_failures, run_grid
from ..measure import new_figure, png_beside, save_png

GROUP = ("experiment", "snip-prune-batch")
SPARSITY = 0.90
RECIPE = "snip-table1-lenet300-95"  # Table 1's LeNet-300-100 recipe, here at 90%
#: The paper's test errors (%) by pruning batch size, LeNet-300-100 at 90%.
PAPER = {1: 1.94, 10: 1.72, 100: 1.64, 1000: 1.56, 10000: 1.40}

CELLS = [Cell(f"snip-prune-batch-{b}", RECIPE, {"prune": {"sparsity": SPARSITY, "batch_size": b, "batches": 1}},
              tags=(str(b),), info={"batch": b}) for b in PAPER]


@EXPERIMENTS.register("snip-prune-batch")
def reproduce_snip_prune_batch(options: ReproduceOptions) -> None:
    grid = run_grid(CELLS, options, GROUP)
    print(write_table(grid, options.out))
    raise_failures(grid.failures)


def write_table(grid: GridResult, out) -> str:
    """The table (Markdown, JSON beside it) and the figure (``<out stem>.png``) of ``grid``."""

    lines = [
        "# " + titled("SNIP paper: pruning batch size against test error (LeNet-300-100, SNIP 90%)", grid.shortened),
        "",
        "Test error (%) of the model at the end of training, mean ± std over the seeds (their number in "
        "brackets); the pruning batch is the first examples of the training stream, everything else is "
        f"Table 1's LeNet-300-100 recipe (`{RECIPE}` at {SPARSITY:.0%}).",
        "",
        "| pruning batch | test error | min over checks | paper |",
        "|---:|---|---|---:|",
    ]
    data = {"sparsity": SPARSITY, "recipe": RECIPE, "rows": {}}
    points = []
    for cell in grid.cells:
        b = cell.info["batch"]
        final = grid.results(cell.name, "test_error_final")
        best = grid.results(cell.name, "test_error_min_over_checks")
        lines.append(f"| {b:,} | {mean_std(final)} ({len(final)}) | {mean_std(best)} | {PAPER[b]:.2f} |")
        data["rows"][str(b)] = {"test_error_final_pct": [100 * v for v in final],
                                "test_error_min_over_checks_pct": [100 * v for v in best], "paper_pct": PAPER[b],
                                "keys": [r.key for r in grid.records.get(cell.name, [])]}
        if final:
            points.append((b, [100 * v for v in final]))
    if points:
        lines += ["", f"![test error against pruning batch size]({png_beside(out).name})"]
        _plot(points, png_beside(out), grid.shortened)
    return grid.publish(out, lines, data)


def _plot(points, path, shortened) -> None:
    import statistics

    fig = new_figure(4.2, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = [b for b, _ in points]
    means = [statistics.fmean(v) for _, v in points]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label="sparsetrain (mean ± std)")
    ax.plot(list(PAPER), list(PAPER.values()), "s--", color="gray", label="paper")
    ax.set_xscale("log")
    ax.set_xlabel("pruning batch size (examples)")
    ax.set_ylabel("test error (%)")
    ax.set_title("LeNet-300-100, SNIP 90%" + (" (shortened)" if shortened else ""), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
