"""Masks: one boolean tensor per prunable parameter, keyed by the parameter's name.

A mask is plain state, not code: pruning produces one, training keeps the masked weights at zero
through an after-backward hook, and it saves to and loads from a safetensors file. Pruning returns
a :class:`Mask`, a ``dict`` that also says which parameters were left out of it and why
(``left_out``) and any assumption it made (``notes``); every function here takes a plain ``dict``
as well.

What a mask tensor may hold: ``torch.bool`` (True = kept), or only the values 0 and 1 in any
integer or floating dtype (converted to bool; 0.5, 2, -1 or NaN are refused, naming the tensor and
the values), with the shape of its parameter.

A mask file says what it is: :func:`save_mask` writes the method, the real sparsity, the model it
was made for (name, parameter count, a fingerprint of its parameters' names and shapes), where it
came from, the sparsetrain version and a sha256 of its content; :func:`load_mask` refuses a file
whose content no longer matches that checksum, and a mask for another model is refused naming the
model it was made for.

A tensor shared by several modules (an output layer tied to the embedding) is one parameter with
several names; a mask names it once, by its first name in ``model.named_parameters()`` order
(its canonical name), and the functions here accept any of its names.

    >>> import torch
    >>> from sparsetrain.masks import apply_mask_, mask_summary
    >>> model = torch.nn.Linear(4, 2)
    >>> mask = {"weight": torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)}
    >>> _ = apply_mask_(model, mask)
    >>> int((model.weight == 0).sum())
    5
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from .errors import SparsetrainError


class Mask(dict):
    """``{parameter name: bool tensor}`` (True = kept), in parameter order, with two records:

    ``left_out``: ``{name: reason}`` for the model's parameters the mask does not cover
    (``"normalisation layer"``, ``"1-D (bias; include_biases=False)"``, ...);
    ``notes``: ``{name: text}`` for assumptions made about a covered parameter (such as the
    input axis of a layer class the library does not know);
    ``metadata``: ``{key: str}``, what a mask loaded by :func:`load_mask` is: ``method``,
    ``sparsity`` (the real fraction pruned), ``source`` (the file it was read from), ``sha256``
    (of its content, :func:`content_sha256`), ``model`` (the model it was made for, "" if the file
    does not say) and, where the file says, ``model_parameters`` and ``model_fingerprint``.
    Empty for a mask made in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | Iterable = (), *,
                 left_out: Mapping[str, str] | None = None, notes: Mapping[str, str] | None = None,
                 metadata: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.left_out: dict[str, str] = dict(left_out or {})
        self.notes: dict[str, str] = dict(notes or {})
        self.metadata: dict[str, str] = dict(metadata or {})

    def __repr__(self) -> str:
        extra = f", metadata={self.metadata!r}" if getattr(self, "metadata", None) else ""
        return f"Mask({dict.__repr__(self)}, left_out={self.left_out!r}, notes={self.notes!r}{extra})"


def _left_out(mask: Mapping) -> dict[str, str]:
    return dict(getattr(mask, "left_out", {}) or {})


def _notes(mask: Mapping) -> dict[str, str]:
    return dict(getattr(mask, "notes", {}) or {})


