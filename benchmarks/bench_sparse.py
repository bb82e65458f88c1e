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
     masked training: >= 2x (``sparsetrain.sparse.bench.bench_training_step``);

plus the speed-up against sparsity of LeNet-300-100 at batch 1, 64, 1024, drawn with
``sparsetrain.sparse.bench.plot_sweep``.

    python benchmarks/bench_sparse.py                                  # --threads 2, writes docs/results/
    python benchmarks/bench_sparse.py --threads 1 --out - --plot -     # print only

All measurement code is the library's (``sparsetrain.sparse.bench``: ``bench``, ``sweep``,
``bench_training_step``; ``sparsetrain.measure``: the interleaved timer, speed-up =
``ratio("dense", "sparse")``, the median of per-round ratios; the report writer).
A benchmark, not a test: a MISS never fails (exit status 0 unless something breaks). Pass
``--threads`` with the number of idle cores: OpenMP with more threads than free cores loses 10x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

from sparsetrain.measure import Provenance, write_report
from sparsetrain.sparse.bench import bench as bench_model
from sparsetrain.sparse.bench import bench_training_step, plot_sweep, sweep

SPARSITIES = (0.0, 0.5, 0.9, 0.95, 0.98, 0.99)
NEVER_SLOWER_BATCHES = (1, 64)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def linear_layer(sparsity: float, args) -> dict:
    """One width x width Linear (random mask, default 4096) at batch 1: the converted layer against nn.Linear."""
    torch.manual_seed(args.seed)
    w = args.linear_width
    layer = nn.Sequential(nn.Linear(w, w))  # (to_sparse converts children, not the root)
    res = bench_model(layer, sparsity, method="random", batch_sizes=[1], input_shape=(w,), num_classes=w,
                      repeats=args.repeats, budget_s=args.budget, seed=args.seed, progress=say)
    e2e = res.end_to_end(1)
    return {"result": res, "speedup": e2e.speedup, "layout": res.layers(1)[0].layout,
            "dense_ms": e2e.dense_time * 1e3, "sparse_ms": e2e.sparse_time * 1e3,
            "stored_fraction": e2e.stored_bytes / e2e.dense_bytes}


