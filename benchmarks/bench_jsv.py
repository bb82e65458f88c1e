"""Benchmark: input-output Jacobian singular values over the 10,000 MNIST test images for
LeNet-300-100, :func:`sparsetrain.signal.input_output_jsv` (vmap over examples of jacrev, a
batch at a time) against a plain per-example ``torch.autograd.functional.jacobian`` loop.

In one process, with the one interleaved timer (:func:`sparsetrain.measure.time_interleaved`):

- ``torch.func``: the statistics (mean, std, max, min) over all 10,000 test images, end to end
  (the data already in memory, standardised as sparsetrain's loaders give it);
- ``loop``: ``torch.autograd.functional.jacobian`` of the model on one image at a time, then
  ``torch.linalg.svdvals``, over the first ``--loop-examples`` images (default 500), extrapolated
  to 10,000 in proportion (the loop's time per image does not depend on the image).

The speed-up is ``ratio(loop, torch.func)`` x (10,000 / loop examples), the median over rounds
of the per-round ratio. The first ``torch.func`` call in a process also pays a one-time set-up
(torch imports its compiler stack lazily): it is measured once, before the warm-up, and reported
beside the steady time. The singular values of the loop's images are checked against the batched
ones. The model is LeNet-300-100 with torch's default initialisation (seed ``--seed``), dense.

    SPARSETRAIN_DATA=/work/shared/datasets python benchmarks/bench_jsv.py --threads 1   # writes docs/results/bench_jsv.md and .json
    python benchmarks/bench_jsv.py --rounds 1 --loop-examples 50 --out -                # a quick look

This is a benchmark, not a test: it reports ratios and never fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import sparsetrain
from sparsetrain import create_model
from sparsetrain.data import create_loaders
from sparsetrain.measure import Provenance, publish_report, time_interleaved
from sparsetrain.signal import JSVStats, input_output_jsv

TARGET_SPEEDUP = 10.0
TARGET_SECONDS = 5.0


def loop_jsv(model: torch.nn.Module, x: torch.Tensor) -> JSVStats:
    """The baseline: one example at a time, ``torch.autograd.functional.jacobian`` then svdvals."""
    values = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).squeeze(0), xi)  # (10, 1, 28, 28)
        values.append(torch.linalg.svdvals(j.reshape(j.shape[0], -1)))
    return JSVStats.from_values(torch.stack(values))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop-examples", type=int, default=500, help="images the per-example loop is timed on")
    p.add_argument("--batch-size", type=int, default=1000, help="images per batch for torch.func")
    p.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_jsv.md", help="Markdown file to write ('-': none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    provenance = Provenance.now(["python", "benchmarks/bench_jsv.py", *argv])  # load before measuring
    loaders = create_loaders("mnist", eval_batch_size=args.batch_size, download=False)
    test = loaders.test
    n = test.num_examples
    torch.manual_seed(args.seed)
    model = create_model("lenet-300-100").eval()
    x_loop = next(iter(create_loaders("mnist", eval_batch_size=args.loop_examples, download=False).test))[0]

    start = time.perf_counter()
    input_output_jsv(model, x_loop[:10])
    first_call_s = time.perf_counter() - start  # the one-time torch.func set-up, with 10 images

    print(f"timing JSV over {n} images against a loop over {len(x_loop)} ...", file=sys.stderr, flush=True)
    results: dict[str, JSVStats] = {}

    def batched():
        results["torch.func"] = input_output_jsv(model, test)

    def loop():
        results["loop"] = loop_jsv(model, x_loop)

    timed = time_interleaved({"torch.func": batched, "loop": loop}, rounds=args.rounds, warmup=args.warmup,
                             number=1)
    scale = n / len(x_loop)
    speedup = timed.ratio("loop", "torch.func") * scale
    batched_s = timed.median("torch.func")
    stats, base = results["torch.func"], results["loop"]
    check = input_output_jsv(model, x_loop)
    max_diff = float((check.values - base.values).abs().max())

    rows = {
        "images": n,
        "loop_images": len(x_loop),
        "batched_s": batched_s,
        "batched_spread": timed.spread("torch.func"),
        "loop_s": timed.median("loop"),
        "loop_spread": timed.spread("loop"),
        "loop_extrapolated_s": timed.median("loop") * scale,
        "speedup": speedup,
        "first_call_s": first_call_s,
        "rounds": timed.rounds,
        "jsv": stats.to_dict(bins=20),
        "loop_jsv": base.to_dict(),
        "max_abs_diff_on_loop_images": max_diff,
    }
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    md = [
        "# Input-output Jacobian singular values: torch.func against a per-example loop",
        "",
        f"- LeNet-300-100 (torch's default initialisation, seed {args.seed}, dense, eval mode) on the {n:,} MNIST "
        "test images (standardised by the training set's mean and std, as sparsetrain's loaders give them); "
        f"CPU, {torch.get_num_threads()} torch thread(s); sparsetrain {sparsetrain.__version__} (machine, "
        "command, date and load: at the end)",
        f"- torch.func: `input_output_jsv(model, loaders.test)`, batches of {args.batch_size}: vmap over examples "
        "of jacrev, singular values from the 10 x 10 Gram matrix in float64, statistics over all values",
        f"- loop: `torch.autograd.functional.jacobian` one image at a time, then `torch.linalg.svdvals`, timed "
        f"on the first {len(x_loop)} images and extrapolated to {n:,} (x {scale:g}: the loop's time per image "
        "does not depend on the image)",
        f"- medians of {timed.rounds} interleaved rounds (after {args.warmup} warm-up); speed-up = the paired "
        f"median of loop time / torch.func time, x {scale:g}",
        "",
        "| | time (s) | spread | target | |",
        "|---|---|---|---|---|",
        f"| torch.func, {n:,} images | {batched_s:.2f} | {timed.spread('torch.func'):.2f} | < {TARGET_SECONDS:g} s | "
        f"{verdict(batched_s < TARGET_SECONDS)} |",
        f"| loop, {len(x_loop):,} images | {timed.median('loop'):.2f} | {timed.spread('loop'):.2f} | | |",
        f"| loop, extrapolated to {n:,} | {timed.median('loop') * scale:.1f} | | | |",
        f"| speed-up | {speedup:.1f}x | | >= {TARGET_SPEEDUP:g}x | {verdict(speedup >= TARGET_SPEEDUP)} |",
        "",
        f"The first torch.func call in a process takes {first_call_s:.2f} s on 10 images (torch's one-time lazy "
        "set-up of its function transforms), paid once before the timed rounds.",
        "",
        f"JSV over the {n:,} images ({stats.count:,} values): mean {stats.mean:.4f}, std {stats.std:.4f}, "
        f"max {stats.max:.4f}, min {stats.min:.4f}. On the loop's {len(x_loop)} images the two agree to "
        f"{max_diff:.2e} (largest absolute difference of a singular value).",
        "",
    ]
    publish_report(args.out, "\n".join(md), {"results": rows, "args": vars(args)}, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
