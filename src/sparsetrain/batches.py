"""Batches in the forms users have them, and the one way a model's loss is computed from one.

Two forms are understood everywhere a batch is taken (pruning, training, evaluation):

- ``(inputs, targets)``, a tuple or a list (what a ``DataLoader`` over a ``TensorDataset``
  yields): the model is called as ``model(inputs)`` and its output is the logits.
- a mapping, as Hugging Face models take it: ``model(**batch)``. The labels, if any, are
  ``batch["labels"]``; the output carries a ``loss`` and/or ``logits`` (as an attribute, as
  ``transformers``' ``ModelOutput`` does, or as a mapping key).

    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> loss, out = forward_loss(model, (torch.ones(4, 3), torch.tensor([0, 1, 0, 1])))
    >>> tuple(out.shape), loss.dim(), batch_size_of((torch.ones(4, 3), None))
    ((4, 2), 0, 4)

What a batch must hold is checked where it is used, with errors that say what was wrong: an
``(inputs, targets)`` pair (not the inputs alone), as many targets as inputs, and, for the default
cross-entropy, integer targets that are class indices of the model's outputs (0..C-1, or -100,
cross-entropy's "ignore"). The class indices are checked on the first batch a model sees (a label
10 for a 10-class model would otherwise fail deep inside the loss, or, on a GPU, as an assertion
that poisons the device); a later bad batch is explained the same way when the loss fails.

    >>> forward_loss(model, (torch.ones(2, 3), torch.tensor([0, 2])))
    Traceback (most recent call last):
    ...
    sparsetrain.errors.SparsetrainError: targets must be class indices 0..1 for this model's 2 outputs; got 2 ...
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import SparsetrainError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: a target that counts for nothing

# Models whose first (inputs, targets) batch has had its class indices checked: checking every
# batch would cost a device synchronisation per step.
_TARGETS_CHECKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def is_batch(obj: Any) -> bool:
    """True for one batch (a mapping, or an ``(inputs, targets)`` pair whose inputs are a tensor,
    or a mapping with tensor targets), False for anything else, such as a list or loader of
    batches."""
    if isinstance(obj, Mapping):
        return True
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        return False
    x, y = obj
    return isinstance(x, torch.Tensor) or (isinstance(x, Mapping) and isinstance(y, torch.Tensor))


def targets_of(batch: Any) -> torch.Tensor | None:
    """The targets: ``y`` of ``(x, y)``, ``batch["labels"]`` of a mapping, else None."""
    if isinstance(batch, Mapping):
        return batch.get("labels")
    return batch[1]


def batch_size_of(batch: Any) -> int:
    """The number of examples: the leading size of the inputs (of the first tensor of a mapping)."""
    first = batch if isinstance(batch, Mapping) else batch[0]
    if isinstance(first, Mapping):
        tensors = [v for v in first.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not tensors:
            raise SparsetrainError(f"cannot tell the size of a batch with keys {list(first)}: it holds no tensor")
        return int(tensors[0].shape[0])
    return int(first.shape[0])


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """The batch with every tensor in it (nested in tuples, lists and mappings) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    return first


def rebatch(batches: Any, size: int, count: int) -> Any:
    """``count`` batches of exactly ``size`` examples, cut in order from the examples of
    ``batches`` (an iterable of batches of any size, in either form): what lets the pruning batch
    differ from the training batch (the SNIP paper scores batches of 1 to 10,000 examples) while
    drawing the same examples in the same order. Raises :class:`SparsetrainError` when
    ``batches`` runs out first.

        >>> x = torch.arange(10.0).reshape(5, 2)
        >>> [tuple(b[1].tolist()) for b in rebatch([(x, torch.arange(5))] * 2, 3, 3)]
        [(0, 1, 2), (3, 4, 0), (1, 2, 3)]
    """
    if size < 1 or count < 1:
        raise SparsetrainError(f"rebatch needs size and count >= 1, got size {size}, count {count}")
    pending: list[Any] = []
    held = 0
    made = 0
    source = iter(batches)
    while made < count:
        while held < size:
            try:
                part = next(source)
            except StopIteration:
                raise SparsetrainError(
                    f"the data gave {made * size + held} examples, fewer than the {count} batches of {size} "
                    "asked for: lower the pruning batch size or the number of pruning batches"
                ) from None
            pending.append(part)
            held += batch_size_of(part)
        joined = _cat(pending) if len(pending) > 1 else pending[0]
        yield _slice(joined, 0, size)
        made += 1
        held -= size
        pending = [_slice(joined, size, size + held)] if held else []


def _field(outputs: Any, key: str) -> Any:
    value = getattr(outputs, key, None)
    if value is None and isinstance(outputs, Mapping):
        value = outputs.get(key)
    return value


