"""The embedded run store: one SQLite file recording every training run and its metrics.

Layout under ``root``::

    root/runs.sqlite          tables ``runs`` and ``metrics`` (WAL mode)
    root/runs/<key>/          artifacts of one run (checkpoints, masks, ...), see RunStore.artifact_dir

A run is identified by ``key``, an opaque string (a hex hash of its results-relevant config,
computed elsewhere). Keys must be usable as a folder name: letters, digits, ``_``, ``-``, ``.``.

Every operation opens its own short-lived connection and closes it before returning, so a
RunStore holds no open resources, can be passed to worker processes, and several processes can
write to the same store at once (writers take the database lock up front and wait up to
60 s for each other).
"""

from __future__ import annotations

import dataclasses
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sparsetrain.errors import SparsetrainError

__all__ = [
    "DEFAULT_COLUMNS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "RunRecord",
    "RunStore",
    "current_versions",
    "format_runs_table",
]

SCHEMA_VERSION = 1
RUN_STATUSES = ("running", "finished", "failed")
DB_NAME = "runs.sqlite"
_BUSY_TIMEOUT_S = 60.0
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]+")

_SCHEMA = """
CREATE TABLE runs (
    key            TEXT PRIMARY KEY,
    name           TEXT NOT NULL DEFAULT '',
    config         TEXT NOT NULL,
    seed           INTEGER NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    versions       TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    results        TEXT,
    layer_sparsity TEXT,
    timings        TEXT,
    error          TEXT
);
CREATE INDEX runs_created_at ON runs (created_at);
CREATE TABLE metrics (
    key   TEXT NOT NULL,
    step  INTEGER NOT NULL,
    name  TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (key, step, name)
) WITHOUT ROWID;
"""

_RUN_COLUMNS = (
    "key, name, config, seed, status, versions, created_at, updated_at, "
    "results, layer_sparsity, timings, error"
)


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
    """Runs and metrics in ``root/runs.sqlite``; artifacts in ``root/runs/<key>/``.

    Creating a RunStore creates ``root`` and the database if missing. Raises SparsetrainError if
    ``root/runs.sqlite`` exists but is not a SQLite database, or was written by a newer schema.
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
        # One write transaction, so two processes opening a fresh store do not both create tables.
        with self._connect(write=True) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise SparsetrainError(
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
    ) -> RunRecord:
        """Record that run ``key`` starts (or resumes) now; returns its record.

        A new key is inserted with status 'running'. An existing run that is 'running' (crashed
        without a word) or 'failed' is resumed: status back to 'running', error cleared, name,
        config, seed and versions replaced by the given ones, created_at and metrics kept.
        ``versions`` defaults to :func:`current_versions`.

        Raises SparsetrainError if the run is already 'finished' (delete it first to re-run).
        """
        _check_key(key)
        if not isinstance(name, str):
            raise SparsetrainError(f"run name must be a str, got {type(name).__name__}")
        row = {
            "key": key,
            "name": name,
            "config": _dumps(config, "config"),
            "seed": _check_int(seed, "seed"),
            "versions": _dumps(current_versions() if versions is None else versions, "versions"),
            "now": _now(),
        }
        with self._connect(write=True) as conn:
            found = conn.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
            if found is None:
                conn.execute(
                    "INSERT INTO runs (key, name, config, seed, status, versions, created_at, updated_at)"
                    " VALUES (:key, :name, :config, :seed, 'running', :versions, :now, :now)",
                    row,
                )
            elif found[0] == "finished":
                raise SparsetrainError(
                    f"run {key} is already finished; delete it (forced re-run) before starting it again"
                )
            else:
                conn.execute(
                    "UPDATE runs SET name = :name, config = :config, seed = :seed, status = 'running',"
                    " versions = :versions, updated_at = :now, error = NULL WHERE key = :key",
                    row,
                )
            return _fetch_record(conn, key)  # type: ignore[return-value]  # just written

    def finish(
        self,
        key: str,
        results: dict[str, Any],
        layer_sparsity: dict[str, Any] | None = None,
        timings: dict[str, Any] | None = None,
    ) -> None:
        """Mark run ``key`` 'finished' and store its results (error cleared).

        Raises SparsetrainError if there is no such run.
        """
        self._update(
            key,
            "status = 'finished', results = ?, layer_sparsity = ?, timings = ?, error = NULL",
            (
                _dumps(results, "results"),
                _dumps_optional(layer_sparsity, "layer_sparsity"),
                _dumps_optional(timings, "timings"),
            ),
        )

    def fail(self, key: str, error: str) -> None:
        """Mark run ``key`` 'failed' with the ``error`` text; raises SparsetrainError if no such run."""
        self._update(key, "status = 'failed', error = ?", (str(error),))

    def _update(self, key: str, assignments: str, params: tuple[Any, ...]) -> None:
        with self._connect(write=True) as conn:
            cursor = conn.execute(
                f"UPDATE runs SET {assignments}, updated_at = ? WHERE key = ?", (*params, _now(), key)
            )
            if cursor.rowcount == 0:
                raise _no_run(key)

    def delete(self, key: str) -> bool:
        """Remove run ``key``: its row, its metrics and its artifact folder. False if it was unknown."""
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

    def list(self, name_pattern: str | None = None, status: str | None = None) -> list[RunRecord]:
        """Runs ordered by created_at (oldest first), optionally filtered.

        ``name_pattern`` is a case-sensitive shell-style glob on the run name (``"snip_*"``; a
        pattern without wildcards matches the name exactly); ``status`` one of RUN_STATUSES.
        """
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        params: tuple[Any, ...] = ()
        if status is not None:
            if status not in RUN_STATUSES:
                raise SparsetrainError(f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}")
            sql += " WHERE status = ?"
            params = (status,)
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY created_at, rowid", params).fetchall()
        records = [_record(row) for row in rows]
        if name_pattern is not None:
            records = [r for r in records if fnmatch.fnmatchcase(r.name, name_pattern)]
        return records


# ----------------------------------------------------------------------------- helpers


def _fetch_record(conn: sqlite3.Connection, key: str) -> RunRecord | None:
    row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE key = ?", (key,)).fetchone()
    return None if row is None else _record(row)


def _record(row: Sequence[Any]) -> RunRecord:
    key, name, config, seed, status, versions, created, updated, results, sparsity, timings, error = row
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
    )


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
_RIGHT_ALIGNED = frozenset({"sparsity", "seed", *_PERCENT_COLUMNS})
_MISSING = "-"


def format_runs_table(records: Sequence[RunRecord], columns: Sequence[str] | None = None) -> str:
    """An aligned markdown pipe table of ``records``, one row each, headed by the column names.

    Columns (default: all, in this order): key (first 10 chars), name, model, dataset, method,
    sparsity (from the config, see below), seed, status, test_error_final and
    test_error_best_val (results entries, taken as fractions and shown as percentages with two
    decimals, e.g. ``7.53%``), created_at and updated_at (``YYYY-MM-DD HH:MM:SS``, UTC; a running
    run updates it at every logged metric, so a 'running' run whose updated_at has stopped moving
    died, and resumes when run again). Missing values show as
    ``-``. A config entry is looked up at the top level, else in nested dicts; a dict value shows
    its ``name`` entry. Raises SparsetrainError for unknown column names.
    """
    columns = tuple(DEFAULT_COLUMNS if columns is None else columns)
    unknown = [c for c in columns if c not in DEFAULT_COLUMNS]
    if unknown:
        raise SparsetrainError(f"unknown run table columns {unknown}; choose from {', '.join(DEFAULT_COLUMNS)}")
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
