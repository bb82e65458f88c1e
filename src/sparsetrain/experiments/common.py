"""What every experiment shares: its typed options, the registry, running many recorded runs side
by side, and mean ± std.

An experiment is one file that registers a function ``reproduce(options: ReproduceOptions)``: it
builds its run configs from recipes, runs them through :func:`sparsetrain.run` (so every run is
recorded in the store, grouped under the experiment, resumable, and never repeated once
finished), and writes its table with :func:`sparsetrain.measure.write_report` where
``options.out`` says.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..config import RunConfig
from ..registry import Registry
from ..run import run
from ..store import RunRecord, RunStore

#: Experiments by name: ``fn(options: ReproduceOptions) -> None``.
EXPERIMENTS = Registry("experiment")


@dataclass(frozen=True)
class ReproduceOptions:
    """How to reproduce an experiment. ``out``: the Markdown table to write (JSON beside it);
    ``rows``: a subset of the experiment's rows (None: its default rows); ``iterations``: shorten
    every run (a quick look); ``report_only``: write the table from the runs already recorded;
    ``store``: the run store; ``command``: recorded beside the results."""

    out: Path
    store: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[str, ...] | None = None
    workers: int = 1
    iterations: int | None = None
    threads: int | None = None
    report_only: bool = False
    data_dir: str | None = None
    device: str | None = None
    command: tuple[str, ...] = ()


def _worker(job: tuple[dict, str, str | None, str | None, int, tuple[str, str] | None]):
    config_dict, store, data_dir, device, threads, group = job
    torch.set_num_threads(threads)
    config = RunConfig.from_dict(config_dict)
    try:
        outcome = run(config, store=store, data_dir=data_dir, device=device, progress=False, group=group)
    except Exception as err:  # reported and the other runs go on
        return config.name, None, f"{type(err).__name__}: {err}"
    return config.name, outcome.results, None


def run_many(configs: list[RunConfig], store: str | Path, data_dir=None, device=None, workers: int = 1,
             threads: int | None = None, group: tuple[str, str] | None = None) -> Iterator[tuple[str, dict | None, str | None]]:
    """Run ``configs`` (each recorded, in ``group``, and resumable) with ``workers`` processes
    sharing the cores (``threads`` torch threads each; default: cores / workers). Yields
    ``(name, results or None, error or None)`` as runs finish."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
    jobs = [(c.to_dict(), str(store), data_dir, device, threads, group) for c in configs]
    if workers <= 1:
        torch.set_num_threads(threads)
        yield from map(_worker, jobs)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_worker, jobs)


def run_rows(configs: list[RunConfig], options: ReproduceOptions, group: tuple[str, str]) -> tuple[dict[str, RunRecord], list[str]]:
    """Run ``configs`` as ``options`` say (nothing with ``report_only``), printing a line per run
    as it finishes; return the finished records by config key, and the failures (``name: error``;
    the other runs go on)."""
    store = RunStore(options.store)  # created once here, before the workers open it
    failures = []
    pending = [] if options.report_only else configs
    for name, results, error in run_many(pending, options.store, options.data_dir, options.device,
                                           options.workers, options.threads, group=group):
        if error:
            failures.append(f"{name}: {error}")
            print(f"{name}: FAILED {error}", file=sys.stderr)
        else:
            print(f"{name}: test error {100 * results['test_error_final']:.2f}% "
                  f"(best-val {100 * results['test_error_best_val']:.2f}%), sparsity {results['sparsity']:.2%}",
                  flush=True)
    records = {c.key(): store.get(c.key()) for c in configs}
    return {k: r for k, r in records.items() if r is not None and r.status == "finished"}, failures


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
