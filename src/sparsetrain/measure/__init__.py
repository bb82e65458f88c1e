"""Measurement and reporting, apart from the library code they measure: one interleaved timer
(:func:`time_interleaved`, :class:`Timings`, the paired :func:`ratio` with one convention:
``ratio(a, b)`` = time of a / time of b), one report writer (:func:`write_report` with a
:class:`Provenance` footer, and :func:`save_png` for its figures), the training step the benchmarks time (:class:`TrainStep`), and the
peak memory of one call (:func:`measure_memory`).
Used by the benchmarks, ``sparsetrain bench``, :func:`sparsetrain.sparse.to_sparse`'s layout
choice and the experiments. See docs/measurement.md.
"""

from .memory import measure_memory
from .report import Provenance, load_average, new_figure, png_beside, publish_report, save_png, write_report
from .steps import LR, MOMENTUM, WEIGHT_DECAY, TrainStep
from .timing import Op, Timings, capture_cuda_graph, cuda_sync, ratio, time_interleaved

__all__ = [
    "LR",
    "MOMENTUM",
    "Op",
    "Provenance",
    "Timings",
    "TrainStep",
    "WEIGHT_DECAY",
    "capture_cuda_graph",
    "cuda_sync",
    "load_average",
    "measure_memory",
    "new_figure",
    "png_beside",
    "ratio",
    "time_interleaved",
    "publish_report",
    "save_png",
    "write_report",
]
