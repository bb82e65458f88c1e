"""Signal-propagation paper (Lee et al., ICLR 2020), experiment 2: signal propagation against sparsity.

``sparsetrain reproduce spp-jsv-sparsity`` prunes ``mlp-7`` (linear and tanh, ``variance-scaling``
initialisation as the Table 1 recipes) with SNIP on a batch of :data:`BATCH` MNIST training images
at each of :data:`SPARSITIES`, applies the mask to the weights that were scored (no re-initialisation:
the network as it would start training), and reports the input-output Jacobian singular values
(mean, max, min, std over :data:`EXAMPLES` MNIST test images; :func:`sparsetrain.signal.input_output_jsv`).
The paper's point: the JSV shrink (signal propagation degrades) as sparsity grows. Nothing trains
and nothing is recorded in the run store: ``--iterations`` is refused; ``--rows`` picks networks.

    >>> ROWS
    ('mlp-7-linear', 'mlp-7-tanh')
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data import load_dataset, preprocess
from ..errors import SparsetrainError
from ..init import initialize_
from ..masks import apply_mask_
from ..measure import Provenance
from ..models import create_model
from ..pruning import prune_at_init
from ..signal.jsv import input_output_jsv
from .common import EXPERIMENTS, ReproduceOptions, publish_untrained, untrained_rows
from ..measure import new_figure, png_beside, save_png

ROWS = ("mlp-7-linear", "mlp-7-tanh")
SPARSITIES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98, 0.99)
INIT = "variance-scaling"
BATCH = 100
EXAMPLES = 100


def jsv_against_sparsity(row: str, sparsities, seed: int, data_dir=None, examples: int | None = None) -> dict:
    """``{sparsity: JSVStats}`` for network ``row`` over the first ``examples`` test images
    (None: :data:`EXAMPLES`; see the module docstring)."""
    if row not in ROWS:
        raise SparsetrainError(f"unknown row {row!r}; spp-jsv-sparsity's rows are networks: {', '.join(ROWS)}")
    raw = load_dataset("mnist", data_dir)
    train_x, test_x, _, _ = preprocess(raw)
    idx = torch.randperm(len(raw.train_y), generator=torch.Generator().manual_seed(seed))[:BATCH]
    batch = (train_x[idx], raw.train_y[idx])
    model = create_model("mlp-7", input_shape=tuple(train_x.shape[1:]), num_classes=10,
                         activation=row.removeprefix("mlp-7-"))
    initialize_(model, INIT, seed)
    scored = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for s in sparsities:
        model.load_state_dict(scored)
        if s > 0:
            apply_mask_(model, prune_at_init(model, "snip", sparsity=s, batches=batch, seed=seed))
        out[s] = input_output_jsv(model, test_x[:examples or EXAMPLES])
    return out


@EXPERIMENTS.register("spp-jsv-sparsity")
def reproduce_spp_jsv_sparsity(options: ReproduceOptions) -> None:
    rows = untrained_rows(options, "spp-jsv-sparsity", ROWS, "networks")
    seed, started, provenance = options.seeds[0], time.time(), Provenance.now(options.command)
    results = {row: jsv_against_sparsity(row, SPARSITIES, seed, options.data_dir) for row in rows}
    out = Path(options.out)
    png = png_beside(out)
    fig = new_figure(4.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for row, stats in results.items():
        ax.plot([100 * s for s in stats], [st.mean for st in stats.values()], marker="o", label=row)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("mean input-output JSV")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, png)
    lines = ["# Signal-propagation paper, experiment 2: input-output JSV against sparsity", "",
             f"mlp-7 ({INIT} initialisation, seed {seed}) pruned by SNIP (weights only, global top-kappa) on "
             f"{BATCH} MNIST training images; the mask is applied to the scored weights (no re-initialisation). "
             f"Singular values of d logits / d input over {EXAMPLES} MNIST test images.", "",
             f"![mean JSV against sparsity]({png.name})", ""]
    for row, stats in results.items():
        lines += [f"## {row}", "", "| sparsity | mean | max | min | std |", "|---|---|---|---|---|"]
        lines += [f"| {s:.0%} | {st.mean:.4g} | {st.max:.4g} | {st.min:.4g} | {st.std:.4g} |" for s, st in stats.items()]
        lines.append("")
    data = {"init": INIT, "seed": seed, "batch": BATCH, "examples": EXAMPLES, "png": png.name,
            "jsv": {row: {str(s): st.to_dict() for s, st in stats.items()} for row, stats in results.items()}}
    publish_untrained(options.out, lines, data, provenance, started)
