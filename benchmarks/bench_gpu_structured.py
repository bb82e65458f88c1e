"""Benchmark (CUDA GPU): a 2:4 semi-structured and a 64x64 block-sparse (BSR) Linear against dense.

One ``features x features`` Linear layer (default 8192 x 8192, with bias), in float16 and bfloat16,
at several token counts (default 1024 and 4096 rows of input), forward only:

  dense   ``F.linear(x, W, b)`` with the unpruned weight (cuBLAS)
  2:4     :class:`sparsetrain.sparse.SparseSemiStructuredLinear`: the weight under a SNIP 2:4 mask,
          run by ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS); target >= 1.3x
  block   :class:`sparsetrain.sparse.SparseBlockLinear`: the weight under a SNIP 64x64-block mask at
          90% block sparsity, ``torch.addmm`` on a BSR tensor (torch's Triton/cuSPARSE kernels);
          target >= 2x

Masks: SNIP (``prune_at_init(..., "snip", structure=...)``), scored once in float32 on the CPU
from the layer's random initial weights and one random batch (``--score-batch`` rows, labels drawn
from the ``features`` outputs, cross-entropy); the same initial weights are then cast to each dtype.

Timing (``sparsetrain.measure``): each op is captured in a CUDA graph (``capture_cuda_graph``) after
``--warmup`` calls on a side stream (first-call work such as Triton compilation and cuSPARSELt
plans stays out of the graph); the graphs are then replayed in interleaved rounds
(``time_interleaved(..., clock="cuda")``: dense, 2:4, block, the order reversed every other
round), ``--inner`` replays between two CUDA events per measurement, ``--replays`` rounds.
Reported: median seconds per call, and the speed-up ``ratio("dense", sparse)``, the median over
rounds of (dense / sparse of the same round). If an op cannot be captured, it is timed eagerly the same way
and the table says so. Correctness: each sparse output (from its graph) against ``F.linear`` with
the masked dense weight in the same dtype, as a relative error (Frobenius norms) with a tolerance
of 1e-2 (float16) / 3e-2 (bfloat16).

    python benchmarks/bench_gpu_structured.py                          # writes docs/results/bench_gpu_structured.{md,json}
    python benchmarks/bench_gpu_structured.py --features 4096 --tokens 1024 --out -

Exit status: 0 (a missed speed target is reported, not failed), 1 if an output does not match
the dense masked layer, 2 without a CUDA GPU (with a message, before any work).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.measure import Provenance, Timings, capture_cuda_graph, time_interleaved, write_report
from sparsetrain.sparse.block import (
    BlockMatrix,
    SparseBlockLinear,
    SparseSemiStructuredLinear,
    compress_2to4,
    semi_structured_problem,
)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp16": 1e-2, "bf16": 3e-2}  # relative error against the dense masked layer, same dtype
TARGETS = {"2:4": 1.3, "block": 2.0}  # speed-up over dense
DEFAULT_OUT = "docs/results/bench_gpu_structured.md"
NO_CUDA_MESSAGE = (
    "bench_gpu_structured: no CUDA GPU here (torch.cuda.is_available() is False; torch {version}). "
    "This benchmark measures GPU kernels (cuSPARSELt/CUTLASS 2:4, Triton/cuSPARSE BSR) and has nothing "
    "to measure on a CPU; run it on a machine with an NVIDIA GPU (compute capability 8.0+ for 2:4) and a "
    "CUDA build of torch."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_gpu_structured.py",
        description="GPU forward time of a 2:4 semi-structured and a 64x64 block-sparse Linear against dense "
                    "(CUDA graphs, interleaved replays); needs a CUDA GPU.",
    )
    p.add_argument("--features", type=int, default=8192, help="the layer is features x features (default 8192)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="input rows (default 1024 4096)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    p.add_argument("--block", type=int, default=64, help="square tile size of the block mask (default 64)")
    p.add_argument("--block-sparsity", type=float, default=0.9, help="fraction of tiles pruned (default 0.9)")
    p.add_argument("--score-batch", type=int, default=64, help="rows of the random batch SNIP scores on")
    p.add_argument("--warmup", type=int, default=5, help="eager calls on a side stream before capture")
    p.add_argument("--replays", type=int, default=50, help="interleaved timed rounds (default 50)")
    p.add_argument("--inner", type=int, default=5, help="graph replays per timed measurement (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"Markdown report (JSON beside it); '-' for none (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.features % args.block or args.features % 64:
        p.error(f"--features must be a multiple of 64 and of --block ({args.block})")
    if not 0.0 < args.block_sparsity < 1.0:
        p.error("--block-sparsity must lie strictly between 0 and 1")
    if min(args.tokens) < 1 or args.replays < 1 or args.inner < 1 or args.warmup < 1:
        p.error("--tokens, --replays, --inner and --warmup must be positive")
    return args


# ----------------------------------------------------------------------------- masks (CPU)


def snip_layer_and_masks(features: int, block: int, block_sparsity: float, score_batch: int, seed: int):
    """The layer (random init, float32, CPU) and its SNIP masks: ``"2:4"`` and ``"block"`` (square
    ``block`` tiles, ``block_sparsity`` of them pruned), both scored on one random batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, features))
    x = torch.randn(score_batch, features)
    y = torch.randint(0, features, (score_batch,))
    m24 = st.prune_at_init(model, "snip", batches=(x, y), structure="2:4")["0.weight"]
    mblock = st.prune_at_init(model, "snip", sparsity=block_sparsity, batches=(x, y),
                              structure=f"block{block}x{block}")["0.weight"]
    return model[0], {"2:4": m24, "block": mblock}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- timing (CUDA)


