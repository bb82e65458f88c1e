"""Sparse training on CPU: Linear layers whose forward *and* backward skip the pruned weights.

A pruned ``nn.Linear`` trained the masked way still multiplies by all its zeros. After
:func:`sparsify_for_training_` it is a :class:`SparseTrainLinear` that keeps only the kept weights
(a 1-D ``values`` parameter in CSR order) and runs all three products of a training step on the
sparse structure, as SparseProp does (Nikdan et al., 2023, "SparseProp: Efficient Sparse
Backpropagation for Faster Training of Neural Networks")::

    forward      y        = x W^T + b              sparse W  times dense x
    backward     grad_x   = grad_y W               sparse W^T times dense grad_y
                 grad_v_k = sum_b grad_y[b, r_k] x[b, c_k]   only at the kept (r_k, c_k)
                 grad_b   = sum_b grad_y

so the cost of a step scales with the kept weights, not with the layer's size. The values, their
gradients and the optimizer's state for them (momentum, Adam's moments) are exactly the dense
masked layer's at the kept entries, so SGD, Adam and AdamW (weight decay included) take the same
steps as dense masked training does, up to the rounding of sums taken in another order.

    >>> import torch
    >>> from sparsetrain.sparse.training import SparseTrainLinear
    >>> dense = torch.nn.Linear(4, 3)
    >>> mask = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    >>> layer = SparseTrainLinear.from_dense(dense, mask)
    >>> layer.values.shape, layer(torch.randn(5, 4)).shape
    (torch.Size([4]), torch.Size([5, 3]))
    >>> bool((layer.to_dense_linear().weight == 0).sum() == 8)
    True

Kernels: the three products are torch's own CSR operations, which run on MKL's sparse BLAS and
ATen's parallel CPU kernels; no extension is compiled and nothing beyond torch is needed.

- forward ``torch.sparse.mm(W, x^T)`` with x^T contiguous;
- grad_x ``torch.sparse.mm(W^T, grad_y^T)`` with W^T held as its own CSR structure (the values
  gathered through a fixed permutation each step), because torch's other routes
  (``grad_y @ W_csr``, ``W_csr.t() @ grad_y^T`` as CSC) are slower than dense;
- grad_values ``torch.sparse.sampled_addmm(W_pattern, grad_y^T, x)``: one dot product of length
  B per kept weight (gathering ``(grad_y[:, rows] * x[:, cols]).sum(0)`` is memory-bound and far
  slower).

How fast each is against dense: docs/sparse.md, "Measurement history".

Transposed operands are laid out so the sparse kernels read contiguous rows: the forward returns
y as the transpose of a contiguous (out, B) tensor, so an elementwise activation keeps that layout
and the next sparse layer's x^T costs nothing.

With more torch threads than free cores, these kernels (as every OpenMP kernel) slow down badly:
on a busy machine use ``torch.set_num_threads`` with the number of idle cores.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..errors import SparsetrainError

__all__ = ["SparseTrainLinear", "densify_after_training_", "sparsify_for_training_"]

_INDEX = torch.int32  # CSR indices: half the memory of int64; MKL's sparse BLAS takes them as is


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor over existing index and value storage (no copy, no invariant check: the
    structure was built and checked once, in :meth:`SparseTrainLinear.from_dense`)."""
    with warnings.catch_warnings():
        # torch warns once per process that CSR support is "in beta"; it is not our user's concern
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _SparseLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W given by CSR structure and ``values``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, t_crow, t_col, t_perm, out_features):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)  # (N, in)
        x_t = x2.t().contiguous()  # (in, N); free when x is the output of a sparse layer
        weight = _csr(crow, col, values, (out_features, in_features))
        y_t = torch.sparse.mm(weight, x_t)  # (out, N)
        if bias is not None:
            y_t.add_(bias.unsqueeze(1))
        ctx.save_for_backward(x_t, values, crow, col, t_crow, t_col, t_perm)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y_t.t().reshape(*x.shape[:-1], out_features)  # (..., out), a transposed view

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x_t, values, crow, col, t_crow, t_col, t_perm = ctx.saved_tensors
        in_features, _ = x_t.shape
        out_features = crow.numel() - 1
        grad_y_t = grad_y.reshape(-1, out_features).t().contiguous()  # (out, N)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            # W^T in CSR: the same values in column-major order
            weight_t = _csr(t_crow, t_col, values.index_select(0, t_perm), (in_features, out_features))
            grad_x = torch.sparse.mm(weight_t, grad_y_t).t().reshape(ctx.x_shape)  # (..., in)
        if ctx.needs_input_grad[1]:
            # (grad_y^T x) sampled at the kept entries; zeros as the added input (beta = 0 still
            # multiplies it, and 0 * inf would be nan)
            pattern = _csr(crow, col, torch.zeros_like(values), (out_features, in_features))
            grad_values = torch.sparse.sampled_addmm(pattern, grad_y_t, x_t.t(), beta=0.0).values()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y_t.sum(1)
        return grad_x, grad_values, grad_bias, None, None, None, None, None, None


