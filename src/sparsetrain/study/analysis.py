"""The analysis of a steps-to-result study: K* per point, the fit K* = c1/B + c2, the regimes of
data parallelism, the best metaparameters per point, and the report with its figures.

The input is a list of :class:`~sparsetrain.study.outcome.TrialOutcome` (from the engine, or read
from Shallue et al.'s published layout by :mod:`sparsetrain.study.shallue`); nothing here knows
where they came from.

**K\\*** of a point (workload, batch size B, sparsity) is the fewest steps over its complete trials,
whatever order they are listed in; a point with no complete trial has none and is left out of the
fit. Its *best trial* is the complete trial with that many steps, ties broken by the plan's order
(the lowest plan index), so the table of best metaparameters is the same however a study was run.

**The fit.** Per workload and sparsity, K*(B) = c1/B + c2 (Lee et al. 2021, after Shallue et al.
2019: c1/B is the perfect-scaling term, c2 the floor no batch size goes below), fitted with
c1, c2 >= 0 by least squares **in log space**: the residual of a point is
log(c1/B + c2) - log K*. K* spans orders of magnitude across B (tens of steps to tens of thousands)
and its error is relative (a check every 100 steps; a minimum over a finite plan), so plain least
squares on K* would fit the smallest batch sizes and ignore the large ones; log residuals weigh
every point by its relative error, which is also what a log-log plot shows. The starting point is
the exact minimiser of the relative residuals (c1/B + c2)/K* - 1 (a linear least-squares problem).
Fit quality is given twice: R^2 of log K* and the root-mean-square relative error.

**The critical batch size** c1/c2 is where the two terms are equal (K* is twice its floor c2 and
twice what perfect scaling from small B would give). With f = :data:`REGIME_FACTOR` = 4:

- *linear scaling* for B <= c1/c2 / f: K* is within 1/f (25%) of c1/B, so doubling B still
  cuts the steps by at least 1.67x;
- *maximal data parallelism* for B >= f * c1/c2: K* is within 1/f (25%) of its floor c2, so
  doubling B saves at most 1.11x;
- *diminishing returns* in between.

>>> fit = fit_k_star([8, 16, 32, 64, 128, 256], [12500 + 100, 6250 + 100, 3125 + 100, 1662.5, 881.25, 490.625])
>>> round(fit.c1), round(fit.c2), round(fit.critical_batch_size)
(100000, 100, 1000)
>>> fit.regime(100), fit.regime(1000), fit.regime(5000)
('linear scaling', 'diminishing returns', 'maximal data parallelism')
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from sparsetrain.errors import SparsetrainError
from sparsetrain.study.outcome import TRIAL_STATUSES, TrialOutcome

__all__ = [
    "REGIME_FACTOR",
    "REGIMES",
    "Fit",
    "Point",
    "fit_k_star",
    "fits",
    "plot_k_star",
    "points",
    "report",
]

REGIME_FACTOR = 4.0
"""How far from the critical batch size a regime starts (see the module docstring)."""

REGIMES = ("linear scaling", "diminishing returns", "maximal data parallelism")


@dataclasses.dataclass(frozen=True)
class Point:
    """One (workload, sparsity, batch size): K* (None without a complete trial), the trial that
    reached it first (ties: lowest plan index) and how many trials ended how."""

    workload: str
    sparsity: float
    batch_size: int
    k_star: int | None
    best: TrialOutcome | None
    counts: dict[str, int]

    @property
    def trials(self) -> int:
        return sum(self.counts.values())


def points(outcomes: Iterable[TrialOutcome]) -> list[Point]:
    """K* and the best trial of every point the outcomes measure, sorted by (workload, sparsity,
    batch size). The order of ``outcomes`` does not matter.

    >>> from sparsetrain.study.outcome import TrialOutcome as T
    >>> ts = [T("w", 8, 0.0, 1, {"lr": 0.1}, "complete", 300), T("w", 8, 0.0, 0, {"lr": 0.2}, "complete", 300),
    ...       T("w", 8, 0.0, 2, {"lr": 1.0}, "infeasible", None), T("w", 16, 0.0, 0, {}, "incomplete", None)]
    >>> [(p.batch_size, p.k_star, p.best and p.best.plan_index) for p in points(ts)]
    [(8, 300, 0), (16, None, None)]
    """
    groups: dict[tuple[str, float, int], list[TrialOutcome]] = {}
    for o in outcomes:
        groups.setdefault((o.workload, float(o.sparsity), int(o.batch_size)), []).append(o)
    out = []
    for (workload, sparsity, batch_size), trials in sorted(groups.items()):
        complete = [o for o in trials if o.reached_goal]
        best = min(complete, key=lambda o: (o.steps_to_result, o.plan_index)) if complete else None
        counts = {status: sum(o.status == status for o in trials) for status in TRIAL_STATUSES}
        out.append(Point(workload, sparsity, batch_size, best.steps_to_result if best else None, best, counts))
    return out


@dataclasses.dataclass(frozen=True)
class Fit:
    """K*(B) = c1/B + c2 fitted to ``n`` points (see the module docstring)."""

    c1: float
    c2: float
    r2_log: float  # R^2 of log K* (nan when every K* is the same)
    rms_relative_error: float
    n: int

    @property
    def critical_batch_size(self) -> float:
        """c1/c2: where the perfect-scaling term equals the floor (inf when c2 = 0)."""
        if self.c2 == 0:
            return math.inf
        return self.c1 / self.c2

    def predict(self, batch_size):
        """The fitted K* at ``batch_size`` (a number or an array)."""
        return self.c1 / np.asarray(batch_size, dtype=float) + self.c2

    def regime(self, batch_size: float) -> str:
        """Which of :data:`REGIMES` ``batch_size`` lies in (boundaries: critical / f and critical * f)."""
        critical = self.critical_batch_size
        if batch_size <= critical / REGIME_FACTOR:
            return REGIMES[0]
        if batch_size >= critical * REGIME_FACTOR:
            return REGIMES[2]
        return REGIMES[1]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "critical_batch_size": self.critical_batch_size}


def fit_k_star(batch_sizes: Sequence[float], k_stars: Sequence[float]) -> Fit:
    """Fit K* = c1/B + c2 (c1, c2 >= 0) in log space to two or more points with positive B and K*."""
    from scipy.optimize import least_squares

    b = np.asarray(batch_sizes, dtype=float)
    k = np.asarray(k_stars, dtype=float)
    if b.shape != k.shape or b.ndim != 1:
        raise SparsetrainError(f"fit_k_star needs one K* per batch size; got {b.shape} batch sizes and {k.shape} K*")
    if len(b) < 2 or len(np.unique(b)) < 2:
        raise SparsetrainError(
            f"fitting K* = c1/B + c2 needs K* at two or more batch sizes; got {len(np.unique(b))} "
            "(run the study at more batch sizes, or give trials a larger step budget so more points complete)"
        )
    if not (np.all(np.isfinite(b)) and np.all(np.isfinite(k)) and np.all(b > 0) and np.all(k > 0)):
        raise SparsetrainError(
            f"fit_k_star needs finite positive batch sizes and K*; got B={b.tolist()}, K*={k.tolist()}"
        )
    # Start: the exact minimiser of the relative residuals (c1/B + c2)/K - 1, clipped to > 0.
    design = np.stack([1 / (b * k), 1 / k], axis=1)  # (n, 2)
    start, *_ = np.linalg.lstsq(design, np.ones_like(k), rcond=None)
    start = np.maximum(start, [1e-9 * float(np.min(b * k)), 1e-9 * float(np.min(k))])
    log_k = np.log(k)

    def residuals(c):
        return np.log(c[0] / b + c[1]) - log_k

    solution = least_squares(residuals, start, bounds=([0.0, 0.0], [np.inf, np.inf]), x_scale=start, method="trf")
    # The solver stays strictly inside the bounds; where an edge (c2 = 0: pure 1/B scaling, or
    # c1 = 0: flat) fits as well, the edge is the answer (each has its log-space optimum in closed form).
    candidates = [(float(np.exp(np.mean(log_k + np.log(b)))), 0.0), (0.0, float(np.exp(np.mean(log_k)))),
                  (float(solution.x[0]), float(solution.x[1]))]
    costs = [float(np.sum(residuals(c) ** 2)) for c in candidates]
    best = min(range(3), key=lambda i: (costs[i] > min(costs) + 1e-12 * len(b), i))
    c1, c2 = candidates[best]
    predicted = c1 / b + c2
    ss_res = float(np.sum((np.log(predicted) - log_k) ** 2))
    ss_tot = float(np.sum((log_k - log_k.mean()) ** 2))
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else math.nan
    rms = float(np.sqrt(np.mean((predicted / k - 1) ** 2)))
    return Fit(c1, c2, r2, rms, len(b))


def fits(study_points: Iterable[Point]) -> dict[tuple[str, float], Fit | None]:
    """The fit per (workload, sparsity) over its points with a K* (None: fewer than two)."""
    by_line: dict[tuple[str, float], list[Point]] = {}
    for p in study_points:
        by_line.setdefault((p.workload, p.sparsity), []).append(p)
    out: dict[tuple[str, float], Fit | None] = {}
    for line, ps in sorted(by_line.items()):
        done = [p for p in ps if p.k_star is not None]
        out[line] = fit_k_star([p.batch_size for p in done], [p.k_star for p in done]) if len(done) >= 2 else None
    return out


def _normaliser(ps: list[Point]) -> float | None:
    """What a sparsity's curve is divided by in the normalised panel: K* at its smallest batch size
    that has one (so every curve starts at 1 and the panels compare the scaling, not the level)."""
    done = sorted((p for p in ps if p.k_star is not None), key=lambda p: p.batch_size)
    return float(done[0].k_star) if done else None


def plot_k_star(study_points: Sequence[Point], line_fits: Mapping[tuple[str, float], Fit | None], path: str | Path,
                *, title: str = "") -> Path:
    """Write the K*-against-B figure of one workload to ``path`` (PNG, atomically): a log-log panel
    of K* (markers) and its fit (dashed) per sparsity, with each fit's critical batch size (a
    diamond) and regime boundaries (bars at critical / f and critical * f); a panel of K* normalised
    by its value at the smallest batch size; and one panel per fitted sparsity shading its three
    regimes."""
    from sparsetrain.measure import new_figure, save_png

    lines: dict[float, list[Point]] = {}
    for p in study_points:
        lines.setdefault(p.sparsity, []).append(p)
    fitted = [s for s in sorted(lines) if line_fits.get((lines[s][0].workload, s)) is not None]
    panels = 2 + len(fitted)
    fig = new_figure(4.2 * min(panels, 4), 3.6 * math.ceil(panels / 4))
    rows, cols = math.ceil(panels / 4), min(panels, 4)
    raw, normalised = fig.add_subplot(rows, cols, 1), fig.add_subplot(rows, cols, 2)
    colours = {s: f"C{i % 10}" for i, s in enumerate(sorted(lines))}
    all_b = sorted({p.batch_size for p in study_points})
    grid = np.geomspace(all_b[0], all_b[-1], 200) if all_b else np.array([])
    for sparsity, ps in sorted(lines.items()):
        ps = sorted((p for p in ps if p.k_star is not None), key=lambda p: p.batch_size)
        colour, label = colours[sparsity], f"sparsity {sparsity:g}"
        if not ps:
            continue
        b = [p.batch_size for p in ps]
        k = np.array([p.k_star for p in ps], dtype=float)
        raw.plot(b, k, "o-", color=colour, label=label, ms=4)
        normalised.plot(b, k / _normaliser(ps), "o-", color=colour, label=label, ms=4)
        fit = line_fits.get((ps[0].workload, sparsity))
        if fit is None:
            continue
        raw.plot(grid, fit.predict(grid), "--", color=colour, lw=1)
        critical = fit.critical_batch_size
        if math.isfinite(critical) and critical > 0:
            raw.plot([critical], [fit.predict(critical)], "D", color=colour, ms=6, mfc="white")
            for edge in (critical / REGIME_FACTOR, critical * REGIME_FACTOR):
                if grid[0] <= edge <= grid[-1]:
                    raw.plot([edge], [fit.predict(edge)], "|", color=colour, ms=14, mew=2)
    for ax, ylabel in ((raw, "steps to result K*"), (normalised, "K* / K* at the smallest B")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing reached the goal: no lines, no legend
            ax.legend(fontsize=7)
    raw.set_title(title or "K* (dashed: c1/B + c2; diamond: c1/c2)", fontsize=8)
    normalised.set_title("normalised", fontsize=8)
    for i, sparsity in enumerate(fitted):
        ax = fig.add_subplot(rows, cols, 3 + i)
        ps = sorted((p for p in lines[sparsity] if p.k_star is not None), key=lambda p: p.batch_size)
        fit = line_fits[(ps[0].workload, sparsity)]
        _shade_regimes(ax, fit, grid[0], grid[-1])
        ax.plot([p.batch_size for p in ps], [p.k_star for p in ps], "o", color=colours[sparsity], ms=4)
        ax.plot(grid, fit.predict(grid), "--", color=colours[sparsity], lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_title(f"sparsity {sparsity:g}: c1/c2 = {fit.critical_batch_size:.3g}", fontsize=8)
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return save_png(fig, path)


def _shade_regimes(ax, fit: Fit, low: float, high: float) -> None:
    critical = fit.critical_batch_size
    edges = [low, min(max(critical / REGIME_FACTOR, low), high), min(max(critical * REGIME_FACTOR, low), high), high]
    for (a, z), name, colour in zip(zip(edges, edges[1:]), REGIMES, ("tab:green", "tab:orange", "tab:red")):
        if z > a:
            ax.axvspan(a, z, color=colour, alpha=0.15, label=name)


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _slug(workload: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in workload)


def report(outcomes: Iterable[TrialOutcome], out_dir: str | Path, *, lipschitz: Sequence = (),
           provenance=None, title: str = "Steps to result") -> str:
    """Analyse ``outcomes`` and write ``out_dir/report.md`` with ``report.json`` beside it
    (:func:`sparsetrain.measure.write_report`), one K* figure per workload (``k_star-<workload>.png``)
    and, for a workload with curves in ``lipschitz`` (:class:`~sparsetrain.study.lipschitz.LipschitzCurve`,
    as :func:`~sparsetrain.study.lipschitz.measure_study` returns them), ``lipschitz-<workload>.png``;
    return the Markdown.

    The Markdown has, per workload, the table of points (K*, trials by status, the regime, the best
    trial's metaparameters), the table of fits (c1, c2, c1/c2, R^2 in log space, RMS relative
    error) and, with curves, where each came from (the trial, B, steps, interval, examples).
    ``provenance``: a :class:`sparsetrain.measure.Provenance` for the footer, or None."""
    from sparsetrain.measure import write_report

    outcomes = list(outcomes)
    if not outcomes:
        raise SparsetrainError("no trial outcomes to report on: run the study first (`sparsetrain study work`)")
    out_dir = Path(out_dir)
    study_points = points(outcomes)
    line_fits = fits(study_points)
    md = [f"# {title}", ""]
    data: dict = {"regime_factor": REGIME_FACTOR, "workloads": {}}
    for workload in sorted({p.workload for p in study_points}):
        ps = [p for p in study_points if p.workload == workload]
        figure = plot_k_star(ps, line_fits, out_dir / f"k_star-{_slug(workload)}.png", title=workload)
        md += [f"## {workload}", "", _points_table(ps, line_fits), "", "Fits of K* = c1/B + c2 (least squares in "
               f"log space; regimes: linear scaling up to c1/c2 / {REGIME_FACTOR:g}, maximal data parallelism "
               f"from c1/c2 * {REGIME_FACTOR:g}):", "", _fits_table(workload, ps, line_fits), "",
               f"![K* against B]({figure.name})", ""]
        data["workloads"][workload] = {
            "points": [_point_dict(p, line_fits.get((p.workload, p.sparsity))) for p in ps],
            "fits": {f"{s:g}": (f.to_dict() if f else None) for (w, s), f in line_fits.items() if w == workload},
        }
        curves = sorted((c for c in lipschitz if c.workload == workload), key=lambda c: c.sparsity)
        if curves:
            md += _lipschitz_section(workload, curves, out_dir)
            data["workloads"][workload]["lipschitz"] = [c.to_dict() for c in curves]
    text = "\n".join(md)
    write_report(out_dir / "report.md", text, data, provenance=provenance)
    return text


def _lipschitz_section(workload: str, curves: list, out_dir: Path) -> list[str]:
    """The Markdown of a workload's Lipschitz curves: where each came from, its figure."""
    from sparsetrain.study.lipschitz import plot_lipschitz

    sizes = sorted({c.batch_size for c in curves})
    figure = plot_lipschitz({c.sparsity: c.values for c in curves}, out_dir / f"lipschitz-{_slug(workload)}.png",
                            title=f"{workload}, B = {', '.join(map(str, sizes))}")
    rows = ["| sparsity | B | best trial | its metaparameters | K* | steps trained | goal reached (retrained) | "
            "every | examples | L (first .. last) | max L |", "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for c in curves:
        finite = [v for _, v in c.values if math.isfinite(v)]
        span, peak = (f"{finite[0]:.4g} .. {finite[-1]:.4g}", f"{max(finite):.4g}") if finite else ("-", "-")
        reached = c.goal_reached_at if c.goal_reached_at is not None else "no"
        rows.append(f"| {c.sparsity:g} | {c.batch_size} | {c.plan_index} | {_params_text(c.params)} | {c.k_star} | "
                    f"{c.steps} | {reached} | {c.every} | {c.examples if c.examples is not None else 'all'} | "
                    f"{span} | {peak} |")
    return ["### Lipschitz smoothness", "",
            "L = max over gamma in {0.1, ..., 0.9} of ||g(w + gamma d) - g(w)|| / ||gamma d|| for the step d "
            "between steps k - 1 and k, g the full-batch training gradient over the first `examples` training "
            "examples (effect-dps-public: all of them, every 1000 steps). Each curve retrains one sparsity's best "
            "trial (the one that set K*) at batch size B: its metaparameters, its seed (the plan index) and the "
            "study's mask (`sparsetrain study lipschitz`). 'goal reached' is the retrained run's first check at "
            "or below the goal: K* when the retraining reproduced the trial.", "", "\n".join(rows), "",
            f"![Lipschitz constant against steps]({figure.name})", ""]


def _point_dict(p: Point, fit: Fit | None) -> dict:
    return {
        "sparsity": p.sparsity, "batch_size": p.batch_size, "k_star": p.k_star, "counts": p.counts,
        "regime": fit.regime(p.batch_size) if fit else None,
        "best_plan_index": p.best.plan_index if p.best else None, "best_params": p.best.params if p.best else None,
    }


def _points_table(ps: list[Point], line_fits) -> str:
    rows = ["| sparsity | B | K* | complete / trials | infeasible | regime | best trial | its metaparameters |",
            "|---:|---:|---:|---:|---:|---|---:|---|"]
    for p in ps:
        fit = line_fits.get((p.workload, p.sparsity))
        rows.append(
            f"| {p.sparsity:g} | {p.batch_size} | {p.k_star if p.k_star is not None else '-'} | "
            f"{p.counts['complete']} / {p.trials} | {p.counts['infeasible']} | "
            f"{fit.regime(p.batch_size) if fit else '-'} | {p.best.plan_index if p.best else '-'} | "
            f"{_params_text(p.best.params) if p.best else '-'} |"
        )
    return "\n".join(rows)


def _fits_table(workload: str, ps: list[Point], line_fits) -> str:
    rows = ["| sparsity | c1 | c2 | critical B = c1/c2 | R^2 (log K*) | RMS relative error | points |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for sparsity in sorted({p.sparsity for p in ps}):
        fit = line_fits.get((workload, sparsity))
        if fit is None:
            rows.append(f"| {sparsity:g} | - | - | - | - | - | fewer than 2 with a K* |")
        else:
            rows.append(f"| {sparsity:g} | {fit.c1:.4g} | {fit.c2:.4g} | {fit.critical_batch_size:.4g} | "
                        f"{fit.r2_log:.3f} | {fit.rms_relative_error:.1%} | {fit.n} |")
    return "\n".join(rows)