# Normalisation layers are never pruned by default (as snip-public never prunes batch-norm).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def parameter_names(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """``(params, canonical)``: the model's distinct parameters by their first name (in
    ``named_parameters()`` order), and every name of every parameter -> that first name."""
    params: dict[str, nn.Parameter] = {}
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in first:
            first[id(p)] = name
            params[name] = p
        canonical[name] = first[id(p)]
    return params, canonical


def owner_module(model: nn.Module, name: str) -> nn.Module:
    """The module that holds the parameter called ``name`` directly."""
    prefix = name.rpartition(".")[0]
    return model.get_submodule(prefix) if prefix else model


def _default_reason(model: nn.Module, name: str, p: nn.Parameter, include_biases: bool) -> str | None:
    """None if the parameter is prunable by default, else why it is not."""
    owner = owner_module(model, name)
    leaf = name.rpartition(".")[2]
    if isinstance(owner, NORM_LAYERS):
        return "normalisation layer"
    if not p.requires_grad:
        return "requires_grad=False"
    if p.dim() >= 2:
        return None
    if "bias" in leaf:
        return None if include_biases else f"{p.dim()}-D (bias; include_biases=False)"
    return f"{p.dim()}-D (not a bias)"


def prunable_set(
    model: nn.Module,
    include_biases: bool = False,
    params: Iterable[str] | None = None,
    exclude: Iterable[str] | str | None = None,
) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """``(prunable, left_out)``: the parameters a mask covers, by canonical name in
    ``named_parameters()`` order, and ``{name: reason}`` for the others.

    By default every parameter with two or more dimensions that requires grad, outside
    normalisation layers (:data:`NORM_LAYERS`), whatever its module's class; plus 1-D biases
    (names containing ``bias``) with ``include_biases``. ``params=[names]`` prunes exactly those
    parameters instead (any of a shared tensor's names), and ``exclude=[glob patterns]`` (matched
    against every name of a parameter) leaves the matches out."""
    named, canonical = parameter_names(model)
    aliases: dict[str, list[str]] = {}
    for name, first in canonical.items():
        aliases.setdefault(first, []).append(name)
    if params is not None:
        params = list(params)
        unknown = [p for p in params if p not in canonical]
        if unknown or not params:
            raise SparsetrainError(
                f"cannot prune {unknown or 'an empty list of parameters'}: not parameters of the model. "
                f"Its parameters: {', '.join(canonical) or 'none'}"
            )
        chosen = {canonical[p] for p in params}
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    found: dict[str, nn.Parameter] = {}
    left_out: dict[str, str] = {}
    for name, p in named.items():
        if params is not None:
            reason = None if name in chosen else "not in params="
        else:
            reason = _default_reason(model, name, p, include_biases)
        if reason is None:
            hit = next((pat for pat in patterns for a in aliases[name] if fnmatch.fnmatchcase(a, pat)), None)
            reason = None if hit is None else f"excluded by pattern {hit!r}"
        if reason is None:
            found[name] = p
        else:
            left_out[name] = reason
    if not found:
        why = "; ".join(f"{n}: {r}" for n, r in list(left_out.items())[:8]) or "it has no parameters"
        raise SparsetrainError(
            f"{type(model).__name__} has no prunable parameters ({why}). By default sparsetrain prunes "
            "every parameter with 2+ dimensions outside normalisation layers (and 1-D biases with "
            "include_biases=True). Pass the parameter names to prune explicitly with params=[...]."
        )
    return found, left_out


def prunable_parameters(
    model: nn.Module,
    include_biases: bool = False,
    params: Iterable[str] | None = None,
    exclude: Iterable[str] | str | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters a mask covers (see :func:`prunable_set`): ``{canonical name: parameter}``.
    Raises if the model has none."""
    return prunable_set(model, include_biases, params, exclude)[0]


def as_bool_mask(name: str, m: torch.Tensor, where: str = "") -> torch.Tensor:
    """``m`` as a bool tensor: a bool tensor as it is, any other dtype only if it holds nothing
    but 0 and 1 (a float mask of 0.5 would otherwise count as kept, silently). ``where`` (such as
    "mask file F") starts the error, which names the tensor and its offending values."""
    if not isinstance(m, torch.Tensor):
        raise SparsetrainError(f"{where or 'the mask'}: {name!r} is a {type(m).__name__}, not a tensor; "
                               "a mask maps parameter names to bool tensors")
    if m.dtype == torch.bool:
        return m
    if not m.is_complex():
        binary = (m == 0) | (m == 1)
        if bool(binary.all()):
            return m != 0
        bad = m[~binary].unique()
    else:
        bad = m.flatten()[:5]
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in bad[:5].tolist())
    more = f" (and {bad.numel() - 5} other values)" if bad.numel() > 5 else ""
    raise SparsetrainError(
        f"{where or 'the mask'}: tensor {name!r} ({m.dtype}) holds {shown}{more}: a mask must be boolean "
        "(True = kept) or hold only 0 and 1 (in any integer or floating dtype), one tensor per parameter "
        "with its shape. Threshold scores yourself (scores > t) or prune with prune_at_init."
    )


