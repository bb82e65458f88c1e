"""One run: prune at initialization, train, test, and record everything in the run store.

    >>> from sparsetrain import RunConfig, run
    >>> config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(train={"iterations": 20})
    >>> outcome = run(config, store=None, progress=False)
    >>> outcome.status, round(outcome.results["sparsity"], 2)
    ('finished', 0.95)

A run is identified by ``config.key()``. Running a finished config again returns the recorded
outcome without training (``force=True`` starts over); an interrupted run resumes from its mask
and last checkpoint and ends with the same result as an uninterrupted one.

One run trains once: while it trains, the process holds the run's lease in the store
(:meth:`RunStore.take_lease`), so the same config started again elsewhere is refused with the
holder's pid and host (or, with ``wait=True``, waits and returns what the holder recorded). Ctrl-C
and SIGTERM end it as 'interrupted' (resumable); an error ends it as 'failed' (resumable too).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .errors import SparsetrainError
from .masks import Mask, load_mask, save_mask
from .pipeline import (  # noqa: F401  (DENSE, EXECUTIONS, validate, layer_table: part of this module's API)
    AFTER_TRAINING, DENSE, EXECUTIONS, build, find_mask, init_under_mask, layer_table, overall, pruning_batches,
    resolve_device, train_stage, validate,
)
from .state_io import save_state
from .store import TERMINAL_STATUSES, HeldLease, RunStatus, RunStore
from .train.loop import Callback


def default_store_root() -> Path:
    """``$SPARSETRAIN_HOME`` or ``./sparsetrain-runs``."""
    return Path(os.environ.get("SPARSETRAIN_HOME", "sparsetrain-runs"))


@dataclass
class RunOutcome:
    key: str
    config: RunConfig
    results: dict[str, Any]
    layer_sparsity: dict[str, dict[str, Any]]
    reused: bool  # True when the store already held the finished run
    status: str = "finished"  # or "stopped" (a callback or goal stopped it) or "infeasible" (diverged)


def run(
    config: RunConfig,
    *,
    store: RunStore | str | Path | None = "default",
    data_dir: str | Path | None = None,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
    download: bool = True,
    mask: Mask | None = None,
    group: Any = None,
    parent: str | None = None,
    callbacks: list[Callback] = (),
    wait: bool = False,
    parallel=None,
) -> RunOutcome:
    """Prune, train and test as ``config`` says; record in ``store`` (``None``: no record).

    ``mask``: train with this mask instead of pruning (``sparsetrain train --mask FILE``); the
    run's identity then includes the mask's content, and its record says what was trained: the
    mask's method (``mask.metadata["method"]``, else "external") and real sparsity in the config's
    ``prune`` section, and ``mask`` (source file, sha256, model). ``group``: the study or
    experiment the run belongs to (``("experiment", "snip-table1")``); ``parent``: the key of the
    run it continues (a pruning round, a rewind point). ``callbacks``: see
    :class:`sparsetrain.train.loop.Callback`.

    Raises SparsetrainError if another process is training the same run (same key) now, unless
    ``wait``: then waits until it ends and returns its recorded outcome (or, if it died or failed,
    takes the run over and resumes it).

    ``parallel``: this process is one rank of a data-parallel run
    (:class:`sparsetrain.distributed.Ranks`, given by :func:`sparsetrain.distributed.run_rank`;
    use :func:`sparsetrain.distributed.run_ddp` to start one): rank 0 passes the store, the
    others ``store=None``. The key is the same as in one process, unless the model trains
    differently in several (dropout; batch norm on CPU): :func:`sparsetrain.distributed.run_key`."""
    validate(config)
    resolve_device(device)  # a wrong --device is refused before anything is recorded
    if isinstance(store, (str, Path)):
        store = RunStore(default_store_root() if store == "default" else store)
    if mask is None and config.prune.method in AFTER_TRAINING:
        # lwc, lottery: a dense parent run and pruning rounds as child runs (posttrain arranges
        # runs of this module, so it is imported where it is used)
        from .posttrain import run_after_training

        return run_after_training(config, store=store, data_dir=data_dir, device=device, force=force,
                                  progress=progress, download=download, group=group, parent=parent,
                                  callbacks=callbacks, wait=wait)
    key = run_key(config, mask) if parallel is None else parallel.run_key(config, run_key(config, mask))
    config, recorded = what_is_trained(config, mask)
    return run_recorded(config, key, recorded, store=store, data_dir=data_dir, device=device, force=force,
                        progress=progress, download=download, mask=mask, group=group, parent=parent,
                        callbacks=callbacks, wait=wait, parallel=parallel)


#: A run's checkpoint in its artifact folder: what an interrupted run resumes from.
CHECKPOINT_FILE = "checkpoint.safetensors"


def run_key(config: RunConfig, mask: Mask | None = None) -> str:
    """The key :func:`run` records ``config`` under: ``config.key()``, combined with the mask's
    content when a mask is given."""
    return config.key() if mask is None else combined_key(config, mask)


def run_recorded(
    config: RunConfig,
    key: str,
    recorded: dict[str, Any],
    *,
    store: RunStore | None,
    data_dir: str | Path | None = None,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
    download: bool = True,
    mask: Mask | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    keep: tuple[int, ...] = (),
    group: Any = None,
    parent: str | None = None,
    callbacks: list[Callback] = (),
    wait: bool = False,
    parallel=None,
) -> RunOutcome:
    """:func:`run` under a ``key`` and ``recorded`` config the caller chose: the step that
    arranges runs of its own (:mod:`sparsetrain.posttrain`: a pruning round trains ``mask`` from
    ``weights``, a state dict of the model, instead of the config's init). ``keep``: iterations
    whose weights the run writes beside its checkpoint as ``weights-<k>.safetensors`` (k = 0:
    before the first step), the rewind points a child run starts from."""
    if store is None:
        return _execute(config, key, None, data_dir, device, progress, download, mask, callbacks, None,
                        weights, keep, parallel)
    record = store.get(key)
    if record is not None and record.status in TERMINAL_STATUSES and not force:
        return _reused(key, config, record)
    lease = store.take_lease(key, wait=wait)  # before any work: one run trains once
    try:
        record = store.get(key)  # the holder we waited for may have finished it
        if record is not None and record.status in TERMINAL_STATUSES and not force:
            return _reused(key, config, record)
        if record is not None and force:
            store.delete(key)
        store.begin(key, recorded, config.seed, name=config.name, group=group, parent=parent)
        try:
            with _sigterm_as_interrupt():
                return _execute(config, key, store, data_dir, device, progress, download, mask, callbacks,
                                lease, weights, keep, parallel)
        except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM: an outside stop, resumable
            _record_end(store, lease, key, f"{type(err).__name__}: {err}", RunStatus.INTERRUPTED)
            raise
        except BaseException as err:
            _record_end(store, lease, key, f"{type(err).__name__}: {err}", RunStatus.FAILED)
            raise
    finally:
        with contextlib.suppress(SparsetrainError):  # e.g. a full disk: the row then reads as stale
            lease.release()


def _reused(key: str, config: RunConfig, record) -> RunOutcome:
    return RunOutcome(key, config, record.results, record.layer_sparsity or {}, reused=True, status=record.status)


def recorded_outcome(store: RunStore, key: str, config: RunConfig, mask: Mask | None = None) -> RunOutcome | None:
    """What :func:`run` returns without training when ``store`` holds ``key`` finished (a
    terminal status); None otherwise. (A data-parallel run asks this before starting processes.)"""
    record = store.get(key)
    if record is None or record.status not in TERMINAL_STATUSES:
        return None
    return _reused(key, what_is_trained(config, mask)[0], record)


def _record_end(store: RunStore, lease: HeldLease, key: str, error: str, status: str) -> None:
    """Record how the run ended, unless another process took it over (then it is theirs to record).
    If the store cannot be written (a full disk) the original error is the one worth raising; the
    run stays 'running' with a lease that reads as stale, i.e. interrupted and resumable."""
    if lease.lost is not None:
        return
    with contextlib.suppress(SparsetrainError):
        store.fail(key, error, status=status)


class Terminated(KeyboardInterrupt):
    """SIGTERM received while training: ends the run as 'interrupted', like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` (only in the main thread, and only if
    nobody installed a SIGTERM handler of their own)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        raise Terminated("SIGTERM: the run is kept and resumes from its last checkpoint when started again")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def what_is_trained(config: RunConfig, mask: Mask | None) -> tuple[RunConfig, dict[str, Any]]:
    """The config as it describes the trained network, and the dict recorded in the store.

    With a given mask, the config's pruning defaults say nothing true: the method comes from the
    mask file's metadata ("external" where it does not say) and the sparsity is the mask's own;
    the record also says which file (source, sha256, model). The run key is not changed by this.
    """
    if mask is None:
        return config, config.to_dict()
    metadata = dict(getattr(mask, "metadata", None) or {})
    method, sparsity = metadata.get("method") or "external", overall(mask)
    record = config.to_dict()
    record["prune"] = {**record["prune"], "method": method, "sparsity": sparsity}
    record["mask"] = {k: metadata[k] for k in ("source", "sha256", "model", "method", "sparsity") if k in metadata}
    return config.replace(prune={"method": method, "sparsity": sparsity}), record


def combined_key(config: RunConfig, mask: Mask) -> str:
    """The key of ``config`` trained under a given ``mask``: its key hashed with the mask's names
    and bits, so that one config under two masks is two runs."""
    digest = hashlib.sha256(config.key().encode())
    for name in sorted(mask):
        digest.update(name.encode())
        digest.update(mask[name].to(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _execute(config, key, store, data_dir, device, progress, download, given_mask, callbacks, lease,
             weights=None, keep=(), parallel=None) -> RunOutcome:
    built = build(config, data_dir=data_dir, device=device, download=download)
    if weights is not None:  # a pruning round after training: the parent's weights, not the init
        built.model.load_state_dict(weights)
    folder = store.artifact_dir(key) if store is not None else None

    started = time.perf_counter()
    mask_file = folder / "mask.safetensors" if folder is not None else None

    def resumed_mask() -> Mask | None:
        if mask_file is None or not mask_file.exists():
            return None
        try:  # resuming: the mask was found before the interruption
            return load_mask(mask_file, built.model)
        except SparsetrainError as err:
            raise SparsetrainError(f"run {key} cannot resume: {err}. Its own mask is made again by starting "
                                   "the run over: add --force (force=True in the API)") from err

    if given_mask is not None:
        mask = given_mask
    else:  # data parallel: rank 0's store says whether the run resumes, and its mask file is sent to all
        mask = resumed_mask() if parallel is None else parallel.from_writer(resumed_mask)
        if mask is None:
            mask = find_mask(config, built, parallel)
    if parallel is not None:
        parallel.check_same_mask(mask)
    if mask_file is not None and mask is not None and not mask_file.exists():
        save_mask(mask_file, mask, {"key": key, "method": config.prune.method, "model": config.model},
                  model=built.model)
    prune_seconds = time.perf_counter() - started

    layers = layer_table(mask, built.model, built.loaders.input_shape)
    model, hooks = init_under_mask(config, built, mask)
    checkpoint = folder / CHECKPOINT_FILE if folder is not None else None
    if keep and folder is not None:
        callbacks = [*callbacks, KeepWeights(model, folder, keep)]
        if 0 in keep and not checkpoint.exists():  # iteration 0: the weights before any step
            KeepWeights(model, folder, (0,)).on_step(0, None)
    on_metrics = None
    if store is not None:
        def on_metrics(step, values):
            lease.check()  # taken over by another process: stop before writing anything of theirs
            store.log_metrics(key, step, values)
    result = train_stage(config, built, model, hooks, mask, progress=progress, on_metrics=on_metrics,
                         checkpoint_path=checkpoint, callbacks=callbacks, parallel=parallel)
    results = result.as_results() | {"sparsity": overall(mask), "device": str(built.device)}
    if parallel is not None:  # environment, like the device (in the key only where it changes the result)
        results["nproc"] = parallel.world
    if built.isometry is not None:  # prune.isometry: what approximate isometry did (small: sums, per-layer penalty)
        results["isometry"] = built.isometry
    if built.kept_fan_in is not None:  # prune.kept_fan_in: the gains applied
        results["kept_fan_in"] = built.kept_fan_in
    timings = {"prune_seconds": prune_seconds, "train_seconds": result.seconds}
    if store is not None:
        lease.check()
        store.finish(key, results, layer_sparsity=layers, timings=timings, status=result.status)
    return RunOutcome(key, config, results, layers, reused=False, status=result.status)


def kept_weights_path(folder: Path, step: int) -> Path:
    """Where a run keeps its weights at iteration ``step`` (see :class:`KeepWeights`)."""
    return Path(folder) / f"weights-{step}.safetensors"


class KeepWeights(Callback):
    """Writes the model's state dict at the given iterations (after that iteration's step) to
    :func:`kept_weights_path` in ``folder``: the rewind points of a lottery ticket, kept by the
    dense run they rewind to, once."""

    def __init__(self, model: torch.nn.Module, folder: Path, steps: tuple[int, ...]):
        self.model, self.folder, self.steps = model, Path(folder), set(steps)

    def on_step(self, step: int, loss: torch.Tensor | None) -> str | None:
        if step in self.steps:
            save_state(kept_weights_path(self.folder, step), {"model": self.model.state_dict()})
        return None
