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

How the times are taken (all with :func:`sparsetrain.measure.time_interleaved`). Per layer: the
dense masked layer against the layer ``to_sparse`` put in its place, called in turns on a random
input of the layer's recorded input shape and layout (a layer that stayed dense has its dense time
on both sides). End to end: the dense masked model and the converted one called in turns on the
same random batch under ``torch.no_grad()``; the times are medians over rounds and the speed-up
is ``ratio("dense", "sparse")``, the median over rounds of (dense / sparse) in the same round, so
a slow phase of a busy machine hits both. ``repeats`` bounds the rounds, ``budget_s`` the seconds
spent per measurement (at least ``MIN_ROUNDS`` rounds), so large batches of big models take fewer
rounds. :func:`bench_training_step` times a training step of sparse against dense masked layers.

The FLOP-count limit of a layer is 1 / (1 - s) with s the fraction of its weight entries that are
zero (``inf`` for an all-zero weight); end to end, s is the mask's overall sparsity (pruned /
masked entries). It counts multiply-adds of the weights only: biases, activations, im2col and
the layers the mask does not cover are why a whole model stays further from it than a layer.

Every figure carries the spread of its timings (:meth:`Timings.spread`: interquartile range over
the median) for the dense and the sparse side. A figure whose spread exceeds :data:`NOISY_SPREAD`
is marked *noisy*, with a note advising a quiet machine or ``--threads`` (a busy core makes a
ratio of 290x or 0.75x out of nothing). A speed-up above the FLOP limit is explained where it is
real: when the sparse weights fit in a CPU cache (:func:`cache_sizes`) that the dense ones do
not, the dense layer waits on memory and the sparse one does not; otherwise the note says the
figure is more than skipping multiply-adds can give, so measure again.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from ..masks import GradientMask, Mask, apply_mask_
from ..measure import Provenance, TrainStep, time_interleaved
from ..measure import write_report as _write_report
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
    "NOISY_SPREAD",
    "SweepPoint",
    "SweepResult",
    "bench",
    "bench_training_step",
    "build_mlp",
    "cache_sizes",
    "environment",
    "flop_limit",
    "format_environment",
    "make_mask",
    "plot_sweep",
    "sweep",
    "write_report",
]

DEFAULT_BATCH_SIZES = (1, 64, 1024)
DEFAULT_SWEEP = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
END_TO_END = "end to end"
MIN_ROUNDS = 5
SCORE_BATCH = 100  # examples in the random batch SNIP scores (the paper's MNIST mini-batch)
#: Timings whose interquartile range exceeds this fraction of their median are marked noisy.
NOISY_SPREAD = 0.2
NOISY_ADVICE = ("measure again on a quiet machine (nothing else running), or give --threads the number of idle "
                "cores: a busy core makes the threads wait and the ratios swing both ways")