def logits_of(outputs: Any) -> torch.Tensor | None:
    """The logits of a model's output: the output itself if it is a tensor, else its ``logits``
    attribute or key; None if it has none (the model is then judged by its loss alone)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    value = _field(outputs, "logits")
    return value if isinstance(value, torch.Tensor) else None


def loss_of(outputs: Any) -> torch.Tensor | None:
    """The ``loss`` attribute or key of a model's output (Hugging Face models return one when the
    batch has labels), else None."""
    if isinstance(outputs, torch.Tensor):
        return None
    value = _field(outputs, "loss")
    return value if isinstance(value, torch.Tensor) else None


def _shapes(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {_shapes(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in batch) + ")"
    return type(batch).__name__


def check_pair(batch: Any, needs_targets: bool = True) -> None:
    """Refuse what is not an ``(inputs, targets)`` pair or a mapping (the inputs alone, a 1-tuple),
    targets that are missing (None) where the loss needs them, and a number of targets that differs
    from the number of inputs. Only shapes are read: no device synchronisation."""
    if isinstance(batch, Mapping):
        return
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = (f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor)
                else f"a {type(batch).__name__} of {len(batch)} item(s) {_shapes(batch)}"
                if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
        raise SparsetrainError(
            f"a batch must be an (inputs, targets) pair or a dict for model(**batch); got {what}. Inputs "
            "without targets cannot be scored or trained: pass batches=(inputs, targets) (one batch) or "
            "an iterable of such pairs, such as a DataLoader over TensorDataset(inputs, targets)"
        )
    x, y = batch
    if y is None:
        if needs_targets:
            raise SparsetrainError(
                f"the batch {_shapes(batch)} has inputs but no targets (None); the loss needs them: pass "
                "(inputs, targets), or a dict batch for a model that computes its own loss"
            )
        return
    if isinstance(y, torch.Tensor) and y.dim() > 0 and (isinstance(x, torch.Tensor) and x.dim() > 0 or isinstance(x, Mapping)):
        n_inputs = batch_size_of(batch)
        if y.shape[0] != n_inputs:
            raise SparsetrainError(
                f"the batch has {n_inputs} inputs but {y.shape[0]} targets {_shapes(batch)}: give one "
                "target per input"
            )


def check_targets(logits: torch.Tensor, targets: Any) -> None:
    """Refuse integer ``targets`` that are not class indices of ``logits`` (``(B, C, ...)``):
    each must be in ``0..C-1`` (or :data:`IGNORE_INDEX`). Float targets (class probabilities)
    and anything else are left to the loss. Reads the values (a synchronisation on a GPU)."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool or targets.numel() == 0 or logits.dim() < 2:
        return
    classes = logits.shape[1]
    bad = targets[((targets < 0) | (targets >= classes)) & (targets != IGNORE_INDEX)]
    if bad.numel():
        values = bad.unique()
        shown = ", ".join(str(v) for v in values[:5].tolist()) + (" ..." if values.numel() > 5 else "")
        raise SparsetrainError(
            f"targets must be class indices 0..{classes - 1} for this model's {classes} outputs; got {shown} "
            f"({bad.numel()} of {targets.numel()} targets). Build the model for the data set's number of "
            "classes, or relabel the data"
        )


def forward_loss(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None = None) -> tuple[torch.Tensor, Any]:
    """``(loss, outputs)`` of ``model`` on one ``batch`` (see the module docstring).

    ``(x, y)``: ``outputs = model(x)``, ``loss = (loss_fn or cross_entropy)(outputs, y)``.
    A mapping: ``outputs = model(**batch)``; with ``loss_fn`` the loss is
    ``loss_fn(logits_of(outputs), batch["labels"])``, without it the output's own ``loss``.
    A batch that does not fit the model raises :class:`SparsetrainError` showing its shapes; one
    that is not a batch, or whose targets are missing, too few or too many, or (default loss) not
    class indices of the model's outputs, raises saying so (:func:`check_pair`,
    :func:`check_targets`)."""
    check_pair(batch, needs_targets=loss_fn is None)
    try:
        if isinstance(batch, Mapping):
            outputs = model(**batch)
            return _mapping_loss(model, batch, outputs, loss_fn), outputs
        x, y = batch
        outputs = model(**x) if isinstance(x, Mapping) else model(x)
        logits = logits_of(outputs)
        if logits is None:
            raise SparsetrainError(
                f"{type(model).__name__} returned {type(outputs).__name__} with no logits for an "
                "(inputs, targets) batch: return a tensor or an output with .logits, or pass dict "
                "batches with 'labels' so that the model computes its own loss"
            )
        if loss_fn is None and model not in _TARGETS_CHECKED:
            check_targets(logits, y)
            _TARGETS_CHECKED.add(model)
        try:
            loss = (loss_fn or F.cross_entropy)(logits, y)
        except (IndexError, ValueError, RuntimeError) as err:
            if loss_fn is not None or isinstance(err, SparsetrainError):
                raise
            check_targets(logits, y)  # a later batch with a bad label: say so
            raise RuntimeError(str(err)) from err
        return loss, outputs
    except SparsetrainError:
        raise
    except RuntimeError as err:
        raise SparsetrainError(
            f"a batch {_shapes(batch)} does not fit {type(model).__name__}: {err}. "
            "Check that the data set matches the model (input shape and number of classes)."
        ) from err


def _mapping_loss(model, batch: Mapping, outputs: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        logits, labels = logits_of(outputs), batch.get("labels")
        if labels is None:
            raise SparsetrainError(
                f"loss_fn needs the targets, but the dict batch (keys {list(batch)}) has no 'labels'; "
                "add them, or leave loss_fn out so that the model's own loss is used"
            )
        if logits is None:
            raise SparsetrainError(
                f"loss_fn needs logits, but {type(model).__name__} returned {type(outputs).__name__} "
                "with none; leave loss_fn out so that the model's own loss is used"
            )
        return loss_fn(logits, labels)
    loss = loss_of(outputs)
    if loss is None:
        raise SparsetrainError(
            f"{type(model).__name__} returned no loss for a dict batch (keys {list(batch)}): include "
            "'labels' in the batch so that the model computes its loss, or pass loss_fn "
            "(called as loss_fn(logits, batch['labels']))"
        )
    return loss
