"""Benchmark: trials per hour with packing (K trials of one study point trained together,
:mod:`sparsetrain.study.packed`) against one trial at a time, same machine, same workload.

The workload is dps-mnist-simple-cnn-sgd (MNIST, Simple-CNN, SGD, a full validation check every
100 steps) as a fixed-length trial of ``--trial-steps`` steps, at each ``--batch-sizes`` and
sparsity 0.9, K = ``--pack`` trials (plan points 0..K-1: their own seeds, learning rates and
data orders). Two things are timed with the one interleaved timer
(:func:`sparsetrain.measure.time_interleaved`, rounds alternating the order, medians and paired
ratios), in the same process, by :func:`sparsetrain.study.packed.measure` (what
``study work --pack auto`` runs at the start of a point):

- a training step: one step of the pack against the K trials' single-run steps one after the
  other (module forward/backward, the mask's gradient hook, ``torch.optim.SGD``, as
  ``sparsetrain.train`` runs them);
- a validation check: the pack's check against K single checks (``sparsetrain.train.loop.evaluate``),
  on the first ``--val-examples`` validation examples and scaled to the whole split (evaluation
  time is linear in the examples).

Trials per hour = 3600 / (steps x step time + checks x check time) per trial, K trials for the
pack. The mask is each point's SNIP mask scored on one batch (``prune.batches = 1``) instead of
the whole training split: the mask's content changes no timing, and scoring the whole split would
take minutes per seed. Not a test: a missed target never fails a build.

    .venv/bin/python benchmarks/bench_packing.py                    # CPU, writes docs/results/bench_packing.md
    .venv/bin/python benchmarks/bench_packing.py --device cuda --pack 64 --out docs/results/bench_packing_cuda.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from sparsetrain.measure import Provenance, publish_report
from sparsetrain.study import engine, packed
from sparsetrain.study.plan import plan_points
from sparsetrain.study.workloads import load_workload

WORKLOAD = "dps-mnist-simple-cnn-sgd"


def measure_point(batch_size: int, k: int, args, masks_dir: Path) -> dict:
    w = load_workload(WORKLOAD, {"prune": {"batches": 1}})
    configs = [w.trial_config(batch_size, args.sparsity, p, seed=i)
               for i, p in enumerate(plan_points(w.search, k))]
    masks = [engine.shared_mask(masks_dir, c, data_dir=args.data_dir, device=args.device) for c in configs]
    m = packed.measure([packed.Member(c, mask) for c, mask in zip(configs, masks)], steps=1, rounds=args.rounds,
                       check_rounds=args.check_rounds, val_examples=args.val_examples, data_dir=args.data_dir,
                       device=args.device)
    n_checks = args.trial_steps // w.check_interval
    per_trials = {name: args.trial_steps * m["step_s"][name] + n_checks * m["check_s"][name] for name in m["step_s"]}
    trials_per_hour = {name: 3600 * k / t for name, t in per_trials.items()}  # both time K trials
    return {**m, "batch_size": batch_size, "trials_per_hour": trials_per_hour,
            "ratio_of_medians": trials_per_hour["pack"] / trials_per_hour["single"], "engine_choice": packed.choose(m)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    p.add_argument("--pack", type=int, default=16, help="trials in a pack (K)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--trial-steps", type=int, default=1000, help="steps of the fixed-length trial (checks every 100)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds of the step comparison")
    p.add_argument("--check-rounds", type=int, default=5, help="timed rounds of the validation-check comparison")
    p.add_argument("--val-examples", type=int, default=500, help="validation examples timed (scaled to the split)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data-dir", default=os.environ.get("SPARSETRAIN_DATA"), help="default $SPARSETRAIN_DATA")
    p.add_argument("--out", default="docs/results/bench_packing.md", help="Markdown report (+ .json); '-': none")
    args = p.parse_args(argv)
    provenance = Provenance.now(["python", "benchmarks/bench_packing.py", *(argv if argv is not None else sys.argv[1:])])
    results = []
    with tempfile.TemporaryDirectory() as masks_dir:
        for b in args.batch_sizes:
            print(f"B = {b}, K = {args.pack} ...", file=sys.stderr, flush=True)
            results.append(measure_point(b, args.pack, args, Path(masks_dir)))
    device = torch.device(args.device)
    lines = [
        f"# Packing: trials per hour, {args.pack} trials together against one at a time ({device.type})",
        "",
        f"Workload {WORKLOAD} (MNIST, Simple-CNN, SGD; sparsity {args.sparsity:g}) as a fixed-length trial of "
        f"{args.trial_steps:,} steps with a full validation check every 100, K = {args.pack} trials (plan points "
        f"0..{args.pack - 1}: their own seeds, learning rates and data orders). Timed by "
        "`sparsetrain.study.packed.measure` (what `study work --pack auto` runs at the start of a point) with the "
        f"one interleaved timer: *step*: median seconds of one training step of the pack / of the K trials' "
        f"single-run steps one after the other ({args.rounds} rounds); *check*: the same for one validation check "
        f"of the 6,000 examples (timed on the first {args.val_examples:,}, scaled; {args.check_rounds} rounds). "
        "*step ratio*, *check ratio*: paired medians (over rounds, one at a time's time over the pack's in the "
        f"same round). *trials/hour*: 3600 K / ({args.trial_steps:,} steps + {args.trial_steps // 100} checks), from "
        "the medians; *ratio of medians*: packed over one at a time from those. *ratio*: the two paired ratios "
        "weighted by the pack's time in steps and in checks, which cancels load that changes between rounds; "
        f"`--pack auto` packs where it is at least {packed.PAYS:g} (above 1: packing pays).",
        "",
        "| B | threads | step s: pack / K singles | step ratio | check s: pack / K singles | check ratio "
        "| trials/hour: packed / one at a time | ratio of medians | ratio | `--pack auto` picks |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, c, t = r["step_s"], r["check_s"], r["trials_per_hour"]
        lines.append(
            f"| {r['batch_size']} | {r['threads']} | {s['pack']:.3f} / {s['single']:.3f} | {r['step_ratio']:.2f} | "
            f"{c['pack']:.1f} / {c['single']:.1f} | {r['check_ratio']:.2f} | {t['pack']:.1f} / {t['single']:.1f} | "
            f"{r['ratio_of_medians']:.2f} | {r['ratio']:.2f} | {r['engine_choice']} |"
        )
    if device.type == "cpu":
        lines += ["", "Not measured on a GPU: no GPU was at hand when this file was written. On one, run "
                  "`python benchmarks/bench_packing.py --device cuda --pack 64 --out docs/results/bench_packing_cuda.md` "
                  "(the issue's goal: >= 30x at B = 16; a plain vmap over 64 trials of a small CNN measured 56x on an "
                  "H100)."]
    publish_report(args.out, "\n".join(lines), {"results": results, "args": vars(args)}, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
