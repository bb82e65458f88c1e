"""The one training loop. It knows nothing of masks beyond an after-backward / after-step hook.

    >>> from sparsetrain import RunConfig, create_loaders, create_model, train  # doctest: +SKIP
    >>> result = train(model, loaders, TrainConfig(iterations=1000), hooks=[GradientMask(model, mask)])

Resumable: with ``checkpoint_path`` the loop saves model, optimizer, schedule, best-validation
state and RNG every ``checkpoint_every`` iterations, and starts from that file when it exists;
the batches come from a stream indexed by iteration, so a resumed run ends bit for bit where an
uninterrupted one would (on CPU).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import SparsetrainError
from .optim import build_optimizer, build_schedule, total_iterations


class Hook(Protocol):
    def after_backward(self) -> None: ...
    def after_step(self) -> None: ...


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

    def as_results(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "curves"}
        out["test_error_final"] = out.pop("final_test_error")
        out["test_error_best_val"] = out.pop("best_val_test_error")
        out["test_error_min_over_checks"] = out.pop("min_test_error")
        return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn=F.cross_entropy) -> tuple[float, float]:
    """(error, mean loss) of ``model`` over ``loader``, in inference mode."""
    was_training = model.training
    model.eval()
    wrong, loss_sum, n = 0, 0.0, 0
    for x, y in loader:
        out = model(x)
        loss_sum += float(loss_fn(out, y, reduction="sum"))
        wrong += int((out.argmax(1) != y).sum())
        n += y.numel()
    model.train(was_training)
    return wrong / n, loss_sum / n


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
    loss_fn=F.cross_entropy,
    postfix: dict[str, str] | None = None,
) -> TrainResult:
    """Train ``model`` on ``loaders.train`` for ``cfg``'s length; evaluate on ``loaders.val``
    every ``cfg.val_every`` iterations and on ``loaders.test`` at the end (final model and best
    validation checkpoint). ``on_metrics(step, {...})`` receives every measured value."""
    from ..state_io import load_state, save_state

    total = total_iterations(cfg, loaders.train.steps_per_epoch)
    optimizer = build_optimizer(model.parameters(), cfg)
    schedule = build_schedule(optimizer, cfg, total)
    state = _State()
    torch.manual_seed(seed)
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        state = _State.restore(load_state(checkpoint_path), model, optimizer, schedule)
    curves: dict[str, list[tuple[int, float]]] = {}

    def record(step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            curves.setdefault(k, []).append((step, v))
        if on_metrics is not None:
            on_metrics(step, values)

    def checkpoint(step: int) -> None:
        if checkpoint_path is not None:
            save_state(checkpoint_path, state.snapshot(step, model, optimizer, schedule))

    started = time.perf_counter() - state.seconds
    bar = tqdm(total=total, initial=state.step, disable=not progress, dynamic_ncols=True, leave=False)
    running = _Running()
    model.train()
    stream = loaders.train.iter_from(state.step)
    for step in range(state.step + 1, total + 1):
        x, y = next(stream)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        for h in hooks:
            h.after_backward()
        optimizer.step()
        for h in hooks:
            h.after_step()
        schedule.step()
        running.add(loss.detach(), (out.detach().argmax(1) != y).sum(), y.numel())

        if step % 50 == 0 or step == total:
            train_loss, train_error = running.pop()
            if not math.isfinite(train_loss):
                raise SparsetrainError(
                    f"training diverged at iteration {step}: the loss is {train_loss}. The last "
                    "checkpoint is kept; lower the learning rate or check the data for NaN/inf."
                )
            record(step, {"train_loss": train_loss, "train_error": train_error, "lr": schedule.get_last_lr()[0]})
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{1 - train_error:.3f}", **(postfix or {}))
            bar.update(step - bar.n)
        if loaders.val is not None and (step == total or (cfg.val_every and step % cfg.val_every == 0)):
            val_error, val_loss = evaluate(model, loaders.val, loss_fn)
            record(step, {"val_error": val_error, "val_loss": val_loss})
            state.consider_best(step, val_error, model)
        if cfg.test_every and step % cfg.test_every == 0 and step != total:
            test_error, _ = evaluate(model, loaders.test, loss_fn)
            record(step, {"test_error": test_error})
            state.min_test_error = min(state.min_test_error, test_error)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != total:
            state.seconds = time.perf_counter() - started
            checkpoint(step)
    bar.close()

    final_test, final_loss = evaluate(model, loaders.test, loss_fn)
    record(total, {"test_error": final_test, "test_loss": final_loss})
    best_test = None
    if state.best_model is not None:
        final_weights = copy.deepcopy(model.state_dict())
        model.load_state_dict(state.best_model)
        best_test, _ = evaluate(model, loaders.test, loss_fn)
        model.load_state_dict(final_weights)
    state.seconds = time.perf_counter() - started
    checkpoint(total)
    min_test = min(state.min_test_error, final_test) if cfg.test_every else None
    last_val = curves.get("val_error", [(None, None)])[-1][1]
    return TrainResult(
        steps=total,
        final_test_error=final_test,
        final_val_error=last_val,
        best_val_step=state.best_step,
        best_val_error=state.best_val_error,
        best_val_test_error=best_test,
        min_test_error=min_test,
        seconds=state.seconds,
        curves=curves,
    )


class _Running:
    """Training loss and error summed on the device, read (one sync) every 50 iterations."""

    def __init__(self):
        self.loss, self.wrong, self.n, self.batches = 0.0, 0, 0, 0

    def add(self, loss: torch.Tensor, wrong: torch.Tensor, n: int) -> None:
        self.loss = loss + self.loss
        self.wrong = wrong + self.wrong
        self.n += n
        self.batches += 1

    def pop(self) -> tuple[float, float]:
        out = float(self.loss) / max(self.batches, 1), float(self.wrong) / max(self.n, 1)
        self.__init__()
        return out


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

    def snapshot(self, step: int, model, optimizer, schedule) -> dict[str, Any]:
        return {
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
        )
