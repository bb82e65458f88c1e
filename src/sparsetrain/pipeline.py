"""The one pipeline: build (data, model, init) -> find the mask -> initialise under the mask -> train.

Every path that trains a network goes through these stages: :func:`sparsetrain.run` (and so
``sparsetrain run`` and ``sparsetrain train --mask``), ``sparsetrain prune`` (the first two
stages) and every experiment. Each stage is a function of the config and the previous stage's
output, so a new kind of run (a study trial, a pruning round, a rewind) is a new arrangement of
the same stages, never a copy of them.

    >>> from sparsetrain import RunConfig
    >>> from sparsetrain.pipeline import build, find_mask, init_under_mask
    >>> config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(prune={"sparsity": 0.9})
    >>> built = build(config, device="cpu")
    >>> mask = find_mask(config, built)
    >>> model, hooks = init_under_mask(config, built, mask)
    >>> round(float((model[1].weight == 0).float().mean()), 1)
    0.9
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .batches import rebatch
from .config import RunConfig, TrainConfig
from .data import DATASETS, Loaders, create_loaders, dataset_args
from .errors import SparsetrainError
from .init import INITS, initialize_
from .mask_stats import layer_costs
from .masks import GradientMask, Mask, apply_mask_, mask_summary
from .models import MODELS, check_model_args, create_model
from .pruning import METHODS, method_options, prune_at_init, prune_at_levels
from .pruning.after_training import (
    AFTER_TRAINING, after_training_options, after_training_sparsities, check_rewind,
)
from .pruning.rounds import SCHEDULES as ROUND_SCHEDULES
from .pruning.sanity import reinitialize, shuffle_layerwise
from .pruning.select import SCOPES, check_sparsity
from .pruning.structured import parse_structure, structured_sparsity
from .init.kept_fan_in import rescale_kept_fan_in_
from .signal.isometry import approximate_isometry_
from .threads import training_threads
from .train.loop import DIVERGE_CHOICES, Callback, TrainResult, resolve_device, train
from .train.optim import OPTIMIZERS, SCHEDULES

DENSE = "dense"  # the method name for the unpruned reference network
EXECUTIONS = ("dense", "sparse")  # TrainConfig.execution

#: Where the values of a config field named with ``registry=`` come from: the CLI's choices and
#: the validation below both read this one table.
CHOICES: dict[str, Callable[[], list[str]]] = {
    "model": MODELS.list,
    "dataset": DATASETS.list,
    "init": INITS.list,
    "method": lambda: METHODS.list() + list(AFTER_TRAINING) + [DENSE],
    "optimizer": OPTIMIZERS.list,
    "schedule": SCHEDULES.list,
    "scope": lambda: list(SCOPES),
    "execution": lambda: list(EXECUTIONS),
    "on_diverge": lambda: list(DIVERGE_CHOICES),
    "round_schedule": lambda: list(ROUND_SCHEDULES),
}


@dataclass
class Built:
    """The first stage's output: the data, the initialised model and the device."""

    config: RunConfig
    loaders: Loaders
    model: nn.Module
    device: torch.device
    isometry: dict[str, Any] | None = None  # init_under_mask's approximate-isometry summary (prune.isometry)
    kept_fan_in: dict[str, Any] | None = None  # init_under_mask's rescale summary (prune.kept_fan_in)
    data_dir: str | Path | None = None  # where the data came from: prune.dataset is read from there too
    download: bool = True


