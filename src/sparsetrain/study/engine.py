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

Many machines: with ``storage`` (a database URL, e.g. ``postgresql://user@host:5432/studies``) the
plan, the spec and every trial's outcome live in that database instead, under the study's name
(``study``, default the folder's name): the spec as the user attribute ``spec`` of an Optuna study
of that name, each point as the Optuna study ``<name>/<point_name>``. The folder is then each
host's own (its run store and masks), and a host needs only the URL and the name to join. A trial
records its whole validation curve in Optuna (user attribute ``curve``), so that the report needs no
other host's run store.

Plan once, work many times. :func:`plan` enqueues every plan point once (a trial carries its
``plan_index`` as a user attribute); the workers never sample, they claim waiting trials
(Optuna's own atomic WAITING -> RUNNING), lowest plan index first. While a worker runs a trial it
beats the trial's heartbeat; a worker killed outright (SIGKILL) stops beating, and after
``grace_period`` seconds any other worker fails that trial and Optuna's
``RetryHeartbeatStaleTrialCallback`` enqueues a copy, which is claimed like any other waiting
trial. The copy's run resumes from the run store's checkpoint (or, if the killed worker had
recorded the run's end, reuses it), so a trial is trained to its end once and counted once: a
plan index has exactly one finished trial (Optuna state COMPLETE or PRUNED) and any number of
FAIL ones (the killed attempts). The steps that add a trial for a plan index (the plan's enqueue,
the retry of a stale or given-back trial) and a trial's finish hold the storage's one lock
(:func:`exclusive`), and a trial finishing where its plan index already has a finished trial (a
copy that ran twice: its worker was presumed dead but was not) is recorded as FAIL with the user
attribute ``duplicate_of``, so that this holds across hosts too.

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
import hashlib
import json
import math
import os
import re
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
SPEC_ATTR = "spec"  # in a database named by ``storage``: the user attribute holding the StudySpec
# the PostgreSQL advisory lock of :func:`exclusive` (one per database: it is held for milliseconds)
LOCK_KEY = int.from_bytes(hashlib.sha256(b"sparsetrain.study").digest()[:8], "big", signed=True)
STORAGE_ENV = "SPARSETRAIN_STUDY_STORAGE"  # how work() hands its workers the URL (not on their command line)


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


def load_spec(folder: str | Path, *, storage: str | None = None, study: str | None = None) -> StudySpec:
    """The spec of the study planned in ``folder`` or, with ``storage``, of the study named
    ``study`` (default: the folder's name) in that database."""
    if storage is not None:
        return _load_shared_spec(folder, storage, study)
    _embedded_only(study)
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise SparsetrainError(f"{folder} holds no study (no {SPEC_FILE}); plan one first: sparsetrain study plan "
                               f"--dir {folder} --workload NAME --batch-sizes ... --sparsities ...")
    try:
        return StudySpec.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise SparsetrainError(f"{path} is damaged ({type(err).__name__}: {err}); plan the study again in a new "
                               "folder") from None


def plan(folder: str | Path, spec: StudySpec, *, storage: str | None = None, study: str | None = None) -> StudySpec:
    """Plan ``spec`` in ``folder`` (made if needed): write ``study.json`` and enqueue every point's
    plan once. Planning again with the same spec only enqueues what is missing (a plan index with
    no finished, running or waiting trial: one whose trial failed with an error); a different spec
    is refused, since the trials already run belong to the old one. With ``storage`` (a database
    URL), the spec and the plan go to that database under the name ``study`` (default: the
    folder's name) and nothing is written in ``folder``."""
    folder = Path(folder)
    if storage is not None:
        with OpenStudy(folder, spec, open_storage(folder, spec, storage), study_name(folder, study), True,
                       masked(storage)) as opened:
            with exclusive(opened.storage):
                _record_spec(opened)
            for workload, batch_size, sparsity in spec.points():
                _enqueue_missing(opened, workload, batch_size, sparsity)
        return spec
    _embedded_only(study)
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
    with OpenStudy(folder, spec, open_storage(folder, spec), study_name(folder), False, str(folder)) as opened:
        for workload, batch_size, sparsity in spec.points():
            _enqueue_missing(opened, workload, batch_size, sparsity)
    return spec


def _enqueue_missing(opened: OpenStudy, workload: Workload, batch_size: int, sparsity: float) -> None:
    import optuna

    with exclusive(opened.storage):  # a retry enqueued between our look and our enqueue would be a twin
        study = optuna.create_study(study_name=opened.optuna_name(workload, batch_size, sparsity),
                                    storage=opened.storage, direction="minimize", load_if_exists=True)
        present = {t.user_attrs.get("plan_index") for t in study.get_trials(deepcopy=False)
                   if t.state != optuna.trial.TrialState.FAIL}
        for index, params in enumerate(plan_points(workload.search, opened.spec.trials)):
            if index not in present:
                study.enqueue_trial(params, user_attrs={"plan_index": index})


# ----------------------------------------------------------------------------- where a study lives


@dataclasses.dataclass(frozen=True)
class OpenStudy:
    """A study opened for work or reading: ``folder`` (this host's run store and masks), its
    ``spec``, its Optuna ``storage`` (open), its ``name`` (its runs' group name; in a shared
    database, the prefix of its Optuna studies), whether the storage is ``shared`` (a database named
    by URL rather than the folder's own ``optuna.db``), and ``where`` it lives, for messages (the
    URL with its password masked, or the folder). A context manager: leaving it closes the
    storage's pooled connections (a database server counts them)."""

    folder: Path
    spec: StudySpec
    storage: Any
    name: str
    shared: bool
    where: str

    def optuna_name(self, workload: Workload, batch_size: int, sparsity: float) -> str:
        """The Optuna study name of one point: :func:`point_name`, under the study's name in a
        shared database (which holds many studies)."""
        point = point_name(workload.name, batch_size, sparsity)
        return f"{self.name}/{point}" if self.shared else point

    def __enter__(self) -> OpenStudy:
        return self

    def __exit__(self, *exc) -> None:
        self.storage.engine.dispose()

    def point_study(self, workload: Workload, batch_size: int, sparsity: float):
        import optuna

        return optuna.load_study(study_name=self.optuna_name(workload, batch_size, sparsity), storage=self.storage)


def study_name(folder: str | Path, study: str | None = None) -> str:
    """A study's name: ``study`` if given, else its folder's name.

    >>> study_name("/scratch/mnist-sgd"), study_name("/scratch/host-a", "mnist-sgd")
    ('mnist-sgd', 'mnist-sgd')
    """
    name = Path(folder).resolve().name if study is None else study
    if not name or "/" in name or name != name.strip():
        raise SparsetrainError(f"--study {name!r} is not a usable study name: give a non-empty name without '/' "
                               "or surrounding spaces, e.g. --study mnist-sgd")
    return name


def _embedded_only(study: str | None) -> None:
    if study is not None:
        raise SparsetrainError(f"--study {study!r} names a study in a --storage database; without --storage the "
                               "study is the --dir folder's own (leave --study out, or add --storage URL)")


def open_study(folder: str | Path, *, storage: str | None = None, study: str | None = None) -> OpenStudy:
    """Open the study planned in ``folder`` or, with ``storage``, the one named ``study`` (default:
    the folder's name) in that database (see the module docstring)."""
    folder = Path(folder)
    spec = load_spec(folder, storage=storage, study=study)
    if storage is None:
        return OpenStudy(folder, spec, open_storage(folder, spec), study_name(folder), False, str(folder))
    return OpenStudy(folder, spec, open_storage(folder, spec, storage), study_name(folder, study), True,
                     masked(storage))


def masked(url: str) -> str:
    """``url`` with its password hidden, for messages.

    >>> masked("postgresql://me:s3cret@db.lab:5432/studies"), masked("postgresql://me@db.lab/studies")
    ('postgresql://me:***@db.lab:5432/studies', 'postgresql://me@db.lab/studies')
    """
    return re.sub(r"^([^:/]+://[^:/@]*):[^@]*@", r"\1:***@", url)


def storage_url(folder: str | Path, storage: str | None = None) -> str:
    """The SQLAlchemy URL of a study's Optuna storage: None is the embedded SQLite file in
    ``folder``; ``postgresql://`` (and ``postgres://``) mean PostgreSQL through psycopg 3, the
    driver of ``pip install 'sparsetrain[cluster]'``; ``sqlite:///PATH`` is a SQLite file elsewhere
    (one machine only). Other databases are refused: only these two are tested.

    >>> storage_url("s", "postgresql://me@db.lab:5432/studies")
    'postgresql+psycopg://me@db.lab:5432/studies'
    """
    if storage is None:
        return f"sqlite:///{Path(folder).resolve() / OPTUNA_FILE}"
    scheme, sep, rest = storage.partition("://")
    if not sep or not rest:
        raise SparsetrainError(f"--storage {masked(storage)!r} is not a database URL; give e.g. "
                               "postgresql://USER@HOST:5432/DATABASE (or leave --storage out for the embedded "
                               "SQLite file in --dir)")
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + rest
    if scheme.startswith("postgresql+") or scheme == "sqlite":
        return storage
    raise SparsetrainError(f"--storage {masked(storage)!r}: {scheme!r} databases are not supported; use "
                           "postgresql://USER@HOST:5432/DATABASE for many machines")


def _connect(url: str, shown: str, heartbeat_interval: int, grace_period: int):
    """Optuna's RDB storage on ``url``; a missing driver or an unreachable server is a
    SparsetrainError naming ``shown`` (the URL, password masked)."""
    import optuna
    import sqlalchemy.exc
    from optuna.exceptions import ExperimentalWarning

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}  # seconds a writer waits for the file's lock
    else:
        # pool_pre_ping: a connection dropped by the network or a restarted server is replaced, not
        # reused. Keepalives on both ends: a host that dies while it holds the lock of exclusive()
        # (or a row lock) is noticed by the server within about a minute, which then releases them
        keepalive = {"idle": 30, "interval": 10, "count": 3}
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {
            "connect_timeout": 10, "keepalives": 1, **{f"keepalives_{k}": v for k, v in keepalive.items()},
            "options": " ".join(f"-c tcp_keepalives_{k}={v}" for k, v in keepalive.items())}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None),
            )
    except ImportError as err:
        raise SparsetrainError(f"cannot open the study storage {shown}: its database driver is not installed "
                               f"({err.__cause__ or err}); install it: pip install 'sparsetrain[cluster]' "
                               "(psycopg, for postgresql:// URLs)") from None
    except sqlalchemy.exc.OperationalError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split())
        raise SparsetrainError(f"cannot reach the study storage {shown} ({reason}); check that the server runs "
                               "and that this host may connect (host, port, firewall, pg_hba.conf), and that the "
                               "user and the database exist") from None
    except sqlalchemy.exc.ArgumentError as err:
        raise SparsetrainError(f"--storage {shown} is not a usable database URL ({err}); give e.g. "
                               "postgresql://USER@HOST:5432/DATABASE") from None


