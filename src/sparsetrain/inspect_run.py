"""Looking at recorded runs: find one by a key prefix, show it, plot and export its curves, load
its trained model, delete it.

The run store (:mod:`sparsetrain.store`) records each run's config, results, per-layer sparsity
and metric series, and keeps its checkpoint and mask in the run's artifact folder. This module
reads them back for people: ``sparsetrain runs show/export/delete`` and :func:`load_run` are thin
callers of the functions here.

    >>> sparkline([3, 2, 1, 0.5, 0.25, 0.25])
    '█▅▃▂▁▁'
    >>> flatten({"model": "lenet-300-100", "prune": {"method": "snip", "sparsity": 0.95}})
    {'model': 'lenet-300-100', 'prune.method': 'snip', 'prune.sparsity': 0.95}
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from .config import RunConfig
from .errors import SparsetrainError
from .fsio import atomic_write, write_error
from .mask_stats import format_count
from .masks import Mask, apply_mask_, load_mask
from .pipeline import DENSE, build, init_under_mask
from .run import CHECKPOINT_FILE, default_store_root
from .state_io import load_state
from .store import RESUMABLE_STATUSES, RunRecord, RunStatus, RunStore

__all__ = [
    "BLOCKS",
    "CHECKPOINT_FILE",
    "CURVES_FILE",
    "MASK_FILE",
    "LoadedRun",
    "being_trained",
    "delete_runs",
    "export_csv",
    "export_tensorboard",
    "find_run",
    "flatten",
    "format_run",
    "load_run",
    "plot_curves",
    "sparkline",
    "steps_done",
]

BLOCKS = "▁▂▃▄▅▆▇█"
MASK_FILE = "mask.safetensors"
CURVES_FILE = "curves.png"


# ----------------------------------------------------------------------------- finding runs


def find_run(store: RunStore, key: str) -> RunRecord:
    """The run whose key is ``key`` or starts with it (a unique prefix, as ``sparsetrain runs``
    shows the first 10 characters). Raises SparsetrainError for no match or several."""
    if not isinstance(key, str) or not key:
        raise SparsetrainError(f"a run key (or a unique prefix of one) must be a non-empty str, got {key!r}")
    exact = store.get(key) if _plain_key(key) else None
    if exact is not None:
        return exact
    matches = [r for r in store.list() if r.key.startswith(key)]
    if not matches:
        raise SparsetrainError(
            f"no run in the run store {store.root} has a key starting with {key!r}; "
            f"`sparsetrain runs --store {store.root}` lists the recorded runs"
        )
    if len(matches) > 1:
        shown = ", ".join(r.key for r in matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise SparsetrainError(
            f"{key!r} is the start of {len(matches)} run keys ({shown}); give more of the key"
        )
    return matches[0]


def _plain_key(key: str) -> bool:
    return all(c.isalnum() or c in "_.-" for c in key) and not key.startswith(".")


def steps_done(store: RunStore, record: RunRecord) -> int | None:
    """Iterations trained: the recorded result, else (a run still going or cut short) the last
    step of its metrics; None if it logged nothing yet."""
    steps = (record.results or {}).get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        return steps
    last = [points[-1][0] for points in store.metrics(record.key).values() if points]
    return max(last) if last else None


def being_trained(record: RunRecord) -> str | None:
    """Why some process is training ``record``'s run right now (its lease in the store is held
    and fresh), or None. A stale lease (its holder was killed) does not count."""
    lease = record.lease
    return None if lease is None or lease.stale else f"its lease is held by {lease.describe()}"


# ----------------------------------------------------------------------------- text


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """One line of unicode blocks (:data:`BLOCKS`) drawing ``values`` scaled between their min and
    max; longer series are averaged down to ``width`` characters; NaN and inf show as spaces."""
    values = [float(v) for v in values]
    if len(values) > width:
        cuts = [round(i * len(values) / width) for i in range(width + 1)]
        chunks = [values[a:b] for a, b in zip(cuts, cuts[1:])]
        values = [_mean([v for v in chunk if math.isfinite(v)]) for chunk in chunks]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    low, high = min(finite), max(finite)
    top = len(BLOCKS) - 1

    def block(v: float) -> str:
        if not math.isfinite(v):
            return " "
        if high == low:
            return BLOCKS[top // 2]
        return BLOCKS[round((v - low) / (high - low) * top)]

    return "".join(block(v) for v in values)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (``prune.method``); an empty dict stays as one
    entry ``{}`` so that a column still says the setting exists."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    if not tree and prefix:
        return {prefix: {}}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if value == "":
        return '""'
    return "-" if value is None else str(value)


def _when(stamp: str) -> str:
    return stamp[:19].replace("T", " ")


def format_run(record: RunRecord, metrics: dict[str, list[tuple[int, float]]],
               children: Sequence[RunRecord] = (), done: int | None = None) -> str:
    """Everything recorded about one run, as text for a terminal: what it is, its config, its
    per-layer sparsity, results, timings and a sparkline per metric."""
    lines = [f"run {record.key}  {record.status}" + (f"  ({record.name})" if record.name else "")]
    lines.append(f"  created {_when(record.created_at)} UTC, updated {_when(record.updated_at)} UTC")
    train = (record.config or {}).get("train", {}) if isinstance(record.config, dict) else {}
    planned = _planned(train)
    lines.append(f"  iterations {'-' if done is None else done} of {planned}")
    lines.append(f"  group {record.group or '-'}, parent {record.parent or '-'}, children "
                 + (", ".join(c.key for c in children) or "none"))
    if record.versions:
        lines.append("  versions " + ", ".join(f"{k} {v}" for k, v in sorted(record.versions.items())))
    if record.error:
        lines.append(f"  error: {record.error}")
    if being_trained(record):
        lines.append(f"  being trained now: {being_trained(record)}")

    lines += ["", "config"]
    flat = flatten(record.config)
    width = max((len(k) for k in flat), default=0)
    lines += [f"  {k:<{width}}  {_show(v)}" for k, v in flat.items()]

    lines += ["", *_layer_lines(record.layer_sparsity)]
    lines += ["", "results"]
    if record.results:
        width = max(len(k) for k in record.results)
        for k, v in sorted(record.results.items()):
            shown = f"{100 * v:.2f}%" if "error" in k and isinstance(v, float) and math.isfinite(v) else _show(v)
            lines.append(f"  {k:<{width}}  {shown}")
    else:
        lines.append("  none yet (the run has not ended)")
    if record.timings:
        lines += ["", "timings"]
        width = max(len(k) for k in record.timings)
        lines += [f"  {k:<{width}}  {_show(v)}" for k, v in sorted(record.timings.items())]

    lines += ["", *_curve_lines(metrics)]
    return "\n".join(lines)


def _planned(train: dict[str, Any]) -> str:
    iterations, epochs = train.get("iterations"), train.get("epochs")
    if iterations:
        return str(iterations)
    if epochs:
        return f"{epochs:g} epochs"
    return "-"


def _layer_lines(table: dict[str, Any] | None) -> list[str]:
    if not table:
        return ["layers: no per-layer sparsity recorded (the run has not ended)"]
    width = max(len("layer"), *(len(n) for n in table))
    lines = ["layers", f"  {'layer':<{width}}  {'shape':<14} {'kept':>10} {'total':>10} {'sparsity':>9} "
                       f"{'flops':>8} {'kept':>8} {'effective':>9}"]
    for name, row in table.items():
        if not isinstance(row, dict):  # the earliest records held the sparsity alone
            row = {"sparsity": row} if isinstance(row, (int, float)) else {}
        shape = "x".join(str(d) for d in row.get("shape", [])) or "-"
        note = f"  dense: {row['left_out']}" if row.get("left_out") else ""
        effective = row.get("effective_sparsity")  # absent from runs recorded before it was measured
        lines.append(f"  {name:<{width}}  {shape:<14} {row.get('kept', '-'):>10} {row.get('total', '-'):>10} "
                     f"{100 * row.get('sparsity', 0.0):>8.2f}% {format_count(row.get('flops')):>8} "
                     f"{format_count(row.get('flops_kept')):>8} "
                     f"{'-' if effective is None else f'{100 * effective:.2f}%':>9}{note}")
    return lines


def _curve_lines(metrics: dict[str, list[tuple[int, float]]]) -> list[str]:
    if not metrics:
        return ["curves: no metrics recorded"]
    width = max(len(n) for n in metrics)
    lines = ["curves"]
    for name, points in metrics.items():
        values = [v for _, v in points]
        finite = [v for v in values if math.isfinite(v)]
        span = f"min {min(finite):.4g}  max {max(finite):.4g}" if finite else "no finite value"
        lines.append(f"  {name:<{width}}  {sparkline(values, 30):<30}  {span}  last {values[-1]:.4g} "
                     f"(it {points[-1][0]}, {len(points)} points)")
    return lines


# ----------------------------------------------------------------------------- files


def plot_curves(metrics: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """A PNG with one panel per metric against the iteration, written atomically (site
    ``export``). Raises SparsetrainError when there is nothing to draw."""
    if not metrics:
        raise SparsetrainError("the run has no metrics recorded: there are no curves to plot")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SparsetrainError(f"the plot is written as PNG: name a .png file, not {path}")
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the CLI may run on a server
    import matplotlib.pyplot as plt

    names = list(metrics)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    try:
        for ax, name in zip(axes.flat, names):
            steps, values = zip(*metrics[name])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            ax.set_title(name)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), what="export")
    finally:
        plt.close(fig)
    return path


def export_csv(store: RunStore, records: Sequence[RunRecord], out: str | Path) -> list[Path]:
    """``out/metrics.csv`` (long format: key, name, step, value) and ``out/runs.csv`` (one row per
    run: its identity, status, config flattened to ``config.*`` columns, ``results.*`` and
    ``timings.*``), each written atomically (site ``export``). Returns the two paths."""
    out = Path(out)
    _check_out(out)
    metric_rows = [(r.key, name, step, repr(value))
                   for r in records for name, points in store.metrics(r.key).items() for step, value in points]
    run_rows = [_run_row(r) for r in records]
    columns = ["key", "name", "status", "seed", "created_at", "updated_at", "group", "parent", "error"]
    extra = sorted({c for row in run_rows for c in row} - set(columns),
                   key=lambda c: (("config.", "results.", "timings.").index(c[: c.index(".") + 1]), c))
    metrics_path, runs_path = out / "metrics.csv", out / "runs.csv"
    _write_csv(metrics_path, ["key", "name", "step", "value"], metric_rows)
    _write_csv(runs_path, columns + extra, [[_csv_cell(row.get(c)) for c in columns + extra] for row in run_rows])
    return [metrics_path, runs_path]


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SparsetrainError(f"--out {out} is a file; name a folder to write the export into")


def _run_row(record: RunRecord) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": record.key, "name": record.name, "status": record.status, "seed": record.seed,
        "created_at": record.created_at, "updated_at": record.updated_at,
        "group": str(record.group) if record.group else None, "parent": record.parent, "error": record.error,
    }
    for section in ("config", "results", "timings"):
        value = getattr(record, section)
        if value:
            row.update({f"{section}.{k}": v for k, v in flatten(value).items()})
    return row


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_csv(path: Path, header: list[str], rows: list[Sequence[Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write, what="export")


def export_tensorboard(store: RunStore, records: Sequence[RunRecord], out: str | Path) -> list[Path]:
    """One TensorBoard event file per run under ``out/<key>/`` (its metrics as scalars, its
    config and results as text). Needs the ``tensorboard`` package, which sparsetrain does not
    depend on; without it, a SparsetrainError says how to install it. Each file is written in a
    temporary folder and then copied into place atomically (site ``export``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise SparsetrainError(
            f"--format tensorboard needs the tensorboard package, which is not installed ({exc}); "
            "`pip install tensorboard`, or export --format csv"
        ) from exc
    out = Path(out)
    _check_out(out)
    written = []
    with tempfile.TemporaryDirectory(prefix="sparsetrain-tb-") as scratch:
        for record in records:
            folder = Path(scratch) / record.key
            try:
                _write_events(SummaryWriter, folder, store.metrics(record.key), record)
            except OSError as exc:  # the scratch folder's disk: nothing reached ``out`` yet
                raise write_error(exc, folder, "export") from exc
            for file in sorted(folder.iterdir()):
                target = out / record.key / file.name
                atomic_write(target, lambda tmp, src=file: shutil.copyfile(src, tmp), what="export")
                written.append(target)
    return written


def _write_events(writer_class, folder: Path, metrics: dict[str, list[tuple[int, float]]], record: RunRecord) -> None:
    writer = writer_class(log_dir=str(folder))
    try:
        for name, points in metrics.items():
            for step, value in points:
                writer.add_scalar(name, value, step)
        writer.add_text("config", "```\n" + json.dumps(record.config, indent=1) + "\n```")
        writer.add_text("results", "```\n" + json.dumps(record.results, indent=1) + "\n```")
    finally:
        writer.close()


# ----------------------------------------------------------------------------- delete


def delete_runs(store: RunStore, records: Sequence[RunRecord]) -> list[str]:
    """Delete each run (record, metrics, artifact folder) unless some process trains it right now
    (:func:`being_trained`): then nothing is deleted and a SparsetrainError names it. Returns the
    deleted keys."""
    busy = [(r.key, why) for r in records if (why := being_trained(r))]
    if busy:
        raise SparsetrainError(
            "not deleting: " + "; ".join(f"run {k} is being trained ({why})" for k, why in busy)
            + "; stop it first, or wait for it to end"
        )
    deleted = []
    for record in records:
        try:
            store.delete(record.key)
        except OSError as exc:  # its artifact folder could not be removed
            raise SparsetrainError(
                f"run {record.key}: its record is deleted but its artifact folder could not be removed "
                f"({exc}); remove {exc.filename or store.root / 'runs' / record.key} by hand"
            ) from exc
        deleted.append(record.key)
    return deleted


# ----------------------------------------------------------------------------- load

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))


