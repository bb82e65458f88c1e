"""Approximate isometry: make each sparse layer's kept weights as close to orthogonal as the mask
allows (Lee, Ajanthan, Gould, Torr, "A signal propagation perspective for pruning neural
networks at initialization", ICLR 2020, section 5).

The paper minimises ``sum_l ||(C_l * W_l)^T (C_l * W_l) - I||_F`` over the weights ``W_l`` with
the masks ``C_l`` fixed, by plain SGD (lr 0.1, 10,000 steps) on all layers at once. Here:

- **Which matrices.** The mask's >= 2-D weights of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and the
  recurrent layers (``nn.RNN/LSTM/GRU`` and their cells); anything else in the mask (an
  embedding, a transposed convolution) is left alone and listed in ``IsometryReport.skipped``.
  A weight is read as ``weight.reshape(out, -1)``: a convolution's kernel becomes
  ``(c_out, c_in*k*k)``, the transpose of spp-public's ``(k*k*c_in, c_out)``, whose Gram matrix
  ``c_out x c_out`` it shares. A grouped convolution is one matrix per group (its operator is
  block-diagonal). A recurrent weight (``weight_ih``, ``weight_hh``: the gates stacked, 4 for an
  LSTM, 3 for a GRU, 1 for a vanilla RNN) is one matrix per gate: each gate's block is what
  multiplies the input or the previous hidden state, and the stacked ``(4h, h)`` matrix could
  only reach ``W^T W = I`` with every gate's Gram matrix at ``I / 4`` (singular values 1/2).
- **Orientation.** spp-public always takes the Gram matrix of the output side, ``W W^T`` in
  PyTorch's layout, which cannot reach ``I`` when there are more outputs than inputs (its rank is
  at most the input count: a first convolution ``64 x 27``). Here each matrix uses the Gram
  matrix of its smaller side (``W W^T`` when rows <= columns, else ``W^T W``), so the target is
  reachable; where the rows are the smaller side (every layer of MLP-7 and VGG-like but the first
  convolution) this is exactly the paper's penalty.
- **Separate problems.** The sum separates over layers (and blocks), so each matrix is optimised
  alone: the same objective, smaller problems, and a stopping rule per matrix.
- **The optimiser.** ``method="lbfgs"`` (the default): L-BFGS with a strong-Wolfe line search on
  the kept entries only, minimising the squared penalty ``||G - I||_F^2`` (smooth, same
  minimisers as the norm; its gradient ``4 (G - I) W`` restricted to the kept entries), stopped
  when the penalty ``||G - I||_F`` comes within ``tol`` of the pattern's floor (below) or a check
  interval of 25 iterations lowers it by less than a fraction ``tol``. ``"polar"``: projected polar iterations (the nearest
  orthogonal matrix, i.e. the polar factor ``U V^T`` of the SVD, then the mask re-applied),
  alternating projections that do not minimise the penalty exactly; for comparison.
  ``"sgd"``: the original, plain SGD with lr 0.1 on ``||G - I||_F`` (the norm, not its square).
  Pruned entries are never written: they stay exactly zero.
- **Reachable?** A generic sparsity pattern admits an exact isometry only if the kept count is
  at least the number of constraints, ``m (m + 1) / 2`` for an ``m x n`` matrix with
  ``m <= n`` (the entries of the symmetric ``G = I``), and never if a row of the smaller side
  kept nothing (a unit pruned away: each such row leaves 1 in ``||G - I||_F^2`` that no weight
  can remove, so ``sqrt(empty rows)`` is a floor). Below the count, the penalty's low points are
  special: weights concentrate on a few entries per row (a partial permutation is an exact
  isometry), and the paper's SGD moves there as well. The report says per matrix whether the
  count allows it and which fraction of the kept weights stayed alive (at least 1% of the
  matrix's RMS kept weight).

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> layer = torch.nn.Linear(64, 32)
    >>> mask = {"weight": torch.rand(32, 64) > 0.5}
    >>> report = approximate_isometry_(layer, mask)
    >>> report.penalty_after < 1e-3, bool((layer.weight[~mask["weight"]] == 0).all())
    (True, True)
    >>> bool(torch.allclose(torch.linalg.svdvals(layer.weight), torch.ones(32), atol=1e-3))
    True
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from ..masks import parameter_names, prunable_set, resolve_mask
from ..threads import DEFAULT_THREADS, SMALL_STEP_FLOPS, idle_cores, requested_threads

#: method -> default maximum steps (iterations of L-BFGS or of the polar projection; SGD steps)
METHODS: dict[str, int] = {"lbfgs": 2000, "polar": 300, "sgd": 10_000}
DEFAULT_TOL = 1e-3
SGD_LR = 0.1  # spp-public's approximate-isometry optimiser: plain SGD at a constant 0.1
CHECK_EVERY = 25  # iterations between stopping checks
ALIVE = 1e-2  # a kept weight counts as alive when |w| >= ALIVE * the matrix's RMS kept weight

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
CELL_GATES = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


@dataclass
class LayerIsometry:
    """One weight tensor's outcome (the sums over its blocks: groups or gates)."""

    name: str
    shape: list[int]
    blocks: int  # independent matrices: 1, a convolution's groups, or a recurrent weight's gates
    gram: int  # side of each block's Gram matrix (its smaller side)
    kept: int
    reachable: bool  # every block keeps >= gram * (gram + 1) / 2 entries and an entry in each row of its smaller side
    penalty_before: float  # sum over blocks of ||G - I||_F
    penalty_after: float
    floor: float  # sum over blocks of a lower bound no weights reach: sqrt(rank the pattern lacks)
    distance: float  # ||W - W0||_F / ||W0||_F over the tensor
    alive: float  # fraction of kept weights with |w| >= ALIVE * RMS of its block's kept weights
    steps: int  # the most iterations any block ran
    seconds: float


