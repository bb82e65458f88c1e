"""Sparse execution: run a pruned network with its zeros skipped for real.

:func:`to_sparse` bakes a mask into a model and swaps each pruned ``nn.Linear`` / ``nn.Conv2d``
for :class:`SparseLinear` / :class:`SparseConv2d` (CSR weights, 32-bit indices), for
:class:`SparseBlockLinear` / :class:`SparseBlockConv2d` (block-sparse BSR, where the zeros form
tiles: :func:`detect_block_size`) or, on CUDA, for :class:`SparseSemiStructuredLinear` (2:4), where
that is faster: a cost model (:func:`estimate_times`) decides the clear cases, timing the others,
and the whole converted model is checked against dense before it is returned.
:func:`save_sparse` / :func:`load_sparse` store the compressed arrays;
:func:`sparse_report` / :func:`format_sparse_report` give per-layer layouts, sizes and times.
:func:`csr_linear` / :func:`csr_matmul` on a :class:`CSRMatrix` are the kernels underneath.
See :mod:`sparsetrain.sparse.convert` for a runnable example.
"""

from .convert import (
    LAYOUTS,
    SparseConv2d,
    SparseLayerRow,
    SparseLinear,
    SparseReport,
    clear_choice_cache,
    estimate_times,
    format_sparse_report,
    load_sparse,
    save_sparse,
    sparse_report,
    to_sparse,
)
from .block import (
    BlockMatrix,
    SparseBlockConv2d,
    SparseBlockLinear,
    SparseSemiStructuredLinear,
    detect_block_size,
    semi_structured_problem,
)
from .kernels import CSRMatrix, csr_linear, csr_matmul, extension_available, extension_error
from .training import SparseTrainLinear, densify_after_training_, sparsify_for_training_

__all__ = [
    "BlockMatrix",
    "SparseBlockConv2d",
    "SparseBlockLinear",
    "SparseSemiStructuredLinear",
    "detect_block_size",
    "semi_structured_problem",
    "SparseTrainLinear",
    "densify_after_training_",
    "sparsify_for_training_",
    "CSRMatrix",
    "LAYOUTS",
    "SparseConv2d",
    "SparseLayerRow",
    "SparseLinear",
    "SparseReport",
    "clear_choice_cache",
    "csr_linear",
    "csr_matmul",
    "extension_available",
    "estimate_times",
    "extension_error",
    "format_sparse_report",
    "load_sparse",
    "save_sparse",
    "sparse_report",
    "to_sparse",
]
