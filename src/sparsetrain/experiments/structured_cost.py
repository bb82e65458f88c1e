"""What hardware-friendly mask shapes cost in test error against unstructured SNIP.

``sparsetrain reproduce structured-cost`` trains, per network, SNIP masks of each shape at a
matched sparsity, with everything else equal, and writes its table where ``--out`` says (default
``<store>/results/structured_cost.md``; the committed one: ``--out docs/results/structured_cost.md``)
and ``.json``; a shortened reproduction is titled so and never replaces a full table:

- unstructured SNIP at 50% against 2:4 SNIP (N:M, 50% by construction);
- unstructured SNIP at 90% against block SNIP at 90% (32x32 tiles; 8x8 on LeNet-5-Caffe, whose
  convolution weights viewed as (out, in*k*k) are 20x25 and 50x500, too small for 32x32 tiles:
  row ``lenet5-block32x32`` runs the 32x32 tiles anyway when asked for);
- the dense network as a reference.

Networks: LeNet-300-100 and LeNet-5-Caffe on MNIST, with the SNIP paper's Table 1 recipes
(``snip-table1-*``; every row of a network shares the training settings, only the mask differs),
shortened so the whole experiment fits in about half an hour of a 2-core CPU; and a CIFAR-shaped
VGG (``vgg-cifar-small``). CIFAR-10 is not available offline, so the VGG rows train on the
``synthetic`` data set with 3x32x32 examples (``data_args``): they show the masks' per-layer
layout and that they train, not a CIFAR-10 result. Every row goes through :func:`sparsetrain.run`
and is recorded under the group ``("experiment", "structured-cost")``: an interrupted experiment
resumes, finished runs are not repeated.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from ..errors import SparsetrainError
from ..measure import Provenance, write_report
from ..pruning.structured import NM, Blocks, parse_structure
from ..recipes import recipe_path
from .common import EXPERIMENTS, ReproduceOptions, check_out, mean_std, run_rows, shortened_reasons, titled

GROUP = ("experiment", "structured-cost")
SYNTHETIC = "synthetic"  # the VGG rows' data: the synthetic data set with CIFAR-shaped examples
SYNTHETIC_ARGS = {"n_train": 5000, "n_test": 1000, "shape": [3, 32, 32], "seed": 0}


@dataclass(frozen=True)
class Network:
    label: str
    model: str
    dataset: str
    data_args: dict[str, Any]
    dense_recipe: str  # Table 1 recipe of the dense row
    snip_recipe: str  # Table 1 recipe the SNIP rows take their pruning settings from
    iterations: int  # default length (``--iterations`` overrides)
    train: dict[str, Any] = field(default_factory=dict)  # changes shared by every row, stated below
    why: str = ""


NETWORKS = {
    "lenet300": Network("LeNet-300-100", "lenet-300-100", "mnist", {}, "snip-table1-lenet300-dense",
                        "snip-table1-lenet300-95", 10_000),
    "lenet5": Network(
        "LeNet-5-Caffe", "lenet-5-caffe", "mnist", {}, "snip-table1-lenet5-dense", "snip-table1-lenet5-98", 4_000,
        train={"lr": 0.01},
        why="lr 0.01 for every LeNet-5-Caffe row, as its dense Table 1 recipe: with lr 0.1 (the SNIP "
            "recipes at 98-99%) the 50% masks and the 90% block mask diverge within 50-300 iterations "
            "(linear convolutions), so no shared lr above 0.01 trains all rows",
    ),
    "vgg": Network(
        "VGG (vgg-cifar-small)", "vgg-cifar-small", SYNTHETIC, SYNTHETIC_ARGS, "snip-table1-lenet5-dense", "snip-table1-lenet5-98",
        200, train={"lr": 0.1},
        why="lr 0.1 for every row, the SNIP recipes' (batch-norm and ReLU keep the dense VGG stable there, "
            "unlike LeNet-5-Caffe's linear convolutions)",
    ),
}


@dataclass(frozen=True)
class Row:
    network: str  # key of NETWORKS
    shape: str  # "dense", "unstructured", or a structure ("2:4", "block32x32")
    sparsity: float
    baseline: str | None = None  # the unstructured row this one is compared with
    scope: str = "global"  # "layerwise": kappa per tensor (tiles per tensor for blocks)


ROWS = {
    "lenet300-dense": Row("lenet300", "dense", 0.0),
    "lenet300-snip50": Row("lenet300", "unstructured", 0.5),
    "lenet300-2:4": Row("lenet300", "2:4", 0.5, "lenet300-snip50"),
    "lenet300-snip90": Row("lenet300", "unstructured", 0.9),
    "lenet300-block32x32": Row("lenet300", "block32x32", 0.9, "lenet300-snip90"),
    "lenet300-block32x32-layerwise": Row("lenet300", "block32x32", 0.9, "lenet300-snip90", "layerwise"),
    "lenet5-dense": Row("lenet5", "dense", 0.0),
    "lenet5-snip50": Row("lenet5", "unstructured", 0.5),
    "lenet5-2:4": Row("lenet5", "2:4", 0.5, "lenet5-snip50"),
    "lenet5-snip90": Row("lenet5", "unstructured", 0.9),
    "lenet5-block8x8": Row("lenet5", "block8x8", 0.9, "lenet5-snip90"),
    "lenet5-block8x8-layerwise": Row("lenet5", "block8x8", 0.9, "lenet5-snip90", "layerwise"),
    "lenet5-block32x32": Row("lenet5", "block32x32", 0.9, "lenet5-snip90"),
    "vgg-dense": Row("vgg", "dense", 0.0),
    "vgg-snip50": Row("vgg", "unstructured", 0.5),
    "vgg-2:4": Row("vgg", "2:4", 0.5, "vgg-snip50"),
    "vgg-snip90": Row("vgg", "unstructured", 0.9),
    "vgg-block32x32": Row("vgg", "block32x32", 0.9, "vgg-snip90"),
    "vgg-block32x32-layerwise": Row("vgg", "block32x32", 0.9, "vgg-snip90", "layerwise"),
}
# Optional rows (``--rows``): LeNet-5-Caffe's global 8x8 blocks leave every layer some tiles, so
# the per-layer variant is not needed there, and 32x32 tiles hardly fit its weights (see the notes).
DEFAULT_ROWS = [r for r in ROWS if r not in ("lenet5-block8x8-layerwise", "lenet5-block32x32")]


# --- configs ---------------------------------------------------------------------------------

def structure_of(shape: str) -> str:
    """A row's mask shape as ``PruneConfig.structure``: "" for dense and unstructured."""
    return "" if shape in ("dense", "unstructured") else shape


