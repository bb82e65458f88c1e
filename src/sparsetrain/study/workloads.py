"""Workloads of a steps-to-result study: a run config plus a goal error, a step budget and the
metaparameters searched, read from a recipe with a ``[study]`` table (``recipes/dps-*.toml``).

A workload recipe is an ordinary run recipe (model, data set, init, ``[prune]``, ``[train]``) whose
``train.iterations`` is the step budget, plus::

    [study]
    goal_error = 0.02                 # complete at the first check with validation error <= this
    search = ["learning_rate"]       # the plan's dimensions, in the Sobol sequence's order
    check_interval = 100             # full validation error every this many steps

The search names and their ranges are effect-dps-public's (``batch_science.py``):
:data:`SEARCH_SPACE`. Their order matters: the i-th name takes the Sobol sequence's i-th dimension,
as the original's ``--mparams_kind`` list does.

    >>> w = load_workload("dps-mnist-simple-cnn-sgd")
    >>> w.goal_error, w.budget, w.search, w.config.train.schedule
    (0.02, 40000, ('learning_rate',), 'constant')
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.pipeline import DENSE
from sparsetrain.recipes import recipe_path
from sparsetrain.train.optim import SCHEDULES


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched metaparameter: its range, how the unit interval maps onto it (``log``,
    ``reverse-log``: log of 1 - value, or ``integer``: linear then truncated), and the
    ``[train]`` setting it fills."""

    name: str
    low: float
    high: float
    scale: str
    setting: str

    def from_unit(self, u: float) -> float | int:
        """The value at ``u`` in [0, 1): effect-dps-public's ``metaparameters.py`` mapping.

        >>> SEARCH_SPACE["learning_rate"].from_unit(0.5)  # 10 ** (0.5 * 4 - 4)
        0.01
        >>> SEARCH_SPACE["decay_steps"].from_unit(0.5)
        45000
        """
        if self.scale == "log":
            return 10 ** (u * (math.log10(self.high) - math.log10(self.low)) + math.log10(self.low))
        if self.scale == "reverse-log":  # u = 0 gives high (0.9999), u -> 1 approaches low (0.9)
            return 1 - 10 ** (u * (math.log10(1 - self.low) - math.log10(1 - self.high)) + math.log10(1 - self.high))
        if self.scale == "integer":
            return int(u * (self.high - self.low) + self.low)
        raise SparsetrainError(f"unknown scale {self.scale!r}; use log, reverse-log or integer")


SEARCH_SPACE: dict[str, Dimension] = {
    "learning_rate": Dimension("learning_rate", 1e-4, 1.0, "log", "lr"),
    "momentum": Dimension("momentum", 0.9, 0.9999, "reverse-log", "momentum"),
    "decay_steps": Dimension("decay_steps", 30000, 60000, "integer", "decay_every"),
    "end_learning_rate_factor": Dimension("end_learning_rate_factor", 1e-4, 0.1, "log", "end_lr_factor"),
}
"""The metaparameters a study can search (effect-dps-public's names, ranges and scales)."""


@SCHEDULES.register("linear-then-constant")
def _linear_then_constant(cfg, total: int):
    """Linear from lr to ``end_lr_factor`` * lr over ``decay_every`` steps, then constant: TF's
    ``polynomial_decay(power=1, cycle=False)``, the decay effect-dps-public searches over."""
    return lambda step: 1.0 - (1.0 - cfg.end_lr_factor) * min(step, cfg.decay_every) / cfg.decay_every


@dataclasses.dataclass(frozen=True)
class Workload:
    """A data set, network and optimizer (``config``), what counts as a result (``goal_error`` at a
    full validation check every ``check_interval`` steps) within ``budget`` steps, and ``search``:
    the :data:`SEARCH_SPACE` names the plan varies, in Sobol dimension order."""

    name: str
    config: RunConfig
    goal_error: float
    search: tuple[str, ...]
    check_interval: int = 100

    def __post_init__(self) -> None:
        unknown = [s for s in self.search if s not in SEARCH_SPACE]
        if unknown or not self.search:
            raise SparsetrainError(
                f"workload {self.name}: search {list(self.search)} must name one or more of "
                f"{', '.join(SEARCH_SPACE)} (unknown: {', '.join(unknown) or 'none given'})"
            )
        if len(set(self.search)) != len(self.search):
            raise SparsetrainError(f"workload {self.name}: search {list(self.search)} names a metaparameter twice")
        if not 0 < self.goal_error < 1:
            raise SparsetrainError(f"workload {self.name}: goal_error must lie in (0, 1); got {self.goal_error!r}")
        if not isinstance(self.check_interval, int) or self.check_interval < 1:
            raise SparsetrainError(
                f"workload {self.name}: check_interval must be a positive whole number; got {self.check_interval!r}"
            )

    @property
    def budget(self) -> int:
        """The step budget: the recipe's ``train.iterations``."""
        return self.config.train.iterations

    def trial_config(self, batch_size: int, sparsity: float, params: dict[str, Any], seed: int) -> RunConfig:
        """The run config of one trial: this workload at ``batch_size`` and ``sparsity`` (0: dense)
        with ``params`` (search name -> value) set, stopping at the goal, divergence recorded as
        'infeasible', the full validation error every ``check_interval`` steps."""
        train: dict[str, Any] = {
            "batch_size": batch_size, "goal_error": self.goal_error, "on_diverge": "infeasible",
            "val_every": self.check_interval,
        }
        for name, value in params.items():
            train[SEARCH_SPACE[name].setting] = value
        prune: dict[str, Any] = {"sparsity": sparsity} if sparsity > 0 else {"method": DENSE, "sparsity": 0.0}
        return self.config.replace(seed=seed, train=train, prune=prune, name=f"{self.name}-b{batch_size}-s{sparsity:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict(), "goal_error": self.goal_error,
                "search": list(self.search), "check_interval": self.check_interval}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(data["name"], RunConfig.from_dict(data["config"]), float(data["goal_error"]),
                   tuple(data["search"]), int(data.get("check_interval", 100)))


STUDY_KEYS = ("goal_error", "search", "check_interval")


def load_workload(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Workload:
    """The workload of a bundled ``dps-*`` recipe (by name) or a TOML file; ``overrides``: changes
    to its run config as :meth:`RunConfig.replace` takes them (``{"train": {"iterations": 500}}``),
    e.g. a tiny model for tests."""
    path = recipe_path(name_or_path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SparsetrainError(f"workload recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise SparsetrainError(f"workload recipe {path} is not valid TOML: {err}") from None
    study = data.pop("study", None)
    if not isinstance(study, dict):
        raise SparsetrainError(
            f"recipe {path} has no [study] table, so it is not a study workload; give goal_error and search "
            "there (see the bundled dps-* recipes: sparsetrain list recipes)"
        )
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown or "goal_error" not in study or "search" not in study:
        raise SparsetrainError(
            f"recipe {path}: [study] needs goal_error and search (and may give check_interval); "
            f"{'unknown: ' + ', '.join(unknown) if unknown else 'one is missing'}"
        )
    name = data.setdefault("name", path.stem)
    try:
        config = RunConfig.from_dict(data)
        if overrides:
            config = config.replace(**overrides)
    except SparsetrainError as err:
        raise SparsetrainError(f"recipe {path}: {err}") from None
    if config.train.iterations <= 0:
        raise SparsetrainError(f"recipe {path}: a workload's budget is train.iterations; set it (epochs are not used)")
    return Workload(name, config, study["goal_error"], tuple(study["search"]), study.get("check_interval", 100))
