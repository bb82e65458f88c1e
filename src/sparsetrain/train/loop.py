"""The one training loop. It knows nothing of masks beyond an after-backward / after-step hook.

    >>> import torch
    >>> from sparsetrain import TrainConfig, create_loaders, create_model, train
    >>> loaders = create_loaders("synthetic", batch_size=50)
    >>> model = create_model("mlp-tiny")
    >>> result = train(model, loaders, TrainConfig(iterations=20, val_every=10), progress=False)
    >>> result.status, result.steps
    ('finished', 20)

Resumable: with ``checkpoint_path`` the loop saves model, optimizer, schedule, best-validation
state and RNG every ``checkpoint_every`` iterations, and starts from that file when it exists;
the batches come from a stream indexed by iteration, so a resumed run ends bit for bit where an
uninterrupted one would (on CPU).

Batches are ``(inputs, targets)`` pairs or dicts for ``model(**batch)`` (Hugging Face style, the
loss then being the output's ``loss``): :mod:`sparsetrain.batches`. A model whose outputs have no
logits is evaluated by its loss alone (its errors are ``None``).

Callbacks (:class:`Callback`) see every step's loss and every evaluation, and stop the run by
returning a reason (:class:`StopAtGoal` stops at a goal validation error: status ``"stopped"``).
A diverged run (NaN/inf loss) raises, or with ``on_diverge="infeasible"`` ends with status
``"infeasible"`` (studies count it instead of failing).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..batches import batch_size_of, check_targets, forward_loss, logits_of, targets_of
from ..config import TrainConfig
from ..errors import SparsetrainError
from .optim import build_optimizer, build_schedule, total_iterations

# How a training run ended (the run store records the same words).
FINISHED, STOPPED, INFEASIBLE = "finished", "stopped", "infeasible"
DIVERGE_CHOICES = ("raise", INFEASIBLE)


class Hook(Protocol):
    def after_backward(self) -> None: ...
    def after_step(self) -> None: ...


class Callback:
    """Sees the run as it goes; a method returning a non-empty string stops the run after this
    step, the string being the reason. ``loss`` is the step's loss tensor (reading it with
    ``float()`` synchronises with the device: do it only when needed)."""

    def on_step(self, step: int, loss: torch.Tensor) -> str | None:
        return None

    def on_eval(self, step: int, metrics: dict[str, float]) -> str | None:
        return None


class StopAtGoal(Callback):
    """Stop at the first validation check whose error is at most ``goal`` (steps-to-result)."""

    def __init__(self, goal: float, metric: str = "val_error"):
        self.goal, self.metric = goal, metric

    def on_eval(self, step: int, metrics: dict[str, float]) -> str | None:
        value = metrics.get(self.metric)
        if value is not None and value <= self.goal:
            return f"{self.metric} {value:.4g} <= goal {self.goal:g} at iteration {step}"
        return None


@dataclass
class TrainResult:
    steps: int
    final_test_error: float
    final_val_error: float | None
    best_val_step: int | None
    best_val_error: float | None
    best_val_test_error: float | None
    min_test_error: float | None  # the original's protocol: min over periodic test checks
    seconds: float
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    status: str = FINISHED  # FINISHED, STOPPED (a callback's reason) or INFEASIBLE (diverged)
    stop_reason: str | None = None
    threads: int | None = None  # torch threads the run trained on (set by the caller that chose them)

    def as_results(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("curves", "status", "stop_reason")}
        if self.status != FINISHED:
            out["status"], out["stop_reason"] = self.status, self.stop_reason
        out["test_error_final"] = out.pop("final_test_error")
        out["test_error_best_val"] = out.pop("best_val_test_error")
        out["test_error_min_over_checks"] = out.pop("min_test_error")
        return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` this machine has (None or "auto": cuda when available,
    else cpu). An unknown device string, CUDA on a machine without it, or a GPU index past the
    last raise :class:`SparsetrainError` saying what to pass instead."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise SparsetrainError(
            f"unknown device {device!r}: use cpu, cuda or cuda:N (an index), or mps on Apple silicon"
        ) from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SparsetrainError(
                f"CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise SparsetrainError(
                f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}; use one of those or --device cpu"
            )
    elif resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SparsetrainError(f"MPS is not available on this machine (torch {torch.__version__}); use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(1, device=resolved)
        except (RuntimeError, AssertionError) as err:
            raise SparsetrainError(f"device {device!r} cannot be used on this machine ({err}); use --device cpu") from None
    return resolved


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn=None, parallel=None) -> tuple[float | None, float]:
    """(error, mean loss) of ``model`` over ``loader``, in inference mode. The error is ``None``
    for a model whose outputs have no logits (judged by its loss alone). ``parallel`` (one rank
    of a data-parallel run, the same weights on every rank): each rank evaluates its part of
    every batch and the counts and loss sums are added over the ranks."""
    was_training = model.training
    model.eval()
    wrong, loss_sum, n = 0, 0.0, 0
    judged = True
    for i, batch in enumerate(loader):
        if parallel is not None:
            batch = parallel.part(batch)
        size = batch_size_of(batch)
        if size == 0:  # (a last batch smaller than the number of ranks)
            continue
        if loss_fn is None and not isinstance(batch, dict):  # summed exactly as the mean would weigh it
            x, y = batch
            out = model(x)
            logits = logits_of(out)
            if i == 0:  # labels outside the model's classes, in a split training never saw: say so
                check_targets(logits, y)
            try:
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            except (IndexError, RuntimeError):
                check_targets(logits, y)  # a bad label in a later batch: the same message
                raise
        else:
            loss, out = forward_loss(model, batch, loss_fn)
            loss_sum += float(loss) * size
            logits = logits_of(out)
        y = targets_of(batch)
        if logits is None or y is None:
            judged = False
        else:
            wrong += int((logits.argmax(-1) != y).sum())
        n += size
    model.train(was_training)
    if parallel is not None:
        wrong, loss_sum, n = parallel.all_sum(torch.tensor([float(wrong), loss_sum, float(n)],
                                                           dtype=torch.float64)).tolist()
    return (wrong / n if judged else None), loss_sum / n


def train(
    model: nn.Module,
    loaders,
    cfg: TrainConfig,
    *,
    hooks: list[Hook] = (),
    seed: int = 0,
    checkpoint_path: str | Path | None = None,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    loss_fn=None,
    postfix: dict[str, str] | None = None,
    callbacks: list[Callback] = (),
    parallel=None,
) -> TrainResult:
    """Train ``model`` on ``loaders.train`` for ``cfg``'s length; evaluate on ``loaders.val``
    every ``cfg.val_every`` iterations and on ``loaders.test`` at the end (final model and best
    validation checkpoint). ``on_metrics(step, {...})`` receives every measured value.
    ``progress``: ``True`` shows a bar (training loss and the last validation error beside it);
    ``False`` prints one line per validation check to stderr instead (``step 1000/30000  loss 0.123
    val error 2.31%  (12.3 s)``: a log file or a captured run still shows where it is); ``None``
    prints nothing (runs in worker processes, whose progress their parent reports).
    ``postfix``: more ``name: value`` pairs shown with the progress.
    ``loss_fn(logits, targets)``: default cross-entropy (dict batches: the model's own loss).
    ``cfg.goal_error`` > 0 adds :class:`StopAtGoal`; ``cfg.on_diverge`` says what a NaN loss does.
    ``parallel``: one rank of a data-parallel run (:class:`sparsetrain.distributed.Ranks`): this
    process trains on its slice of each global batch in DistributedDataParallel, logs the losses
    and errors summed over the ranks, resumes from the checkpoint rank 0 reads, and writes
    checkpoints on rank 0 only; each rank evaluates its part of the validation and test sets. A
    callback's ``on_step`` sees this rank's slice loss; a stop on any rank stops every rank.

    On a CPU, a registered model (``create_model``) with 2-D convolutions trains and is evaluated
    in the channels-last layout (:func:`conv_layout` says when); it is handed back in the default
    layout."""
    with conv_layout(model, parallel):
        return _train(model, loaders, cfg, hooks=hooks, seed=seed, checkpoint_path=checkpoint_path,
                      on_metrics=on_metrics, progress=progress, loss_fn=loss_fn, postfix=postfix,
                      callbacks=callbacks, parallel=parallel)


@contextmanager
def conv_layout(model: nn.Module, parallel=None):
    """Hold ``model``'s 4-D weights channels-last inside the block when it is a registered model
    (``create_model``: each is tested in this layout; a model of one's own may ``.view`` its
    activations, which the layout breaks) with a ``Conv2d``, executed densely (no sparse
    execution modules), on the CPU, in one process; back in the default (contiguous) layout
    afterwards, even on an error, so that saving, pruning and sparse execution see the layout
    they expect.

    Why: oneDNN's CPU convolutions run faster on channels-last weights (the activations follow
    them): a Simple-CNN or LeNet-5-Caffe training step 1.2-1.7x, an evaluation pass about 2x on the
    development machine (``benchmarks/bench_memory_format.py``, docs/results/bench_memory_format.md).
    The values are the same up to rounding (a different order of summation, as another thread
    count gives); a resumed run still ends bit for bit where an uninterrupted one would, both
    training in this layout. Parameters keep their identity (only their data changes layout), so
    an optimizer and hooks built before the block go on working. Left out: GPUs (not measured
    here) and data-parallel runs (DistributedDataParallel's gradient buckets expect the layout the
    gradients had when it was built)."""
    modules = list(model.modules())
    convert = (parallel is None and getattr(model, "registered_name", None) is not None
               and any(isinstance(m, nn.Conv2d) for m in modules)
               and not any(type(m).__module__.startswith("sparsetrain.sparse") for m in modules)
               and all(p.device.type == "cpu" for p in model.parameters()))
    if convert:
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)


def _train(model: nn.Module, loaders, cfg: TrainConfig, *, hooks, seed, checkpoint_path, on_metrics, progress,
           loss_fn, postfix, callbacks, parallel) -> TrainResult:
    """:func:`train`'s loop, in the layout :func:`conv_layout` chose."""
    from ..state_io import load_state, save_state

    if cfg.on_diverge not in DIVERGE_CHOICES:
        raise SparsetrainError(f"on_diverge must be one of {', '.join(DIVERGE_CHOICES)}, got {cfg.on_diverge!r}")
    callbacks = list(callbacks) + ([StopAtGoal(cfg.goal_error)] if cfg.goal_error > 0 else [])
    total = total_iterations(cfg, loaders.train.steps_per_epoch)
    optimizer = build_optimizer(model.parameters(), cfg)
    schedule = build_schedule(optimizer, cfg, total)
    state = _State()
    torch.manual_seed(seed)
    def saved() -> dict[str, Any] | None:
        return load_state(checkpoint_path) if checkpoint_path is not None and Path(checkpoint_path).exists() else None

    resumed = saved() if parallel is None else parallel.from_writer(saved)  # rank 0's checkpoint, on every rank
    if resumed is not None:
        state = _State.restore(resumed, model, optimizer, schedule)
    net = model if parallel is None else parallel.wrap(model)  # (after the restore: DDP starts from rank 0's weights)
    curves: dict[str, list[tuple[int, float]]] = {}

    def record(step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            curves.setdefault(k, []).append((step, v))
        if on_metrics is not None:
            on_metrics(step, values)

    def checkpoint(step: int) -> None:
        if checkpoint_path is not None and (parallel is None or parallel.writer):
            save_state(checkpoint_path, state.snapshot(step, model, optimizer, schedule, running))

    started = time.perf_counter() - state.seconds
    bar = tqdm(total=total, initial=state.step, disable=not progress, dynamic_ncols=True, leave=False)
    shown: dict[str, str] = {}  # what the bar's postfix and the evaluation lines show
    running = _Running.from_state(state.running)
    model.train()
    stream = (loaders.train if parallel is None else parallel.shard_stream(loaders.train)).iter_from(state.step)
    # on_step sees this rank's own loss, so its verdict may differ between ranks and is agreed on
    # each step; on_eval sees the same metrics on every rank (one sync a step saved, e.g. StopAtGoal)
    agree = parallel is not None and any(getattr(type(c), "on_step", None) is not Callback.on_step for c in callbacks)
    status, reason, end = FINISHED, None, total
    for step in range(state.step + 1, total + 1):
        batch = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss, out = forward_loss(net, batch, loss_fn)
        loss.backward()
        for h in hooks:
            h.after_backward()
        optimizer.step()
        for h in hooks:
            h.after_step()
        schedule.step()
        running.add(loss.detach(), logits_of(out), targets_of(batch), batch_size_of(batch), parallel)
        stops = [c.on_step(step, loss.detach()) for c in callbacks]

        last = step == total
        if step % 50 == 0 or last:
            train_loss, train_error = running.pop()
            if not math.isfinite(train_loss):
                if cfg.on_diverge != INFEASIBLE:
                    raise SparsetrainError(
                        f"training diverged at iteration {step}: the loss is {train_loss}. The last "
                        "checkpoint is kept; lower the learning rate or check the data for NaN/inf."
                    )
                record(step, {"train_loss": train_loss})
                status, reason, end = INFEASIBLE, f"the training loss is {train_loss} at iteration {step}", step
                break
            values = {"train_loss": train_loss, "lr": schedule.get_last_lr()[0]}
            if train_error is not None:
                values["train_error"] = train_error
            record(step, values)
            shown["loss"] = f"{train_loss:.3f}"
            if train_error is not None:
                shown["acc"] = f"{1 - train_error:.3f}"
            bar.set_postfix(**shown, **(postfix or {}))
            bar.update(step - bar.n)
        if loaders.val is not None and (last or (cfg.val_every and step % cfg.val_every == 0)):
            val_error, val_loss = evaluate(model, loaders.val, loss_fn, parallel)
            metrics = {"val_error": val_error, "val_loss": val_loss}
            record(step, {k: v for k, v in metrics.items() if v is not None})
            state.consider_best(step, val_loss if val_error is None else val_error, model)
            stops += [c.on_eval(step, metrics) for c in callbacks]
            _show_eval(bar, progress, shown, postfix, step, total, val_error, val_loss,
                       time.perf_counter() - started)
        if cfg.test_every and step % cfg.test_every == 0 and not last:
            test_error, test_loss = evaluate(model, loaders.test, loss_fn, parallel)
            record(step, {"test_error": test_error} if test_error is not None else {"test_loss": test_loss})
            state.min_test_error = min(state.min_test_error, test_loss if test_error is None else test_error)
        reason = next((r for r in stops if r), None)
        if agree:  # a callback that stops one rank stops them all (no rank waits alone)
            if parallel.all_sum(torch.tensor(float(bool(reason)), device=loss.device)).item() and not reason:
                reason = "a callback on another rank stopped the run"
        if reason:
            status, end = STOPPED, step
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last:
            state.seconds = time.perf_counter() - started
            checkpoint(step)
    bar.close()

    if status == INFEASIBLE:  # nothing to test: the weights are not finite
        state.seconds = time.perf_counter() - started
        return TrainResult(steps=end, final_test_error=None, final_val_error=None, best_val_step=state.best_step,
                           best_val_error=state.best_val_error, best_val_test_error=None, min_test_error=None,
                           seconds=state.seconds, curves=curves, status=status, stop_reason=reason)
    final_test, final_loss = evaluate(model, loaders.test, loss_fn, parallel)
    record(end, {k: v for k, v in {"test_error": final_test, "test_loss": final_loss}.items() if v is not None})
    best_test = None
    if state.best_model is not None:
        final_weights = copy.deepcopy(model.state_dict())
        model.load_state_dict(state.best_model)
        best_test, _ = evaluate(model, loaders.test, loss_fn, parallel)
        model.load_state_dict(final_weights)
    state.seconds = time.perf_counter() - started
    checkpoint(end)
    min_test = min(state.min_test_error, final_test) if cfg.test_every and final_test is not None else None
    last_val = curves.get("val_error", [(None, None)])[-1][1]
    return TrainResult(
        steps=end,
        final_test_error=final_test,
        final_val_error=last_val,
        best_val_step=state.best_step,
        best_val_error=state.best_val_error,
        best_val_test_error=best_test,
        min_test_error=min_test,
        seconds=state.seconds,
        curves=curves,
        status=status,
        stop_reason=reason,
    )


def _show_eval(bar, progress, shown: dict[str, str], postfix, step: int, total: int, val_error, val_loss,
               seconds: float) -> None:
    """A validation check: into the bar's postfix (``progress=True``), or one line on stderr
    (``progress=False``)."""
    shown.pop("val error", None)
    shown.pop("val loss", None)
    if val_error is not None:
        shown["val error"] = f"{100 * val_error:.2f}%"
    else:
        shown["val loss"] = f"{val_loss:.4f}"
    if progress:
        bar.update(step - bar.n)  # (the count otherwise moves every 50 iterations)
        bar.set_postfix(**shown, **(postfix or {}))
    elif progress is not None:
        items = [f"{k} {v}" for k, v in shown.items() if k != "acc"] + [f"{k} {v}" for k, v in (postfix or {}).items()]
        print(f"step {step}/{total}  " + "  ".join(items) + f"  ({seconds:.1f} s)", file=sys.stderr, flush=True)


class _Running:
    """Training loss and error summed on the device, read (one sync) every 50 iterations; the
    error is None for outputs without logits or batches without targets."""

    def __init__(self):
        self.loss, self.wrong, self.n, self.batches, self.judged = 0.0, 0, 0, 0, True

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that the first average logged after a resume covers the same
        iterations as in an uninterrupted run."""
        return {"loss": self.loss, "wrong": self.wrong, "n": self.n, "batches": self.batches, "judged": self.judged}

    @classmethod
    def from_state(cls, saved: dict[str, Any] | None) -> "_Running":
        running = cls()
        if saved:  # (checkpoints written before this was kept have none: the first average is short)
            running.loss, running.wrong = saved["loss"], saved["wrong"]
            running.n, running.batches, running.judged = saved["n"], saved["batches"], saved["judged"]
        return running

    def add(self, loss: torch.Tensor, logits: torch.Tensor | None, targets: torch.Tensor | None, n: int,
            parallel=None) -> None:
        """One step's loss and errors; with ``parallel`` (one rank of a data-parallel run), those of
        the whole global batch: the ranks' slice losses averaged and their errors summed (one small
        all-reduce, no synchronisation with the host), so that every rank, and the checkpoint rank
        0 writes, holds what one process would."""
        judged = logits is not None and targets is not None
        wrong = (logits.detach().argmax(-1) != targets).sum() if judged else None
        if parallel is not None:
            count = wrong if judged else torch.zeros((), device=loss.device)
            both = parallel.all_sum(torch.stack([loss.float(), count.float()]))
            loss, wrong, n = both[0] / parallel.world, both[1], n * parallel.world
        self.loss = loss + self.loss
        if not judged:
            self.judged = False
        else:
            self.wrong = wrong + self.wrong
        self.n += n
        self.batches += 1

    def pop(self) -> tuple[float, float | None]:
        out = float(self.loss) / max(self.batches, 1), (float(self.wrong) / max(self.n, 1) if self.judged else None)
        self.__init__()
        return out


def handover_state(cfg: TrainConfig, model: nn.Module, step: int, total: int, *, seed: int, seconds: float,
                   momentum_buffers: dict[str, torch.Tensor] | None = None, running: dict[str, Any] | None = None,
                   best_step: int | None = None, best_val_error: float | None = None,
                   best_model: dict[str, torch.Tensor] | None = None,
                   min_test_error: float = math.inf) -> dict[str, Any]:
    """The checkpoint :func:`train` would have written at ``step`` for a run of ``cfg`` (``total``
    iterations, seeded with ``seed``) that another trainer took there: ``model`` holding the
    weights, ``momentum_buffers`` (parameter name -> SGD's momentum buffer) the optimizer's
    state, ``running`` the training-loss accumulator (``_Running.state``; None: empty), and the
    best validation check so far. The structure is ``_State.snapshot``'s, built from a real
    optimizer and schedule, so that :func:`train` resumes the run from it as from its own.

    Why: a study's packed trials (:mod:`sparsetrain.study.packed`) train outside this loop; a
    worker killed mid-pack leaves these checkpoints, and each trial's retry resumes through this
    loop instead of starting over. Only what that trainer does is covered: SGD (momentum state
    only) and no draws from torch's global generator (its state is the one ``seed`` sets, as here
    where nothing draws from it)."""
    optimizer = build_optimizer(model.parameters(), cfg)
    if cfg.momentum != 0 and step > 0:  # torch.optim.SGD keeps a buffer only with momentum, from its first step
        for name, p in model.named_parameters():
            optimizer.state[p]["momentum_buffer"] = momentum_buffers[name].detach().clone()
    schedule = build_schedule(optimizer, cfg, total)
    lr = [base * f(step) for base, f in zip(schedule.base_lrs, schedule.lr_lambdas)]
    saved = schedule.state_dict()
    schedule.load_state_dict({**saved, "last_epoch": step, "_step_count": step + 1, "_last_lr": lr})
    for group, value in zip(optimizer.param_groups, lr):
        group["lr"] = value
    state = _State(seconds=seconds, best_step=best_step, best_val_error=best_val_error, best_model=best_model,
                   min_test_error=min_test_error)
    snapshot = state.snapshot(step, model, optimizer, schedule, _Running.from_state(running))
    generator = torch.Generator()
    generator.manual_seed(seed)
    snapshot["rng"] = generator.get_state()
    return snapshot


@dataclass
class _State:
    step: int = 0
    seconds: float = 0.0
    best_step: int | None = None
    best_val_error: float | None = None
    best_model: dict[str, torch.Tensor] | None = None
    min_test_error: float = math.inf

    def consider_best(self, step: int, val_error: float, model: nn.Module) -> None:
        if self.best_val_error is None or val_error < self.best_val_error:
            self.best_step, self.best_val_error = step, val_error
            self.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}

    running: dict[str, Any] | None = None  # the training loss/error accumulator (_Running.state)

    def snapshot(self, step: int, model, optimizer, schedule, running: "_Running") -> dict[str, Any]:
        return {
            "running": running.state(),
            "step": step,
            "seconds": self.seconds,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "best_step": self.best_step,
            "best_val_error": self.best_val_error,
            "best_model": self.best_model,
            "min_test_error": self.min_test_error,
            "rng": torch.get_rng_state(),
        }

    @classmethod
    def restore(cls, saved: dict[str, Any], model, optimizer, schedule) -> "_State":
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["rng"])
        return cls(
            step=saved["step"],
            seconds=saved["seconds"],
            best_step=saved["best_step"],
            best_val_error=saved["best_val_error"],
            best_model=saved["best_model"],
            min_test_error=saved["min_test_error"],
            running=saved.get("running"),
        )