def validate(config: RunConfig, training: bool = True) -> None:
    """Fail fast, before any data is read, on names and values that cannot work: registry names
    (with close matches), the model's, data set's and method's own arguments, the combinations
    of settings (numbers out of range were refused when the config was made: see
    :data:`sparsetrain.config.RANGES`)."""
    MODELS.get(config.model)
    DATASETS.get(config.dataset)
    INITS.get(config.init)
    check_model_args(config.model, config.model_args)
    dataset_args(config.dataset, config.data_args)
    p, t = config.prune, config.train
    if p.method in AFTER_TRAINING:
        validate_after_training(config)
    elif p.method != DENSE:
        METHODS.get(p.method)
        method_options(p.method, p.options)
        structure = parse_structure(p.structure)
        if structure is None:
            check_sparsity(p.sparsity)
        else:
            structured_sparsity(structure, p.sparsity)  # N:M fixes it at 1 - N/M
    elif p.options:
        raise SparsetrainError("method 'dense' prunes nothing and takes no options; remove [prune.options]")
    if p.reinit:
        INITS.get(p.reinit)
    if p.scope not in SCOPES:
        raise SparsetrainError(f"unknown scope {p.scope!r}; choose one of {', '.join(SCOPES)}")
    if p.shuffle and p.method == DENSE:
        raise SparsetrainError("prune.shuffle permutes a mask, and method 'dense' makes none; choose a pruning "
                               "method, or leave prune.shuffle off")
    if p.kept_fan_in and p.method == DENSE:
        raise SparsetrainError("prune.kept_fan_in rescales the weights a mask keeps, and method 'dense' makes no "
                               "mask; choose a pruning method, or leave prune.kept_fan_in off")
    if p.kept_fan_in and p.isometry:
        raise SparsetrainError("prune.kept_fan_in and prune.isometry both set the scale of the kept weights (the "
                               "isometry would undo the rescale); choose one")
    if p.shuffle and p.structure:
        raise SparsetrainError(f"prune.shuffle permutes single entries, which would break structure "
                               f"{p.structure!r}; shuffle an unstructured mask (structure '')")
    if p.scope == "erk" and p.structure:
        raise SparsetrainError(f"scope 'erk' budgets single entries; with structure {p.structure!r} choose "
                               "scope 'global' or 'layerwise'")
    if p.dataset:
        validate_prune_dataset(config)
    if p.round_schedule not in ROUND_SCHEDULES:
        raise SparsetrainError(f"unknown prune.round_schedule {p.round_schedule!r}; choose one of {', '.join(ROUND_SCHEDULES)}")
    if training:
        validate_training(t)


def validate_prune_dataset(config: RunConfig) -> None:
    """``prune.dataset`` names a data set, and the method scores with data at initialization (the
    shapes are compared once the data is read, in :func:`scoring_loaders`)."""
    p = config.prune
    DATASETS.get(p.dataset)
    if p.method == DENSE or p.method in AFTER_TRAINING or getattr(METHODS.get(p.method), "data_free", False):
        why = ("prunes nothing" if p.method == DENSE else "prunes a trained network on the run's own data"
               if p.method in AFTER_TRAINING else "scores without data")
        raise SparsetrainError(f"prune.dataset {p.dataset!r} names the data the mask is scored on, and method "
                               f"{p.method!r} {why}; leave prune.dataset unset, or choose a method that scores "
                               "data at initialization (e.g. snip)")


def validate_after_training(config: RunConfig) -> None:
    """What lwc and lottery (pruning after training, :mod:`sparsetrain.posttrain`) need beyond the
    other methods: their options, rounds that reach the sparsity, a rewind point inside the dense
    run, and no settings that only mean something at initialization."""
    p, t = config.prune, config.train
    options = after_training_options(p.method, p.options)
    after_training_sparsities(p.method, p.sparsity, options, p.rounds, p.round_schedule)
    for name, value, why in (("structure", p.structure, "they select single weights by magnitude"),
                             ("shuffle", p.shuffle, "the sanity checks permute masks found at initialization"),
                             ("isometry", p.isometry, "it reshapes the weights at initialization, and these methods "
                                                      "prune trained ones"),
                             ("kept_fan_in", p.kept_fan_in, "it rescales the weights at initialization, and these "
                                                            "methods prune trained ones")):
        if value:
            raise SparsetrainError(f"prune.{name} does not apply to method {p.method!r} ({why}); leave it unset")
    if t.iterations and hasattr(options, "rewind"):  # a length in epochs is checked once the data is read
        check_rewind(options.rewind, t.iterations)


