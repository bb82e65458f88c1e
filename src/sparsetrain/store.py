"""The embedded run store: one SQLite file recording every training run, its group and metrics.

Layout under ``root``::

    root/runs.sqlite          tables ``groups``, ``runs`` and ``metrics`` (WAL mode)
    root/runs/<key>/          artifacts of one run (checkpoints, masks, ...), see RunStore.artifact_dir

A run is identified by ``key``, an opaque string (a hex hash of its results-relevant config,
computed elsewhere). Keys must be usable as a folder name: letters, digits, ``_``, ``-``, ``.``.
A run may belong to one group (a study, an experiment: :class:`RunGroup`) and may have a parent
run (the run it continues: the previous pruning round, the rewind point). Its status is one of
:class:`RunStatus`; docs/store.md has the schema, the statuses and the upgrade policy.

Every operation opens its own short-lived connection and closes it before returning, so a
RunStore holds no open resources, can be passed to worker processes, and several processes can
write to the same store at once (writers take the database lock up front and wait up to
60 s for each other).
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import importlib.metadata
import json
import math
import operator
import platform
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sparsetrain.errors import SparsetrainError

__all__ = [
    "DEFAULT_COLUMNS",
    "RESUMABLE_STATUSES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "TABLE_COLUMNS",
    "TERMINAL_STATUSES",
    "GroupSummary",
    "RunGroup",
    "RunRecord",
    "RunStatus",
    "RunStore",
    "current_versions",
    "format_runs_table",
]


class RunStatus(enum.StrEnum):
    """What became of a run: the one vocabulary, stored as its text value.

    Terminal (a complete result; ``begin`` refuses to start it again, re-run = delete + begin):
    FINISHED, STOPPED, INFEASIBLE. Resumable (``begin`` resumes it, keeping its metrics and
    artifacts): RUNNING, FAILED, INTERRUPTED.
    """

    RUNNING = "running"
    """Started and not ended. A process that died without a word leaves it so (its updated_at
    stops moving); ``begin`` resumes it."""
    FINISHED = "finished"
    """Trained to the end of its budget; results complete (a goal not reached is still finished)."""
    FAILED = "failed"
    """Ended by an error (its text in ``error``); resumable, e.g. after fixing the cause."""
    STOPPED = "stopped"
    """Ended early on purpose by a callback (e.g. goal error reached): a complete result."""
    INFEASIBLE = "infeasible"
    """Diverged (NaN or inf loss) and recorded as such instead of raising: a complete result, since
    the same config and seed diverge again."""
    INTERRUPTED = "interrupted"
    """Killed from outside (Ctrl-C, SIGTERM, preemption, a lost lease) and meant to resume:
    ``fail(key, why, status="interrupted")``."""


RUN_STATUSES: tuple[str, ...] = tuple(status.value for status in RunStatus)
TERMINAL_STATUSES: tuple[str, ...] = (RunStatus.FINISHED.value, RunStatus.STOPPED.value, RunStatus.INFEASIBLE.value)
RESUMABLE_STATUSES: tuple[str, ...] = (RunStatus.RUNNING.value, RunStatus.FAILED.value, RunStatus.INTERRUPTED.value)
_FAIL_STATUSES = (RunStatus.FAILED.value, RunStatus.INTERRUPTED.value)

SCHEMA_VERSION = 2
DB_NAME = "runs.sqlite"
_BUSY_TIMEOUT_S = 60.0
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_GROUP_KIND_RE = re.compile(r"[a-z][a-z0-9_\-]*")

# Each schema version's tables are frozen text: the current schema and the upgrade steps are
# built from them, so a later version adds _RUNS_V3 and leaves these (and the v1 -> v2 step) alone.
_GROUPS_V2 = """
CREATE TABLE groups (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (kind, name)
)"""
_RUNS_V2 = """
CREATE TABLE {table} (
    key            TEXT PRIMARY KEY,
    name           TEXT NOT NULL DEFAULT '',
    config         TEXT NOT NULL,
    seed           INTEGER NOT NULL,
    status         TEXT NOT NULL CHECK (status IN
                       ('running', 'finished', 'failed', 'stopped', 'infeasible', 'interrupted')),
    versions       TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    results        TEXT,
    layer_sparsity TEXT,
    timings        TEXT,
    error          TEXT,
    group_id       INTEGER REFERENCES groups (id),
    parent         TEXT
)"""
_RUNS_INDEXES_V2 = (
    "CREATE INDEX runs_created_at ON runs (created_at)",
    "CREATE INDEX runs_group_id ON runs (group_id)",
    "CREATE INDEX runs_parent ON runs (parent)",
)
_METRICS_V1 = """
CREATE TABLE metrics (
    key   TEXT NOT NULL,
    step  INTEGER NOT NULL,
    name  TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (key, step, name)
) WITHOUT ROWID"""
_SCHEMA = (_GROUPS_V2, _RUNS_V2.format(table="runs"), *_RUNS_INDEXES_V2, _METRICS_V1)

# v1 runs columns, the ones every version has.
_V1_RUN_COLUMNS = (
    "key, name, config, seed, status, versions, created_at, updated_at, "
    "results, layer_sparsity, timings, error"
)
_SELECT_RUNS = (
    "SELECT r.key, r.name, r.config, r.seed, r.status, r.versions, r.created_at, r.updated_at,"
    " r.results, r.layer_sparsity, r.timings, r.error, g.kind, g.name, r.parent"
    " FROM runs AS r LEFT JOIN groups AS g ON g.id = r.group_id"
)


def _upgrade_v1_to_v2(conn: sqlite3.Connection) -> None:
    """Add groups and parents, and widen the status CHECK to the new statuses.

    SQLite cannot alter a CHECK constraint, so ``runs`` is rebuilt the way SQLite documents
    (lang_altertable.html, "other kinds of table schema changes"): create the new table, copy the
    rows (rowid kept, so listing order is unchanged), drop the old one, rename, re-create indexes.
    ``metrics`` is untouched. The caller holds one write transaction around all of it.
    """
    conn.execute(_GROUPS_V2)
    conn.execute(_RUNS_V2.format(table="runs_v2"))
    conn.execute(
        f"INSERT INTO runs_v2 (rowid, {_V1_RUN_COLUMNS}) SELECT rowid, {_V1_RUN_COLUMNS} FROM runs"
    )
    conn.execute("DROP TABLE runs")  # drops its index runs_created_at too
    conn.execute("ALTER TABLE runs_v2 RENAME TO runs")
    for statement in _RUNS_INDEXES_V2:
        conn.execute(statement)


# from version -> the step that brings a store of that version to the next one.
_UPGRADES: dict[int, Callable[[sqlite3.Connection], None]] = {1: _upgrade_v1_to_v2}


@dataclasses.dataclass(frozen=True)
class RunGroup:
    """What a run belongs to: ``kind`` (a lowercase word: "study", "experiment", ...) and ``name``.

    Wherever a group is taken, a ``(kind, name)`` tuple works too.
    """

    kind: str
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not _GROUP_KIND_RE.fullmatch(self.kind):
            raise SparsetrainError(
                f"invalid group kind {self.kind!r}: use a lowercase word such as 'study' or 'experiment'"
            )
        if not isinstance(self.name, str) or not self.name:
            raise SparsetrainError(f"group name must be a non-empty str, got {self.name!r}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclasses.dataclass(frozen=True)
class GroupSummary:
    """One group with how many of its runs are in each status (every status, zeros included)."""

    kind: str
    name: str
    created_at: str
    counts: dict[str, int]

    @property
    def group(self) -> RunGroup:
        return RunGroup(self.kind, self.name)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One row of ``runs`` with its JSON columns decoded (``None`` where never set)."""

    key: str
    name: str
    config: dict[str, Any]
    seed: int
    status: str
    versions: dict[str, str]
    created_at: str
    updated_at: str
    results: dict[str, Any] | None = None
    layer_sparsity: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    error: str | None = None
    group_kind: str | None = None
    group_name: str | None = None
    parent: str | None = None

    @property
    def group(self) -> RunGroup | None:
        """The run's group, or None."""
        if self.group_kind is None or self.group_name is None:
            return None
        return RunGroup(self.group_kind, self.group_name)


