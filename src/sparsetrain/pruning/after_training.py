"""Pruning after training: masks from the magnitudes of trained weights, and the round schedules of
LWC (Han et al. 2015) and the lottery ticket (Frankle & Carbin 2019).

These two methods are not scorers at initialization (``prune_at_init`` and its ``METHODS``): they
prune a network that was trained, and train again. This module holds what is pure about them (their
options, their rounds, the mask of a round); :mod:`sparsetrain.posttrain` arranges the runs (the
dense parent, one child run per round).

- ``lwc``: the trained dense network pruned by weight magnitude to the target sparsity, the survivors
  retrained from their trained values. With ``prune.rounds`` R > 1 (Han's iterative variant) it
  prunes and retrains R times along ``prune.round_schedule``, each round pruning the previous
  round's retrained weights.
- ``lottery``: the trained dense network pruned by magnitude, ``fraction`` of the remaining weights
  per round (20%, as the paper), the survivors rewound to their values at iteration ``rewind`` of the
  dense run (0: the initialization, Frankle & Carbin; k > 0: Frankle et al. 2020's rewinding) and
  retrained; the next round prunes the retrained weights. The last round prunes to exactly the
  target sparsity (its fraction is the rest, at most ``fraction``).

    >>> lottery_sparsities(0.5, 0.2)  # 20%, 36%, 48.8%, then the rest to 50%
    [0.2, 0.36, 0.488, 0.5]
    >>> import torch
    >>> w = {"a": torch.tensor([0.5, -3.0, 0.1]), "b": torch.tensor([2.0, -0.2])}
    >>> {n: m.tolist() for n, m in magnitude_mask(w, None, 0.6).items()}  # keep the 2 largest |w|
    {'a': [False, True, False], 'b': [True, False]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import SparsetrainError
from ..options import build_options
from .rounds import never_revive, round_sparsities
from .select import select_top


@dataclass(frozen=True)
class LwcOptions:
    """Han et al.'s magnitude pruning with retraining."""

    iterations: int = field(default=0, metadata={"help": "retraining iterations of each round (0: the "
                                                         "config's own training length)"})
    lr_factor: float = field(default=1.0, metadata={"help": "retraining learning rate / train.lr (Han et al. "
                                                            "retrain at 1/10 to 1/100 of the original rate)"})


@dataclass(frozen=True)
class LotteryOptions:
    """Frankle & Carbin's iterative magnitude pruning with rewinding."""

    fraction: float = field(default=0.2, metadata={"help": "fraction of the remaining weights pruned per "
                                                           "round, in (0, 1)"})
    rewind: int = field(default=0, metadata={"help": "iteration of the dense run the survivors are rewound "
                                                     "to (0: the initialization)"})
    max_rounds: int = field(default=25, metadata={"help": "most rounds (each retrains the network) the "
                                                          "target sparsity may take at this fraction"})


@dataclass(frozen=True)
class AfterTraining:
    """A method that prunes a trained network: its name, options and one line on what it does."""

    name: str
    options: type
    summary: str


#: The pruning methods that prune after training (``prune.method``), beside the scorers at
#: initialization of :data:`sparsetrain.pruning.METHODS`.
AFTER_TRAINING: dict[str, AfterTraining] = {
    "lwc": AfterTraining("lwc", LwcOptions, "prunes after training: magnitude of the trained dense "
                                            "network, survivors retrained from their trained values "
                                            "(Han et al. 2015; prune.rounds > 1: iterative)"),
    "lottery": AfterTraining("lottery", LotteryOptions, "prunes after training: iterative magnitude "
                                                        "pruning, survivors rewound to iteration "
                                                        "`rewind` and retrained (Frankle & Carbin 2019)"),
}


