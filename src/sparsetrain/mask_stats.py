"""What a mask leaves of a network, per layer: FLOPs and effective sparsity.

**FLOPs** are multiply-accumulates of one example's forward pass, counted with hooks on a pass of
one input of the model's input shape: a Linear layer costs out * in per position (one position
for a flat input, one per token or time step otherwise), a convolution costs its output positions
times its kernel entries (out channels * in channels / groups * kernel size). ``flops`` is the
dense layer's cost, ``flops_kept`` that of its kept weights (positions * kept entries): what a
sparse kernel that skips the zeros would compute. Recurrent layers (``nn.RNN``/``nn.LSTM``/``nn.GRU``)
cost each input-to-hidden and hidden-to-hidden weight matrix its entries once per time step (all
gates at once: a (4h, in) LSTM matrix is 4h * in a step). Other tensors (biases, attention
weights, embeddings) show none ("-").

**Effective sparsity** (Frankle et al. 2021; Vysogorets and Kempe 2021): a kept connection is
useless when no path through kept connections joins it to the input and to the output, e.g. every
connection out of a unit whose incoming connections were all pruned. It is found by reachability
through the masked graph, computed as SynFlow does: a copy of the network whose weights are the
0/1 mask (|W| > 0 for tensors the mask does not cover), biases 0, normalisation layers the
identity and activation modules the identity, is run on an input of ones, in float64. A layer's
input unit (a Linear input feature, a convolution input channel) is reached from the input iff
its activation is > 0; its output unit (feature, output channel) reaches the output iff the
gradient of the summed output with respect to it is > 0. A kept entry is effective iff its
input unit is reached and its output unit reaches: channel-level for convolutions, so a kernel
whose input channel carries nothing, or whose output channel leads nowhere, is dead. A unit fed
by its bias alone counts as dead (it only adds a constant, which the next layer's bias can hold).

Residual connections need nothing special: the pass runs the network's own graph, so a unit
reached through the skip path counts as reached. Effective sparsity is not defined here (None,
shown as "-") for recurrent layers, attention, embeddings and LayerNorm/GroupNorm (their input
is not a graph of weights a one-input pass can trace: recurrence feeds a unit from itself,
attention and normalisation by statistics mix every unit), for masked tensors that are not the
weight or bias of a Linear or convolution, and for models whose output is not one tensor.
Activations called as functions in ``forward`` are taken as they are: ReLU and tanh keep 0 at 0
and positives positive, as the reachability needs; a sigmoid or softplus would not.

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    >>> mask = {"0.weight": torch.tensor([[True, True], [False, False]]),  # hidden unit 1: no input
    ...         "2.weight": torch.tensor([[True, True]])}
    >>> costs = layer_costs(net, mask, (2,))
    >>> costs["2.weight"]  # its connection from hidden unit 1 is dead
    {'flops': 2, 'flops_kept': 2, 'effective_sparsity': 0.5}
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .errors import SparsetrainError

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Modules that make reachability through one input pass meaningless (see the module docstring).
_UNDEFINED = (nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag,
              nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_NORMS = (nn.modules.batchnorm._NormBase,)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
                nn.LogSigmoid, nn.Tanhshrink, nn.Softsign)


def layer_costs(model: nn.Module, mask: Mapping[str, torch.Tensor] | None,
                input_shape: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per parameter of ``model`` (canonical names, as masks name them): ``flops`` and
    ``flops_kept`` (ints, or None where not counted) and ``effective_sparsity`` (a fraction of the
    tensor's entries, or None where not defined), for one example of ``input_shape`` (without
    the batch dimension). ``mask=None``: the dense network. The model is not changed."""
    shape = _checked_shape(input_shape)
    params = _canonical_params(model)
    full = {n: (mask[n].to(torch.bool) if mask is not None and n in mask else None) for n in params}
    flops = _count_flops(model, params, full, shape)
    effective = effective_mask(model, mask, shape)
    out: dict[str, dict[str, Any]] = {}
    for name, p in params.items():
        dense, kept = flops.get(name, (None, None))
        eff = None
        if effective is not None and name in effective:
            eff = 1.0 - int(effective[name].sum()) / p.numel() if p.numel() else 0.0
        out[name] = {"flops": dense, "flops_kept": kept, "effective_sparsity": eff}
    return out


