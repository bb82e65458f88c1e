"""The subcommands: flags, then one call into the library."""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import torch

from .. import experiments
from ..data import dataset_spec, list_datasets
from ..errors import SparsetrainError
from ..init import describe_init, list_inits
from ..mask_stats import format_layer_rows
from ..masks import format_sparsity_table, load_mask, save_mask
from ..options import describe_options
from ..models import create_model, default_input_shape, describe_model_args, list_models
from ..pipeline import DENSE, build, find_mask, layer_table, validate
from ..pruning import list_methods, method_spec
from ..pruning.after_training import AFTER_TRAINING
from ..recipes import list_recipes
from ..run import default_store_root, run
from ..train.loop import resolve_device
from ..train.optim import OPTIMIZERS, SCHEDULES
from .common import add_config_flags, add_env_flags, config_from_args
from .runs import runs, runs_flags
from .study import study, study_flags


def _store(args) -> Path:
    """The run store's folder: run() opens it only once the config is valid, so that a refused
    config leaves no store folder behind."""
    return Path(args.store or default_store_root())


def _print_outcome(outcome) -> None:
    r = outcome.results
    state = "already recorded (use --force to run again)" if outcome.reused else outcome.status
    print(f"run {outcome.key} {state}: {outcome.config.model} on {outcome.config.dataset}, "
          f"{outcome.config.prune.method} at {r.get('sparsity', 0):.2%} sparsity")
    rows = [{"name": n, **v} for n, v in outcome.layer_sparsity.items() if "left_out" not in v]
    if rows:
        print(format_layer_rows(rows))
    left_out = {n: v["left_out"] for n, v in outcome.layer_sparsity.items() if "left_out" in v}
    if left_out:
        print("left dense: " + "; ".join(f"{n} ({why})" for n, why in left_out.items()))
    if r.get("stop_reason"):
        print(f"{r.get('status', outcome.status)}: {r['stop_reason']}")
    if r.get("test_error_final") is None:
        print("no test error: " + ("the run diverged" if outcome.status == "infeasible"
                                   else "the model's outputs have no logits; it is judged by its loss"))
        if r.get("test_loss_final") is not None:
            print(f"test loss (final model): {r['test_loss_final']:.4f}")
        return
    print(f"test error (final model):          {r['test_error_final']:.2%}")
    if r.get("test_error_best_val") is not None:
        print(f"test error (best validation, it {r['best_val_step']}): {r['test_error_best_val']:.2%}")
    if r.get("test_error_min_over_checks") is not None:
        print(f"min test error over checks (original protocol, not a model-selection figure): "
              f"{r['test_error_min_over_checks']:.2%}")


# --- run ---------------------------------------------------------------------------------------

def _run_flags(p):
    add_config_flags(p)
    p.add_argument("--force", action="store_true", help="run again even if this config is recorded")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--wait", action="store_true",
                   help="if another process is training this run now, wait for it and print its result "
                   "(without --wait: refused, naming that process)")
    _nproc_flag(p)


def _nproc_flag(p):
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel training in N processes on this machine (DistributedDataParallel: gloo "
                   "on CPU, NCCL on GPU, one GPU each); the global batch is split evenly, so N must divide "
                   "it; the result and run key are one process's (except for dropout, and batch norm on "
                   "CPU). Under torchrun every process it starts joins its group instead (docs/ddp.md)")


def _trains(args, config, mask=None):
    """run(), or with --nproc N (or under torchrun) the data-parallel run."""
    from .. import distributed

    common = dict(store=_store(args), data_dir=args.data_dir, device=args.device, force=args.force,
                  progress=not args.no_progress, mask=mask)
    if distributed.launched():
        if args.wait:
            raise SparsetrainError("--wait does not apply to a data-parallel run; leave it out")
        return distributed.run_rank(config, threads=args.threads, **common)
    if args.nproc != 1:
        if args.wait:
            raise SparsetrainError("--wait does not apply to a data-parallel run (--nproc); leave it out")
        return distributed.run_ddp(config, args.nproc, threads=args.threads, **common)
    return run(config, wait=args.wait, **common)


def _run(args):
    config = config_from_args(args)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    outcome = _trains(args, config)
    if outcome is not None:  # (None: a rank other than 0 under torchrun)
        _print_outcome(outcome)


# --- prune -------------------------------------------------------------------------------------

def _prune_flags(p):
    add_config_flags(p, training=False)
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")


