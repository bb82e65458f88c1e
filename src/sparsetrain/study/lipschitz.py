"""Lipschitz smoothness of the gradient along training (Lee, Ajanthan, Torr, Jaggi, ICLR 2021).

Between two consecutive iterates w and w' = w + d (one optimizer step), the local Lipschitz
constant of the full-batch gradient g is estimated as effect-dps-public's ``check.py`` does:

    L = max over gamma in {0.1, 0.2, ..., 0.9} of ||g(w + gamma d) - g(w)|| / ||gamma d||

where g is the gradient of the mean training loss over the *whole training set* (no weight decay,
the network in inference mode), accumulated over large chunks: g = sum over chunks of
(chunk size * the chunk's mean-loss gradient) / N. A pruned network's gradient is taken with its
mask, so pruned weights (which never move) add nothing to the numerator, as the original's
gradient through its masked weights.

:class:`LipschitzCallback` does this during training without any change to the training loop:
``on_step`` runs after each optimizer step, so at step k (k % every == every - 1) it keeps the
weights w_k and g(w_k), and at step k + 1 it has w_{k+1}, measures L for d = w_{k+1} - w_k, and
puts w_{k+1} back exactly. Like the original, a measurement costs ten full-batch gradients.

On a quadratic loss g(w) = H w - b, so every gamma gives ||H d|| / ||d||:

>>> import torch
>>> class Quadratic(torch.nn.Module):  # loss = mean over examples of (x . w - y)^2 / 2
...     def __init__(self):
...         super().__init__()
...         self.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
...     def forward(self, x):
...         return x @ self.w
>>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # H = diag(0.5, 2)
>>> chunks = [(x, torch.zeros(2, dtype=torch.float64))]
>>> half_square = lambda out, y: 0.5 * ((out - y) ** 2).mean()
>>> model = Quadratic()
>>> callback = LipschitzCallback(model, chunks, every=2, loss_fn=half_square)
>>> callback.on_step(1, None)                      # keeps w_1 = (0, 0) and g(w_1)
>>> with torch.no_grad():
...     _ = model.w.copy_(torch.tensor([0.0, 1.0], dtype=torch.float64))  # the step d = (0, 1)
>>> callback.on_step(2, None)                      # ||H d|| / ||d|| = 2
>>> callback.values
[(2, 2.0)]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from sparsetrain.batches import batch_size_of, forward_loss
from sparsetrain.errors import SparsetrainError
from sparsetrain.train.loop import Callback

__all__ = ["GAMMAS", "LipschitzCallback", "along_training", "full_batch_gradient", "lipschitz_between",
           "plot_lipschitz", "training_chunks"]

GAMMAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))
"""The interpolation points, effect-dps-public's ``linspace(0, 1, 10, endpoint=False)[1:]``."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def training_chunks(train, size: int = 1000, examples: int | None = None):
    """The whole training set of a :class:`~sparsetrain.data.loaders.TrainStream` in fixed order,
    ``size`` examples at a time (the last chunk smaller), without its augmentation: the chunks a
    full-batch gradient is summed over (effect-dps-public uses 1,000). ``examples``: only the
    first this many (a cheaper, approximate "full" batch, for machines where ten passes over the
    whole set per measurement are too slow; None: all, as the original)."""
    from sparsetrain.data.loaders import EvalLoader

    if not isinstance(size, int) or size < 1:
        raise SparsetrainError(f"the chunk size of a full-batch gradient must be >= 1 example, got {size!r}")
    if examples is not None and (not isinstance(examples, int) or not 1 <= examples <= train.num_examples):
        raise SparsetrainError(
            f"examples must be a whole number from 1 to the training split's {train.num_examples}, got {examples!r} "
            "(None: every training example)"
        )
    stop = train.num_examples if examples is None else examples
    return EvalLoader(train.x[:stop], train.y[:stop], size, device=train.x.device, prepare=train.prepare)


