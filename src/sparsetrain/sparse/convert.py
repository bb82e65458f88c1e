"""Run a pruned network sparse: bake the mask, then replace each pruned ``nn.Linear`` /
``nn.Conv2d`` by a module that stores only the nonzero weights (CSR, 32-bit indices; for
structured masks also BSR tiles or, on CUDA, 2:4 groups: :mod:`sparsetrain.sparse.block`) and
skips the zeros, where that is faster.

    >>> import torch, sparsetrain as st
    >>> from sparsetrain.sparse import to_sparse, sparse_report, format_sparse_report
    >>> model = st.create_model("lenet-300-100").eval()
    >>> x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    >>> mask = st.prune_at_init(model, "snip", sparsity=0.98, batches=(x, y))
    >>> fast = to_sparse(model, mask, batch_size=64, input_shape=(1, 28, 28))
    >>> dense = st.apply_mask_(model, mask)
    >>> with torch.no_grad():
    ...     bool(torch.allclose(fast(x), dense(x), rtol=1e-4, atol=1e-5))
    True
    >>> rows = sparse_report(fast)           # per layer: layout chosen, nnz, bytes, measured times
    >>> print(format_sparse_report(rows))    # doctest: +SKIP

How the layout is chosen (details and why: docs/sparse.md). ``to_sparse`` runs one dummy batch
of ``(batch_size, *input_shape)`` through the model with forward hooks to record each layer's real
input shape and layout (a :class:`SparseLinear` returns a transposed view, strides (1, B), which
the next Linear receives and a sparse layer reads without a copy; so after each SparseLinear the
later layers' inputs are recorded again). Then, per layer, in model order:

1. a cost model (:func:`estimate_times`: dense multiply-adds against sparse nonzero work, per
   layout, with fixed per-call overheads) is the prior: where it predicts one side at least
   :data:`PRIOR_BAND` times faster, that side is taken untimed. Timing a layer on a busy machine
   can be off by 10x; the cost model cannot be fooled by load. A layer more than half dense stays
   dense (CSR would also cost memory);
2. near break-even, the candidates are timed on a random input of the recorded shape and layout,
   interleaved (:func:`sparsetrain.measure.time_interleaved`); a sparse layout is kept only if
   :data:`SPARSE_MARGIN` faster than dense;
3. the whole converted model is timed against the dense masked model, end to end, twice
   (each candidate's minimum over the two: load only ever adds time); unless it is at least
   :data:`END_TO_END_MARGIN` faster, the layers
   chosen by timing go back to dense and it is checked again, then, if still slower, the whole
   model stays dense. So the result is never slower than dense by its own end-to-end measure,
   and is sparse only where that clearly pays.

The timer is injectable (``timer=``; see :func:`to_sparse`), so that tests can use a fake one.
The candidates (:data:`LAYOUTS`) are ``"dense"`` (the original layer, mask baked); ``"csr"`` with
two backends: ``"kernel"`` (sparsetrain's C++ kernel, see :mod:`sparsetrain.sparse.kernels`; CPU
only) and ``"torch"`` (``torch.sparse_csr_tensor``, i.e. MKL's sparse BLAS on CPU, cuSPARSE on
CUDA); ``"bsr"`` (block-sparse rows, :class:`~sparsetrain.sparse.block.SparseBlockLinear` /
``SparseBlockConv2d``), a candidate only for a layer whose zeros are blocky
(:func:`~sparsetrain.sparse.block.detect_block_size`); and ``"semi"`` (2:4 semi-structured,
:class:`~sparsetrain.sparse.block.SparseSemiStructuredLinear`), a candidate only for a 2:4-sparse
float16/bfloat16 Linear on a CUDA GPU that runs it, never on CPU. Off CPU there is no cost model:
every layer is timed. ``layouts=("csr",)`` forces the sparse layout (the backend is still timed
when ``input_shape`` is given, else the C++ kernel is taken); forced layouts without
``input_shape`` take, per layer, the first one in ``layouts`` that the layer qualifies for
(``layouts=("bsr", "csr")``: BSR where blocky, else CSR), and a layer that qualifies for none is
an error; ``layouts=("dense",)`` converts nothing. Forced layouts are not checked end to end.

The choice cache. Each layer's decision is cached in-process by (layer kind, shape, conv
geometry, nnz, input shape and layout, threads, dtype, device, the layer's candidates and block
size), and each end-to-end verdict by the model's class, batch shape, threads and every layer's
(name, key, choice): converting the same model again neither times nor checks again
(:func:`clear_choice_cache` forgets both). Each layer keeps its decision in ``.sparse_choice`` (a
dict: ``candidate``, ``decided_by`` = "cost model" / "timing" / "end-to-end check" / "forced" /
"not called", ``estimates`` and ``times`` in seconds, ``end_to_end``).

Which layers are candidates: ``nn.Linear`` and ``nn.Conv2d`` (exactly these types, not
subclasses; zero padding given as numbers; not inside ``nn.MultiheadAttention`` or
``nn.Transformer*Layer``, which read their children's weights directly) whose weight is in ``mask`` (with ``mask=None``: whose weight has at least one exact zero). A
``nn.Conv2d`` runs as the sparse matrix (out, C*kh*kw) times its unfolded input ``F.unfold(x)``
(B, C*kh*kw, L); groups become a block-diagonal matrix.

The sparse modules are for inference: they hold their arrays as buffers, not parameters, and
refuse inputs that require gradients. Files: :func:`save_sparse` writes a safetensors file with
the model's state dict (a CSR or BSR layer's ``crow_indices``, ``col_indices``, ``values``, a 2:4
layer's ``values`` and ``meta``, and ``bias``, in place of ``weight``) plus JSON metadata of layouts
and shapes; :func:`load_sparse` rebuilds the model, each layer in its layout, from a factory or a
template of the dense architecture.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SparsetrainError
from ..masks import Mask, check_mask
from ..measure import Timings, cuda_sync, time_interleaved
from .block import (
    BlockMatrix,
    SparseBlockConv2d,
    SparseBlockLinear,
    SparseSemiStructuredLinear,
    _BlockBase,
    block_problem,
    conv_matrix,
    detect_block_size,
    semi_structured_problem,
)
from .kernels import CSRMatrix, csr_linear, csr_matmul, extension_available
from .unfold import UnfoldedConv, convertible_conv

__all__ = [
    "LAYOUTS",
    "SparseConv2d",
    "SparseLayerRow",
    "SparseLinear",
    "SparseReport",
    "clear_choice_cache",
    "estimate_times",
    "format_sparse_report",
    "load_sparse",
    "save_sparse",
    "sparse_report",
    "to_sparse",
]

LAYOUTS = ("dense", "csr", "bsr", "semi")
BACKENDS = ("kernel", "torch")
FORMAT = "sparsetrain.sparse/1"  # files with only dense and CSR layers (readable by older versions)
FORMAT_V2 = "sparsetrain.sparse/2"  # files with BSR or 2:4 layers
_META_KEY = "sparsetrain.sparse"


# ----------------------------------------------------------------------------- sparse modules


class _SparseBase(nn.Module):
    """Holds one CSR matrix as buffers; ``backend`` is "kernel", "torch" or "auto"."""

    def _init_csr(self, W: CSRMatrix, bias: torch.Tensor | None, backend: str) -> None:
        if backend not in ("auto", *BACKENDS):
            raise SparsetrainError(f"unknown backend {backend!r}; choose from 'auto', 'kernel', 'torch'")
        self.register_buffer("crow_indices", W.crow_indices)
        self.register_buffer("col_indices", W.col_indices)
        self.register_buffer("values", W.values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.matrix_shape = tuple(W.shape)
        self.backend = backend
        self.sparse_choice: dict = {"layout": "csr", "backend": backend}
        self._csr: CSRMatrix | None = None

    @property
    def csr(self) -> CSRMatrix:
        """The CSR view of the buffers (rebuilt when ``.to()`` or loading replaced them)."""
        c, b = self._csr, self._buffers  # the dict itself: nn.Module.__getattr__ costs ~0.3 us a name
        if c is None or c.values is not b["values"] or c.col_indices is not b["col_indices"] or c.crow_indices is not b["crow_indices"]:
            c = self._csr = CSRMatrix(b["crow_indices"], b["col_indices"], b["values"], self.matrix_shape)
        return c

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def _check_input(self, x: torch.Tensor) -> None:
        if x.requires_grad and torch.is_grad_enabled():
            raise SparsetrainError(
                f"{type(self).__name__} is for inference and has no gradients; run it under torch.no_grad() "
                "or torch.inference_mode(), and train the dense masked model instead"
            )

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values)) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        )


class SparseLinear(_SparseBase):
    """``nn.Linear`` with a CSR weight: ``y = x @ W^T + b``, x (..., in) -> (..., out).

    For a 2-D input the output may be a transposed view (strides (1, B)); a following sparse layer
    reads it without a copy. Build it with :meth:`from_dense` or :func:`to_sparse`."""

    def __init__(self, weight: CSRMatrix, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._init_csr(weight, bias, backend)

    @classmethod
    def from_dense(cls, linear: nn.Linear, backend: str = "auto") -> "SparseLinear":
        return cls(CSRMatrix.from_dense(linear.weight), linear.bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return csr_linear(x, self.csr, self._buffers["bias"], backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, backend={self.backend}"


class SparseConv2d(UnfoldedConv, _SparseBase):
    """``nn.Conv2d`` (zero padding) as a CSR matrix (out, C*kh*kw) times ``F.unfold(x)``.

    Groups are folded into the column indices (a block-diagonal matrix over all input channels)."""

    def __init__(
        self,
        weight: CSRMatrix,
        bias: torch.Tensor | None,
        *,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        backend: str = "auto",
    ):
        super().__init__()
        self._init_geometry(weight.shape, in_channels, kernel_size, stride, padding, dilation, groups)
        self._init_csr(weight, bias, backend)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, backend: str = "auto") -> "SparseConv2d":
        if not convertible_conv(conv):
            raise SparsetrainError(f"{conv} cannot run sparse: only zero padding given as numbers is supported")
        out_c, cg = conv.out_channels, conv.in_channels // conv.groups
        kg = cg * math.prod(conv.kernel_size)  # columns per group
        W = CSRMatrix.from_dense(conv.weight.detach().reshape(out_c, kg))  # (out, Cg*kh*kw)
        if conv.groups > 1:  # shift each row's columns to its group's block of unfolded channels
            rows = torch.repeat_interleave(torch.arange(out_c), (W.crow_indices[1:] - W.crow_indices[:-1]).long())
            group = rows // (out_c // conv.groups)
            cols = (W.col_indices.long() + group * kg).to(torch.int32)
            W = CSRMatrix(W.crow_indices, cols, W.values, (out_c, conv.in_channels * math.prod(conv.kernel_size)))
        return cls(
            W, conv.bias, in_channels=conv.in_channels, kernel_size=conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, backend=backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        cols, unbatched, (B, Ho, Wo) = self._unfold(x)  # (B, K, L)
        if self.backend == "torch":
            K, L = cols.shape[1], cols.shape[2]
            y = csr_matmul(self.csr, cols.transpose(0, 1).reshape(K, B * L), self.bias, backend="torch")  # (out, B*L)
            y = y.view(self.out_channels, B, L).transpose(0, 1)
        else:
            y = csr_matmul(self.csr, cols, self.bias, backend=self.backend)  # (B, out, L)
        y = y.reshape(B, self.out_channels, Ho, Wo)
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, nnz={self.nnz}, backend={self.backend}"




def _sparse_from_dense(layer: nn.Module, backend: str) -> _SparseBase:
    return SparseLinear.from_dense(layer, backend) if isinstance(layer, nn.Linear) else SparseConv2d.from_dense(layer, backend)


# Every sparse module to_sparse can produce; those of _TRANSPOSED_OUTPUT return a 2-D output as a
# transposed view (strides (1, B)), which changes the layout the next layers receive.
SPARSE_MODULES = (_SparseBase, _BlockBase, SparseSemiStructuredLinear)
_TRANSPOSED_OUTPUT = (SparseLinear, SparseBlockLinear)


def _build_candidate(layer: nn.Module, candidate: str, block: tuple[int, int] | None = None) -> nn.Module:
    """The module for one candidate: "csr:<backend>", "bsr" (``block`` or detected) or "semi"."""
    if candidate == "bsr":
        cls = SparseBlockLinear if isinstance(layer, nn.Linear) else SparseBlockConv2d
        return cls.from_dense(layer, block)
    if candidate == "semi":
        return SparseSemiStructuredLinear.from_dense(layer)
    return _sparse_from_dense(layer, candidate.split(":")[1])


def _layout_of(module: nn.Module) -> str:
    if isinstance(module, _SparseBase):
        return "csr"
    if isinstance(module, _BlockBase):
        return "bsr"
    if isinstance(module, SparseSemiStructuredLinear):
        return "semi"
    return "dense"


# ----------------------------------------------------------------------------- conversion

# (kind, weight shape, geometry, nnz, input shape and layout, threads, dtype, device, candidates, block)
#   -> (choice, measured times, how it was decided, estimated times)
_CHOICE_CACHE: dict[tuple, tuple[str, dict[str, float], str, dict[str, float]]] = {}
# (model class, batch shape, threads, every layer's (name, key, choice)) -> (reverted layers, end-to-end record)
_CHECK_CACHE: dict[tuple, tuple[frozenset, dict]] = {}
_CACHE_SIZE = 512

# A timer for to_sparse: called as timer(fns, rounds=..., budget_s=..., sync=...) with fns
# {name: zero-argument callable}, it returns the Timings (seconds per call, round by round).
Timer = Callable[..., Timings]


def clear_choice_cache() -> None:
    """Forget the remembered layout choices and end-to-end verdicts (the next conversion decides,
    times and checks every layer again)."""
    _CHOICE_CACHE.clear()
    _CHECK_CACHE.clear()


def _remember(cache: dict, key, value):
    if len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def to_sparse(
    model: nn.Module,
    mask: Mask | None = None,
    *,
    batch_size: int = 1,
    input_shape: Iterable[int] | None = None,
    layouts: Iterable[str] | None = None,
    repeats: int = 15,
    device: str | torch.device = "cpu",
    inplace: bool = False,
    check: bool = True,
    timer: Timer | None = None,
) -> nn.Module:
    """A copy of ``model`` (``model`` itself if ``inplace``) with ``mask`` baked in and each pruned
    Linear/Conv2d replaced by a sparse module (:class:`SparseLinear` / :class:`SparseConv2d` for
    CSR, :class:`~sparsetrain.sparse.block.SparseBlockLinear` / ``SparseBlockConv2d`` for BSR,
    :class:`~sparsetrain.sparse.block.SparseSemiStructuredLinear` for 2:4) where that is faster.

    ``mask``: ``{parameter name: bool tensor}`` as :func:`sparsetrain.prune_at_init` returns;
    ``None`` takes the zeros already in the weights. ``batch_size`` and ``input_shape`` (one
    example's shape, e.g. ``(1, 28, 28)``) define the dummy batch whose per-layer input shapes the
    decisions use; ``input_shape`` is required when ``layouts`` includes ``"dense"`` and more.
    ``layouts``: candidates among :data:`LAYOUTS` (default all: each layer considers those it
    qualifies for; ``"semi"`` is dropped off CUDA). ``repeats``: timed rounds per timing (median).
    ``check``: time the converted model against the dense one end to end and fall back where it
    is slower (see the module docstring). ``timer``: what times (default
    :func:`sparsetrain.measure.time_interleaved`); called as ``timer(fns, rounds=, budget_s=,
    sync=)`` and returning :class:`~sparsetrain.measure.Timings`. The model is moved to
    ``device`` (``"cuda"``: candidates dense, torch CSR, BSR and 2:4); the result is for inference.
    """
    dev = torch.device(device)
    candidates = _check_layouts(layouts, dev)
    if batch_size < 1 or int(batch_size) != batch_size:
        raise SparsetrainError(f"batch_size must be a positive integer, got {batch_size!r}")
    if repeats < 1:
        raise SparsetrainError(f"repeats must be at least 1, got {repeats!r}")
    if not isinstance(model, nn.Module):
        raise SparsetrainError(f"to_sparse needs an nn.Module, got {type(model).__name__}")
    if mask is not None:
        check_mask(mask, model)
    timer = timer or _default_timer
    target = model if inplace else copy.deepcopy(model)
    target.to(device)
    params = dict(target.named_parameters())
    if mask is not None:
        with torch.no_grad():
            for name, m in mask.items():
                params[name].mul_(m.to(params[name].device))

    layers = _candidate_layers(target, mask)
    # Each layer's own candidates: bsr only where its zeros are blocky, semi only where it is 2:4
    # on a GPU that runs it (a layer left with none is an error naming why).
    per_layer = {name: _layer_candidates(name, layer, candidates) for name, layer in layers.items()}
    # Forced sparse without an input shape: each layer's first candidate (for CSR the C++ kernel),
    # untimed. Otherwise the candidates are decided on each layer's real input.
    untimed = "dense" not in candidates and input_shape is None
    needs_timing = not untimed and any(len(c) > 1 for c, _ in per_layer.values())
    shapes: dict[str, tuple[int, ...]] = {}
    transposed: set[str] = set()  # layers whose input is a transposed view (see _record_inputs)
    batch_shape = (int(batch_size), *tuple(input_shape or ()))
    if needs_timing:
        if input_shape is None:
            raise SparsetrainError(
                "to_sparse needs input_shape (one example's shape, e.g. input_shape=(1, 28, 28)) to time the "
                "layers on their real inputs; or pass layouts=('csr',) to convert without timing"
            )
        shapes, transposed = _record_inputs(target, layers, batch_shape, device)
    checking = check and needs_timing and "dense" in candidates
    dense_ref = copy.deepcopy(target) if checking else None  # the dense masked model, for the end-to-end check

    threads = torch.get_num_threads()
    names = list(layers)
    converted: dict[str, nn.Module] = {}  # name -> the sparse module now in the model
    keys: dict[str, tuple] = {}
    for i, (name, layer) in enumerate(layers.items()):
        weight = layer.weight.detach()
        cands, block = per_layer[name]
        estimates: dict[str, float] = {}
        if untimed or len(cands) == 1:
            choice, times, how = cands[0], {}, "forced"
        elif name not in shapes:  # never called by forward: nothing to time it on
            choice, times, how = ("dense" if "dense" in cands else cands[0]), {}, "not called"
        else:
            key = (
                type(layer).__name__, tuple(weight.shape), _geometry_key(layer), int((weight != 0).sum()),
                shapes[name], name in transposed, threads, str(weight.dtype), str(weight.device), cands, block,
            )
            keys[name] = key
            if key not in _CHOICE_CACHE:
                _remember(_CHOICE_CACHE, key,
                          _decide(layer, shapes[name], cands, repeats, name in transposed, block, timer))
            choice, times, how, estimates = _CHOICE_CACHE[key]
        info = {
            "layout": choice.split(":")[0],
            "backend": choice.split(":")[1] if ":" in choice else None,
            "candidate": choice,
            "decided_by": how,
            "input_shape": list(shapes[name]) if name in shapes else None,
            "input_transposed": name in transposed,
            "estimates": dict(estimates),
            "times": dict(times),
        }
        if choice == "bsr":
            info["block"] = list(block)
        if choice == "dense":
            layer.sparse_choice = info
        else:
            sparse = _build_candidate(layer, choice, block)
            sparse.sparse_choice = info
            converted[name] = sparse
            target = _replace(target, name, sparse)
            if needs_timing and isinstance(sparse, _TRANSPOSED_OUTPUT) and i + 1 < len(names):
                # Its output is a transposed view (strides (1, B)), which the layers after it may
                # now receive (through ReLU etc.): record their inputs again, so that each is
                # decided on the layout a real forward gives it.
                rest = {n: layers[n] for n in names[i + 1:]}
                more_shapes, more_transposed = _record_inputs(target, rest, batch_shape, device)
                shapes.update(more_shapes)
                transposed = (transposed - set(rest)) | more_transposed
    if checking and converted:
        target = _check_end_to_end(target, dense_ref, layers, converted, keys, batch_shape, repeats, timer, dev)
    return target


def _replace(target: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` in ``target``; the new root if ``name`` is "" (a bare layer)."""
    if name == "":
        return module
    _set_submodule(target, name, module)
    return target


def _default_timer(fns: dict[str, Callable[[], object]], *, rounds: int, budget_s: float, sync=None) -> Timings:
    return time_interleaved(fns, rounds=rounds, warmup=1, budget_s=budget_s, min_rounds=3, sync=sync)


def _check_layouts(layouts: Iterable[str] | None, device: torch.device = torch.device("cpu")) -> tuple[str, ...]:
    """Candidates as ``("dense", "csr:kernel", "csr:torch", "bsr", "semi")``: dense first, then the
    sparse ones in the order given; csr:kernel only on CPU where it builds, semi only on CUDA."""
    if layouts is None:
        layouts = LAYOUTS
    if isinstance(layouts, str):
        layouts = (layouts,)
    layouts = tuple(layouts)
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown or not layouts:
        raise SparsetrainError(f"unknown layouts {unknown or layouts}; choose from {LAYOUTS}, e.g. layouts=('csr',)")
    out: list[str] = ["dense"] if "dense" in layouts else []
    for name in dict.fromkeys(layouts):  # the given order, each once
        if name == "csr":
            out += ["csr:kernel", "csr:torch"] if device.type == "cpu" and extension_available() else ["csr:torch"]
        elif name == "bsr":
            out.append("bsr")
        elif name == "semi" and device.type == "cuda":
            out.append("semi")
    if "semi" in layouts and out in ([], ["dense"]):
        raise SparsetrainError(
            f"layouts={layouts} asks for 'semi' (2:4 semi-structured), which runs only on CUDA GPUs, but device is "
            f"{device}; convert with device='cuda', or add 'csr' or 'bsr' to layouts"
        )
    return tuple(out)


def _layer_candidates(name: str, layer: nn.Module, candidates: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """The candidates ``layer`` qualifies for, and its BSR block size (``None`` unless "bsr" is
    among them). Raises if none is left, saying why each was ruled out."""
    out: list[str] = []
    block = None
    why: list[str] = []
    for c in candidates:
        if c == "bsr":
            matrix = conv_matrix(layer) if isinstance(layer, nn.Conv2d) else layer.weight
            block = detect_block_size(matrix)
            if block is None:
                why.append(f"bsr: {block_problem(matrix)}")
                continue
        elif c == "semi":
            problem = (semi_structured_problem(layer.weight) if isinstance(layer, nn.Linear)
                       else "only Linear layers run as 2:4")
            if problem is not None:
                why.append(f"semi: {problem}")
                continue
        out.append(c)
    if not out:
        raise SparsetrainError(
            f"layer {name or '(the model)'!r} ({type(layer).__name__}, weight {tuple(layer.weight.shape)}) can use none "
            f"of the requested layouts: {'; '.join(why)}. Add 'csr' (any mask) or 'dense' to layouts, or prune with "
            "the matching structure (structure='block32x32' for bsr, '2:4' for semi)"
        )
    return tuple(out), block


_WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _candidate_layers(model: nn.Module, mask: Mask | None) -> dict[str, nn.Module]:
    """Linear/Conv2d layers whose weight is masked (or, without a mask, has a zero), model order."""
    found = {}
    # These parents read their children's .weight directly (fused fast paths): keep those dense.
    opaque = [n + "." for n, m in model.named_modules() if isinstance(m, _WEIGHT_READERS)]
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in opaque):
            continue
        # Exact types only: subclasses may compute differently, and some (MultiheadAttention's
        # out_proj) are never called, their weight being read directly by the parent.
        if not (type(module) is nn.Linear or (type(module) is nn.Conv2d and convertible_conv(module))):
            continue
        wname = f"{name}.weight" if name else "weight"
        if (wname in mask) if mask is not None else bool((module.weight == 0).any()):
            found[name] = module
    return found


def _geometry_key(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Conv2d):
        return (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups)
    return ()


def _is_transposed(x: torch.Tensor) -> bool:
    """A 2-D (B, K) tensor laid out as (K, B) row-major: a :class:`SparseLinear` output's layout."""
    return x.dim() == 2 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride() == (1, x.shape[0])


def _record_inputs(model: nn.Module, layers: dict[str, nn.Module], shape: tuple[int, ...], device):
    """Each layer's input shape in one forward pass of a random batch of ``shape`` (eval mode, no
    gradients: batch-norm statistics are not touched), and the set of layers whose input is a
    transposed view (:func:`_is_transposed`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    transposed: set[str] = set()

    def hook(name):
        def record(module, args):
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)
                if _is_transposed(args[0]):
                    transposed.add(name)
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    modes = {m: m.training for m in model.modules()}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(shape, dtype=dtype, device=device))
    except SparsetrainError:
        raise
    except Exception as exc:
        raise SparsetrainError(
            f"a dummy batch of shape {shape} does not fit the model ({type(exc).__name__}: {exc}); pass the shape of "
            "one example as input_shape, e.g. input_shape=(1, 28, 28) for MNIST"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return shapes, transposed


SPARSE_MARGIN = 0.1  # a timed sparse layout is chosen only if at least 10% faster than dense
MAX_SPARSE_DENSITY = 0.5  # above this fraction of nonzeros a layer stays dense (CSR would cost memory too)
PRIOR_BAND = 3.0  # the cost model decides alone where it predicts one side this many times faster
LAYER_BUDGET_S = 2.0  # seconds of timing per layer, at most (but at least 3 rounds)
CHECK_BUDGET_S = 1.0  # seconds per end-to-end timing, at most (but at least 3 rounds)
# The converted model is kept only if at least this much faster than dense end to end: a tie
# within timing noise buys nothing and risks a slower model (LeNet-300-100 at 90%, batch 1, had
# come back at 0.97-1.01x of dense when any ratio <= 1 was accepted).
END_TO_END_MARGIN = 0.05

# The cost model's constants: seconds, one thread, float32, a 2020s x86 server core. They need not
# be exact: only a prediction PRIOR_BAND times apart decides alone, and a wrong decision in the band
# is caught by the timing; they were set from the measurements in docs/sparse.md.
COSTS = {
    "dense_call": 3e-6,      # an nn.Linear / nn.Conv2d call
    "dense_gemv": 0.25e-9,   # per weight entry, one example (memory-bound: each weight read once)
    "dense_gemm": 0.02e-9,   # per multiply-add, batch > 1 (blocked BLAS)
    "sparse_call": 6e-6,     # a sparse module call (Python, checks, ctypes)
    "torch_call": 15e-6,     # torch's CSR / BSR dispatch
    "csr_spmv": 0.8e-9,      # per nonzero, one example (index + value + a gathered input)
    "csr_spmm": 0.15e-9,     # per nonzero per example, batch > 1
    "torch_csr": 1.5,        # torch's CSR relative to the C++ kernel
    "bsr_value": 0.05e-9,    # per stored tile entry per example (dense tiles, BLAS-like)
    "unfold": 0.5e-9,        # per element of the unfolded input of a sparse convolution
}


def estimate_times(layer: nn.Module, in_shape: tuple[int, ...], candidates: Iterable[str],
                   block: tuple[int, int] | None = None) -> dict[str, float]:
    """The cost model: predicted seconds per call of each candidate on an input of ``in_shape``,
    from the weight's shape and nonzero count alone (:data:`COSTS`). Dense pays for every
    multiply-add, sparse for its nonzeros (several times more per unit of work: index reads,
    gathers) plus a larger call overhead, and a sparse convolution for unfolding its input.

    >>> import torch.nn as nn
    >>> layer = nn.Linear(4096, 4096)
    >>> _ = layer.weight.data.mul_(torch.rand(4096, 4096) < 0.05)       # 95% sparse
    >>> est = estimate_times(layer, (1, 4096), ("dense", "csr:kernel"))
    >>> est["dense"] / est["csr:kernel"] > PRIOR_BAND                    # clearly sparse at batch 1
    True
    """
    w = layer.weight.detach()
    nnz = int((w != 0).sum())
    if isinstance(layer, nn.Conv2d):
        B = in_shape[0] if len(in_shape) == 4 else 1
        H, W_ = in_shape[-2], in_shape[-1]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        L = max(1, (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * max(1, (W_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        N = B * L  # columns of the unfolded input
        unfold = layer.in_channels * kh * kw * N * COSTS["unfold"]
    else:
        N = math.prod(in_shape[:-1]) if len(in_shape) > 1 else 1
        unfold = 0.0
    dense_work = w.numel() * (COSTS["dense_gemv"] if N == 1 else N * COSTS["dense_gemm"])
    csr_work = nnz * (COSTS["csr_spmv"] if N == 1 else N * COSTS["csr_spmm"])
    out: dict[str, float] = {}
    for c in candidates:
        if c == "dense":
            out[c] = COSTS["dense_call"] + dense_work
        elif c == "csr:kernel":
            out[c] = COSTS["sparse_call"] + unfold + csr_work
        elif c == "csr:torch":
            out[c] = COSTS["torch_call"] + unfold + COSTS["torch_csr"] * csr_work
        elif c == "bsr":
            stored = _tile_entries(conv_matrix(layer) if isinstance(layer, nn.Conv2d) else w, block) or nnz
            per_value = COSTS["bsr_value"] * (1 if N > 1 else COSTS["dense_gemv"] / COSTS["dense_gemm"])
            out[c] = COSTS["torch_call"] + unfold + stored * N * per_value
        else:  # "semi": GPU only, not modelled
            out[c] = math.nan
    return out


def _tile_entries(matrix: torch.Tensor, block: tuple[int, int] | None) -> int | None:
    """Entries stored by BSR with ``block`` tiles (nonzero tiles x R x C), or ``None``."""
    if block is None:
        return None
    R, C = block
    M, K = matrix.shape
    if M % R or K % C:
        return None
    tiles = (matrix.detach().reshape(M // R, R, K // C, C) != 0).any(3).any(1)  # (M/R, K/C)
    return int(tiles.sum()) * R * C


def _decide(layer: nn.Module, in_shape: tuple[int, ...], candidates: tuple[str, ...], repeats: int,
            transposed: bool, block: tuple[int, int] | None, timer: Timer):
    """(choice, measured times, how, estimates) for one layer: the cost model where it is clear
    (or the layer is more than half dense), else :func:`_choose`'s timing."""
    w = layer.weight
    estimates: dict[str, float] = {}
    if "dense" in candidates and w.device.type == "cpu":
        if float((w != 0).float().mean()) > MAX_SPARSE_DENSITY:
            return "dense", {}, "cost model", estimates
        estimates = estimate_times(layer, in_shape, candidates, block)
        sparse = min((c for c in candidates if c != "dense"), key=lambda c: estimates[c])
        ratio = estimates[sparse] / estimates["dense"]
        if ratio * PRIOR_BAND <= 1.0:
            return sparse, {}, "cost model", estimates
        if ratio >= PRIOR_BAND:
            return "dense", {}, "cost model", estimates
    choice, times = _choose(layer, in_shape, candidates, repeats, transposed, block=block, timer=timer)
    return choice, times, "timing", estimates


def _choose(layer: nn.Module, in_shape: tuple[int, ...], candidates: tuple[str, ...], repeats: int,
            transposed: bool = False, block: tuple[int, int] | None = None, timer: Timer | None = None):
    """Time the candidates on a random input of ``in_shape``, laid out as a transposed view if
    ``transposed`` (as the layer receives it after a sparse Linear: a sparse layer reads that
    without a copy, which changes which candidate wins); the fastest median wins (dense on ties,
    and unless sparse is :data:`SPARSE_MARGIN` faster). ``block``: the BSR block size already
    detected for the layer (not detected again)."""
    w = layer.weight
    if transposed:
        x = torch.randn(tuple(reversed(in_shape)), dtype=w.dtype, device=w.device).t()
    else:
        x = torch.randn(in_shape, dtype=w.dtype, device=w.device)
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    for c in candidates:
        if c == "dense":
            fns[c] = layer
        elif w.device.type == "cpu":  # the paths tested here: any failure is a bug, so it is raised
            fns[c] = _build_candidate(layer, c, block)
        else:
            # Off CPU a backend may refuse a shape or lack a kernel in this build (cuSPARSELt,
            # Triton): drop that candidate with a warning rather than fail the conversion.
            try:
                m = _build_candidate(layer, c, block)
                with torch.no_grad():
                    m(x)
                fns[c] = m
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                warnings.warn(
                    f"{type(layer).__name__} {tuple(w.shape)} on {w.device}: layout candidate {c!r} failed and is "
                    f"skipped ({type(exc).__name__}: {str(exc)[:300]})", RuntimeWarning, stacklevel=3,
                )
    if not fns:
        raise SparsetrainError(
            f"none of the layouts {candidates} runs for {type(layer).__name__} {tuple(w.shape)} on {w.device} (see the "
            "warnings above); add 'dense' or 'csr' to layouts"
        )
    with torch.no_grad():
        timings = (timer or _default_timer)({c: (lambda m=m: m(x)) for c, m in fns.items()}, rounds=repeats,
                                            budget_s=LAYER_BUDGET_S, sync=cuda_sync(w.device))
    times = {c: timings.median(c) for c in fns}
    best = min(fns, key=lambda c: (times[c], c != "dense"))
    if best != "dense" and "dense" in fns:
        density = float((w != 0).float().mean())
        # Sparse must win clearly: a near-tie in a micro-benchmark can lose end to end (and CSR
        # stores 8 bytes per kept fp32 weight, so above half density it also costs memory).
        if times[best] > (1 - SPARSE_MARGIN) * times["dense"] or density > MAX_SPARSE_DENSITY:
            best = "dense"
    return best, times


def _check_end_to_end(target: nn.Module, dense_ref: nn.Module, layers: dict[str, nn.Module],
                      converted: dict[str, nn.Module], keys: dict[str, tuple], batch_shape: tuple[int, ...],
                      repeats: int, timer: Timer, device: torch.device) -> nn.Module:
    """The converted ``target`` if it is not slower than ``dense_ref`` end to end; else the layers
    decided by timing go back to dense and it is checked again; else every layer goes back.

    Each check times the two models twice, interleaved, and compares each one's smaller median:
    load only ever adds time, so a measurement spoiled by a busy phase (either side 10x slower
    in one of the two) is outvoted by the other."""
    sig = tuple((n, keys.get(n), getattr(converted.get(n, layers[n]), "sparse_choice", {}).get("candidate"))
                for n in layers)
    key = (type(dense_ref).__name__, batch_shape, torch.get_num_threads(), sig)
    if key not in _CHECK_CACHE:
        _remember(_CHECK_CACHE, key, _end_to_end_verdict(target, dense_ref, layers, converted, batch_shape,
                                                         repeats, timer, device))
    reverted, record = _CHECK_CACHE[key]
    for name, sparse in converted.items():
        if name in reverted:
            layer = layers[name]
            layer.sparse_choice = {**sparse.sparse_choice, "layout": "dense", "backend": None, "candidate": "dense",
                                   "decided_by": "end-to-end check",
                                   "rejected": sparse.sparse_choice["candidate"], "end_to_end": record}
            target = _replace(target, name, layer)
        else:
            sparse.sparse_choice["end_to_end"] = record
    return target


def _end_to_end_verdict(target, dense_ref, layers, converted, batch_shape, repeats, timer, device):
    """(names of the converted layers to put back to dense, a record of the measurements)."""
    dtype = next((p.dtype for p in dense_ref.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn(batch_shape, dtype=dtype, device=device)
    modes = {m: m.training for m in (*target.modules(), *dense_ref.modules())}
    target.eval()
    dense_ref.eval()

    def slower(model) -> tuple[bool, float]:
        best: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(2):
                t = timer({"dense": lambda: dense_ref(x), "sparse": lambda: model(x)}, rounds=repeats,
                          budget_s=CHECK_BUDGET_S, sync=cuda_sync(device))
                for k in ("dense", "sparse"):
                    best[k] = min(best.get(k, math.inf), t.median(k))
        r = best["sparse"] / best["dense"]
        return r > 1.0 - END_TO_END_MARGIN, r

    timed = {n for n, m in converted.items() if m.sparse_choice.get("decided_by") == "timing"}
    stages = [frozenset()]
    if timed and len(timed) < len(converted):
        stages.append(frozenset(timed))
    ratios = []
    try:
        for reverted in stages:
            model = target
            for n in reverted:  # back to dense for this check, restored below
                model = _replace(model, n, layers[n])
            is_slower, r = slower(model)
            for n in reverted:
                model = _replace(model, n, converted[n])
            ratios.append({"reverted": sorted(reverted), "time_ratio_sparse_over_dense": r})
            if not is_slower:
                return reverted, {"checks": ratios, "reverted": sorted(reverted)}
    finally:
        for m, training in modes.items():
            m.training = training
    everything = frozenset(converted)
    return everything, {"checks": ratios, "reverted": sorted(everything)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class SparseLayerRow:
    """One layer of :func:`sparse_report`. Bytes count the weight and bias as stored:
    dense = (M*K + M) * itemsize; csr = 4 (M + 1) + (4 + itemsize) nnz + M * itemsize;
    bsr (R x C tiles) = 4 (M/R + 1) + 4 nblocks + nblocks R C itemsize + M * itemsize;
    semi (2:4) = M K/2 itemsize + M K/8 (4 bits of positions per group of 4) + M * itemsize.
    ``nnz`` = nonzero weights; ``params`` = stored parameters (weight values as stored, zeros
    inside BSR tiles and 2:4 groups included, + bias), ``dense_params`` = weight + bias entries.
    ``block`` = the BSR tile (R, C), else ``None``. Times are the medians measured at conversion
    (seconds; ``None`` when not timed)."""

    name: str
    kind: str
    layout: str
    backend: str | None
    shape: tuple[int, ...]
    nnz: int
    params: int
    dense_params: int
    dense_bytes: int
    stored_bytes: int
    dense_time: float | None
    sparse_time: float | None
    block: tuple[int, int] | None = None

    @property
    def choice(self) -> str:
        """The candidate name as timed: "dense", "csr:kernel", "csr:torch", "bsr" or "semi"."""
        return f"csr:{self.backend}" if self.layout == "csr" else self.layout


class SparseReport(list):
    """A list of :class:`SparseLayerRow`, with ``.total`` summing them (times summed where known)."""

    @property
    def total(self) -> SparseLayerRow:
        def tsum(attr):
            vals = [getattr(r, attr) for r in self]
            return None if not vals or any(v is None for v in vals) else sum(vals)

        return SparseLayerRow(
            "total", "", "", None, (), sum(r.nnz for r in self), sum(r.params for r in self),
            sum(r.dense_params for r in self), sum(r.dense_bytes for r in self), sum(r.stored_bytes for r in self),
            tsum("dense_time"), tsum("sparse_time"),
        )


def sparse_report(model: nn.Module) -> SparseReport:
    """One row per Linear/Conv2d layer, dense or sparse, in model order (see :class:`SparseLayerRow`)."""
    rows = SparseReport()
    for name, m in model.named_modules():
        block = None
        if isinstance(m, SPARSE_MODULES):
            kind = "Conv2d" if isinstance(m, (SparseConv2d, SparseBlockConv2d)) else "Linear"
            shape = (m.out_features, m.in_features) if kind == "Linear" else (
                m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            itemsize = m.values.element_size()
            nbias = 0 if m.bias is None else m.bias.numel()
            dense_params = math.prod(shape) + nbias
            layout, stored, nnz = _layout_of(m), m.stored_bytes(), m.nnz
            backend = m.backend if layout == "csr" else None
            block = tuple(m.block) if layout == "bsr" else None
            params = m.values.numel() + nbias
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            kind = "Linear" if isinstance(m, nn.Linear) else "Conv2d"
            shape = tuple(m.weight.shape)
            itemsize = m.weight.element_size()
            nbias = 0 if m.bias is None else m.bias.numel()
            dense_params = m.weight.numel() + nbias
            layout, backend, stored, nnz = "dense", None, dense_params * itemsize, int((m.weight != 0).sum())
            params = dense_params
        else:
            continue
        times = (getattr(m, "sparse_choice", None) or {}).get("times", {})
        sparse_times = [t for k, t in times.items() if k != "dense"]
        chosen = None if layout == "dense" else f"csr:{backend}" if layout == "csr" else layout
        rows.append(SparseLayerRow(
            name, kind, layout, backend, shape, nnz, params, dense_params, dense_params * itemsize, stored,
            times.get("dense"), times.get(chosen) if chosen in times else (min(sparse_times) if sparse_times else None),
            block,
        ))
    return rows


def format_sparse_report(report: SparseReport | nn.Module) -> str:
    """The report as a text table (pass a report or a converted model)."""
    rows = report if isinstance(report, list) else sparse_report(report)
    rows = rows if isinstance(rows, SparseReport) else SparseReport(rows)

    def ms(t):
        return "-" if t is None else f"{t * 1e3:.3f}"

    width = max([len(r.name) for r in rows] + [5])
    head = (f"{'layer':<{width}}  {'kind':<6} {'layout':<10} {'shape':<18} {'nnz':>10} {'params':>10} "
            f"{'dense B':>11} {'stored B':>11} {'stored':>7} {'dense ms':>9} {'sparse ms':>9} {'speed-up':>8}")
    lines = [head]
    for r in [*rows, rows.total]:
        layout = r.layout + (f":{r.backend}" if r.backend else "") + (f":{r.block[0]}x{r.block[1]}" if r.block else "")
        frac = f"{r.stored_bytes / r.dense_bytes:.1%}" if r.dense_bytes else "-"
        speed = (f"{r.dense_time / r.sparse_time:.2f}x"
                 if r.dense_time and r.sparse_time and r.layout not in ("dense", "") else "-")
        shape = str(r.shape) if r.shape else ""
        lines.append(f"{r.name:<{width}}  {r.kind:<6} {layout:<10} {shape:<18} {r.nnz:>10} {r.params:>10} "
                     f"{r.dense_bytes:>11} {r.stored_bytes:>11} {frac:>7} {ms(r.dense_time):>9} "
                     f"{ms(r.sparse_time):>9} {speed:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def save_sparse(model: nn.Module, path: str | Path) -> None:
    """Write a converted model: its state dict as safetensors (CSR and BSR layers as
    ``crow_indices``, ``col_indices``, ``values``, 2:4 layers as ``values`` and ``meta`` (see
    :func:`~sparsetrain.sparse.block.compress_2to4`), each with its ``bias``) plus JSON metadata
    (format, layouts, shapes, block sizes, times). Files holding only dense and CSR layers keep
    format ``sparsetrain.sparse/1``; with BSR or 2:4 layers they are ``sparsetrain.sparse/2``."""
    from ..state_io import save_tensors

    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, SPARSE_MODULES):
            layout = _layout_of(m)
            conv = isinstance(m, (SparseConv2d, SparseBlockConv2d))
            entry = {"kind": "Conv2d" if conv else "Linear", "layout": layout, "shape": list(m.matrix_shape),
                     "nnz": m.nnz, "has_bias": m.bias is not None, "choice": m.sparse_choice}
            if layout == "csr":
                entry["backend"] = m.backend
            elif layout == "bsr":
                entry["block"] = list(m.block)
            if conv:
                entry["conv"] = m.geometry()
            layers[name] = entry
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "sparse_choice", None) is not None:
            layers[name] = {"kind": type(m).__name__, "layout": "dense", "choice": m.sparse_choice}
    structured = any(e["layout"] in ("bsr", "semi") for e in layers.values())
    meta = {"format": FORMAT_V2 if structured else FORMAT, "layers": layers}
    save_tensors(path, dict(model.state_dict()), {_META_KEY: json.dumps(meta)}, what="model")


def load_sparse(path: str | Path, model: nn.Module | Callable[[], nn.Module], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_sparse`, each layer in the layout it was saved in.
    ``model``: the dense architecture, either a template module (copied, not changed) or a factory
    called with no arguments. The arrays are checked before use (a damaged file is an error, not
    a read outside memory)."""
    from ..state_io import load_tensors

    tensors, raw = load_tensors(path)
    try:
        meta = json.loads(raw[_META_KEY])
        if meta.get("format") not in (FORMAT, FORMAT_V2):
            raise ValueError(f"format {meta.get('format')!r}")
        layers = meta["layers"]
    except (KeyError, ValueError, TypeError) as exc:
        raise SparsetrainError(f"{path} is not a sparse model file written by save_sparse ({exc})") from exc
    if isinstance(model, nn.Module):
        target = copy.deepcopy(model)
    elif callable(model):
        target = model()
        if not isinstance(target, nn.Module):
            raise SparsetrainError(f"the model factory returned {type(target).__name__}, not an nn.Module")
    else:
        raise SparsetrainError("load_sparse needs a template nn.Module or a factory that builds one")

    for name, entry in layers.items():
        try:
            dense = target.get_submodule(name)
        except AttributeError as exc:
            raise SparsetrainError(f"{path} has a layer {name!r} that the given model lacks; wrong architecture?") from exc
        if entry["layout"] == "dense":
            dense.sparse_choice = entry.get("choice")
            continue
        prefix = f"{name}." if name else ""
        try:
            sparse = _rebuild_layer(entry, tensors, prefix, name, dense)
        except KeyError as exc:
            raise SparsetrainError(f"{path} lacks the arrays of sparse layer {name!r} ({exc}); the file is damaged") from exc
        sparse.sparse_choice = entry.get("choice") or sparse.sparse_choice
        if name == "":
            target = sparse
        else:
            _set_submodule(target, name, sparse)
    try:
        target.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise SparsetrainError(f"{path} does not fit the given model: {exc}") from exc
    return target.to(device)


def _rebuild_layer(entry: dict, tensors: dict[str, torch.Tensor], prefix: str, name: str, dense: nn.Module) -> nn.Module:
    """The sparse module of one file entry, its arrays validated against the dense layer it replaces."""
    layout, kind, shape = entry["layout"], entry["kind"], tuple(entry["shape"])
    bias = tensors.get(prefix + "bias") if entry.get("has_bias") else None
    if kind == "Linear":
        if not isinstance(dense, nn.Linear) or (dense.out_features, dense.in_features) != shape:
            raise SparsetrainError(f"layer {name!r} of the given model is not a Linear of shape {shape}")
    elif kind == "Conv2d" and layout in ("csr", "bsr"):
        g = entry["conv"]
        if not isinstance(dense, nn.Conv2d) or dense.out_channels != shape[0] or dense.in_channels != g["in_channels"]:
            raise SparsetrainError(f"layer {name!r} of the given model is not the Conv2d the file holds")
    else:
        raise SparsetrainError(f"layer {name!r}: unknown kind/layout {kind}/{layout} in the file; written by a newer version?")

    if layout == "semi":
        sparse = SparseSemiStructuredLinear(tensors[prefix + "values"], tensors[prefix + "meta"], shape, bias)
        sparse.validate()
        return sparse
    if layout == "csr":
        W = CSRMatrix(tensors[prefix + "crow_indices"], tensors[prefix + "col_indices"], tensors[prefix + "values"], shape)
    elif layout == "bsr":
        W = BlockMatrix(tensors[prefix + "crow_indices"], tensors[prefix + "col_indices"], tensors[prefix + "values"], shape)
        if list(W.block) != list(entry.get("block", W.block)):
            raise SparsetrainError(f"layer {name!r}: the file's BSR values have {W.block} tiles, its metadata says {entry['block']}")
    else:
        raise SparsetrainError(f"layer {name!r}: unknown layout {layout!r} in the file; written by a newer version?")
    W.validate()
    if kind == "Linear":
        return SparseLinear(W, bias, entry["backend"]) if layout == "csr" else SparseBlockLinear(W, bias)
    g = entry["conv"]
    geometry = dict(in_channels=g["in_channels"], kernel_size=tuple(g["kernel_size"]), stride=tuple(g["stride"]),
                    padding=tuple(g["padding"]), dilation=tuple(g["dilation"]), groups=g["groups"])
    if layout == "csr":
        return SparseConv2d(W, bias, backend=entry["backend"], **geometry)
    return SparseBlockConv2d(W, bias, **geometry)