def _load_shared_spec(folder: str | Path, storage: str, study: str | None) -> StudySpec:
    import optuna

    name, shown = study_name(folder, study), masked(storage)
    defaults = StudySpec.__dataclass_fields__
    db = _connect(storage_url(folder, storage), shown, defaults["heartbeat_interval"].default,
                  defaults["grace_period"].default)
    try:
        try:
            data = optuna.load_study(study_name=name, storage=db).user_attrs.get(SPEC_ATTR)
        except KeyError:
            data = None
        if data is None:
            raise SparsetrainError(f"the database {shown} holds no sparsetrain study named {name!r}; plan it "
                                   f"first (sparsetrain study plan --storage URL --study {name} --dir LOCAL ...), "
                                   "or name the study with --study")
        try:
            return StudySpec.from_dict(data)
        except (ValueError, KeyError, TypeError) as err:
            raise SparsetrainError(f"study {name!r} in {shown} has a damaged spec ({type(err).__name__}: {err}); "
                                   "plan the study again under another --study name") from None
    finally:
        db.engine.dispose()


def _record_spec(opened: OpenStudy) -> None:
    """Write the spec into the shared database (under :func:`exclusive`), or check it against the
    one there."""
    import optuna

    holder = optuna.create_study(study_name=opened.name, storage=opened.storage, load_if_exists=True)
    old = holder.user_attrs.get(SPEC_ATTR)
    if old is None:
        holder.set_user_attr(SPEC_ATTR, opened.spec.to_dict())
    elif StudySpec.from_dict(old).to_dict() != opened.spec.to_dict():
        raise SparsetrainError(
            f"the database {opened.where} already holds a study named {opened.name!r} planned with other settings; "
            f"plan the new one under another --study name (or work on the old one: sparsetrain study work "
            f"--storage URL --study {opened.name} --dir LOCAL)"
        )


