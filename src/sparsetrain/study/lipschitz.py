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

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from sparsetrain.batches import batch_size_of, forward_loss
from sparsetrain.errors import SparsetrainError
from sparsetrain.train.loop import Callback

__all__ = ["GAMMAS", "LIPSCHITZ_FILE", "LipschitzCallback", "LipschitzCurve", "along_training", "choose_batch_size",
           "full_batch_gradient", "lipschitz_between", "load_curves", "measure_study", "plot_lipschitz",
           "training_chunks"]

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
                   data_dir: str | Path | None = None, device=None, progress: bool = False, mask=None):
    """Train ``config`` (a :class:`sparsetrain.config.RunConfig`: pruned, initialised and trained
    by the pipeline's stages, not recorded in a store) with a :class:`LipschitzCallback`; return
    ``(values, result)``: the ``[(step, L)]`` measured every ``every`` steps over the training
    split in chunks of ``chunk`` (its first ``examples`` only, if given) and the
    :class:`~sparsetrain.train.loop.TrainResult`. What the original does with ``--check_lipschitz``.
    ``mask``: train with this mask (as ``run(config, mask=)`` does: a study's shared mask) instead
    of pruning; None finds it (none for a dense config)."""
    from sparsetrain.pipeline import build, find_mask, init_under_mask, train_stage, validate

    if config.train.execution != "dense":
        raise SparsetrainError(
            f"the Lipschitz measurement needs train.execution = 'dense' (it moves the weights of the network "
            f"as built), got {config.train.execution!r}"
        )
    validate(config)
    built = build(config, data_dir=data_dir, device=device)
    if mask is None:
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


# ----------------------------------------------------------------------------- a study's curves

LIPSCHITZ_FILE = "lipschitz.json"
"""Where :func:`measure_study` keeps a study's curves, in the study's folder."""

PREFERRED_BATCH_SIZE = 128
"""The batch size whose best trials :func:`measure_study` retrains by default (the nearest one the
study has, on a log scale, where every sparsity reached the goal)."""

MEASUREMENTS = 10
"""With no ``every`` given, a curve gets at most this many measurements (see :func:`auto_every`)."""

DEFAULT_EXAMPLES = 10_000
"""The examples a study's full-batch gradient is taken over by default: the first 10,000 of the
training split (effect-dps-public takes all of it, 54,000 for MNIST; see docs/study.md for the cost)."""


@dataclasses.dataclass(frozen=True)
class LipschitzCurve:
    """L along the retraining of one point's best trial: ``workload`` at ``sparsity`` and
    ``batch_size``, the trial that set K* (``plan_index``, its ``params``; seeded with its plan
    index and trained with the study's shared mask), ``steps`` steps trained, L measured between
    steps ``every * j - 1`` and ``every * j`` over the first ``examples`` training examples (None:
    all) in chunks of ``chunk``. ``values``: ``(step, L)``; ``goal_reached_at``: the retrained run's
    first validation check at or below the goal (equal to ``k_star`` when the retraining
    reproduced the trial); ``seconds``: how long it took."""

    workload: str
    sparsity: float
    batch_size: int
    plan_index: int
    params: dict
    k_star: int
    steps: int
    every: int
    chunk: int
    examples: int | None
    values: tuple[tuple[int, float], ...] = ()
    goal_reached_at: int | None = None
    seconds: float = 0.0

    SETTINGS = ("workload", "sparsity", "batch_size", "plan_index", "params", "k_star", "steps", "every", "chunk",
                "examples")
    """The fields that decide a measurement: a curve with the same ones is not measured again."""

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in self.SETTINGS}

    def to_dict(self) -> dict:
        out = self.settings() | {"goal_reached_at": self.goal_reached_at, "seconds": round(self.seconds, 3)}
        # JSON has no NaN: a measurement between two equal iterates is written as null
        out["values"] = [[int(s), float(v) if math.isfinite(v) else None] for s, v in self.values]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LipschitzCurve:
        values = tuple((int(s), math.nan if v is None else float(v)) for s, v in data["values"])
        return cls(str(data["workload"]), float(data["sparsity"]), int(data["batch_size"]), int(data["plan_index"]),
                   dict(data["params"]), int(data["k_star"]), int(data["steps"]), int(data["every"]),
                   int(data["chunk"]), None if data["examples"] is None else int(data["examples"]), values,
                   data.get("goal_reached_at"), float(data.get("seconds", 0.0)))


