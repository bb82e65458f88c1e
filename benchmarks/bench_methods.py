"""Benchmark: every registered pruning method's mask time / one dense training step, side by side.

For each method of :func:`sparsetrain.pruning.list_methods` (random, magnitude, snip, grasp,
synflow, iter-snip, force), with its default options, on LeNet-5-Caffe (MNIST shape 1x28x28, batch
100, sparsity 0.99) and VGG-D (CIFAR shape 3x32x32, batch 128, sparsity 0.95), measured in one
process on one batch of random inputs of the right shape (the cost does not depend on the values):

  (a) time of the method's mask (``prune_at_init``: scores + global top-kappa selection) / time
      of one dense SGD training step on the same batch (:class:`sparsetrain.measure.TrainStep`)
  (b) peak bytes of tensors allocated while pruning / while one dense step runs

The self-iterating methods run their default rounds (SynFlow 100, iterative SNIP and FORCE 60), so
their (a) is about that many backward passes: that is the figure. Times are paired medians of
interleaved rounds (:func:`sparsetrain.measure.time_interleaved`); on the networks named by
``--once`` (default vgg-d, where one FORCE mask takes minutes on one thread) the self-iterating
methods are timed once each, right after the interleaved rounds, against the median dense step.
Memory is one measurement of the PyTorch profiler's allocation events per operation (on the CPU
allocator they repeat exactly); the self-iterating methods' memory is measured with 2 rounds
instead of their default, since rounds run one after another and hold the same tensors each.

    python benchmarks/bench_methods.py --threads 1          # writes docs/results/bench_methods.md and .json
    python benchmarks/bench_methods.py --models lenet-5-caffe --repeats 3 --out -   # a quick look

This is a benchmark, not a test: it reports ratios and never fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the profiler's start/stop lines (memory measurement)

import torch  # noqa: E402

import sparsetrain  # noqa: E402
from sparsetrain import create_model, prune_at_init  # noqa: E402
from sparsetrain.measure import Provenance, TrainStep, publish_report, time_interleaved  # noqa: E402
from sparsetrain.measure.memory import torch_peak_bytes_cpu  # noqa: E402
from sparsetrain.pruning import list_methods, method_options, method_spec  # noqa: E402

# network -> (input shape of one example, batch, sparsity: its row in SNIP's Table 1 / Table 2)
NETWORKS = {
    "lenet-5-caffe": ((1, 28, 28), 100, 0.99),
    "vgg-d": ((3, 32, 32), 128, 0.95),
}
MEMORY_ROUNDS = 2


def batch(shape, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)


def default_rounds(method: str) -> int:
    """The rounds a method runs by itself with its default options (1 for the one-shot methods)."""
    return getattr(method_options(method), "rounds", 1)


def mask_op(method: str, x, y, sparsity: float, seed: int, options=None):
    """``prune_at_init`` as a run calls it; a data-free method gets no batch."""
    batches = None if method_spec(method).data_free else (x, y)
    return lambda model: prune_at_init(model, method, sparsity=sparsity, batches=batches, seed=seed,
                                       options=options)


def bench_network(name: str, methods: list[str], args) -> dict:
    shape, size, sparsity = NETWORKS[name]
    torch.manual_seed(args.seed)
    base = create_model(name)
    x, y = batch(shape, size, args.seed + 1)
    once = [m for m in methods if name in args.once and default_rounds(m) > 1]
    dense = TrainStep(copy.deepcopy(base))
    ops = {"dense step": (dense.reset, lambda _: dense.step(x, y))}
    for m in methods:
        if m not in once:  # prune_at_init leaves the model as it was: every call scores the same weights
            ops[m] = (lambda: base, mask_op(m, x, y, sparsity, args.seed))
    timed = time_interleaved(ops, rounds=args.repeats, warmup=args.warmup)
    step_s = timed.median("dense step")
    rows = {}
    for m in methods:
        if m in once:
            print(f"  {name}: {m} once ({default_rounds(m)} rounds) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            mask = mask_op(m, x, y, sparsity, args.seed)(base)
            seconds = time.perf_counter() - start
            rows[m] = {"mask_ms": 1e3 * seconds, "a": seconds / step_s, "timed": "once"}
        else:
            mask = mask_op(m, x, y, sparsity, args.seed)(base)
            rows[m] = {"mask_ms": 1e3 * timed.median(m), "a": timed.ratio(m, "dense step"),
                       "spread": timed.spread(m), "timed": f"{timed.rounds} rounds"}
        rows[m]["rounds"] = default_rounds(m)
        rows[m]["kept"] = sum(int(k.sum()) for k in mask.values())
        prunable = sum(k.numel() for k in mask.values())
    dense.reset()
    dense_peak = torch_peak_bytes_cpu(lambda: dense.step(x, y))
    for m in methods:
        options = {"rounds": MEMORY_ROUNDS} if default_rounds(m) > 1 else None
        run = mask_op(m, x, y, sparsity, args.seed, options)
        peak = torch_peak_bytes_cpu(lambda: run(base))
        rows[m].update(peak_bytes=peak, b=peak / dense_peak)
    return {
        "model": name,
        "input": [size, *shape],
        "sparsity": sparsity,
        "params": sum(p.numel() for p in base.parameters()),
        "prunable": prunable,
        "kappa": round((1 - sparsity) * prunable),
        "dense_step_ms": 1e3 * step_s,
        "dense_spread": timed.spread("dense step"),
        "dense_peak_bytes": dense_peak,
        "rounds": timed.rounds,
        "methods": rows,
    }


def report(results: list[dict], methods: list[str], args) -> str:
    mb = 1 / 2**20
    lines = [
        "# Pruning methods: mask time and memory against one dense training step",
        "",
        f"- CPU, {torch.get_num_threads()} torch thread(s); sparsetrain {sparsetrain.__version__} (machine, "
        "command, date and load: at the end); random inputs of the network's data shape (the cost does not "
        "depend on the values), one batch; each method with its default options",
        f"- (a) = time of the method's mask (`prune_at_init`: scores + global top-kappa selection) / one dense "
        f"SGD training step on the same batch: the median over {args.repeats} interleaved rounds (after "
        f"{args.warmup} warm-up) of the per-round ratio; on {', '.join(args.once) or 'no network'} the "
        "self-iterating methods (rounds > 1) are timed once each, against the median dense step",
        "- (b) = peak bytes of tensors allocated while pruning / while one dense step runs (parameters, "
        "momentum buffers and the batch exist before both and are not counted), one PyTorch profiler "
        f"measurement each; the self-iterating methods measured with {MEMORY_ROUNDS} rounds (their rounds "
        "run one after another and each holds the same tensors)",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['model']}: batch {' x '.join(map(str, r['input']))}, sparsity {r['sparsity']}, "
            f"{r['params']:,} parameters, kappa {r['kappa']:,} of {r['prunable']:,}",
            "",
            f"Dense step: {r['dense_step_ms']:.1f} ms (spread {r['dense_spread']:.2f}), peak "
            f"{r['dense_peak_bytes'] * mb:.1f} MiB.",
            "",
            "| method | rounds | kept | mask (ms) | (a) mask / dense step | timed | pruning peak (MiB) | (b) memory |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in methods:
            row = r["methods"][m]
            lines.append(
                f"| {m} | {row['rounds']} | {row['kept']:,} | {row['mask_ms']:.1f} | {row['a']:.3f} | {row['timed']} | "
                f"{row['peak_bytes'] * mb:.1f} | {row['b']:.3f} |"
            )
        lines.append("")
    lines += ["## Side by side: (a) mask / dense step", "",
              "| method | " + " | ".join(r["model"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{r['methods'][m]['a']:.2f}" for r in results) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--methods", nargs="+", default=None, help="methods to time (default: every registered one)")
    p.add_argument("--once", nargs="*", default=["vgg-d"], choices=list(NETWORKS),
                   help="networks on which the self-iterating methods are timed once, not in interleaved rounds")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_methods.md", help="Markdown file to write ('-': none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods or list_methods()
    for m in methods:
        method_spec(m)  # an unknown name fails here, naming the registered ones

    provenance = Provenance.now(["python", "benchmarks/bench_methods.py", *argv])  # load before measuring
    results = []
    for name in args.models:
        print(f"methods on {name} ...", file=sys.stderr, flush=True)
        results.append(bench_network(name, methods, args))
    publish_report(args.out, report(results, methods, args), {"results": results, "args": vars(args)},
                   provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
