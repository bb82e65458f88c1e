"""The study engine on one machine: the plan held in Optuna, trials run by worker processes.

A study lives in one folder:

- ``study.json``: what was planned (:class:`StudySpec`: workloads, batch sizes, sparsities, trials
  per point, early stopping, heartbeat settings);
- ``optuna.db``: Optuna's RDB storage on a SQLite file, one Optuna study per (workload, batch size,
  sparsity) named by :func:`point_name`, each holding the fixed plan as enqueued trials;
- ``runs/``: the run store; each trial is a run grouped under ``("study", <folder name>)``, its
  whole validation curve in the run's metrics;
- ``masks/``: the masks trials share (:func:`shared_mask`): pruning at initialization depends on
  the seed and the sparsity, not on the batch size or the metaparameters, so each is found once.

Plan once, work many times. :func:`plan` enqueues every plan point once (a trial carries its
``plan_index`` as a user attribute); the workers never sample, they claim waiting trials
(Optuna's own atomic WAITING -> RUNNING), lowest plan index first. While a worker runs a trial it
beats the trial's heartbeat; a worker killed outright (SIGKILL) stops beating, and after
``grace_period`` seconds any other worker fails that trial and Optuna's
``RetryHeartbeatStaleTrialCallback`` enqueues a copy, which is claimed like any other waiting
trial. The copy's run resumes from the run store's checkpoint (or, if the killed worker had
recorded the run's end, reuses it), so a trial is trained to its end once and counted once: a
plan index has exactly one finished trial (Optuna state COMPLETE or PRUNED) and any number of
FAIL ones (the killed attempts).

How a trial ends (:class:`~sparsetrain.study.outcome.TrialStatus`) is told to Optuna as: complete
-> COMPLETE with value = steps-to-result; incomplete and infeasible -> COMPLETE with value inf (it
never reached the goal); stopped early -> PRUNED. The status itself is the user attribute
``status``. Validation errors are reported per check (``trial.report``) so optuna-dashboard
shows the curves.

Early stopping: after a check at step s with error above the goal, a trial stops if s is at least
the best steps-to-result already recorded for its point. It could then only reach the goal later
than that, so K* (the fewest steps over complete trials) is unchanged; and since a trial that would
tie with the best is never stopped before its tying check, the best trial (fewest steps, ties to the
lowest plan index) is the same with and without early stopping, in whatever order trials finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from sparsetrain import fsio
from sparsetrain.errors import SparsetrainError
from sparsetrain.store import RunStatus, RunStore
from sparsetrain.study.outcome import TrialOutcome, TrialStatus
from sparsetrain.study.plan import plan_points
from sparsetrain.study.workloads import SEARCH_SPACE, Workload
from sparsetrain.train.loop import Callback

SPEC_FILE, OPTUNA_FILE, RUNS_DIR, MASKS_DIR = "study.json", "optuna.db", "runs", "masks"
POLL_S = 1.0  # how often an idle worker looks again for trials to take over


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """What a study measures: every workload at every batch size and sparsity, ``trials`` plan
    points each. ``early_stop``: stop a trial once past its point's best K*. ``heartbeat_interval``
    and ``grace_period`` (seconds): how often a running trial beats, and how long without a beat
    before another worker takes it over."""

    workloads: tuple[Workload, ...]
    batch_sizes: tuple[int, ...]
    sparsities: tuple[float, ...]
    trials: int = 100
    early_stop: bool = True
    heartbeat_interval: int = 60
    grace_period: int = 180

    def __post_init__(self) -> None:
        if not self.workloads:
            raise SparsetrainError("a study needs at least one workload (e.g. dps-mnist-simple-cnn-sgd)")
        names = [w.name for w in self.workloads]
        if len(set(names)) != len(names):
            raise SparsetrainError(f"workloads {names} name one workload twice")
        bad_b = [b for b in self.batch_sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
        if not self.batch_sizes or bad_b:
            raise SparsetrainError(f"batch sizes must be positive whole numbers; got {list(self.batch_sizes)}")
        bad_s = [s for s in self.sparsities if not (isinstance(s, (int, float)) and 0 <= s < 1)]
        if not self.sparsities or bad_s:
            raise SparsetrainError(f"sparsities must lie in [0, 1) (0: dense); got {list(self.sparsities)}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes) or len(set(self.sparsities)) != len(self.sparsities):
            raise SparsetrainError(f"batch sizes {list(self.batch_sizes)} and sparsities {list(self.sparsities)} "
                                   "must not repeat a value")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise SparsetrainError(f"trials per point must be a positive whole number; got {self.trials!r}")
        for name in ("heartbeat_interval", "grace_period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SparsetrainError(f"{name} must be a whole number of seconds >= 1; got {value!r}")
        if self.grace_period <= self.heartbeat_interval:
            raise SparsetrainError(
                f"grace_period ({self.grace_period} s) must exceed heartbeat_interval ({self.heartbeat_interval} s), "
                "or live trials would be taken over"
            )

    def points(self) -> list[tuple[Workload, int, float]]:
        """Every (workload, batch size, sparsity), in the order workers take them."""
        return [(w, b, float(s)) for w in self.workloads for b in self.batch_sizes for s in self.sparsities]

    def to_dict(self) -> dict[str, Any]:
        return {"workloads": [w.to_dict() for w in self.workloads], "batch_sizes": list(self.batch_sizes),
                "sparsities": [float(s) for s in self.sparsities], "trials": self.trials,
                "early_stop": self.early_stop, "heartbeat_interval": self.heartbeat_interval,
                "grace_period": self.grace_period}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySpec:
        return cls(tuple(Workload.from_dict(w) for w in data["workloads"]), tuple(data["batch_sizes"]),
                   tuple(float(s) for s in data["sparsities"]), data["trials"], data["early_stop"],
                   data["heartbeat_interval"], data["grace_period"])


def point_name(workload: str, batch_size: int, sparsity: float) -> str:
    """The Optuna study name of one point.

    >>> point_name("dps-mnist-simple-cnn-sgd", 128, 0.9)
    'dps-mnist-simple-cnn-sgd/b128/s0.9'
    """
    return f"{workload}/b{batch_size}/s{sparsity:g}"


def load_spec(folder: str | Path) -> StudySpec:
    """The spec of the study planned in ``folder``."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise SparsetrainError(f"{folder} holds no study (no {SPEC_FILE}); plan one first: sparsetrain study plan "
                               f"--dir {folder} --workload NAME --batch-sizes ... --sparsities ...")
    try:
        return StudySpec.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise SparsetrainError(f"{path} is damaged ({type(err).__name__}: {err}); plan the study again in a new "
                               "folder") from None


