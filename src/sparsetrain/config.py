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

Its :meth:`RunConfig.key` hashes the settings that change results (not the name, device, data
folder or progress bar), so a finished run is found again and an interrupted one resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SparsetrainError


@dataclass(frozen=True)
class PruneConfig:
    """How the mask is found. ``batches``: mini-batches scored (1 = the SNIP paper; 0 = the whole
    training split, summing gradients as spp-public). ``include_biases``: prune biases too, as
    snip-public. ``reinit``: after pruning, train a fresh draw of this init scheme instead of the
    scored weights (snip-public: ``variance-scaling-zero-bias``); empty keeps the scored weights.
    ``method = "dense"`` trains the unpruned network. ``structure``: ``"N:M"`` (e.g. ``"2:4"``;
    needs ``sparsity = 1 - N/M``) or ``"blockRxC"`` (e.g. ``"block32x32"``); empty = unstructured."""

    method: str = "snip"
    sparsity: float = 0.95
    batches: int = 1
    include_biases: bool = False
    scope: str = "global"
    reinit: str = ""
    structure: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """How the pruned network is trained ("in the standard way"). Give ``iterations`` or
    ``epochs`` (epochs of the training split, after the validation hold-out).

    Schedules: ``constant``; ``step`` (x ``decay_factor`` every ``decay_every`` iterations, the
    SNIP paper's "x0.1 every 25k"); ``linear`` (to ``end_lr_factor`` * lr at the end); ``cosine``.
    ``val_every``: validation error every N iterations (0 = only at the end); the best one selects
    the best-validation checkpoint. ``test_every``: also record test error every N iterations, for
    the original's protocol (minimum over checkpoints), reported separately and never used to
    choose the headline figure. ``execution``: ``dense`` trains the pruned Linear layers as dense
    layers with zeros (masked gradients); ``sparse`` computes their forward and backward on the
    kept weights only (``sparsetrain.sparse.training``; faster on CPU for wide, very sparse layers)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "step"
    decay_every: int = 25000
    decay_factor: float = 0.1
    end_lr_factor: float = 0.0
    iterations: int = 0
    epochs: float = 0.0
    batch_size: int = 100
    val_fraction: float = 0.1
    split_seed: int = 0
    val_every: int = 1000
    test_every: int = 0
    checkpoint_every: int = 1000
    execution: str = "dense"


@dataclass(frozen=True)
class RunConfig:
    model: str = "lenet-300-100"
    dataset: str = "mnist"
    seed: int = 0
    init: str = "default"
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = ""  # a label (recipe name); not part of the run's identity

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Hex identity of the results-relevant settings."""
        identity = self.to_dict()
        identity.pop("name")
        # Settings added after runs were recorded stay out of the identity while they hold their
        # default, so existing runs keep their keys (and are found again, and resume).
        for section, key, default in _ADDED_LATER:
            if identity[section].get(key, default) == default:
                identity[section].pop(key, None)
        blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "RunConfig":
        """Copy with changes; ``prune`` and ``train`` take dicts of their own fields."""
        for section, cls in (("prune", PruneConfig), ("train", TrainConfig)):
            if isinstance(changes.get(section), dict):
                changes[section] = dataclasses.replace(getattr(self, section), **_checked(cls, changes[section]))
        return dataclasses.replace(self, **_checked(RunConfig, changes))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        data = dict(data)
        prune = PruneConfig(**_checked(PruneConfig, data.pop("prune", {})))
        train = TrainConfig(**_checked(TrainConfig, data.pop("train", {})))
        return cls(prune=prune, train=train, **_checked(cls, data))

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise SparsetrainError(f"recipe file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise SparsetrainError(f"recipe {path} is not valid TOML: {err}") from None
        data.setdefault("name", Path(path).stem)
        return cls.from_dict(data)

    def to_toml(self) -> str:
        def value(v: Any) -> str:
            return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

        top = [f"{k} = {value(v)}" for k, v in self.to_dict().items() if not isinstance(v, dict)]
        sections = [
            f"\n[{s}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in getattr(self, s).__dict__.items())
            for s in ("prune", "train")
        ]
        return "\n".join(top) + "\n" + "\n".join(sections) + "\n"


_ADDED_LATER = [("prune", "structure", ""), ("train", "execution", "dense")]


def _checked(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown keys with the valid ones listed, and wrong types with the expected one."""
    known = {f.name: f for f in fields(cls)}
    section = {"PruneConfig": "[prune]", "TrainConfig": "[train]"}.get(cls.__name__, "top level")
    if not isinstance(data, dict):
        raise SparsetrainError(f"{section} must be a table of settings (key = value), got {data!r}")
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SparsetrainError(
            f"unknown setting(s) {', '.join(unknown)} in {section}; valid: {', '.join(known)}"
        )
    out = {}
    for k, v in data.items():
        expected = known[k].type
        if expected == "float" and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        ok = {"int": int, "float": float, "str": str, "bool": bool,
              "PruneConfig": PruneConfig, "TrainConfig": TrainConfig}.get(expected)
        if ok is not None and (not isinstance(v, ok) or (ok is int and isinstance(v, bool))):
            raise SparsetrainError(f"setting {k!r} must be {expected}, got {v!r}")
        out[k] = v
    return out