def validate_training(t: TrainConfig) -> None:
    """The training settings' names and ranges."""
    if t.iterations == 0 and t.epochs == 0:
        raise SparsetrainError(
            "the training length must be positive: give train.iterations (--iterations N) or "
            f"train.epochs (--epochs E) as a positive number (got iterations={t.iterations}, epochs={t.epochs})"
        )
    if t.iterations > 0 and t.epochs > 0:
        raise SparsetrainError(
            "give the training length as exactly one of train.iterations or train.epochs "
            f"(got iterations={t.iterations}, epochs={t.epochs})"
        )
    OPTIMIZERS.get(t.optimizer)
    SCHEDULES.get(t.schedule)
    if t.execution not in EXECUTIONS:
        raise SparsetrainError(
            f"unknown execution {t.execution!r}; choose one of {', '.join(EXECUTIONS)} "
            "(sparse: pruned Linear layers compute on their kept weights only)"
        )
    if t.on_diverge not in DIVERGE_CHOICES:
        raise SparsetrainError(f"unknown on_diverge {t.on_diverge!r}; choose one of {', '.join(DIVERGE_CHOICES)}")


# --- stage 1: build ------------------------------------------------------------------------------

def build(config: RunConfig, *, data_dir: str | Path | None = None, device: str | torch.device | None = None,
          download: bool = True) -> Built:
    """The data (with the config's ``data_args``), the model built for it (with ``model_args``)
    and initialised with ``config.init`` from ``config.seed``."""
    device = resolve_device(device)
    t = config.train
    loaders = create_loaders(
        config.dataset, batch_size=t.batch_size, data_dir=data_dir, download=download,
        val_fraction=t.val_fraction, split_seed=t.split_seed, shuffle_seed=config.seed, device=device,
        data_args=config.data_args,
    )
    model = create_model(config.model, input_shape=loaders.input_shape, num_classes=loaders.num_classes,
                         **config.model_args).to(device)
    initialize_(model, config.init, config.seed)
    return Built(config, loaders, model, device, data_dir=data_dir, download=download)


# --- stage 2: find the mask ------------------------------------------------------------------------

def pruning_batches(loaders: Loaders, count: int, batch_size: int = 0):
    """The first ``count`` pruning batches, or one whole epoch of the training split for 0.
    ``batch_size`` examples each (0: the training batch size), cut in order from the training
    stream's first epoch, so a pruning batch of 10 is the first 10 examples of the first
    training batch."""
    stream = loaders.train.iter_from(0)
    size = batch_size or loaders.train.batch_size
    if size == loaders.train.batch_size:
        n = loaders.train.steps_per_epoch if count == 0 else count
        return (next(stream) for _ in range(n))
    examples = loaders.train.steps_per_epoch * loaders.train.batch_size
    n = examples // size if count == 0 else count
    if n < 1 or n * size > examples:
        raise SparsetrainError(
            f"{n or 1} pruning batch(es) of {size} examples need {(n or 1) * size:,} training examples, and "
            f"an epoch of the training split has {examples:,}: lower prune.batch_size or prune.batches"
        )
    return rebatch((next(stream) for _ in range(loaders.train.steps_per_epoch)), size, n)


def scoring_loaders(config: RunConfig, built: Built) -> Loaders:
    """The loaders the mask is scored on: the run's own, or with ``prune.dataset`` that data set's,
    built as the run's are (batch size, validation split, seed, from ``built.data_dir``, with the
    run's ``data_args`` that this data set also takes, such as ``view``), so its first pruning
    batch is the one the run would score on that data set. Refused unless its examples have the
    run's input shape and its classes the run's count (the model is built for those)."""
    name = config.prune.dataset
    if not name or name == config.dataset:
        return built.loaders
    t = config.train
    takes = {f.name for f in dataclasses.fields(DATASETS.get(name).args)}
    other = create_loaders(name, batch_size=t.batch_size, data_dir=built.data_dir, download=built.download,
                           val_fraction=t.val_fraction, split_seed=t.split_seed, shuffle_seed=config.seed,
                           device=built.device, data_args={k: v for k, v in config.data_args.items() if k in takes})
    own = built.loaders
    if (tuple(other.input_shape), other.num_classes) != (tuple(own.input_shape), own.num_classes):
        raise SparsetrainError(
            f"prune.dataset {name!r} has inputs of shape {tuple(other.input_shape)} and {other.num_classes} classes, "
            f"but the run trains on {config.dataset!r} with {tuple(own.input_shape)} and {own.num_classes}: a mask "
            "scored on one network fits only data of the same input shape and number of classes. Choose such a "
            "data set (e.g. fashion-mnist for mnist), or leave prune.dataset unset"
        )
    return other