def current_versions() -> dict[str, str]:
    """Versions of python, torch and sparsetrain in this process ("unknown" where not found)."""
    # Imported here so listing runs (CLI) does not pay torch's import time.
    import torch

    try:
        own = importlib.metadata.version("sparsetrain")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    return {"python": platform.python_version(), "torch": str(torch.__version__), "sparsetrain": own}


def _retry_locked(action, attempts: int = 100, pause: float = 0.1):
    """Switching to WAL needs an exclusive lock and does not wait on the busy timeout: two
    processes opening a fresh store at once would otherwise fail with "database is locked"."""
    for attempt in range(attempts):
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(pause)


class RunStore:
    """Runs, groups and metrics in ``root/runs.sqlite``; artifacts in ``root/runs/<key>/``.

    Creating a RunStore creates ``root`` and the database if missing, and upgrades a store written
    by an older sparsetrain in place (once, in one transaction; every run, metric and artifact is
    kept). Raises SparsetrainError if ``root/runs.sqlite`` exists but is not a SQLite database, or
    was written by a newer schema.

    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> store = RunStore(folder.name)
    >>> study = RunGroup("study", "kstar-lenet")
    >>> store.begin("r0", {"batch_size": 64}, seed=0, versions={}, group=study).status
    'running'
    >>> store.finish("r0", {"steps_to_goal": 1200}, status="stopped")  # goal error reached
    >>> store.begin("r1", {"batch_size": 64}, seed=0, versions={}, group=study, parent="r0").parent
    'r0'
    >>> [run.key for run in store.children("r0")], store.get("r1").group
    (['r1'], RunGroup(kind='study', name='kstar-lenet'))
    >>> summary, = store.groups()
    >>> summary.counts["stopped"], summary.counts["running"], summary.total
    (1, 1, 2)
    >>> folder.cleanup()
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SparsetrainError(f"cannot create run store folder {self.root}: {exc}") from exc
        self._init_schema()

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # ------------------------------------------------------------------ connections and schema

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection closed on exit; with ``write`` the body runs in one IMMEDIATE transaction.

        IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue on the busy timeout
        instead of failing when a read lock cannot be upgraded.
        """
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._db_error(exc) from exc
        try:
            # Off by default in SQLite and per connection; must be set outside a transaction.
            conn.execute("PRAGMA foreign_keys = ON")
            if write:
                conn.execute("BEGIN IMMEDIATE")
            yield conn
            if write:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise self._db_error(exc) from exc
        except BaseException:
            self._rollback(conn)
            raise
        finally:
            conn.close()

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _db_error(self, exc: sqlite3.Error) -> SparsetrainError:
        if getattr(exc, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            return SparsetrainError(
                f"{self.db_path} is not a SQLite database or is corrupt ({exc}); move it away or "
                f"delete it and sparsetrain will create a fresh run store there (its runs are lost)"
            )
        return SparsetrainError(f"run store {self.db_path}: {exc}")

    def _init_schema(self) -> None:
        with self._connect() as conn:
            # WAL lets readers (e.g. `sparsetrain runs`) work while a training process writes; the
            # setting is stored in the file, so this is a no-op after the first time.
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
        # One write transaction, so two processes opening a fresh (or old) store do not both create
        # (or upgrade) tables: the second waits for the lock, then finds the current version.
        with self._connect(write=True) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SparsetrainError(
                    f"{self.db_path} has schema version {version}, newer than this sparsetrain "
                    f"understands ({SCHEMA_VERSION}); upgrade sparsetrain or use another --store folder"
                )
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
            else:
                for old in range(version, SCHEMA_VERSION):
                    _UPGRADES[old](conn)
                problems = conn.execute("PRAGMA foreign_key_check").fetchall()
                if problems:  # cannot happen from our own steps; refuse rather than commit it
                    raise SparsetrainError(f"upgrading {self.db_path} broke references: {problems}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ------------------------------------------------------------------ artifacts

    def artifact_dir(self, key: str) -> Path:
        """``root/runs/<key>/`` for the run's checkpoints, masks etc., created if missing."""
        path = self._artifact_path(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _artifact_path(self, key: str) -> Path:
        return self.root / "runs" / _check_key(key)

    # ------------------------------------------------------------------ runs

    def get(self, key: str) -> RunRecord | None:
        """The run recorded under ``key``, or None."""
        with self._connect() as conn:
            return _fetch_record(conn, key)

    def begin(
        self,
        key: str,
        config: dict[str, Any],
        seed: int,
        name: str = "",
        versions: dict[str, str] | None = None,
        *,
        group: RunGroup | tuple[str, str] | None = None,
        parent: str | None = None,
    ) -> RunRecord:
        """Record that run ``key`` starts (or resumes) now; returns its record.

        A new key is inserted with status 'running'. An existing run in a resumable status
        ('running': crashed without a word; 'failed'; 'interrupted') is resumed: status back to
        'running', error cleared, name, config, seed and versions replaced by the given ones,
        created_at and metrics kept. ``versions`` defaults to :func:`current_versions`.

        ``group``: the study or experiment the run belongs to, a :class:`RunGroup` or a
        ``(kind, name)`` tuple, created on first use. ``parent``: the key of the run this one
        continues (previous pruning round, rewind point); it must already be in the store. On a
        resume, a group or parent given replaces the recorded one and ``None`` keeps it.

        Raises SparsetrainError if the run is already in a terminal status ('finished',
        'stopped', 'infeasible': delete it first to re-run it), if ``parent`` is unknown, is
        ``key`` itself or descends from ``key``.
        """
        _check_key(key)
        if not isinstance(name, str):
            raise SparsetrainError(f"run name must be a str, got {type(name).__name__}")
        run_group = _as_group(group)
        if parent is not None:
            _check_key(parent)
            if parent == key:
                raise SparsetrainError(f"run {key} cannot be its own parent")
        row = {
            "key": key,
            "name": name,
            "config": _dumps(config, "config"),
            "seed": _check_int(seed, "seed"),
            "versions": _dumps(current_versions() if versions is None else versions, "versions"),
            "now": _now(),
            "parent": parent,
            "group_id": None,
        }
        with self._connect(write=True) as conn:
            found = conn.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
            if found is not None and found[0] in TERMINAL_STATUSES:
                raise SparsetrainError(
                    f"run {key} is already {found[0]} (a complete result, not re-run); delete it "
                    f"(forced re-run) before starting it again"
                )
            if parent is not None:
                self._check_parent(conn, key, parent)
            if run_group is not None:
                row["group_id"] = _group_id(conn, run_group, row["now"])
            if found is None:
                conn.execute(
                    "INSERT INTO runs (key, name, config, seed, status, versions, created_at, updated_at,"
                    " group_id, parent) VALUES (:key, :name, :config, :seed, 'running', :versions, :now,"
                    " :now, :group_id, :parent)",
                    row,
                )
            else:
                conn.execute(
                    "UPDATE runs SET name = :name, config = :config, seed = :seed, status = 'running',"
                    " versions = :versions, updated_at = :now, error = NULL,"
                    " group_id = COALESCE(:group_id, group_id), parent = COALESCE(:parent, parent)"
                    " WHERE key = :key",
                    row,
                )
            return _fetch_record(conn, key)  # type: ignore[return-value]  # just written

    def _check_parent(self, conn: sqlite3.Connection, key: str, parent: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE key = ?", (parent,)).fetchone() is None:
            raise SparsetrainError(
                f"parent run {parent!r} of run {key!r} is not in the run store {self.root}; "
                f"begin the parent run first (parent = the key of the run this one continues)"
            )
        # Only a resumed run can already have children; a parent among them would make a cycle.
        cycle = conn.execute(
            "WITH RECURSIVE up(k) AS (SELECT ? UNION SELECT r.parent FROM runs AS r JOIN up ON r.key = up.k"
            " WHERE r.parent IS NOT NULL) SELECT 1 FROM up WHERE k = ?",
            (parent, key),
        ).fetchone()
        if cycle is not None:
            raise SparsetrainError(f"run {parent!r} descends from run {key!r}, so it cannot be its parent")

    def finish(
        self,
        key: str,
        results: dict[str, Any],
        layer_sparsity: dict[str, Any] | None = None,
        timings: dict[str, Any] | None = None,
        *,
        status: str = RunStatus.FINISHED,
    ) -> None:
        """Record run ``key``'s complete result (error cleared) with a terminal ``status``:

        'finished' (the whole budget), 'stopped' (ended early by a callback, e.g. goal reached)
        or 'infeasible' (diverged; say where in ``results``). Raises SparsetrainError if there is
        no such run or for any other status (use :meth:`fail` for 'failed' / 'interrupted').
        """
        if status not in TERMINAL_STATUSES:
            raise SparsetrainError(
                f"finish() records a complete result: status must be one of {', '.join(TERMINAL_STATUSES)},"
                f" got {status!r}; use fail() for {' or '.join(_FAIL_STATUSES)}"
            )
        self._update(
            key,
            "status = ?, results = ?, layer_sparsity = ?, timings = ?, error = NULL",
            (
                str(status),
                _dumps(results, "results"),
                _dumps_optional(layer_sparsity, "layer_sparsity"),
                _dumps_optional(timings, "timings"),
            ),
        )

    def fail(self, key: str, error: str, *, status: str = RunStatus.FAILED) -> None:
        """Mark run ``key`` 'failed' (or 'interrupted': killed, Ctrl-C) with the ``error`` text.

        Both resume on the next :meth:`begin`. Raises SparsetrainError if there is no such run
        or for any other status.
        """
        if status not in _FAIL_STATUSES:
            raise SparsetrainError(
                f"fail() records an unfinished run: status must be one of {', '.join(_FAIL_STATUSES)},"
                f" got {status!r}; use finish() for {', '.join(TERMINAL_STATUSES)}"
            )
        self._update(key, "status = ?, error = ?", (str(status), str(error)))

    def _update(self, key: str, assignments: str, params: tuple[Any, ...]) -> None:
        with self._connect(write=True) as conn:
            cursor = conn.execute(
                f"UPDATE runs SET {assignments}, updated_at = ? WHERE key = ?", (*params, _now(), key)
            )
            if cursor.rowcount == 0:
                raise _no_run(key)

    def delete(self, key: str) -> bool:
        """Remove run ``key``: its row, its metrics and its artifact folder. False if it was unknown.

        Its children keep ``parent = key`` (keys are content hashes: a re-run under the same key
        is the same parent again); its group stays, with one run fewer.
        """
        with self._connect(write=True) as conn:
            conn.execute("DELETE FROM metrics WHERE key = ?", (key,))
            existed = conn.execute("DELETE FROM runs WHERE key = ?", (key,)).rowcount > 0
        # After the commit: a crash in between leaves an orphan folder, which a re-run reuses,
        # rather than a recorded run whose artifacts are gone.
        folder = self._artifact_path(key)
        if folder.exists():
            shutil.rmtree(folder)
            existed = True
        return existed

    # ------------------------------------------------------------------ metrics

    def log_metrics(self, key: str, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (name -> value) of run ``key`` at ``step``, in one transaction.

        Re-logging a (step, name) overwrites it, so a resumed run never duplicates points. Values
        are stored as floats (nan is kept). Raises SparsetrainError if there is no such run.
        """
        step = _check_int(step, "step")
        if not isinstance(metrics, dict):
            raise SparsetrainError(f"metrics must be a dict of name -> float, got {type(metrics).__name__}")
        rows = [(key, step, _check_metric_name(name), _to_float(name, value)) for name, value in metrics.items()]
        with self._connect(write=True) as conn:
            # Also a heartbeat: a 'running' run whose updated_at is old has likely died.
            if conn.execute("UPDATE runs SET updated_at = ? WHERE key = ?", (_now(), key)).rowcount == 0:
                raise _no_run(key)
            conn.executemany(
                "INSERT INTO metrics (key, step, name, value) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key, step, name) DO UPDATE SET value = excluded.value",
                rows,
            )

    def metrics(self, key: str, name: str | None = None) -> dict[str, list[tuple[int, float]]]:
        """Metric series of run ``key``: name -> [(step, value), ...] sorted by step.

        Only ``name`` if given. Unknown runs or names give ``{}``.
        """
        sql = "SELECT name, step, value FROM metrics WHERE key = ?"
        params: tuple[Any, ...] = (key,)
        if name is not None:
            sql += " AND name = ?"
            params += (name,)
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY name, step", params).fetchall()
        series: dict[str, list[tuple[int, float]]] = {}
        for metric, step, value in rows:
            # SQLite stores NaN as NULL.
            series.setdefault(metric, []).append((step, math.nan if value is None else value))
        return series

    # ------------------------------------------------------------------ listing

    def list(
        self,
        name_pattern: str | None = None,
        status: str | Sequence[str] | None = None,
        *,
        group: RunGroup | tuple[str, str] | None = None,
        parent: str | None = None,
    ) -> list[RunRecord]:
        """Runs ordered by created_at (oldest first), optionally filtered.

        ``name_pattern`` is a case-sensitive shell-style glob on the run name (``"snip_*"``; a
        pattern without wildcards matches the name exactly); ``status`` one of RUN_STATUSES or a
        sequence of them (e.g. ``TERMINAL_STATUSES``); ``group`` a RunGroup or ``(kind, name)``;
        ``parent`` a run key (its children).
        """
        conditions: list[str] = []
        params: list[Any] = []
        if status is not None:
            wanted = (status,) if isinstance(status, str) else tuple(status)
            unknown = [s for s in wanted if s not in RUN_STATUSES]
            if unknown or not wanted:
                raise SparsetrainError(
                    f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}"
                )
            conditions.append(f"r.status IN ({', '.join('?' * len(wanted))})")
            params.extend(str(s) for s in wanted)
        run_group = _as_group(group)
        if run_group is not None:
            conditions.append("g.kind = ? AND g.name = ?")
            params.extend((run_group.kind, run_group.name))
        if parent is not None:
            conditions.append("r.parent = ?")
            params.append(parent)
        sql = _SELECT_RUNS + "".join(f" {'WHERE' if i == 0 else 'AND'} {c}" for i, c in enumerate(conditions))
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY r.created_at, r.rowid", params).fetchall()
        records = [_record(row) for row in rows]
        if name_pattern is not None:
            records = [r for r in records if fnmatch.fnmatchcase(r.name, name_pattern)]
        return records

    def children(self, key: str) -> list[RunRecord]:
        """The runs whose parent is ``key``, oldest first (``[]`` if none or no such run)."""
        return self.list(parent=key)

    def groups(self, kind: str | None = None) -> list[GroupSummary]:
        """Every group (of ``kind`` if given), oldest first, with its run counts per status."""
        sql = (
            "SELECT g.kind, g.name, g.created_at, r.status, COUNT(r.key) FROM groups AS g"
            " LEFT JOIN runs AS r ON r.group_id = g.id"
        )
        params: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE g.kind = ?"
            params = (kind,)
        with self._connect() as conn:
            rows = conn.execute(sql + " GROUP BY g.id, r.status ORDER BY g.created_at, g.id", params).fetchall()
        summaries: dict[tuple[str, str], GroupSummary] = {}
        for group_kind, group_name, created_at, status, count in rows:
            summary = summaries.setdefault(
                (group_kind, group_name),
                GroupSummary(group_kind, group_name, created_at, dict.fromkeys(RUN_STATUSES, 0)),
            )
            if status is not None:  # a group whose runs were all deleted
                summary.counts[status] = count
        return list(summaries.values())


# ----------------------------------------------------------------------------- helpers


def _fetch_record(conn: sqlite3.Connection, key: str) -> RunRecord | None:
    row = conn.execute(_SELECT_RUNS + " WHERE r.key = ?", (key,)).fetchone()
    return None if row is None else _record(row)


def _record(row: Sequence[Any]) -> RunRecord:
    key, name, config, seed, status, versions, created, updated, results, sparsity, timings, error, *rest = row
    group_kind, group_name, parent = rest
    return RunRecord(
        key=key,
        name=name,
        config=json.loads(config),
        seed=seed,
        status=status,
        versions=json.loads(versions),
        created_at=created,
        updated_at=updated,
        results=_loads_optional(results),
        layer_sparsity=_loads_optional(sparsity),
        timings=_loads_optional(timings),
        error=error,
        group_kind=group_kind,
        group_name=group_name,
        parent=parent,
    )


def _as_group(group: Any) -> RunGroup | None:
    if group is None or isinstance(group, RunGroup):
        return group
    if isinstance(group, (tuple, list)) and len(group) == 2:
        return RunGroup(*group)
    raise SparsetrainError(
        f"group must be a RunGroup or a (kind, name) tuple such as ('experiment', 'snip-table1'), got {group!r}"
    )


def _group_id(conn: sqlite3.Connection, group: RunGroup, now: str) -> int:
    """The id of ``group``, inserted first if new (inside the caller's write transaction)."""
    conn.execute(
        "INSERT INTO groups (kind, name, created_at) VALUES (?, ?, ?) ON CONFLICT (kind, name) DO NOTHING",
        (group.kind, group.name, now),
    )
    found = conn.execute("SELECT id FROM groups WHERE kind = ? AND name = ?", (group.kind, group.name))
    return found.fetchone()[0]


def _now() -> str:
    # Fixed width (microseconds, +00:00) so text order is time order.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _dumps(value: Any, what: str) -> str:
    if not isinstance(value, dict):
        raise SparsetrainError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        # allow_nan: a diverged run's results may hold nan; Python's json reads it back.
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise SparsetrainError(f"{what} must be JSON-serialisable: {exc}") from exc


def _dumps_optional(value: Any, what: str) -> str | None:
    return None if value is None else _dumps(value, what)


def _loads_optional(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _check_key(key: Any) -> str:
    # The key names a folder, so nothing that could escape root/runs/ or be hidden.
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or key.startswith("."):
        raise SparsetrainError(
            f"invalid run key {key!r}: use letters, digits, '_', '-' and '.' (not first)"
        )
    return key


def _check_int(value: Any, what: str) -> int:
    # operator.index accepts int-like values (numpy ints) but not floats; bool is an int by accident.
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise SparsetrainError(f"{what} must be an int, got {value!r}") from None


def _check_metric_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise SparsetrainError(f"metric names must be non-empty str, got {name!r}")
    return name


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, (str, bytes)):
        raise SparsetrainError(f"metric {name!r} must be a number, got {value!r}")
    try:
        return float(value)  # also numpy scalars and one-element tensors
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SparsetrainError(f"metric {name!r} must be a number, got {value!r}") from exc


def _no_run(key: str) -> SparsetrainError:
    return SparsetrainError(f"no run {key!r} in the run store; call begin() first")


# ----------------------------------------------------------------------------- table

_CONFIG_COLUMNS = ("model", "dataset", "method", "sparsity")
_PERCENT_COLUMNS = ("test_error_final", "test_error_best_val")
DEFAULT_COLUMNS = (
    "key", "name", *_CONFIG_COLUMNS, "seed", "status", *_PERCENT_COLUMNS, "created_at", "updated_at",
)  # fmt: skip
# Shown on request (``columns=``), not by default.
TABLE_COLUMNS = (*DEFAULT_COLUMNS, "group", "parent")
_RIGHT_ALIGNED = frozenset({"sparsity", "seed", *_PERCENT_COLUMNS})
_MISSING = "-"


def format_runs_table(records: Sequence[RunRecord], columns: Sequence[str] | None = None) -> str:
    """An aligned markdown pipe table of ``records``, one row each, headed by the column names.

    Columns (default: DEFAULT_COLUMNS, in this order): key (first 10 chars), name, model,
    dataset, method, sparsity (from the config, see below), seed, status, test_error_final and
    test_error_best_val (results entries, taken as fractions and shown as percentages with two
    decimals, e.g. ``7.53%``), created_at and updated_at (``YYYY-MM-DD HH:MM:SS``, UTC; a running
    run updates it at every logged metric, so a 'running' run whose updated_at has stopped moving
    died, and resumes when run again). Also available (TABLE_COLUMNS): group (``kind:name``)
    and parent (its first 10 chars). Statuses show as stored (RUN_STATUSES). Missing values show
    as ``-``. A config entry is looked up at the top level, else in nested dicts; a dict value
    shows its ``name`` entry. Raises SparsetrainError for unknown column names.
    """
    columns = tuple(DEFAULT_COLUMNS if columns is None else columns)
    unknown = [c for c in columns if c not in TABLE_COLUMNS]
    if unknown:
        raise SparsetrainError(f"unknown run table columns {unknown}; choose from {', '.join(TABLE_COLUMNS)}")
    rows = [[_cell(record, column).replace("|", "\\|") for column in columns] for record in records]
    widths = [max([len(column), 3, *(len(row[i]) for row in rows)]) for i, column in enumerate(columns)]
    right = [column in _RIGHT_ALIGNED for column in columns]
    lines = [
        _table_line([c.ljust(w) for c, w in zip(columns, widths)]),
        _table_line(["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right)]),
    ]
    for row in rows:
        lines.append(_table_line([c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]))
    return "\n".join(lines)


def _table_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(record: RunRecord, column: str) -> str:
    if column == "key":
        return record.key[:10]
    if column == "name":
        return record.name or _MISSING
    if column == "seed":
        return str(record.seed)
    if column == "status":
        return record.status
    if column == "group":
        return _MISSING if record.group is None else str(record.group)
    if column == "parent":
        return _MISSING if record.parent is None else record.parent[:10]
    if column in ("created_at", "updated_at"):
        return getattr(record, column)[:19].replace("T", " ")
    if column in _PERCENT_COLUMNS:
        return _percent((record.results or {}).get(column))
    return _show(_config_value(record.config, column))


def _config_value(config: Any, key: str) -> Any:
    """``config[key]``, else the first ``key`` entry found breadth-first in nested dicts."""
    pending = [config]
    while pending:
        node = pending.pop(0)
        if not isinstance(node, dict):
            continue
        if key in node:
            return node[key]
        pending.extend(node.values())
    return None


def _show(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, dict):
        return _show(value.get("name"))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _percent(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _MISSING
    return f"{100 * value:.2f}%"