@dataclass
class IsometryReport:
    """What :func:`approximate_isometry_` did, per weight tensor, and the parameters it left out."""

    method: str
    layers: list[LayerIsometry] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def penalty_before(self) -> float:
        return sum(r.penalty_before for r in self.layers)

    @property
    def penalty_after(self) -> float:
        return sum(r.penalty_after for r in self.layers)

    @property
    def floor(self) -> float:
        return sum(r.floor for r in self.layers)

    @property
    def alive(self) -> float:
        kept = sum(r.kept for r in self.layers)
        return sum(r.alive * r.kept for r in self.layers) / kept if kept else 1.0

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.layers)

    def summary(self) -> dict:
        """A small record for a run's results: the sums, the kept-weighted alive fraction, the
        largest relative distance, and each tensor's final penalty."""
        return {
            "method": self.method,
            "penalty_before": self.penalty_before,
            "penalty_after": self.penalty_after,
            "floor": self.floor,
            "alive": self.alive,
            "max_distance": max((r.distance for r in self.layers), default=0.0),
            "seconds": self.seconds,
            "layers": {r.name: r.penalty_after for r in self.layers},
        }

    def to_dict(self) -> dict:
        return {"method": self.method, "layers": [asdict(r) for r in self.layers], "skipped": dict(self.skipped)}

    def table(self) -> str:
        """A Markdown table, one row per weight tensor and a total."""
        lines = ["| parameter | shape | Gram | kept | reachable | penalty before | after | floor | distance | alive | steps | s |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            lines.append(f"| {r.name} | {'x'.join(map(str, r.shape))} | {r.gram}{'' if r.blocks == 1 else f' x{r.blocks}'} "
                         f"| {r.kept:,} | {'yes' if r.reachable else 'no'} | {r.penalty_before:.4g} | {r.penalty_after:.4g} "
                         f"| {r.floor:.4g} | {r.distance:.3f} | {r.alive:.3f} | {r.steps} | {r.seconds:.2f} |")
        lines.append(f"| total | | | {sum(r.kept for r in self.layers):,} | | {self.penalty_before:.4g} | "
                     f"{self.penalty_after:.4g} | {self.floor:.4g} | | {self.alive:.3f} | | {self.seconds:.2f} |")
        return "\n".join(lines)


