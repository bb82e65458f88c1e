"""Benchmark: approximate isometry, sparsetrain's (L-BFGS on the kept entries, stopping rule) against
the original's plain SGD (lr 0.1, 10,000 steps): the penalty each reaches and its time.

Networks, each initialised with ``variance-scaling`` (TensorFlow's default, snip-public's; seed 0)
and pruned by SNIP to 90% sparsity from one batch, the mask applied to the weights:

- ``mlp-7`` (MNIST shapes, 1x28x28): the batch is the first 100 MNIST training images
  (``$SPARSETRAIN_DATA``; ``--mlp7-data gaussian`` scores Gaussian inputs instead);
- ``vgg-like`` (CIFAR shapes, 3x32x32; CIFAR is not on these machines): 128 Gaussian inputs with
  random labels.

Then, on copies of the masked weights: ``approximate_isometry_`` with each method (``lbfgs``, the
default, at its default ``tol``; ``polar`` on mlp-7 for comparison) and ``sgd`` (the original:
plain SGD lr 0.1 on ``||G - I||_F``; per matrix, which takes exactly the same steps as SGD on the
sum, whose terms depend on one matrix each) for ``--sgd-steps`` (default 10,000). Reported: the
summed penalty ``sum ||G - I||_F`` before and after, per layer too, the distance from the initial
weights, the fraction of kept weights alive, and the time. On mlp-7 the times are medians of
``--repeats`` interleaved rounds (:func:`sparsetrain.measure.time_interleaved`); on vgg-like each is
timed once. Where ``--sgd-steps`` is below 10,000 (``--vgg-sgd-steps``, default 300: the full
baseline takes about an hour here), the SGD time for 10,000 steps is extrapolated linearly from the
measured steps and labelled so; its penalty at 10,000 steps is then not known.

    python benchmarks/bench_isometry.py --threads 1              # writes docs/results/bench_isometry.md and .json
    python benchmarks/bench_isometry.py --models mlp-7 --out -   # a quick look

This is a benchmark, not a test: it reports ratios and never fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import sparsetrain
from sparsetrain import create_model, prune_at_init
from sparsetrain.data import create_loaders
from sparsetrain.init import initialize_
from sparsetrain.masks import apply_mask_
from sparsetrain.measure import Provenance, publish_report, time_interleaved
from sparsetrain.signal.isometry import approximate_isometry_
from sparsetrain.threads import request_threads

FULL_SGD_STEPS = 10_000  # spp-public's approximate-isometry steps
# network -> (input shape of one example, pruning batch, sparsity, methods besides sgd)
NETWORKS = {
    "mlp-7": ((1, 28, 28), 100, 0.9, ("lbfgs", "polar")),
    "vgg-like": ((3, 32, 32), 128, 0.9, ("lbfgs",)),
}


def pruning_batch(name: str, args) -> tuple[torch.Tensor, torch.Tensor]:
    shape, size, _, _ = NETWORKS[name]
    if name == "mlp-7" and args.mlp7_data == "mnist":
        loaders = create_loaders("mnist", batch_size=size, data_dir=os.environ.get("SPARSETRAIN_DATA"),
                                 download=False)
        return next(loaders.train.iter_from(0))
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)


def masked_network(name: str, args):
    shape, _, sparsity, _ = NETWORKS[name]
    model = create_model(name)
    initialize_(model, "variance-scaling", args.seed)
    x, y = pruning_batch(name, args)
    mask = prune_at_init(model, "snip", sparsity=sparsity, batches=[(x, y)], seed=args.seed)
    apply_mask_(model, mask)
    return model, mask


def bench_network(name: str, args) -> dict:
    _, _, sparsity, methods = NETWORKS[name]
    model, mask = masked_network(name, args)
    sgd_steps = args.sgd_steps if name == "mlp-7" else args.vgg_sgd_steps
    runs = {m: {} for m in (*methods, "sgd")}

    def op(method):
        kwargs = {"method": method, "steps": sgd_steps, "tol": 0.0} if method == "sgd" else {"method": method}

        def run(copied):
            runs[method]["report"] = approximate_isometry_(copied, mask, **kwargs)
        return (lambda: copy.deepcopy(model)), run

    if name in args.once:
        seconds = {}
        for m in runs:
            print(f"  {name}: {m} once ...", file=sys.stderr, flush=True)
            setup, run = op(m)
            copied = setup()
            start = time.perf_counter()
            run(copied)
            seconds[m] = time.perf_counter() - start
        timed = "once each"
    else:
        timings = time_interleaved({m: op(m) for m in runs}, rounds=args.repeats, warmup=1)
        seconds = {m: timings.median(m) for m in runs}
        timed = f"median of {timings.rounds} interleaved rounds"
    sgd_full = seconds["sgd"] * FULL_SGD_STEPS / sgd_steps
    rows = {}
    for m in runs:
        rep = runs[m]["report"]
        rows[m] = {
            "seconds": seconds[m],
            "penalty_before": rep.penalty_before,
            "penalty_after": rep.penalty_after,
            "alive": rep.alive,
            "max_distance": max(r.distance for r in rep.layers),
            "ratio_to_sgd_10k": seconds[m] / sgd_full,
            "layers": rep.to_dict()["layers"],
            "table": rep.table(),
        }
    return {"model": name, "sparsity": sparsity, "kept": sum(int(k.sum()) for k in mask.values()),
            "prunable": sum(k.numel() for k in mask.values()), "sgd_steps": sgd_steps,
            "sgd_10k_seconds": sgd_full, "sgd_extrapolated": sgd_steps != FULL_SGD_STEPS, "timed": timed,
            "methods": rows}


def report(results: list[dict], args) -> str:
    lines = [
        "# Approximate isometry: L-BFGS with a stopping rule against the original's plain SGD",
        "",
        f"- CPU, {torch.get_num_threads()} torch thread(s); sparsetrain {sparsetrain.__version__} (machine, command, "
        "date and load: at the end). Weights: `variance-scaling` (seed 0), SNIP 90% from one batch "
        f"(mlp-7: {'the first 100 MNIST training images' if args.mlp7_data == 'mnist' else '100 Gaussian inputs'}; "
        "vgg-like: 128 Gaussian inputs of CIFAR's shape, CIFAR not being on this machine), mask applied",
        "- penalty = sum over the masked Linear/Conv weights of ||G - I||_F, G the Gram matrix of each matrix's "
        "smaller side (the paper's W^T W in TensorFlow's layout for every layer here but vgg-like's first "
        "convolution, 64 x 27, where the paper's 64 x 64 Gram matrix cannot reach I); alive = kept weights with "
        "|w| >= 1% of their matrix's RMS; distance = max over layers of ||W - W0||_F / ||W0||_F",
        "- sgd = spp-public's optimiser (lr 0.1 on ||G - I||_F, all kept weights), run per matrix (the same steps "
        "as on the sum); lbfgs = `approximate_isometry_` as `--isometry` runs it (default steps and tol); "
        "time ratio = method's time / SGD's time for 10,000 steps",
        "",
    ]
    for r in results:
        extrapolated = r["sgd_extrapolated"]
        lines += [
            f"## {r['model']}: SNIP {r['sparsity']:.0%}, {r['kept']:,} of {r['prunable']:,} weights kept",
            "",
            f"Timed: {r['timed']}. SGD ran {r['sgd_steps']:,} steps"
            + (f"; its time for 10,000 steps is extrapolated linearly ({r['sgd_10k_seconds']:.0f} s) and its "
               f"penalty at 10,000 steps is not known (the row shows the penalty after {r['sgd_steps']:,})."
               if extrapolated else "."),
            "",
            "| method | penalty before | penalty after | alive | distance | time (s) | time / SGD 10k |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, row in r["methods"].items():
            label = f"sgd ({r['sgd_steps']:,} steps)" if m == "sgd" else m
            ratio = f"{row['ratio_to_sgd_10k']:.3f}" + (" (extrapolated)" if extrapolated else "")
            lines.append(f"| {label} | {row['penalty_before']:.4g} | {row['penalty_after']:.4g} | {row['alive']:.3f} "
                         f"| {row['max_distance']:.3f} | {row['seconds']:.2f} | {ratio} |")
        lines.append("")
        for m, row in r["methods"].items():
            lines += [f"### {r['model']}, {m}: per layer", "", row["table"], ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--sgd-steps", type=int, default=FULL_SGD_STEPS, help="SGD steps on mlp-7 (the original: 10,000)")
    p.add_argument("--vgg-sgd-steps", type=int, default=300,
                   help="SGD steps on vgg-like (10,000 take about an hour on one CPU thread; fewer are "
                        "extrapolated linearly in time and labelled so)")
    p.add_argument("--mlp7-data", choices=("mnist", "gaussian"), default="mnist",
                   help="the SNIP batch for mlp-7: MNIST from $SPARSETRAIN_DATA, or Gaussian inputs")
    p.add_argument("--once", nargs="*", default=["vgg-like"], choices=list(NETWORKS),
                   help="networks whose methods are timed once each instead of in interleaved rounds")
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_isometry.md", help="Markdown file to write ('-': none)")
    args = p.parse_args(argv)
    request_threads(args.threads)

    provenance = Provenance.now(["python", "benchmarks/bench_isometry.py", *argv])  # load before measuring
    approximate_isometry_(torch.nn.Linear(4, 4), None)  # the optimiser's one-time import, outside the timing
    results = []
    for name in args.models:
        print(f"approximate isometry on {name} ...", file=sys.stderr, flush=True)
        results.append(bench_network(name, args))
    data = {"results": [{**r, "methods": {m: {k: v for k, v in row.items() if k != "table"}
                                          for m, row in r["methods"].items()}} for r in results],
            "args": vars(args)}
    publish_report(args.out, report(results, args), data, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