def effective_mask(model: nn.Module, mask: Mapping[str, torch.Tensor] | None,
                   input_shape: Sequence[int]) -> dict[str, torch.Tensor] | None:
    """``{name: bool tensor}``: the entries of each Linear/convolution weight (and bias, where
    the mask covers it) that are kept and lie on a path from input to output (see the module
    docstring); None where that is not defined for this model."""
    shape = _checked_shape(input_shape)
    if any(isinstance(m, _UNDEFINED) or (isinstance(m, _NORMS) and m.running_mean is None)
           for m in model.modules()):
        return None  # (a norm without running statistics normalises by the batch's own)
    params = _canonical_params(model)
    owners = _owners(model, params)
    if mask is not None and any(n not in owners for n in mask):
        return None  # a masked tensor the tracing cannot place
    device = next(iter(params.values())).device if params else torch.device("cpu")
    try:
        probe = copy.deepcopy(model).to(device=device, dtype=torch.float64).eval()
    except Exception:  # noqa: BLE001 - a model that cannot be copied has no figure, and the run goes on
        return None
    probe_params = _canonical_params(probe)
    binary = {}
    with torch.no_grad():
        for name, p in probe_params.items():
            weight = name in owners and owners[name][1] == "weight"
            if mask is not None and name in mask:
                binary[name] = mask[name].to(device=device, dtype=torch.bool)
            elif weight:
                binary[name] = params[name].detach().to(device) != 0
            if weight:
                p.copy_(binary[name].to(torch.float64))
            else:
                p.zero_()  # biases (and anything else) add no reach
        for module in probe.modules():
            if isinstance(module, _NORMS):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
                if module.running_mean is not None:
                    module.running_mean.zero_()
                    module.running_var.fill_(1.0)
    _replace_activations(probe)
    reach_in: dict[int, torch.Tensor] = {}
    reach_out: dict[int, torch.Tensor] = {}
    handles = []
    probe_owners = _owners(probe, probe_params)
    layers = {id(m): m for m, _ in probe_owners.values()}

    def forward_hook(module, inputs, output):
        x = inputs[0].detach()
        dims = [d for d in range(x.dim()) if d != _feature_dim(module, x)]
        seen = (x > 0).any(dim=dims) if dims else x > 0
        reach_in[id(module)] = seen | reach_in.get(id(module), torch.zeros_like(seen))
        scale = output.detach().abs().amax()
        output = output / scale if bool(scale > 0) else output  # keeps deep products finite

        def grad_hook(grad):
            g = grad.detach()
            gdims = [d for d in range(g.dim()) if d != _feature_dim(module, g)]
            live = (g > 0).any(dim=gdims) if gdims else g > 0
            reach_out[id(module)] = live | reach_out.get(id(module), torch.zeros_like(live))

        if output.requires_grad:
            output.register_hook(grad_hook)
        return output

    for module in layers.values():
        handles.append(module.register_forward_hook(forward_hook))
    try:
        x = torch.ones((1, *shape), dtype=torch.float64, device=device, requires_grad=True)
        out = probe(x)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        if not bool(torch.isfinite(out).all()):
            return None
        out.sum().backward()
    except (RuntimeError, TypeError, ValueError):
        return None  # a model that cannot run on a float input of this shape
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, (module, kind) in probe_owners.items():
        if name not in binary:
            continue  # a bias the mask does not cover
        fwd = reach_in.get(id(module))
        bwd = reach_out.get(id(module))
        keep = binary[name]
        if fwd is None or bwd is None:  # the layer never ran (or nothing flowed back): nothing of it is used
            result[name] = torch.zeros_like(keep, device="cpu")
            continue
        if kind == "bias":
            result[name] = (keep & bwd).cpu()
            continue
        result[name] = (keep & _entry_reach(module, fwd, bwd)).cpu()
    return result