def find_mask(config: RunConfig, built: Built, parallel=None) -> Mask | None:
    """The mask of ``config.prune`` for the built model (None for ``method = "dense"``); the
    model is not changed. With ``prune.dataset`` the batches come from that data set
    (:func:`scoring_loaders`): the mask is found on one data set and trained on another.
    ``parallel`` (one rank of a data-parallel run, :class:`sparsetrain.distributed.Ranks`): this
    rank scores its slice of each pruning batch with the gradients averaged over the ranks, so
    that every rank selects the mask one process would."""
    p = config.prune
    if p.method == DENSE:
        return None
    if p.method in AFTER_TRAINING:
        raise SparsetrainError(
            f"method {p.method!r} prunes a trained network, so there is no mask to find at initialization: "
            f"train it with `sparsetrain run --method {p.method}` (sparsetrain.run), whose runs keep their masks"
        )
    data_free, batches = _scoring_batches(config, built)
    scoring = contextlib.nullcontext()
    if parallel is not None:
        parallel.check_method(p.method, data_free)
        if batches is not None:
            batches, scoring = (parallel.shard(b) for b in batches), parallel.averaged_gradients(built.model)
    with scoring:
        mask = _prune(config, built, batches)
    # Frankle et al.'s sanity check: the method's per-layer counts at random positions.
    return shuffle_layerwise(mask, config.seed) if p.shuffle else mask


def find_masks(config: RunConfig, built: Built, sparsities) -> list[Mask]:
    """:func:`find_mask` of ``config`` at each sparsity of ``sparsities`` (its own prune.sparsity
    aside), from one scoring (:func:`sparsetrain.pruning.prune_at_levels`: one-round, unstructured
    pruning by a method whose scores do not depend on the sparsity, such as SNIP; refused
    otherwise). Each mask equals what find_mask returns for ``config`` at that sparsity."""
    p = config.prune
    if p.method == DENSE or p.method in AFTER_TRAINING:
        raise SparsetrainError(f"find_masks needs a method that prunes at initialization; got {p.method!r}")
    masks = _prune(config, built, _scoring_batches(config, built)[1], levels=list(sparsities))
    return [shuffle_layerwise(m, config.seed) if p.shuffle else m for m in masks]


def _scoring_batches(config: RunConfig, built: Built):
    """Whether the method is data-free, and the pruning batches it scores on (None if it is)."""
    p = config.prune
    data_free = getattr(METHODS.get(p.method), "data_free", False)
    return data_free, None if data_free else pruning_batches(scoring_loaders(config, built), p.batches, p.batch_size)


def _prune(config: RunConfig, built: Built, batches, levels=None):
    """``prune_at_init`` with the config's settings; with ``levels``, ``prune_at_levels`` at those."""
    p = config.prune
    if levels is not None:
        return prune_at_levels(built.model, p.method, levels, **_prune_settings(config, batches))
    return prune_at_init(built.model, p.method, sparsity=p.sparsity, **_prune_settings(config, batches))


def _prune_settings(config: RunConfig, batches) -> dict:
    p = config.prune
    return dict(
        batches=batches,
        include_biases=p.include_biases,
        exclude=list(p.exclude) or None,
        scope=p.scope,
        seed=config.seed,
        structure=p.structure,
        options=p.options or None,
        rounds=p.rounds,
        schedule=p.round_schedule,
    )


# --- stage 3: initialise under the mask -----------------------------------------------------------

