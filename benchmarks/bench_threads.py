"""Benchmark: how many torch threads should a small network's training step use on a CPU that
another process shares? The measurement behind :func:`sparsetrain.threads.choose_threads`.

Per model (LeNet-300-100 and LeNet-5-Caffe by default, batch 100, SGD as ``sparsetrain run``
trains), one training step (:class:`sparsetrain.measure.TrainStep`) on 1 thread against the same
step on ``--max-threads`` threads (torch's default on this machine), timed with the one
interleaved timer (the thread count is set in each call's untimed set-up, so both counts share
every phase of the load). Twice: as the machine is, then with ``--load`` busy processes added (a
busy core, the case of the issue: another process holding one of two cores); each condition
names the 1-minute load average at its start (what else was running). Not a test: a missed target
never fails a build.

    .venv/bin/python benchmarks/bench_threads.py                     # writes docs/results/bench_threads.md
    .venv/bin/python benchmarks/bench_threads.py --models lenet-300-100 --rounds 100 --out -
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import torch

import sparsetrain as st
from sparsetrain.measure import Provenance, TrainStep, load_average, publish_report, time_interleaved
from sparsetrain.threads import DEFAULT_THREADS, SMALL_STEP_FLOPS, choose_threads, idle_cores, step_flops


def _burn(stop_at: float) -> None:
    """A busy core (another user's process)."""
    x = 0
    while time.time() < stop_at:
        x += 1


def measure(model_name: str, batch: int, max_threads: int, rounds: int, seed: int, idle: float) -> dict:
    torch.manual_seed(seed)
    model = st.create_model(model_name)
    shape = st.models.default_input_shape(model_name)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))  # (B, *shape), (B,)
    step = TrainStep(model)

    def op(n: int):
        def setup():
            torch.set_num_threads(n)
            step.reset()
        return setup, lambda _: step.step(x, y)

    names = {1: "1 thread", max_threads: f"{max_threads} threads"}
    t = time_interleaved({names[n]: op(n) for n in names}, rounds=rounds, warmup=5)
    one, many = names[1], names[max_threads]
    return {
        "flops": step_flops(model, shape, batch),
        "ms": {k: 1e3 * v for k, v in t.medians().items()},
        # what a run of many steps takes: a busy core shows up as rare long steps, which a median hides
        "mean_ms": {k: 1e3 * sum(v) / len(v) for k, v in t.samples.items()},
        "spread": {k: t.spread(k) for k in names.values()},
        "many_over_one": t.ratio(many, one),  # time on max threads / time on one
        "mean_many_over_one": sum(t.samples[many]) / sum(t.samples[one]),
        "rule": choose_threads(model, shape, batch, idle=idle),  # with the idle cores of the condition
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5-caffe", "vgg-cifar-small"])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--max-threads", type=int, default=DEFAULT_THREADS, help="the other thread count (default: torch's)")
    p.add_argument("--rounds", type=int, default=200, help="timed rounds per comparison")
    p.add_argument("--load", type=int, default=1, help="busy processes in the loaded measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_threads.md", help="Markdown report (+ .json); '-': none")
    args = p.parse_args(argv)
    if args.max_threads < 2:
        print("only one core here: nothing to compare (give --max-threads 2 to force it)", file=sys.stderr)
        return 1
    provenance = Provenance.now(["python", "benchmarks/bench_threads.py", *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, dict[str, dict]] = {}
    for added, load in (("none added", 0), (f"{args.load} busy process(es) added", args.load)):
        # what else ran: the load average before this condition's own busy processes started
        before = load_average()
        condition = f"{added} (load {before[0] if before else 'unknown'} at start)"
        idle = idle_cores()
        idle = None if idle is None else idle - load
        burners = [mp.Process(target=_burn, args=(time.time() + 3600,), daemon=True) for _ in range(load)]
        for b in burners:
            b.start()
        try:
            for m in args.models:
                print(f"{condition}: {m} ...", file=sys.stderr, flush=True)
                results.setdefault(m, {})[condition] = measure(m, args.batch_size, args.max_threads, args.rounds,
                                                               args.seed, idle=idle)
        finally:
            for b in burners:
                b.terminate()
    many = f"{args.max_threads} threads"
    lines = [
        "# Torch threads for small training steps, quiet and with a busy core",
        "",
        f"One SGD training step (batch {args.batch_size}) on 1 thread against {args.max_threads} (torch's default "
        f"here), interleaved rounds ({args.rounds}), medians; *{args.max_threads} / 1*: time on "
        f"{args.max_threads} threads over time on 1, paired per round (above 1: one thread is faster); "
        "*spread*: interquartile range over the median. *FLOPs*: multiply-adds of the Linear/Conv2d layers x 3 "
        "(forward, and backward for inputs and weights) per step. *rule*: the thread count "
        f"`sparsetrain.threads.choose_threads` picks (1 below {SMALL_STEP_FLOPS:.0e} FLOPs a step, else the "
        "cores the load average leaves idle), given the idle cores at the condition's start less the busy "
        "processes it added.",
        "",
        f"| model | FLOPs a step | condition | median ms: 1 / {args.max_threads} threads | ratio of medians "
        f"| mean ms: 1 / {args.max_threads} threads | ratio of means | spread 1 / {args.max_threads} | rule |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, conds in results.items():
        for condition, r in conds.items():
            lines.append(
                f"| {m} | {r['flops']:.2e} | {condition} | {r['ms']['1 thread']:.2f} / {r['ms'][many]:.2f} | "
                f"{r['many_over_one']:.2f} | {r['mean_ms']['1 thread']:.2f} / {r['mean_ms'][many]:.2f} | "
                f"{r['mean_many_over_one']:.2f} | {r['spread']['1 thread']:.2f} / {r['spread'][many]:.2f} | {r['rule']} |"
            )
    text = "\n".join(lines)
    publish_report(args.out, text, {"results": results, "args": vars(args)}, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
