"""Frozen configuration of a run: the contract between the CLI, recipes and the library.

A :class:`RunConfig` serialises to and from a flat-sectioned TOML recipe::

    model = "lenet-300-100"
    dataset = "mnist"
    seed = 0

    [prune]
    method = "snip"
    sparsity = 0.95

    [train]
    iterations = 30000

The dataclasses are the schema: each field's type is checked when a config is read, its range
(``check=``, see :data:`RANGES`) whenever a config is made (a learning rate of 0 or NaN, a batch
size of 0, a sparsity of 1 are refused here, before any data is read or any run recorded), its help
text (``field(metadata={"help": ...})``) is what the CLI prints, and its ``registry`` names the
registry its value must come from (models, data sets, methods, ...), so the CLI's flags, choices
and help are generated from here and never kept by hand. ``model_args``, ``data_args`` and
``prune.options`` are the arguments of the chosen model, data set and pruning method: each of
those declares them itself, and :func:`sparsetrain.pipeline.validate` checks them against it.

:meth:`RunConfig.key` hashes the settings that change results (not the name), so a finished run
is found again and an interrupted one resumed. A field added after runs were recorded is declared
with :func:`later`: while it holds the default that reproduces the old behaviour it is left out
of the key, so every recorded run keeps its key.

    >>> RunConfig().key() == RunConfig(name="another label").key()
    True
    >>> RunConfig().key() == RunConfig().replace(train={"execution": "dense"}).key()  # a later field at its default
    True
    >>> TrainConfig(lr=float("nan"))
    Traceback (most recent call last):
    ...
    sparsetrain.errors.SparsetrainError: train.lr must be a positive finite number; got nan
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import SparsetrainError
from .options import check_value


def setting(default: Any = dataclasses.MISSING, help: str = "", *, registry: str = "", flag: str = "",
            later: bool = False, check: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text. ``registry``: the registry its value names (for the
    CLI's choices and validation); ``flag``: the CLI flag when not ``--<field-name>``; ``later``:
    added after runs were recorded, so left out of the run key while it holds ``default``;
    ``check``: the range its value must lie in, a key of :data:`RANGES` (checked whenever a config
    is made, so the CLI, recipes and the API refuse a bad value alike, before anything runs)."""
    if check and check not in RANGES:
        raise ValueError(f"unknown check {check!r}; choose one of {', '.join(RANGES)}")
    metadata = {"help": help, "registry": registry, "flag": flag, "later": later, "check": check}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


#: The ranges a numeric setting may be declared with (``setting(..., check=NAME)``): a test of the
#: value and the words that finish "<section>.<field> must be ...". NaN and infinities fail all.
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda v: v > 0, "a positive finite number"),
    "positive_int": (lambda v: v >= 1, "a positive whole number"),
    "non_negative": (lambda v: v >= 0, "a finite number >= 0"),
    "non_negative_int": (lambda v: v >= 0, "a whole number >= 0"),
    "fraction": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    # the training length: one of the two is given, the other stays 0
    "iterations": (lambda v: v >= 0, "a positive whole number (or 0 when train.epochs gives the length)"),
    "epochs": (lambda v: v >= 0, "a positive finite number (or 0 when train.iterations gives the length)"),
}


def check_ranges(obj: Any) -> None:
    """Raise :class:`SparsetrainError` for the first field of the config dataclass ``obj`` whose
    value lies outside the range its ``check`` declares, worded as "train.lr must be a positive
    finite number; got nan". Values of the wrong type are left to :func:`checked`."""
    section = _SECTION_NAMES.get(type(obj).__name__, "")
    for f in fields(obj):
        rule = f.metadata.get("check")
        value = getattr(obj, f.name)
        if not rule or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        test, words = RANGES[rule]
        if not (math.isfinite(value) and test(value)):
            where = f"{section}.{f.name}" if section else f.name
            raise SparsetrainError(f"{where} must be {words}; got {value!r}")


_SECTION_NAMES = {"PruneConfig": "prune", "TrainConfig": "train"}


