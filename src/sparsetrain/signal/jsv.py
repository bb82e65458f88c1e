"""Jacobian singular values (JSV): how well a network propagates signals, input to output and
layer by layer (Lee, Ajanthan, Gould, Torr, "A signal propagation perspective for pruning neural
networks at initialization", ICLR 2020).

**Input-output.** For each example x, J(x) = d logits / d x, a (classes, prod(input shape))
matrix (inputs of any shape are flattened), and its min(classes, inputs) singular values. The
statistics pool the singular values of every example and take their mean, std (population, as
numpy's default), max and min, exactly as spp-public's ``check.jacobian_singular_value`` does (it
concatenates the per-example singular values of all batches before ``np.mean`` & co.). The
Jacobians are built a batch at a time with ``torch.func``: ``vmap`` over the examples of
``jacrev`` (one reverse pass per logit, far fewer than one forward pass per input pixel). A model
with an operation that has no ``vmap`` batching rule (the fused kernels of ``nn.LSTM``/``nn.GRU``/
``nn.RNN``, CPU scaled dot-product attention: tried on one example first) gets the same
Jacobians from one batched backward pass per logit (examples do not interact in eval mode, so the
gradient of the batch's summed logit k is every example's row k).

**Layerwise.** A *layer* is a ``nn.Linear`` or ``nn.Conv1d/2d/3d`` module, in the order the
forward pass runs them, together with the modules the forward pass applies to its output next
that act on each entry (or channel) alone: batch-norm (in eval mode a per-channel affine map) and
elementwise activations (``nn.ReLU``, ``nn.Tanh``, ``nn.Identity``, ...), as long as each takes
the previous one's output. Its Jacobian J^{l-1,l} = dx^l / dx^{l-1} is the Jacobian of
activation(layer(input)) at the input the layer received; for a fully connected layer it is
D^l W^l, D^l the diagonal of the activation's derivative at the pre-activation, so an
``nn.Sequential`` MLP (``mlp-7``, ``lenet-300-100``) gives exactly the paper's D W (and a
conv + batch-norm + ReLU block of ``vgg-like`` is one layer). Pooling ends a layer: the next
layer's Jacobian starts at its own input. An activation applied as a function inside
``forward`` (``F.relu(x)``) is invisible to module hooks: such a layer's Jacobian is the affine
map alone (W for a Linear layer). Layers whose per-example Jacobian has at most ``exact_limit`` entries are
exact (the matrix built by autograd, then its singular values); larger ones (convolutions on
real image sizes) are estimated matrix-free by Lanczos on J^T J (or J J^T, the smaller side),
whose matrix-vector products are one ``jvp`` and one ``vjp``: see :func:`lanczos_extremes`.
Recurrent modules (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``; one entry per stacked layer) give the
Jacobian of one step's hidden state with respect to the previous one, dh_t / dh_{t-1} (an LSTM's
cell state c_{t-1} held fixed), at every step of the given input sequences, pooled over steps and
examples; the states come from the cell equations recomputed with the module's weights (checked
against the module's own output).

**Mode.** The model is evaluated in eval mode (batch-norm uses its running statistics, dropout
is off) and put back in the mode it was in: that is the function the network computes for one
example, and in train mode batch-norm would mix the examples of a batch. The model is used as
given: a mask applied with :func:`sparsetrain.masks.apply_mask_` is zeros in its weights.

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    >>> stats = input_output_jsv(model, torch.randn(5, 2, 3))
    >>> stats.count  # 5 examples x min(3 logits, 6 inputs)
    15
    >>> sorted(layerwise_jsv(model, torch.randn(5, 2, 3)))
    ['1', '3']
    >>> sorted(stats.to_dict())
    ['count', 'max', 'mean', 'method', 'min', 'std']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from ..batches import is_batch, logits_of
from ..errors import SparsetrainError

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
# Modules that act on each entry alone: their Jacobian is diagonal, the D of D W.
ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid,
)
# Modules that may follow a layer and belong to it: elementwise, or per channel (batch-norm in eval mode).
FOLLOWERS = (*ELEMENTWISE, nn.modules.batchnorm._BatchNorm)
EXACT_LIMIT = 2**22  # entries of one example's layer Jacobian (16 MiB in float32) computed exactly
CHUNK_ENTRIES = 2**25  # entries held at once: layer Jacobians (float32), Lanczos bases (float64), 256 MiB


@contextmanager
def _forward_ad():
    """Forward-mode AD (``jvp``, ``jacfwd``) whose first use in a process makes torch load its jvp
    decompositions through ``torch.jit.script``, which warns that it is deprecated: torch's own
    business, not the caller's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=DeprecationWarning)
        yield