def after_training_options(method: str, values: Mapping[str, Any] | Any | None = None) -> Any:
    """``method``'s options as its dataclass, checked (unknown keys and wrong types raise
    :class:`SparsetrainError` naming the valid keys), and their ranges."""
    opts = build_options(AFTER_TRAINING[method].options, values, "option", f"of pruning method {method!r}")
    if isinstance(opts, LwcOptions):
        if opts.iterations < 0:
            raise SparsetrainError(f"option 'iterations' of pruning method 'lwc' must be >= 0 (0: the config's "
                                   f"training length); got {opts.iterations}")
        if not (math.isfinite(opts.lr_factor) and opts.lr_factor > 0):
            raise SparsetrainError(f"option 'lr_factor' of pruning method 'lwc' multiplies train.lr for retraining "
                                   f"and must be a positive number (Han et al.: 0.1 to 0.01); got {opts.lr_factor}")
    if isinstance(opts, LotteryOptions):
        if not (math.isfinite(opts.fraction) and 0.0 < opts.fraction < 1.0):
            raise SparsetrainError(f"option 'fraction' of pruning method 'lottery' is the fraction of the remaining "
                                   f"weights pruned per round and must lie in (0, 1) (the paper: 0.2); got "
                                   f"{opts.fraction}")
        if opts.rewind < 0:
            raise SparsetrainError(f"option 'rewind' of pruning method 'lottery' is an iteration of the dense run, "
                                   f">= 0 (0: the initialization); got {opts.rewind}")
        if opts.max_rounds < 1:
            raise SparsetrainError(f"option 'max_rounds' of pruning method 'lottery' must be >= 1; got "
                                   f"{opts.max_rounds}")
    return opts


def check_rewind(rewind: int, total: int) -> None:
    """Refuse a rewind point past the end of a dense run of ``total`` iterations."""
    if rewind > total:
        raise SparsetrainError(
            f"option 'rewind' of pruning method 'lottery' ({rewind}) is past the end of the dense run "
            f"({total} iterations): choose an iteration from 0 to {total}"
        )


def lottery_sparsities(sparsity: float, fraction: float, max_rounds: int | None = None) -> list[float]:
    """The sparsity after each round when every round prunes ``fraction`` of the remaining weights,
    as many rounds as reach ``sparsity``; the last round prunes to exactly ``sparsity``. More rounds
    than ``max_rounds`` raise :class:`SparsetrainError` saying how many it would take."""
    if not 0.0 < sparsity < 1.0:
        raise SparsetrainError(f"lottery prunes to a sparsity in (0, 1); got {sparsity} (0 prunes nothing: "
                               "use method 'dense')")
    steps: list[float] = []
    while not steps or steps[-1] < sparsity - 1e-12:
        steps.append(round(1.0 - (1.0 - fraction) ** (len(steps) + 1), 12))
    steps[-1] = sparsity
    if max_rounds is not None and len(steps) > max_rounds:
        raise SparsetrainError(
            f"lottery cannot reach sparsity {sparsity} in max_rounds={max_rounds} rounds pruning "
            f"{fraction:g} of the remaining weights each: it takes {len(steps)} (each round retrains the "
            f"network); raise prune.options.max_rounds to {len(steps)} or the fraction, or lower the sparsity"
        )
    return steps


def after_training_sparsities(method: str, sparsity: float, options: Any, rounds: int = 1,
                              schedule: str = "exponential") -> list[float]:
    """The sparsity of each round of ``method``: lottery's rounds of ``options.fraction``; lwc's
    ``rounds`` along ``schedule`` (:func:`sparsetrain.pruning.round_sparsities`)."""
    if method == "lottery":
        if rounds != 1:
            raise SparsetrainError(
                f"lottery's rounds follow from its per-round fraction (prune.options.fraction, default 0.2), "
                f"not from prune.rounds ({rounds}): leave prune.rounds at 1 and set the fraction"
            )
        return lottery_sparsities(sparsity, options.fraction, options.max_rounds)
    if not 0.0 < sparsity < 1.0:
        raise SparsetrainError(f"lwc prunes to a sparsity in (0, 1); got {sparsity} (0 prunes nothing: use "
                               "method 'dense')")
    return round_sparsities(sparsity, rounds, schedule)


def magnitude_mask(weights: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor] | None,
                   sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Keep the largest ``|w|`` at ``sparsity`` (exact top-kappa, ties to the first entries, the
    layer budget of ``scope``: :func:`sparsetrain.pruning.select_top`); entries ``previous`` pruned
    stay pruned whatever their value."""
    scores = {n: w.detach().abs() for n, w in weights.items()}
    if previous is not None:
        scores = never_revive(scores, dict(previous))
    return select_top(scores, sparsity, scope)
