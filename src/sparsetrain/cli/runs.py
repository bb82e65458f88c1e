"""``sparsetrain runs``: list the recorded runs (the default), and ``show``, ``export``,
``delete`` or ``check`` them. Each action is one call into :mod:`sparsetrain.inspect_run` or the
run store."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import SparsetrainError
from ..inspect_run import (
    CURVES_FILE, delete_runs, export_csv, export_tensorboard, find_run, format_run, plot_curves, steps_done,
)
from ..run import default_store_root
from ..store import RUN_STATUSES, TERMINAL_STATUSES, RunStore, format_runs_table

# The listing: what `runs` showed before, with the iterations (done/planned) and the learning rate.
LIST_COLUMNS = (
    "key", "name", "model", "dataset", "method", "sparsity", "seed", "status", "iterations", "lr",
    "test_error_final", "test_error_best_val", "created_at", "updated_at",
)  # fmt: skip
EXPORT_FORMATS = ("csv", "tensorboard")
DEFAULT_EXPORT = "runs-export"


def _store(args) -> RunStore:
    return RunStore(args.store or default_store_root())


def _where(args) -> str:
    return str(args.store or default_store_root())


def _store_flag(p, shared: bool = False) -> None:
    # On an action's parser the default is SUPPRESS, so `runs --store X show KEY` keeps X.
    p.add_argument("--store", default=argparse.SUPPRESS if shared else None,
                   help="run store folder (default $SPARSETRAIN_HOME or ./sparsetrain-runs)")


def _filter_flags(p, shared: bool = False) -> None:
    default = argparse.SUPPRESS if shared else None
    p.add_argument("--name", default=default, help="only runs whose name (recipe) matches this glob")
    p.add_argument("--status", default=default, choices=list(RUN_STATUSES), help="only runs with this status")


def runs_flags(p) -> None:
    _filter_flags(p)
    _store_flag(p)
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    actions = p.add_subparsers(dest="action", metavar="[ACTION]", title="actions",
                               description="with no action: the table of the recorded runs (filtered by --name, "
                                           "--status)")
    for name, (help_text, add_flags, _) in ACTIONS.items():
        add_flags(actions.add_parser(name, help=help_text, description=help_text))


def runs(args) -> int | None:
    action = getattr(args, "action", None)
    return ACTIONS[action][2](args) if action else _list(args)


# --- the listing ---------------------------------------------------------------------------------

def _list(args) -> None:
    store = _store(args)
    records = store.list(name_pattern=args.name, status=args.status)
    damage = records.damage()  # rows on a damaged page: the others are listed, these named
    if damage:
        print(f"sparsetrain runs: warning: {damage}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=1, default=str))
    elif not records:
        filters = " ".join(f"--{k} {v}" for k, v in (("name", args.name), ("status", args.status)) if v)
        print(f"no runs in {_where(args)} match {filters}" if filters else f"no runs recorded in {_where(args)}")
    else:
        # a run not yet ended has no result: its last logged step says how far it got
        steps = {r.key: steps_done(store, r) for r in records if r.status not in TERMINAL_STATUSES}
        print(format_runs_table(records, columns=LIST_COLUMNS, steps=steps))


# --- show ----------------------------------------------------------------------------------------

def _show_flags(p) -> None:
    p.add_argument("key", metavar="KEY", help="the run's key, or a unique start of it (as the table shows)")
    p.add_argument("--plot", metavar="FILE.png",
                   help=f"write the curves here (default: {CURVES_FILE} in the run's artifact folder)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG, only print")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the record and its metrics as JSON instead")
    _store_flag(p, shared=True)


def _show(args) -> None:
    store = _store(args)
    record = find_run(store, args.key)
    metrics = store.metrics(record.key)
    if getattr(args, "json", False):
        print(json.dumps({**record.__dict__, "metrics": metrics}, indent=1, default=str))
        return
    print(format_run(record, metrics, store.children(record.key), steps_done(store, record)))
    if args.no_plot or not metrics:
        return
    title = f"{record.key} {record.name}".strip()
    if args.plot:  # asked for: a failure to write it is an error
        print(f"\ncurves written to {plot_curves(metrics, args.plot, title)}")
        return
    try:  # the default place: the show has been printed, so a failed plot only warns
        path = plot_curves(metrics, store.artifact_dir(record.key) / CURVES_FILE, title)
    except (SparsetrainError, OSError) as err:
        print(f"sparsetrain runs show: warning: the curves were not drawn: {err}; pass --plot FILE.png "
              "to write them elsewhere", file=sys.stderr)
    else:
        print(f"\ncurves written to {path}")


# --- export --------------------------------------------------------------------------------------

def _export_flags(p) -> None:
    p.add_argument("--out", default=DEFAULT_EXPORT, metavar="DIR",
                   help=f"folder to write into (default ./{DEFAULT_EXPORT})")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="csv",
                   help="csv: metrics.csv (key,name,step,value) and runs.csv (one row per run); "
                        "tensorboard: event files per run (needs `pip install tensorboard`)")
    _filter_flags(p, shared=True)
    _store_flag(p, shared=True)


def _export(args) -> None:
    store = _store(args)
    records = store.list(name_pattern=getattr(args, "name", None), status=getattr(args, "status", None))
    if not records:
        raise SparsetrainError(f"no runs in {_where(args)} to export (check --store, --name and --status)")
    write = export_csv if args.format == "csv" else export_tensorboard
    paths = write(store, records, args.out)
    print(f"{len(records)} run(s) exported to {args.out}: " + ", ".join(str(p) for p in paths[:4])
          + (f" and {len(paths) - 4} more" if len(paths) > 4 else ""))


# --- delete --------------------------------------------------------------------------------------

def _delete_flags(p) -> None:
    p.add_argument("keys", nargs="+", metavar="KEY", help="runs to delete: keys or unique starts of keys")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed when not on a terminal)")
    _store_flag(p, shared=True)


def _delete(args) -> int | None:
    store = _store(args)
    records = list({r.key: r for r in (find_run(store, k) for k in args.keys)}.values())
    listing = "\n".join(f"  {r.key}  {r.status:<11} {r.name or '-'}" for r in records)
    if not args.yes:
        if not sys.stdin.isatty():
            raise SparsetrainError(
                f"deleting {len(records)} run(s) and their artifacts needs confirmation, and the input is not "
                "a terminal: pass --yes"
            )
        print(f"delete these {len(records)} run(s), their metrics and artifact folders?\n{listing}")
        if input("type yes to delete: ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    for key in delete_runs(store, records):
        print(f"deleted run {key}")
    return None


# --- check ---------------------------------------------------------------------------------------

def _check_flags(p) -> None:
    p.add_argument("--repair", action="store_true",
                   help="copy every readable run into a fresh store file, keeping the damaged one beside it")
    _store_flag(p, shared=True)


def _check(args) -> int:
    result = _store(args).check(repair=args.repair)
    print(result.report())
    return 0 if result.ok else 1


ACTIONS = {
    "show": ("one run: config, per-layer sparsity, results, timings, curves (and a PNG of them)",
             _show_flags, _show),
    "export": ("write the runs' metrics and settings as CSV (or TensorBoard event files)", _export_flags, _export),
    "delete": ("delete runs: records, metrics and artifact folders", _delete_flags, _delete),
    "check": ("check the run store file for damage; --repair salvages the readable runs", _check_flags, _check),
}