def _masked_parameters(model: torch.nn.Module, mask: Mapping[str, torch.Tensor] | None):
    """The trainable parameters (by canonical name) and, per parameter, its 0/1 mask or None."""
    from sparsetrain.masks import parameter_names, resolve_mask

    params = {n: p for n, p in parameter_names(model)[0].items() if p.requires_grad}
    resolved = resolve_mask(mask, model) if mask is not None else {}
    masks = [resolved[n].to(device=p.device, dtype=p.dtype) if n in resolved else None for n, p in params.items()]
    return list(params.values()), masks


def full_batch_gradient(model: torch.nn.Module, chunks: Iterable, *, loss_fn: LossFn | None = None,
                        mask: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The gradient of the mean loss over every example of ``chunks`` (batches, e.g.
    :func:`training_chunks`) with respect to ``model``'s trainable parameters, flattened into one
    vector in ``named_parameters()`` order; pruned entries (``mask`` False) are zero. Computed in
    inference mode (the model's mode is restored); ``.grad`` is left untouched."""
    params, masks = _masked_parameters(model, mask)
    return _gradient(model, params, masks, chunks, loss_fn)


def _gradient(model, params, masks, chunks, loss_fn) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        total = [torch.zeros_like(p) for p in params]
        count = 0
        for chunk in chunks:
            n = batch_size_of(chunk)
            loss, _ = forward_loss(model, chunk, loss_fn)
            grads = torch.autograd.grad(loss * n, params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(g)
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise SparsetrainError("a full-batch gradient needs at least one example; the chunks given were empty")
    flat = [(t if m is None else t * m).reshape(-1) for t, m in zip(total, masks)]
    return torch.cat(flat) / count


def lipschitz_between(model: torch.nn.Module, before: Sequence[torch.Tensor], grad_before: torch.Tensor,
                      chunks: Iterable, *, loss_fn: LossFn | None = None,
                      mask: Mapping[str, torch.Tensor] | None = None, gammas: Sequence[float] = GAMMAS) -> float:
    """L between the weights ``before`` (one tensor per trainable parameter, with ``grad_before``
    their full-batch gradient) and the model's current weights (see the module docstring); the
    model's weights are back as they were on return. NaN when the two iterates are equal."""
    params, masks = _masked_parameters(model, mask)
    if len(before) != len(params):
        raise SparsetrainError(f"lipschitz_between: {len(before)} saved tensors for {len(params)} trainable parameters")
    after = [p.detach().clone() for p in params]
    direction = [a - b for a, b in zip(after, before)]
    norm = float(torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in direction])))
    if norm == 0 or not math.isfinite(norm):
        return math.nan
    best = -math.inf
    try:
        for gamma in gammas:
            with torch.no_grad():
                for p, b, d in zip(params, before, direction):
                    p.copy_(b + gamma * d)
            change = _gradient(model, params, masks, chunks, loss_fn) - grad_before
            best = max(best, float(torch.linalg.vector_norm(change)) / (gamma * norm))
    finally:
        with torch.no_grad():
            for p, a in zip(params, after):
                p.copy_(a)
    return best