@contextlib.contextmanager
def exclusive(storage):
    """Hold the study storage's one lock for the block: a PostgreSQL advisory lock (the server
    releases it if this process dies), or a file lock beside a SQLite file. Every step that adds a
    trial for a plan index (the plan's enqueue, the retry of a stale or given-back trial) and every
    trial's finish take it, so that a plan index never gets two waiting copies nor two finished
    trials, however many hosts work."""
    import sqlalchemy

    engine = getattr(storage, "_backend", storage).engine  # a study's storage is Optuna's cache around ours
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a lost connection has released the lock already
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
                    conn.commit()
        return
    import fcntl

    with open(f"{engine.url.database}.lock", "a") as lock:  # empty: only its lock matters
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_storage(folder: str | Path, spec: StudySpec, storage: str | None = None):
    """Optuna's RDB storage on ``folder/optuna.db`` (or on the database URL ``storage``: see
    :func:`storage_url`) with the spec's heartbeat, a stale trial retried (never given up) by
    ``RetryHeartbeatStaleTrialCallback``."""
    shown = str(Path(folder) / OPTUNA_FILE) if storage is None else masked(storage)
    return _connect(storage_url(folder, storage), shown, spec.heartbeat_interval, spec.grace_period)


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
        import optuna

        if step not in self.reported and math.isfinite(error):
            # a trial taken over (no heartbeat for longer than the grace period, e.g. a network
            # outage) is no longer this worker's to report; its run still ends, its retry records it
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
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