def time_graphs(replays: dict[str, Callable[[], object]], rounds: int, inner: int) -> Timings:
    """Seconds per call of each replay: ``rounds`` interleaved rounds, each replay ``inner`` times
    between two CUDA events (``sparsetrain.measure.time_interleaved`` with ``clock="cuda"``)."""
    return time_interleaved(replays, rounds=rounds, warmup=1, number=inner, clock="cuda", gc_every=0)


def bench_one(layer: nn.Linear, masks: dict[str, torch.Tensor], dtype_name: str, tokens: int, args) -> dict:
    """One (dtype, tokens) row: times, speed-ups, relative errors, capture modes."""
    dev = torch.device("cuda")
    dtype = DTYPES[dtype_name]
    w = layer.weight.detach().to(dev, dtype)  # (out, in)
    b = layer.bias.detach().to(dev, dtype)
    x = torch.randn(tokens, w.shape[1], device=dev, dtype=dtype, generator=torch.Generator(device=dev).manual_seed(args.seed))
    row: dict = {"dtype": dtype_name, "tokens": tokens, "mode": {}, "error": {}, "rel_err": {}}
    ops: dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: F.linear(x, w, b)}
    refs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        w24 = w * masks["2:4"].to(dev)
        problem = semi_structured_problem(w24)
        if problem is None:
            semi = SparseSemiStructuredLinear(*compress_2to4(w24), tuple(w24.shape), b)
            ops["2:4"] = lambda: semi(x)
            refs["2:4"] = F.linear(x, w24, b)
        else:
            row["error"]["2:4"] = problem
        wblk = w * masks["block"].to(dev)
        bsr = SparseBlockLinear(BlockMatrix.from_dense(wblk, (args.block, args.block)), b)
        ops["block"] = lambda: bsr(x)
        refs["block"] = F.linear(x, wblk, b)
        replays, outs = {}, {}
        for name, fn in ops.items():
            try:
                replays[name], outs[name], row["mode"][name] = capture_cuda_graph(fn, args.warmup)
            except Exception as exc:  # a kernel this build or GPU lacks: the row says so
                row["error"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if "dense" not in replays:
            raise RuntimeError(f"dense F.linear failed: {row['error'].get('dense')}")
        t = time_graphs(replays, args.replays, args.inner)
        for name in replays:
            row[f"{name}_s"] = t.median(name)
            if name != "dense":
                row[f"{name}_speedup"] = t.ratio("dense", name)
                row["rel_err"][name] = rel_err(outs[name], refs[name])
    row["ok"] = all(e <= TOLERANCE[dtype_name] for e in row["rel_err"].values())
    return row


# ----------------------------------------------------------------------------- report


def verdict(speedup: float | None, target: float) -> str:
    return "-" if speedup is None else ("PASS" if speedup >= target else "MISS")


def to_markdown(rows: list[dict], meta: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.3f}"

    def sx(v):
        return "-" if v is None else f"{v:.2f}x"

    def err(row, k):
        return f"{row['rel_err'][k]:.1e}" if k in row["rel_err"] else "-"

    lines = [
        "# 2:4 semi-structured and block-sparse Linear on GPU",
        "",
        f"- GPU: {meta['gpu']}, CUDA {meta['cuda']} (machine, command, date: at the end)",
        f"- layer: {meta['features']} x {meta['features']} Linear with bias, forward; masks: SNIP on random init and "
        f"one random batch of {meta['score_batch']}: 2:4, and {meta['block']}x{meta['block']} blocks at "
        f"{meta['block_sparsity']:.0%} block sparsity ({meta['block_density']:.2%} of weights kept)",
        f"- timing: CUDA graphs, {meta['replays']} interleaved rounds x {meta['inner']} replays, medians; speed-up = "
        "ratio(dense, sparse), the median of per-round dense/sparse ratios; targets: 2:4 >= "
        f"{TARGETS['2:4']}x, block >= {TARGETS['block']}x",
        "",
        "| dtype | tokens | dense ms | 2:4 ms | 2:4 speed-up | 2:4 target | block ms | block speed-up | block target "
        "| 2:4 rel err | block rel err | outputs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['tokens']} | {ms(r.get('dense_s'))} | {ms(r.get('2:4_s'))} | {sx(r.get('2:4_speedup'))} "
            f"| {verdict(r.get('2:4_speedup'), TARGETS['2:4'])} | {ms(r.get('block_s'))} | {sx(r.get('block_speedup'))} "
            f"| {verdict(r.get('block_speedup'), TARGETS['block'])} | {err(r, '2:4')} | {err(r, 'block')} "
            f"| {'match' if r['ok'] else 'MISMATCH'} |"
        )
    notes = [f"- {r['dtype']}, {r['tokens']} tokens, {k}: {v}" for r in rows for k, v in r["error"].items()]
    notes += [f"- {r['dtype']}, {r['tokens']} tokens, {k}: timed {v}" for r in rows for k, v in r["mode"].items()
              if v != "graph"]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE.format(version=torch.__version__), file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else argv
    provenance = Provenance.now(["python", "benchmarks/bench_gpu_structured.py", *argv])
    print(f"scoring SNIP masks for a {args.features}x{args.features} layer on the CPU ...", file=sys.stderr)
    layer, masks = snip_layer_and_masks(args.features, args.block, args.block_sparsity, args.score_batch, args.seed)
    rows = []
    for dtype_name in args.dtypes:
        for tokens in args.tokens:
            print(f"{dtype_name}, {tokens} tokens ...", file=sys.stderr)
            rows.append(bench_one(layer, masks, dtype_name, tokens, args))
    meta = {
        "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "features": args.features, "block": args.block,
        "block_sparsity": args.block_sparsity, "block_density": float(masks["block"].float().mean()),
        "score_batch": args.score_batch, "replays": args.replays, "inner": args.inner, "targets": TARGETS,
    }
    text = to_markdown(rows, meta)
    print(text + "\n" + provenance.markdown())
    if args.out not in ("", "-"):
        md, js = write_report(args.out, text, {"meta": meta, "rows": rows}, provenance=provenance)
        print(f"written to {md} and {js}", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