def resolve_mask(mask: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``mask`` keyed by canonical parameter names (a shared tensor's other names are accepted)
    as bool tensors, checked: known names, each tensor named once, equal shapes, boolean or 0/1
    values (see :func:`as_bool_mask`). Raises a clear :class:`SparsetrainError` otherwise; for a
    mask loaded from a file that names its model, the error names that model."""
    params, canonical = parameter_names(model)
    problems = []
    out: dict[str, torch.Tensor] = {}
    named_as: dict[str, str] = {}
    where = f"mask file {_source(mask)}" if _source(mask) else ""
    for name, m in mask.items():
        if name not in canonical:
            shape = f" {tuple(m.shape)}" if isinstance(m, torch.Tensor) else ""
            problems.append(f"{name!r}{shape} is not a parameter of the model")
            continue
        first = canonical[name]
        shape = tuple(params[first].shape)
        if first in named_as:
            problems.append(f"{name!r} and {named_as[first]!r} name the same shared tensor; keep one")
        elif isinstance(m, torch.Tensor) and tuple(m.shape) != shape:
            problems.append(f"{name!r} has shape {tuple(m.shape)}, the parameter {shape}")
        else:
            named_as[first] = name
            out[first] = as_bool_mask(name, m, where)
    if problems:
        raise _misfit(mask, model, problems)
    return out


def _source(mask: Mapping) -> str:
    return (getattr(mask, "metadata", None) or {}).get("source", "")


def _misfit(mask: Mapping, model: nn.Module, problems: list[str]) -> SparsetrainError:
    """The error for a mask that does not fit ``model``: the problems, and for a mask file that
    names its model, that model (so "which model was this for?" is answered)."""
    detail = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    meta = getattr(mask, "metadata", None) or {}
    source, made_for = meta.get("source", ""), meta.get("model", "")
    if source and made_for:
        count = meta.get("model_parameters", "")
        theirs = f"model {made_for!r}" + (f" ({int(count):,} parameters)" if count.isdigit() else "")
        ours = f"{type(model).__name__}, {sum(p.numel() for p in parameter_names(model)[0].values()):,} parameters"
        return SparsetrainError(
            f"mask file {source} was made for {theirs}, not this model ({ours}): the mask does not fit "
            f"the model: {detail}. Load the model the mask was made for, or prune this model "
            "(`sparsetrain prune`) and train with that mask."
        )
    head = f"mask file {source} does not fit the model" if source else "the mask does not fit the model"
    return SparsetrainError(f"{head}: {detail}. Prune this model again, or load the model the mask was made for.")


def check_mask(mask: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise a clear error unless ``mask`` fits ``model``: known names (any name of a shared
    tensor), each tensor named once, equal shapes, boolean or 0/1 values."""
    resolve_mask(mask, model)


def apply_mask_(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned entries of ``model``'s parameters in place. ``mask``: bool tensors, or 0/1
    values in any dtype (:func:`as_bool_mask`); anything else is refused before a weight changes."""
    resolved = resolve_mask(mask, model)
    params = parameter_names(model)[0]
    with torch.no_grad():
        for name, m in resolved.items():
            params[name].mul_(m.to(params[name].device))
    return model


class GradientMask:
    """Keeps pruned weights exactly zero during training by zeroing their gradients.

    With a pruned weight at 0 and its gradient at 0, SGD (momentum, Nesterov, weight decay), Adam
    and AdamW all leave it at 0 and their state for it at 0, so one multiply per parameter after
    each backward pass is all masked training costs. ``after_step`` re-applies the mask for
    optimizers that move zero-gradient weights (set ``reapply=True``)."""

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor], reapply: bool = False):
        resolved = resolve_mask(mask, model)
        params = parameter_names(model)[0]
        self.params = [params[n] for n in resolved]
        self.masks = [m.to(device=params[n].device, dtype=params[n].dtype) for n, m in resolved.items()]
        self.reapply = reapply

    def after_backward(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if len(grads) == len(self.params):
            torch._foreach_mul_(grads, self.masks)
        else:
            for p, m in zip(self.params, self.masks):
                if p.grad is not None:
                    p.grad.mul_(m)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.reapply:
            torch._foreach_mul_(self.params, self.masks)


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total


def mask_summary(mask: Mapping[str, torch.Tensor]) -> list[LayerSparsity]:
    return [LayerSparsity(n, tuple(m.shape), int(m.sum()), m.numel()) for n, m in mask.items()]


def overall_sparsity(mask: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in mask.values())
    return 1.0 - sum(int(m.sum()) for m in mask.values()) / total


def format_sparsity_table(mask: Mapping[str, torch.Tensor]) -> str:
    """One row per masked parameter and a total; under it, for a :class:`Mask`, the parameters
    left out and why, and the notes."""
    rows = mask_summary(mask)
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'shape':<18} {'kept':>9} {'total':>9} {'sparsity':>9}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {str(r.shape):<18} {r.kept:>9} {r.total:>9} {r.sparsity:>9.2%}")
    kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
    lines.append(f"{'all':<{width}}  {'':<18} {kept:>9} {total:>9} {1 - kept / total:>9.2%}")
    left_out, notes = _left_out(mask), _notes(mask)
    if left_out:
        lines.append("left dense (not pruned):")
        lines += [f"  {n}: {why}" for n, why in left_out.items()]
    if notes:
        lines.append("notes:")
        lines += [f"  {n}: {text}" for n, text in notes.items()]
    return "\n".join(lines)


def content_sha256(mask: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of a mask's content: for each tensor in name order, its name, its shape and the
    bytes of its boolean values (one byte each, 0 or 1). The same mask always hashes the same,
    whatever the file's layout or the order of its entries.

    >>> content_sha256({"w": torch.tensor([True, False])}) == content_sha256({"w": torch.tensor([1, 0])})
    True
    """
    digest = hashlib.sha256()
    for name in sorted(mask):
        m = mask[name]
        m = (m if m.dtype == torch.bool else m != 0).detach().cpu().contiguous()
        digest.update(json.dumps([name, list(m.shape)]).encode())
        digest.update(m.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> tuple[str, int]:
    """``(fingerprint, parameter count)`` of a model: 16 hex digits of the sha256 of its distinct
    parameters' names and shapes (in order), and how many numbers they hold."""
    params = parameter_names(model)[0]
    blob = json.dumps([[n, list(p.shape)] for n, p in params.items()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16], sum(p.numel() for p in params.values())


def save_mask(path: str | Path, mask: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
              model: nn.Module | None = None, method: str | None = None, source: str | None = None) -> None:
    """Write ``mask`` to a safetensors file that says what it is.

    Its metadata holds ``metadata`` (str -> str) and: ``method`` (``method=``, else
    ``metadata["method"]``, else the mask's own); ``sparsity`` (the real fraction pruned, computed
    here); ``model`` (``metadata["model"]``, else the mask's own, else the class of ``model``);
    with ``model``, ``model_parameters`` and ``model_fingerprint`` (:func:`model_fingerprint`), so
    that loading it for another model names the one it was made for; ``source`` (``source=``: the
    command line or run that made it; else ``"run <metadata['key']>"``); ``sparsetrain_version``;
    ``sha256`` (:func:`content_sha256`), which :func:`load_mask` checks. The parameter order and a
    :class:`Mask`'s ``left_out`` and ``notes`` travel too. A tensor that is neither boolean nor
    0/1 is refused (:func:`as_bool_mask`)."""
    from .state_io import save_tensors

    tensors = {n: as_bool_mask(n, m).cpu().contiguous() for n, m in mask.items()}
    own = {k: v for k, v in (getattr(mask, "metadata", None) or {}).items() if k in ("method", "model")}
    meta = own | dict(metadata or {})
    if method is not None:
        meta["method"] = method
    if model is not None:
        fingerprint, count = model_fingerprint(model)
        meta.setdefault("model", type(model).__name__)
        meta |= {"model_parameters": str(count), "model_fingerprint": fingerprint}
    if source is not None:
        meta["source"] = source
    elif "key" in meta:
        meta.setdefault("source", f"run {meta['key']}")
    meta |= {"sparsity": repr(overall_sparsity(tensors)) if tensors else "0.0",
             "sparsetrain_version": _version(), "sha256": content_sha256(tensors)}
    # safetensors sorts names; the parameter order (which breaks ties) travels in the metadata
    meta["sparsetrain.mask_order"] = json.dumps(list(mask))
    if left_out := _left_out(mask):
        meta["sparsetrain.left_out"] = json.dumps(left_out)
    if notes := _notes(mask):
        meta["sparsetrain.notes"] = json.dumps(notes)
    save_tensors(path, tensors, meta, what="mask")


def _version() -> str:
    """The installed sparsetrain's version (read from its metadata: importing the package root
    here would make masks depend on everything the root imports)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparsetrain")
    except PackageNotFoundError:
        return "unknown"


def load_mask(path: str | Path, model: nn.Module | None = None) -> Mask:
    """Load a mask file as a :class:`Mask` whose ``metadata`` says what it is (method, sparsity,
    source = ``path``, sha256, model); with ``model``, check that it fits (an error naming the
    model the file was made for otherwise).

    A file written with a checksum (every file :func:`save_mask` writes) is refused if its
    content no longer matches it (bytes overwritten on disk, a bad copy). Files written before
    mask files carried a checksum still load, unchecked; their ``method`` comes from the config
    they recorded, if any. A tensor that is neither boolean nor 0/1 is refused, naming it."""
    from .state_io import load_tensors

    tensors, metadata = load_tensors(path)
    where = f"mask file {path}"
    order = json.loads(metadata.get("sparsetrain.mask_order", "[]"))
    names = order if sorted(order) == sorted(tensors) else list(tensors)
    masks = {n: as_bool_mask(n, tensors[n], where) for n in names}
    found = content_sha256({n: tensors[n] for n in names})  # the stored bytes, as they are
    expected = metadata.get("sha256")
    if expected is not None and found != expected:
        raise SparsetrainError(
            f"{where} is damaged: its content does not match the checksum written with it (sha256 "
            f"{found[:16]}..., expected {expected[:16]}...); re-create it with `sparsetrain prune`"
        )
    masks = {n: m if m.dtype != torch.bool else m.view(torch.uint8) != 0 for n, m in masks.items()}
    info = {
        "method": metadata.get("method") or _recorded_method(metadata),
        "sparsity": repr(overall_sparsity(masks)) if masks else "0.0",
        "source": str(path),
        "sha256": found,
        "model": metadata.get("model", ""),
    }
    info |= {k: metadata[k] for k in ("model_parameters", "model_fingerprint") if k in metadata}
    mask = Mask(
        masks,
        left_out=json.loads(metadata.get("sparsetrain.left_out", "{}")),
        notes=json.loads(metadata.get("sparsetrain.notes", "{}")),
        metadata=info,
    )
    if model is not None:
        check_mask(mask, model)
    return mask


def _recorded_method(metadata: Mapping[str, str]) -> str:
    """The pruning method of the config an older mask file recorded (``sparsetrain prune`` wrote
    its whole config), else ""."""
    try:
        return str(json.loads(metadata.get("config", "{}")).get("prune", {}).get("method", ""))
    except (ValueError, AttributeError):
        return ""
