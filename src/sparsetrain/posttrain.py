"""Pruning after training as runs: a dense parent run, then one child run per pruning round.

``prune.method = "lwc"`` (Han et al. 2015) and ``"lottery"`` (Frankle & Carbin 2019) are not masks
found at initialization but an arrangement of the pipeline's stages over several recorded runs
(:func:`sparsetrain.run` hands them here):

1. **the dense parent**: the same config with method ``dense`` (sparsity 0, no options, one round,
   global scope: so the dense row of the same recipe *is* this run, reused from the store when it is
   recorded, never retrained). A lottery parent also writes its weights at the rewind iteration
   (``weights-<k>.safetensors`` beside its checkpoint).
2. **a round** (a child run, its ``parent`` the previous round's run, the first round's the dense
   run): the mask keeps the largest |w| of the previous run's final weights at the round's sparsity
   (:func:`sparsetrain.pruning.after_training.magnitude_mask`: exact top-kappa with ``prune.scope``,
   entries pruned before stay pruned); training starts from the previous run's final weights (lwc)
   or from the dense run's weights at iteration ``rewind`` (lottery), times the mask, and holds the
   mask. The last round is recorded under ``config.key()``, so the config finds its result as any
   run does; an earlier round's key hashes its sparsity with its parent's key (the chain is its
   identity, so lottery chains to 90% and to 95% share their first rounds).

Every run is resumable on its own: started again, the finished runs are reused and the first
unfinished one resumes from its checkpoint. ``force=True`` runs the rounds again, never the dense
parent. All the runs go in ``group`` (default ``(method, config.key())``). The dense run and the
rounds before the last may be shared with other configs (a table's sparsities all prune one dense
run), so one that another process is training is waited for, never refused.

    >>> import tempfile
    >>> from sparsetrain import RunConfig, run
    >>> from sparsetrain.store import RunStore
    >>> config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(
    ...     prune={"method": "lottery", "sparsity": 0.5}, train={"iterations": 10})
    >>> store = RunStore(tempfile.mkdtemp())
    >>> outcome = run(config, store=store, progress=None)
    >>> outcome.key == config.key(), round(outcome.results["sparsity"], 2)
    (True, 0.5)
    >>> len(store.list())  # the dense parent and four rounds (20%, 36%, 48.8%, 50%)
    5
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .errors import SparsetrainError
from .inspect_run import CHECKPOINT_FILE
from .masks import Mask, prunable_set
from .pipeline import DENSE, build, init_under_mask, train_stage
from .pruning.after_training import (
    after_training_options, after_training_sparsities, check_rewind, magnitude_mask,
)
from .run import RunOutcome, kept_weights_path, run_recorded
from .state_io import load_state, save_state
from .store import TERMINAL_STATUSES, RunStatus, RunStore
from .train.loop import Callback
from .train.optim import total_iterations


def dense_parent(config: RunConfig) -> RunConfig:
    """The dense run an lwc or lottery config prunes: the config with method ``dense``, and the
    settings of how to prune at what a dense recipe holds (sparsity 0, no options, one round,
    global scope), so that lwc at 90% and lottery at 99% prune one dense run. The rest stays as
    given: ``prune.reinit`` changes what the dense run trains, and ``include_biases``, ``batches``
    and ``exclude`` are part of a dense recipe's key (the SNIP recipes' dense rows hold
    ``include_biases = true``), so changing them trains another dense run."""
    return config.replace(prune={"method": DENSE, "sparsity": 0.0, "options": {}, "rounds": 1,
                                 "round_schedule": "exponential", "scope": "global"})


def round_sparsities_of(config: RunConfig) -> list[float]:
    """The sparsity after each round of an lwc or lottery config (the last is ``prune.sparsity``)."""
    p = config.prune
    return after_training_sparsities(p.method, p.sparsity, after_training_options(p.method, p.options),
                                     p.rounds, p.round_schedule)


def run_after_training(config: RunConfig, *, store: RunStore | None, data_dir: str | Path | None = None,
                       device: str | None = None, force: bool = False, progress: bool | None = True,
                       download: bool = True, group: Any = None, parent: str | None = None,
                       callbacks: list[Callback] = (), wait: bool = False) -> RunOutcome:
    """Run ``config`` (method lwc or lottery) as the dense parent and its rounds (see the module
    docstring); return the last round's outcome. ``store=None`` keeps the runs in a temporary
    store (the rounds read their parents' weights from it) that is gone afterwards. ``parent``:
    the dense run's own parent, if any; ``callbacks`` see every run's training."""
    if store is None:
        with tempfile.TemporaryDirectory(prefix="sparsetrain-") as folder:
            return run_after_training(config, store=RunStore(folder), data_dir=data_dir, device=device,
                                      force=force, progress=progress, download=download, group=group,
                                      parent=parent, callbacks=callbacks, wait=wait)
    p = config.prune
    options = after_training_options(p.method, p.options)
    steps = round_sparsities_of(config)
    final = store.get(config.key())
    if final is not None and final.status in TERMINAL_STATUSES and not force:
        return RunOutcome(final.key, config, final.results, final.layer_sparsity or {}, reused=True,
                          status=final.status)
    group = group or (p.method, config.key())
    common = dict(store=store, data_dir=data_dir, device=device, progress=progress, download=download,
                  callbacks=callbacks, group=group)
    dense = dense_parent(config)
    built = build(dense, data_dir=data_dir, device=device, download=download)  # the model the masks cover
    rewind = getattr(options, "rewind", None)
    if rewind is not None:
        check_rewind(rewind, total_iterations(dense.train, built.loaders.train.steps_per_epoch))
    def say(text: str) -> None:  # which run is training now (progress None: worker processes, silent)
        if progress is not None:
            print(f"{p.method}: {text}", file=sys.stderr, flush=True)

    say(f"the dense run {dense.key()} (reused if recorded), then {len(steps)} round(s) to {p.sparsity:.2%} sparsity")
    # The dense run and the rounds before the last are shared (by the sparsities of a table, by
    # lottery chains to several targets): one being trained by another process is waited for.
    outcome = run_recorded(dense, dense.key(), dense.to_dict(), parent=parent,
                           keep=() if rewind is None else (rewind,), wait=True, **common)
    if outcome.status == RunStatus.INFEASIBLE:
        raise SparsetrainError(f"the dense run {outcome.key} diverged (its weights are not finite), so "
                               f"{p.method} has nothing to prune: lower train.lr")
    steps_done = outcome.results.get("steps")
    if rewind is not None and steps_done is not None and steps_done < rewind:
        raise SparsetrainError(f"the dense run {outcome.key} stopped at iteration {steps_done} "
                               f"({outcome.results.get('stop_reason') or outcome.status}), before the rewind point "
                               f"{rewind}: choose a rewind iteration from 0 to {steps_done}")
    start = None if rewind is None else weights_at(store, dense, rewind, data_dir, device, download, progress)

    named, left_out = prunable_set(built.model, p.include_biases, None, list(p.exclude) or None)
    previous_key, previous_mask = dense.key(), None
    for r, sparsity in enumerate(steps, 1):
        trained = final_weights(store, previous_key)
        built.model.load_state_dict(trained)
        mask = Mask(magnitude_mask(named, previous_mask, sparsity, p.scope), left_out=left_out,
                    metadata={"method": p.method})
        label = f"{p.method} round {r}/{len(steps)}"  # after the config's own label (a recipe's name), if any
        stage = round_config(config, sparsity).replace(name=f"{config.name}, {label}" if config.name else label)
        last = r == len(steps)
        key = config.key() if last else _round_key(config, sparsity, previous_key)
        recorded = stage.to_dict() | {"after_training": {
            "round": r, "rounds": len(steps), "dense_run": dense.key(),
            "start": f"iteration {rewind} of the dense run" if rewind is not None else "the parent's final weights",
        }}
        weights = trained if start is None else start
        say(f"round {r}/{len(steps)} at {sparsity:.2%} sparsity: run {key}, parent {previous_key}")
        outcome = run_recorded(stage, key, recorded, mask=mask, weights=weights, parent=previous_key,
                               force=force, wait=wait or not last, **common)
        if outcome.status == RunStatus.INFEASIBLE and not last:
            raise SparsetrainError(f"round {r} of {p.method} ({key}) diverged, so the next round has nothing to "
                                   "prune: lower train.lr")
        previous_key, previous_mask = key, mask
    return RunOutcome(outcome.key, config, outcome.results, outcome.layer_sparsity, outcome.reused, outcome.status)


def round_config(config: RunConfig, sparsity: float) -> RunConfig:
    """The config a round trains with: its sparsity, no fresh draw of weights (they come from the
    parent), and for lwc its options' retraining length and learning rate."""
    options = after_training_options(config.prune.method, config.prune.options)
    train: dict[str, Any] = {"lr": config.train.lr * getattr(options, "lr_factor", 1.0)}
    if getattr(options, "iterations", 0):
        train |= {"iterations": options.iterations, "epochs": 0.0}
    return config.replace(prune={"sparsity": sparsity, "reinit": ""}, train=train)


def _round_key(config: RunConfig, sparsity: float, parent_key: str) -> str:
    """An earlier round's key: its config at its sparsity, and the chain it continues."""
    blob = f"{config.replace(prune={'sparsity': sparsity}).key()}:{parent_key}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def final_weights(store: RunStore, key: str) -> dict[str, torch.Tensor]:
    """The state dict a recorded run ended with (its last checkpoint)."""
    path = store.artifact_dir(key) / CHECKPOINT_FILE
    if not path.is_file():
        raise SparsetrainError(f"run {key} kept no checkpoint ({path} is missing), so its weights cannot be "
                               "pruned: delete the run (sparsetrain runs delete) and run it again")
    return load_state(path)["model"]


class _StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, step: int, loss: torch.Tensor) -> str | None:
        return f"the rewind point, iteration {step}" if step >= self.step else None


def weights_at(store: RunStore, dense: RunConfig, step: int, data_dir=None, device=None, download=True,
               progress: bool | None = True) -> dict[str, torch.Tensor]:
    """The dense run's weights at iteration ``step`` (0: its initialization). The dense run keeps
    them when a lottery run trains it; one recorded before (the dense row of a table) did not, and
    they are made again here: the same seed, batches and schedule replayed for ``step`` iterations
    (the training loop is deterministic on CPU, so these are that run's weights), written beside it
    for the next time."""
    path = kept_weights_path(store.artifact_dir(dense.key()), step)
    if path.is_file():
        return load_state(path)["model"]
    built = build(dense, data_dir=data_dir, device=device, download=download)
    model, hooks = init_under_mask(dense, built, None)
    if step > 0:
        train_stage(dense, built, model, hooks, None, progress=progress, callbacks=[_StopAt(step)])
    weights = model.state_dict()
    save_state(path, {"model": weights})
    return weights
