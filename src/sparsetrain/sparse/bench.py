"""Measure sparse execution: the dense masked model against the model :func:`to_sparse` builds.

:func:`bench` prunes a model (SNIP on a random batch of real shape by default), then, for each
batch size, converts it with ``to_sparse(model, mask, batch_size=B)`` (auto-choice: each layer
keeps whichever of dense / CSR timed fastest on its real input) and reports, per layer and end to
end, the dense and the sparse latency, the layout chosen, the weight memory (dense bytes against
stored bytes, from :func:`sparse_report`) and how close the speed-up comes to the FLOP-count limit
1 / (1 - sparsity). :func:`sweep` measures the end-to-end speed-up against sparsity for several
batch sizes and :func:`plot_sweep` draws it. ``sparsetrain bench`` is the command for both.

    >>> from sparsetrain.sparse.bench import END_TO_END, bench
    >>> result = bench("mlp-tiny", 0.9, batch_sizes=[1, 8], repeats=3, budget_s=0.05)
    >>> [r.batch_size for r in result.rows if r.layer == END_TO_END]
    [1, 8]
    >>> print(result.to_markdown())                    # doctest: +SKIP

How the times are taken. Per layer: the medians ``to_sparse`` measured while choosing (every
candidate timed on a random input of the layer's recorded input shape, interleaved; see
:mod:`sparsetrain.sparse.convert`); a layer that stayed dense has its dense time on both sides.
End to end: the dense masked model and the converted one called in turns on the same random batch
under ``torch.no_grad()``, one call of each per round, the order alternating; the times are
medians over rounds and the speed-up is the median over rounds of (dense / sparse) in the same
round, so a slow phase of a busy machine hits both; a sample is several back-to-back calls when
one call is shorter than a millisecond. ``repeats`` bounds the rounds, ``budget_s`` the seconds
spent per measurement (at least ``MIN_ROUNDS`` rounds), so large batches of big models take fewer
rounds.

The FLOP-count limit of a layer is 1 / (1 - s) with s the fraction of its weight entries that are
zero (``inf`` for an all-zero weight); end to end, s is the mask's overall sparsity (pruned /
masked entries). It counts multiply-adds of the weights only: biases, activations, im2col and
the layers the mask does not cover are why a whole model stays further from it than a layer.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from ..machine import cpu_model
from ..masks import Mask, apply_mask_
from ..models import create_model
from ..pruning import prune_at_init
from ..pruning.select import check_sparsity
from .convert import sparse_report, to_sparse
from .kernels import extension_available, extension_error

__all__ = [
    "BenchResult",
    "BenchRow",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_SWEEP",
    "END_TO_END",
    "SweepPoint",
    "SweepResult",
    "bench",
    "environment",
    "flop_limit",
    "format_environment",
    "make_mask",
    "plot_sweep",
    "sweep",
    "time_interleaved",
    "write_report",
]

DEFAULT_BATCH_SIZES = (1, 64, 1024)
DEFAULT_SWEEP = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
END_TO_END = "end to end"
MIN_ROUNDS = 5
SCORE_BATCH = 100  # examples in the random batch SNIP scores (the paper's MNIST mini-batch)

Progress = Callable[[str], None] | None


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class BenchRow:
    """One layer (or the whole model, ``layer == END_TO_END``) at one batch size.

    ``layout``: ``"dense"``, ``"csr:kernel"``, ``"csr:torch"``, ``"bsr"`` or ``"semi"`` for a layer;
    ``"k/n csr"`` end to end (k of the n Linear/Conv2d layers converted; ``"k/n bsr+csr"`` when
    other layouts were chosen too). Times in seconds; ``speedup`` = dense /
    sparse (end to end: median of the per-round ratios); ``flop_limit`` = 1 / (1 - sparsity);
    ``candidates``: every layout's median time at conversion (layers only)."""

    batch_size: int
    layer: str
    kind: str
    layout: str
    shape: tuple[int, ...]
    nnz: int
    sparsity: float
    dense_bytes: int
    stored_bytes: int
    dense_time: float
    sparse_time: float
    speedup: float
    flop_limit: float
    candidates: dict[str, float] = field(default_factory=dict)

    @property
    def of_limit(self) -> float:
        """The measured speed-up as a fraction of the FLOP-count limit."""
        return 0.0 if math.isinf(self.flop_limit) else self.speedup / self.flop_limit