def isometry_penalty(matrix: torch.Tensor) -> float:
    """``||G - I||_F`` for the Gram matrix ``G`` of ``matrix``'s smaller side (``W W^T`` when
    rows <= columns, else ``W^T W``).

    >>> round(isometry_penalty(torch.eye(3)[:2] * 2), 4)   # G = 4 I (2 x 2): ||3 I||_F = sqrt(18)
    4.2426
    """
    a = _oriented(matrix)
    return float(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=a.dtype, device=a.device)))


def approximate_isometry_(model: nn.Module, mask: Mapping[str, torch.Tensor] | None = None, *,
                          steps: int | None = None, tol: float = DEFAULT_TOL, method: str = "lbfgs") -> IsometryReport:
    """Make the kept weights of each masked Linear, Conv and recurrent weight approximately an
    isometry, in place (see the module docstring for the objective and its choices).

    ``mask``: ``{parameter name: bool tensor}`` (True = kept), as from
    :func:`sparsetrain.prune_at_init`; None treats every >= 2-D weight of the default prunable
    set as fully kept (the nearest orthogonal matrices). Pruned entries stay exactly zero; biases
    and parameters outside the mask are not touched. ``steps``: the most iterations per matrix
    (default per method, :data:`METHODS`); ``tol``: stop a matrix when its penalty ``||G - I||_F``
    comes within ``tol`` of the pattern's floor (:func:`pattern_floor`; 0 where an isometry is
    possible) or a check interval lowers it by less than the fraction ``tol`` (0: run every step,
    as the original). Raises :class:`SparsetrainError` for an unknown method, a bad
    ``steps``/``tol``, a mask that does not fit the model, or a matrix whose kept weights are all
    zero (no optimiser can move it: the gradient vanishes there)."""
    if method not in METHODS:
        raise SparsetrainError(f"unknown approximate-isometry method {method!r}; choose one of {', '.join(METHODS)} "
                               "(lbfgs: the default; polar: projected polar iterations; sgd: the original)")
    steps = METHODS[method] if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SparsetrainError(f"approximate isometry: steps must be a positive whole number (got {steps!r})")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not (math.isfinite(tol) and tol >= 0):
        raise SparsetrainError(f"approximate isometry: tol must be a finite number >= 0 (got {tol!r}); "
                               "0 runs every step")
    if mask is None:
        params, _ = prunable_set(model)
        resolved = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items() if p.dim() >= 2}
    else:
        resolved = resolve_mask(mask, model)
    params = parameter_names(model)[0]
    report = IsometryReport(method)
    plans = {}
    for name in resolved:
        blocks, why = _blocks(model, name, params[name])
        if why:
            report.skipped[name] = why
        else:
            plans[name] = blocks
    for name, blocks in plans.items():  # every matrix checked before any weight changes
        p, m = params[name], resolved[name].to(params[name].device)
        for w_b, m_b in zip(p.detach().reshape(p.shape[0], -1).chunk(blocks), m.reshape(p.shape[0], -1).chunk(blocks)):
            if m_b.any() and not (w_b[m_b] != 0).any():
                raise SparsetrainError(
                    f"approximate isometry: the kept weights of {name!r} are all zero, where the penalty's gradient "
                    "vanishes and no optimiser can move them; initialise the weights with a random scheme first "
                    "(e.g. --reinit variance-scaling or orthogonal), not 'zeros'")
    for name, blocks in plans.items():
        report.layers.append(_layer(name, params[name], resolved[name].to(params[name].device), blocks,
                                    method, steps, tol))
    return report