def row_config(row_name: str, seed: int, iterations: int | None = None) -> RunConfig:
    """The run of ``row_name`` for ``seed``: the network's Table 1 recipe (dense or SNIP) with the
    row's mask and the network's shared training changes; ``iterations`` (default: the network's)
    shortens it, the step decays and the validation/test checks moving with the length."""
    row = ROWS[row_name]
    net = NETWORKS[row.network]
    dense = row.shape == "dense"
    base = RunConfig.from_toml(recipe_path(net.dense_recipe if dense else net.snip_recipe))
    length = iterations or net.iterations
    t = base.train
    train = {"iterations": length, "epochs": 0.0, **net.train}
    if t.schedule == "step" and t.iterations:
        # x0.1 at the same fractions of training as the recipe (25k of 60k, or of 30k)
        train["decay_every"] = max(1, round(t.decay_every * length / t.iterations))
    train["val_every"] = _every(t.val_every, length)
    train["test_every"] = _every(t.test_every, length)
    prune = {"structure": structure_of(row.shape), "scope": row.scope}
    if not dense:
        prune["sparsity"] = row.sparsity
    return base.replace(model=net.model, dataset=net.dataset, data_args=dict(net.data_args), seed=seed,
                        name=f"structured-cost/{row_name}", prune=prune, train=train)