def plan(folder: str | Path, spec: StudySpec) -> StudySpec:
    """Plan ``spec`` in ``folder`` (made if needed): write ``study.json`` and enqueue every point's
    plan once. Planning again with the same spec only enqueues what is missing (a plan index with
    no finished, running or waiting trial: one whose trial failed with an error); a different spec
    is refused, since the trials already run belong to the old one."""
    folder = Path(folder)
    path = folder / SPEC_FILE
    if path.exists():
        old = load_spec(folder)
        if old.to_dict() != spec.to_dict():
            raise SparsetrainError(
                f"{folder} already holds a study planned with other settings; plan the new one in another "
                "folder (or work on the old one: sparsetrain study work --dir " + str(folder) + ")"
            )
    else:
        text = json.dumps(spec.to_dict(), indent=2) + "\n"
        fsio.atomic_write(path, lambda tmp: tmp.write_text(text), what="store")
    storage = open_storage(folder, spec)
    for workload, batch_size, sparsity in spec.points():
        _enqueue_missing(storage, point_name(workload.name, batch_size, sparsity), workload, spec.trials)
    return spec


def _enqueue_missing(storage, name: str, workload: Workload, trials: int) -> None:
    import optuna

    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    present = {t.user_attrs.get("plan_index") for t in study.get_trials(deepcopy=False)
               if t.state != optuna.trial.TrialState.FAIL}
    for index, params in enumerate(plan_points(workload.search, trials)):
        if index not in present:
            study.enqueue_trial(params, user_attrs={"plan_index": index})