Progress = Callable[[str], None] | None
# The timer (default time_interleaved): timer(fns, rounds=, budget_s=, min_rounds=) -> Timings.
Timer = Callable[..., object]


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class BenchRow:
    """One layer (or the whole model, ``layer == END_TO_END``) at one batch size.

    ``layout``: ``"dense"``, ``"csr:kernel"``, ``"csr:torch"``, ``"bsr"`` or ``"semi"`` for a layer;
    ``"k/n csr"`` end to end (k of the n Linear/Conv2d layers converted; ``"k/n bsr+csr"`` when
    other layouts were chosen too). Times in seconds, medians of interleaved rounds; ``speedup`` =
    ``ratio("dense", "sparse")`` (median of the per-round ratios dense / sparse, layers and end to
    end); ``flop_limit`` = 1 / (1 - sparsity); ``candidates``: the medians ``to_sparse`` timed
    while choosing (empty where its cost model decided); ``decided_by``: how ``to_sparse`` chose
    (layers only)."""

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
    decided_by: str = ""
    dense_spread: float = math.nan  # interquartile range / median of the dense timings
    sparse_spread: float = math.nan

    @property
    def of_limit(self) -> float:
        """The measured speed-up as a fraction of the FLOP-count limit."""
        return 0.0 if math.isinf(self.flop_limit) else self.speedup / self.flop_limit

    @property
    def noisy(self) -> bool:
        """Whether either side's timings spread more than :data:`NOISY_SPREAD`."""
        return _noisy(self.dense_spread, self.sparse_spread)


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
    caches: dict[str, int] = field(default_factory=dict)

    def end_to_end(self, batch_size: int) -> BenchRow:
        return next(r for r in self.rows if r.batch_size == batch_size and r.layer == END_TO_END)

    def layers(self, batch_size: int) -> list[BenchRow]:
        return [r for r in self.rows if r.batch_size == batch_size and r.layer != END_TO_END]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [_row_dict(r) for r in self.rows]
        d["max_abs_diff"] = {str(k): v for k, v in self.max_abs_diff.items()}
        d["notes"] = self.notes()
        return d

    def notes(self) -> list[str]:
        """What a reader must know about the figures: rows above the FLOP limit (cache or noise),
        and the noisy ones with the advice."""
        out = []
        for r in self.rows:
            why = above_limit_note(r, self.caches)
            if why:
                out.append(f"batch {r.batch_size}, {r.layer or 'model'}: {why}")
        noisy = [r for r in self.rows if r.noisy]
        if noisy:
            out.append(f"{len(noisy)} of {len(self.rows)} figures are marked noisy (timings spread more than "
                       f"{NOISY_SPREAD:.0%} around their median): {NOISY_ADVICE}")
        return out

    def to_markdown(self) -> str:
        structure = f", structure {self.structure}" if self.structure else ""
        lines = [
            f"## {self.model}: {self.method} mask at {self.mask_sparsity:.2%} sparsity{structure}, "
            f"{self.threads} thread{'s' if self.threads != 1 else ''}",
            "",
            f"Dense masked model against `to_sparse(model, mask, batch_size=B)` (auto-choice), input "
            f"{tuple(self.input_shape)}; CSR kernels: {self.kernel}. Per layer (the dense masked layer against its replacement, "
            "on the input shape and layout it receives) and end to end: same-process interleaved rounds, medians, "
            "speed-up = median of per-round ratios dense/sparse. "
            "Bytes: Linear/Conv2d weights and biases as stored (`sparse_report`). "
            "FLOP limit = 1/(1 - sparsity); \"of limit\" = speed-up / FLOP limit. "
            "Spread: interquartile range / median of the dense and the sparse timings; *noisy* above "
            f"{NOISY_SPREAD:.0%}.",
            "",
            "| batch | layer | kind | shape | layout | nnz | sparsity | dense bytes | stored bytes | stored "
            "| dense ms | sparse ms | speed-up | spread dense / sparse | FLOP limit | of limit |",
            "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            name = f"**{r.layer}**" if r.layer == END_TO_END else f"`{r.layer}`"
            speed = f"**{r.speedup:.2f}x**" if r.layer == END_TO_END else f"{r.speedup:.2f}x"
            shape = "x".join(str(s) for s in r.shape)
            frac = f"{r.stored_bytes / r.dense_bytes:.1%}" if r.dense_bytes else "-"
            lines.append(
                f"| {r.batch_size} | {name} | {r.kind} | {shape} | {r.layout} | {r.nnz:,} | {r.sparsity:.2%} "
                f"| {r.dense_bytes:,} | {r.stored_bytes:,} | {frac} | {_ms(r.dense_time)} | {_ms(r.sparse_time)} "
                f"| {speed}{' noisy' if r.noisy else ''} | {_spreads(r.dense_spread, r.sparse_spread)} "
                f"| {_limit(r.flop_limit)} | {r.of_limit:.0%} |"
            )
        diffs = ", ".join(f"batch {b}: {d:.1e}" for b, d in self.max_abs_diff.items())
        lines += ["", f"Converted vs dense masked outputs, max |difference|: {diffs}."]
        notes = self.notes()
        if notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
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
    dense_spread: float = math.nan
    sparse_spread: float = math.nan

    @property
    def noisy(self) -> bool:
        return _noisy(self.dense_spread, self.sparse_spread)


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
            f"per-round ratios; below 1 is slower); in brackets the layers converted; *noisy*: the timings spread "
            f"more than {NOISY_SPREAD:.0%} around their median. CSR kernels: {self.kernel}.",
            "",
            "| sparsity | FLOP limit | " + " | ".join(f"batch {b}" for b in self.batch_sizes) + " |",
            "|---:|---:|" + "---:|" * len(self.batch_sizes),
        ]
        for s in self.sparsities:
            cells = []
            for b in self.batch_sizes:
                p = self.point(s, b)
                cells.append(f"{p.speedup:.2f}x ({p.layout}){' noisy' if p.noisy else ''}")
            lines.append(f"| {s:.2%} | {_limit(flop_limit(s))} | " + " | ".join(cells) + " |")
        noisy = [p for p in self.points if p.noisy]
        if noisy:
            lines += ["", f"Note: {len(noisy)} of {len(self.points)} figures are noisy: {NOISY_ADVICE}."]
        return "\n".join(lines) + "\n"