def _every(recipe_every: int, length: int) -> int:
    """The recipe's check interval, or a quarter of a run too short for it (0 stays 0)."""
    return min(recipe_every, max(1, length // 4)) if recipe_every else 0


def configs_for(rows: list[str], seeds: list[int], iterations: int | None) -> list[RunConfig]:
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SparsetrainError(f"unknown row(s) {unknown}; rows: {', '.join(ROWS)}")
    if not seeds:
        raise SparsetrainError("give at least one seed (--seeds 0)")
    if iterations is not None and iterations < 1:
        raise SparsetrainError(f"--iterations must be at least 1, got {iterations}")
    configs = [row_config(r, s, iterations) for r in rows for s in seeds]
    # the long LeNet-5 runs first, so that the workers finish together
    return sorted(configs, key=lambda c: c.model != "lenet-5-caffe")


def row_of(config: RunConfig) -> str:
    return config.name.removeprefix("structured-cost/")


def left_dense(shape: tuple[int, ...], mask_shape: str) -> str | None:
    """Why a parameter of ``shape`` cannot take a row's ``mask_shape`` (so stays dense), or None."""
    layout = parse_structure(structure_of(mask_shape))
    if layout is None:
        return None
    if len(shape) < 2:
        return "1-D: no rows to structure"
    row = math.prod(shape[1:])
    if isinstance(layout, NM) and row % layout.m:
        return f"rows of {row}, not a multiple of {layout.m}"
    return None


def view_2d(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{math.prod(shape[1:])}" if len(shape) >= 2 else f"{shape[0]}"


# --- the command -----------------------------------------------------------------------------

@EXPERIMENTS.register("structured-cost")
def reproduce_structured_cost(options: ReproduceOptions) -> None:
    rows = list(options.rows or DEFAULT_ROWS)
    configs = configs_for(rows, list(options.seeds), options.iterations)
    reasons = shortened_reasons(seeds=options.seeds, rows=rows, default_rows=DEFAULT_ROWS,
                                iterations=options.iterations,
                                recipe_iterations=[NETWORKS[ROWS[r].network].iterations for r in rows])
    check_out(options, reasons)  # before anything trains
    provenance = Provenance.now(options.command)
    started = time.time()
    records, failures = run_rows(configs, options, GROUP)
    outcomes = {k: {"results": r.results, "layers": r.layer_sparsity or {}} for k, r in records.items()}
    print(write_table(rows, configs, outcomes, options.out, time.time() - started, provenance, shortened=reasons))
    if failures:
        raise SparsetrainError(f"{len(failures)} run(s) failed (the others are in the table): " + "; ".join(failures))


# --- the table -------------------------------------------------------------------------------

def summarise(rows: list[str], configs: list[RunConfig], outcomes: dict[str, dict]) -> dict[str, dict]:
    """Per row: its settings and the finished runs' results, one entry per seed."""
    summary = {}
    for r in rows:
        row, mine = ROWS[r], [c for c in configs if row_of(c) == r]
        summary[r] = {
            "network": NETWORKS[row.network].label,
            "model": NETWORKS[row.network].model,
            "dataset": NETWORKS[row.network].dataset,
            "shape": row.shape,
            "scope": row.scope,
            "target_sparsity": row.sparsity,
            "baseline": row.baseline,
            "iterations": mine[0].train.iterations if mine else None,
            "runs": [
                {"seed": c.seed, "key": c.key(), **outcomes[c.key()]["results"],
                 "layer_sparsity": outcomes[c.key()]["layers"]}
                for c in sorted(mine, key=lambda c: c.seed) if c.key() in outcomes
            ],
        }
    return summary


def paired_delta(runs: list[dict], baseline: list[dict], metric: str) -> str:
    """Mean ± std over seeds of (this row - the baseline row), in percentage points."""
    base = {x["seed"]: x[metric] for x in baseline if x.get(metric) is not None}
    diffs = [x[metric] - base[x["seed"]] for x in runs if x.get(metric) is not None and x["seed"] in base]
    if not diffs:
        return "-"
    text = f"{100 * statistics.mean(diffs):+.2f}"
    return text + (f" ± {100 * statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "")


def _shape_label(shape: str, scope: str = "global") -> str:
    layout = parse_structure(structure_of(shape))
    if isinstance(layout, Blocks):
        text = f"block {layout.rows}x{layout.cols}"
    else:
        text = f"{shape} (N:M)" if isinstance(layout, NM) else shape
    return text + (", per-layer kappa" if scope == "layerwise" else "")


def _data_label(dataset: str) -> str:
    return "synthetic 3x32x32 (not CIFAR-10)" if dataset == SYNTHETIC else dataset.upper()


def main_table(summary: dict[str, dict]) -> list[str]:
    lines = [
        "| network | data | mask shape | sparsity: target / achieved | iterations | seeds | final | best val "
        "| Δ final vs unstructured | Δ best val vs unstructured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, s in summary.items():
        runs = s["runs"]
        achieved = [x["sparsity"] for x in runs]
        achieved_text = f"{100 * statistics.mean(achieved):.2f}%" if achieved else "-"
        if s["shape"] == "dense":
            d_final = d_best = "(reference)"
        elif s["baseline"] is None:
            d_final = d_best = "(baseline)"
        else:
            base = summary.get(s["baseline"], {"runs": []})["runs"]
            d_final = paired_delta(runs, base, "test_error_final")
            d_best = paired_delta(runs, base, "test_error_best_val")
        iterations = f"{s['iterations']:,}" if s["iterations"] else "-"
        lines.append(
            f"| {s['network']} | {_data_label(s['dataset'])} | {_shape_label(s['shape'], s['scope'])} | "
            f"{s['target_sparsity']:.0%} / {achieved_text} | {iterations} | {len(runs)} | "
            f"{mean_std([x['test_error_final'] for x in runs])} | "
            f"{mean_std([x['test_error_best_val'] for x in runs])} | {d_final} | {d_best} |"
        )
    return lines


def layer_tables(summary: dict[str, dict]) -> list[str]:
    """Per network: each layer's sparsity under each mask (first seed), the layers a structure
    had to leave dense, and the layers a mask removed entirely (which cuts the network)."""
    lines: list[str] = []
    for net in dict.fromkeys(s["network"] for s in summary.values()):
        rows = {r: s for r, s in summary.items() if s["network"] == net and s["shape"] != "dense" and s["runs"]}
        if not rows:
            continue
        first = {r: s["runs"][0]["layer_sparsity"] for r, s in rows.items()}
        layers = sorted(dict.fromkeys(n for layer in first.values() for n in layer), key=_parameter_order)
        labels = {r: f"{_shape_label(s['shape'], s['scope'])} {s['target_sparsity']:.0%}" for r, s in rows.items()}
        lines += ["", f"**{net}** (seed {next(iter(rows.values()))['runs'][0]['seed']}):", "",
                  f"| layer | shape | 2-D view | {' | '.join(labels.values())} |",
                  "|---|---|---|" + "---|" * len(rows)]
        dense_notes, removed = [], []
        for name in layers:
            shape = next(tuple(layer[name]["shape"]) for layer in first.values() if name in layer)
            cells = []
            for r, s in rows.items():
                info = first[r].get(name)
                cells.append("-" if info is None else f"{100 * info['sparsity']:.1f}%")
                why = left_dense(shape, s["shape"])
                if why and len(shape) >= 2:
                    dense_notes.append(f"`{name}` {view_2d(shape)} under {labels[r]}: {why}")
                if info is not None and info["kept"] == 0 and len(shape) >= 2:
                    removed.append(f"`{name}` under {labels[r]}")
            lines.append(f"| `{name}` | {shape} | {view_2d(shape)} | " + " | ".join(cells) + " |")
        if dense_notes:
            lines += ["", "Left dense by the structure: " + "; ".join(dense_notes) + "."]
        if removed:
            lines += ["", "**Removed entirely** (no path from input to output is left: the network cannot "
                      "learn, whatever the training): " + "; ".join(removed) + "."]
    return lines


def _parameter_order(name: str) -> tuple:
    """``"0.10.weight"`` -> ((0, 10), 0): module path, then weight before bias."""
    *path, leaf = name.split(".")
    return tuple(int(p) if p.isdigit() else p for p in path), {"weight": 0, "bias": 1}.get(leaf, 2), leaf


def write_table(rows, configs, outcomes, out, seconds: float, provenance: Provenance | None,
                shortened: list[str] = ()) -> str:
    summary = summarise(rows, configs, outcomes)
    nets = dict.fromkeys(ROWS[r].network for r in rows)
    lines = [
        "# " + titled("The error cost of hardware-friendly SNIP masks", list(shortened)),
        "",
        "Test error (%) as mean ± std over seeds. *final*: the model at the end of training; *best val*: "
        "the checkpoint with the lowest error on the 10% validation split. *Δ vs unstructured*: this "
        "row's error minus that of unstructured SNIP at the same sparsity, seed by seed, in percentage "
        "points (positive: the structure costs error). *2:4*: the top 2 of every 4 connection "
        "sensitivities along each row of a weight viewed as (out, in*k*k); *block RxC*: SNIP scores "
        "summed over RxC tiles of that view, whole tiles kept or dropped: global top-kappa over all tiles, "
        "or with *per-layer kappa* round(tiles x (1 - sparsity)), at least one, in each weight. Summed over "
        "a tile, scores rank tiles mostly by their layer's mean sensitivity, so the global selection can "
        "drop a large layer entirely (listed below as *removed entirely* when it does). "
        "*Achieved* sparsity counts every pruned parameter: biases are pruned by unstructured SNIP (as "
        "the paper) but have no rows, so the structured masks leave them dense, as they do layers the "
        "pattern does not fit (listed below); block edge tiles are smaller than a full tile.",
        "",
        *main_table(summary),
        "",
        "## Recipes",
        "",
    ]
    for key in nets:
        net = NETWORKS[key]
        whose = "the SNIP paper's Table 1 recipe" + (" of LeNet-5-Caffe" if key == "vgg" else "")
        line = (f"- **{net.label}**: every row is {whose} (`{net.snip_recipe}` for the "
                f"SNIP rows, `{net.dense_recipe}` for the dense one: variance-scaling init, weights and biases "
                "scored on one mini-batch of 100, a fresh variance-scaling draw trained under the mask; SGD "
                "momentum 0.9, batch 100, weight decay 5e-4) shortened to the iterations above, its x0.1 "
                "step decays moved to the same fractions of training, validation every "
                f"min(1,000, iterations/4) iterations")
        if net.why:
            line += f"; {net.why}"
        if key == "vgg":
            line += (f". Data: the `synthetic` data set with data_args {SYNTHETIC_ARGS} (a noisy prototype per "
                     "class; CIFAR-10 is not available offline). Class prototypes plus noise say little about natural images: "
                     "these rows show the masks' layout and that they train, **not** what the structures cost "
                     "on CIFAR-10")
        lines.append(line + ".")
    lines += [
        "",
        "The LeNet-5-Caffe blocks are 8x8 rather than 32x32: its weights viewed as (out, in*k*k) are 20x25 "
        "(conv 1), 50x500 (conv 2), 500x800 and 10x500 (fc), so 32x32 tiles would make conv 1 a single tile, "
        "kept or dropped whole, and conv 2 two tile rows (row `lenet5-block32x32` runs them anyway: "
        "`--rows lenet5-snip90 lenet5-block32x32`).",
        "",
        "## Per-layer sparsity of the masks",
        *layer_tables(summary),
        "",
        f"Wall time of this invocation {seconds / 60:.1f} min (runs already in the store are not repeated).",
    ]
    meta = {"seconds": seconds} | ({"shortened": list(shortened)} if shortened else {})
    md, _ = write_report(out, "\n".join(lines), {"meta": meta, "rows": summary}, provenance=provenance)
    return md.read_text()