def _best_complete(study) -> tuple[float, int] | None:
    """The point's best complete trial so far as (steps-to-result, plan index): fewest steps, ties
    to the lowest plan index; None if none has reached the goal."""
    import optuna

    done = [(t.value, t.user_attrs.get("plan_index", 0))
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    return min(done) if done else None


def best_known(study) -> int | None:
    """The fewest steps-to-result over the point's complete trials so far (None: none yet)."""
    best = _best_complete(study)
    return None if best is None else int(best[0])


@contextlib.contextmanager
def beating(storage, trial_id: int, interval: float):
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


def shared_mask(folder: Path, config, *, sparsities=(), data_dir=None, device=None):
    """The mask of ``config`` (a trial's run config) from ``folder/masks``, found and written there
    first if missing: one SNIP per (seed, sparsity) for the whole study instead of one per trial.
    None for a dense trial. Two workers finding the same mask at once write the same bytes.

    ``sparsities``: the study's; when this mask is missing, those of its other masks for the same
    seed that are missing too are found with it from one scoring where the method's scores do not
    depend on the sparsity (:func:`sparsetrain.pipeline.find_masks`; SNIP: one gradient summed
    over the training split for sparsities 0.7 and 0.9, not two)."""
    from sparsetrain.masks import load_mask, save_mask
    from sparsetrain.pipeline import DENSE, build, find_mask, find_masks
    from sparsetrain.pruning import scores_once

    if config.prune.method == DENSE:
        return None
    source = mask_config(config)

    def path_of(c):
        return folder / MASKS_DIR / f"{c.key()}.safetensors"

    if not path_of(source).exists():
        built = build(source, data_dir=data_dir, device=device)
        p = source.prune
        others = [source.replace(prune={"sparsity": float(s)}) for s in sorted(set(sparsities))
                  if 0 < float(s) != p.sparsity]
        others = [c for c in others if not path_of(c).exists()]
        if others and scores_once(p.method, p.options or None, p.rounds, p.structure):
            configs = [source, *others]
            masks = find_masks(source, built, [c.prune.sparsity for c in configs])
        else:
            configs, masks = [source], [find_mask(source, built)]
        for c, mask in zip(configs, masks):
            save_mask(path_of(c), mask, {"key": c.key(), "model": c.model}, model=built.model, method=p.method)
    return load_mask(path_of(source))


def suggest_params(trial, params: dict[str, Any]) -> dict[str, Any]:
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
              trial_id: int, *, data_dir: str | Path | None = None, device: str | None = None,
              group_name: str | None = None) -> TrialOutcome:
    """Run one claimed trial to its end and tell Optuna (:func:`record_trial`); returns its
    outcome. Its run is grouped under ``("study", group_name)`` (default: the folder's name). A
    KeyboardInterrupt gives the trial back (failed, and a retry enqueued) before it propagates; an
    error fails it (``sparsetrain study plan`` enqueues it again) and propagates."""
    import optuna

    from sparsetrain.run import run

    trial = optuna.Trial(study, trial_id)
    frozen = study._storage.get_trial(trial_id)
    index = frozen.user_attrs["plan_index"]
    params = suggest_params(trial, frozen.system_attrs.get("fixed_params", {}))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    config = workload.trial_config(batch_size, sparsity, params, seed=index)
    store = RunStore(folder / RUNS_DIR)
    watch = TrialWatch(trial, workload.goal_error, lambda: best_known(study), spec.early_stop)
    with beating(study._storage, trial_id, spec.heartbeat_interval):
        try:
            mask = shared_mask(folder, config, sparsities=spec.sparsities, data_dir=data_dir, device=device)
            ran = run(config, store=store, data_dir=data_dir, device=device, progress=None, mask=mask,
                      group=("study", group_name or folder.resolve().name), callbacks=[watch], wait=True)
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
    record_trial(study, trial, index, status, steps, ran.key, curve)
    return TrialOutcome(workload.name, batch_size, sparsity, index, params, status, steps, curve)