def init_under_mask(config: RunConfig, built: Built, mask: Mask | None) -> tuple[nn.Module, list]:
    """The model that trains and its hooks: a fresh draw of ``prune.reinit`` if set (snip-public
    trains another set of weights than it scored), the mask applied, with ``prune.isometry`` the
    kept weights made approximately an isometry (:func:`sparsetrain.signal.isometry.approximate_isometry_`,
    its summary left in ``built.isometry``; without a mask every prunable weight matrix, fully kept),
    and either a :class:`GradientMask` (dense execution) or the pruned Linear layers swapped for
    sparse ones (``train.execution = "sparse"``; the other masked parameters keep a GradientMask)."""
    model = built.model
    if config.prune.reinit:
        reinitialize(model, config.prune.reinit, config.seed + 1)  # snip-public's separate weights
    if mask is not None:
        mask = {n: m.to(built.device) for n, m in mask.items()}
        apply_mask_(model, mask)
    if config.prune.kept_fan_in and mask is not None:  # the init's variance law on the network as pruned
        built.kept_fan_in = rescale_kept_fan_in_(model, mask)
    if config.prune.isometry:  # Lee et al. 2020: repair signal propagation on the weights that train
        built.isometry = approximate_isometry_(model, mask).summary()
    if mask is None:
        return model, []
    if config.train.execution == "sparse":
        from .sparse.training import sparsify_for_training_

        model = sparsify_for_training_(model, mask)
        remaining = dict(model.named_parameters())
        mask = {n: m for n, m in mask.items() if n in remaining}
    return model, ([GradientMask(model, mask)] if mask else [])


# --- stage 4: train ---------------------------------------------------------------------------------

def train_stage(config: RunConfig, built: Built, model: nn.Module, hooks: list, mask: Mask | None, *,
                checkpoint_path: str | Path | None = None,
                on_metrics: Callable[[int, dict[str, float]], None] | None = None,
                progress: bool = True, callbacks: list[Callback] = (), parallel=None) -> TrainResult:
    """Train ``model`` as ``config.train`` says, resumable from ``checkpoint_path``, on the torch
    threads :func:`sparsetrain.threads.training_threads` chooses (``--threads``, else 1 for a
    small step, else the idle cores); the count is shown with the progress and recorded in the
    result. ``parallel``: one rank of a data-parallel run (see :func:`sparsetrain.train.loop.train`)."""
    sparsity = overall(mask)
    with training_threads(model, built.loaders.input_shape, config.train.batch_size, built.device) as threads:
        result = train(model, built.loaders, config.train, hooks=hooks, seed=config.seed,
                       checkpoint_path=checkpoint_path, on_metrics=on_metrics, progress=progress,
                       postfix={"sparsity": f"{sparsity:.3f}", "threads": str(threads)}, callbacks=callbacks,
                       parallel=parallel)
    result.threads = threads
    return result


def overall(mask: Mask | None) -> float:
    """The fraction of the masked entries that are pruned (0 without a mask)."""
    if mask is None:
        return 0.0
    total = sum(m.numel() for m in mask.values())
    return 1.0 - sum(int(m.sum()) for m in mask.values()) / total if total else 0.0


def layer_table(mask: Mask | None, model: nn.Module,
                input_shape: tuple[int, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Per masked parameter: shape, kept, total, sparsity; then the parameters the mask left out
    (dense), each with the reason in ``left_out``. With ``input_shape`` (one example's), also
    ``flops``, ``flops_kept`` and ``effective_sparsity`` per row (None where not defined; see
    :mod:`sparsetrain.mask_stats`)."""
    params = dict(model.named_parameters())
    if mask is None:
        table = {n: {"shape": list(p.shape), "kept": p.numel(), "total": p.numel(), "sparsity": 0.0}
                 for n, p in params.items()}
    else:
        table = {r.name: {"shape": list(r.shape), "kept": r.kept, "total": r.total, "sparsity": r.sparsity}
                 for r in mask_summary(mask)}
        for name, why in (getattr(mask, "left_out", None) or {}).items():
            if name not in table and name in params:
                n = params[name].numel()
                table[name] = {"shape": list(params[name].shape), "kept": n, "total": n, "sparsity": 0.0,
                               "left_out": why}
    if input_shape is not None:
        costs = layer_costs(model, mask, input_shape)
        for name, row in table.items():
            row.update(costs.get(name, {"flops": None, "flops_kept": None, "effective_sparsity": None}))
    return table