@dataclass
class BenchResult:
    """What :func:`bench` measured: ``rows`` (per layer, then end to end, for each batch size)."""

    model: str
    method: str
    structure: str
    sparsity: float | None
    mask_sparsity: float
    batch_sizes: list[int]
    input_shape: list[int]
    threads: int
    kernel: str
    rows: list[BenchRow]
    max_abs_diff: dict[int, float]

    def end_to_end(self, batch_size: int) -> BenchRow:
        return next(r for r in self.rows if r.batch_size == batch_size and r.layer == END_TO_END)

    def layers(self, batch_size: int) -> list[BenchRow]:
        return [r for r in self.rows if r.batch_size == batch_size and r.layer != END_TO_END]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [_row_dict(r) for r in self.rows]
        d["max_abs_diff"] = {str(k): v for k, v in self.max_abs_diff.items()}
        return d

    def to_markdown(self) -> str:
        structure = f", structure {self.structure}" if self.structure else ""
        lines = [
            f"## {self.model}: {self.method} mask at {self.mask_sparsity:.2%} sparsity{structure}, "
            f"{self.threads} thread{'s' if self.threads != 1 else ''}",
            "",
            f"Dense masked model against `to_sparse(model, mask, batch_size=B)` (auto-choice), input "
            f"{tuple(self.input_shape)}; CSR kernels: {self.kernel}. Per layer: the medians timed at "
            "conversion; end to end: same-process interleaved rounds, median of per-round ratios. "
            "Bytes: Linear/Conv2d weights and biases as stored (`sparse_report`). "
            "FLOP limit = 1/(1 - sparsity); \"of limit\" = speed-up / FLOP limit.",
            "",
            "| batch | layer | kind | shape | layout | nnz | sparsity | dense bytes | stored bytes | stored "
            "| dense ms | sparse ms | speed-up | FLOP limit | of limit |",
            "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            name = f"**{r.layer}**" if r.layer == END_TO_END else f"`{r.layer}`"
            speed = f"**{r.speedup:.2f}x**" if r.layer == END_TO_END else f"{r.speedup:.2f}x"
            shape = "x".join(str(s) for s in r.shape)
            frac = f"{r.stored_bytes / r.dense_bytes:.1%}" if r.dense_bytes else "-"
            lines.append(
                f"| {r.batch_size} | {name} | {r.kind} | {shape} | {r.layout} | {r.nnz:,} | {r.sparsity:.2%} "
                f"| {r.dense_bytes:,} | {r.stored_bytes:,} | {frac} | {_ms(r.dense_time)} | {_ms(r.sparse_time)} "
                f"| {speed} | {_limit(r.flop_limit)} | {r.of_limit:.0%} |"
            )
        diffs = ", ".join(f"batch {b}: {d:.1e}" for b, d in self.max_abs_diff.items())
        lines += ["", f"Converted vs dense masked outputs, max |difference|: {diffs}."]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SweepPoint:
    """End-to-end speed-up of the converted model at one sparsity and batch size."""

    sparsity: float
    mask_sparsity: float
    batch_size: int
    dense_time: float
    sparse_time: float
    speedup: float
    flop_limit: float
    layout: str


@dataclass
class SweepResult:
    """What :func:`sweep` measured; ``points`` ordered by sparsity, then batch size."""

    model: str
    method: str
    structure: str
    batch_sizes: list[int]
    input_shape: list[int]
    threads: int
    kernel: str
    points: list[SweepPoint]

    @property
    def sparsities(self) -> list[float]:
        return sorted({p.sparsity for p in self.points})

    def point(self, sparsity: float, batch_size: int) -> SweepPoint:
        return next(p for p in self.points if p.sparsity == sparsity and p.batch_size == batch_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [{**asdict(p), "flop_limit": _finite(p.flop_limit)} for p in self.points]
        return d

    def to_markdown(self) -> str:
        structure = f", structure {self.structure}" if self.structure else ""
        lines = [
            f"## {self.model}: end-to-end speed-up against sparsity ({self.method} masks{structure}, "
            f"{self.threads} thread{'s' if self.threads != 1 else ''})",
            "",
            "Speed-up = dense masked model time / `to_sparse` model time (median of same-process "
            f"per-round ratios; below 1 is slower); in brackets the layers converted. CSR kernels: {self.kernel}.",
            "",
            "| sparsity | FLOP limit | " + " | ".join(f"batch {b}" for b in self.batch_sizes) + " |",
            "|---:|---:|" + "---:|" * len(self.batch_sizes),
        ]
        for s in self.sparsities:
            cells = []
            for b in self.batch_sizes:
                p = self.point(s, b)
                cells.append(f"{p.speedup:.2f}x ({p.layout})")
            lines.append(f"| {s:.2%} | {_limit(flop_limit(s))} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _row_dict(r: BenchRow) -> dict:
    d = asdict(r)
    d["flop_limit"] = _finite(r.flop_limit)
    d["of_limit"] = r.of_limit
    return d


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def _ms(t: float) -> str:
    return f"{t * 1e3:.4f}" if t < 1e-3 else f"{t * 1e3:.3f}"


def _limit(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}x"


def flop_limit(sparsity: float) -> float:
    """1 / (1 - sparsity): the speed-up if time were proportional to the weights multiplied."""
    return math.inf if sparsity >= 1.0 else 1.0 / (1.0 - sparsity)


# ----------------------------------------------------------------------------- timing


def time_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int = 30, warmup: int = 2,
                     budget_s: float | None = 2.0, min_rounds: int = MIN_ROUNDS,
                     min_sample_s: float = 1e-3) -> dict[str, list[float]]:
    """Seconds per call of each function over rounds that call every one in turn, in alternating
    order (A B C, C B A, ...), after ``warmup`` untimed rounds; garbage collection off. A sample
    times ``number`` back-to-back calls (the same for all functions, enough that the fastest
    takes ``min_sample_s``: single microsecond calls are mostly timer and scheduler noise) and
    is divided by it. The round count is ``repeats``, cut to what fits in ``budget_s`` seconds
    (but at least ``min_rounds``). Pair the lists index by index for same-round ratios."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        first: dict[str, float] = {}
        for _ in range(max(1, warmup)):
            for n in names:
                t = time.perf_counter()
                fns[n]()
                first[n] = time.perf_counter() - t  # the last warm-up call
        number = max(1, math.ceil(min_sample_s / max(min(first.values()), 1e-9)))
        per_round = number * sum(first.values())
        rounds = repeats
        if budget_s is not None:
            rounds = max(min(min_rounds, repeats), min(repeats, int(budget_s / max(per_round, 1e-9))))
        for r in range(rounds):
            for n in names if r % 2 == 0 else reversed(names):
                fn = fns[n]
                t = time.perf_counter()
                for _ in range(number):
                    fn()
                samples[n].append((time.perf_counter() - t) / number)
    finally:
        gc.enable()
    return samples


def _paired_speedup(samples: dict[str, list[float]], ref: str, name: str) -> float:
    """Median over rounds of (time of ``ref`` / time of ``name``)."""
    return statistics.median(a / b for a, b in zip(samples[ref], samples[name]))


@contextlib.contextmanager
def _threads(threads: int | None):
    if threads is None:
        yield
        return
    if threads < 1:
        raise SparsetrainError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- set-up


def _build(model: str | nn.Module, input_shape, num_classes: int, seed: int) -> tuple[str, nn.Module]:
    if isinstance(model, str):
        torch.manual_seed(seed)
        return model, create_model(model, input_shape=tuple(input_shape), num_classes=num_classes).eval()
    if isinstance(model, nn.Module):
        return type(model).__name__, copy.deepcopy(model).eval()
    raise SparsetrainError(f"model must be a registered model name or an nn.Module, got {type(model).__name__}")


def make_mask(model: nn.Module, sparsity: float | None, *, method: str = "snip", structure: str = "",
              input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, seed: int = 0) -> Mask:
    """``prune_at_init`` scored on one random batch of real shape (``SCORE_BATCH`` examples of
    ``input_shape``, N(0, 1) inputs, uniform labels); ``method="random"`` ignores the batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((SCORE_BATCH, *input_shape), generator=g)
    y = torch.randint(0, num_classes, (SCORE_BATCH,), generator=g)
    try:
        return prune_at_init(model, method, sparsity=sparsity, batches=(x, y), seed=seed, structure=structure)
    except SparsetrainError:
        raise
    except Exception as exc:
        raise SparsetrainError(
            f"scoring a random batch of shape {tuple(x.shape)} failed ({type(exc).__name__}: {exc}); pass the shape "
            "of one example as input_shape (--input-shape C H W) and the model's number of outputs as num_classes"
        ) from exc


def _mask_sparsity(mask: Mask) -> float:
    total = sum(m.numel() for m in mask.values())
    return 1.0 - sum(int(m.sum()) for m in mask.values()) / total if total else 0.0


def _check_inputs(sparsity, structure: str, batch_sizes, repeats: int, has_mask: bool = False) -> list[int]:
    if sparsity is None:
        if not structure and not has_mask:
            raise SparsetrainError("give a sparsity in [0, 1), e.g. 0.98 (only an N:M structure implies one)")
    else:
        check_sparsity(sparsity)
    sizes = list(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise SparsetrainError(f"batch sizes must be positive integers, e.g. 1 64 1024; got {sizes}")
    if repeats < 1:
        raise SparsetrainError(f"repeats must be at least 1, got {repeats}")
    return sizes


def _kernel_note() -> str:
    if extension_available():
        return "C++/OpenMP kernel and torch CSR"
    return f"torch CSR only (C++ kernel unavailable: {extension_error()})"


def _layouts(report) -> str:
    """"k/n csr" (k of n layers converted), or e.g. "k/n bsr+csr" when other layouts were chosen."""
    kinds = sorted({r.layout for r in report if r.layout != "dense"}) or ["csr"]
    return f"{sum(r.layout != 'dense' for r in report)}/{len(report)} {'+'.join(kinds)}"


def _end_to_end(dense: nn.Module, fast: nn.Module, x: torch.Tensor, repeats: int, budget_s: float):
    with torch.no_grad():
        samples = time_interleaved({"dense": lambda: dense(x), "sparse": lambda: fast(x)},
                                   repeats=repeats, budget_s=budget_s)
    return (statistics.median(samples["dense"]), statistics.median(samples["sparse"]),
            _paired_speedup(samples, "dense", "sparse"))


# ----------------------------------------------------------------------------- bench


def bench(
    model: str | nn.Module,
    sparsity: float | None,
    *,
    method: str = "snip",
    structure: str = "",
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    mask: Mask | None = None,
    repeats: int = 20,
    budget_s: float = 1.0,
    threads: int | None = None,
    seed: int = 0,
    progress: Progress = None,
) -> BenchResult:
    """Dense masked ``model`` against ``to_sparse(model, mask, batch_size=B)`` for each batch size:
    per-layer and end-to-end latency, layout chosen, weight bytes, speed-up and FLOP limit.

    ``model``: a registered name (built for ``input_shape`` / ``num_classes``, seeded) or a module
    (copied; a bare ``nn.Linear`` must sit in a container, e.g. ``nn.Sequential(linear)``).
    ``mask``: used as given, else :func:`make_mask` with ``method``, ``sparsity``, ``structure``.
    ``repeats``: most timed rounds per measurement (also ``to_sparse``'s repeats); ``budget_s``:
    seconds per end-to-end measurement; ``threads``: ``torch.set_num_threads`` during the call.
    """
    sizes = _check_inputs(sparsity, structure, batch_sizes, repeats, has_mask=mask is not None)
    say = progress or (lambda _msg: None)
    with _threads(threads):
        name, base = _build(model, input_shape, num_classes, seed)
        if mask is None:
            mask = make_mask(base, sparsity, method=method, structure=structure, input_shape=input_shape,
                             num_classes=num_classes, seed=seed)
        dense = apply_mask_(copy.deepcopy(base), mask).eval()
        g = torch.Generator().manual_seed(seed + 1)
        rows: list[BenchRow] = []
        diffs: dict[int, float] = {}
        for b in sizes:
            say(f"{name}: batch {b}: converting (timing each layer) ...")
            fast = to_sparse(base, mask, batch_size=b, input_shape=tuple(input_shape), repeats=repeats).eval()
            report = sparse_report(fast)
            for r in report:
                weight_entries = math.prod(r.shape)
                s = 1.0 - r.nnz / weight_entries
                chosen = r.choice
                times = (getattr(fast.get_submodule(r.name), "sparse_choice", None) or {}).get("times", {})
                d_t = r.dense_time if r.dense_time is not None else float("nan")
                s_t = (r.sparse_time if r.layout != "dense" else r.dense_time)
                s_t = s_t if s_t is not None else float("nan")
                rows.append(BenchRow(
                    batch_size=b, layer=r.name, kind=r.kind, layout=chosen, shape=tuple(r.shape), nnz=r.nnz,
                    sparsity=s, dense_bytes=r.dense_bytes, stored_bytes=r.stored_bytes, dense_time=d_t,
                    sparse_time=s_t, speedup=d_t / s_t if s_t else float("nan"), flop_limit=flop_limit(s),
                    candidates=dict(times),
                ))
            say(f"{name}: batch {b}: timing end to end ...")
            x = torch.randn((b, *input_shape), generator=g)
            d_t, s_t, speed = _end_to_end(dense, fast, x, repeats, budget_s)
            with torch.no_grad():
                diffs[b] = float((fast(x) - dense(x)).abs().max())
            total = report.total
            s = _mask_sparsity(mask)
            rows.append(BenchRow(
                batch_size=b, layer=END_TO_END, kind="model", layout=_layouts(report), shape=(), nnz=total.nnz,
                sparsity=s, dense_bytes=total.dense_bytes, stored_bytes=total.stored_bytes, dense_time=d_t,
                sparse_time=s_t, speedup=speed, flop_limit=flop_limit(s),
            ))
        return BenchResult(name, method, structure, sparsity, _mask_sparsity(mask), sizes, list(input_shape),
                           torch.get_num_threads(), _kernel_note(), rows, diffs)


# ----------------------------------------------------------------------------- sweep and plot


def sweep(
    model: str | nn.Module,
    sparsities: Iterable[float] = DEFAULT_SWEEP,
    *,
    method: str = "snip",
    structure: str = "",
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    repeats: int = 20,
    budget_s: float = 1.0,
    threads: int | None = None,
    seed: int = 0,
    progress: Progress = None,
) -> SweepResult:
    """End-to-end speed-up of ``to_sparse`` (auto-choice) over the dense masked model for every
    sparsity and batch size (one mask per sparsity, same model weights); options as :func:`bench`."""
    levels = [float(s) for s in sparsities]
    if not levels:
        raise SparsetrainError("give at least one sparsity to sweep, e.g. 0.5 0.9 0.99")
    for s in levels:
        check_sparsity(s)
    sizes = _check_inputs(levels[0], structure, batch_sizes, repeats)
    say = progress or (lambda _msg: None)
    with _threads(threads):
        name, base = _build(model, input_shape, num_classes, seed)
        g = torch.Generator().manual_seed(seed + 1)
        points = []
        for s in sorted(levels):
            mask = make_mask(base, s, method=method, structure=structure, input_shape=input_shape,
                             num_classes=num_classes, seed=seed)
            dense = apply_mask_(copy.deepcopy(base), mask).eval()
            ms_ = _mask_sparsity(mask)
            for b in sizes:
                say(f"{name}: sparsity {s:g}, batch {b} ...")
                fast = to_sparse(base, mask, batch_size=b, input_shape=tuple(input_shape), repeats=repeats).eval()
                x = torch.randn((b, *input_shape), generator=g)
                d_t, s_t, speed = _end_to_end(dense, fast, x, repeats, budget_s)
                points.append(SweepPoint(s, ms_, b, d_t, s_t, speed, flop_limit(ms_), _layouts(sparse_report(fast))))
        return SweepResult(name, method, structure, sizes, list(input_shape), torch.get_num_threads(),
                           _kernel_note(), points)


def plot_sweep(result: SweepResult, path: str | Path, *, log_x: bool = True, title: str | None = None) -> Path:
    """Speed-up against sparsity, one line per batch size, with the FLOP-count limit 1/(1 - s)
    and the y = 1 line (below it, sparse is slower). ``log_x``: x is 1/(1 - s) on a log axis
    (ticks labelled with the sparsity), else the sparsity itself. Writes a PNG (Agg; the pyplot
    state and backend are not touched) and returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    levels = result.sparsities
    xs = (lambda ss: [flop_limit(s) for s in ss]) if log_x else (lambda ss: list(ss))
    lo, hi = min(levels), max(levels)
    grid = [lo + (hi - lo) * i / 200 for i in range(201)]  # (the limit is a curve on a linear x axis)
    ax.plot(xs(grid), [flop_limit(s) for s in grid], "k--", lw=1, label="FLOP-count limit 1/(1-s)")
    ax.axhline(1.0, color="grey", lw=1, ls=":", label="dense (y = 1)")
    for b in result.batch_sizes:
        pts = [result.point(s, b) for s in levels]
        ax.plot(xs([p.sparsity for p in pts]), [p.speedup for p in pts], "o-", ms=4, label=f"batch {b}")
    ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(xs(levels))
        ax.set_xticklabels([f"{s:.0%}" if s * 100 == round(s * 100) else f"{s:.1%}" for s in levels],
                           fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("sparsity (x axis: 1/(1 - sparsity), log scale)")
    else:
        ax.set_xlabel("sparsity")
    ax.set_ylabel("speed-up over the dense masked model")
    structure = f", {result.structure}" if result.structure else ""
    ax.set_title(title or f"{result.model}, {result.method} masks{structure}: to_sparse vs dense, "
                 f"{result.threads} thread{'s' if result.threads != 1 else ''}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- report files


def environment(argv: Sequence[str] | None = None) -> dict:
    """Where a measurement ran: command, CPU model, torch threads, versions, date, load average."""
    cpu = cpu_model()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "command": " ".join(argv) if argv is not None else " ".join(sys.argv),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": load,
    }


def format_environment(env: dict) -> str:
    load = " ".join(str(x) for x in env["load_average"]) if env.get("load_average") else "unknown"
    return "\n".join([
        f"- command: `{env['command']}`",
        f"- machine: {env['cpu']}, {env['cores']} cores, {env['threads']} torch threads",
        f"- torch {env['torch']}, Python {env['python']}; date {env['date']}",
        f"- load average (1, 5, 15 min) at start: {load}",
        "- all ratios are medians of same-process, interleaved measurements (dense and sparse alternate "
        "round by round)",
    ])


def write_report(path: str | Path, text: str, data: dict) -> tuple[Path, Path]:
    """Write ``text`` to ``path`` (Markdown) and ``data`` as JSON beside it (same name, ``.json``)."""
    md = Path(path)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    js = md.with_suffix(".json")
    js.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return md, js