def auto_every(steps: int, check_interval: int) -> int:
    """The interval giving at most :data:`MEASUREMENTS` measurements over ``steps``: a multiple of
    the workload's check interval (so L lies on the validation curve's steps), at least 2.

    >>> auto_every(3000, 100), auto_every(300, 100), auto_every(40000, 100), auto_every(20, 1)
    (300, 100, 4000, 2)
    """
    return max(2, check_interval * math.ceil(steps / (MEASUREMENTS * check_interval)))


def choose_batch_size(batch_sizes, sparsities, has_k_star, requested: int | None = None) -> int | None:
    """The batch size whose best trials are retrained: ``requested`` (refused unless the study has
    it), else the one nearest :data:`PREFERRED_BATCH_SIZE` on a log scale (ties: the larger, fewer
    steps) among those where every sparsity has a K*, else among those where any has; None when
    no point has a K*. ``has_k_star(batch_size, sparsity)``: whether the point has a complete trial.

    >>> choose_batch_size((2, 64, 256, 1024), (0.0, 0.9), lambda b, s: b != 256 or s == 0.0)
    64
    >>> choose_batch_size((2, 64, 256, 1024), (0.0, 0.9), lambda b, s: True)
    256
    """
    if requested is not None:
        if requested not in batch_sizes:
            raise SparsetrainError(f"--batch-size {requested} is not one of the study's batch sizes "
                                   f"({', '.join(map(str, batch_sizes))}); choose one of them, or leave it out to "
                                   f"take the one nearest {PREFERRED_BATCH_SIZE} where every sparsity has a K*")
        return requested
    every = [b for b in batch_sizes if all(has_k_star(b, s) for s in sparsities)]
    some = every or [b for b in batch_sizes if any(has_k_star(b, s) for s in sparsities)]
    if not some:
        return None
    return min(some, key=lambda b: (abs(math.log2(b / PREFERRED_BATCH_SIZE)), -b))


def load_curves(folder: str | Path) -> list[LipschitzCurve]:
    """The curves measured in a study's ``folder`` (``lipschitz.json``; none if it is absent)."""
    path = Path(folder) / LIPSCHITZ_FILE
    if not path.is_file():
        return []
    try:
        return [LipschitzCurve.from_dict(c) for c in json.loads(path.read_text())["curves"]]
    except (ValueError, KeyError, TypeError) as err:
        raise SparsetrainError(f"{path} is damaged ({type(err).__name__}: {err}); delete it and measure the "
                               "curves again: sparsetrain study lipschitz --dir " + str(folder)) from None


def _save_curves(folder: Path, curves: list[LipschitzCurve]) -> None:
    from sparsetrain import fsio

    ordered = sorted(curves, key=lambda c: (c.workload, c.sparsity))
    text = json.dumps({"curves": [c.to_dict() for c in ordered]}, indent=2) + "\n"
    fsio.atomic_write(folder / LIPSCHITZ_FILE, lambda tmp: tmp.write_text(text), what="report")


