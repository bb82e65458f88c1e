"""The plan of a study: the same quasi-random metaparameter points for every (batch size, sparsity).

Points come from ``scipy.stats.qmc.Sobol`` without scrambling, the origin skipped: the i-th trial
takes the (i + 1)-th point of the sequence, its j-th coordinate mapped onto the j-th searched
metaparameter (:meth:`Dimension.from_unit`). In the first two dimensions these are exactly
effect-dps-public's points (its ``i4_sobol_generate(m, n, skip=2)``: 0.5, 0.75, 0.25, 0.375, ...
and 0.5, 0.25, 0.75, 0.375, ...); from the third on, scipy's direction numbers (Joe and Kuo) and
the original's (Bratley and Fox) differ. Nothing here is random: the same study always has the
same trials.

    >>> [round(p["learning_rate"], 6) for p in plan_points(("learning_rate",), 4)]
    [0.01, 0.1, 0.001, 0.003162]
"""

from __future__ import annotations

import warnings

from sparsetrain.errors import SparsetrainError
from sparsetrain.study.workloads import SEARCH_SPACE


def unit_points(dimensions: int, count: int):
    """The first ``count`` points of the unscrambled Sobol sequence in ``dimensions`` dimensions,
    after the origin: an array of shape (count, dimensions)."""
    from scipy.stats import qmc

    if not isinstance(count, int) or count < 1:
        raise SparsetrainError(f"a plan needs at least one trial per point; got {count!r}")
    sobol = qmc.Sobol(d=dimensions, scramble=False)
    with warnings.catch_warnings():  # balance properties want powers of 2; the plan is a prefix by design
        warnings.simplefilter("ignore", UserWarning)
        return sobol.random(count + 1)[1:]  # (count, dimensions): the origin dropped


def plan_points(search: tuple[str, ...], count: int) -> list[dict[str, float | int]]:
    """The metaparameters of trials 0 .. ``count`` - 1: a dict search name -> value per trial."""
    units = unit_points(len(search), count)
    return [{name: SEARCH_SPACE[name].from_unit(float(u[j])) for j, name in enumerate(search)} for u in units]
