"""Benchmark: SNIP pruning at initialization and masked training, against a dense training step.

Prints, per model, measured in one process on one batch (see benchmarks/README.md):

  (a) time of SNIP pruning (scores + selection, returns the mask) / time of one dense training step
  (b) peak memory while pruning / peak memory of one dense training step
  (c) time of one masked training step / time of one dense training step

for sparsetrain (``prune_at_init`` + ``GradientMask``) and for the baseline to beat,
``torch.nn.utils.prune.global_unstructured`` with SNIP scores as importance (its masked step runs
the forward pre-hooks that compute ``weight = weight_orig * weight_mask``).

    python benchmarks/bench_snip.py                       # both LeNets, CPU, writes docs/results/bench_snip.md
    python benchmarks/bench_snip.py --repeats 200 --threads 1 --out /tmp/bench.md

This is a benchmark, not a test: it reports ratios against a dense step measured in the same
process, and never fails on a missed target (the exit status is 0 unless something breaks).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the profiler's start/stop lines (memory measurement)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.nn.utils.prune as tprune  # noqa: E402

import sparsetrain  # noqa: E402
from sparsetrain import GradientMask, apply_mask_, create_model, prune_at_init  # noqa: E402
from sparsetrain.masks import prunable_parameters  # noqa: E402
from sparsetrain.measure import Provenance, TrainStep, cuda_sync, measure_memory, time_interleaved, write_report  # noqa: E402

TARGETS = {"a": 1.2, "b": 1.0, "c": 1.03}


# --------------------------------------------------------------------------------------------
# The measured operations
# --------------------------------------------------------------------------------------------


def sparsetrain_prune(model: nn.Module, x, y, sparsity: float):
    """sparsetrain end to end: scores, global selection, the mask (the model is not changed)."""
    return prune_at_init(model, "snip", sparsity=sparsity, batches=(x, y))


def torch_prune(model: nn.Module, x, y, sparsity: float) -> nn.Module:
    """The baseline: the same SNIP scores (one forward-backward in inference mode, |g * w| on the
    same parameters), then torch.nn.utils.prune.global_unstructured with them as importance.
    Reparametrises ``model`` in place (weight_orig, weight_mask, a forward pre-hook)."""
    names = list(prunable_parameters(model))
    modules = dict(model.named_modules())
    targets = [(modules[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in names]
    weights = [getattr(m, a) for m, a in targets]
    was_training = model.training
    model.eval()
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, weights)
    model.train(was_training)
    with torch.no_grad():
        scores = {t: (g * w).abs_() for t, g, w in zip(targets, grads, weights)}
    del grads
    tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, importance_scores=scores, amount=sparsity)
    return model


def torch_prune_mask(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n[: -len("_mask")]: b.bool() for n, b in model.named_buffers() if n.endswith("_mask")}


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def bench_model(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    base = create_model(name).to(device)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)

    mask = sparsetrain_prune(copy.deepcopy(base), x, y, args.sparsity)
    tp_model = torch_prune(copy.deepcopy(base), x, y, args.sparsity)
    tp_mask = torch_prune_mask(tp_model)
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    agree = sum(int((mask[n] == tp_mask[n].to(mask[n].device)).sum()) for n in mask) / total

    dense = TrainStep(copy.deepcopy(base))
    st_model = apply_mask_(copy.deepcopy(base), mask)
    masked = TrainStep(st_model, hooks=[GradientMask(st_model, mask)])
    baseline = TrainStep(tp_model)

    def step_op(trainer: TrainStep):
        return (trainer.reset, lambda _: trainer.step(x, y))

    ops = {
        "dense step": step_op(dense),
        "sparsetrain masked step": step_op(masked),
        "torch.prune masked step": step_op(baseline),
        "sparsetrain prune": (lambda: copy.deepcopy(base), lambda m: sparsetrain_prune(m, x, y, args.sparsity)),
        "torch.prune prune": (lambda: copy.deepcopy(base), lambda m: torch_prune(m, x, y, args.sparsity)),
    }
    # Each ratio is timed in its own interleaved pair, the op beside dense steps: in one shared
    # group, torch.nn.utils.prune's calls (about 10 MiB of fresh tensors on LeNet-300-100) and the
    # fresh model copy each prune starts from evicted the caches and heap pages that the next op
    # then paid for (LeNet-5-Caffe's masked step: 1.01x of a dense step alone, 1.02-1.05x in the
    # shared group).
    samples: dict[str, list[float]] = {}
    ratios: dict[str, float] = {}  # op -> ratio(op, dense step) in its own pair
    for op in ("sparsetrain prune", "sparsetrain masked step", "torch.prune prune", "torch.prune masked step"):
        timed = time_interleaved({"dense step": ops["dense step"], op: ops[op]}, rounds=args.repeats,
                                 warmup=args.warmup, sync=cuda_sync(device))
        samples[op], samples[f"dense step beside {op}"] = timed.samples[op], timed.samples["dense step"]
        ratios[op] = timed.ratio(op, "dense step")
    samples["dense step"] = [t for op in ops if op != "dense step" for t in samples[f"dense step beside {op}"]]

    def memory_of(op: str) -> tuple[int, int]:
        setup, run = ops[op]

        def factory():
            arg = setup()
            return lambda: run(arg)

        return measure_memory(factory, device)

    memory = {op: memory_of(op) for op in ("dense step", "sparsetrain prune", "torch.prune prune")}

    def mem_ratio(op: str) -> float:
        return memory[op][0] / memory["dense step"][0]

    def mem_ratio_bounds(op: str) -> tuple[float, float]:
        """Bounds on the ratio of peaks counting tensors and NumPy/Python memory together: the
        two peaks of one call may or may not coincide."""
        (t, p), (dt, dp) = memory[op], memory["dense step"]
        return max(t, p) / (dt + dp), (t + p) / max(dt, dp)

    return {
        "model": name,
        "params": sum(p.numel() for p in base.parameters()),
        "prunable": total,
        "kept": kept,
        "mask_agreement": agree,
        "median_ms": {op: 1e3 * statistics.median(s) for op, s in samples.items()},
        "memory": memory,
        "a": {lib: ratios[f"{lib} prune"] for lib in ("sparsetrain", "torch.prune")},
        "b": {lib: mem_ratio(f"{lib} prune") for lib in ("sparsetrain", "torch.prune")},
        "b_py": {lib: mem_ratio_bounds(f"{lib} prune") for lib in ("sparsetrain", "torch.prune")},
        "c": {lib: ratios[f"{lib} masked step"] for lib in ("sparsetrain", "torch.prune")},
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def bounds_verdict(lo: float, hi: float, target: float) -> str:
    return "PASS" if hi <= target else "MISS" if lo > target else "PASS?"


def report(results: list[dict], args, device: torch.device) -> str:
    mb = 1 / 2**20
    lines = [
        "# SNIP pruning benchmark",
        "",
        f"- device: {device.type}; sparsetrain {sparsetrain.__version__} (machine, command, date: at the end)",
        f"- batch {args.batch_size} x (1, 28, 28) random inputs, sparsity {args.sparsity}, "
        f"{args.repeats} timed rounds after {args.warmup} warm-up rounds, seed {args.seed}",
        "- ratios: time = ratio(op, dense step), the median over rounds of (op / dense step of the same round), each op timed in "
        "its own interleaved pair with dense steps; memory = peak bytes "
        "allocated by the op / peak bytes allocated by one dense step (parameters, momentum buffers "
        "and the batch exist before both and are not counted)",
        "",
    ]
    for r in results:
        ms, mem = r["median_ms"], r["memory"]
        lines += [
            f"## {r['model']} ({r['params']:,} parameters, {r['prunable']:,} prunable, {r['kept']:,} kept; "
            f"masks of the two libraries agree on {r['mask_agreement']:.4%} of entries)",
            "",
            f"Dense training step: {ms['dense step']:.3f} ms (median); peak memory "
            f"{mem['dense step'][0] * mb:.2f} MiB of tensors + {mem['dense step'][1] * mb:.2f} MiB NumPy/Python.",
            "",
            "| figure | target | sparsetrain | | torch.nn.utils.prune | |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (
            ("a", "(a) prune time / dense step time"),
            ("b", "(b) peak memory pruning / dense step (tensors)"),
            ("c", "(c) masked step time / dense step time"),
        ):
            st, tp = r[key]["sparsetrain"], r[key]["torch.prune"]
            t = TARGETS[key]
            lines.append(f"| {label} | <= {t} | {st:.3f} | {verdict(st, t)} | {tp:.3f} | {verdict(tp, t)} |")
        cells = []
        for lib in ("sparsetrain", "torch.prune"):
            lo, hi = r["b_py"][lib]
            cells.append(f"{lo:.3f} to {hi:.3f} | {bounds_verdict(lo, hi, TARGETS['b'])}")
        lines.append(f"| (b') as (b), tensors and NumPy/Python together (bounds) | <= {TARGETS['b']} | {' | '.join(cells)} |")
        lines += [
            "",
            "| absolute (median) | dense | sparsetrain | torch.nn.utils.prune |",
            "|---|---|---|---|",
            f"| prune time (ms) | | {ms['sparsetrain prune']:.3f} | {ms['torch.prune prune']:.3f} |",
            f"| training step time (ms) | {ms['dense step']:.3f} | {ms['sparsetrain masked step']:.3f} | "
            f"{ms['torch.prune masked step']:.3f} |",
            f"| peak tensor memory, prune / dense step (MiB) | {mem['dense step'][0] * mb:.3f} | "
            f"{mem['sparsetrain prune'][0] * mb:.3f} | {mem['torch.prune prune'][0] * mb:.3f} |",
            f"| peak NumPy/Python memory (MiB) | {mem['dense step'][1] * mb:.3f} | "
            f"{mem['sparsetrain prune'][1] * mb:.3f} | {mem['torch.prune prune'][1] * mb:.3f} |",
            "",
        ]
    lines.append(
        "Targets from the issue: (a) <= 1.2, (b) <= 1.0, (c) <= 1.03 (stated for LeNet-5-Caffe). "
        "PASS/MISS is informative only; timings on a loaded machine are noisy."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5-caffe"])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=100, help="timed rounds (one call of each op per round)")
    p.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/bench_snip.md", help="Markdown file to write ('' or '-': none)")
    args = p.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")

    provenance = Provenance.now(["python", "benchmarks/bench_snip.py", *argv])  # load average before measuring
    results = []
    for name in args.models:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, args, device))
    text = report(results, args, device)
    print(text + "\n" + provenance.markdown())
    if args.out not in ("", "-"):
        md, js = write_report(args.out, text, {"results": results, "args": vars(args)}, provenance=provenance)
        print(f"written to {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