def _blocks(model: nn.Module, name: str, p: torch.Tensor) -> tuple[int, str]:
    """How many independent row blocks ``p.reshape(out, -1)`` holds, or why it is left alone."""
    prefix, _, leaf = name.rpartition(".")
    owner = model.get_submodule(prefix) if prefix else model
    if p.dim() < 2:
        return 0, f"{p.dim()}-D (a bias or scale, not a weight matrix)"
    if isinstance(owner, nn.Linear) and leaf == "weight":
        return 1, ""
    if isinstance(owner, CONV) and leaf == "weight":
        return owner.groups, ""
    if isinstance(owner, nn.RNNBase) and leaf.startswith(("weight_ih", "weight_hh")):
        return GATES.get(owner.mode, 1), ""
    if isinstance(owner, nn.RNNBase) and leaf.startswith("weight_hr"):
        return 1, ""
    if isinstance(owner, tuple(CELL_GATES)) and leaf in ("weight_ih", "weight_hh"):
        return next(g for cls, g in CELL_GATES.items() if isinstance(owner, cls)), ""
    return 0, f"{type(owner).__name__}.{leaf}: not a Linear, Conv or recurrent weight"


def pattern_floor(keep: torch.Tensor) -> float:
    """A lower bound on ``||G - I||_F`` that no weights on the pattern ``keep`` (m x n, m <= n)
    can beat: ``sqrt(d)`` where ``d`` is how far the pattern's rank falls short of ``m``, counted
    simply: the rows that kept nothing (a zero diagonal entry of ``G``), or ``m`` minus the columns
    that kept something (``G``'s rank cannot exceed it), whichever is larger. SNIP often prunes
    whole units; the penalty of such a layer stops at this floor, whatever the optimiser.

    >>> pattern_floor(torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))   # one empty row
    1.0
    """
    m = keep.shape[0]
    empty_rows = int((~keep.any(dim=1)).sum())
    live_cols = int(keep.any(dim=0).sum())
    return math.sqrt(max(empty_rows, m - live_cols, 0))


