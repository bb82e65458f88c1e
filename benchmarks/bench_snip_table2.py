"""Benchmark: SNIP's pruning cost on SNIP Table 2's networks, and what the recurrent reproduction takes.

Part 1, per network (vgg-d and wrn-16-8 on CIFAR-shaped batches of 128, lstm-b on sequential-MNIST
batches of 100: each recipe's batch; random inputs), measured in one process on one batch:

  (a) time of SNIP's mask (scores + global top-kappa selection) / time of one dense training step,
      target <= 1.1 (the issue: the plain autograd recipe gives about 1.15 on VGG-16 here)
  (b) peak tensor memory while pruning / peak of one dense training step, target <= 1.0

The mask is :func:`sparsetrain.prune_at_init` as a run calls it; the dense step is
:class:`sparsetrain.measure.TrainStep` (SGD momentum 0.9, weight decay 5e-4). Times are paired
medians from :func:`sparsetrain.measure.time_interleaved`; memory with
:func:`sparsetrain.measure.measure_memory` (the PyTorch profiler's allocation events), as
``benchmarks/bench_snip.py`` measures the LeNets.

Part 2: the step time of each recurrent network (lstm-s, lstm-b, gru-s, gru-b) at its recipe's batch
(100) on one thread, a masked step (the SNIP runs train under a GradientMask) and the evaluation of
1,000 sequences, and from them the time of one run of its recipe (60,000 iterations, validation on
6,000 and test on 10,000 examples every 1,000) and of the full reproduction (dense and SNIP, three
seeds: ``sparsetrain reproduce snip-table2 --rows lstm-s lstm-b gru-s gru-b --workers 2``).

    python benchmarks/bench_snip_table2.py                 # writes docs/results/bench_snip_table2.md and .json
    python benchmarks/bench_snip_table2.py --repeats 3 --models lstm-b --out -   # a quick look

This is a benchmark, not a test: it reports ratios against a dense step measured in the same
process and never fails on a missed target.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the profiler's start/stop lines (memory measurement)

import torch  # noqa: E402

import sparsetrain  # noqa: E402
from sparsetrain import GradientMask, apply_mask_, create_model, prune_at_init  # noqa: E402
from sparsetrain.config import RunConfig  # noqa: E402
from sparsetrain.measure import Provenance, TrainStep, measure_memory, publish_report, time_interleaved  # noqa: E402
from sparsetrain.recipes import recipe_path  # noqa: E402

TARGETS = {"a": 1.1, "b": 1.0}
# network -> (input shape of one example, batch of its recipe, sparsity of its Table 2 row)
NETWORKS = {
    "vgg-d": ((3, 32, 32), 128, 0.95),
    "wrn-16-8": ((3, 32, 32), 128, 0.95),
    "lstm-b": ((28, 28), 100, 0.95),
}
RECURRENT = ("lstm-s", "lstm-b", "gru-s", "gru-b")
SEEDS = 3  # a full reproduction: dense and SNIP, three seeds each


def snip_mask(model, x, y, sparsity: float):
    """SNIP's mask as a run finds it: scores, global top-kappa selection (the model is unchanged)."""
    return prune_at_init(model, "snip", sparsity=sparsity, batches=(x, y))


def batch(shape, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)


def bench_pruning(name: str, args) -> dict:
    """(a) and (b) for one network."""
    shape, size, sparsity = NETWORKS[name]
    torch.manual_seed(args.seed)
    base = create_model(name)
    x, y = batch(shape, size, args.seed + 1)
    mask = snip_mask(base, x, y, sparsity)
    prunable = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    dense = TrainStep(copy.deepcopy(base))
    ops = {
        "dense step": (dense.reset, lambda _: dense.step(x, y)),
        # prune_at_init leaves the model as it was, so every call scores the same weights
        "snip mask": (lambda: base, lambda m: snip_mask(m, x, y, sparsity)),
    }
    timed = time_interleaved(ops, rounds=args.repeats, warmup=args.warmup)

    def memory_of(op: str) -> tuple[int, int]:
        setup, run = ops[op]

        def factory():
            arg = setup()
            return lambda: run(arg)

        return measure_memory(factory, torch.device("cpu"))

    memory = {op: memory_of(op) for op in ops}
    return {
        "model": name,
        "input": [size, *shape],
        "sparsity": sparsity,
        "params": sum(p.numel() for p in base.parameters()),
        "prunable": prunable,
        "kept": kept,
        "kappa": round((1 - sparsity) * prunable),
        "median_ms": {op: 1e3 * timed.median(op) for op in ops},
        "spread": {op: timed.spread(op) for op in ops},
        "rounds": timed.rounds,
        "memory": memory,
        "a": timed.ratio("snip mask", "dense step"),
        "b": memory["snip mask"][0] / memory["dense step"][0],
    }


