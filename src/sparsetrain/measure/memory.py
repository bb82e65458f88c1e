"""Peak memory of one call, for the benchmarks: tensors (the PyTorch profiler's allocation events on
the CPU, or CUDA's peak counters) and NumPy/Python objects (tracemalloc), each counted from the
start of the call, so what existed before (parameters, optimizer state, the batch) is not counted.

    >>> import numpy as np
    >>> python_peak_bytes(lambda: np.ones(2**20)) >= 8 * 2**20  # 8 MiB of float64, made and dropped
    True
"""

from __future__ import annotations

import gc
import os
import statistics
import tracemalloc
from typing import Callable

import torch

__all__ = ["cuda_peak_bytes", "measure_memory", "python_peak_bytes", "torch_peak_bytes_cpu"]


def torch_peak_bytes_cpu(run: Callable[[], object]) -> int:
    """Peak, over the call, of the bytes held by tensors that the call allocated (minus those it
    freed), from the PyTorch profiler's allocation events on the CPU allocator: the running sum of
    +size/-size in time order. Tensors alive before the call are not counted."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the profiler's start/stop lines
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
        del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: equal stamps keep their recorded order
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def python_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of the memory allocated through Python's allocators during the call (tracemalloc):
    NumPy arrays and Python objects, not PyTorch tensors."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        out = run()
        del out
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return max(0, peak - start)


def cuda_peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes CUDA allocated on ``device`` during the call, above what was allocated before."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    out = run()
    del out
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def measure_memory(run_factory: Callable[[], Callable[[], object]], device: torch.device) -> tuple[int, int]:
    """(peak bytes of tensors, peak bytes of NumPy/Python allocations) of one call; each measured
    on its own call (``run_factory`` prepares a fresh one, untimed and unmeasured). The median of
    three measurements."""
    tensor_peaks, python_peaks = [], []
    for _ in range(3):
        run = run_factory()
        tensor_peaks.append(cuda_peak_bytes(run, device) if device.type == "cuda" else torch_peak_bytes_cpu(run))
        run = run_factory()
        python_peaks.append(python_peak_bytes(run))
    return int(statistics.median(tensor_peaks)), int(statistics.median(python_peaks))
