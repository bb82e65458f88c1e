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
60 s for each other). Reads open the file read-only, so a store the user may read but not write
can still be listed.

A run being trained holds a **lease** (:meth:`RunStore.take_lease`): one row per key saying which
process (host, pid) trains it, renewed by a heartbeat thread. A second process starting the same
run is refused (or waits), so one run trains once; a lease whose heartbeat stopped (the process was
killed) goes stale and is taken over. Damage to the file is survivable: listing reads row by row
past unreadable pages and names what it could not read, and :meth:`RunStore.check` finds damage
and salvages the readable rows into a fresh file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fnmatch
import getpass
import importlib.metadata
import json
import math
import operator
import os
import platform
import re
import shutil
import socket
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sparsetrain import fsio
from sparsetrain.errors import SparsetrainError

__all__ = [
    "DEFAULT_COLUMNS",
    "LEASE_HEARTBEAT_S",
    "LEASE_STALE_S",
    "RESUMABLE_STATUSES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "TABLE_COLUMNS",
    "TERMINAL_STATUSES",
    "GroupSummary",
    "HeldLease",
    "Lease",
    "RunGroup",
    "RunRecord",
    "RunStatus",
    "RunList",
    "RunStore",
    "StoreCheck",
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

SCHEMA_VERSION = 3
DB_NAME = "runs.sqlite"
_BUSY_TIMEOUT_S = 60.0

LEASE_HEARTBEAT_S = 10.0
"""Seconds between two heartbeats of a held lease (a daemon thread renews it)."""
LEASE_STALE_S = 60.0
"""A lease whose last heartbeat is older than this is stale: its holder is taken to be dead."""
LEASE_POLL_S = 1.0
"""How often ``take_lease(..., wait=True)`` looks whether the holder has let go."""
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
_LEASES_V3 = """
CREATE TABLE leases (
    key        TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    token      TEXT NOT NULL,
    started_at TEXT NOT NULL,
    beat_at    TEXT NOT NULL,
    beat_unix  REAL NOT NULL
)"""
_SCHEMA = (_GROUPS_V2, _RUNS_V2.format(table="runs"), *_RUNS_INDEXES_V2, _METRICS_V1, _LEASES_V3)

# v1 runs columns, the ones every version has.
_V1_RUN_COLUMNS = (
    "key, name, config, seed, status, versions, created_at, updated_at, "
    "results, layer_sparsity, timings, error"
)
_SELECT_RUNS = (
    "SELECT r.key, r.name, r.config, r.seed, r.status, r.versions, r.created_at, r.updated_at,"
    " r.results, r.layer_sparsity, r.timings, r.error, g.kind, g.name, r.parent,"
    " l.host, l.pid, l.token, l.started_at, l.beat_at, l.beat_unix"
    " FROM runs AS r LEFT JOIN groups AS g ON g.id = r.group_id LEFT JOIN leases AS l ON l.key = r.key"
)
_SELECT_LEASE = "SELECT key, host, pid, token, started_at, beat_at, beat_unix FROM leases WHERE key = ?"


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


def _upgrade_v2_to_v3(conn: sqlite3.Connection) -> None:
    """Add ``leases`` (which process trains which run); no existing table changes."""
    conn.execute(_LEASES_V3)


# from version -> the step that brings a store of that version to the next one.
_UPGRADES: dict[int, Callable[[sqlite3.Connection], None]] = {1: _upgrade_v1_to_v2, 2: _upgrade_v2_to_v3}


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
    lease: Lease | None = None
    """Who trains the run now (None: nobody). A 'running' run whose lease is stale (its process
    was killed) is returned with status 'interrupted': it resumes when started again."""

    @property
    def group(self) -> RunGroup | None:
        """The run's group, or None."""
        if self.group_kind is None or self.group_name is None:
            return None
        return RunGroup(self.group_kind, self.group_name)


class RunList(list):
    """The records :meth:`RunStore.list` could read (a plain list of RunRecord) and, where the
    file is damaged, ``unreadable``: the keys (or ``rowid N`` where even the key is lost) of the
    rows it could not read. ``damage()`` words them with what to do; ``""`` when all was read."""

    def __init__(self, records: Sequence[RunRecord] = (), unreadable: Sequence[str] = (), db_path: Any = None):
        super().__init__(records)
        self.unreadable: list[str] = list(unreadable)
        self.db_path = db_path

    def damage(self) -> str:
        if not self.unreadable:
            return ""
        return (
            f"{len(self.unreadable)} run(s) in {self.db_path} could not be read (the file is damaged): "
            f"{', '.join(self.unreadable)}; the others are listed. Run `sparsetrain runs check --repair` "
            f"(RunStore.check(repair=True)) to copy every readable run into a fresh file, keeping the "
            f"damaged one beside it; unreadable runs train again when started again"
        )


# ----------------------------------------------------------------------------- leases

_HOST = socket.gethostname()
# Tokens of the leases this process holds now: a lease row naming this host and pid whose token is
# not among them was left by an earlier holder in this process that could not release it (e.g. on
# a full disk), so it is stale.
_HELD_TOKENS: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Lease:
    """A row of ``leases``: the process (``host``, ``pid``) training run ``key`` since
    ``started_at``, last heard from at ``beat_at`` (UTC ISO-8601; ``beat_unix`` in seconds)."""

    key: str
    host: str
    pid: int
    token: str
    started_at: str
    beat_at: str
    beat_unix: float

    @property
    def stale(self) -> bool:
        """True when the holder is taken to be dead: no heartbeat for LEASE_STALE_S seconds, or
        it was on this host and its pid is gone (or is this process, which no longer holds it)."""
        if time.time() - self.beat_unix > LEASE_STALE_S:
            return True
        if self.host != _HOST:
            return False
        if self.pid == os.getpid():
            return self.token not in _HELD_TOKENS
        return not _pid_alive(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started_at[:19].replace('T', ' ')} UTC"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except OSError:
        return True
    return True


def _lease_from(row: Sequence[Any]) -> Lease | None:
    if row is None or row[1] is None:
        return None
    return Lease(*row)


class HeldLease:
    """A lease this process holds (from :meth:`RunStore.take_lease`): a daemon thread renews it
    every LEASE_HEARTBEAT_S seconds until :meth:`release`. Also a context manager (releases on exit).

    If a heartbeat finds the lease taken over (this process stalled past LEASE_STALE_S and another
    took the run), ``lost`` says so and :meth:`check` raises: the run must stop and write nothing.
    """

    def __init__(self, store: RunStore, key: str, token: str) -> None:
        self.store, self.key, self.token = store, key, token
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"sparsetrain-lease-{key}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_S):
            try:
                holder = self.store._renew_lease(self.key, self.token)
            except Exception:  # a busy or full disk: try again at the next beat; staleness is the limit
                continue
            if holder is not True:
                self.lost = (
                    f"run {self.key} was taken over by "
                    + (holder.describe() if isinstance(holder, Lease) else "another process")
                    + f" after this process missed its heartbeats for {LEASE_STALE_S:g} s; this process "
                    "stops so that the run trains once"
                )
                return

    def check(self) -> None:
        """Raise SparsetrainError if the lease was lost (see the class docstring)."""
        if self.lost is not None:
            raise SparsetrainError(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease row (if still ours). A release that fails (full
        disk) leaves a row that reads as stale, since this process no longer holds its token."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        try:
            if self.lost is None:
                self.store._release_lease(self.key, self.token)
        finally:
            _HELD_TOKENS.discard(self.token)

    def __enter__(self) -> HeldLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------- check and repair


@dataclasses.dataclass
class StoreCheck:
    """What :meth:`RunStore.check` found: ``ok`` (no damage), ``unreadable`` (run keys, or
    ``rowid N`` where the key is lost too), ``problems`` (SQLite's integrity_check lines and what
    could not be read), and after a repair the fresh file's counts and where the damaged one went."""

    ok: bool
    unreadable: list[str]
    problems: list[str]
    db_path: Path
    repaired: bool = False
    damaged_copy: Path | None = None
    salvaged_runs: int = 0
    salvaged_metrics: int = 0

    def report(self) -> str:
        """Human-readable lines: the verdict, what is damaged, what a repair did or would do."""
        if self.ok:
            return f"{self.db_path}: no damage found (integrity check ok, every run readable)"
        lines = [f"{self.db_path}: damaged"]
        if self.unreadable:
            lines.append(f"unreadable runs ({len(self.unreadable)}): {', '.join(self.unreadable)}")
        shown = self.problems[:20]
        lines += [f"  {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        if self.repaired:
            lines.append(
                f"repaired: {self.salvaged_runs} run(s) and {self.salvaged_metrics} metric point(s) copied into a "
                f"fresh {self.db_path.name}; the damaged file is kept as {self.damaged_copy}; unreadable runs "
                f"train again when started again (their artifacts are kept)"
            )
        else:
            lines.append(
                "repair with `sparsetrain runs check --repair` (RunStore.check(repair=True)): it copies every "
                "readable run into a fresh file and keeps the damaged one beside it"
            )
        return "\n".join(lines)


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
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise self._not_writable(f"cannot create the folder ({exc.strerror})") from exc
            raise SparsetrainError(f"cannot create run store folder {self.root}: {exc}") from exc
        self._init_schema()

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # ------------------------------------------------------------------ connections and schema

    @contextmanager
    def _connect(self, write: bool = False, *, fault: bool = True) -> Iterator[sqlite3.Connection]:
        """A connection closed on exit; with ``write`` the body runs in one IMMEDIATE transaction.

        IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue on the busy timeout
        instead of failing when a read lock cannot be upgraded. A failed write rolls back whole, so
        no half-written record is kept. Without ``write`` the file is opened read-only. Each write
        transaction first asks :func:`fsio.check_fault` (site "store"; ``fault=False`` for the
        lease heartbeat, whose timing would make fault tests count writes unpredictably).
        """
        if write and fault:
            try:
                fsio.check_fault("store")
            except OSError as exc:
                raise fsio.write_error(exc, self.db_path, "run store") from exc
        try:
            conn = self._open(write)
        except sqlite3.Error as exc:
            raise self._db_error(exc, write) from exc
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
            raise self._db_error(exc, write) from exc
        except BaseException:
            self._rollback(conn)
            raise
        finally:
            conn.close()

    def _open(self, write: bool) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        if write:
            return sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        uri = "file:" + urllib.parse.quote(str(self.db_path.absolute())) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return conn
        except sqlite3.OperationalError:
            # A WAL file needs its -shm index, which a reader creates; in a folder the user may
            # not write it cannot. Without a -wal file (every writer closed cleanly, which
            # checkpoints it into the main file) the main file is the whole database, and
            # immutable=1 reads it without the index. With a -wal file that cannot be indexed
            # there is no correct read: the error stands.
            if os.access(self.root, os.W_OK):
                raise
            if _nonempty(self.db_path.with_name(DB_NAME + "-wal")):
                raise SparsetrainError(
                    f"cannot read the run store {self.root}: a process is writing it (or one that was "
                    f"writing it died), and reading it then needs write access to the folder, which you "
                    f"(user {_user()}) do not have; wait until that run ends, or ask the owner for access"
                ) from None
            return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _db_error(self, exc: sqlite3.Error, write: bool = True) -> SparsetrainError:
        name = getattr(exc, "sqlite_errorname", "")
        if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "malformed" in str(exc):
            return SparsetrainError(
                f"{self.db_path} is not a SQLite database or is damaged ({exc}); `sparsetrain runs check "
                f"--repair` copies every readable run into a fresh file and keeps the damaged one beside it "
                f"(or move it away or delete it, and sparsetrain creates a fresh, empty run store there)"
            )
        if name == "SQLITE_FULL" or "disk is full" in str(exc):
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return fsio.write_error(full, self.db_path, "run store")
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")) and not self._writable():
            if not write and not self.db_path.exists():
                return SparsetrainError(f"no run store in {self.root} ({DB_NAME} is missing): nothing recorded there")
            return self._not_writable(exc)
        return SparsetrainError(f"run store {self.db_path}: {exc}")

    def _writable(self) -> bool:
        files = [self.db_path, *(self.db_path.with_name(DB_NAME + s) for s in ("-wal", "-shm"))]
        return os.access(self.root, os.W_OK | os.X_OK) and all(
            os.access(f, os.R_OK | os.W_OK) for f in files if f.exists()
        )

    def _not_writable(self, cause: Any) -> SparsetrainError:
        readable = self.db_path.exists() and os.access(self.db_path, os.R_OK)
        return SparsetrainError(
            f"the run store {self.root} is not writable by you (user {_user()}): {cause}; "
            + ("reading it (sparsetrain runs) works, but training records into it: " if readable else "")
            + "ask its owner for write access, or pass --store (or set SPARSETRAIN_HOME) to a folder of your own"
        )

    def _init_schema(self) -> None:
        # Read-only first: a current store needs no write, so one the user may only read opens.
        if self.db_path.exists():
            try:
                with self._connect() as conn:
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    journal = conn.execute("PRAGMA journal_mode").fetchone()[0].lower()
            except SparsetrainError:
                version, journal = None, None  # let the write path below word the error
            if version is not None and version > SCHEMA_VERSION:
                raise self._newer(version)
            # (Read through immutable=1, see _open, the journal mode reads 'delete': WAL is
            # only set by a writer, and a user who may not write needs nothing more to read.)
            if version == SCHEMA_VERSION and (journal == "wal" or not self._writable()):
                return
        elif not os.access(self.root, os.W_OK | os.X_OK):
            raise self._not_writable(f"cannot create {DB_NAME} there")
        # WAL lets readers (e.g. `sparsetrain runs`) work while a training process writes; the
        # setting is stored in the file, so this is a no-op after the first time.
        self._set_wal()
        # One write transaction, so two processes opening a fresh (or old) store do not both create
        # (or upgrade) tables: the second waits for the lock, then finds the current version.
        with self._connect(write=True, fault=False) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise self._newer(version)
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

    def _set_wal(self) -> None:
        try:
            conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._db_error(exc) from exc
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
        except sqlite3.Error as exc:
            raise self._db_error(exc) from exc
        finally:
            conn.close()

    def _newer(self, version: int) -> SparsetrainError:
        return SparsetrainError(
            f"{self.db_path} has schema version {version}, newer than this sparsetrain "
            f"understands ({SCHEMA_VERSION}); upgrade sparsetrain or use another --store folder"
        )

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

    # ------------------------------------------------------------------ leases

    def take_lease(self, key: str, *, wait: bool = False) -> HeldLease:
        """Take the lease on run ``key`` for this process: only its holder trains the run.

        Taken atomically (one IMMEDIATE transaction) if nobody holds it or its holder's lease is
        stale (see :attr:`Lease.stale`: a killed process's lease is taken over). While another
        process holds a fresh lease: with ``wait`` poll every LEASE_POLL_S seconds until it is
        released or goes stale, else raise SparsetrainError naming the holder. Returns a
        :class:`HeldLease` whose heartbeat thread runs until ``release()``.
        """
        _check_key(key)
        while True:
            token = uuid.uuid4().hex
            _HELD_TOKENS.add(token)  # before the commit: a thread of this process must see it held
            try:
                holder = self._try_lease(key, token)
            except BaseException:
                _HELD_TOKENS.discard(token)
                raise
            if holder is None:
                return HeldLease(self, key, token)
            _HELD_TOKENS.discard(token)
            if not wait:
                raise SparsetrainError(
                    f"run {key} is being trained by {holder.describe()}; wait for it, or pass --wait "
                    f"(run(..., wait=True)) to wait and then take its result"
                )
            time.sleep(LEASE_POLL_S)

    def _try_lease(self, key: str, token: str) -> Lease | None:
        """Take the lease (returns None) unless a fresh one is held (returns it)."""
        with self._connect(write=True) as conn:
            holder = _lease_from(conn.execute(_SELECT_LEASE, (key,)).fetchone())
            if holder is not None and not holder.stale:
                return holder
            now = _now()
            conn.execute(
                "INSERT OR REPLACE INTO leases (key, host, pid, token, started_at, beat_at, beat_unix)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, _HOST, os.getpid(), token, now, now, time.time()),
            )
            return None

    def _renew_lease(self, key: str, token: str) -> bool | Lease | None:
        """One heartbeat: True if still ours, else the lease that replaced it (None if gone)."""
        with self._connect(write=True, fault=False) as conn:
            renewed = conn.execute(
                "UPDATE leases SET beat_at = ?, beat_unix = ? WHERE key = ? AND token = ?",
                (_now(), time.time(), key, token),
            ).rowcount
            if renewed:
                return True
            return _lease_from(conn.execute(_SELECT_LEASE, (key,)).fetchone())

    def _release_lease(self, key: str, token: str) -> None:
        with self._connect(write=True) as conn:
            conn.execute("DELETE FROM leases WHERE key = ? AND token = ?", (key, token))

    def lease(self, key: str) -> Lease | None:
        """The lease recorded for run ``key`` (fresh or stale), or None if nobody holds it."""
        with self._connect() as conn:
            return _lease_from(conn.execute(_SELECT_LEASE, (key,)).fetchone())

    # ------------------------------------------------------------------ damage

    def check(self, repair: bool = False) -> StoreCheck:
        """Look for damage: SQLite's ``PRAGMA integrity_check`` plus a read of every run and metric.

        With ``repair`` and damage found, every readable group, run (rowid kept, so the order is
        unchanged) and metric point is copied into a fresh file, which replaces ``runs.sqlite``;
        the damaged file is kept beside it as ``runs.sqlite.damaged-<UTC time>`` (with its -wal).
        Leases are not copied (stop the runs using this store before repairing). Artifact folders
        are untouched. Unreadable runs are simply absent from the repaired store: started again,
        they train again (from their checkpoint, which is still in their folder).
        """
        problems: list[str] = []
        unreadable: list[str] = []
        try:
            with self._connect() as conn:
                try:
                    lines = [row[0] for row in conn.execute("PRAGMA integrity_check")]
                except sqlite3.DatabaseError as exc:
                    lines = [f"integrity_check failed: {exc}"]
                problems += [line for line in lines if line != "ok"]
                try:
                    for row in conn.execute(_SELECT_RUNS):
                        _record(row)
                except (sqlite3.DatabaseError, ValueError) as exc:
                    if not _is_damage(exc):
                        raise
                    _, unreadable = _read_row_by_row(conn, "", ())
                    problems.append(f"runs table: {exc}")
                try:
                    conn.execute("SELECT count(*), sum(length(name)) FROM metrics").fetchall()
                except sqlite3.DatabaseError as exc:
                    problems.append(f"metrics table: {exc}")
        except SparsetrainError as exc:  # the header or schema is unreadable: nothing can be read
            problems.append(str(exc.__cause__ or exc))
        result = StoreCheck(ok=not problems and not unreadable, unreadable=unreadable, problems=problems,
                            db_path=self.db_path)
        if repair and not result.ok:
            self._repair(result)
        return result

    def _repair(self, result: StoreCheck) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        fresh_path = self.root / f".{DB_NAME}.repair-{stamp}"
        fresh_path.unlink(missing_ok=True)
        try:
            fsio.check_fault("store")
            fresh = sqlite3.connect(fresh_path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise fsio.write_error(exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc)),
                                   fresh_path, "run store") from exc
        try:
            fresh.execute("PRAGMA journal_mode=WAL")
            fresh.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                fresh.execute(statement)
            fresh.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            try:
                damaged = self._open(write=False)
            except sqlite3.Error as exc:
                raise SparsetrainError(f"cannot read {self.db_path} at all ({exc}); nothing to salvage: move it away") from exc
            try:
                result.salvaged_runs, result.salvaged_metrics = _salvage(damaged, fresh, result.problems)
            finally:
                damaged.close()
            fresh.execute("COMMIT")
        except sqlite3.Error as exc:
            fresh.close()
            fresh_path.unlink(missing_ok=True)
            raise self._db_error(exc) from exc
        except BaseException:
            fresh.close()
            fresh_path.unlink(missing_ok=True)
            raise
        fresh.close()  # the last connection to close checkpoints the WAL into the file
        kept = self.root / f"{DB_NAME}.damaged-{stamp}"
        for suffix in ("-wal", "-shm"):
            side = self.db_path.with_name(DB_NAME + suffix)
            if side.exists():
                os.replace(side, kept.with_name(kept.name + suffix))
        os.replace(self.db_path, kept)
        os.replace(fresh_path, self.db_path)
        result.repaired, result.damaged_copy = True, kept

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
        """Runs ordered by created_at (oldest first), optionally filtered: a :class:`RunList`.

        ``name_pattern`` is a case-sensitive shell-style glob on the run name (``"snip_*"``; a
        pattern without wildcards matches the name exactly); ``status`` one of RUN_STATUSES or a
        sequence of them (e.g. ``TERMINAL_STATUSES``); ``group`` a RunGroup or ``(kind, name)``;
        ``parent`` a run key (its children). A 'running' run whose lease is stale counts as
        'interrupted' (see RunRecord.lease).

        If part of the file is damaged, the runs that can be read are returned and the others are
        named in the result's ``unreadable`` (``damage()`` words it, with how to repair).
        """
        conditions: list[str] = []
        params: list[Any] = []
        wanted: tuple[str, ...] | None = None
        if status is not None:
            wanted = (status,) if isinstance(status, str) else tuple(status)
            unknown = [s for s in wanted if s not in RUN_STATUSES]
            if unknown or not wanted:
                raise SparsetrainError(
                    f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}"
                )
            stored = set(wanted) | ({RunStatus.RUNNING.value} if RunStatus.INTERRUPTED in wanted else set())
            conditions.append(f"r.status IN ({', '.join('?' * len(stored))})")
            params.extend(sorted(stored))
        run_group = _as_group(group)
        if run_group is not None:
            conditions.append("g.kind = ? AND g.name = ?")
            params.extend((run_group.kind, run_group.name))
        if parent is not None:
            conditions.append("r.parent = ?")
            params.append(parent)
        where = "".join(f" {'WHERE' if i == 0 else 'AND'} {c}" for i, c in enumerate(conditions))
        unreadable: list[str] = []
        with self._connect() as conn:
            try:
                records = [_record(row) for row in conn.execute(_SELECT_RUNS + where + " ORDER BY r.created_at, r.rowid", params)]
                if _rows_missing_from_scan(conn):  # a page SQLite reads without an error but misses rows of
                    raise sqlite3.DatabaseError("database disk image is malformed (rows missing from a scan)")
            except (sqlite3.DatabaseError, ValueError) as exc:
                if not _is_damage(exc):
                    raise
                records, unreadable = _read_row_by_row(conn, where, params)
        if wanted is not None:
            records = [r for r in records if r.status in wanted]
        if name_pattern is not None:
            records = [r for r in records if fnmatch.fnmatchcase(r.name, name_pattern)]
        return RunList(records, unreadable, self.db_path)

    def children(self, key: str) -> list[RunRecord]:
        """The runs whose parent is ``key``, oldest first (``[]`` if none or no such run)."""
        return self.list(parent=key)

    def groups(self, kind: str | None = None) -> list[GroupSummary]:
        """Every group (of ``kind`` if given), oldest first, with its run counts per status (a
        'running' run whose lease is stale counts as 'interrupted', as in :meth:`list`)."""
        sql = (
            "SELECT g.id, g.kind, g.name, g.created_at, r.status, COUNT(r.key) FROM groups AS g"
            " LEFT JOIN runs AS r ON r.group_id = g.id"
        )
        stale_sql = (
            "SELECT r.group_id, l.key, l.host, l.pid, l.token, l.started_at, l.beat_at, l.beat_unix"
            " FROM runs AS r JOIN leases AS l ON l.key = r.key JOIN groups AS g ON g.id = r.group_id"
            " WHERE r.status = 'running'"
        )
        params: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE g.kind = ?"
            stale_sql += " AND g.kind = ?"
            params = (kind,)
        with self._connect() as conn:
            rows = conn.execute(sql + " GROUP BY g.id, r.status ORDER BY g.created_at, g.id", params).fetchall()
            leased = conn.execute(stale_sql, params).fetchall()
        summaries: dict[int, GroupSummary] = {}
        for group_id, group_kind, group_name, created_at, status, count in rows:
            summary = summaries.setdefault(
                group_id, GroupSummary(group_kind, group_name, created_at, dict.fromkeys(RUN_STATUSES, 0))
            )
            if status is not None:  # a group whose runs were all deleted
                summary.counts[status] = count
        for group_id, *lease_row in leased:
            if group_id in summaries and Lease(*lease_row).stale:
                summaries[group_id].counts[RunStatus.RUNNING.value] -= 1
                summaries[group_id].counts[RunStatus.INTERRUPTED.value] += 1
        return list(summaries.values())


# ----------------------------------------------------------------------------- helpers


def _is_damage(exc: BaseException) -> bool:
    """A damaged page (SQLITE_CORRUPT: "database disk image is malformed") or a row whose JSON
    columns were garbled (json.JSONDecodeError is a ValueError)."""
    if isinstance(exc, ValueError):
        return True
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith("SQLITE_CORRUPT") or "malformed" in str(exc)


def _rows_missing_from_scan(conn: sqlite3.Connection) -> bool:
    """Whether the key index lists a run that a scan of the table does not: the mark of a page
    whose header survived but whose cell pointers were overwritten (SQLite then scans it without
    an error). Two scans of small b-trees; a damaged index raises, which also counts as damage."""
    indexed = conn.execute("SELECT rowid FROM runs INDEXED BY sqlite_autoindex_runs_1").fetchall()
    scanned = conn.execute("SELECT rowid FROM runs NOT INDEXED").fetchall()
    return {r for (r,) in indexed} != {r for (r,) in scanned}


def _run_rowids(conn: sqlite3.Connection) -> tuple[list[tuple[int, str | None]], list[str]]:
    """(rowid, key) of every run, read from an index when the table's own pages are damaged.

    The key index (``sqlite_autoindex_runs_1``) holds every key with its rowid; a damaged table
    page does not touch it. If it is damaged too, the created_at index gives the rowids (keys
    unknown); if that fails, rowid ranges are probed and the unreadable ones named.
    """
    for sql in (
        "SELECT rowid, key FROM runs INDEXED BY sqlite_autoindex_runs_1",
        "SELECT rowid, NULL FROM runs INDEXED BY runs_created_at",
    ):
        try:
            return list(conn.execute(sql)), []
        except sqlite3.DatabaseError:
            continue
    return _probe_rowids(conn)


def _probe_rowids(conn: sqlite3.Connection) -> tuple[list[tuple[int, str | None]], list[str]]:
    """Bisect rowid ranges: readable ranges give their rows, unreadable ones shrink to single
    rowids, reported as ``rowid N``-``M`` spans."""
    try:
        top = conn.execute("SELECT max(rowid) FROM runs").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        top = 1 << 20
    found: list[tuple[int, str | None]] = []
    bad: list[tuple[int, int]] = []
    pending = [(1, max(top, 1))]
    while pending:
        low, high = pending.pop()
        try:
            found += conn.execute("SELECT rowid, NULL FROM runs WHERE rowid BETWEEN ? AND ?", (low, high)).fetchall()
        except sqlite3.DatabaseError:
            if low == high or len(bad) > 10_000:
                bad.append((low, high))
            else:
                middle = (low + high) // 2
                pending += [(low, middle), (middle + 1, high)]
    spans: list[list[int]] = []
    for low, high in sorted(bad):
        if spans and low == spans[-1][1] + 1:
            spans[-1][1] = high
        else:
            spans.append([low, high])
    return sorted(found), [f"rowid {a}" if a == b else f"rowids {a}-{b}" for a, b in spans]


def _read_row_by_row(conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> tuple[list[RunRecord], list[str]]:
    """The readable runs matching ``where`` (oldest first) and the names of the unreadable ones."""
    rowids, unreadable = _run_rowids(conn)
    records: list[tuple[str, int, RunRecord]] = []
    condition = where.replace(" WHERE ", " AND ", 1) if where else ""
    for rowid, key in rowids:
        try:
            row = conn.execute(_SELECT_RUNS + " WHERE r.rowid = ?" + condition, (rowid, *params)).fetchone()
            if row is not None:
                record = _record(row)
                if key is not None and record.key != key:  # a garbled page pointing at another row
                    raise sqlite3.DatabaseError(f"database disk image is malformed (rowid {rowid} reads as another run)")
                records.append((record.created_at, rowid, record))
            elif conn.execute("SELECT 1 FROM runs WHERE rowid = ?", (rowid,)).fetchone() is None:
                raise sqlite3.DatabaseError(f"database disk image is malformed (rowid {rowid} is in the index only)")
        except (sqlite3.DatabaseError, ValueError) as exc:
            if not _is_damage(exc):
                raise
            unreadable.append(key if key is not None else f"rowid {rowid}")
    return [r for _, _, r in sorted(records, key=lambda t: (t[0], t[1]))], unreadable


def _salvage(damaged: sqlite3.Connection, fresh: sqlite3.Connection, problems: list[str]) -> tuple[int, int]:
    """Copy every readable group, run and metric point from ``damaged`` into ``fresh`` (inside
    the caller's transaction); returns (runs, metric points) copied."""
    try:
        groups = damaged.execute("SELECT id, kind, name, created_at FROM groups").fetchall()
    except sqlite3.DatabaseError:
        groups = []
        for (group_id,) in _safe_rows(damaged, "SELECT id FROM groups INDEXED BY sqlite_autoindex_groups_1"):
            groups += _safe_rows(damaged, "SELECT id, kind, name, created_at FROM groups WHERE id = ?", (group_id,))
    fresh.executemany("INSERT INTO groups (id, kind, name, created_at) VALUES (?, ?, ?, ?)", groups)
    known_groups = {g[0] for g in groups}
    columns = f"rowid, {_V1_RUN_COLUMNS}, group_id, parent"
    rowids, _ = _run_rowids(damaged)
    runs = 0
    keys = []
    for rowid, _key in rowids:
        rows = _safe_rows(damaged, f"SELECT {columns} FROM runs WHERE rowid = ?", (rowid,))
        for row in rows:
            row = list(row)
            try:
                for text in (row[3], row[6], row[9], row[10], row[11]):  # config, versions, JSON results...
                    _loads_optional(text)
            except ValueError:
                continue
            if row[13] not in known_groups:
                row[13] = None
            fresh.execute(f"INSERT INTO runs ({columns}) VALUES ({', '.join('?' * len(row))})", row)
            keys.append(row[1])
            runs += 1
    points = 0
    for key in keys:
        try:
            rows = damaged.execute("SELECT key, step, name, value FROM metrics WHERE key = ?", (key,)).fetchall()
        except sqlite3.DatabaseError as exc:
            problems.append(f"metrics of run {key} could not be read ({exc}); not copied")
            continue
        fresh.executemany("INSERT INTO metrics (key, step, name, value) VALUES (?, ?, ?, ?)", rows)
        points += len(rows)
    return runs, points


def _safe_rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.DatabaseError:
        return []


def _fetch_record(conn: sqlite3.Connection, key: str) -> RunRecord | None:
    row = conn.execute(_SELECT_RUNS + " WHERE r.key = ?", (key,)).fetchone()
    return None if row is None else _record(row)


def _record(row: Sequence[Any]) -> RunRecord:
    key, name, config, seed, status, versions, created, updated, results, sparsity, timings, error, *rest = row
    group_kind, group_name, parent, *lease_row = rest
    lease = _lease_from((key, *lease_row)) if lease_row and lease_row[0] is not None else None
    if status == RunStatus.RUNNING and lease is not None and lease.stale:
        status = RunStatus.INTERRUPTED.value  # its process died without a word (killed)
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
        lease=lease,
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


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (containers)
        return f"uid {os.getuid()}"


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
TABLE_COLUMNS = (*DEFAULT_COLUMNS, "group", "parent", "iterations", "lr")
_RIGHT_ALIGNED = frozenset({"sparsity", "seed", "iterations", "lr", *_PERCENT_COLUMNS})
_MISSING = "-"


def format_runs_table(
    records: Sequence[RunRecord], columns: Sequence[str] | None = None, *, steps: dict[str, int | None] | None = None
) -> str:
    """An aligned markdown pipe table of ``records``, one row each, headed by the column names.

    Columns (default: DEFAULT_COLUMNS, in this order): key (first 10 chars), name, model,
    dataset, method, sparsity (from the config, see below), seed, status, test_error_final and
    test_error_best_val (results entries, taken as fractions and shown as percentages with two
    decimals, e.g. ``7.53%``), created_at and updated_at (``YYYY-MM-DD HH:MM:SS``, UTC; a running
    run updates it at every logged metric, so a 'running' run whose updated_at has stopped moving
    died, and resumes when run again). Also available (TABLE_COLUMNS): group (``kind:name``)
    and parent (its first 10 chars); iterations (``done/planned``: done from the results'
    ``steps``, else from ``steps[key]``, e.g. a running run's last logged step; planned from the
    config's ``iterations``, or ``<epochs>ep``) and lr (the config's learning rate). Statuses show
    as stored (RUN_STATUSES). Missing values show as ``-``. A config entry is looked up at the top
    level, else in nested dicts; a dict value shows its ``name`` entry. Raises SparsetrainError
    for unknown column names.
    """
    columns = tuple(DEFAULT_COLUMNS if columns is None else columns)
    steps = steps or {}
    unknown = [c for c in columns if c not in TABLE_COLUMNS]
    if unknown:
        raise SparsetrainError(f"unknown run table columns {unknown}; choose from {', '.join(TABLE_COLUMNS)}")
    rows = [[_cell(record, column, steps).replace("|", "\\|") for column in columns] for record in records]
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


def _cell(record: RunRecord, column: str, steps: dict[str, int | None]) -> str:
    if column == "iterations":
        return _iterations(record, steps.get(record.key))
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


def _iterations(record: RunRecord, logged: int | None) -> str:
    done = (record.results or {}).get("steps")
    if isinstance(done, bool) or not isinstance(done, int):
        done = logged
    iterations, epochs = _config_value(record.config, "iterations"), _config_value(record.config, "epochs")
    if isinstance(iterations, int) and not isinstance(iterations, bool) and iterations > 0:
        planned = str(iterations)
    elif isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs > 0:
        planned = f"{epochs:g}ep"
    else:
        planned = _MISSING
    return f"{_MISSING if done is None else done}/{planned}"


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