def later(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A field added after runs were recorded: ``default`` reproduces the behaviour from before
    it existed, and while the field holds it the field is left out of the run key."""
    return setting(default, help, later=True, **kwargs)


@dataclass(frozen=True)
class PruneConfig:
    """How the mask is found."""

    method: str = setting("snip", "pruning method ('dense' trains the unpruned network)", registry="method")
    sparsity: float = setting(0.95, "fraction of the prunable connections removed, in [0, 1)", check="fraction")
    batches: int = setting(1, "mini-batches scored (1 = the SNIP paper; 0 = the whole training split, "
                              "gradients summed as spp-public)", flag="prune-batches",
                       check="non_negative_int")
    include_biases: bool = setting(False, "prune biases too (as snip-public)")
    scope: str = setting("global", "layer budget: global (top kappa over all tensors), layerwise (every "
                                   "tensor at the same sparsity) or erk (Erdos-Renyi-Kernel, as RigL)",
                         registry="scope")
    reinit: str = setting("", "after pruning, train a fresh draw of this init scheme (name or "
                              "name:key=value,...) instead of the scored weights (snip-public: "
                              "variance-scaling-zero-bias); empty keeps the scored weights",
                          registry="init")
    structure: str = later("", "mask structure: 'N:M' (e.g. '2:4'; needs sparsity 1-N/M), 'blockRxC' "
                               "(e.g. 'block32x32'), or '' (unstructured)")
    rounds: int = later(1, "pruning rounds: the mask carried from round to round, each round scored under "
                           "the previous round's mask (iterative methods)", flag="prune-rounds",
                    check="positive_int")
    round_schedule: str = later("exponential", "sparsity of the rounds before the last: exponential is "
                                               "density^(k/R), as iterative SNIP and SynFlow",
                                registry="round_schedule")
    exclude: tuple[str, ...] = later((), "glob patterns of parameter names never pruned (e.g. 'pos*')")
    options: dict[str, Any] = later(default_factory=dict, help="the pruning method's own options "
                                    "(`sparsetrain list methods` shows them)", flag="option")
    batch_size: int = later(0, "examples in each pruning mini-batch (0: train.batch_size; the SNIP paper "
                               "scores batches of 1 to 10,000)", flag="prune-batch-size", check="non_negative_int")
    shuffle: bool = later(False, "sanity check (Frankle et al. 2021): permute the found mask within each "
                                 "tensor (same per-layer counts, random positions, from the run's seed)",
                          flag="shuffle-mask")
    isometry: bool = later(False, "after the mask is applied to the weights that train, make each kept layer "
                                  "approximately an isometry (Lee et al. 2020: min ||W^T W - I|| over the kept "
                                  "weights; sparsetrain.signal.isometry)")
    kept_fan_in: bool = later(False, "after the mask is applied to the weights that train, scale each unit's kept "
                                     "incoming weights by sqrt(fan_in / kept fan_in): the init's variance law on "
                                     "the pruned network (sparse-aware init; sparsetrain.init.kept_fan_in)")
    dataset: str = later("", "score the mask on this data set's first pruning batches and train on `dataset` "
                             "(transfer of sparsity, Lee et al. 2020; same input shape and classes); '' = the "
                             "run's own",
                         registry="dataset", flag="prune-dataset")

    def __post_init__(self):
        check_ranges(self)


@dataclass(frozen=True)
class TrainConfig:
    """How the pruned network is trained ("in the standard way"). Give ``iterations`` or
    ``epochs`` (epochs of the training split, after the validation hold-out).

    Schedules: ``constant``; ``step`` (x ``decay_factor`` every ``decay_every`` iterations, the
    SNIP paper's "x0.1 every 25k"); ``linear`` (to ``end_lr_factor`` * lr at the end); ``cosine``.
    The best validation error selects the best-validation checkpoint; ``test_every`` records test
    errors for the original's protocol (minimum over checkpoints), reported separately and never
    used to choose the headline figure."""

    optimizer: str = setting("sgd", "optimizer", registry="optimizer")
    lr: float = setting(0.1, "learning rate", check="positive")
    momentum: float = setting(0.9, "momentum (SGD), in [0, 1)", check="fraction")
    nesterov: bool = setting(False, "Nesterov momentum (SGD)")
    weight_decay: float = setting(5e-4, "weight decay (L2 penalty 0.5 * wd * sum w^2)", check="non_negative")
    schedule: str = setting("step", "learning-rate schedule", registry="schedule")
    decay_every: int = setting(25000, "iterations between decays (step schedule)", check="positive_int")
    decay_factor: float = setting(0.1, "factor of each decay (step schedule)", check="positive")
    end_lr_factor: float = setting(0.0, "final lr / lr (linear and cosine schedules)", check="non_negative")
    iterations: int = setting(0, "training length in iterations (or give epochs)", check="iterations")
    epochs: float = setting(0.0, "training length in epochs of the training split (or give iterations)",
                            check="epochs")
    batch_size: int = setting(100, "training batch size", check="positive_int")
    val_fraction: float = setting(0.1, "fraction of the training set held out for validation, in [0, 1)",
                                  check="fraction")
    split_seed: int = setting(0, "seed of the validation split")
    val_every: int = setting(1000, "validation error every N iterations (0: only at the end)",
                             check="non_negative_int")
    test_every: int = setting(0, "also record test error every N iterations (the original's protocol)",
                              check="non_negative_int")
    checkpoint_every: int = setting(1000, "checkpoint every N iterations (resumable runs; 0: none)",
                                    check="non_negative_int")
    execution: str = later("dense", "dense: pruned layers train as dense layers with zeros; sparse: pruned "
                                    "Linear layers compute on their kept weights only (faster on CPU for wide, "
                                    "very sparse layers)", registry="execution")
    goal_error: float = later(0.0, "stop at the first validation check with error <= this (0: never); "
                                   "the run is recorded as 'stopped'", check="fraction")
    on_diverge: str = later("raise", "a NaN/inf training loss: 'raise' an error, or record the run as "
                                     "'infeasible' (studies)", registry="on_diverge")

    def __post_init__(self):
        check_ranges(self)


@dataclass(frozen=True)
class RunConfig:
    """One run: the model and data, the init, how the mask is found and how it is trained."""

    model: str = setting("lenet-300-100", "model", registry="model")
    dataset: str = setting("mnist", "data set", registry="dataset")
    seed: int = setting(0, "seed of the init, the pruning batch order and the training order")
    init: str = setting("default", "initialization scheme of the scored weights: name or name:key=value,..., "
                                   "e.g. normal:std=0.1; parameters: `sparsetrain list inits`",
                        registry="init")
    model_args: dict[str, Any] = later(default_factory=dict, help="the model's own arguments "
                                       "(depth, width, ...; `sparsetrain list models`)", flag="model-arg")
    data_args: dict[str, Any] = later(default_factory=dict, help="the data set's own arguments "
                                      "(view, augmentation, ...; `sparsetrain list datasets`)", flag="data-arg")
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = setting("", "a label (recipe name); not part of the run's identity")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """The settings that change results: everything but ``name``, and fields declared with
        :func:`later` only where they differ from their default."""
        identity = self.to_dict()
        identity.pop("name")
        for cls, part in ((RunConfig, identity), (PruneConfig, identity["prune"]), (TrainConfig, identity["train"])):
            for f in fields(cls):
                if f.metadata.get("later") and part.get(f.name) == _plain(_default(f)):
                    part.pop(f.name)
        return identity

    def key(self) -> str:
        """Hex identity of the results-relevant settings (16 hex digits)."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "RunConfig":
        """Copy with changes; ``prune`` and ``train`` take dicts of their own fields."""
        for section, cls in (("prune", PruneConfig), ("train", TrainConfig)):
            if isinstance(changes.get(section), dict):
                changes[section] = dataclasses.replace(getattr(self, section), **checked(cls, changes[section]))
        return dataclasses.replace(self, **checked(RunConfig, changes))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise SparsetrainError(f"a run config must be a table of settings, got {data!r}")
        data = dict(data)
        prune = PruneConfig(**checked(PruneConfig, data.pop("prune", {})))
        train = TrainConfig(**checked(TrainConfig, data.pop("train", {})))
        return cls(prune=prune, train=train, **checked(cls, data))

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise SparsetrainError(f"recipe file {path} does not exist") from None
        except IsADirectoryError:
            raise SparsetrainError(f"recipe {path} is a folder, not a TOML file") from None
        except tomllib.TOMLDecodeError as err:
            raise SparsetrainError(f"recipe {path} is not valid TOML: {err}") from None
        data.setdefault("name", Path(path).stem)
        try:
            return cls.from_dict(data)
        except SparsetrainError as err:  # say which file holds the bad setting
            raise SparsetrainError(f"recipe {path}: {err}") from None

    def to_toml(self) -> str:
        """The config as a TOML recipe (every setting, defaults included; tables last)."""
        data = self.to_dict()
        top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
        tables = [f"\n[{k}]\n" + _toml_table(v, k) for k, v in data.items()
                  if isinstance(v, dict) and k not in ("prune", "train")]
        sections = []
        for s in ("prune", "train"):
            inner = {k: v for k, v in data[s].items() if not isinstance(v, dict)}
            sections.append(f"\n[{s}]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in inner.items()))
            sections += [f"\n[{s}.{k}]\n" + _toml_table(v, f"{s}.{k}")
                         for k, v in data[s].items() if isinstance(v, dict)]
        return "\n".join(top) + "\n" + "\n".join(tables + sections) + "\n"


SECTIONS: dict[str, type] = {"": RunConfig, "prune": PruneConfig, "train": TrainConfig}


def schema() -> list[tuple[str, dataclasses.Field]]:
    """Every setting as ``(section, field)`` (section "" is the top level), in declaration order:
    what the CLI generates its flags from."""
    out = []
    for section, cls in SECTIONS.items():
        out += [(section, f) for f in fields(cls) if f.name not in ("prune", "train")]
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: the JSON/TOML form (and the form keys are hashed in)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def _toml_table(table: dict[str, Any], where: str) -> str:
    if any(isinstance(v, dict) for v in table.values()):
        raise SparsetrainError(f"[{where}] holds a nested table, which recipes do not support")
    return "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items())


def checked(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` for ``cls(**data)``: unknown keys rejected with the valid ones listed, values
    checked against the field types (an int is accepted for a float, a list for a tuple)."""
    known = {f.name: f for f in fields(cls)}
    section = {"PruneConfig": "[prune]", "TrainConfig": "[train]"}.get(cls.__name__, "top level")
    if not isinstance(data, dict):
        raise SparsetrainError(f"{section} must be a table of settings (key = value), got {data!r}")
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SparsetrainError(
            f"unknown setting(s) {', '.join(unknown)} in {section}; valid: {', '.join(known)}"
        )
    hints = typing.get_type_hints(cls)
    return {k: check_value(v, hints[k], f"setting {k!r}") for k, v in data.items()}
