"""Running many recorded runs side by side, and describing the machine that ran them."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics

import torch

from ..config import RunConfig
from ..run import run


def _worker(job: tuple[dict, str, str | None, str | None, int]) -> tuple[str, dict | None, str | None]:
    config_dict, store, data_dir, device, threads = job
    torch.set_num_threads(threads)
    config = RunConfig.from_dict(config_dict)
    try:
        outcome = run(config, store=store, data_dir=data_dir, device=device, progress=False)
    except Exception as err:  # reported and the other runs go on
        return config.name, None, f"{type(err).__name__}: {err}"
    return config.name, outcome.results, None


def run_many(configs: list[RunConfig], store: str, data_dir=None, device=None, workers: int = 1,
             threads: int | None = None):
    """Run ``configs`` (each recorded and resumable) with ``workers`` processes sharing the cores
    (``threads`` torch threads each; default: cores / workers). Yields ``(name, results or None,
    error or None)`` as runs finish."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
    jobs = [(c.to_dict(), str(store), data_dir, device, threads) for c in configs]
    if workers <= 1:
        torch.set_num_threads(threads)
        yield from map(_worker, jobs)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_worker, jobs)


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
