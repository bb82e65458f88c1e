"""Beyond the papers: SNIP's Table 1 rows at their hardest sparsities, trained with the
signal-propagation repairs of Lee et al. (2020), to see which closes the gap to the SNIP paper.

snip-public's recipe leaves LeNet-300-100 at 98% near 3.0% test error (the SNIP paper: 2.4%) and
LeNet-5-Caffe at 99% near 1.45% (paper: 1.1%); see docs/results/snip_table1.md. With the very
same recipe (mask, schedule, length), ``sparsetrain reproduce spp-table1`` changes only how the
weights that train start:

- ``plain``: the recipe as it is (a fresh variance-scaling draw under the mask, snip-public);
- ``isometry``: that draw made approximately an isometry on the kept weights (``prune.isometry``);
- ``kept-fan-in``: that draw with each unit's kept weights scaled by sqrt(fan_in / kept fan_in),
  the variance-scaling law on the pruned network (``prune.kept_fan_in``,
  :mod:`sparsetrain.init.kept_fan_in`);
- ``orthogonal``: an orthogonal draw instead (``prune.reinit = "orthogonal"``), masked.

Three seeds per cell; the table gives each beside the paper's figure, whether or not it gets
there. Rows (``--rows``): a cell's name, a network (``lenet-300-100``, ``lenet-5-caffe``) or a
variant.

    >>> [c.name for c in CELLS][:4]
    ['spp-table1-lenet300-98-plain', 'spp-table1-lenet300-98-isometry', 'spp-table1-lenet300-98-kept-fan-in', 'spp-table1-lenet300-98-orthogonal']
"""

from __future__ import annotations

from .common import EXPERIMENTS, ReproduceOptions, mean_std, titled
from .grid import Cell, GridResult, raise_failures, run_grid

GROUP = ("experiment", "spp-table1")
#: (recipe, network tag, label, sparsity, the SNIP paper's test error %)
ROWS = (("snip-table1-lenet300-98", "lenet-300-100", "LeNet-300-100", 0.98, 2.4),
        ("snip-table1-lenet5-99", "lenet-5-caffe", "LeNet-5-Caffe", 0.99, 1.1))
#: variant -> (the changes to the recipe, what it is)
VARIANTS = {
    "plain": ({}, "the recipe: a fresh variance-scaling draw (zero biases) under the mask"),
    "isometry": ({"prune": {"isometry": True}}, "that draw made approximately an isometry on the kept weights"),
    "kept-fan-in": ({"prune": {"kept_fan_in": True}}, "that draw, each unit's kept weights x sqrt(fan_in / kept)"),
    "orthogonal": ({"prune": {"reinit": "orthogonal"}}, "an orthogonal draw (zero biases) under the mask"),
}

CELLS = [Cell(f"spp-table1-{recipe.removeprefix('snip-table1-')}-{variant}", recipe, changes,
              tags=(network, variant), info={"network": label, "sparsity": sparsity, "paper": paper,
                                             "variant": variant})
         for recipe, network, label, sparsity, paper in ROWS for variant, (changes, _) in VARIANTS.items()]


@EXPERIMENTS.register("spp-table1")
def reproduce_spp_table1(options: ReproduceOptions) -> None:
    grid = run_grid(CELLS, options, GROUP)
    print(write_table(grid, options.out))
    raise_failures(grid.failures)


def write_table(grid: GridResult, out) -> str:
    """The table (Markdown, JSON beside it) of ``grid``."""

    lines = [
        "# " + titled("Beyond the papers: SNIP's Table 1 hardest rows with signal-propagation repairs", grid.shortened),
        "",
        "Test error (%) mean ± std over the seeds (their number in brackets): *final* is the model at the end of "
        "training, *best val* the checkpoint with the lowest validation error, *min over checks* snip-public's "
        "protocol (it selects on the test set; for comparison only). Everything but the start of the trained "
        "weights is Table 1's recipe (`src/sparsetrain/recipes/snip-table1-*.toml`).",
        "",
        "| network | sparsity | variant | final | best val | min over checks | paper |",
        "|---|---:|---|---|---|---|---:|",
    ]
    data = {"variants": {v: what for v, (_, what) in VARIANTS.items()}, "rows": {}}
    for cell in grid.cells:
        info = cell.info
        final = grid.results(cell.name, "test_error_final")
        best_val = grid.results(cell.name, "test_error_best_val")
        best = grid.results(cell.name, "test_error_min_over_checks")
        lines.append(f"| {info['network']} | {info['sparsity']:.0%} | {info['variant']} | {mean_std(final)} "
                     f"({len(final)}) | {mean_std(best_val)} | {mean_std(best)} | {info['paper']:.1f} |")
        data["rows"][cell.name] = {**info, "test_error_final_pct": [100 * v for v in final],
                                   "test_error_best_val_pct": [100 * v for v in best_val],
                                   "test_error_min_over_checks_pct": [100 * v for v in best],
                                   "keys": [r.key for r in grid.records.get(cell.name, [])]}
    lines += ["", "Variants: " + "; ".join(f"*{v}*: {what}" for v, (_, what) in VARIANTS.items()) + "."]
    return grid.publish(out, lines, data)