def open_storage(folder: str | Path, spec: StudySpec):
    """Optuna's RDB storage on ``folder/optuna.db`` with the spec's heartbeat, a stale trial
    retried (never given up) by ``RetryHeartbeatStaleTrialCallback``."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{Path(folder).resolve() / OPTUNA_FILE}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 120}},
            heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None),
        )


# ----------------------------------------------------------------------------- one trial


class TrialWatch(Callback):
    """Follows a trial's run: reports each validation error to its Optuna trial and, with
    ``early_stop``, stops the run once past ``best_known()`` (see the module docstring)."""

    def __init__(self, trial, goal_error: float, best_known: Callable[[], int | None], early_stop: bool):
        self.trial, self.goal_error, self.best_known, self.early_stop = trial, goal_error, best_known, early_stop
        self.reported: set[int] = set()

    def on_eval(self, step: int, metrics: dict[str, float]) -> str | None:
        error = metrics.get("val_error")
        if error is None:
            return None
        self.report(step, error)
        if not self.early_stop or error <= self.goal_error:
            return None
        best = self.best_known()
        if best is not None and step >= best:
            return f"past the best steps-to-result known for this point ({best}) at step {step}"
        return None

    def report(self, step: int, error: float) -> None:
        if step not in self.reported and math.isfinite(error):
            self.trial.report(error, step)
            self.reported.add(step)


def classify(run_status: str, curve: list[tuple[int, float]], goal_error: float) -> tuple[str, int | None]:
    """The trial status and steps-to-result of a run that ended with ``run_status`` after the
    validation ``curve``: complete at the first check at or below the goal, else infeasible
    (diverged), stopped (ended early on purpose) or incomplete (budget spent).

    >>> classify("stopped", [(100, 0.5), (200, 0.02)], 0.02)
    ('complete', 200)
    >>> classify("finished", [(100, 0.5), (200, 0.3)], 0.02), classify("stopped", [(100, 0.5)], 0.02)
    (('incomplete', None), ('stopped', None))
    """
    reached = next((step for step, error in curve if error <= goal_error), None)
    if reached is not None:
        return TrialStatus.COMPLETE.value, reached
    if run_status == RunStatus.INFEASIBLE:
        return TrialStatus.INFEASIBLE.value, None
    if run_status == RunStatus.STOPPED:
        return TrialStatus.STOPPED.value, None
    if run_status == RunStatus.FINISHED:
        return TrialStatus.INCOMPLETE.value, None
    raise SparsetrainError(f"a trial's run ended as {run_status!r}, which is not an end: it should have resumed")


def _best_known(study) -> int | None:
    """The fewest steps-to-result over the point's complete trials so far (None: none yet)."""
    import optuna

    values = [t.value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if t.value is not None and math.isfinite(t.value)]
    return int(min(values)) if values else None


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int, interval: float):
    """Beat ``trial_id``'s heartbeat every ``interval`` seconds while the block runs."""
    storage.record_heartbeat(trial_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a busy database: the next beat tries again
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name=f"sparsetrain-trial-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def mask_config(config):
    """The config a trial's mask is found with: the trial's, with the training batch size set to
    the pruning batch size when there is one (so that the mask is the same for every batch size of
    the study: with ``prune.batches = 0``, the whole training split in batches of that size, the
    remainder batch included when it divides the split) and the searched metaparameters at the
    workload's values (they do not touch pruning)."""
    p = config.prune
    return config.replace(train={"batch_size": p.batch_size or config.train.batch_size, "lr": 0.1, "momentum": 0.0,
                                 "decay_every": 1, "end_lr_factor": 0.0, "schedule": "constant"})


def shared_mask(folder: Path, config, *, data_dir=None, device=None):
    """The mask of ``config`` (a trial's run config) from ``folder/masks``, found and written there
    first if missing: one SNIP per (seed, sparsity) for the whole study instead of one per trial.
    None for a dense trial. Two workers finding the same mask at once write the same bytes."""
    from sparsetrain.masks import load_mask, save_mask
    from sparsetrain.pipeline import DENSE, build, find_mask

    if config.prune.method == DENSE:
        return None
    source = mask_config(config)
    path = folder / MASKS_DIR / f"{source.key()}.safetensors"
    if not path.exists():
        built = build(source, data_dir=data_dir, device=device)
        mask = find_mask(source, built)
        save_mask(path, mask, {"key": source.key(), "model": source.model}, model=built.model,
                  method=source.prune.method)
    return load_mask(path)


def _suggest(trial, params: dict[str, Any]) -> dict[str, Any]:
    """Record the enqueued values as the trial's parameters (with their ranges, for the dashboard)."""
    out = {}
    for name in params:
        d = SEARCH_SPACE[name]
        if d.scale == "integer":
            out[name] = trial.suggest_int(name, int(d.low), int(d.high))
        else:
            out[name] = trial.suggest_float(name, d.low, d.high, log=d.scale == "log")
    return out


def run_trial(folder: Path, spec: StudySpec, workload: Workload, batch_size: int, sparsity: float, study,
              trial_id: int, *, data_dir: str | Path | None = None, device: str | None = None) -> TrialOutcome:
    """Run one claimed trial to its end and tell Optuna; returns its outcome. A KeyboardInterrupt
    gives the trial back (failed, and a retry enqueued) before it propagates; an error fails it
    (``sparsetrain study plan`` enqueues it again) and propagates."""
    import optuna

    from sparsetrain.run import run

    trial = optuna.Trial(study, trial_id)
    frozen = study._storage.get_trial(trial_id)
    index = frozen.user_attrs["plan_index"]
    params = _suggest(trial, frozen.system_attrs.get("fixed_params", {}))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    config = workload.trial_config(batch_size, sparsity, params, seed=index)
    store = RunStore(folder / RUNS_DIR)
    watch = TrialWatch(trial, workload.goal_error, lambda: _best_known(study), spec.early_stop)
    with _heartbeat(study._storage, trial_id, spec.heartbeat_interval):
        try:
            mask = shared_mask(folder, config, data_dir=data_dir, device=device)
            ran = run(config, store=store, data_dir=data_dir, device=device, progress=None, mask=mask,
                      group=("study", folder.resolve().name), callbacks=[watch], wait=True)
        except KeyboardInterrupt:
            give_back(study, trial_id)
            raise
        except BaseException as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
    curve = store.metrics(ran.key, "val_error").get("val_error", [])
    for step, error in curve:  # the part a resumed run did not go through again
        watch.report(step, error)
    status, steps = classify(ran.status, curve, workload.goal_error)
    for key, value in (("status", status), ("steps_to_result", steps), ("run_key", ran.key)):
        trial.set_user_attr(key, value)
    if status == TrialStatus.STOPPED:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, float(steps) if steps is not None else math.inf)
    return TrialOutcome(workload.name, batch_size, sparsity, index, params, status, steps, curve)