def training_step(args) -> dict:
    return bench_training_step(inputs=args.train_width, hidden=[args.train_width] * 2, classes=10, batch_size=64,
                               sparsity=0.95, repeats=args.train_repeats, warmup=2, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=30, help="most timed rounds per measurement")
    p.add_argument("--budget", type=float, default=1.5, help="seconds per end-to-end measurement (at least 5 rounds)")
    p.add_argument("--train-repeats", type=int, default=15, help="timed rounds of the training step")
    p.add_argument("--train-width", type=int, default=4096, help="width of the MLP whose training step is timed")
    p.add_argument("--linear-width", type=int, default=4096, help="the single Linear layer is width x width")
    p.add_argument("--tolerance", type=float, default=0.05, help="noise allowed on 'never slower' (0.05 = 5%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_sparse.md", help="Markdown report (+ .json beside); '-': none")
    p.add_argument("--plot", default="docs/results/sparse_speedup.png", help="speed-up vs sparsity PNG; '-': none")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    provenance = Provenance.now(["python", "benchmarks/bench_sparse.py", *argv])  # load average at start

    lw, tw = args.linear_width, args.train_width
    say(f"1. {lw} x {lw} Linear, batch 1 ...")
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
    say(f"4. sparse training step ({tw}-wide MLP, 95%, batch 64) ...")
    train = training_step(args)
    plot_path = None
    if args.plot not in ("", "-"):
        plot_path = plot_sweep(sweeps["lenet-300-100"], args.plot)
        say(f"plot written to {plot_path}")

    l95, l99 = lin[0.95], lin[0.99]
    figures = [
        (f"{lw}x{lw} Linear, 95%, batch 1: speed-up over nn.Linear", ">= 5x", f"{l95['speedup']:.2f}x "
         f"({l95['dense_ms']:.3f} -> {l95['sparse_ms']:.3f} ms, {l95['layout']})", l95["speedup"] >= 5),
        (f"{lw}x{lw} Linear, 95%: stored weight bytes / dense", "<= 12%", f"{l95['stored_fraction']:.1%}",
         l95["stored_fraction"] <= 0.12),
        (f"{lw}x{lw} Linear, 99%, batch 1: speed-up over nn.Linear", ">= 15x", f"{l99['speedup']:.2f}x "
         f"({l99['dense_ms']:.3f} -> {l99['sparse_ms']:.3f} ms, {l99['layout']})", l99["speedup"] >= 15),
        ("LeNet-300-100, 98% SNIP, batch 64, whole model: speed-up", ">= 3x", f"{lenet_e2e.speedup:.2f}x "
         f"({lenet_e2e.dense_time * 1e3:.3f} -> {lenet_e2e.sparse_time * 1e3:.3f} ms, {lenet_e2e.layout})",
         lenet_e2e.speedup >= 3),
        ("never slower: max converted/dense time, LeNet-300-100 and LeNet-5-Caffe, s in {0..0.99}, batch 1 and 64",
         f"<= 1 (+{args.tolerance:.0%} noise)", f"{max_ratio:.3f} ({worst_model}, s = {worst.sparsity:g}, "
         f"batch {worst.batch_size}, {worst.layout})", max_ratio <= 1 + args.tolerance),
        (f"training step, {tw}-wide MLP, 95%, batch 64: sparse over dense masked", ">= 2x",
         f"{train['speedup']:.2f}x ({train['ms']['dense masked step']:.1f} -> {train['ms']['sparse step']:.1f} ms)",
         train["speedup"] >= 2),
    ]
    lines = ["# Sparse execution benchmark (CPU)", "",
             "Machine, command, date and load average at start: at the end. All ratios are medians of "
             "same-process, interleaved measurements (dense and sparse alternate round by round).", "",
             "| figure | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {name} | {target} | {measured} | {verdict(ok)} |" for name, target, measured, ok in figures]
    lines += [
        "",
        f"Speed-ups are against dense torch (`nn.Linear` / the dense masked model) in the same process; "
        f"'never slower' allows {args.tolerance:.0%} for timing noise (same-process medians still move by a few "
        "% on a busy machine). Training step: `sparsetrain.sparse.bench.bench_training_step` "
        f"({train['widths']} -> 10, {train['kept']:,} of {train['total']:,} weights kept, "
        f"outputs agree to {train['max_output_difference']:.1e}). PASS/MISS is informative only.",
        "",
        "Per layer and end to end:",
        "",
        lenet.to_markdown(),
        lin[0.95]["result"].to_markdown().replace("## Sequential", f"## {lw}x{lw} Linear (Sequential)", 1),
        lin[0.99]["result"].to_markdown().replace("## Sequential", f"## {lw}x{lw} Linear (Sequential)", 1),
        sweeps["lenet-300-100"].to_markdown(),
        sweeps["lenet-5-caffe"].to_markdown(),
    ]
    if plot_path is not None:
        lines += [f"![speed-up against sparsity]({Path(plot_path).name})", ""]
    text = "\n".join(lines)
    print(text + "\n" + provenance.markdown())
    if args.out not in ("", "-"):
        data = {
            "figures": [{"figure": n, "target": t, "measured": m, "pass": ok} for n, t, m, ok in figures],
            "linear": {str(s): {k: v for k, v in d.items() if k != "result"} | {"bench": d["result"].to_dict()}
                       for s, d in lin.items()},
            "lenet_300_100_98": lenet.to_dict(),
            "sweeps": {m: sw.to_dict() for m, sw in sweeps.items()},
            "never_slower_max_ratio": max_ratio,
            "training_step": train,
        }
        md, js = write_report(args.out, text, data, provenance=provenance)
        say(f"written to {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