class SparseTrainLinear(nn.Module):
    """A Linear layer that stores, computes with and trains only its kept weights.

    Parameters: ``values`` (nnz,) the kept weights in row-major (CSR) order, and ``bias``
    (out_features,) or None, dense as in ``nn.Linear``. Buffers (int32, part of the state dict so
    that a checkpoint alone rebuilds the layer): ``crow_indices`` (out+1,) and ``col_indices``
    (nnz,), the CSR structure of W; ``t_crow_indices`` (in+1,), ``t_col_indices`` (nnz,) and
    ``t_perm`` (nnz,), that of W^T with ``values[t_perm]`` its values.

    Build it with :meth:`from_dense`; :meth:`to_dense_linear` gives the ``nn.Linear`` back (zeros
    at the pruned entries). A state dict with a dense ``weight`` in place of ``values`` loads too,
    provided it is zero off the structure."""

    def __init__(self, in_features: int, out_features: int, crow_indices: torch.Tensor,
                 col_indices: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        crow = crow_indices.to(_INDEX)
        col = col_indices.to(_INDEX)
        if crow.shape != (out_features + 1,) or col.shape != values.shape or values.dim() != 1:
            raise SparsetrainError(
                f"inconsistent CSR structure for a {out_features} x {in_features} layer: crow_indices "
                f"{tuple(crow.shape)}, col_indices {tuple(col.shape)}, values {tuple(values.shape)}"
            )
        self.values = nn.Parameter(values.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("crow_indices", crow.clone())
        self.register_buffer("col_indices", col.clone())
        t_crow, t_col, t_perm = _transpose_structure(crow, col, in_features)
        self.register_buffer("t_crow_indices", t_crow)
        self.register_buffer("t_col_indices", t_col)
        self.register_buffer("t_perm", t_perm)
        self.register_load_state_dict_pre_hook(_accept_dense_weight)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor) -> "SparseTrainLinear":
        """The layer of ``linear`` that keeps the entries where ``mask`` (bool, shaped like
        ``linear.weight``) is True; the weights elsewhere are dropped (as if zeroed by
        ``apply_mask_``). Same device, dtype and ``requires_grad`` as ``linear``."""
        weight = linear.weight
        if tuple(mask.shape) != tuple(weight.shape) or mask.dtype != torch.bool:
            raise SparsetrainError(
                f"the mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.to(weight.device)
        crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
        torch.cumsum(mask.sum(1), 0, out=crow[1:])
        col = mask.nonzero()[:, 1]
        layer = cls(weight.shape[1], weight.shape[0], crow, col, weight.detach()[mask], linear.bias)
        layer.train(linear.training)
        layer.requires_grad_(weight.requires_grad)
        return layer

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def rows(self) -> torch.Tensor:
        """The row (output unit) of each kept weight, (nnz,) int64."""
        counts = self.crow_indices.diff().to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)

    def mask(self) -> torch.Tensor:
        """The kept entries as a bool (out_features, in_features) tensor."""
        out = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.values.device)
        out[self.rows(), self.col_indices.to(torch.int64)] = True
        return out

    def dense_weight(self) -> torch.Tensor:
        """W as a dense (out_features, in_features) tensor with zeros at the pruned entries
        (a new tensor, detached)."""
        out = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        out[self.rows(), self.col_indices.to(torch.int64)] = self.values.detach()
        return out

    def to_dense_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (weights copied, zeros at the pruned entries)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.train(self.training)
        linear.requires_grad_(self.values.requires_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.shape[-1] != self.in_features:
            raise SparsetrainError(f"expected inputs with {self.in_features} features in the last dimension, got shape {tuple(x.shape)}")
        return _SparseLinearFunction.apply(
            x, self.values, self.bias, self.crow_indices, self.col_indices,
            self.t_crow_indices, self.t_col_indices, self.t_perm, self.out_features,
        )

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz} ({self.nnz / total:.2%} dense)")