def _whole_number(value, flag: str, least: int, why: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise SparsetrainError(f"{flag} must be a whole number >= {least} ({why}); got {value!r}")


def measure_study(folder: str | Path, *, storage: str | None = None, study: str | None = None,
                  batch_size: int | None = None, every: int | None = None, steps: int | None = None,
                  chunk: int = 1000, examples: int | None = DEFAULT_EXAMPLES, data_dir: str | Path | None = None,
                  device=None, progress: bool = False, say: Callable[[str], None] = print) -> list[LipschitzCurve]:
    """The Lipschitz curves of the study in ``folder`` (``storage``, ``study``: as
    :func:`sparsetrain.study.engine.work_loop`), one per workload and sparsity, kept in
    ``folder/lipschitz.json``; returns them all.

    Each is measured along a retraining of the best trial (the one that set K*) at ``batch_size``
    (default: :func:`choose_batch_size`): its exact run config (the workload's trial config with
    its metaparameters, seeded with its plan index) and the study's shared mask, trained for
    ``steps`` (default: its K*; the goal does not stop it) with a :class:`LipschitzCallback` every
    ``every`` steps (default: :func:`auto_every`) over the first ``examples`` training examples
    (None: all, as effect-dps-public) in chunks of ``chunk``. effect-dps-public measures inside
    every trial of a study run with ``--check_lipschitz``; retraining only the best trials gives the
    same curves for the runs the analysis shows, at a fraction of the cost. A curve already in
    the file with the same settings is not measured again; each one is written as soon as it is
    measured, so an interrupted call loses at most the curve it was on. Points without a complete
    trial are skipped with a message (``say``); none at all with one is an error."""
    from sparsetrain.study.engine import best_trials, load_spec, outcomes, point_name, shared_mask

    _whole_number(every, "--every", 2, "L is measured between steps every - 1 and every; "
                                       "effect-dps-public uses 1000")
    _whole_number(steps, "--steps", 1, "the steps the best trial is retrained for")
    _whole_number(chunk, "--chunk", 1, "examples per chunk of a full-batch gradient")
    _whole_number(examples, "--examples", 1, "the training examples a full-batch gradient sums over; "
                                             "--examples 0 (None in the API) for all of them")
    _whole_number(batch_size, "--batch-size", 1, "one of the study's batch sizes")
    folder = Path(folder)
    spec = load_spec(folder, storage=storage, study=study)
    best = best_trials(outcomes(folder, storage=storage, study=study))
    curves = {(c.workload, c.sparsity): c for c in load_curves(folder)}
    for workload in spec.workloads:
        def has_k_star(b, s, name=workload.name):
            return (name, b, float(s)) in best

        chosen = choose_batch_size(spec.batch_sizes, spec.sparsities, has_k_star, batch_size)
        if chosen is None or not any(has_k_star(chosen, s) for s in spec.sparsities):
            where = "any batch size" if chosen is None else f"batch size {chosen}"
            raise SparsetrainError(
                f"workload {workload.name} has no complete trial at {where} yet, so there is no best trial to "
                f"measure; run the study further (sparsetrain study work --dir {folder}) or choose a batch size "
                "that has a K* (sparsetrain study status shows them)"
            )
        for sparsity in map(float, spec.sparsities):
            name = point_name(workload.name, chosen, sparsity)
            trial = best.get((workload.name, chosen, sparsity))
            if trial is None:
                say(f"{name}: skipped, no complete trial (no K*, so no best trial to retrain)")
                continue
            length = steps if steps is not None else trial.steps_to_result
            wanted = LipschitzCurve(workload.name, sparsity, chosen, trial.plan_index, dict(trial.params),
                                    trial.steps_to_result, length, every or auto_every(length, workload.check_interval),
                                    chunk, examples)
            old = curves.get((workload.name, sparsity))
            if old is not None and old.settings() == wanted.settings():
                say(f"{name}: already measured (trial {trial.plan_index}, {len(old.values)} values)")
                continue
            config = workload.trial_config(chosen, sparsity, trial.params, seed=trial.plan_index)
            mask = shared_mask(folder, config, data_dir=data_dir, device=device)
            say(f"{name}: retraining trial {trial.plan_index} (K* = {trial.steps_to_result}) for {length} steps, "
                f"L every {wanted.every} steps over {examples or 'all'} examples")
            started = time.perf_counter()
            values, result = along_training(config.replace(train={"iterations": length, "goal_error": 0.0}),
                                            every=wanted.every, chunk=chunk, examples=examples, data_dir=data_dir,
                                            device=device, progress=progress, mask=mask)
            reached = next((s for s, e in result.curves.get("val_error", []) if e <= workload.goal_error), None)
            curves[(workload.name, sparsity)] = dataclasses.replace(
                wanted, values=tuple(values), goal_reached_at=reached, seconds=round(time.perf_counter() - started, 3))
            _save_curves(folder, list(curves.values()))
            shown = ", ".join(f"{s}: {v:.4g}" for s, v in values) or "none (fewer steps than --every)"
            say(f"{name}: L = {shown} ({time.perf_counter() - started:.0f} s)")
    return sorted(curves.values(), key=lambda c: (c.workload, c.sparsity))
