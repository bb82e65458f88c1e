"""Benchmark: sparse execution against dense torch, the issue's figures measured in one run.

"Run sparse networks sparse: skip the zeros for real". Each figure is a ratio against dense torch
measured in this process, with the issue's target and PASS/MISS:

  1. one 4096 x 4096 Linear layer (random mask), batch 1: ``to_sparse`` against the dense
     ``nn.Linear`` (``F.linear``): >= 5x faster at 95% sparsity with stored weights <= 12% of the
     dense bytes; >= 15x at 99%;
  2. LeNet-300-100, 98% SNIP mask, batch 64, the whole model: >= 3x faster than dense;
  3. never slower than dense (auto-choice): LeNet-300-100 and LeNet-5-Caffe at sparsities 0, 0.5,
     0.9, 0.95, 0.98, 0.99 and batch 1, 64: converted / dense time <= 1 (within a noise
     tolerance, ``--tolerance``, default 5%);
  4. a training step of a 4096-wide MLP at 95%, batch 64, ``SparseTrainLinear`` against dense
     masked training: >= 2x (``bench_step`` of ``bench_sparse_training.py``);

plus the speed-up against sparsity of LeNet-300-100 at batch 1, 64, 1024, drawn with
``sparsetrain.sparse.bench.plot_sweep``.

    python benchmarks/bench_sparse.py                                  # --threads 2, writes docs/results/
    python benchmarks/bench_sparse.py --threads 1 --out - --plot -     # print only

All measurement code is the library's (``sparsetrain.sparse.bench``: ``bench``, ``sweep``,
interleaved same-process rounds, medians of per-round ratios) and ``bench_sparse_training.py``'s.
A benchmark, not a test: a MISS never fails (exit status 0 unless something breaks). Pass
``--threads`` with the number of idle cores: OpenMP with more threads than free cores loses 10x.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_sparse_training, beside this file

from bench_sparse_training import bench_step  # noqa: E402

from sparsetrain.sparse.bench import (  # noqa: E402
    environment,
    format_environment,
    plot_sweep,
    sweep,
    write_report,
)
from sparsetrain.sparse.bench import bench as bench_model  # noqa: E402

SPARSITIES = (0.0, 0.5, 0.9, 0.95, 0.98, 0.99)
NEVER_SLOWER_BATCHES = (1, 64)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def linear_layer(sparsity: float, args) -> dict:
    """One 4096 x 4096 Linear (random mask) at batch 1: the converted layer against nn.Linear."""
    torch.manual_seed(args.seed)
    layer = nn.Sequential(nn.Linear(4096, 4096))  # (to_sparse converts children, not the root)
    res = bench_model(layer, sparsity, method="random", batch_sizes=[1], input_shape=(4096,), num_classes=4096,
                      repeats=args.repeats, budget_s=args.budget, seed=args.seed, progress=say)
    e2e = res.end_to_end(1)
    return {"result": res, "speedup": e2e.speedup, "layout": res.layers(1)[0].layout,
            "dense_ms": e2e.dense_time * 1e3, "sparse_ms": e2e.sparse_time * 1e3,
            "stored_fraction": e2e.stored_bytes / e2e.dense_bytes}


def training_step(args) -> dict:
    ns = argparse.Namespace(inputs=4096, hidden=[4096, 4096], classes=10, batch_size=64, sparsity=0.95,
                            repeats=args.train_repeats, warmup=2, seed=args.seed)
    return bench_step(ns)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=30, help="most timed rounds per measurement")
    p.add_argument("--budget", type=float, default=1.5, help="seconds per end-to-end measurement (at least 5 rounds)")
    p.add_argument("--train-repeats", type=int, default=15, help="timed rounds of the training step")
    p.add_argument("--tolerance", type=float, default=0.05, help="noise allowed on 'never slower' (0.05 = 5%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_sparse.md", help="Markdown report (+ .json beside); '-': none")
    p.add_argument("--plot", default="docs/results/sparse_speedup.png", help="speed-up vs sparsity PNG; '-': none")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(["python", "benchmarks/bench_sparse.py", *argv])  # load average at start

    say("1. 4096 x 4096 Linear, batch 1 ...")
    lin = {s: linear_layer(s, args) for s in (0.95, 0.99)}
    say("2. LeNet-300-100 at 98%, batch 64 ...")
    lenet = bench_model("lenet-300-100", 0.98, batch_sizes=[64], repeats=args.repeats, budget_s=args.budget,
                        seed=args.seed, progress=say)
    lenet_e2e = lenet.end_to_end(64)
    say("3. never slower: sweeps ...")
    sweeps = {
        "lenet-300-100": sweep("lenet-300-100", SPARSITIES, batch_sizes=[*NEVER_SLOWER_BATCHES, 1024],
                               repeats=args.repeats, budget_s=args.budget, seed=args.seed, progress=say),
        "lenet-5-caffe": sweep("lenet-5-caffe", SPARSITIES, batch_sizes=list(NEVER_SLOWER_BATCHES),
                               repeats=args.repeats, budget_s=args.budget, seed=args.seed, progress=say),
    }
    checked = [(m, p) for m, sw in sweeps.items() for p in sw.points if p.batch_size in NEVER_SLOWER_BATCHES]
    worst_model, worst = max(checked, key=lambda mp: 1 / mp[1].speedup)
    max_ratio = 1 / worst.speedup
    say("4. sparse training step (4096-wide MLP, 95%, batch 64) ...")
    train = training_step(args)
    plot_path = None
    if args.plot not in ("", "-"):
        plot_path = plot_sweep(sweeps["lenet-300-100"], args.plot)
        say(f"plot written to {plot_path}")

    l95, l99 = lin[0.95], lin[0.99]
    figures = [
        ("4096x4096 Linear, 95%, batch 1: speed-up over nn.Linear", ">= 5x", f"{l95['speedup']:.2f}x "
         f"({l95['dense_ms']:.3f} -> {l95['sparse_ms']:.3f} ms, {l95['layout']})", l95["speedup"] >= 5),
        ("4096x4096 Linear, 95%: stored weight bytes / dense", "<= 12%", f"{l95['stored_fraction']:.1%}",
         l95["stored_fraction"] <= 0.12),
        ("4096x4096 Linear, 99%, batch 1: speed-up over nn.Linear", ">= 15x", f"{l99['speedup']:.2f}x "
         f"({l99['dense_ms']:.3f} -> {l99['sparse_ms']:.3f} ms, {l99['layout']})", l99["speedup"] >= 15),
        ("LeNet-300-100, 98% SNIP, batch 64, whole model: speed-up", ">= 3x", f"{lenet_e2e.speedup:.2f}x "
         f"({lenet_e2e.dense_time * 1e3:.3f} -> {lenet_e2e.sparse_time * 1e3:.3f} ms, {lenet_e2e.layout})",
         lenet_e2e.speedup >= 3),
        ("never slower: max converted/dense time, LeNet-300-100 and LeNet-5-Caffe, s in {0..0.99}, batch 1 and 64",
         f"<= 1 (+{args.tolerance:.0%} noise)", f"{max_ratio:.3f} ({worst_model}, s = {worst.sparsity:g}, "
         f"batch {worst.batch_size}, {worst.layout})", max_ratio <= 1 + args.tolerance),
        ("training step, 4096-wide MLP, 95%, batch 64: sparse over dense masked", ">= 2x",
         f"{train['speedup']:.2f}x ({train['ms']['dense masked step']:.1f} -> {train['ms']['sparse step']:.1f} ms)",
         train["speedup"] >= 2),
    ]
    lines = ["# Sparse execution benchmark (CPU)", "", format_environment(env), "",
             "| figure | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {name} | {target} | {measured} | {verdict(ok)} |" for name, target, measured, ok in figures]
    lines += [
        "",
        f"Speed-ups are against dense torch (`nn.Linear` / the dense masked model) in the same process; "
        f"'never slower' allows {args.tolerance:.0%} for timing noise (same-process medians still move by a few "
        "% on a busy machine). Training step: `benchmarks/bench_sparse_training.py`'s `bench_step` "
        f"({train['widths']} -> 10, {train['kept']:,} of {train['total']:,} weights kept, "
        f"outputs agree to {train['max_output_difference']:.1e}). PASS/MISS is informative only.",
        "",
        "Per layer and end to end:",
        "",
        lenet.to_markdown(),
        lin[0.95]["result"].to_markdown().replace("## Sequential", "## 4096x4096 Linear (Sequential)", 1),
        lin[0.99]["result"].to_markdown().replace("## Sequential", "## 4096x4096 Linear (Sequential)", 1),
        sweeps["lenet-300-100"].to_markdown(),
        sweeps["lenet-5-caffe"].to_markdown(),
    ]
    if plot_path is not None:
        lines += [f"![speed-up against sparsity]({Path(plot_path).name})", ""]
    text = "\n".join(lines)
    print(text)
    if args.out not in ("", "-"):
        data = {
            "environment": env,
            "figures": [{"figure": n, "target": t, "measured": m, "pass": ok} for n, t, m, ok in figures],
            "linear": {str(s): {k: v for k, v in d.items() if k != "result"} | {"bench": d["result"].to_dict()}
                       for s, d in lin.items()},
            "lenet_300_100_98": lenet.to_dict(),
            "sweeps": {m: sw.to_dict() for m, sw in sweeps.items()},
            "never_slower_max_ratio": max_ratio,
            "training_step": train,
        }
        md, js = write_report(args.out, text, json.loads(json.dumps(data, default=str)))
        say(f"written to {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