def _transpose_structure(crow: torch.Tensor, col: torch.Tensor, in_features: int):
    """CSR structure of W^T from that of W: (t_crow (in+1,), t_col (nnz,) = the row of W of each
    entry in column-major order, t_perm (nnz,) = where that entry sits in W's values)."""
    out_features = crow.numel() - 1
    counts = crow.diff().to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(out_features, device=crow.device), counts)  # (nnz,)
    cols = col.to(torch.int64)
    perm = torch.argsort(cols * max(out_features, 1) + rows, stable=True)  # column-major order
    t_crow = torch.zeros(in_features + 1, dtype=torch.int64, device=crow.device)
    torch.cumsum(torch.bincount(cols, minlength=in_features), 0, out=t_crow[1:])
    return t_crow.to(_INDEX), rows[perm].to(_INDEX), perm.to(_INDEX)


def _accept_dense_weight(module: SparseTrainLinear, state_dict, prefix, *args) -> None:
    """Let ``load_state_dict`` take a dense layer's ``weight`` (a checkpoint of the masked
    network): its entries on the structure become ``values``; nonzeros off it are an error."""
    key = prefix + "weight"
    if key not in state_dict or prefix + "values" in state_dict:
        return
    weight = state_dict[key]
    if tuple(weight.shape) != (module.out_features, module.in_features):
        return  # load_state_dict reports the missing "values" and the unexpected "weight"
    keep = module.mask().to(weight.device)
    if bool((weight.masked_fill(keep, 0) != 0).any()):
        raise SparsetrainError(
            f"{key} has nonzero weights outside the sparse layer's structure; apply the mask the "
            "layer was built with (apply_mask_) before loading, or rebuild the layer from this weight"
        )
    state_dict.pop(key)
    state_dict[prefix + "values"] = weight[keep]
    for name in ("crow_indices", "col_indices", "t_crow_indices", "t_col_indices", "t_perm"):
        state_dict.setdefault(prefix + name, getattr(module, name))


def sparsify_for_training_(model: nn.Module, mask: dict[str, torch.Tensor]) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose ``weight`` is in ``mask`` by a
    :class:`SparseTrainLinear` with that mask; return the model.

    Other layers and masked parameters are left as they are (mask them with ``GradientMask``
    restricted to the names that still exist). Only layers of exactly type ``nn.Linear`` are
    replaced: subclasses may not call their own ``forward`` (``MultiheadAttention.out_proj``) or
    may compute something else. The parameter names change from ``<layer>.weight`` to
    ``<layer>.values`` (``<layer>.bias`` stays), so build the optimizer afterwards. When ``model``
    itself is the Linear layer, the new layer is returned (use the return value).

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> mask = {"0.weight": torch.rand(4, 8) > 0.5}
        >>> _ = sparsify_for_training_(model, mask)
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('SparseTrainLinear', 'Linear')
    """
    shared = _shared_parameters(model)
    for name, m in mask.items():
        owner, _, leaf = name.rpartition(".")
        if leaf != "weight":
            continue
        module = model.get_submodule(owner)
        if type(module) is not nn.Linear or id(module.weight) in shared:
            continue
        sparse = SparseTrainLinear.from_dense(module, m)
        if not owner:
            return sparse
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent), child, sparse)
    return model


def densify_after_training_(model: nn.Module) -> nn.Module:
    """The inverse of :func:`sparsify_for_training_`: replace, in place, every
    :class:`SparseTrainLinear` by an equal ``nn.Linear`` (zeros at the pruned entries), for
    evaluation, export or any code that expects ``weight``; return the model (the new layer when
    ``model`` itself is one)."""
    if isinstance(model, SparseTrainLinear):
        return model.to_dense_linear()
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseTrainLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.to_dense_linear())
    return model


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights): replacing one holder
    would untie them, so such layers stay dense."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}
