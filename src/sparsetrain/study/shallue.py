"""Shallue et al.'s published layout of steps-to-result measurements, read and written, so that the
same analysis (:mod:`sparsetrain.study.analysis`) runs on their data and on ours.

The layout (google-research ``batch_science/README.md`` and ``data_loader.py``)::

    <workload dir = dataset/model/optimizer>/<batch size>/study.json
    <workload dir>/<batch size>/<trial id>/metadata.json
    <workload dir>/<batch size>/<trial id>/measurements.csv

- ``study.json``: ``batch_size``, ``dataset``, ``model``, ``optimizer``, ``parameter_configs``
  (per metaparameter ``min_value``, ``max_value``, ``scale`` LOG_SCALE / REVERSE_LOG_SCALE / "",
  ``type`` DOUBLE / INTEGER), ``train_steps`` and ``early_stopping``. We add effect-dps-public's
  ``sparsity`` and ``goal_error`` (its ``batch_science.py`` writes both) and ``workload`` (our
  workload's name); their loader ignores fields it does not know.
- ``metadata.json``: ``trial_id`` (an integer, also the directory's name: we use the plan index),
  ``parameters``, ``status`` (COMPLETE, INCOMPLETE or INFEASIBLE) and ``steps`` (steps trained).
- ``measurements.csv``: a ``step`` column and one column per metric; the validation error is
  ``val/classification_error``. Their loader reads it with ``pandas.read_csv(index_col="step")``,
  lists trial and batch-size directories and sorts them as integers, so those folders hold nothing
  else.

Their statuses say how training ended, not whether it reached a goal: COMPLETE trained its whole
budget, INFEASIBLE diverged, INCOMPLETE stopped for another reason (their loader skips these by
default). Steps-to-result is then read off the curve: the first measurement at or below the goal
(ours and effect-dps-public's rule; their ``compute_steps_to_result`` takes strictly below). So:

==================  ===================  ==========================================================
ours                written as           read back as
==================  ===================  ==========================================================
complete (K)        COMPLETE             complete at the curve's first step with error <= goal
incomplete          COMPLETE             incomplete (the curve never reaches the goal)
infeasible          INFEASIBLE           infeasible
stopped             INCOMPLETE           stopped (not counted, as their loader's default)
==================  ===================  ==========================================================

A complete trial whose curve does not first reach the goal at its ``steps_to_result`` is refused
when writing, since it could not be read back the same. Their studies are dense (sparsity 0)
and name no goal: pass ``goal_error`` (their paper's goal for the workload) when reading them.
Several sparsities of one workload would collide in one workload directory, so we write each under
``sparsity-<s>/`` (as their ``mnist_subsets/`` groups workloads); :func:`read_layout` finds every
``study.json`` below the folder it is given, so it reads both.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

from sparsetrain.errors import SparsetrainError
from sparsetrain.fsio import atomic_write
from sparsetrain.study.outcome import TrialOutcome, TrialStatus

__all__ = ["ERROR_COLUMN", "read_layout", "write_layout"]

ERROR_COLUMN = "val/classification_error"

_WRITTEN_AS = {
    TrialStatus.COMPLETE.value: "COMPLETE",
    TrialStatus.INCOMPLETE.value: "COMPLETE",
    TrialStatus.INFEASIBLE.value: "INFEASIBLE",
    TrialStatus.STOPPED.value: "INCOMPLETE",
}
_SCALES = {"log": ("LOG_SCALE", "DOUBLE"), "reverse-log": ("REVERSE_LOG_SCALE", "DOUBLE"), "integer": ("", "INTEGER")}


def _first_at_goal(curve, goal: float) -> int | None:
    return next((int(step) for step, err in sorted(curve) if err <= goal), None)


def _names(workload: str, names: Mapping[str, tuple[str, str, str]] | None) -> tuple[str, str, str]:
    if names and workload in names:
        return tuple(names[workload])
    parts = workload.split("/")
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    from sparsetrain.study.workloads import load_workload

    try:
        config = load_workload(workload).config
    except SparsetrainError as err:
        raise SparsetrainError(
            f"cannot tell the dataset/model/optimizer folders of workload {workload!r}: it is neither "
            f"'dataset/model/optimizer' nor a workload recipe ({err}); pass names={{{workload!r}: "
            "('dataset', 'model', 'optimizer')}"
        ) from None
    return config.dataset, config.model, config.train.optimizer


def _parameter_configs(params: Iterable[str]) -> dict:
    from sparsetrain.study.workloads import SEARCH_SPACE

    out = {}
    for name in sorted(params):
        dim = SEARCH_SPACE.get(name)
        if dim is not None:
            scale, kind = _SCALES.get(dim.scale, ("", "DOUBLE"))
            low, high = (int(dim.low), int(dim.high)) if kind == "INTEGER" else (dim.low, dim.high)
            out[name] = {"max_value": high, "min_value": low, "scale": scale, "type": kind}
    return out


def write_layout(outcomes: Iterable[TrialOutcome], root: str | Path, *, goal_error: float, train_steps: int,
                 names: Mapping[str, tuple[str, str, str]] | None = None) -> list[Path]:
    """Write ``outcomes`` under ``root`` as ``sparsity-<s>/<dataset>/<model>/<optimizer>/<B>/...``
    (see the module docstring); return the ``study.json`` paths. ``goal_error`` and ``train_steps``
    (the step budget) go into each ``study.json``. A workload's three folder names come from
    ``names``, else from a name of the form ``dataset/model/optimizer``, else from its recipe."""
    if not 0 < goal_error < 1:
        raise SparsetrainError(f"goal_error must lie in (0, 1), got {goal_error!r}")
    root = Path(root)
    studies: dict[tuple[str, float, int], list[TrialOutcome]] = {}
    for o in outcomes:
        if o.reached_goal and _first_at_goal(o.curve, goal_error) != o.steps_to_result:
            raise SparsetrainError(
                f"trial {o.plan_index} of {o.workload} at B={o.batch_size}, sparsity {o.sparsity:g} is complete at "
                f"step {o.steps_to_result}, but its validation curve first reaches the goal {goal_error:g} at "
                f"{_first_at_goal(o.curve, goal_error)}: the layout keeps only the curve, so it would read back "
                "differently; check goal_error (it must be the study's)"
            )
        studies.setdefault((o.workload, float(o.sparsity), int(o.batch_size)), []).append(o)
    written = []
    for (workload, sparsity, batch_size), trials in sorted(studies.items()):
        dataset, model, optimizer = _names(workload, names)
        folder = root / f"sparsity-{sparsity:g}" / dataset / model / optimizer / str(batch_size)
        ids = [o.plan_index for o in trials]
        if len(set(ids)) != len(ids):
            raise SparsetrainError(
                f"{workload} at B={batch_size}, sparsity {sparsity:g} has two trials with one plan index; "
                "each trial's folder is named by its plan index"
            )
        study = {
            "batch_size": batch_size, "dataset": dataset, "model": model, "optimizer": optimizer,
            "early_stopping": any(o.status == TrialStatus.STOPPED for o in trials),
            "parameter_configs": _parameter_configs({k for o in trials for k in o.params}),
            "train_steps": int(train_steps), "goal_error": goal_error, "sparsity": sparsity, "workload": workload,
        }
        for o in sorted(trials, key=lambda o: o.plan_index):
            trial_dir = folder / str(o.plan_index)
            trial_dir.mkdir(parents=True, exist_ok=True)
            steps = o.steps_to_result if o.reached_goal else max((s for s, _ in o.curve), default=0)
            metadata = {"parameters": o.params, "status": _WRITTEN_AS[o.status], "steps": int(steps),
                        "trial_id": o.plan_index}
            _write_json(trial_dir / "metadata.json", metadata)
            _write_text(trial_dir / "measurements.csv", _curve_csv(o.curve))
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "study.json", study)
        written.append(folder / "study.json")
    return written


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text), what="export")


def _curve_csv(curve) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", ERROR_COLUMN])
    for step, err in sorted(curve):
        writer.writerow([int(step), repr(float(err))])
    return buffer.getvalue()


def read_layout(root: str | Path, *, goal_error: float | None = None, metric: str = ERROR_COLUMN,
                sparsity: float | None = None) -> list[TrialOutcome]:
    """Every trial of every ``study.json`` below ``root`` (a workload folder, a data set's folder or
    the whole archive) as :class:`TrialOutcome`\\ s, status and steps-to-result as in the module
    docstring. ``goal_error``: the goal (default: each study.json's ``goal_error``, which their
    studies lack); ``metric``: the column whose first value at or below the goal counts;
    ``sparsity``: for studies that do not name one (default 0, dense: Shallue et al.'s).
    The workload is the study's ``workload`` field, else ``dataset/model/optimizer``."""
    root = Path(root)
    found = sorted(root.rglob("study.json")) if root.is_dir() else []
    if not found:
        raise SparsetrainError(
            f"no study.json below {root}: give the folder of a study in Shallue et al.'s layout "
            "(dataset/model/optimizer/<batch size>/study.json with one folder per trial)"
        )
    out = []
    for study_file in found:
        study = _read_json(study_file)
        goal = goal_error if goal_error is not None else study.get("goal_error")
        if goal is None:
            raise SparsetrainError(
                f"{study_file} names no goal error (Shallue et al.'s studies do not): pass goal_error, the "
                "validation error a trial must reach, e.g. read_layout(path, goal_error=0.3)"
            )
        try:
            workload = study.get("workload") or f"{study['dataset']}/{study['model']}/{study['optimizer']}"
            batch_size = int(study["batch_size"])
        except KeyError as err:
            raise SparsetrainError(f"{study_file} has no {err.args[0]!r} field; is it a study.json of this layout?") from None
        point_sparsity = float(study.get("sparsity", 0.0 if sparsity is None else sparsity))
        for trial_dir in sorted((d for d in study_file.parent.iterdir() if d.is_dir()), key=lambda d: _trial_id(d)):
            metadata = _read_json(trial_dir / "metadata.json")
            curve = _read_curve(trial_dir / "measurements.csv", metric)
            status = metadata.get("status")
            reached = _first_at_goal(curve, goal)
            if status == "INFEASIBLE":
                ours, k = TrialStatus.INFEASIBLE, None
            elif status == "INCOMPLETE":
                ours, k = TrialStatus.STOPPED, None
            elif status == "COMPLETE":
                ours, k = (TrialStatus.COMPLETE, reached) if reached is not None else (TrialStatus.INCOMPLETE, None)
            else:
                raise SparsetrainError(
                    f"{trial_dir / 'metadata.json'}: status {status!r} is not COMPLETE, INCOMPLETE or INFEASIBLE"
                )
            out.append(TrialOutcome(workload, batch_size, point_sparsity, int(metadata.get("trial_id", _trial_id(trial_dir))),
                                    dict(metadata.get("parameters", {})), ours.value, k, curve))
    return out


def _trial_id(folder: Path) -> int:
    try:
        return int(folder.name)
    except ValueError:
        raise SparsetrainError(
            f"{folder} is not a trial folder: in this layout every folder beside study.json is named by its "
            "integer trial id; move other folders out"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SparsetrainError(f"{path} is missing: every study and trial folder of this layout has one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SparsetrainError(f"{path} is not valid JSON ({err}); restore it from the archive") from None


def _read_curve(path: Path, metric: str) -> list[tuple[int, float]]:
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    except FileNotFoundError:
        raise SparsetrainError(f"{path} is missing: every trial folder of this layout has measurements.csv") from None
    if rows and ("step" not in rows[0] or metric not in rows[0]):
        raise SparsetrainError(
            f"{path} has columns {list(rows[0])}, not 'step' and {metric!r}; pass metric= one of its columns"
        )
    curve = []
    for row in rows:
        value = row[metric]
        curve.append((int(float(row["step"])), math.nan if value in ("", None) else float(value)))
    return curve
