"""Benchmark: a masked training step and an evaluation pass of the registered convolutional networks
in the channels-last layout against the default one, on this CPU: the measurement behind
:func:`sparsetrain.train.loop.conv_layout` (training holds a registered CNN channels-last on a CPU).

Per (model, batch): two copies of the same network with the same 90% random mask and its
``GradientMask`` (as a pruned run trains), one inside ``conv_layout`` (the code path training
takes), one in the default layout; one SGD-momentum step on a fixed batch
(:class:`sparsetrain.measure.TrainStep`) and one evaluation pass over 1,000 examples (the data
layer's evaluation batch, in inference mode), timed with the one interleaved timer in the same
process, so that both layouts share every phase of the machine's load. *ratio*: default time /
channels-last time (above 1: channels-last is faster). Not a test: a missed target never fails a
build.

    .venv/bin/python benchmarks/bench_memory_format.py          # writes docs/results/bench_memory_format.md
    .venv/bin/python benchmarks/bench_memory_format.py --rows simple-cnn:128 --out -
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import sparsetrain as st
from sparsetrain.measure import Provenance, TrainStep, load_average, publish_report, time_interleaved
from sparsetrain.train.loop import conv_layout

#: (model, batch): the data-parallelism study's Simple-CNN batch sizes, Table 1's LeNet-5-Caffe,
#: the CIFAR-10 study's ResNet-8 and a Table 2 VGG
ROWS = ["simple-cnn:2", "simple-cnn:8", "simple-cnn:32", "simple-cnn:128", "simple-cnn:512",
        "lenet-5-caffe:100", "resnet-8:128", "vgg-like:128"]
EVAL_EXAMPLES = 1000


def measure(name: str, batch: int, rounds: int, budget_s: float, seed: int) -> dict:
    torch.manual_seed(seed)
    shape = st.models.default_input_shape(name)
    default = st.create_model(name)
    mask = st.prune_at_init(default, "random", sparsity=0.9)
    st.apply_mask_(default, mask)
    last = copy.deepcopy(default)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    xe = torch.randn(EVAL_EXAMPLES, *shape)
    with conv_layout(last):
        steps = {"default": TrainStep(default, [st.GradientMask(default, mask)]),
                 "channels-last": TrainStep(last, [st.GradientMask(last, mask)])}

        def train_op(step):
            return step.reset, lambda _: step.step(x, y)

        def eval_op(model):
            def run():
                model.eval()
                with torch.inference_mode():
                    model(xe)
                model.train()
            return run

        t_train = time_interleaved({k: train_op(s) for k, s in steps.items()}, rounds=rounds, warmup=3,
                                   budget_s=budget_s)
        t_eval = time_interleaved({"default": eval_op(default), "channels-last": eval_op(last)}, rounds=rounds,
                                  warmup=2, budget_s=budget_s)
    return {
        "train_ms": {k: 1e3 * v for k, v in t_train.medians().items()},
        "train_ratio": t_train.ratio("default", "channels-last"),
        "train_spread": {k: t_train.spread(k) for k in steps},
        "eval_ms": {k: 1e3 * v for k, v in t_eval.medians().items()},
        "eval_ratio": t_eval.ratio("default", "channels-last"),
        "eval_spread": {k: t_eval.spread(k) for k in steps},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=ROWS, help="model:batch pairs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the studies' runs)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per comparison, at most")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per comparison (fewer rounds, never below 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_memory_format.md", help="Markdown report (+ .json); '-': none")
    args = p.parse_args(argv)
    rows = []
    for row in args.rows:
        name, _, batch = row.partition(":")
        if name not in st.list_models() or not batch.isdigit() or int(batch) < 1:
            p.error(f"--rows takes model:batch with a registered model and a batch of at least 1, got {row!r}")
        rows.append((name, int(batch)))
    torch.set_num_threads(args.threads)
    provenance = Provenance.now(["python", "benchmarks/bench_memory_format.py",
                                 *(argv if argv is not None else sys.argv[1:])])
    load = load_average()
    results = {}
    for name, batch in rows:
        print(f"{name} at batch {batch} ...", file=sys.stderr, flush=True)
        results[f"{name}:{batch}"] = measure(name, batch, args.rounds, args.budget, args.seed)
    lines = [
        "# Channels-last against the default layout: a masked training step and an evaluation pass (CPU)",
        "",
        f"{args.threads} torch thread(s); load average at start {load[0] if load else 'unknown'}. Per network and "
        "batch: the same weights, 90% random mask and `GradientMask` in both layouts, the channels-last copy "
        "inside `sparsetrain.train.loop.conv_layout` (what `train` does with a registered CNN on a CPU); one "
        f"SGD-momentum step on the batch, and a forward pass over {EVAL_EXAMPLES:,} examples in inference mode "
        "(the evaluation batch); interleaved rounds in one process, medians. *ratio*: default / channels-last, "
        "paired per round (above 1: channels-last is faster); *spread*: interquartile range over the median.",
        "",
        "| network | batch | step ms: default / channels-last | step ratio | evaluation ms: default / channels-last "
        "| evaluation ratio | spread (step; evaluation) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in results.items():
        name, batch = key.split(":")
        lines.append(
            f"| {name} | {batch} | {r['train_ms']['default']:.1f} / {r['train_ms']['channels-last']:.1f} | "
            f"{r['train_ratio']:.2f} | {r['eval_ms']['default']:.0f} / {r['eval_ms']['channels-last']:.0f} | "
            f"{r['eval_ratio']:.2f} | {r['train_spread']['default']:.2f}, {r['train_spread']['channels-last']:.2f}; "
            f"{r['eval_spread']['default']:.2f}, {r['eval_spread']['channels-last']:.2f} |"
        )
    publish_report(args.out, "\n".join(lines), {"results": results, "args": vars(args)}, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