def _entry_reach(module: nn.Module, fwd: torch.Tensor, bwd: torch.Tensor) -> torch.Tensor:
    """Bool of the weight's shape: its input unit reached and its output unit reaching."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return bwd[:, None] & fwd[None, :]
    groups = module.groups
    out_ch, in_per_group = w.shape[0], w.shape[1]
    group_of_out = torch.arange(out_ch, device=w.device) // (out_ch // groups)
    in_index = group_of_out[:, None] * in_per_group + torch.arange(in_per_group, device=w.device)[None, :]
    reach = bwd[:, None] & fwd[in_index]  # (out, in / groups)
    return reach.view(*reach.shape, *([1] * (w.dim() - 2))).expand(w.shape)


def _feature_dim(module: nn.Module, x: torch.Tensor) -> int:
    return x.dim() - 1 if isinstance(module, nn.Linear) else 1


def _replace_activations(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, _ACTIVATIONS):
            setattr(model, name, nn.Identity())
        else:
            _replace_activations(child)


def _canonical_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # a shared tensor once, by its first name (as masks)


def _owners(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, tuple[nn.Module, str]]:
    """``{name: (layer, "weight" or "bias")}`` for the parameters of Linear and conv layers."""
    by_id = {id(p): n for n, p in params.items()}
    owners = {}
    for module in model.modules():
        if isinstance(module, _LAYERS):
            for kind in ("weight", "bias"):
                p = getattr(module, kind, None)
                if isinstance(p, nn.Parameter) and id(p) in by_id and by_id[id(p)] not in owners:
                    owners[by_id[id(p)]] = (module, kind)
    return owners


def _count_flops(model: nn.Module, params: dict[str, nn.Parameter], mask: dict[str, torch.Tensor | None],
                 shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """``{weight name: (dense, kept)}`` multiply-accumulates for one example."""
    owners = {n: m for n, (m, kind) in _owners(model, params).items() if kind == "weight"}
    positions: dict[int, int] = {}

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            per = output.numel() // (output.shape[0] * module.weight.shape[0]) if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) \
                else output.numel() // module.weight.shape[0]
            positions[id(module)] = positions.get(id(module), 0) + per

    steps: dict[int, int] = {}

    def rnn_hook(module, inputs, output):
        x = inputs[0]
        if isinstance(x, torch.Tensor):  # a packed sequence has no plain length
            steps[id(module)] = steps.get(id(module), 0) + (x.shape[1] if module.batch_first and x.dim() == 3
                                                           else x.shape[0])

    recurrent = _recurrent_weights(model, params)
    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in owners.values()}.values()]
    handles += [m.register_forward_hook(rnn_hook) for m in {id(m): m for m in recurrent.values()}.values()]
    was_training = model.training
    try:
        p0 = next(iter(params.values()), None)
        x = torch.zeros((1, *shape), dtype=p0.dtype if p0 is not None and p0.is_floating_point() else torch.float32,
                        device=p0.device if p0 is not None else "cpu")
        model.eval()
        with torch.no_grad():
            model(x)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return {}  # a model whose input is not a float tensor of this shape (token ids, dict batches)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out = {}
    for name, module in [*owners.items(), *recurrent.items()]:
        per = positions.get(id(module)) if name in owners else steps.get(id(module))
        if per is None:
            continue
        p = params[name]
        kept = p.numel() if mask.get(name) is None else int(mask[name].sum())
        out[name] = (per * p.numel(), per * kept)
    return out


def _recurrent_weights(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    """``{name: recurrent module}`` for the weight matrices of nn.RNN/nn.LSTM/nn.GRU layers."""
    by_id = {id(p): n for n, p in params.items()}
    out = {}
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            for attr, p in module.named_parameters(recurse=False):
                if attr.startswith(("weight_ih_l", "weight_hh_l")) and id(p) in by_id:
                    out.setdefault(by_id[id(p)], module)
    return out


def _checked_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d < 1 for d in shape) or math.prod(shape) == 0:
        raise SparsetrainError(f"input_shape must be one example's shape, positive sizes without the batch "
                               f"dimension (e.g. (1, 28, 28)); got {input_shape!r}")
    return shape


def format_count(value: int | None) -> str:
    """A FLOP count for a table: ``1.6M``, ``235.2k``, ``900``; "-" for None.

        >>> format_count(1_600_000), format_count(235_200), format_count(900), format_count(None)
        ('1.6M', '235.2k', '900', '-')
    """
    if value is None:
        return "-"
    for size, unit in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def format_layer_rows(rows: Sequence[Mapping[str, Any]], counts: bool = True) -> str:
    """A per-layer table: name, (with ``counts``) kept / total / sparsity, then FLOPs dense and
    kept and effective sparsity. Rows recorded before those three existed (or where they are not
    defined) show "-"."""
    width = max([len("layer")] + [len(str(r["name"])) for r in rows])
    head = f"{'layer':<{width}} "
    if counts:
        head += f" {'kept':>9} {'total':>9} {'sparsity':>9}"
    lines = [head + f" {'flops':>8} {'kept':>8} {'effective':>9}"]
    for r in rows:
        line = f"{r['name']:<{width}} "
        if counts:
            line += f" {r.get('kept', '-'):>9} {r.get('total', '-'):>9} {_percent(r.get('sparsity')):>9}"
        line += (f" {format_count(r.get('flops')):>8} {format_count(r.get('flops_kept')):>8}"
                 f" {_percent(r.get('effective_sparsity')):>9}")
        lines.append(line)
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
