"""One run: prune at initialization, train, test, and record everything in the run store.

    >>> from sparsetrain import RunConfig, run
    >>> config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(train={"iterations": 20})
    >>> outcome = run(config, store=None, progress=False)
    >>> outcome.status, round(outcome.results["sparsity"], 2)
    ('finished', 0.95)

A run is identified by ``config.key()``. Running a finished config again returns the recorded
outcome without training (``force=True`` starts over); an interrupted run resumes from its mask
and last checkpoint and ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .errors import SparsetrainError
from .masks import Mask, load_mask, save_mask
from .pipeline import (  # noqa: F401  (DENSE, EXECUTIONS, validate, layer_table: part of this module's API)
    DENSE, EXECUTIONS, build, find_mask, init_under_mask, layer_table, overall, pruning_batches, train_stage, validate,
)
from .store import TERMINAL_STATUSES, RunStore
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
) -> RunOutcome:
    """Prune, train and test as ``config`` says; record in ``store`` (``None``: no record).

    ``mask``: train with this mask instead of pruning (``sparsetrain train --mask FILE``); the
    run's identity then includes the mask's content. ``group``: the study or experiment the run
    belongs to (``("experiment", "snip-table1")``); ``parent``: the key of the run it continues
    (a pruning round, a rewind point). ``callbacks``: see :class:`sparsetrain.train.loop.Callback`."""
    validate(config)
    if isinstance(store, (str, Path)):
        store = RunStore(default_store_root() if store == "default" else store)
    key = config.key() if mask is None else _combined_key(config, mask)
    if store is not None:
        record = store.get(key)
        if record is not None and record.status in TERMINAL_STATUSES and not force:
            return RunOutcome(key, config, record.results, record.layer_sparsity or {}, reused=True, status=record.status)
        if record is not None and force:
            store.delete(key)
        store.begin(key, config.to_dict(), config.seed, name=config.name, group=group, parent=parent)
    try:
        outcome = _execute(config, key, store, data_dir, device, progress, download, mask, callbacks)
    except BaseException as err:
        if store is not None:
            store.fail(key, f"{type(err).__name__}: {err}")
        raise
    return outcome


def _combined_key(config: RunConfig, mask: Mask) -> str:
    digest = hashlib.sha256(config.key().encode())
    for name in sorted(mask):
        digest.update(name.encode())
        digest.update(mask[name].to(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _execute(config, key, store, data_dir, device, progress, download, given_mask, callbacks) -> RunOutcome:
    built = build(config, data_dir=data_dir, device=device, download=download)
    folder = store.artifact_dir(key) if store is not None else None

    started = time.perf_counter()
    mask_file = folder / "mask.safetensors" if folder is not None else None
    if given_mask is not None:
        mask = given_mask
    elif mask_file is not None and mask_file.exists():
        mask = load_mask(mask_file, built.model)  # resuming: the mask was found before the interruption
    else:
        mask = find_mask(config, built)
    if mask_file is not None and mask is not None and not mask_file.exists():
        save_mask(mask_file, mask, {"key": key, "method": config.prune.method})
    prune_seconds = time.perf_counter() - started

    layers = layer_table(mask, built.model)
    model, hooks = init_under_mask(config, built, mask)
    on_metrics = (lambda step, values: store.log_metrics(key, step, values)) if store is not None else None
    result = train_stage(config, built, model, hooks, mask, progress=progress, on_metrics=on_metrics,
                         checkpoint_path=folder / "checkpoint.safetensors" if folder is not None else None,
                         callbacks=callbacks)
    results = result.as_results() | {"sparsity": overall(mask), "device": str(built.device)}
    timings = {"prune_seconds": prune_seconds, "train_seconds": result.seconds}
    if store is not None:
        store.finish(key, results, layer_sparsity=layers, timings=timings, status=result.status)
    return RunOutcome(key, config, results, layers, reused=False, status=result.status)