def record_trial(study, trial, index: int, status: str, steps: int | None, run_key: str,
                 curve: list[tuple[int, float]]) -> bool:
    """Tell Optuna how trial ``index`` of ``study`` ended: its status, steps-to-result, run key and
    whole validation ``curve`` as user attributes (the report reads the curve from there, so no
    host needs another's run store), its state and value as the module docstring says. Under
    :func:`exclusive`: a trial taken over meanwhile is left to its retry, and a trial whose plan
    index already has a finished trial (a copy that ran twice) is failed with ``duplicate_of``
    (that trial's number). Returns whether this trial was recorded as the plan index's result."""
    import optuna

    S = optuna.trial.TrialState
    with exclusive(study._storage):
        if study._storage.get_trial(trial._trial_id).state != S.RUNNING:
            return False  # failed as stale by another worker: its retry records the plan index
        twin = next((t.number for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED))
                     if t.user_attrs.get("plan_index") == index), None)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            study.tell(trial, state=S.FAIL)
            return False
        for key, value in (("status", status), ("steps_to_result", steps), ("run_key", run_key),
                           ("curve", [[int(step), float(error)] for step, error in curve])):
            trial.set_user_attr(key, value)
        if status == TrialStatus.STOPPED:
            study.tell(trial, state=S.PRUNED)
        else:
            study.tell(trial, float(steps) if steps is not None else math.inf)
    return True


def give_back(study, trial_id: int) -> None:
    """Fail a running trial this process cannot finish and enqueue its retry at once (what the
    heartbeat does for a killed worker, without waiting for the grace period)."""
    import optuna

    storage = study._storage
    with exclusive(storage), contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
            callback = storage.get_heartbeat_stale_trial_callback()
            if callback is not None:
                callback(study, storage.get_trial(trial_id))


# ----------------------------------------------------------------------------- workers