@dataclass(frozen=True)
class JSVStats:
    """Singular values summarised: ``mean``, ``std`` (population), ``max``, ``min`` over ``count``
    singular values (all examples pooled). ``values``: the singular values themselves (1-D,
    float64) where they were computed exactly, else None. ``method``: how (``"exact"``, or
    ``"lanczos-<k>"`` for a matrix-free estimate with k steps; see :func:`lanczos_extremes`).
    ``layer``: what the Jacobian is of (``"Linear(784->100) + Tanh"``); "" for input-output.

        >>> s = JSVStats.from_values(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> s.mean, s.max, s.min, s.count, round(s.std, 4)
        (2.5, 4.0, 1.0, 4, 1.118)
        >>> s.histogram(bins=3)
        ([1, 1, 2], [1.0, 2.0, 3.0, 4.0])
    """

    mean: float
    std: float
    max: float
    min: float
    count: int
    method: str = "exact"
    layer: str = ""
    values: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_values(cls, values: torch.Tensor, method: str = "exact", layer: str = "") -> "JSVStats":
        """The statistics of ``values`` (any shape; pooled), which are kept."""
        v = values.detach().reshape(-1).to(torch.float64).cpu()
        if v.numel() == 0:
            raise SparsetrainError("no singular values to summarise (an empty batch?)")
        return cls(mean=float(v.mean()), std=float(v.std(correction=0)), max=float(v.max()), min=float(v.min()),
                   count=v.numel(), method=method, layer=layer, values=v)

    def histogram(self, bins: int = 50, range: tuple[float, float] | None = None) -> tuple[list[int], list[float]]:
        """``(counts, edges)``: ``bins`` equal-width bins over ``range`` (default: min to max), as
        ``numpy.histogram`` returns them (the last bin includes its right edge)."""
        if self.values is None:
            raise SparsetrainError(
                f"no histogram for singular values estimated by {self.method}: only their extremes and "
                "moments are known; pass a smaller input or a larger exact_limit to compute them exactly")
        if bins < 1:
            raise SparsetrainError(f"a histogram needs bins >= 1, got {bins}")
        lo, hi = range if range is not None else (self.min, self.max)
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5  # numpy's rule for a single value
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        inside = self.values[(self.values >= lo) & (self.values <= hi)]
        index = ((inside - lo) / (hi - lo) * bins).floor().clamp(max=bins - 1).long()
        counts = torch.bincount(index, minlength=bins)
        return [int(c) for c in counts], [float(e) for e in edges]

    def to_dict(self, bins: int | None = None) -> dict[str, Any]:
        """The statistics as plain JSON values; with ``bins``, the histogram too
        (``{"counts": [...], "edges": [...]}``)."""
        out: dict[str, Any] = {"mean": self.mean, "std": self.std, "max": self.max, "min": self.min,
                               "count": self.count, "method": self.method}
        if self.layer:
            out["layer"] = self.layer
        if bins is not None:
            counts, edges = self.histogram(bins)
            out["histogram"] = {"counts": counts, "edges": edges}
        return out