@dataclass
class LoadedRun:
    """A recorded run's trained model (on ``device``, in eval mode, pruned entries zero), its
    mask (None for a dense run), its record and the iteration its weights are from."""

    model: nn.Module
    mask: Mask | None
    record: RunRecord
    step: int
    weights: str  # "final" or "best_val"


def load_run(key: str, store: RunStore | str | Path | None = None, device: str = "cpu", *,
             data_dir: str | Path | None = None, weights: str = "final", partial: bool = False) -> LoadedRun:
    """The model trained by run ``key`` (a unique key prefix is enough) in ``store`` (default:
    ``$SPARSETRAIN_HOME`` or ``./sparsetrain-runs``).

    The model is rebuilt from the recorded config the way the run built it (so its data set is
    loaded, from ``data_dir``, to know the input shape; nothing is downloaded), the run's mask
    applied, and the weights read from the checkpoint the run wrote when it ended:
    ``weights="final"`` the final model, ``"best_val"`` the best-validation one. A run trained
    with sparse execution comes back as the equal dense model with zeros.

    Raises SparsetrainError for an unknown or ambiguous key, or a run without final weights (not
    ended, or diverged) unless ``partial=True``, which loads the last checkpoint it kept.

        >>> import tempfile
        >>> from sparsetrain import RunConfig, run
        >>> folder = tempfile.mkdtemp()
        >>> config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(train={"iterations": 20})
        >>> outcome = run(config, store=folder, progress=False)
        >>> loaded = load_run(outcome.key, store=folder)
        >>> loaded.step, bool((loaded.model[1].weight[~loaded.mask["1.weight"]] == 0).all())
        (20, True)
    """
    if weights not in ("final", "best_val"):
        raise SparsetrainError(f"weights must be 'final' or 'best_val', got {weights!r}")
    if store is None or isinstance(store, (str, Path)):
        store = RunStore(default_store_root() if store is None else store)
    record = find_run(store, key)
    checkpoint = store.root / "runs" / record.key / CHECKPOINT_FILE
    ended = record.status in (RunStatus.FINISHED, RunStatus.STOPPED)
    if not ended and not partial:
        why = ("it diverged (infeasible): its weights are not finite" if record.status == RunStatus.INFEASIBLE
               else f"it has not ended (status {record.status})")
        resume = "; run it again to finish it" if record.status in RESUMABLE_STATUSES else ""
        raise SparsetrainError(
            f"run {record.key} has no final weights: {why}{resume}; load_run(..., partial=True) loads the "
            "last checkpoint it kept"
        )
    if not checkpoint.is_file():
        raise SparsetrainError(
            f"run {record.key} kept no checkpoint ({checkpoint} is missing): its weights are gone; "
            "delete the run and run it again to get them"
        )
    state = load_state(checkpoint, device=device)
    done = (record.results or {}).get("steps")
    if ended and done is not None and state.get("step") != done:
        raise SparsetrainError(
            f"run {record.key}: its checkpoint is from iteration {state.get('step')}, but the run ended at "
            f"iteration {done}; the final weights were not kept (delete the run and run it again)"
        )
    chosen = state["model"]
    step = int(state["step"])
    if weights == "best_val":
        if state.get("best_model") is None:
            raise SparsetrainError(f"run {record.key} recorded no validation checks: it has no best_val weights")
        chosen, step = state["best_model"], int(state["best_step"])

    # Only the schema's settings: a record may carry more (e.g. what a given mask file was).
    config = RunConfig.from_dict({k: v for k, v in record.config.items() if k in _CONFIG_FIELDS})
    built = build(config, data_dir=data_dir, device=device, download=False)
    mask_file = checkpoint.with_name(MASK_FILE)
    mask = load_mask(mask_file, built.model) if mask_file.is_file() else None
    if mask is None and config.prune.method != DENSE:
        raise SparsetrainError(f"run {record.key} was pruned ({config.prune.method}) but its mask file "
                               f"{mask_file} is missing; delete the run and run it again")
    # the structure the run trained (sparse layers too); its weights come from the checkpoint, so the
    # isometry step (seconds to minutes on a large network) would only be thrown away
    model, _ = init_under_mask(config.replace(prune={"isometry": False}), built, mask)
    model.load_state_dict(chosen)
    if config.train.execution == "sparse":
        from .sparse.training import densify_after_training_

        model = densify_after_training_(model)
    if mask is not None:
        apply_mask_(model, mask)
    model.eval()
    return LoadedRun(model=model, mask=mask, record=record, step=step, weights=weights)
