"""The subcommands: flags, then one call into the library."""

from __future__ import annotations

import argparse
import json

from .. import experiments
from ..data import create_loaders, list_datasets
from ..errors import SparsetrainError
from ..init import list_inits
from ..masks import format_sparsity_table, load_mask, save_mask
from ..models import create_model, list_models
from ..pruning import list_methods
from ..init import initialize_
from ..run import DENSE, default_store_root, find_mask, run, validate
from ..store import RunStore, format_runs_table
from ..train.optim import OPTIMIZERS, SCHEDULES
from .common import add_config_flags, add_env_flags, config_from_args, list_recipes


def _store(args) -> RunStore:
    return RunStore(args.store or default_store_root())


def _print_outcome(outcome) -> None:
    r = outcome.results
    state = "already recorded (use --force to run again)" if outcome.reused else "finished"
    print(f"run {outcome.key} {state}: {outcome.config.model} on {outcome.config.dataset}, "
          f"{outcome.config.prune.method} at {r.get('sparsity', 0):.2%} sparsity")
    rows = [{"name": n, **v} for n, v in outcome.layer_sparsity.items()]
    if rows:
        width = max(len(x["name"]) for x in rows)
        print(f"{'layer':<{width}}  {'kept':>9} {'total':>9} {'sparsity':>9}")
        for x in rows:
            print(f"{x['name']:<{width}}  {x['kept']:>9} {x['total']:>9} {x['sparsity']:>9.2%}")
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


def _run(args):
    config = config_from_args(args)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    outcome = run(config, store=_store(args), data_dir=args.data_dir, device=args.device,
                  force=args.force, progress=not args.no_progress)
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
    loaders = create_loaders(config.dataset, batch_size=config.train.batch_size, data_dir=args.data_dir,
                             val_fraction=config.train.val_fraction, split_seed=config.train.split_seed,
                             shuffle_seed=config.seed)
    model = create_model(config.model, input_shape=loaders.input_shape, num_classes=loaders.num_classes)
    initialize_(model, config.init, config.seed)
    mask = find_mask(config, model, loaders)
    save_mask(args.out, mask, {"model": config.model, "dataset": config.dataset,
                               "config": json.dumps(config.to_dict())})
    print(format_sparsity_table(mask))
    print(f"mask written to {args.out}")


# --- train -------------------------------------------------------------------------------------

def _train_flags(p):
    add_config_flags(p)
    p.add_argument("--mask", required=True, help="mask file written by `sparsetrain prune`")
    p.add_argument("--force", action="store_true")


def _train(args):
    config = config_from_args(args)
    mask = load_mask(args.mask)  # checked against the model (built for the data set) by run()
    try:
        outcome = run(config, store=_store(args), data_dir=args.data_dir, device=args.device,
                      force=args.force, progress=not args.no_progress, mask=mask)
    except SparsetrainError as err:
        if "mask does not fit" in str(err):
            raise SparsetrainError(f"{args.mask}: {err}") from None
        raise
    _print_outcome(outcome)


# --- list, runs ----------------------------------------------------------------------------------

def _list_flags(p):
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "models", "datasets", "methods", "inits", "recipes", "optimizers", "schedules"])
    p.add_argument("--pattern", default="*", help="glob pattern on names")


def _list(args):
    def param_count(name):
        return sum(p.numel() for p in create_model(name).parameters())

    sections = {
        "models": lambda: [f"{n:<18} {param_count(n):>9,} parameters" for n in list_models(args.pattern)],
        "datasets": lambda: list_datasets(args.pattern),
        "methods": lambda: list_methods(args.pattern) + ([DENSE + "  (no pruning)"] if _match(DENSE, args.pattern) else []),
        "inits": lambda: list_inits(args.pattern),
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
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


def _runs_flags(p):
    p.add_argument("--name", help="glob on the run (recipe) name")
    p.add_argument("--status", choices=["running", "finished", "failed"])
    p.add_argument("--store", help="run store folder (default $SPARSETRAIN_HOME or ./sparsetrain-runs)")
    p.add_argument("--json", action="store_true", help="print the records as JSON")


def _runs(args):
    records = _store(args).list(name_pattern=args.name, status=args.status)
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=1, default=str))
    elif not records:
        print(f"no runs recorded in {args.store or default_store_root()}")
    else:
        print(format_runs_table(records))


# --- reproduce -----------------------------------------------------------------------------------

def _reproduce_flags(p):
    p.add_argument("experiment", choices=sorted(experiments.EXPERIMENTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", help="only these rows (recipe names)")
    p.add_argument("--workers", type=int, default=1, help="runs trained side by side (processes)")
    p.add_argument("--out", help="Markdown file for the table (default docs/results/<experiment>.md)")
    p.add_argument("--iterations", type=int, help="override the recipes' length (for a quick look)")
    add_env_flags(p)


def _reproduce(args):
    experiments.EXPERIMENTS[args.experiment](args)


COMMANDS = {
    "run": ("prune at initialization, train and test; recorded in the run store", _run_flags, _run),
    "prune": ("prune at initialization and write the mask file", _prune_flags, _prune),
    "train": ("train with a mask file from `sparsetrain prune`", _train_flags, _train),
    "list": ("list models, data sets, methods, init schemes and recipes", _list_flags, _list),
    "runs": ("table of the recorded runs", _runs_flags, _runs),
    "reproduce": ("reproduce a paper's table with its recipes, several seeds", _reproduce_flags, _reproduce),
}