def format_jsv_table(rows: Mapping[str, JSVStats]) -> str:
    """A Markdown table, one row per labelled result (e.g. ``"before pruning"``, ``"after
    pruning"``, ``"after isometry"``), columns mean, std, max, min, count.

        >>> print(format_jsv_table({"dense": JSVStats.from_values(torch.ones(3))}))
        | | mean | std | max | min | count |
        |---|---|---|---|---|---|
        | dense | 1.0000 | 0.0000 | 1.0000 | 1.0000 | 3 |
    """
    lines = ["| | mean | std | max | min | count |", "|---|---|---|---|---|---|"]
    for label, s in rows.items():
        lines.append(f"| {label} | {s.mean:.4f} | {s.std:.4f} | {s.max:.4f} | {s.min:.4f} | {s.count} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# input-output


def singular_values(jacobians: torch.Tensor) -> torch.Tensor:
    """The singular values of a batch of matrices (E, m, n), (E, min(m, n)) in float64, from the
    eigenvalues of the smaller Gram matrix (J J^T or J^T J) formed in float64: a symmetric
    eigenproblem of the small side instead of an SVD of the whole matrix, and, in float64,
    accurate to about 1e-8 of the largest value (float32 would lose the values below about 3e-4
    of it).

        >>> singular_values(torch.tensor([[[3.0, 0.0], [0.0, -2.0], [0.0, 0.0]]])).tolist()
        [[3.0, 2.0]]
    """
    j = jacobians.to(torch.float64)
    gram = j @ j.mT if j.shape[-2] <= j.shape[-1] else j.mT @ j
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(-1)  # descending, as svdvals


def _is_pair(obj: Any) -> bool:
    """An ``(inputs, targets)`` pair: two items, a tensor of inputs first, then None or as many
    targets as inputs (anything else of two items is a list of two batches)."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2 or not isinstance(obj[0], torch.Tensor):
        return False
    y = obj[1]
    return y is None or (isinstance(y, torch.Tensor) and y.dim() > 0 and obj[0].dim() > 0 and len(y) == len(obj[0]))


def _inputs_of(batches: Any) -> Iterable[torch.Tensor]:
    """The input tensors of ``batches``: one tensor of inputs, one ``(inputs, targets)`` pair, or
    an iterable (a list, a data loader) of either. Two tensors of the same leading size in a list
    read as one ``(inputs, targets)`` pair, as everywhere in sparsetrain: pass two input batches
    as a list of pairs, or concatenated."""
    if isinstance(batches, torch.Tensor):
        return [batches]
    if isinstance(batches, Mapping) or (is_batch(batches) and isinstance(batches[0], Mapping)):
        raise SparsetrainError("Jacobian singular values need tensor inputs; a batch given as a mapping "
                               "(model(**batch)) has no single input to differentiate")
    if _is_pair(batches):
        return [batches[0]]
    if not isinstance(batches, Iterable):
        raise SparsetrainError(f"batches must be a tensor of inputs, an (inputs, targets) pair or an iterable of "
                               f"them, got {type(batches).__name__}")
    return (x for b in batches for x in _inputs_of(b))


@contextmanager
def _eval_mode(model: nn.Module):
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in was:
            m.training = training


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    try:
        out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise SparsetrainError(f"the model refused inputs of shape {tuple(x.shape)}: {e}. Pass batches of the "
                               "inputs the model takes (batch first)") from e
    logits = logits_of(out)
    if logits is None or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if logits is not None else type(out).__name__
        raise SparsetrainError(f"the model must return logits of shape (batch, classes) for inputs of shape "
                               f"{tuple(x.shape)}; got {got}")
    return logits


def _on_model_device(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the device of the model's parameters (a loader's CPU batch for a GPU model)."""
    p = next(model.parameters(), None)
    return x if p is None or x.device == p.device else x.to(p.device)


def _vmap_works(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether every operation of the model has a ``vmap`` batching rule: False for recurrent
    modules (their fused kernels have none), and for a model whose trial on one example makes
    torch fall back to a per-example loop (its "performance drop" warning, e.g. CPU scaled
    dot-product attention) or fail."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _jacobians_vmap(model, x[:1], None)
        except (RuntimeError, NotImplementedError, ValueError):
            return False
    fallback = [w for w in caught if "batching rule" in str(w.message)]
    for w in caught:  # the model's own warnings are the caller's
        if w not in fallback:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return not fallback


def _jacobians_vmap(model: nn.Module, x: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    def one(xi):  # one example (*input) -> (classes,)
        return logits_of(model(xi.unsqueeze(0))).squeeze(0)
    return vmap(jacrev(one), chunk_size=chunk_size)(x)  # (B, classes, *input)


def _jacobians_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = _logits(model, x)  # (B, classes)
        rows = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k + 1 < logits.shape[1])[0]
                for k in range(logits.shape[1])]
    return torch.stack(rows, 1)  # (B, classes, *input)


def input_output_jacobians(model: nn.Module, x: torch.Tensor, *, chunk_size: int | None = None,
                           use_vmap: bool | None = None) -> torch.Tensor:
    """Each example's Jacobian of the logits with respect to its input, (B, classes, prod(input
    shape)), for one batch ``x`` (B, *input); the model in eval mode. ``chunk_size``: examples per
    ``vmap`` chunk (default: the whole batch at once). ``use_vmap``: vmap over examples of jacrev
    (True) or one batched backward pass per logit (False); default: vmap where every operation
    of the model has a batching rule (tried on one example)."""
    x = _on_model_device(model, x)
    with _eval_mode(model):
        with torch.no_grad():
            _logits(model, x)  # a clear error for an input the model refuses, before vmap's
            # torch.func's transforms differentiate under no_grad; the weights then build no graph
            if use_vmap is None:
                use_vmap = _vmap_works(model, x)
            jac = _jacobians_vmap(model, x, chunk_size) if use_vmap else _jacobians_backward(model, x)
    return jac.reshape(x.shape[0], jac.shape[1], -1).detach()


def input_output_jsv(model: nn.Module, batches: Any, *, max_examples: int | None = None,
                     chunk_size: int | None = None) -> JSVStats:
    """The input-output Jacobian singular values of ``model`` over the examples of ``batches`` (a
    tensor of inputs, an ``(inputs, targets)`` pair, or an iterable of either, such as a data
    loader), pooled as spp-public does: mean, std, max and min of every singular value of every
    example. ``max_examples``: stop after that many examples. Raises :class:`SparsetrainError` for
    no batches, a mapping batch, or inputs the model refuses."""
    if max_examples is not None and max_examples < 1:
        raise SparsetrainError(f"max_examples must be >= 1, got {max_examples}")
    parts, seen, use_vmap = [], 0, None
    for x in _inputs_of(batches):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
            raise SparsetrainError(f"each batch's inputs must be a floating-point tensor (batch, ...); got "
                                   f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                                   f"{' of ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
        if max_examples is not None:
            x = x[: max_examples - seen]
        if len(x) == 0:
            continue
        if use_vmap is None:  # decided once, on the first batch
            with _eval_mode(model), torch.no_grad():
                x = _on_model_device(model, x)
                _logits(model, x)
                use_vmap = _vmap_works(model, x)
        parts.append(singular_values(input_output_jacobians(model, x, chunk_size=chunk_size, use_vmap=use_vmap)))
        seen += len(x)
        if max_examples is not None and seen >= max_examples:
            break
    if not parts:
        raise SparsetrainError("no examples to compute Jacobian singular values on: the batches were empty")
    return JSVStats.from_values(torch.cat(parts))


# ----------------------------------------------------------------------------------------------
# layerwise: which layers, and their inputs


@dataclass
class _Call:
    name: str
    module: nn.Module
    input: torch.Tensor
    output: Any
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # a recurrent module's weights as used
    hx: Any = None


def _record_calls(model: nn.Module, x: torch.Tensor) -> list[_Call]:
    """Every call of a weight layer, a recurrent module or an elementwise activation during one
    forward pass, in execution order, with its input and output."""
    calls: list[_Call] = []
    watched = (*WEIGHT_LAYERS, *RECURRENT, *FOLLOWERS)

    def hook(name):
        def record(module, args, output):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            state = {}
            if isinstance(module, RECURRENT):  # the weights as this call used them (functional_call included)
                state = {n: getattr(module, n).detach() for n in module._flat_weights_names}
            # inputs kept as given (no graph: this pass runs under no_grad), so that an activation's
            # input can be recognised as the very tensor a layer returned
            calls.append(_Call(name, module, args[0], output, state, args[1] if len(args) > 1 else None))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, watched)]
    try:
        with torch.no_grad():
            _logits(model, x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__}({module.in_channels}->{module.out_channels}, k={tuple(module.kernel_size)})"
    return type(module).__name__