def bench_recurrent(name: str, args) -> dict:
    """Step times of one recurrent network at its recipe's batch, and the time of its runs."""
    recipe = RunConfig.from_toml(recipe_path(f"snip-table2-{name}-95"))
    t = recipe.train
    torch.manual_seed(args.seed)
    base = create_model(name)
    x, y = batch((28, 28), t.batch_size, args.seed + 1)
    ex, _ = batch((28, 28), 1000, args.seed + 2)
    mask = snip_mask(base, x, y, recipe.prune.sparsity)
    dense = TrainStep(copy.deepcopy(base))
    masked_model = apply_mask_(copy.deepcopy(base), mask)
    masked = TrainStep(masked_model, hooks=[GradientMask(masked_model, mask)])
    evaluated = copy.deepcopy(base).eval()

    @torch.no_grad()
    def evaluate():
        return evaluated(ex)

    ops = {
        "dense step": (dense.reset, lambda _: dense.step(x, y)),
        "masked step": (masked.reset, lambda _: masked.step(x, y)),
        "eval 1000": evaluate,
    }
    timed = time_interleaved(ops, rounds=args.rnn_repeats, warmup=args.warmup)
    step = {"dense": timed.median("dense step"), "snip": timed.median("masked step")}
    # per run: the training steps, a validation (6,000) and a test (10,000) pass every val_every
    # iterations, and the final test passes (final model and best-validation checkpoint)
    val_examples = round(t.val_fraction * 60000)
    checks = t.iterations // t.val_every
    eval_seconds = timed.median("eval 1000") * (checks * (val_examples + 10000) + 2 * 10000) / 1000
    run_seconds = {kind: t.iterations * s + eval_seconds for kind, s in step.items()}
    return {
        "model": name,
        "params": sum(p.numel() for p in base.parameters()),
        "batch": t.batch_size,
        "iterations": t.iterations,
        "median_ms": {op: 1e3 * timed.median(op) for op in ops},
        "spread": {op: timed.spread(op) for op in ops},
        "rounds": timed.rounds,
        "run_hours": {kind: s / 3600 for kind, s in run_seconds.items()},
        "network_hours": SEEDS * sum(run_seconds.values()) / 3600,
    }


def report(pruning: list[dict], recurrent: list[dict], args) -> str:
    mb = 1 / 2**20
    lines = [
        "# SNIP pruning cost on Table 2's networks, and the recurrent reproduction's time",
        "",
        f"- CPU, {torch.get_num_threads()} torch thread(s); sparsetrain {sparsetrain.__version__} (machine, "
        "command, date and load: at the end); random inputs of each recipe's shape and batch",
        f"- (a) = ratio of SNIP's mask (scores + global top-kappa selection, `prune_at_init`) to one dense "
        f"SGD training step on the same batch: the median over {args.repeats} interleaved rounds (after "
        f"{args.warmup} warm-up) of the per-round ratio; (b) = peak bytes of tensors allocated while pruning "
        "/ while one dense step runs (parameters, momentum buffers and the batch exist before both and are "
        "not counted); PyTorch profiler allocation events, median of 3",
        "",
        "## Part 1: pruning cost",
        "",
        "| network | batch | parameters | kept (kappa) | dense step (ms) | SNIP mask (ms) | (a) time | target | "
        "dense step peak (MiB) | pruning peak (MiB) | (b) memory | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in pruning:
        ms, mem = r["median_ms"], r["memory"]
        lines.append(
            f"| {r['model']} | {' x '.join(map(str, r['input']))} | {r['params']:,} | {r['kept']:,} ({r['kappa']:,}) | "
            f"{ms['dense step']:.0f} | {ms['snip mask']:.0f} | {r['a']:.3f} | <= {TARGETS['a']} "
            f"{'PASS' if r['a'] <= TARGETS['a'] else 'MISS'} | {mem['dense step'][0] * mb:.1f} | "
            f"{mem['snip mask'][0] * mb:.1f} | {r['b']:.3f} | <= {TARGETS['b']} "
            f"{'PASS' if r['b'] <= TARGETS['b'] else 'MISS'} |"
        )
    if recurrent:
        total = sum(r["network_hours"] for r in recurrent)
        lines += [
            "",
            "## Part 2: the recurrent rows' reproduction",
            "",
            f"Median step times at the recipes' batch (100) over {args.rnn_repeats} interleaved rounds; a run = "
            "60,000 steps plus a validation (6,000) and test (10,000) pass every 1,000 iterations and the two "
            "final test passes.",
            "",
            "| network | parameters | dense step (ms) | masked step (ms) | eval of 1,000 (ms) | one dense run (h) | "
            "one SNIP run (h) | 3 seeds x (dense + SNIP) (h) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in recurrent:
            ms = r["median_ms"]
            lines.append(
                f"| {r['model']} | {r['params']:,} | {ms['dense step']:.1f} | {ms['masked step']:.1f} | "
                f"{ms['eval 1000']:.0f} | {r['run_hours']['dense']:.2f} | {r['run_hours']['snip']:.2f} | "
                f"{r['network_hours']:.1f} |"
            )
        lines += [
            "",
            f"The 24 recurrent runs take about {total:.0f} h of one core at these step times: about "
            f"{total / 2:.0f} h with `--workers 2` on two otherwise idle cores (each run on one thread), "
            "longer on a shared machine. The command:",
            "",
            "    sparsetrain reproduce snip-table2 --workers 2 --out docs/results/snip_table2.md",
            "",
            "(without CIFAR-10 on the machine it runs the recurrent rows only and reports the CIFAR rows as "
            "not run).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(NETWORKS), choices=list(NETWORKS),
                   help="networks of part 1 (none: skip it)")
    p.add_argument("--recurrent", nargs="*", default=list(RECURRENT), choices=list(RECURRENT),
                   help="networks of part 2 (none: skip it)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds of part 1 (the big nets take seconds a step)")
    p.add_argument("--rnn-repeats", type=int, default=30, help="timed rounds of part 2")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the reproduction's runs "
                   "with --workers 2 on 2 cores each get one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_snip_table2.md", help="Markdown file to write ('-': none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    provenance = Provenance.now(["python", "benchmarks/bench_snip_table2.py", *argv])  # load before measuring
    pruning, recurrent = [], []
    for name in args.models:
        print(f"pruning cost of {name} ...", file=sys.stderr, flush=True)
        pruning.append(bench_pruning(name, args))
    for name in args.recurrent:
        print(f"step times of {name} ...", file=sys.stderr, flush=True)
        recurrent.append(bench_recurrent(name, args))
    text = report(pruning, recurrent, args)
    publish_report(args.out, text, {"pruning": pruning, "recurrent": recurrent, "args": vars(args)},
                   provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
