"""Signal-propagation paper (Lee et al., ICLR 2020), section 5.2: pruning without supervision.

SNIP scores connections with the supervised cross-entropy; ``snip-unsupervised``
(:mod:`sparsetrain.pruning.snip_unsupervised`) scores them with the cross-entropy of the softmax
against the uniform distribution, which reads no label. ``sparsetrain reproduce spp-unsupervised``
prunes LeNet-300-100 and LeNet-5-Caffe (MNIST) with both at 90, 95 and 98% sparsity from the same
initialization and pruning batch, trains each mask with Table 1's recipe compressed to
:data:`LENGTH` iterations (its step schedule compressed with it), three seeds, and reports

- the test error after training, supervised beside unsupervised;
- the overlap of the two masks of a seed: the fraction of the kept connections that both keep
  (both keep the same number, the exact top kappa), against what two random masks keeping that
  fraction would share on average, which is 1 - sparsity.

The masks are read back from the store (each run keeps its own in its artifact folder).

    >>> len(CELLS), sorted({c.info["network"] for c in CELLS})
    (12, ['lenet-300-100', 'lenet-5-caffe'])
    >>> {c.config().train.iterations for c in CELLS} == {LENGTH}
    True
"""

from __future__ import annotations

from pathlib import Path

from .common import EXPERIMENTS, ReproduceOptions, mean_std, titled
from .grid import Cell, GridResult, raise_failures, run_grid
from ..measure import new_figure, png_beside, save_png

GROUP = ("experiment", "spp-unsupervised")
#: Table 1's recipes (network -> recipe); only the sparsity and the method change.
RECIPES = {"lenet-300-100": "snip-table1-lenet300-95", "lenet-5-caffe": "snip-table1-lenet5-98"}
SPARSITIES = (0.90, 0.95, 0.98)
METHODS = ("snip", "snip-unsupervised")
#: Iterations per run: Table 1's recipes (60,000 and 30,000) compressed to fit a CPU.
LENGTH = 5000

CELLS = [Cell(f"spp-unsupervised-{net}-{round(s * 100)}-{m}", recipe, {"prune": {"sparsity": s, "method": m}},
              tags=(net, m, str(round(s * 100))), info={"network": net, "sparsity": s, "method": m}, length=LENGTH)
         for net, recipe in RECIPES.items() for s in SPARSITIES for m in METHODS]


@EXPERIMENTS.register("spp-unsupervised")
def reproduce_spp_unsupervised(options: ReproduceOptions) -> None:
    grid = run_grid(CELLS, options, GROUP)
    print(write_table(grid, options.out, options.store))
    raise_failures(grid.failures)


def mask_overlap(a, b) -> float:
    """The fraction of ``a``'s kept entries that ``b`` keeps too (masks: name -> bool tensor)."""
    kept = sum(int(a[n].sum()) for n in a)
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    return both / kept if kept else 0.0


def _masks_by_seed(grid: GridResult, cell: Cell, store: Path) -> dict[int, Path]:
    """seed -> the mask file of the finished run of ``cell`` with that seed."""
    from ..store import RunStore

    finished = {r.key for r in grid.records.get(cell.name, [])}
    runs = RunStore(store)
    out = {}
    for config in grid.configs.get(cell.name, []):
        key = config.key()
        path = runs.artifact_dir(key) / "mask.safetensors"
        if key in finished and path.exists():
            out[config.seed] = path
    return out


def overlaps(grid: GridResult, store: Path) -> dict[tuple[str, float], list[float]]:
    """(network, sparsity) -> the overlap of the supervised and unsupervised masks, per seed that
    both finished."""
    from ..masks import load_mask

    cells = {(c.info["network"], c.info["sparsity"], c.info["method"]): c for c in grid.cells}
    out: dict[tuple[str, float], list[float]] = {}
    for (net, s, m), cell in cells.items():
        other = cells.get((net, s, "snip-unsupervised"))
        if m != "snip" or other is None:
            continue
        sup, unsup = _masks_by_seed(grid, cell, store), _masks_by_seed(grid, other, store)
        out[net, s] = [mask_overlap(load_mask(sup[seed]), load_mask(unsup[seed])) for seed in sorted(sup)
                       if seed in unsup]
    return out


