"""Benchmark: does ``to_sparse`` choose well whatever the load? The two cases of the issue.

1. A 4096x4096 Linear at 95% sparsity, batch 1: many times faster sparse. Converted ``--calls``
   times (the choice cache cleared before each), optionally while ``--load N`` processes keep
   cores busy: how often it is converted, and the speed-up of what was returned.
2. LeNet-300-100 SNIP-pruned at 90%, batch 1, converted ``--calls`` times: the returned model
   against the dense masked model, end to end (it ran at 0.91x of dense before the end-to-end
   check; it must never be slower).

Each speed-up is ``ratio("dense", "converted")`` of the one interleaved timer (time of dense /
time of converted, paired per round), measured after the conversion, independently of the
timings ``to_sparse`` made itself. Not a test: a missed target never fails a build.

    .venv/bin/python benchmarks/bench_sparse_choice.py                      # quiet machine
    .venv/bin/python benchmarks/bench_sparse_choice.py --load 1 --out docs/results/bench_sparse_choice_loaded.md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import torch
import torch.nn as nn

import sparsetrain as st
from sparsetrain.measure import Provenance, publish_report, time_interleaved
from sparsetrain.sparse import clear_choice_cache, sparse_report


def _burn(stop_at: float) -> None:
    """A busy core (the 'loaded machine' of the issue)."""
    x = 0
    while time.time() < stop_at:
        x += 1


def linear_case(width: int, sparsity: float, seed: int):
    torch.manual_seed(seed)
    layer = nn.Linear(width, width).eval()
    mask = {"weight": torch.rand(width, width) >= sparsity}
    return layer, mask, (width,)


def lenet_case(sparsity: float, seed: int):
    torch.manual_seed(seed)
    model = st.create_model("lenet-300-100").eval()
    x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    mask = st.prune_at_init(model, "snip", sparsity=sparsity, batches=(x, y))
    return model, mask, (1, 28, 28)


def measure(model, mask, input_shape, calls: int, rounds: int) -> list[dict]:
    """Convert ``calls`` times; for each, the layouts chosen and the end-to-end speed-up."""
    dense = st.apply_mask_(__import__("copy").deepcopy(model), mask)
    x = torch.randn(1, *input_shape)
    out = []
    for _ in range(calls):
        clear_choice_cache()
        converted = st.to_sparse(model, mask, batch_size=1, input_shape=input_shape)
        layouts = [r.layout for r in sparse_report(converted)]
        with torch.no_grad():
            t = time_interleaved({"dense": lambda: dense(x), "converted": lambda: converted(x)}, rounds=rounds)
        out.append({"layouts": layouts, "speedup": t.ratio("dense", "converted"),
                    "spread": {k: t.spread(k) for k in ("dense", "converted")}})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=5, help="conversions per case")
    p.add_argument("--rounds", type=int, default=200, help="timed rounds of each end-to-end comparison")
    p.add_argument("--load", type=int, default=0, help="busy processes running meanwhile (0: none)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--width", type=int, default=4096, help="the Linear layer is width x width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_sparse_choice.md", help="Markdown report (+ .json); '-': none")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    provenance = Provenance.now(["python", "benchmarks/bench_sparse_choice.py", *(argv or sys.argv[1:])])
    burners = [mp.Process(target=_burn, args=(time.time() + 3600,), daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    try:
        cases = {
            f"Linear {args.width}x{args.width}, 95%, batch 1": measure(*linear_case(args.width, 0.95, args.seed),
                                                                      args.calls, args.rounds),
            "LeNet-300-100, SNIP 90%, batch 1": measure(*lenet_case(0.9, args.seed), args.calls, args.rounds),
        }
    finally:
        for b in burners:
            b.terminate()
    lines = [
        "# to_sparse's choice under load",
        "",
        f"Each case converted {args.calls} times (choice cache cleared each time), {args.threads} torch threads, "
        f"{args.load} busy process(es) running meanwhile. *speed-up*: time of the dense masked model / time of "
        "the returned model, paired over interleaved rounds (the one timer), measured after each conversion; "
        "*spread*: the interquartile range of the per-round times over their median.",
        "",
        "| case | call | layouts returned | speed-up | spread dense / converted |",
        "|---|---|---|---|---|",
    ]
    for case, runs in cases.items():
        for i, r in enumerate(runs):
            layouts = ", ".join(dict.fromkeys(r["layouts"]))
            lines.append(f"| {case} | {i + 1} | {layouts} | {r['speedup']:.2f}x | "
                         f"{r['spread']['dense']:.2f} / {r['spread']['converted']:.2f} |")
    lines += ["", "Never slower: the smallest speed-up of each case: " + "; ".join(
        f"{case} {min(r['speedup'] for r in runs):.2f}x" for case, runs in cases.items()) + "."]
    text = "\n".join(lines)
    publish_report(args.out, text, {"cases": cases, "args": vars(args)}, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
