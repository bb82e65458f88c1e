"""Workloads of a steps-to-result study: a run recipe (``recipes/dps-*.toml``) read as a data
set, network and optimizer, a goal error, a step budget and the metaparameters searched.

A workload is an ordinary run recipe; three of its settings say what a result is:

- ``train.goal_error``: a trial is complete at the first check with validation error <= this;
- ``train.val_every``: the check interval (the full validation error every this many steps);
- ``train.iterations``: the step budget.

The metaparameters searched follow from the optimizer and schedule, as in effect-dps-public's
workloads: the learning rate always; the momentum when the recipe trains with momentum
(``train.momentum`` > 0, plain or Nesterov); the decay steps and the end learning-rate factor when
it decays linearly. In a study a linear schedule decays over the searched decay steps and then
holds (``linear-then-constant``: TF's ``polynomial_decay``, as the original), not over the whole
budget. Names, ranges and scales: :data:`SEARCH_SPACE`; their order is the Sobol dimensions'
(the original's ``--mparams_kind`` order).

    >>> w = load_workload("dps-mnist-simple-cnn-sgd")
    >>> w.goal_error, w.budget, w.search, w.check_interval
    (0.02, 40000, ('learning_rate',), 100)
    >>> load_workload("dps-cifar10-resnet-8-nesterov").search
    ('learning_rate', 'momentum', 'decay_steps', 'end_learning_rate_factor')
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.pipeline import DENSE
from sparsetrain.recipes import load_recipe


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
        if "decay_steps" in self.search:
            train["schedule"] = "linear-then-constant"
        prune: dict[str, Any] = {"sparsity": sparsity} if sparsity > 0 else {"method": DENSE, "sparsity": 0.0}
        return self.config.replace(seed=seed, train=train, prune=prune, name=f"{self.name}-b{batch_size}-s{sparsity:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict(), "goal_error": self.goal_error,
                "search": list(self.search), "check_interval": self.check_interval}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(data["name"], RunConfig.from_dict(data["config"]), float(data["goal_error"]),
                   tuple(data["search"]), int(data.get("check_interval", 100)))


def search_of(config: RunConfig) -> tuple[str, ...]:
    """The metaparameters a workload searches, from its optimizer and schedule (module docstring)."""
    t = config.train
    if t.optimizer != "sgd" or t.schedule not in ("constant", "linear"):
        raise SparsetrainError(
            f"a study workload trains with sgd (plain, momentum or Nesterov) and a constant or linear schedule, "
            f"as effect-dps-public; got optimizer {t.optimizer!r} with schedule {t.schedule!r}"
        )
    search = ("learning_rate",) + (("momentum",) if t.momentum > 0 else ())
    return search + (("decay_steps", "end_learning_rate_factor") if t.schedule == "linear" else ())


def load_workload(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Workload:
    """The workload of a bundled ``dps-*`` recipe (by name) or a recipe file; ``overrides``: changes
    to its run config as :meth:`RunConfig.replace` takes them (``{"train": {"iterations": 500}}``),
    e.g. a tiny model for tests."""
    config = load_recipe(name_or_path)
    where = f"recipe {config.name}"
    try:
        if overrides:
            config = config.replace(**overrides)
    except SparsetrainError as err:
        raise SparsetrainError(f"{where}: {err}") from None
    t = config.train
    if t.goal_error <= 0:
        raise SparsetrainError(f"{where} has no train.goal_error, so it is not a study workload; set the goal "
                               "validation error there (see the bundled dps-* recipes: sparsetrain list recipes)")
    if t.iterations <= 0:
        raise SparsetrainError(f"{where}: a workload's step budget is train.iterations; set it (epochs are not used)")
    if t.val_every <= 0:
        raise SparsetrainError(f"{where}: a workload checks the validation error every train.val_every steps; "
                               "set it (effect-dps-public: 100)")
    return Workload(config.name, config, t.goal_error, search_of(config), t.val_every)
