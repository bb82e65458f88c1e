"""Benchmark: sparse training on CPU (SparseTrainLinear) against dense masked training.

A training step (zero_grad, forward, cross-entropy, backward, SGD step with momentum and weight
decay) of a wide MLP (default 4096 -> 4096 -> 4096 -> 10, inputs 4096, batch 64), every Linear
weight pruned to the same sparsity (default 95%, random, layerwise), in three ways:

  dense step          the unpruned network (reference only)
  dense masked step   the pruned network with zeros, as ``sparsetrain run`` trains it by default:
                      dense layers + ``GradientMask`` (after_backward / after_step)
  sparse step         ``sparsify_for_training_``: SparseTrainLinear layers (``--execution sparse``)

and, for one hidden layer (out x in), the forward and backward of the dense layer against the
sparse one, with the backward's products timed alone (grad_x, grad of the weights).

    python benchmarks/bench_sparse_training.py --threads 1              # prints the Markdown report
    python benchmarks/bench_sparse_training.py --threads 2 --repeats 50 --out docs/results/bench_sparse_training.md

Times are medians over interleaved rounds (``sparsetrain.measure.time_interleaved``: each round
runs every op once, the order alternating); a speed-up is ``ratio(reference, op)``, the median
over rounds of (reference / op of the same round), so a slow phase of a busy machine hits both
members of a pair. The training step is the library's ``sparsetrain.sparse.bench.bench_training_step``. Pass ``--threads`` with the number of idle cores: OpenMP
kernels with more threads than free cores wait on each other and lose 10x or more. A benchmark,
not a test: a missed target never fails (exit status 0 unless something breaks).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
import torch.nn as nn

import sparsetrain
from sparsetrain import apply_mask_, prune_at_init
from sparsetrain.measure import LR, MOMENTUM, WEIGHT_DECAY, Provenance, Timings, publish_report, time_interleaved
from sparsetrain.sparse.bench import bench_training_step
from sparsetrain.sparse.training import SparseTrainLinear, _csr

TARGET = 2.0  # the issue: the sparse step at least 2x faster than the dense masked step

Op = tuple[Callable[[], object], Callable[[object], object]]  # (untimed set-up, timed call)


def ms(t: Timings) -> dict[str, float]:
    return {n: 1e3 * v for n, v in t.medians().items()}


def bench_step(args) -> dict:
    """The whole training step: :func:`sparsetrain.sparse.bench.bench_training_step`."""
    return bench_training_step(inputs=args.inputs, hidden=args.hidden, classes=args.classes,
                               batch_size=args.batch_size, sparsity=args.sparsity, repeats=args.repeats,
                               warmup=args.warmup, seed=args.seed)


# --------------------------------------------------------------------------------------------
# One layer: forward, backward, and the backward's products
# --------------------------------------------------------------------------------------------


def bench_layer(args) -> dict:
    torch.manual_seed(args.seed)
    out_f, in_f = args.hidden[0], args.inputs
    linear = nn.Linear(in_f, out_f)
    mask = prune_at_init(linear, "random", sparsity=args.sparsity, seed=args.seed)["weight"]
    apply_mask_(linear, {"weight": mask})
    sparse = SparseTrainLinear.from_dense(linear, mask)
    g = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(args.batch_size, in_f, generator=g).requires_grad_()
    grad_y = torch.randn(args.batch_size, out_f, generator=g)
    grad_y_t, x_t = grad_y.t().contiguous(), x.detach().t().contiguous()
    w = linear.weight.detach()
    weight_t = _csr(sparse.t_crow_indices, sparse.t_col_indices, sparse.values.detach()[sparse.t_perm.long()], (in_f, out_f))
    pattern = _csr(sparse.crow_indices, sparse.col_indices, torch.zeros_like(sparse.values.detach()), (out_f, in_f))

    def forward(layer: nn.Module) -> Op:
        return (lambda: None), (lambda _: layer(x))

    def backward(layer: nn.Module) -> Op:
        def setup():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            return layer(x)  # untimed forward

        return setup, (lambda out: out.backward(grad_y))

    none = lambda: None  # noqa: E731
    ops: dict[str, Op] = {
        "dense forward": forward(linear),
        "sparse forward": forward(sparse),
        "dense backward": backward(linear),
        "sparse backward": backward(sparse),
        "dense grad_x (grad_y W)": (none, lambda _: grad_y @ w),
        "sparse grad_x (sparse.mm W^T)": (none, lambda _: torch.sparse.mm(weight_t, grad_y_t)),
        "dense grad_W (grad_y^T x)": (none, lambda _: grad_y.t() @ x.detach()),
        "sparse grad_values (sampled_addmm)": (none, lambda _: torch.sparse.sampled_addmm(pattern, grad_y_t, x_t.t(), beta=0.0)),
    }
    t = time_interleaved(ops, rounds=args.repeats, warmup=args.warmup)
    pairs = [
        ("forward", "dense forward", "sparse forward"),
        ("backward", "dense backward", "sparse backward"),
        ("  of which grad_x", "dense grad_x (grad_y W)", "sparse grad_x (sparse.mm W^T)"),
        ("  of which grad of the weights", "dense grad_W (grad_y^T x)", "sparse grad_values (sampled_addmm)"),
    ]
    return {
        "shape": (out_f, in_f),
        "nnz": sparse.nnz,
        "ms": ms(t),
        "rows": [(label, d, s, t.ratio(d, s)) for label, d, s in pairs],  # speed-up: ratio(dense, sparse)
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def report(step: dict, layer: dict, args) -> str:
    t = step["ms"]
    arch = " -> ".join(str(w) for w in step["widths"]) + f" -> {args.classes}"
    verdict = "PASS" if step["speedup"] >= TARGET else "MISS"
    lines = [
        "# Sparse training benchmark (CPU)",
        "",
        f"- sparsetrain {sparsetrain.__version__} (machine, command, date, load average: at the end)",
        f"- MLP {arch} (ReLU), batch {args.batch_size} random inputs, every Linear weight pruned to "
        f"{args.sparsity:.0%} (random, layerwise): {step['kept']:,} of {step['total']:,} weights kept; "
        f"SGD lr {LR}, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}",
        f"- {args.repeats} timed rounds after {args.warmup} warm-up rounds, seed {args.seed}; "
        "speed-up = ratio(reference, op): the median over rounds of (reference time / op time in the same round)",
        f"- the sparse and the dense masked model agree: max |output difference| = {step['max_output_difference']:.2e}",
        "",
        "## Training step (forward + backward + SGD step)",
        "",
        "| step | median (ms) | model + optimizer state (MiB) |",
        "|---|---|---|",
        f"| dense (unpruned, reference) | {t['dense step']:.2f} | |",
        f"| dense masked (dense layers + GradientMask) | {t['dense masked step']:.2f} | {step['state_mib']['dense masked step']:.1f} |",
        f"| sparse (SparseTrainLinear, `--execution sparse`) | {t['sparse step']:.2f} | {step['state_mib']['sparse step']:.1f} |",
        "",
        "| figure | target | measured | |",
        "|---|---|---|---|",
        f"| speed-up of the sparse step over the dense masked step | >= {TARGET} | {step['speedup']:.2f}x | {verdict} |",
        f"| speed-up of the sparse step over the dense (unpruned) step | | {step['speedup_vs_dense']:.2f}x | |",
        f"| dense masked step / dense step (GradientMask's cost) | | {step['masked_vs_dense']:.3f} | |",
        "",
        f"## One layer ({layer['shape'][0]} x {layer['shape'][1]}, {layer['nnz']:,} kept, batch {args.batch_size})",
        "",
        "| part | dense (ms) | sparse (ms) | speed-up |",
        "|---|---|---|---|",
    ]
    lm = layer["ms"]
    for label, d, s, ratio in layer["rows"]:
        lines.append(f"| {label} | {lm[d]:.3f} | {lm[s]:.3f} | {ratio:.2f}x |")
    lines += [
        "",
        "Sparse kernels: forward `torch.sparse.mm(W_csr, x^T)`, grad_x `torch.sparse.mm(W^T_csr, grad_y^T)`, "
        "grad of the values `torch.sparse.sampled_addmm` (see `sparsetrain/sparse/training.py`). "
        "PASS/MISS is informative only; timings on a loaded machine are noisy.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=4096, help="input features")
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 4096], help="hidden widths")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=30, help="timed rounds (one call of each op per round)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="-", help="also write the Markdown report to this file ('-': none)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    provenance = Provenance.now(["python", "benchmarks/bench_sparse_training.py", *argv])  # before measuring

    print("benchmarking the training step ...", file=sys.stderr, flush=True)
    step = bench_step(args)
    print("benchmarking one layer ...", file=sys.stderr, flush=True)
    layer = bench_layer(args)
    text = report(step, layer, args)
    publish_report(args.out, text, {"step": step, "layer": layer, "args": vars(args)}, provenance=provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