def write_table(grid: GridResult, out, store) -> str:
    """The table (Markdown, JSON beside it) and the figure (``<out stem>.png``) of ``grid``."""
    import statistics


    lines = [
        "# " + titled("Signal-propagation paper: pruning without supervision (SNIP vs unsupervised SNIP, MNIST)",
                      grid.shortened),
        "",
        "Supervised SNIP scores |w dL/dw| with the cross-entropy against the labels; unsupervised SNIP with the "
        "cross-entropy of the softmax against the uniform distribution (no labels; spp-public's `fake_uniform`). "
        "Both score the same initialization and pruning batch (Table 1's recipe: 100 examples, weights and biases, "
        f"variance scaling, a fresh draw trained). Training: Table 1's recipe compressed to {LENGTH:,} iterations "
        "(step schedule compressed with it). Test error (%) at the end of training, mean ± std over the seeds (their "
        "number in brackets). Overlap: the fraction of kept connections both masks keep (same seed), mean ± std; "
        "two random masks at that sparsity share 1 - sparsity of them on average.",
        "",
        "| network | sparsity | SNIP test error | unsupervised test error | mask overlap | random masks |",
        "|---|---:|---|---|---|---:|",
    ]
    shared = overlaps(grid, Path(store))
    by = {(c.info["network"], c.info["sparsity"], c.info["method"]): c for c in grid.cells}
    data: dict = {"length": LENGTH, "recipes": RECIPES, "rows": {}}
    for net in RECIPES:
        for s in SPARSITIES:
            errs = {m: [100 * v for v in grid.results(by[net, s, m].name, "test_error_final")] if (net, s, m) in by
                    else [] for m in METHODS}
            if not any((net, s, m) in by for m in METHODS):
                continue
            ov = shared.get((net, s), [])
            ov_text = f"{statistics.fmean(ov):.3f}" + (f" ± {statistics.stdev(ov):.3f}" if len(ov) > 1 else "") \
                if ov else "-"
            lines.append(f"| {net} | {s:.0%} | {_pct(errs['snip'])} | {_pct(errs['snip-unsupervised'])} | "
                         f"{ov_text} | {1 - s:.3f} |")
            data["rows"][f"{net}-{round(s * 100)}"] = {
                "network": net, "sparsity": s, "test_error_final_pct": errs, "overlap": ov, "random_overlap": 1 - s,
                "keys": {m: [r.key for r in grid.records.get(by[net, s, m].name, [])] for m in METHODS
                         if (net, s, m) in by}}
    if any(row["test_error_final_pct"][m] for row in data["rows"].values() for m in METHODS if m in
           row["test_error_final_pct"]):
        lines += ["", f"![test error and mask overlap against sparsity]({png_beside(out).name})"]
        _plot(data["rows"], png_beside(out), grid.shortened)
    return grid.publish(out, lines, data)


def _pct(values: list[float]) -> str:
    return f"{mean_std([v / 100 for v in values])} ({len(values)})" if values else "-"


def _plot(rows: dict, path, shortened) -> None:
    import statistics

    nets = [n for n in RECIPES if any(r["network"] == n and any(r["test_error_final_pct"].values())
                                      for r in rows.values())]
    fig = new_figure(3.75 * len(nets), 3.0)
    for i, net in enumerate(nets):
        ax = fig.add_subplot(1, len(nets), i + 1)
        mine = [r for r in rows.values() if r["network"] == net]
        for m, style in zip(METHODS, ("o-", "s--")):
            pts = [(100 * r["sparsity"], r["test_error_final_pct"][m]) for r in mine if r["test_error_final_pct"].get(m)]
            if pts:
                ax.errorbar([x for x, _ in pts], [statistics.fmean(v) for _, v in pts],
                            yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts], fmt=style, capsize=3,
                            label="SNIP (labels)" if m == "snip" else "unsupervised SNIP")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test error (%)")
        ax.set_title(net + (" (shortened)" if shortened else ""), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