def hinted_index(opened: OpenStudy, workload: Workload, batch_size: int, sparsity: float) -> int | None:
    """The plan index to try first at a point: the best one so far at the nearest other point of
    the same workload (nearest batch size on a log scale, then nearest sparsity) that has a complete
    trial; None if none has. Every point has the same plan, so that index has the same
    metaparameters here, and is likely near the best: finished first, its steps-to-result bounds
    every other trial of the point through the early stop. Without it a point's first trials run
    unbounded (the plan starts at learning rate 0.01: thousands of steps at large batch sizes).
    Order changes cost only: K* and the best trial do not depend on the order trials finish in."""
    best = None
    for w, b, s in opened.spec.points():
        if w.name != workload.name or (b, s) == (batch_size, sparsity):
            continue
        found = _best_complete(opened.point_study(w, b, s))
        rank = (abs(math.log2(b / batch_size)), abs(s - sparsity))
        if found is not None and (best is None or rank < best[0]):
            best = (rank, found[1])
    return None if best is None else best[1]


def _claim(opened: OpenStudy):
    """Take the next waiting trial after failing stale ones (so their retries are waiting too):
    points in spec order; within a point the :func:`hinted_index` first, then the lowest plan
    index. Returns ``(point, study, trial_id)``, or None."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    storage = opened.storage
    for workload, batch_size, sparsity in opened.spec.points():
        study = opened.point_study(workload, batch_size, sparsity)
        with warnings.catch_warnings(), exclusive(storage):
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        hint = hinted_index(opened, workload, batch_size, sparsity) if waiting else None
        for t in sorted(waiting, key=lambda t: (t.user_attrs.get("plan_index", 0) != hint,
                                                t.user_attrs.get("plan_index", 0), t.number)):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.RUNNING):
                    return (workload, batch_size, sparsity), study, t._trial_id
    return None


def _unfinished(opened: OpenStudy) -> int:
    """How many trials are waiting or running over all points."""
    import optuna

    states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    return sum(len(opened.point_study(w, b, s).get_trials(deepcopy=False, states=states))
               for w, b, s in opened.spec.points())


def work_loop(folder: str | Path, *, max_trials: int | None = None, data_dir: str | Path | None = None,
              device: str | None = None, storage: str | None = None, study: str | None = None,
              pack: str | int = 1) -> int:
    """Claim and run trials of the study in ``folder`` (or, with ``storage``, of the study named
    ``study`` in that database, ``folder`` holding this host's runs and masks) until none is
    waiting or running (waiting while others run, to take over any whose worker dies), or
    ``max_trials`` are done (a pack counts all its trials). ``pack``: 1, one trial at a time; K or
    ``"auto"``, up to K trials of a point trained together (:mod:`sparsetrain.study.packed`).
    Returns how many trials this process ran."""
    with open_study(folder, storage=storage, study=study) as opened:
        folder, spec = opened.folder, opened.spec
        done = 0
        while max_trials is None or done < max_trials:
            claimed = _claim(opened)
            if claimed is None:
                if _unfinished(opened) == 0:
                    break
                time.sleep(POLL_S)
                continue
            if pack != 1:  # more trials of this point claimed and trained with it
                from sparsetrain.study.packed import work_claimed

                done += work_claimed(opened, claimed, pack, data_dir=data_dir, device=device)
                continue
            (workload, batch_size, sparsity), point_study, trial_id = claimed
            run_trial(folder, spec, workload, batch_size, sparsity, point_study, trial_id, data_dir=data_dir,
                      device=device, group_name=opened.name)
            done += 1
    return done


def _worker_main(folder: str, data_dir: str = "", device: str = "", study: str = "", pack: str = "1") -> None:
    """A worker process's body (``python -c``; see :func:`work`; the storage URL, if any, in
    ``$SPARSETRAIN_STUDY_STORAGE``): exit 2 with the message on a SparsetrainError, 130 on Ctrl-C
    (its trial given back)."""
    import sys

    from sparsetrain.study.packed import parse_pack

    try:
        work_loop(folder, data_dir=data_dir or None, device=device or None,
                  storage=os.environ.get(STORAGE_ENV) or None, study=study or None, pack=parse_pack(pack))
    except KeyboardInterrupt:
        sys.exit(130)
    except SparsetrainError as err:
        print(f"study worker {os.getpid()}: {err}", file=sys.stderr)
        sys.exit(2)


_WORKER = "import sys; from sparsetrain.study.engine import _worker_main; _worker_main(*sys.argv[1:])"


def work(folder: str | Path, workers: int = 1, *, data_dir: str | Path | None = None, device: str | None = None,
         progress: bool = True, on_start: Callable[[list[int]], None] | None = None, storage: str | None = None,
         study: str | None = None, pack: str | int | None = None) -> dict[str, Any]:
    """Run the study in ``folder`` (or, with ``storage``, the study named ``study`` in that
    database: see :func:`work_loop`; ``pack``: as there, None for :func:`~sparsetrain.study.packed.default_pack`) with ``workers`` local processes until every trial is finished
    (plan indexes whose trial failed with an error are enqueued again first). Shows a progress bar
    of finished trials. ``on_start(pids)`` sees the workers' process ids. Returns
    ``{"exit_codes": [...], "finished": n, "total": m}`` (a worker killed by a signal has exit code
    minus its number); raises SparsetrainError if workers failed and trials are left.

    Workers are fresh interpreters (``python -c``), not forks: nothing of the caller's state (a
    notebook, an open database, torch's threads) is shared, and no ``__main__`` guard is needed."""
    import subprocess
    import sys

    from tqdm.auto import tqdm

    from sparsetrain.study.packed import default_pack, parse_pack

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SparsetrainError(f"--workers must be a positive whole number; got {workers!r}")
    pack = default_pack(device) if pack is None else parse_pack(pack)
    folder = Path(folder)
    # re-enqueue what failed, before any worker starts
    spec = plan(folder, load_spec(folder, storage=storage, study=study), storage=storage, study=study)
    total = spec.trials * len(spec.points())
    opened = open_study(folder, storage=storage, study=study)
    args = [str(folder), "" if data_dir is None else str(data_dir), device or "", study or "", str(pack)]
    env = {k: v for k, v in os.environ.items() if k != STORAGE_ENV}
    if storage is not None:
        env[STORAGE_ENV] = storage
    processes = [subprocess.Popen([sys.executable, "-c", _WORKER, *args], env=env) for _ in range(workers)]
    if on_start is not None:
        on_start([p.pid for p in processes])
    bar = tqdm(total=total, disable=not progress, desc="trials", dynamic_ncols=True)
    with opened:
        try:
            # poll every process each time (not any(), which stops at the first live one): poll()
            # reaps a killed worker, whose pid would otherwise still look alive to the run store's lease
            while [p.poll() for p in processes].count(None):
                finished, running = _progress(opened)
                bar.update(max(0, finished - bar.n))
                if progress:
                    bar.set_postfix_str(running, refresh=True)
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            for p in processes:
                p.wait()  # each worker got the Ctrl-C too and gives its trial back
            raise
        finally:
            finished = _progress(opened)[0]
            bar.update(max(0, finished - bar.n))
            bar.close()
    codes = [p.returncode for p in processes]
    if finished < total and any(c != 0 for c in codes):
        raise SparsetrainError(
            f"workers ended with exit codes {codes} and {total - finished} of {total} trials are not finished; "
            f"see the messages above, fix the cause and run sparsetrain study work --dir {folder}"
            + ("" if storage is None else f" --storage URL --study {opened.name}") + " again"
        )
    return {"exit_codes": codes, "finished": finished, "total": total}


