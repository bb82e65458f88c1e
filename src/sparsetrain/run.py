"""One run: prune at initialization, train, test, and record everything in the run store.

    >>> from sparsetrain import RunConfig, run  # doctest: +SKIP
    >>> outcome = run(RunConfig(model="lenet-300-100", dataset="mnist").replace(train={"epochs": 1}))
    >>> outcome.results["test_error_final"]

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
from .data import DATASETS, create_loaders
from .errors import SparsetrainError
from .init import INITS, initialize_
from .masks import GradientMask, Mask, apply_mask_, load_mask, mask_summary, overall_sparsity, save_mask
from .models import MODELS, create_model
from .pruning import METHODS, prune_at_init
from .pruning.select import SCOPES, check_sparsity
from .pruning.structured import parse_structure, structured_sparsity
from .store import RunStore
from .train.loop import resolve_device, train
from .train.optim import OPTIMIZERS, SCHEDULES

DENSE = "dense"  # the method name for the unpruned reference network
EXECUTIONS = ("dense", "sparse")  # TrainConfig.execution


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


def validate(config: RunConfig, training: bool = True) -> None:
    """Fail fast, before any data is read, on names and values that cannot work."""
    MODELS.get(config.model)
    DATASETS.get(config.dataset)
    INITS.get(config.init)
    if config.prune.method != DENSE:
        METHODS.get(config.prune.method)
        check_sparsity(config.prune.sparsity)
    structure = parse_structure(config.prune.structure)  # a "dense" run ignores it
    if structure is not None and config.prune.method != DENSE:
        structured_sparsity(structure, config.prune.sparsity)  # N:M fixes it at 1 - N/M
    if config.prune.reinit:
        INITS.get(config.prune.reinit)
    if config.prune.scope not in SCOPES:
        raise SparsetrainError(f"unknown scope {config.prune.scope!r}; choose one of {', '.join(SCOPES)}")
    if config.prune.batches < 0:
        raise SparsetrainError("prune.batches must be >= 0 (0 scores the whole training split)")
    if training and (config.train.iterations > 0) == (config.train.epochs > 0):
        raise SparsetrainError(
            "give the training length as exactly one of train.iterations or train.epochs "
            f"(got iterations={config.train.iterations}, epochs={config.train.epochs})"
        )
    OPTIMIZERS.get(config.train.optimizer)
    SCHEDULES.get(config.train.schedule)
    if config.train.execution not in EXECUTIONS:
        raise SparsetrainError(
            f"unknown execution {config.train.execution!r}; choose one of {', '.join(EXECUTIONS)} "
            "(sparse: pruned Linear layers compute on their kept weights only)"
        )


def pruning_batches(loaders, count: int):
    """The first ``count`` training batches, or one whole epoch of the training split for 0."""
    stream = loaders.train.iter_from(0)
    n = loaders.train.steps_per_epoch if count == 0 else count
    return (next(stream) for _ in range(n))


def find_mask(config: RunConfig, model: torch.nn.Module, loaders) -> Mask | None:
    p = config.prune
    if p.method == DENSE:
        return None
    return prune_at_init(
        model,
        p.method,
        sparsity=p.sparsity,
        batches=pruning_batches(loaders, p.batches),
        include_biases=p.include_biases,
        scope=p.scope,
        seed=config.seed,
        structure=p.structure,
    )


def layer_table(mask: Mask | None, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    if mask is None:
        return {n: {"shape": list(p.shape), "kept": p.numel(), "total": p.numel(), "sparsity": 0.0}
                for n, p in model.named_parameters()}
    return {r.name: {"shape": list(r.shape), "kept": r.kept, "total": r.total, "sparsity": r.sparsity}
            for r in mask_summary(mask)}


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
) -> RunOutcome:
    """Prune, train and test as ``config`` says; record in ``store`` (``None``: no record).

    ``mask``: train with this mask instead of pruning (``sparsetrain train --mask FILE``); the
    run's identity then includes the mask's content."""
    validate(config)
    if isinstance(store, (str, Path)):
        store = RunStore(default_store_root() if store == "default" else store)
    key = config.key() if mask is None else _combined_key(config, mask)
    if store is not None:
        record = store.get(key)
        if record is not None and record.status == "finished" and not force:
            return RunOutcome(key, config, record.results, record.layer_sparsity or {}, reused=True)
        if record is not None and force:
            store.delete(key)
        store.begin(key, config.to_dict(), config.seed, name=config.name)
    try:
        outcome = _execute(config, key, store, data_dir, resolve_device(device), progress, download, mask)
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


def _execute(config, key, store, data_dir, device, progress, download, given_mask) -> RunOutcome:
    t = config.train
    loaders = create_loaders(
        config.dataset, batch_size=t.batch_size, data_dir=data_dir, download=download,
        val_fraction=t.val_fraction, split_seed=t.split_seed, shuffle_seed=config.seed, device=device,
    )
    model = create_model(config.model, input_shape=loaders.input_shape, num_classes=loaders.num_classes).to(device)
    initialize_(model, config.init, config.seed)
    folder = store.artifact_dir(key) if store is not None else None

    started = time.perf_counter()
    mask_file = folder / "mask.safetensors" if folder is not None else None
    if given_mask is not None:
        mask = given_mask
    elif mask_file is not None and mask_file.exists():
        mask = load_mask(mask_file, model)  # resuming: the mask was found before the interruption
    else:
        mask = find_mask(config, model, loaders)
    if mask_file is not None and mask is not None and not mask_file.exists():
        save_mask(mask_file, mask, {"key": key, "method": config.prune.method})
    prune_seconds = time.perf_counter() - started

    if config.prune.reinit:
        initialize_(model, config.prune.reinit, config.seed + 1)  # snip-public's separate weights
    hooks = []
    if mask is not None:
        mask = {n: m.to(device) for n, m in mask.items()}
        apply_mask_(model, mask)
        if t.execution == "sparse":
            from .sparse.training import sparsify_for_training_

            # pruned Linear layers hold only their kept weights; the other masked parameters
            # (conv, recurrent, ... and pruned biases) are still masked by GradientMask
            model = sparsify_for_training_(model, mask)
            remaining = dict(model.named_parameters())
            dense_mask = {n: m for n, m in mask.items() if n in remaining}
        else:
            dense_mask = mask
        if dense_mask:
            hooks.append(GradientMask(model, dense_mask))
    sparsity = overall_sparsity(mask) if mask is not None else 0.0
    layers = layer_table(mask, model)

    on_metrics = (lambda step, values: store.log_metrics(key, step, values)) if store is not None else None
    result = train(
        model, loaders, t, hooks=hooks, seed=config.seed,
        checkpoint_path=folder / "checkpoint.safetensors" if folder is not None else None,
        on_metrics=on_metrics, progress=progress, postfix={"sparsity": f"{sparsity:.3f}"},
    )
    results = result.as_results() | {"sparsity": sparsity, "device": str(device)}
    timings = {"prune_seconds": prune_seconds, "train_seconds": result.seconds}
    if store is not None:
        store.finish(key, results, layer_sparsity=layers, timings=timings)
    return RunOutcome(key, config, results, layers, reused=False)