def _oriented(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix with its smaller side first, so its Gram matrix ``A A^T`` can be ``I``."""
    return matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T


def _layer(name: str, p: nn.Parameter, mask: torch.Tensor, blocks: int, method: str, steps: int,
           tol: float) -> LayerIsometry:
    started = time.perf_counter()
    w0 = p.detach().reshape(p.shape[0], -1).clone()  # (out, fan_in): a kernel's (c_out, c_in*k*k)
    keep = mask.reshape(p.shape[0], -1)
    out = torch.zeros_like(w0)
    before = after = floor = 0.0
    alive = 0.0
    most = 0
    reachable = True
    for rows, w_b, m_b in zip(torch.arange(w0.shape[0], device=w0.device).chunk(blocks), w0.chunk(blocks), keep.chunk(blocks)):
        a, m = _oriented(w_b * m_b), _oriented(m_b)
        side = a.shape[0]
        reachable &= int(m.sum()) >= side * (side + 1) // 2 and bool(m.any(dim=1).all())
        bound = pattern_floor(m)
        floor += bound
        before += isometry_penalty(a)
        with _threads(a):
            solved, used = SOLVERS[method](a.clone(), m, steps, tol, bound)
        most = max(most, used)
        after += isometry_penalty(solved)
        kept = solved[m]
        if kept.numel():
            rms = kept.pow(2).mean().sqrt()
            alive += float((kept.abs() >= ALIVE * rms).sum())
        out[rows] = solved if solved.shape == w_b.shape else solved.T
    with torch.no_grad():
        p.copy_(torch.where(keep, out, torch.zeros_like(out)).reshape(p.shape))  # pruned entries: exactly 0
    total = int(keep.sum())
    norm0 = float(w0.norm())
    return LayerIsometry(
        name=name, shape=list(p.shape), blocks=blocks, gram=min(w0.shape[0] // blocks, w0.shape[1]), kept=total,
        reachable=bool(reachable), penalty_before=before, penalty_after=after, floor=floor,
        distance=float((p.detach().reshape_as(w0) - w0).norm()) / norm0 if norm0 else 0.0,
        alive=alive / total if total else 1.0, steps=most, seconds=time.perf_counter() - started,
    )


@contextlib.contextmanager
def _threads(a: torch.Tensor):
    """The training rule of :mod:`sparsetrain.threads` for one matrix on the CPU: one thread when an
    evaluation (``A A^T`` and ``(G - I) A``: ``2 m^2 n`` multiply-adds) is below
    :data:`SMALL_STEP_FLOPS`, else the idle cores; an explicit ``--threads`` wins. Small matrices
    on two busy threads run ten times slower than on one."""
    if a.device.type != "cpu" or requested_threads() is not None:
        yield
        return
    if 2 * a.shape[0] ** 2 * a.shape[1] < SMALL_STEP_FLOPS:
        n = 1
    else:
        idle = idle_cores()
        n = DEFAULT_THREADS if idle is None else max(1, min(DEFAULT_THREADS, math.floor(idle + 0.5)))
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stop(previous: float, current: float, tol: float, floor: float) -> bool:
    """The stopping rule: the penalty within ``tol`` of the pattern's floor (0 where the pattern
    allows an isometry: :func:`pattern_floor`), or an interval that lowered it by less than the
    fraction ``tol`` (never with ``tol = 0``)."""
    return tol > 0 and (current <= floor + tol or previous - current < tol * previous)


def _lbfgs(a: torch.Tensor, m: torch.Tensor, steps: int, tol: float, floor: float) -> tuple[torch.Tensor, int]:
    """L-BFGS (strong Wolfe) on the kept entries ``x`` of ``a`` (m x n, m <= n), minimising
    ``||A A^T - I||_F^2`` with its exact gradient ``4 (A A^T - I) A`` on the kept entries."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    x = a[m].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=CHECK_EVERY, history_size=20, tolerance_grad=0,
                            tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        w = torch.zeros_like(a).masked_scatter(m, x.detach())  # (m, n), pruned entries 0
        e = w @ w.T - eye  # (m, m)
        x.grad = 4 * (e @ w)[m]
        return e.pow(2).sum()

    previous = isometry_penalty(a)
    used = 0
    while used < steps:
        opt.param_groups[0]["max_iter"] = min(CHECK_EVERY, steps - used)
        opt.step(closure)
        done = opt.state[x]["n_iter"]
        stalled = done == used  # the line search found no descent: a stationary point
        used = done
        current = float(closure().sqrt())
        if stalled or _stop(previous, current, tol, floor) or not math.isfinite(current):
            break
        previous = current
    return torch.zeros_like(a).masked_scatter(m, x.detach()), used


def _polar(a: torch.Tensor, m: torch.Tensor, steps: int, tol: float, floor: float) -> tuple[torch.Tensor, int]:
    """Projected polar iterations: ``A <- mask * U V^T`` (the nearest matrix with orthonormal
    rows, then the pruned entries zeroed), checked every iteration."""
    previous = isometry_penalty(a)
    used = 0
    while used < steps:
        u, _, vh = torch.linalg.svd(a, full_matrices=False)  # (m, m), (m,), (m, n)
        a = (u @ vh) * m
        used += 1
        current = isometry_penalty(a)
        if _stop(previous, current, tol, floor):
            break
        previous = current
    return a, used


def _sgd(a: torch.Tensor, m: torch.Tensor, steps: int, tol: float, floor: float) -> tuple[torch.Tensor, int]:
    """spp-public's optimiser: plain SGD, lr 0.1, on ``||A A^T - I||_F`` (gradient
    ``2 (G - I) A / ||G - I||_F`` on the kept entries)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    keep = m.to(a.dtype)
    previous = isometry_penalty(a)
    used = 0
    while used < steps:
        e = a @ a.T - eye  # (m, m)
        norm = e.norm()
        if norm == 0:
            break
        a = a - SGD_LR * keep * (2 * (e @ a) / norm)
        used += 1
        if used % CHECK_EVERY == 0:
            current = isometry_penalty(a)
            if _stop(previous, current, tol, floor):
                break
            previous = current
    return a, used


SOLVERS = {"lbfgs": _lbfgs, "polar": _polar, "sgd": _sgd}