# ----------------------------------------------------------------------------- reading a study


def running_progress(opened: OpenStudy) -> str:
    """Where each running trial is, from the last validation error it reported: ``b2/s0 #3 step
    1,300 val 4.12%`` (batch size, sparsity, plan index), ``starting`` before its first check;
    joined by ``; ``. The progress bar of :func:`work` shows it, since a trial at a small batch size
    can run for many minutes between two finished trials."""
    return _progress(opened)[1]


def _progress(opened: OpenStudy) -> tuple[int, str]:
    """The finished trials over all points and :func:`running_progress`, from one read of each
    point's trials (the bar of :func:`work` asks every second)."""
    import optuna

    S = optuna.trial.TrialState
    finished, parts = 0, []
    for workload, batch_size, sparsity in opened.spec.points():
        trials = opened.point_study(workload, batch_size, sparsity).get_trials(deepcopy=False)
        finished += sum(t.state in (S.COMPLETE, S.PRUNED) for t in trials)
        for t in sorted((t for t in trials if t.state == S.RUNNING), key=lambda t: t.number):
            where = f"b{batch_size}/s{sparsity:g} #{t.user_attrs.get('plan_index', t.number)}"
            if t.intermediate_values:
                step = max(t.intermediate_values)
                parts.append(f"{where} step {step:,} val {t.intermediate_values[step]:.2%}")
            else:
                parts.append(f"{where} starting")
    return finished, "; ".join(parts)