class LipschitzCallback(Callback):
    """Measure L every ``every`` steps during :func:`sparsetrain.train.loop.train` (between steps
    ``every * j - 1`` and ``every * j``, as effect-dps-public's ``--lipschitz_interval``).

    ``chunks``: the training set in large batches (:func:`training_chunks`); ``mask``: the
    network's mask, if pruned; ``loss_fn``: as given to ``train``; ``on_value(step, L)``: called
    with each measurement (e.g. to record it as a metric). Measurements accumulate in ``values``
    as ``(step, L)``. It never stops a run."""

    def __init__(self, model: torch.nn.Module, chunks: Iterable, *, every: int = 1000,
                 mask: Mapping[str, torch.Tensor] | None = None, loss_fn: LossFn | None = None,
                 gammas: Sequence[float] = GAMMAS, on_value: Callable[[int, float], None] | None = None):
        if not isinstance(every, int) or every < 2:
            raise SparsetrainError(
                f"the Lipschitz interval must be a whole number of steps >= 2 (it measures between steps "
                f"every - 1 and every), got {every!r}; effect-dps-public uses 1000"
            )
        if not gammas or any(not 0 < g <= 1 for g in gammas):
            raise SparsetrainError(f"Lipschitz interpolation points must lie in (0, 1], got {list(gammas)}")
        self.model, self.chunks, self.every = model, chunks, every
        self.mask, self.loss_fn, self.gammas, self.on_value = mask, loss_fn, tuple(gammas), on_value
        self.values: list[tuple[int, float]] = []
        self._kept: tuple[int, list[torch.Tensor], torch.Tensor] | None = None

    def on_step(self, step: int, loss) -> None:
        if step % self.every == self.every - 1:
            params, masks = _masked_parameters(self.model, self.mask)
            weights = [p.detach().clone() for p in params]
            self._kept = (step, weights, _gradient(self.model, params, masks, self.chunks, self.loss_fn))
        elif step % self.every == 0 and self._kept is not None:
            kept_step, weights, grad = self._kept
            self._kept = None
            if kept_step != step - 1:  # resumed in between: no consecutive pair
                return None
            value = lipschitz_between(self.model, weights, grad, self.chunks, loss_fn=self.loss_fn,
                                      mask=self.mask, gammas=self.gammas)
            self.values.append((step, value))
            if self.on_value is not None:
                self.on_value(step, value)
        return None


def along_training(config, *, every: int = 1000, chunk: int = 1000, examples: int | None = None,
                   data_dir: str | Path | None = None, device=None, progress: bool = False):
    """Train ``config`` (a :class:`sparsetrain.config.RunConfig`: pruned, initialised and trained
    by the pipeline's stages, not recorded in a store) with a :class:`LipschitzCallback`; return
    ``(values, result)``: the ``[(step, L)]`` measured every ``every`` steps over the training
    split in chunks of ``chunk`` (its first ``examples`` only, if given) and the
    :class:`~sparsetrain.train.loop.TrainResult`. What the original does with ``--check_lipschitz``."""
    from sparsetrain.pipeline import build, find_mask, init_under_mask, train_stage, validate

    if config.train.execution != "dense":
        raise SparsetrainError(
            f"the Lipschitz measurement needs train.execution = 'dense' (it moves the weights of the network "
            f"as built), got {config.train.execution!r}"
        )
    validate(config)
    built = build(config, data_dir=data_dir, device=device)
    mask = find_mask(config, built)
    model, hooks = init_under_mask(config, built, mask)
    callback = LipschitzCallback(model, training_chunks(built.loaders.train, chunk, examples), every=every, mask=mask)
    result = train_stage(config, built, model, hooks, mask, progress=progress, callbacks=[callback])
    return callback.values, result


def plot_lipschitz(curves: Mapping[float, Sequence[tuple[int, float]]], path: str | Path, *, title: str = "") -> Path:
    """Write L against training steps, one line per sparsity (``{sparsity: [(step, L)]}``), to
    ``path`` (PNG, atomically)."""
    from sparsetrain.measure import new_figure, save_png

    fig = new_figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    seen: list[float] = []
    for i, (sparsity, curve) in enumerate(sorted(curves.items())):
        pts = [(s, v) for s, v in curve if math.isfinite(v)]
        if not pts:
            continue
        seen += [v for _, v in pts]
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", ms=3, color=f"C{i % 10}", label=f"sparsity {sparsity:g}")
    if seen and min(seen) > 0 and max(seen) > 10 * min(seen):  # a log axis only where it spans a decade
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("Lipschitz constant of the gradient")
    ax.set_title(title or "max over gamma of ||g(w + gamma d) - g(w)|| / ||gamma d||", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)
