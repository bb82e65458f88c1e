"""The one interleaved timer: every candidate called in turn, round after round, so that a slow
phase of a busy machine hits all of them alike; medians, spreads and paired ratios.

    >>> from sparsetrain.measure import time_interleaved
    >>> t = time_interleaved({"a": lambda: sum(range(200)), "b": lambda: sum(range(20))}, rounds=5, warmup=1)
    >>> t.rounds, sorted(t.samples)
    (5, ['a', 'b'])
    >>> t.ratio("a", "b") > 0      # median over rounds of (time of a / time of b in the same round)
    True

Ratio convention (the only one in sparsetrain): ``ratio(a, b)`` is time of ``a`` / time of
``b``; a speed-up of ``sparse`` over ``dense`` is ``ratio("dense", "sparse")``, a slow-down is its
inverse. The ratio is paired: the median over rounds of the two times of the same round, which
cancels load that changes between rounds (a plain ratio of medians does not).

Why interleaved rounds: load on a shared machine comes in phases of tens of milliseconds to
seconds. Timing A for a second and then B for a second compares two phases; alternating A B, B A,
... within each round compares A and B under the same phase, and alternating the order cancels
the cache advantage of going second.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import torch

__all__ = ["Op", "Timings", "capture_cuda_graph", "cuda_sync", "ratio", "time_interleaved"]

# A timed function, or ``(setup, run)``: ``setup()`` (untimed) makes the argument of the timed ``run``.
Op = Callable[[], object] | tuple[Callable[[], object], Callable[[object], object]]


def ratio(samples: Mapping[str, Sequence[float]], a: str, b: str) -> float:
    """Median over rounds of (time of ``a`` / time of ``b`` in the same round).

    >>> ratio({"dense": [2.0, 4.0, 3.0], "sparse": [1.0, 1.0, 3.0]}, "dense", "sparse")
    2.0
    """
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


@dataclass(frozen=True)
class Timings:
    """Seconds per call, round by round: ``samples[name][r]`` is ``name``'s time in round ``r``
    (each a mean over ``number`` back-to-back calls). Index-aligned lists: pair them by round."""

    samples: dict[str, list[float]]
    number: int = 1
    clock: str = "wall"
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return min((len(v) for v in self.samples.values()), default=0)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}

    def quantile(self, name: str, q: float) -> float:
        """The ``q``-quantile of ``name``'s samples (linear interpolation between ranks)."""
        xs = sorted(self.samples[name])
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    def spread(self, name: str) -> float:
        """Interquartile range relative to the median: 0.1 = the middle half lies within 10%."""
        med = self.median(name)
        return (self.quantile(name, 0.75) - self.quantile(name, 0.25)) / med if med > 0 else math.inf

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of (time of ``a`` / time of ``b``); see :func:`ratio`."""
        return ratio(self.samples, a, b)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per name: median, p25, p75 (seconds), spread, rounds; for JSON reports."""
        return {k: {"median": self.median(k), "p25": self.quantile(k, 0.25), "p75": self.quantile(k, 0.75),
                    "spread": self.spread(k), "rounds": len(v)} for k, v in self.samples.items()}


def cuda_sync(device: str | torch.device | None) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device (pass as ``sync``), else ``None``."""
    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def time_interleaved(
    fns: Mapping[str, Op],
    *,
    rounds: int = 30,
    warmup: int = 2,
    budget_s: float | None = None,
    min_rounds: int = 5,
    number: int | None = None,
    min_sample_s: float = 1e-3,
    sync: Callable[[], None] | None = None,
    clock: Literal["wall", "cuda"] = "wall",
    gc_every: int = 10,
) -> Timings:
    """Time each of ``fns`` in interleaved rounds and return the :class:`Timings`.

    Each round calls every function once (or ``number`` times back to back), the order reversed
    every other round (A B C, C B A, ...), after ``warmup`` untimed rounds. ``fns[name]`` is a
    callable, or ``(setup, run)``: ``run(setup())`` is timed and ``setup`` is not (then
    ``number`` is 1). ``number`` (calls per sample) defaults to enough that the fastest function
    takes ``min_sample_s`` (single microsecond calls are mostly timer and scheduler noise).
    ``budget_s`` cuts ``rounds`` to what fits in that many seconds, but never below
    ``min_rounds``. ``sync`` (e.g. :func:`cuda_sync`) runs before and after each sample;
    ``clock="cuda"`` measures each sample between two CUDA events instead of ``perf_counter``.
    Garbage collection is off while timing (collected every ``gc_every`` rounds, untimed).
    """
    names = list(fns)
    if not names:
        raise ValueError("time_interleaved needs at least one function to time")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    ops = {n: (fns[n] if isinstance(fns[n], tuple) else (None, fns[n])) for n in names}
    has_setup = any(setup is not None for setup, _ in ops.values())
    sample = _cuda_sample if clock == "cuda" else _wall_sample
    samples: dict[str, list[float]] = {n: [] for n in names}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        first: dict[str, float] = {}
        for _ in range(max(1, warmup)):
            for n in names:
                first[n] = sample(ops[n], 1, sync)  # the last warm-up call of each
        if number is None:
            number = 1 if has_setup else max(1, math.ceil(min_sample_s / max(min(first.values()), 1e-9)))
        n_rounds = rounds
        if budget_s is not None:
            per_round = number * sum(first.values())
            n_rounds = max(min(min_rounds, rounds), min(rounds, int(budget_s / max(per_round, 1e-9))))
        for r in range(n_rounds):
            for n in names if r % 2 == 0 else reversed(names):
                samples[n].append(sample(ops[n], number, sync))
            if gc_every and r % gc_every == gc_every - 1:
                gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    return Timings(samples, number, clock)


def _wall_sample(op, number: int, sync) -> float:
    setup, run = op
    if setup is not None:
        arg = setup()
        if sync:
            sync()
        t = time.perf_counter()
        run(arg)
        if sync:
            sync()
        return time.perf_counter() - t
    if sync:
        sync()
    t = time.perf_counter()
    for _ in range(number):
        run()
    if sync:
        sync()
    return (time.perf_counter() - t) / number


def _cuda_sample(op, number: int, sync) -> float:
    setup, run = op
    arg = setup() if setup is not None else None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(number):
        run(arg) if setup is not None else run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / number


def capture_cuda_graph(fn: Callable[[], torch.Tensor], warmup: int = 3) -> tuple[Callable[[], object], torch.Tensor, str]:
    """``fn`` as a CUDA-graph replay: ``(replay, static output, "graph")``, after ``warmup`` eager
    calls on a side stream (first-call work such as Triton compilation or cuSPARSELt plans stays
    out of the graph). If capture fails, the eager ``fn`` itself: ``(fn, output, "eager (why)")``.
    Replays launch the whole op at once, so a timing measures the kernels, not Python."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            out = fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as exc:  # report and time eagerly rather than lose the row
        torch.cuda.synchronize()
        out = fn()
        return fn, out, f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
    return graph.replay, out, "graph"