def give_back(study, trial_id: int) -> None:
    """Fail a running trial this process cannot finish and enqueue its retry at once (what the
    heartbeat does for a killed worker, without waiting for the grace period)."""
    import optuna

    storage = study._storage
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
            callback = storage.get_heartbeat_stale_trial_callback()
            if callback is not None:
                callback(study, storage.get_trial(trial_id))


# ----------------------------------------------------------------------------- workers


def _claim(storage, spec: StudySpec):
    """Take the next waiting trial (points in spec order, lowest plan index first) after failing
    stale ones (so their retries are waiting too): ``(point, study, trial_id)``, or None."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    for workload, batch_size, sparsity in spec.points():
        study = optuna.load_study(study_name=point_name(workload.name, batch_size, sparsity), storage=storage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        for t in sorted(waiting, key=lambda t: (t.user_attrs.get("plan_index", 0), t.number)):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.RUNNING):
                    return (workload, batch_size, sparsity), study, t._trial_id
    return None


def _unfinished(storage, spec: StudySpec) -> int:
    """How many trials are waiting or running over all points."""
    import optuna

    states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    return sum(len(optuna.load_study(study_name=point_name(w.name, b, s), storage=storage)
                   .get_trials(deepcopy=False, states=states)) for w, b, s in spec.points())


def work_loop(folder: str | Path, *, max_trials: int | None = None, data_dir: str | Path | None = None,
              device: str | None = None) -> int:
    """Claim and run trials of the study in ``folder`` until none is waiting or running (waiting
    while others run, to take over any whose worker dies), or ``max_trials`` are done. Returns how
    many trials this process ran."""
    folder = Path(folder)
    spec = load_spec(folder)
    storage = open_storage(folder, spec)
    done = 0
    while max_trials is None or done < max_trials:
        claimed = _claim(storage, spec)
        if claimed is None:
            if _unfinished(storage, spec) == 0:
                break
            time.sleep(POLL_S)
            continue
        (workload, batch_size, sparsity), study, trial_id = claimed
        run_trial(folder, spec, workload, batch_size, sparsity, study, trial_id, data_dir=data_dir, device=device)
        done += 1
    return done


def _worker_main(folder: str, data_dir: str = "", device: str = "") -> None:
    """A worker process's body (``python -c``; see :func:`work`): exit 2 with the message on a
    SparsetrainError, 130 on Ctrl-C (its trial given back)."""
    import sys

    try:
        work_loop(folder, data_dir=data_dir or None, device=device or None)
    except KeyboardInterrupt:
        sys.exit(130)
    except SparsetrainError as err:
        print(f"study worker {os.getpid()}: {err}", file=sys.stderr)
        sys.exit(2)


_WORKER = "import sys; from sparsetrain.study.engine import _worker_main; _worker_main(*sys.argv[1:])"


def work(folder: str | Path, workers: int = 1, *, data_dir: str | Path | None = None, device: str | None = None,
         progress: bool = True, on_start: Callable[[list[int]], None] | None = None) -> dict[str, Any]:
    """Run the study in ``folder`` with ``workers`` local processes until every trial is finished
    (plan indexes whose trial failed with an error are enqueued again first). Shows a progress bar
    of finished trials. ``on_start(pids)`` sees the workers' process ids. Returns
    ``{"exit_codes": [...], "finished": n, "total": m}`` (a worker killed by a signal has exit code
    minus its number); raises SparsetrainError if workers failed and trials are left.

    Workers are fresh interpreters (``python -c``), not forks: nothing of the caller's state (a
    notebook, an open database, torch's threads) is shared, and no ``__main__`` guard is needed."""
    import subprocess
    import sys

    from tqdm.auto import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SparsetrainError(f"--workers must be a positive whole number; got {workers!r}")
    folder = Path(folder)
    spec = plan(folder, load_spec(folder))  # re-enqueue what failed, before any worker starts
    total = spec.trials * len(spec.points())
    storage = open_storage(folder, spec)
    args = [str(folder), "" if data_dir is None else str(data_dir), device or ""]
    processes = [subprocess.Popen([sys.executable, "-c", _WORKER, *args]) for _ in range(workers)]
    if on_start is not None:
        on_start([p.pid for p in processes])
    bar = tqdm(total=total, disable=not progress, desc="trials", dynamic_ncols=True)
    try:
        # poll every process each time (not any(), which stops at the first live one): poll()
        # reaps a killed worker, whose pid would otherwise still look alive to the run store's lease
        while [p.poll() for p in processes].count(None):
            bar.update(max(0, _finished_count(folder, spec, storage) - bar.n))
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for p in processes:
            p.wait()  # each worker got the Ctrl-C too and gives its trial back
        raise
    finally:
        bar.update(max(0, _finished_count(folder, spec, storage) - bar.n))
        bar.close()
    codes = [p.returncode for p in processes]
    finished = _finished_count(folder, spec, storage)
    if finished < total and any(c != 0 for c in codes):
        raise SparsetrainError(
            f"workers ended with exit codes {codes} and {total - finished} of {total} trials are not finished; "
            f"see the messages above, fix the cause and run sparsetrain study work --dir {folder} again"
        )
    return {"exit_codes": codes, "finished": finished, "total": total}