def layerwise_jsv(model: nn.Module, batch: Any, *, exact_limit: int = EXACT_LIMIT, lanczos_steps: int = 32,
                  probes: int = 1, seed: int = 0, chunk_size: int | None = None) -> dict[str, JSVStats]:
    """Each layer's Jacobian singular values, ``{layer name: JSVStats}`` in execution order, pooled
    over the examples of ``batch`` (one tensor of inputs or an ``(inputs, targets)`` pair). Names
    are the modules' qualified names (a module called twice: ``name#2``); a recurrent module gives
    ``name.l0``, ``name.l1``, ... per stacked layer. Layers with at most ``exact_limit`` Jacobian
    entries per example are exact; the others are estimated with ``lanczos_steps`` Lanczos steps
    from ``probes`` start vectors per example drawn with ``seed`` (see :func:`lanczos_extremes`).
    Examples are processed a chunk at a time (``chunk_size`` for exact Jacobians; default: as many
    as keep 2^25 entries at once), so memory does not grow with the batch. Raises
    :class:`SparsetrainError` for a model without Linear, Conv or recurrent layers."""
    inputs = list(_inputs_of(batch))
    if len(inputs) != 1:
        raise SparsetrainError(f"layerwise_jsv takes one batch (a tensor of inputs or an (inputs, targets) pair), "
                               f"got {len(inputs)}")
    x = inputs[0]
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0:
        raise SparsetrainError(f"layerwise_jsv needs a non-empty batch of inputs (batch, ...), got "
                               f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    x = _on_model_device(model, x)
    with _eval_mode(model):
        calls = _record_calls(model, x)
        results: dict[str, JSVStats] = {}
        seen: dict[str, int] = {}
        for i, call in enumerate(calls):
            if isinstance(call.module, FOLLOWERS):
                continue
            seen[call.name] = seen.get(call.name, 0) + 1
            name = call.name if seen[call.name] == 1 else f"{call.name}#{seen[call.name]}"
            if isinstance(call.module, RECURRENT):
                results.update(_recurrent_jsv(name, call))
                continue
            chain, j = [], i + 1
            while j < len(calls) and isinstance(calls[j].module, FOLLOWERS) and calls[j].input is calls[j - 1].output:
                chain.append(calls[j].module)  # each takes the previous one's output
                j += 1
            results[name] = _layer_jsv(call, chain, exact_limit, lanczos_steps, probes, seed, chunk_size)
    if not results:
        kinds = ", ".join(t.__name__ for t in (*WEIGHT_LAYERS, *RECURRENT))
        raise SparsetrainError(f"the model ran no layer whose Jacobian layerwise_jsv knows ({kinds}); "
                               f"it has {', '.join(sorted({type(m).__name__ for m in model.modules()}))}")
    return results


def _layer_fn(modules: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def g(u):
        for m in modules:
            u = m(u)
        return u
    return g


def _layer_jsv(call: _Call, chain: list[nn.Module], exact_limit: int, steps: int, probes: int, seed: int,
               chunk_size: int | None) -> JSVStats:
    g = _layer_fn([call.module, *chain])
    u = call.input  # (B, *in)
    n_in, n_out = u[0].numel(), call.output[0].numel()
    what = " + ".join([_describe(call.module), *(type(m).__name__ for m in chain)])
    if n_in * n_out <= exact_limit:
        # examples a chunk at a time, so that a chunk's Jacobians stay within CHUNK_ENTRIES
        chunk = chunk_size or max(1, CHUNK_ENTRIES // (n_in * n_out))
        values = [singular_values(layer_jacobians(g, u[i : i + chunk])) for i in range(0, len(u), chunk)]
        return JSVStats.from_values(torch.cat(values), layer=what)
    est = lanczos_extremes(g, u, steps=steps, seed=seed, probes=probes)
    return est.stats(layer=what)


def layer_jacobians(g: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, *,
                    chunk_size: int | None = None) -> torch.Tensor:
    """Each example's Jacobian of the batched map ``g`` at its input ``u`` (B, *in): (B,
    prod(out), prod(in)), by ``vmap`` over examples of ``jacrev`` (fewer outputs than inputs) or
    ``jacfwd`` (more)."""
    with torch.no_grad():
        n_in, n_out = u[0].numel(), g(u[:1])[0].numel()

    def one(ui):  # one example (*in) -> (*out)
        return g(ui.unsqueeze(0)).squeeze(0)
    with _forward_ad(), torch.no_grad():
        jac = vmap(jacrev(one) if n_out <= n_in else jacfwd(one), chunk_size=chunk_size)(u)
    return jac.reshape(u.shape[0], n_out, n_in).detach()


# ----------------------------------------------------------------------------------------------
# matrix-free estimates


@dataclass(frozen=True)
class LanczosEstimate:
    """Per-example estimates from :func:`lanczos_extremes`, each (B,): ``max`` and ``min``
    singular values (the square roots of the extreme Ritz values of J^T J or J J^T), ``mean``
    singular value and ``mean_square`` (stochastic Lanczos quadrature of trace(sqrt(A)) / n and
    trace(A) / n); ``n`` singular values per example; ``steps`` Lanczos steps taken."""

    max: torch.Tensor
    min: torch.Tensor
    mean: torch.Tensor
    mean_square: torch.Tensor
    n: int
    steps: int

    def stats(self, layer: str = "") -> JSVStats:
        """Pooled over examples: max of the maxima, min of the minima, mean of the means (every
        example has ``n`` values), std from the pooled mean square."""
        mean = float(self.mean.mean())
        var = max(float(self.mean_square.mean()) - mean**2, 0.0)
        return JSVStats(mean=mean, std=math.sqrt(var), max=float(self.max.max()), min=float(self.min.min()),
                        count=self.n * len(self.max), method=f"lanczos-{self.steps}", layer=layer)


def lanczos_extremes(g: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, *, steps: int = 32,
                     seed: int = 0, probes: int = 1) -> LanczosEstimate:
    """Matrix-free estimates of the singular values of each example's Jacobian of the batched map
    ``g`` at ``u`` (B, *in), where examples do not interact (so the batch's Jacobian is
    block-diagonal and one ``jvp``/``vjp`` of the whole batch applies every example's J at once).

    Lanczos with full reorthogonalisation runs on A = J^T J (n = inputs <= outputs) or J J^T
    (n = outputs < inputs), one start vector per example drawn with ``seed``; each step is one
    ``jvp`` and one ``vjp``. From the tridiagonal T = Q Θ Q^T of k = min(steps, n) steps:

    - max: sqrt(θ_max), a lower bound that converges fastest (at least as fast as power iteration
      with as many products);
    - min: sqrt(θ_min), an upper bound: the small end converges slowly when it is clustered,
      exact once k = n;
    - mean and mean square: stochastic Lanczos quadrature, n Σ_i Q_{0i}^2 f(θ_i) with f = sqrt and
      f = identity, an estimate of trace f(A) / n from one random probe (start vector): its
      relative error falls as 1/sqrt(n) (a few percent at n = 72, far less on real layers) and as
      1/sqrt(probes) with ``probes`` start vectors per example (max and min are then taken over
      the probes, so they stay bounds). Pooled over a batch, the examples average their probes.
    """
    if steps < 1 or probes < 1:
        raise SparsetrainError(f"Lanczos needs steps >= 1 and probes >= 1, got steps={steps}, probes={probes}")
    b = len(u)
    u = u.detach().repeat_interleave(probes, 0)  # (B * probes, *in)
    with torch.no_grad():  # torch.func's jvp/vjp still differentiate; the weights build no graph
        n = min(u[0].numel(), g(u[:1])[0].numel())
        # examples a chunk at a time, so that a chunk's Lanczos basis (k vectors of n) stays in CHUNK_ENTRIES
        chunk = max(1, CHUNK_ENTRIES // (min(steps, n) * n))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        starts = torch.randn(len(u), n, generator=gen, dtype=torch.float64)  # the same, chunked or not
        parts = [_lanczos(g, u[i : i + chunk], steps, starts[i : i + chunk], gen) for i in range(0, len(u), chunk)]
    est = LanczosEstimate(*(torch.cat([getattr(p, f) for p in parts]) for f in ("max", "min", "mean", "mean_square")),
                          n=parts[0].n, steps=parts[0].steps)
    if probes == 1:
        return est
    return LanczosEstimate(
        max=est.max.reshape(b, probes).max(1).values, min=est.min.reshape(b, probes).min(1).values,
        mean=est.mean.reshape(b, probes).mean(1), mean_square=est.mean_square.reshape(b, probes).mean(1),
        n=est.n, steps=est.steps)


def _lanczos(g: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, steps: int, start: torch.Tensor,
             gen: torch.Generator) -> LanczosEstimate:
    out, vjp_fn = vjp(g, u)
    n_in, n_out = u[0].numel(), out[0].numel()
    b = u.shape[0]
    tall = n_out >= n_in
    n = n_in if tall else n_out
    shape_in, shape_out = u.shape, out.shape

    def apply(v):  # (B, n) -> (B, n): A v per example, in float64 between products
        with _forward_ad():
            return _apply(v)

    def _apply(v):
        if tall:
            jv = jvp(g, (u,), (v.to(u.dtype).reshape(shape_in),))[1]
            return vjp_fn(jv)[0].reshape(b, n).to(torch.float64)
        jtv = vjp_fn(v.to(out.dtype).reshape(shape_out))[0]
        return jvp(g, (u,), (jtv,))[1].reshape(b, n).to(torch.float64)

    k = min(steps, n)
    q = start.to(u.device)  # (B, n)
    q = q / q.norm(dim=1, keepdim=True)
    basis = torch.zeros(b, k, n, dtype=torch.float64, device=u.device)
    alpha = torch.zeros(b, k, dtype=torch.float64, device=u.device)
    beta = torch.zeros(b, k, dtype=torch.float64, device=u.device)  # beta[:, j]: between q_j and q_{j+1}
    for j in range(k):
        basis[:, j] = q
        w = apply(q)
        alpha[:, j] = (q * w).sum(1)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - torch.einsum("bkn,bk->bn", basis[:, : j + 1], torch.einsum("bkn,bn->bk", basis[:, : j + 1], w))
        if j + 1 == k:
            break
        norm = w.norm(dim=1)
        scale = alpha[:, : j + 1].abs().max(1).values.clamp(min=1e-300)
        lost = norm <= 1e-10 * scale  # an invariant subspace: restart orthogonally, T splits there
        if lost.any():
            fresh = torch.randn(b, n, generator=gen, dtype=torch.float64).to(u.device)
            fresh = fresh - torch.einsum("bkn,bk->bn", basis[:, : j + 1], torch.einsum("bkn,bn->bk", basis[:, : j + 1], fresh))
            w = torch.where(lost[:, None], fresh, w)
            norm = torch.where(lost, torch.zeros_like(norm), norm)
        beta[:, j] = norm
        q = w / w.norm(dim=1, keepdim=True)
    t = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : k - 1], 1) + torch.diag_embed(beta[:, : k - 1], -1)
    theta, vecs = torch.linalg.eigh(t)  # (B, k), (B, k, k)
    theta = theta.clamp(min=0)
    weights = vecs[:, 0, :] ** 2  # (B, k): the quadrature weights of the start vector
    return LanczosEstimate(
        max=theta[:, -1].sqrt().cpu(), min=theta[:, 0].sqrt().cpu(),
        mean=(weights * theta.sqrt()).sum(1).cpu(), mean_square=(weights * theta).sum(1).cpu(), n=n, steps=k)


# ----------------------------------------------------------------------------------------------
# recurrent layers


def _recurrent_jsv(name: str, call: _Call) -> dict[str, JSVStats]:
    rnn = call.module
    if rnn.bidirectional or getattr(rnn, "proj_size", 0):
        raise SparsetrainError(f"{name}: step Jacobians of bidirectional or projected (proj_size) recurrent layers "
                               "are not supported")
    x = call.input if rnn.batch_first else call.input.transpose(0, 1)  # (B, T, F)
    if x.dim() != 3:
        raise SparsetrainError(f"{name}: step Jacobians need batched sequences (B, T, F), got {tuple(x.shape)}")
    hx = call.hx
    results = {}
    layer_in = x
    for k in range(rnn.num_layers):
        w = {key: call.state.get(f"{key}_l{k}") for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        h0 = _initial(hx, k, x.shape[0], rnn)
        # examples a chunk at a time: a chunk's T step Jacobians of H x H stay within CHUNK_ENTRIES
        chunk = max(1, CHUNK_ENTRIES // (x.shape[1] * rnn.hidden_size**2))
        values, hs = [], []
        for i in range(0, len(x), chunk):
            part = tuple(h[i : i + chunk] for h in h0) if isinstance(h0, tuple) else h0[i : i + chunk]
            states, jac = recurrent_step_jacobians(rnn, w, layer_in[i : i + chunk], part)
            values.append(singular_values(jac.reshape(-1, *jac.shape[-2:])))
            hs.append(states[0])
        results[f"{name}.l{k}"] = JSVStats.from_values(
            torch.cat(values), layer=f"{type(rnn).__name__}({rnn.hidden_size}) dh_t/dh_(t-1), {x.shape[1]} steps")
        layer_in = torch.cat(hs)
    out = call.output[0] if rnn.batch_first else call.output[0].transpose(0, 1)
    if not torch.allclose(layer_in, out, atol=1e-4, rtol=1e-3):
        raise SparsetrainError(f"{name}: the hidden states recomputed from the cell equations differ from the module's "
                               f"output by {float((layer_in - out).abs().max()):.3g}: the module does something the "
                               "standard cell equations do not, so its step Jacobians cannot be trusted here")
    return results


def _initial(hx: Any, k: int, b: int, rnn: nn.Module):
    zeros = torch.zeros(b, rnn.hidden_size, dtype=rnn.weight_hh_l0.dtype, device=rnn.weight_hh_l0.device)
    if hx is None:
        return (zeros, zeros.clone()) if isinstance(rnn, nn.LSTM) else zeros
    if isinstance(rnn, nn.LSTM):
        return hx[0][k].detach(), hx[1][k].detach()
    return hx[k].detach()


def _cell(rnn: nn.Module, w: dict[str, torch.Tensor | None]):
    """One step of ``rnn``'s cell with weights ``w``: ``step(x, state) -> state`` (state: h, or
    (h, c) for an LSTM), torch's gate order and equations."""
    def affine(v, weight, bias):
        return v @ weight.T + (bias if bias is not None else 0)

    if isinstance(rnn, nn.LSTM):
        def step(x, state):
            h, c = state
            gates = affine(x, w["weight_ih"], w["bias_ih"]) + affine(h, w["weight_hh"], w["bias_hh"])
            i, f, g, o = gates.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
    elif isinstance(rnn, nn.GRU):
        def step(x, h):
            gi, gh = affine(x, w["weight_ih"], w["bias_ih"]), affine(h, w["weight_hh"], w["bias_hh"])
            (ir, iz, in_), (hr, hz, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            return (1 - z) * n + z * h
    else:
        act = torch.tanh if rnn.nonlinearity == "tanh" else torch.relu

        def step(x, h):
            return act(affine(x, w["weight_ih"], w["bias_ih"]) + affine(h, w["weight_hh"], w["bias_hh"]))
    return step


def recurrent_step_jacobians(rnn: nn.Module, w: dict[str, torch.Tensor | None], x: torch.Tensor, h0: Any):
    """Run one layer of ``rnn`` (weights ``w``) over ``x`` (B, T, F) from state ``h0`` and return
    ``(states, jacobians)``: the per-step states (h (B, T, H), and c for an LSTM) and dh_t/dh_{t-1}
    at every step, (B, T, H, H), an LSTM's c_{t-1} held fixed."""
    step = _cell(rnn, w)
    lstm = isinstance(rnn, nn.LSTM)
    state, hs, cs, prev_h, prev_c = h0, [], [], [], []
    with torch.no_grad():
        for t in range(x.shape[1]):
            prev_h.append(state[0] if lstm else state)
            if lstm:
                prev_c.append(state[1])
            state = step(x[:, t], state)
            hs.append(state[0] if lstm else state)
            if lstm:
                cs.append(state[1])
    b, t_len, h_size = x.shape[0], x.shape[1], rnn.hidden_size
    xs = x.reshape(b * t_len, -1)  # (B*T, F): every (example, step) pair
    hp = torch.stack(prev_h, 1).reshape(b * t_len, h_size)
    if lstm:
        cp = torch.stack(prev_c, 1).reshape(b * t_len, h_size)
        jac = vmap(jacrev(lambda h, xi, c: step(xi, (h, c))[0]))(hp, xs, cp)
    else:
        jac = vmap(jacrev(lambda h, xi: step(xi, h)))(hp, xs)
    states = (torch.stack(hs, 1), torch.stack(cs, 1)) if lstm else (torch.stack(hs, 1),)
    return states, jac.reshape(b, t_len, h_size, h_size).detach()
