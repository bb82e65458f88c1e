"""``sparsetrain study``: plan a steps-to-result study, work on it with local worker processes
(on any number of hosts, through one database: ``--storage``), show its progress, measure its
Lipschitz curves, report it. Each action parses its flags and makes one call into the library
(:mod:`sparsetrain.study.engine`, :mod:`~sparsetrain.study.lipschitz`, :mod:`~sparsetrain.study.analysis`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SparsetrainError


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """An aligned markdown pipe table of ``rows`` (dicts) in ``columns``."""
    cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max([len(c), 3, *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def _dir_flag(p) -> None:
    p.add_argument("--dir", required=True,
                   help="the study's folder (study.json, optuna.db, runs/); with --storage, this host's own folder "
                        "for its runs and masks, on a local disk (not NFS: it holds SQLite files)")
    p.add_argument("--storage", metavar="URL",
                   help="a database shared by many hosts, e.g. postgresql://USER@HOST:5432/DATABASE "
                        "(default: the embedded SQLite file in --dir)")
    p.add_argument("--study", metavar="NAME",
                   help="the study's name in the --storage database (default: the --dir folder's name)")


def _where(args) -> dict:
    return {"storage": args.storage, "study": args.study}


def _numbers(text: str, kind, what: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise SparsetrainError(f"--{what} takes numbers separated by commas (e.g. 2,8,32,128); got {text!r}") from None
    if not values:
        raise SparsetrainError(f"--{what} is empty; give one or more values separated by commas")
    return values


def _plan_flags(p) -> None:
    _dir_flag(p)
    p.add_argument("--workload", action="append", required=True,
                   help="a dps-* recipe name or a run-config TOML file with train.goal_error (repeat for several)")
    p.add_argument("--batch-sizes", required=True, help="comma-separated batch sizes, e.g. 2,8,32,128,512")
    p.add_argument("--sparsities", required=True, help="comma-separated sparsities in [0, 1), 0 = dense, e.g. 0,0.7,0.9")
    p.add_argument("--trials", type=int, default=100, help="plan points per (batch size, sparsity) (default 100)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="run every trial to the goal or its budget (default: stop once past the point's best K*)")
    p.add_argument("--heartbeat-interval", type=int, default=60, help="seconds between a running trial's heartbeats")
    p.add_argument("--grace-period", type=int, default=180,
                   help="seconds without a heartbeat before a trial's worker counts as dead and the trial is retried")


def _plan(args) -> int:
    from ..study.engine import StudySpec, masked, plan, study_name
    from ..study.workloads import load_workload

    spec = StudySpec(tuple(load_workload(w) for w in args.workload), _numbers(args.batch_sizes, int, "batch-sizes"),
                     _numbers(args.sparsities, float, "sparsities"), args.trials, not args.no_early_stop,
                     args.heartbeat_interval, args.grace_period)
    plan(args.dir, spec, **_where(args))
    if args.storage is None:
        print(f"planned {len(spec.points())} points x {spec.trials} trials in {args.dir}; "
              f"run them with: sparsetrain study work --dir {args.dir} --workers N")
        return 0
    name = study_name(args.dir, args.study)
    print(f"planned {len(spec.points())} points x {spec.trials} trials as study {name!r} in {masked(args.storage)}; "
          f"on each host run: sparsetrain study work --storage URL --study {name} --dir LOCAL_FOLDER --workers N")
    return 0


def _work_flags(p) -> None:
    _dir_flag(p)
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--data-dir", help="data root holding <dataset>/ folders (default $SPARSETRAIN_DATA)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--pack", default=None, metavar="{auto,1,K}",
                   help="trials of one point trained together on the device: 1 = one at a time, K = up to K, auto = "
                        "measured at the start of each point and packed only where it pays (default: auto on a GPU, "
                        "1 on a CPU, where packing measured 0.45-0.71x)")


def _work(args) -> int:
    from ..study.engine import work
    from ..study.packed import parse_pack

    pack = None if args.pack is None else parse_pack(args.pack)  # None: default_pack for the device
    result = work(args.dir, args.workers, data_dir=args.data_dir, device=args.device, pack=pack,
                  **_where(args))
    print(f"{result['finished']} of {result['total']} trials finished")
    dead = [c for c in result["exit_codes"] if c != 0]
    if dead:
        print(f"{len(dead)} worker(s) ended abnormally (exit codes {result['exit_codes']}); their trials were taken over")
    return 0


def _status_flags(p) -> None:
    _dir_flag(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


STATUS_COLUMNS = ("point", "planned", "finished", "complete", "incomplete", "infeasible", "stopped", "running",
                  "waiting", "failed_attempts", "k_star", "packing")


def _status(args) -> int:
    from ..study.engine import status_rows

    rows = status_rows(args.dir, **_where(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table([{k: ("-" if r[k] is None else r[k]) for k in STATUS_COLUMNS} for r in rows], STATUS_COLUMNS))
    done, total = sum(r["finished"] for r in rows), sum(r["planned"] for r in rows)
    print(f"{done} of {total} trials finished ({done / total:.0%})")
    return 0


def _report_flags(p) -> None:
    _dir_flag(p)
    p.add_argument("--out", help="folder for the report (default: <dir>/report)")


def _report(args) -> int:
    from ..study import analysis
    from ..study.engine import outcomes
    from ..study.lipschitz import load_curves

    out = Path(args.out or Path(args.dir) / "report")
    analysis.report(outcomes(args.dir, **_where(args)), out, lipschitz=load_curves(args.dir))
    print(f"report written to {out}")
    return 0


def _lipschitz_flags(p) -> None:
    from ..study.lipschitz import DEFAULT_EXAMPLES, MEASUREMENTS, PREFERRED_BATCH_SIZE

    _dir_flag(p)
    p.add_argument("--batch-size", type=int, metavar="B",
                   help=f"retrain the best trials of this batch size (default: the study's nearest "
                        f"{PREFERRED_BATCH_SIZE} where every sparsity has a K*)")
    p.add_argument("--every", type=int, metavar="N",
                   help=f"measure L between steps every - 1 and every (default: a multiple of the check interval "
                        f"giving at most {MEASUREMENTS} values; effect-dps-public: 1000)")
    p.add_argument("--steps", type=int, metavar="S", help="steps to retrain each best trial (default: its K*)")
    p.add_argument("--chunk", type=int, default=1000, metavar="C",
                   help="examples per chunk of a full-batch gradient (default 1000)")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, metavar="E",
                   help=f"the full-batch gradient over the first E training examples (default {DEFAULT_EXAMPLES}; "
                        "0 = all of them, as effect-dps-public; a measurement costs 10 full-batch gradients)")
    p.add_argument("--data-dir", help="data root holding <dataset>/ folders (default $SPARSETRAIN_DATA)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")


def _lipschitz(args) -> int:
    from ..study.lipschitz import LIPSCHITZ_FILE, measure_study

    curves = measure_study(args.dir, batch_size=args.batch_size, every=args.every, steps=args.steps,
                           chunk=args.chunk, examples=args.examples or None, data_dir=args.data_dir,
                           device=args.device, progress=True, **_where(args))
    print(f"{len(curves)} curve(s) in {Path(args.dir) / LIPSCHITZ_FILE}; sparsetrain study report draws them")
    return 0


ACTIONS = {
    "plan": ("plan a study: the Sobol points of every (workload, batch size, sparsity), enqueued once",
             _plan_flags, _plan),
    "work": ("run the study's trials with N local worker processes (a killed worker's trial is retried)",
             _work_flags, _work),
    "status": ("progress per point: trials finished by status, running, waiting, K* so far", _status_flags, _status),
    "report": ("the analysis: K* per point, the best metaparameters, plots and fits, the Lipschitz curves",
               _report_flags, _report),
    "lipschitz": ("Lipschitz smoothness along training: each sparsity's best trial retrained with L measured "
                  "every N steps (lipschitz.json, drawn by report)", _lipschitz_flags, _lipschitz),
}


def study_flags(p) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions", required=True)
    for name, (help_text, add_flags, _) in ACTIONS.items():
        add_flags(actions.add_parser(name, help=help_text, description=help_text))


def study(args) -> int | None:
    return ACTIONS[args.action][2](args)