# ----------------------------------------------------------------------------- reading a study


def _finished_count(folder: Path, spec: StudySpec, storage=None) -> int:
    return sum(row["finished"] for row in status_rows(folder, spec, storage))


def status_rows(folder: str | Path, spec: StudySpec | None = None, storage=None) -> list[dict[str, Any]]:
    """Progress per point: trials planned, finished by status, running, waiting, failed attempts,
    and K* so far. ``storage``: the study's open storage, if the caller has one."""
    import optuna

    folder = Path(folder)
    spec = spec or load_spec(folder)
    storage = storage or open_storage(folder, spec)
    S = optuna.trial.TrialState
    rows = []
    for workload, batch_size, sparsity in spec.points():
        name = point_name(workload.name, batch_size, sparsity)
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        ended = [t for t in trials if t.state in (S.COMPLETE, S.PRUNED)]
        row = {"point": name, "planned": spec.trials, "finished": len(ended),
               "running": sum(t.state == S.RUNNING for t in trials),
               "waiting": sum(t.state == S.WAITING for t in trials),
               "failed_attempts": sum(t.state == S.FAIL for t in trials)}
        for status in TrialStatus:
            row[status.value] = sum(t.user_attrs.get("status") == status for t in ended)
        steps = [t.user_attrs["steps_to_result"] for t in ended if t.user_attrs.get("status") == TrialStatus.COMPLETE]
        row["k_star"] = min(steps) if steps else None
        rows.append(row)
    return rows


