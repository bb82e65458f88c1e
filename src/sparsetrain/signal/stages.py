"""Signal propagation of one config at three stages: before pruning, after pruning, after
approximate isometry (``sparsetrain signal``).

The network is built as a run builds it (data, model, the scored initialization); its Jacobian
singular values are measured on the scored weights (*before pruning*), then the mask of
``config.prune`` is found and applied to the weights that train (the fresh draw of
``prune.reinit`` where set, as a run trains them: *after pruning*), and then those kept weights are
made approximately an isometry (*after isometry*, :func:`~sparsetrain.signal.isometry.approximate_isometry_`).
For each stage: the input-output JSV over ``examples`` test examples and the layerwise JSV on the
first ``layer_examples`` of them (:mod:`sparsetrain.signal.jsv`). Nothing trains and nothing is
recorded in the run store.

    >>> from sparsetrain import RunConfig
    >>> config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(prune={"sparsity": 0.9})
    >>> report = signal_stages(config, examples=20, layer_examples=10)
    >>> list(report.input_output)
    ['before pruning', 'after pruning', 'after isometry']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import SparsetrainError
from ..pipeline import DENSE, build, find_mask, init_under_mask, validate
from .isometry import IsometryReport, approximate_isometry_
from .jsv import JSVStats, format_jsv_table, input_output_jsv, layerwise_jsv

STAGES = ("before pruning", "after pruning", "after isometry")


@dataclass
class SignalReport:
    """The JSV of each stage: ``input_output[stage]`` and ``layerwise[stage][layer]``; the
    isometry step's report; the sparsity of the mask (0 for a dense config)."""

    config: RunConfig
    input_output: dict[str, JSVStats] = field(default_factory=dict)
    layerwise: dict[str, dict[str, JSVStats]] = field(default_factory=dict)
    isometry: IsometryReport | None = None
    sparsity: float = 0.0

    def markdown(self) -> str:
        """The tables: input-output per stage, layerwise (mean, max, min) per layer and stage, and
        what the isometry step did."""
        c = self.config
        lines = [f"# Signal propagation: {c.model} on {c.dataset}, {c.prune.method} at {self.sparsity:.2%}",
                 "", "Input-output Jacobian singular values (all examples' values pooled):", "",
                 format_jsv_table(self.input_output), "",
                 "Layerwise Jacobian singular values, mean / max / min (exact, or Lanczos estimates where marked):", ""]
        stages = list(self.layerwise)
        layers = list(dict.fromkeys(n for s in stages for n in self.layerwise[s]))
        lines += ["| layer | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
        for name in layers:
            cells = []
            for s in stages:
                j = self.layerwise[s].get(name)
                cells.append("-" if j is None else f"{j.mean:.3f} / {j.max:.3f} / {j.min:.3f}"
                             + ("" if j.method == "exact" else f" ({j.method})"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if self.isometry is not None:
            lines += ["", f"Approximate isometry ({self.isometry.method}) of the kept weights:", "", self.isometry.table()]
        return "\n".join(lines)

    def to_dict(self, bins: int = 50) -> dict[str, Any]:
        def stats(s: JSVStats) -> dict:
            return s.to_dict(bins=bins if s.values is not None else None)

        return {"config": self.config.to_dict(), "sparsity": self.sparsity,
                "input_output": {k: stats(v) for k, v in self.input_output.items()},
                "layerwise": {k: {n: stats(v) for n, v in d.items()} for k, d in self.layerwise.items()},
                "isometry": None if self.isometry is None else self.isometry.to_dict()}


def signal_stages(config: RunConfig, *, data_dir=None, device=None, examples: int = 1000, layer_examples: int = 100,
                  isometry_method: str = "lbfgs") -> SignalReport:
    """Measure ``config``'s network at the three stages (see the module docstring). A dense
    config (``prune.method = "dense"``) has the first and last stage only (isometry of every
    weight matrix, fully kept). ``examples``/``layer_examples``: test examples for the
    input-output and the layerwise JSV."""
    if examples < 1 or layer_examples < 1:
        raise SparsetrainError(f"examples and layer_examples must be >= 1, got {examples} and {layer_examples}")
    validate(config, training=False)
    # the weights as a run trains them, without the run's own isometry (this report does it as a stage)
    config = config.replace(prune={"isometry": False}, train={"execution": "dense"})
    built = build(config, data_dir=data_dir, device=device)
    x = _test_inputs(built.loaders.test, examples)
    report = SignalReport(config)

    def measure(stage: str, model: torch.nn.Module) -> None:
        report.input_output[stage] = input_output_jsv(model, x)
        report.layerwise[stage] = layerwise_jsv(model, x[:layer_examples])

    measure(STAGES[0], built.model)
    mask = None
    if config.prune.method != DENSE:
        mask = find_mask(config, built)
        model, _ = init_under_mask(config, built, mask)  # its gradient masks act in training only
        report.sparsity = _sparsity(mask)
        measure(STAGES[1], model)
    else:
        model = built.model
    repaired = copy.deepcopy(model)
    report.isometry = approximate_isometry_(repaired, mask, method=isometry_method)
    measure(STAGES[2], repaired)
    return report


def _test_inputs(loader, n: int) -> torch.Tensor:
    parts, seen = [], 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        parts.append(x[: n - seen])
        seen += len(parts[-1])
        if seen >= n:
            break
    if not parts:
        raise SparsetrainError("the test split is empty: no examples to measure the Jacobians on")
    return torch.cat(parts)


def _sparsity(mask) -> float:
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return 1 - kept / total if total else 0.0


def plot_histograms(report: SignalReport, path: str | Path, bins: int = 50) -> Path:
    """One PNG: the input-output singular values' histogram per stage (left), and each layer's
    mean singular value per stage (right)."""
    from ..measure import new_figure, save_png

    fig = new_figure(9.0, 3.4)
    ax = fig.add_subplot(1, 2, 1)
    values = [s.values for s in report.input_output.values() if s.values is not None]
    if values:
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        for stage, s in report.input_output.items():
            if s.values is not None:
                ax.hist(s.values.numpy(), bins=bins, range=(lo, hi), histtype="step", label=f"{stage} (mean {s.mean:.3f})")
    ax.set_xlabel("input-output Jacobian singular value")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    for stage, layers in report.layerwise.items():
        names = list(layers)
        ax2.plot(range(len(names)), [layers[n].mean for n in names], marker="o", label=stage)
    names = list(next(iter(report.layerwise.values()), {}))
    ax2.set_xticks(range(len(names)), names, rotation=60, fontsize=6, ha="right")
    ax2.set_ylabel("mean layerwise singular value")
    ax2.axhline(1.0, color="gray", linestyle=":")
    ax2.legend(fontsize=7)
    c = report.config
    fig.suptitle(f"{c.model}, {c.prune.method} {report.sparsity:.0%}", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