def _prune(args):
    config = config_from_args(args)
    if config.prune.method == DENSE:
        raise SparsetrainError("--method dense keeps every connection: there is no mask to write")
    validate(config, training=False)
    _check_out(Path(args.out))  # before pruning, so that a wrong path costs nothing
    built = build(config, data_dir=args.data_dir, device=args.device)
    mask = find_mask(config, built)
    save_mask(args.out, mask, {"model": config.model, "dataset": config.dataset,
                               "config": json.dumps(config.to_dict())},
              model=built.model, method=config.prune.method, source=" ".join(["sparsetrain", *args.argv]))
    print(format_sparsity_table(mask))
    costs = layer_table(mask, built.model, built.loaders.input_shape)
    print("per example (flops: multiply-accumulates, dense and kept; effective: the sparsity counting kept "
          "connections without a path from input to output as pruned):")
    print(format_layer_rows([{"name": n, **v} for n, v in costs.items() if "left_out" not in v], counts=False))
    print(f"mask written to {args.out}")


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a file: an existing folder, or a path through a file."""
    if out.is_dir():
        raise SparsetrainError(f"--out {out} is a folder; name the mask file to write, e.g. {out / 'mask.safetensors'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SparsetrainError(f"--out {out}: {parent} is a file, not a folder; name a mask file in a "
                                       "folder (missing folders are created)")
            break


# --- train -------------------------------------------------------------------------------------

def _train_flags(p):
    add_config_flags(p)
    p.add_argument("--mask", required=True, help="mask file written by `sparsetrain prune`")
    p.add_argument("--force", action="store_true", help="train again even if this config and mask are recorded")
    p.add_argument("--wait", action="store_true",
                   help="if another process is training this run now, wait for it and print its result "
                   "(without --wait: refused, naming that process)")
    _nproc_flag(p)


def _train(args):
    config = config_from_args(args)
    resolve_device(args.device)  # a bad --device is refused before a run is recorded
    # checked here (values, checksum) and against the model (built for the data set) by run()
    mask = load_mask(args.mask)
    try:
        outcome = _trains(args, config, mask)
    except SparsetrainError as err:
        if "mask does not fit" in str(err) and str(args.mask) not in str(err):
            raise SparsetrainError(f"{args.mask}: {err}") from None
        raise
    if outcome is not None:
        _print_outcome(outcome)  # run() describes the trained network by the mask's method and sparsity


# --- list ----------------------------------------------------------------------------------

def _list_flags(p):
    p.add_argument("what", nargs="?", default="all", help="which section (default all)",
                   choices=["all", "models", "datasets", "methods", "inits", "recipes", "optimizers", "schedules"])
    p.add_argument("--pattern", default="*", help="glob pattern on names")


def _with_args(head: str, args: list[str] | str) -> list[str]:
    if isinstance(args, str):
        args = [args] if args else []
    return [head] + [f"      {a}" for a in args]


def _model_line(name: str) -> list[str]:
    with torch.device("meta"):  # shapes only: no memory and no initialisation, so listing stays quick
        count = sum(p.numel() for p in create_model(name).parameters())
    return _with_args(f"{name:<18} {count:>11,} parameters  input {default_input_shape(name)}",
                      f"model_args: {describe_model_args(name)}" if describe_model_args(name) else "")


def _method_line(name: str) -> list[str]:
    spec = method_spec(name)
    head = name + ("  (data-free)" if getattr(spec, "data_free", False) else "")
    return _with_args(head, [f"option {line}" for line in describe_options(getattr(spec, "options", None))])


def _init_line(name: str) -> list[str]:
    summary, *parameters = describe_init(name)
    return _with_args(f"{name:<27} {summary}", [f"parameter {line}" for line in parameters])


def _after_training_line(name: str) -> list[str]:
    spec = AFTER_TRAINING[name]
    return _with_args(f"{name}  ({spec.summary})", [f"option {line}" for line in describe_options(spec.options)])


def _dataset_line(name: str) -> list[str]:
    return _with_args(name, [f"data_arg {line}" for line in describe_options(getattr(dataset_spec(name), "args", None))])


def _list(args):
    sections = {
        "models": lambda: [line for n in list_models(args.pattern) for line in _model_line(n)],
        "datasets": lambda: [line for n in list_datasets(args.pattern) for line in _dataset_line(n)],
        "methods": lambda: [line for n in list_methods(args.pattern) for line in _method_line(n)]
        + [line for n in AFTER_TRAINING if _match(n, args.pattern) for line in _after_training_line(n)]
        + ([DENSE + "  (no pruning)"] if _match(DENSE, args.pattern) else []),
        "inits": lambda: [line for n in list_inits(args.pattern) for line in _init_line(n)],
        "recipes": lambda: [r for r in list_recipes() if _match(r, args.pattern)],
        "optimizers": lambda: OPTIMIZERS.list(args.pattern),
        "schedules": lambda: SCHEDULES.list(args.pattern),
    }
    for name, items in sections.items():
        if args.what in ("all", name):
            print(f"{name}:")
            for item in items():
                print(f"  {item}")


def _match(name, pattern):
    return fnmatch.fnmatch(name, pattern)


# --- reproduce -----------------------------------------------------------------------------------

def _reproduce_flags(p):
    p.add_argument("experiment", choices=experiments.EXPERIMENTS.list(), help="which table to reproduce")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row (default 0 1 2)")
    p.add_argument("--rows", nargs="+", help="only these rows: recipe names for snip-table1 and structured-cost, network names for snip-table2 (an unknown one is refused with the list)")
    p.add_argument("--workers", type=int, default=1, help="runs trained side by side (processes)")
    p.add_argument("--out", help="Markdown file for the table, JSON beside it (default <store>/results/<experiment>.md; "
                   "the committed tables: --out docs/results/<experiment>.md)")
    p.add_argument("--iterations", type=int, help="override the recipes' length (for a quick look)")
    p.add_argument("--force", action="store_true",
                   help="write a shortened table (fewer iterations, seeds or rows) even over a full one")
    p.add_argument("--report-only", action="store_true",
                   help="write the table from the runs already recorded; train nothing")
    add_env_flags(p)


def _reproduce(args):
    experiment = experiments.EXPERIMENTS.get(args.experiment)
    if args.workers < 1:
        raise SparsetrainError(f"--workers must be at least 1, got {args.workers}")
    store = Path(args.store or default_store_root())
    out = Path(args.out) if args.out else store / "results" / f"{args.experiment.replace('-', '_')}.md"
    if out.suffix != ".md" or out.is_dir():
        raise SparsetrainError(f"--out {out}: name the Markdown file to write, e.g. {out.with_suffix('.md').name} "
                               "(the JSON is written beside it)")
    options = experiments.ReproduceOptions(
        seeds=tuple(args.seeds), rows=tuple(args.rows) if args.rows else None, workers=args.workers,
        out=out, iterations=args.iterations, threads=args.threads, report_only=args.report_only,
        store=store, data_dir=args.data_dir, device=args.device, command=("sparsetrain", *args.argv),
        progress=not args.no_progress, force=args.force,
    )
    experiment(options)
    print(f"table written to {out} and {out.with_suffix('.json')}", file=sys.stderr)


# --- bench -------------------------------------------------------------------------------------

def _bench_flags(p):
    from ..sparse.bench import DEFAULT_BATCH_SIZES, DEFAULT_SWEEP

    p.add_argument("--model", required=True, help="registered model name (see `sparsetrain list models`)")
    p.add_argument("--sparsity", type=float, help="fraction of connections removed, in [0, 1), e.g. 0.98")
    p.add_argument("--method", default="snip", help="pruning method, scored on a random batch of real shape "
                   f"(one of: {', '.join(list_methods())})")
    p.add_argument("--structure", default="", help='mask structure passed to pruning: "2:4", "block32x32" or "" (none)')
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES), metavar="B",
                   help="batch sizes to measure (default %(default)s)")
    p.add_argument("--input-shape", type=int, nargs="+", default=[1, 28, 28], metavar="N",
                   help="one example's shape (default 1 28 28)")
    p.add_argument("--num-classes", type=int, default=10, help="model outputs (default 10)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice; use the idle cores)")
    p.add_argument("--repeats", type=int, default=20, help="most timed rounds per measurement")
    p.add_argument("--budget", type=float, default=1.0, metavar="SECONDS",
                   help="time spent per end-to-end measurement (fewer rounds for big batches)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the scoring batch and the inputs")
    p.add_argument("--sweep", type=float, nargs="*", metavar="S",
                   help=f"also measure end-to-end speed-up at these sparsities (no value: {' '.join(map(str, DEFAULT_SWEEP))})")
    p.add_argument("--plot", metavar="FILE.png", help="draw speed-up against sparsity (implies --sweep)")
    p.add_argument("--linear-x", action="store_true", help="plot against the sparsity, not log 1/(1 - sparsity)")
    p.add_argument("--out", metavar="FILE.md", help="also write the tables here, and JSON beside it (FILE.json)")


def _bench(args):
    import sys

    from ..sparse import bench as sb

    sweeping = args.sweep is not None or args.plot is not None
    if not sweeping and args.sparsity is None and not args.structure:
        raise SparsetrainError("give --sparsity S (e.g. --sparsity 0.98), --sweep [S ...] or --plot FILE.png")
    if args.threads:  # first, so that the recorded environment says how many threads measured
        import torch

        torch.set_num_threads(args.threads)
    env = sb.environment(["sparsetrain", *args.argv])  # before measuring: the load average at start
    common = dict(method=args.method, structure=args.structure, batch_sizes=args.batch_sizes,
                  input_shape=args.input_shape, num_classes=args.num_classes, repeats=args.repeats,
                  budget_s=args.budget, threads=args.threads, seed=args.seed,
                  progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    parts, data = [], {"environment": env}
    if args.sparsity is not None or not sweeping:  # (an N:M --structure implies the sparsity)
        result = sb.bench(args.model, args.sparsity, **common)
        parts.append(result.to_markdown())
        data["bench"] = result.to_dict()
        print(parts[-1])
    if sweeping:
        result = sb.sweep(args.model, args.sweep or sb.DEFAULT_SWEEP, **common)
        parts.append(result.to_markdown())
        data["sweep"] = result.to_dict()
        print(parts[-1])
        if args.plot:
            print(f"plot written to {sb.plot_sweep(result, args.plot, log_x=not args.linear_x)}", file=sys.stderr)
    if args.out:
        text = "# sparsetrain bench\n\n" + sb.format_environment(env) + "\n\n" + "\n".join(parts)
        md, js = sb.write_report(args.out, text, data)
        print(f"written to {md} and {js}", file=sys.stderr)


# --- signal ------------------------------------------------------------------------------------

def _signal_flags(p):
    add_config_flags(p, training=False)
    p.add_argument("--examples", type=int, default=1000,
                   help="test examples for the input-output Jacobian singular values (default 1000)")
    p.add_argument("--layer-examples", type=int, default=100,
                   help="test examples for the layerwise singular values (default 100)")
    p.add_argument("--isometry-method", default="lbfgs", choices=["lbfgs", "polar", "sgd"],
                   help="how the kept weights are made approximately an isometry (sgd: the original's plain SGD)")
    p.add_argument("--out", help="folder for signal.md, signal.json (with histograms) and signal.png")


def _signal(args):
    from ..measure import Provenance, write_report
    from ..signal.stages import plot_histograms, signal_stages

    config = config_from_args(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise SparsetrainError(f"--out {out} is a file; name a folder (it is created if missing)")
    provenance = Provenance.now(" ".join(["sparsetrain", *args.argv]))
    report = signal_stages(config, data_dir=args.data_dir, device=args.device, examples=args.examples,
                           layer_examples=args.layer_examples, isometry_method=args.isometry_method)
    text = report.markdown()
    print(text)
    if out is not None:
        png = plot_histograms(report, out / "signal.png")
        md, js = write_report(out / "signal.md", text + f"\n\n![histograms]({png.name})", report.to_dict(),
                              provenance=provenance)
        print(f"written to {md}, {js} and {png}", file=sys.stderr)


COMMANDS = {
    "run": ("prune at initialization, train and test; recorded in the run store", _run_flags, _run),
    "prune": ("prune at initialization and write the mask file", _prune_flags, _prune),
    "train": ("train with a mask file from `sparsetrain prune`", _train_flags, _train),
    "list": ("list models, data sets, methods, init schemes and recipes", _list_flags, _list),
    "runs": ("the recorded runs: a table, or show, export, delete, check them", runs_flags, runs),
    "study": ("steps-to-result studies: plan, work (N local workers), status, report", study_flags, study),
    "signal": ("signal propagation: Jacobian singular values before pruning, after pruning and after "
               "approximate isometry", _signal_flags, _signal),
    "reproduce": ("reproduce a paper's table with its recipes, several seeds", _reproduce_flags, _reproduce),
    "bench": ("dense against sparse execution: latency per layer and end to end, memory, speed-up vs sparsity",
              _bench_flags, _bench),
}