def _row_dict(r: BenchRow) -> dict:
    d = asdict(r)
    d["flop_limit"] = _finite(r.flop_limit)
    d["of_limit"] = r.of_limit
    return d


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def _noisy(*spreads: float) -> bool:
    return any(s > NOISY_SPREAD for s in spreads if not math.isnan(s))


def _spreads(a: float, b: float) -> str:
    return " / ".join("-" if math.isnan(x) else f"{x:.2f}" for x in (a, b))


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def cache_sizes(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """The data caches of the first CPU in bytes, ``{"L1": ..., "L2": ..., "L3": ...}``, read from
    Linux's ``index*/{level,type,size}`` files (empty where they are absent)."""
    sizes: dict[str, int] = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes[f"L{level}"] = int(text.rstrip("KMG")) * scale
        except ValueError:
            continue
    return sizes


def above_limit_note(row: "BenchRow", caches: dict[str, int]) -> str | None:
    """Why ``row``'s speed-up exceeds its FLOP limit, or ``None`` when it does not: the smallest
    cache that holds the sparse weights but not the dense ones (a real effect: the dense layer
    streams its weights from a slower level), else a warning that the figure is likely noise."""
    if math.isinf(row.flop_limit) or not row.speedup > row.flop_limit * 1.05:
        return None
    for level, size in sorted(caches.items(), key=lambda kv: kv[1]):
        if row.stored_bytes <= size < row.dense_bytes:
            return (f"{row.speedup:.1f}x is above the FLOP limit {row.flop_limit:.1f}x, and real: the sparse weights "
                    f"({_bytes(row.stored_bytes)}) fit in the {level} cache ({_bytes(size)}), the dense ones "
                    f"({_bytes(row.dense_bytes)}) do not, so the dense layer waits on memory")
    return (f"{row.speedup:.1f}x is above the FLOP limit {row.flop_limit:.1f}x with no cache to explain it "
            "(dense and sparse weights fit in the same cache level): probably noise; "
            + NOISY_ADVICE)


def _ms(t: float) -> str:
    return f"{t * 1e3:.4f}" if t < 1e-3 else f"{t * 1e3:.3f}"


def _limit(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f}x"


def flop_limit(sparsity: float) -> float:
    """1 / (1 - sparsity): the speed-up if time were proportional to the weights multiplied."""
    return math.inf if sparsity >= 1.0 else 1.0 / (1.0 - sparsity)


# ----------------------------------------------------------------------------- timing


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


def _end_to_end(dense: nn.Module, fast: nn.Module, x: torch.Tensor, repeats: int, budget_s: float,
                timer: Timer = time_interleaved):
    """(dense median, sparse median, speed-up = ratio("dense", "sparse"), dense spread, sparse
    spread) of the two models on ``x``."""
    with torch.no_grad():
        t = timer({"dense": lambda: dense(x), "sparse": lambda: fast(x)}, rounds=repeats,
                  budget_s=budget_s, min_rounds=MIN_ROUNDS)
    return t.median("dense"), t.median("sparse"), t.ratio("dense", "sparse"), t.spread("dense"), t.spread("sparse")


def _layer_times(dense_layer: nn.Module, layer: nn.Module, choice: dict | None, repeats: int,
                 budget_s: float, timer: Timer = time_interleaved) -> tuple[float, float, float, float, float]:
    """(dense, sparse) median seconds of one layer on a random input of its recorded shape and
    layout, ``ratio("dense", "sparse")`` (``nan`` where to_sparse recorded no input shape), and
    the two spreads; a layer that stayed dense has its dense time on both sides."""
    shape = (choice or {}).get("input_shape")
    if not shape:
        return math.nan, math.nan, math.nan, math.nan, math.nan
    w = dense_layer.weight
    if choice.get("input_transposed"):
        x = torch.randn(tuple(reversed(shape)), dtype=w.dtype, device=w.device).t()
    else:
        x = torch.randn(tuple(shape), dtype=w.dtype, device=w.device)
    fns = {"dense": lambda: dense_layer(x)}
    if layer is not dense_layer and not isinstance(layer, (nn.Linear, nn.Conv2d)):
        fns["sparse"] = lambda: layer(x)
    with torch.no_grad():
        t = timer(fns, rounds=repeats, budget_s=budget_s, min_rounds=MIN_ROUNDS)
    if "sparse" not in fns:
        return t.median("dense"), t.median("dense"), 1.0, t.spread("dense"), t.spread("dense")
    return t.median("dense"), t.median("sparse"), t.ratio("dense", "sparse"), t.spread("dense"), t.spread("sparse")


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
    timer: Timer | None = None,
) -> BenchResult:
    """Dense masked ``model`` against ``to_sparse(model, mask, batch_size=B)`` for each batch size:
    per-layer and end-to-end latency, layout chosen, weight bytes, speed-up and FLOP limit.

    ``model``: a registered name (built for ``input_shape`` / ``num_classes``, seeded) or a module
    (copied; a bare ``nn.Linear`` must sit in a container, e.g. ``nn.Sequential(linear)``).
    ``mask``: used as given, else :func:`make_mask` with ``method``, ``sparsity``, ``structure``.
    ``repeats``: most timed rounds per measurement (also ``to_sparse``'s repeats); ``budget_s``:
    seconds per end-to-end measurement; ``threads``: ``torch.set_num_threads`` during the call;
    ``timer``: what times the figures (default :func:`sparsetrain.measure.time_interleaved`; tests
    pass a fake), also handed to ``to_sparse``.
    """
    sizes = _check_inputs(sparsity, structure, batch_sizes, repeats, has_mask=mask is not None)
    given_timer, timer = timer, timer or time_interleaved
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
            fast = to_sparse(base, mask, batch_size=b, input_shape=tuple(input_shape), repeats=repeats,
                             timer=given_timer).eval()
            report = sparse_report(fast)
            say(f"{name}: batch {b}: timing each layer ...")
            for r in report:
                weight_entries = math.prod(r.shape)
                s = 1.0 - r.nnz / weight_entries
                layer = fast.get_submodule(r.name) if r.name else fast
                choice = getattr(layer, "sparse_choice", None) or {}
                d_t, s_t, speed, d_sp, s_sp = _layer_times(dense.get_submodule(r.name) if r.name else dense, layer,
                                                           choice, repeats, budget_s / 4, timer)
                rows.append(BenchRow(
                    batch_size=b, layer=r.name, kind=r.kind, layout=r.choice, shape=tuple(r.shape), nnz=r.nnz,
                    sparsity=s, dense_bytes=r.dense_bytes, stored_bytes=r.stored_bytes, dense_time=d_t,
                    sparse_time=s_t, speedup=speed, flop_limit=flop_limit(s),
                    candidates=dict(choice.get("times", {})), decided_by=choice.get("decided_by", ""),
                    dense_spread=d_sp, sparse_spread=s_sp,
                ))
            say(f"{name}: batch {b}: timing end to end ...")
            x = torch.randn((b, *input_shape), generator=g)
            d_t, s_t, speed, d_sp, s_sp = _end_to_end(dense, fast, x, repeats, budget_s, timer)
            with torch.no_grad():
                diffs[b] = float((fast(x) - dense(x)).abs().max())
            total = report.total
            s = _mask_sparsity(mask)
            rows.append(BenchRow(
                batch_size=b, layer=END_TO_END, kind="model", layout=_layouts(report), shape=(), nnz=total.nnz,
                sparsity=s, dense_bytes=total.dense_bytes, stored_bytes=total.stored_bytes, dense_time=d_t,
                sparse_time=s_t, speedup=speed, flop_limit=flop_limit(s), dense_spread=d_sp, sparse_spread=s_sp,
            ))
        return BenchResult(name, method, structure, sparsity, _mask_sparsity(mask), sizes, list(input_shape),
                           torch.get_num_threads(), _kernel_note(), rows, diffs, cache_sizes())


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
    timer: Timer | None = None,
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
    given_timer, timer = timer, timer or time_interleaved
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
                fast = to_sparse(base, mask, batch_size=b, input_shape=tuple(input_shape), repeats=repeats,
                                 timer=given_timer).eval()
                x = torch.randn((b, *input_shape), generator=g)
                d_t, s_t, speed, d_sp, s_sp = _end_to_end(dense, fast, x, repeats, budget_s, timer)
                points.append(SweepPoint(s, ms_, b, d_t, s_t, speed, flop_limit(ms_), _layouts(sparse_report(fast)),
                                         d_sp, s_sp))
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
    """Where a measurement ran (:class:`sparsetrain.measure.Provenance` as a dict): command,
    machine, CPU, cores, torch threads, versions, date, load average. Take it before measuring."""
    return Provenance.now(argv).to_dict()