def outcomes(folder: str | Path) -> list[TrialOutcome]:
    """Every finished trial of the study in ``folder`` as a :class:`TrialOutcome` (its validation
    curve from the run store), points in spec order, plan order within a point. Raises
    SparsetrainError if a plan index holds two finished trials (a trial counted twice)."""
    import optuna

    folder = Path(folder)
    spec = load_spec(folder)
    storage = open_storage(folder, spec)
    store = RunStore(folder / RUNS_DIR)
    S = optuna.trial.TrialState
    out = []
    for workload, batch_size, sparsity in spec.points():
        name = point_name(workload.name, batch_size, sparsity)
        ended = [t for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
                 if t.state in (S.COMPLETE, S.PRUNED)]
        seen: set[int] = set()
        for t in sorted(ended, key=lambda t: t.user_attrs["plan_index"]):
            index = t.user_attrs["plan_index"]
            if index in seen:
                raise SparsetrainError(f"{name}: plan index {index} has two finished trials; the study is "
                                       "inconsistent (please report this)")
            seen.add(index)
            curve = store.metrics(t.user_attrs["run_key"], "val_error").get("val_error", [])
            out.append(TrialOutcome(workload.name, batch_size, sparsity, index, dict(t.params),
                                    t.user_attrs["status"], t.user_attrs.get("steps_to_result"),
                                    [(int(s), float(e)) for s, e in curve]))
    return out


def best_trials(all_outcomes: list[TrialOutcome]) -> dict[tuple[str, int, float], TrialOutcome]:
    """Per point, the trial that set K*: fewest steps, ties to the lowest plan index."""
    best: dict[tuple[str, int, float], TrialOutcome] = {}
    for o in all_outcomes:
        if o.reached_goal:
            current = best.get(o.point)
            if current is None or (o.steps_to_result, o.plan_index) < (current.steps_to_result, current.plan_index):
                best[o.point] = o
    return best
