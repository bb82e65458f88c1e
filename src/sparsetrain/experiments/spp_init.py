"""Signal-propagation paper (Lee et al., ICLR 2020), experiments 1 and 6: what SNIP keeps per layer.

``sparsetrain reproduce spp-init`` (experiment 1): the fraction of each layer's weights that SNIP
keeps at :data:`INIT_SPARSITY` for well-scaled initialisations (``variance-scaling``,
``orthogonal``) against poorly scaled ones (``normal:std=1.0``, far too large: tanh units saturate;
``normal:std=0.001``, far too small: the signal vanishes with depth). The paper's point: poorly
scaled initialisations give scores that do not reflect each layer's role, and the pruning leaves
whole layers (towards the output) nearly empty or nearly full.

``sparsetrain reproduce spp-sculpt`` (experiment 6): the surviving width of every hidden layer after
SNIP at several sparsities (a Linear layer's output unit survives if it keeps some incoming weight
and some outgoing weight; a convolution's output channel likewise, the next layer's weights read
per channel), i.e. the architecture SNIP sculpts.

Networks: ``mlp-7`` with tanh (spp-public's MLP-7 for these figures is tanh) scored on a batch of
:data:`BATCH` MNIST training images, and ``vgg-like`` scored on Gaussian inputs of shape (3, 32, 32)
with random labels (CIFAR-10 is not available here). Only weights are pruned (biases kept),
global top-kappa. Nothing trains and nothing is recorded in the run store: ``--iterations`` is
refused; ``--rows`` picks networks, ``--seeds`` the first seed only.

    >>> ROWS
    ('mlp-7-tanh', 'vgg-like')
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..data import load_dataset, preprocess
from ..errors import SparsetrainError
from ..init import initialize_
from ..measure import Provenance
from ..models import create_model
from ..pruning import prune_at_init
from .common import EXPERIMENTS, ReproduceOptions, publish_untrained, untrained_rows
from ..measure import new_figure, png_beside, save_png

ROWS = ("mlp-7-tanh", "vgg-like")
INITS = ("variance-scaling", "orthogonal", "normal:std=1.0", "normal:std=0.001")
INIT_SPARSITY = 0.90
SCULPT_INIT = "variance-scaling"
SCULPT_SPARSITIES = (0.5, 0.9, 0.95, 0.98, 0.99)
BATCH = 100


def scoring_setup(row: str, seed: int, data_dir=None, batch: int = BATCH):
    """``(model, (inputs, targets))`` for network ``row``: mlp-7-tanh on ``batch`` MNIST training
    images, vgg-like on Gaussian (3, 32, 32) inputs with random labels (both drawn from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    if row == "mlp-7-tanh":
        raw = load_dataset("mnist", data_dir)
        train_x, _, _, _ = preprocess(raw)
        idx = torch.randperm(len(raw.train_y), generator=generator)[:batch]
        model = create_model("mlp-7", input_shape=tuple(train_x.shape[1:]), num_classes=10, activation="tanh")
        return model, (train_x[idx], raw.train_y[idx])
    if row == "vgg-like":
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        return create_model("vgg-like", input_shape=(3, 32, 32), num_classes=10), (x, y)
    raise SparsetrainError(f"unknown row {row!r}; the rows are networks: {', '.join(ROWS)}")


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and Conv modules of ``model`` in definition order, as ``(weight name, module)``."""
    return [(f"{n}.weight", m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def kept_per_layer(mask, layers) -> list[float]:
    """The fraction of each layer's weights that ``mask`` keeps."""
    return [float(mask[name].float().mean()) for name, _ in layers]


def surviving_units(mask, layers) -> list[int]:
    """For every weight layer but the last, how many of its output units (Linear) or channels
    (Conv) keep some incoming weight and some outgoing weight in the next layer (whose input
    columns are read per unit: a Linear after a flattened conv has C*H*W columns, grouped by
    channel)."""
    counts = []
    for (name, _), (nxt, _) in zip(layers, layers[1:]):
        m = mask[name]
        units = m.shape[0]
        incoming = m.reshape(units, -1).any(dim=1)
        after = mask[nxt]
        outgoing = after.transpose(0, 1).reshape(units, -1).any(dim=1) if after.dim() == 4 else \
            after.reshape(after.shape[0], units, -1).any(dim=2).any(dim=0)
        counts.append(int((incoming & outgoing).sum()))
    return counts


def _check(options: ReproduceOptions, name: str) -> list[str]:
    return untrained_rows(options, name, ROWS, "networks")


@EXPERIMENTS.register("spp-init")
def reproduce_spp_init(options: ReproduceOptions) -> None:
    rows = _check(options, "spp-init")
    seed, started, provenance = options.seeds[0], time.time(), Provenance.now(options.command)
    results: dict = {}
    for row in rows:
        model, batch = scoring_setup(row, seed, options.data_dir)
        layers = weight_layers(model)
        results[row] = {}
        for init in INITS:
            initialize_(model, init, seed)
            mask = prune_at_init(model, "snip", sparsity=INIT_SPARSITY, batches=batch, seed=seed)
            results[row][init] = kept_per_layer(mask, layers)
    png = _plot_layers(results, options.out, "layer", "weights kept (%)", f"SNIP {INIT_SPARSITY:.0%}", scale=100)
    lines = ["# Signal-propagation paper, experiment 1: weights kept per layer after SNIP, by initialisation", "",
             f"SNIP at {INIT_SPARSITY:.0%} sparsity (weights only, global top-kappa), nothing trained, seed {seed}. "
             f"mlp-7-tanh is scored on {BATCH} MNIST training images; vgg-like on {BATCH} Gaussian inputs of shape "
             "(3, 32, 32) with random labels (CIFAR-10 is not available here). Poorly scaled: normal:std=1.0 "
             "(too large) and normal:std=0.001 (too small).", "", f"![kept per layer]({png.name})", ""]
    lines += _layer_tables(results, "% of each layer's weights kept", "init", lambda k: f"{100 * k:.1f}")
    data = {"sparsity": INIT_SPARSITY, "seed": seed, "batch": BATCH, "png": png.name, "kept": results}
    publish_untrained(options.out, lines, data, provenance, started)


@EXPERIMENTS.register("spp-sculpt")
def reproduce_spp_sculpt(options: ReproduceOptions) -> None:
    rows = _check(options, "spp-sculpt")
    seed, started, provenance = options.seeds[0], time.time(), Provenance.now(options.command)
    results: dict = {}
    for row in rows:
        model, batch = scoring_setup(row, seed, options.data_dir)
        initialize_(model, SCULPT_INIT, seed)
        layers = weight_layers(model)
        full = [m.weight.shape[0] for _, m in layers[:-1]]
        results[row] = {"dense": full}
        for s in SCULPT_SPARSITIES:
            mask = prune_at_init(model, "snip", sparsity=s, batches=batch, seed=seed)
            results[row][f"{s:.0%}"] = surviving_units(mask, layers)
    png = _plot_layers(results, options.out, "hidden layer", "surviving units / channels", "widths after SNIP")
    lines = ["# Signal-propagation paper, experiment 6: the layer widths SNIP sculpts", "",
             f"SNIP ({SCULPT_INIT} initialisation, weights only, global top-kappa), nothing trained, seed {seed}. "
             "A unit (Linear output) or channel (Conv output) survives if it keeps some incoming and some "
             f"outgoing weight. mlp-7-tanh scored on {BATCH} MNIST images; vgg-like on {BATCH} Gaussian "
             "(3, 32, 32) inputs with random labels (no CIFAR-10 here).", "", f"![widths]({png.name})", ""]
    lines += _layer_tables(results, "surviving units per hidden layer", "sparsity", str)
    data = {"init": SCULPT_INIT, "seed": seed, "batch": BATCH, "png": png.name, "widths": results}
    publish_untrained(options.out, lines, data, provenance, started)


def _plot_layers(results: dict, out, xlabel: str, ylabel: str, title: str, scale: float = 1) -> Path:
    """One panel per network, one line per label over the layers (``results[network][label]`` is
    a value per layer, times ``scale``), written beside ``out``; returns the PNG's path."""
    png = png_beside(Path(out))
    fig = new_figure(4.5 * len(results), 3.2)
    for i, (row, curves) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        for label, values in curves.items():
            ax.plot(range(1, len(values) + 1), [scale * v for v in values], marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{row}: {title}", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, png)
    return png


def _layer_tables(results: dict, what: str, first: str, fmt) -> list[str]:
    """A Markdown table per network: a row per label, a column per layer, each value by ``fmt``."""
    lines: list[str] = []
    for row, curves in results.items():
        n = len(next(iter(curves.values())))
        lines += [f"## {row} ({what})", "", f"| {first} | " + " | ".join(f"L{j + 1}" for j in range(n)) + " |",
                  "|---" * (n + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(fmt(v) for v in values) + " |" for label, values in curves.items()]
        lines.append("")
    return lines