def format_environment(env: dict) -> str:
    """An :func:`environment` dict as the Markdown list at the top of a ``sparsetrain bench`` report."""
    load = " ".join(str(x) for x in env["load_average"]) if env.get("load_average") else "unknown"
    return "\n".join([
        f"- command: `{env['command']}`",
        f"- machine: {env['machine']}; {env['threads']} torch threads",
        f"- date {env['date']}; load average (1, 5, 15 min) at start: {load}",
        "- all ratios are medians of same-process, interleaved measurements (dense and sparse alternate "
        "round by round)",
    ])


def write_report(path: str | Path, text: str, data: dict) -> tuple[Path, Path]:
    """:func:`sparsetrain.measure.write_report` for text that already carries its environment
    (:func:`format_environment`), as ``sparsetrain bench`` writes it: no provenance footer."""
    return _write_report(path, text, data, provenance=None)


# ----------------------------------------------------------------------------- training step


def build_mlp(widths: Sequence[int], num_classes: int) -> nn.Sequential:
    """Linear + ReLU through ``widths``, then a Linear to ``num_classes``."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def bench_training_step(*, inputs: int = 4096, hidden: Sequence[int] = (4096, 4096), classes: int = 10,
                        batch_size: int = 64, sparsity: float = 0.95, repeats: int = 15, warmup: int = 2,
                        seed: int = 0) -> dict:
    """A training step (:class:`~sparsetrain.measure.TrainStep`) of an MLP with every Linear
    weight pruned to ``sparsity`` (random, layerwise) in three ways, timed interleaved: the
    unpruned network ("dense step"), the masked one with ``GradientMask`` ("dense masked step",
    as ``sparsetrain run`` trains by default) and ``sparsify_for_training_`` ("sparse step",
    ``--execution sparse``). Speed-ups are ``ratio(reference, op)``.

    >>> r = bench_training_step(inputs=32, hidden=[32], batch_size=4, sparsity=0.9, repeats=2, warmup=1)
    >>> sorted(r["ms"])
    ['dense masked step', 'dense step', 'sparse step']
    """
    from .training import sparsify_for_training_

    torch.manual_seed(seed)
    widths = [inputs, *hidden]
    base = build_mlp(widths, classes)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, inputs, generator=g)
    y = torch.randint(0, classes, (batch_size,), generator=g)
    mask = prune_at_init(base, "random", sparsity=sparsity, scope="layerwise", seed=seed)

    dense = TrainStep(copy.deepcopy(base))
    masked_model = apply_mask_(copy.deepcopy(base), mask)
    masked = TrainStep(masked_model, hooks=[GradientMask(masked_model, mask)])
    sparse_model = sparsify_for_training_(apply_mask_(copy.deepcopy(base), mask), mask)
    rest = {n: m for n, m in mask.items() if n in dict(sparse_model.named_parameters())}
    sparse = TrainStep(sparse_model, hooks=[GradientMask(sparse_model, rest)] if rest else [])
    with torch.no_grad():  # the two pruned models compute the same function (a check, not a timing)
        diff = (masked_model(x) - sparse_model(x)).abs().max().item()

    def op(step: TrainStep):
        return step.reset, lambda _: step.step(x, y)

    t = time_interleaved({"dense step": op(dense), "dense masked step": op(masked), "sparse step": op(sparse)},
                         rounds=repeats, warmup=warmup)
    return {
        "widths": widths,
        "kept": sum(int(m.sum()) for m in mask.values()),
        "total": sum(m.numel() for m in mask.values()),
        "max_output_difference": diff,
        "ms": {k: 1e3 * v for k, v in t.medians().items()},
        "speedup": t.ratio("dense masked step", "sparse step"),
        "speedup_vs_dense": t.ratio("dense step", "sparse step"),
        "masked_vs_dense": t.ratio("dense masked step", "dense step"),
        "state_mib": {"dense masked step": masked.state_bytes() / 2**20, "sparse step": sparse.state_bytes() / 2**20},
    }
