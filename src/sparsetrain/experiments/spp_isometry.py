"""Signal-propagation paper (Lee et al., ICLR 2020), experiment 3: approximate isometry.

``sparsetrain reproduce spp-isometry`` trains SNIP masks at :data:`SPARSITY` with and without
approximate isometry (``prune.isometry``: the kept weights repaired towards orthogonality before
training) for ``mlp-7`` linear and tanh and ``lenet-5-caffe`` on MNIST, from Table 1's recipes
(SGD momentum 0.9, lr 0.1, batch 100) fitted to this CPU at :data:`LENGTH` iterations (their step
schedule compressed with them), recorded runs in the store. It reports the training loss and
error curves (logged every 50 iterations), the training loss at iteration :data:`AT` (the issue's
check: with isometry lower than without on mlp-7-linear), the test error, and the input-output
JSV before pruning, after pruning and after isometry (:func:`sparsetrain.signal.stages.signal_stages`
of the cell's config, seed 0, on :data:`JSV_EXAMPLES` test images).

    >>> len(CELLS), sorted({c.info["network"] for c in CELLS})
    (6, ['lenet-5-caffe', 'mlp-7-linear', 'mlp-7-tanh'])
"""

from __future__ import annotations

import statistics

from ..signal.stages import STAGES, signal_stages
from .common import EXPERIMENTS, ReproduceOptions, mean_std, titled
from .grid import Cell, GridResult, curves_of, raise_failures, run_grid
from ..measure import new_figure, png_beside, save_png

GROUP = ("experiment", "spp-isometry")
SPARSITY = 0.9
LENGTH = 2000
AT = 1000
JSV_EXAMPLES = 100
NETWORKS = {
    "mlp-7-linear": ("snip-table1-lenet300-95", {"model": "mlp-7", "model_args": {"activation": "linear"}}),
    "mlp-7-tanh": ("snip-table1-lenet300-95", {"model": "mlp-7", "model_args": {"activation": "tanh"}}),
    "lenet-5-caffe": ("snip-table1-lenet5-98", {}),
}

CELLS = [Cell(f"spp-isometry-{net}-{'iso' if iso else 'plain'}", recipe,
              {**changes, "prune": {"sparsity": SPARSITY, "isometry": iso}},
              tags=(net, "isometry" if iso else "plain"), info={"network": net, "isometry": iso}, length=LENGTH)
         for net, (recipe, changes) in NETWORKS.items() for iso in (False, True)]


def _loss(values: list) -> str:
    """Mean ± std of losses (not percentages, unlike :func:`mean_std`)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _at(curve, step):
    """The curve's value at the last logged iteration <= ``step`` (None if none)."""
    before = [v for s, v in (curve or []) if s <= step]
    return before[-1] if before else None


@EXPERIMENTS.register("spp-isometry")
def reproduce_spp_isometry(options: ReproduceOptions) -> None:
    grid = run_grid(CELLS, options, GROUP)
    print(write_table(grid, options.out, options.store, options.data_dir))
    raise_failures(grid.failures)


def write_table(grid: GridResult, out, store, data_dir=None) -> str:

    length = grid.configs[grid.cells[0].name][0].train.iterations if grid.cells else LENGTH
    lines = ["# " + titled("Signal-propagation paper, experiment 3: training with and without approximate isometry",
                           grid.shortened), "",
             f"SNIP at {SPARSITY:.0%} sparsity, Table 1's recipes (SGD momentum 0.9, lr 0.1, batch 100) for "
             f"{length:,} iterations, the step schedule compressed with them. *train loss @{AT}*: the mean training "
             f"loss over iterations {AT - 49}-{AT} (a shorter run: its last 50). Errors in %. Mean ± std over the "
             "seeds (their number in brackets). JSV: "
             f"input-output, seed 0, {JSV_EXAMPLES} test images.", "",
             f"| network | isometry | train loss @{AT} | train loss (end) | train error (end) | test error | "
             "JSV mean: before / after pruning / after isometry |",
             "|---|---|---|---|---|---|---|"]
    data: dict = {"sparsity": SPARSITY, "at": AT, "rows": {}}
    by_network: dict[str, list] = {}
    for cell in grid.cells:
        records = grid.records.get(cell.name, [])
        curves = [curves_of(store, r) for r in records]
        at = [_at(c.get("train_loss"), AT) for c in curves]
        end_loss = [_at(c.get("train_loss"), 10**12) for c in curves]
        end_error = [_at(c.get("train_error"), 10**12) for c in curves]
        test = grid.results(cell.name, "test_error_final")
        jsv = {}
        if not cell.info["isometry"]:  # the stages are the same for both cells of a network
            report = signal_stages(grid.configs[cell.name][0], data_dir=data_dir, examples=JSV_EXAMPLES,
                                   layer_examples=10)
            jsv = {stage: report.input_output[stage].to_dict() for stage in STAGES if stage in report.input_output}
        jsv_text = " / ".join(f"{jsv[s]['mean']:.3g}" for s in STAGES if s in jsv) or "(see the row above)"
        lines.append(f"| {cell.info['network']} | {'yes' if cell.info['isometry'] else 'no'} | {_loss(at)} "
                     f"({len(records)}) | {_loss(end_loss)} | {mean_std(end_error)} | {mean_std(test)} | "
                     f"{jsv_text} |")
        data["rows"][cell.name] = {**cell.info, "train_loss_at": at, "train_loss_end": end_loss,
                                   "train_error_end": end_error, "test_error_final": test, "jsv": jsv,
                                   "keys": [r.key for r in records]}
        if curves:
            by_network.setdefault(cell.info["network"], []).append((cell, curves))
    for network, entries in by_network.items():
        path = png_beside(out, f"_{network}")
        fig = new_figure(8.0, 3.0)
        for k, metric in enumerate(("train_loss", "train_error")):
            ax = fig.add_subplot(1, 2, k + 1)
            for cell, curves in entries:
                for i, c in enumerate(curves):
                    points = c.get(metric) or []
                    ax.plot([s for s, _ in points], [v for _, v in points], color="C1" if cell.info["isometry"] else "C0",
                            label=("isometry" if cell.info["isometry"] else "no isometry") if i == 0 else None)
            ax.set_xlabel("iteration")
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_title(network, fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_png(fig, path)
        lines += ["", f"![{network}: training loss and error]({path.name})"]
    return grid.publish(out, lines, data)