def status_rows(folder: str | Path, *, storage: str | None = None, study: str | None = None) -> list[dict[str, Any]]:
    """Progress per point: trials planned, finished by status, running, waiting, failed attempts
    (killed, errors, duplicates), K* so far, and how ``--pack`` chose to train it. ``storage``, ``study``: as :func:`work_loop`."""
    with open_study(folder, storage=storage, study=study) as opened:
        return _status_rows(opened)


def _status_rows(opened: OpenStudy) -> list[dict[str, Any]]:
    import optuna

    from sparsetrain.study.packed import packing_summary

    S = optuna.trial.TrialState
    rows = []
    for workload, batch_size, sparsity in opened.spec.points():
        name = point_name(workload.name, batch_size, sparsity)
        point = opened.point_study(workload, batch_size, sparsity)
        trials = point.get_trials(deepcopy=False)
        ended = [t for t in trials if t.state in (S.COMPLETE, S.PRUNED)]
        row = {"point": name, "planned": opened.spec.trials, "finished": len(ended),
               "running": sum(t.state == S.RUNNING for t in trials),
               "waiting": sum(t.state == S.WAITING for t in trials),
               "failed_attempts": sum(t.state == S.FAIL for t in trials)}
        for status in TrialStatus:
            row[status.value] = sum(t.user_attrs.get("status") == status for t in ended)
        steps = [t.user_attrs["steps_to_result"] for t in ended if t.user_attrs.get("status") == TrialStatus.COMPLETE]
        row["k_star"] = min(steps) if steps else None
        row["packing"] = packing_summary(point.user_attrs.get("packing"))  # --pack's choice, if it ran
        rows.append(row)
    return rows


def outcomes(folder: str | Path, *, storage: str | None = None, study: str | None = None) -> list[TrialOutcome]:
    """Every finished trial of the study in ``folder`` (``storage``, ``study``: as
    :func:`work_loop`) as a :class:`TrialOutcome` (its validation curve from Optuna), points in
    spec order, plan order within a point. Raises SparsetrainError if a plan index holds two
    finished trials (a trial counted twice)."""
    import optuna

    S = optuna.trial.TrialState
    out = []
    with open_study(folder, storage=storage, study=study) as opened:
        for workload, batch_size, sparsity in opened.spec.points():
            name = point_name(workload.name, batch_size, sparsity)
            ended = [t for t in opened.point_study(workload, batch_size, sparsity).get_trials(deepcopy=False)
                     if t.state in (S.COMPLETE, S.PRUNED)]
            seen: set[int] = set()
            for t in sorted(ended, key=lambda t: t.user_attrs["plan_index"]):
                index = t.user_attrs["plan_index"]
                if index in seen:
                    raise SparsetrainError(f"{name}: plan index {index} has two finished trials; the study is "
                                           "inconsistent (please report this)")
                seen.add(index)
                curve = t.user_attrs.get("curve")
                if curve is None:  # a trial recorded before curves went to Optuna: its run in this folder
                    curve = RunStore(opened.folder / RUNS_DIR).metrics(t.user_attrs["run_key"], "val_error").get(
                        "val_error", [])
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
