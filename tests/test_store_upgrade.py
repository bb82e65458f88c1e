"""Run store schema upgrades: a store written by every older sparsetrain opens, upgraded in place.

Each older schema is kept here as the exact SQL that version wrote (never generated from the
current code), so the test keeps checking what users' files really hold.
"""

from __future__ import annotations

import math
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

import sparsetrain.store as store_module
from sparsetrain.errors import SparsetrainError
from sparsetrain.store import SCHEMA_VERSION, RunGroup, RunStore

# Schema version 1, exactly as sparsetrain wrote it (store.py _SCHEMA before groups).
V1_SCHEMA = """
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

V1_RUNS = [
    # key, name, config, seed, status, versions, created_at, updated_at, results, layer_sparsity, timings, error
    ("aaa", "lenet_snip", '{"model": "lenet300", "sparsity": 0.95}', 0, "finished",
     '{"python": "3.11.7", "sparsetrain": "0.1.0", "torch": "2.4.0"}',
     "2026-01-01T00:00:00.000000+00:00", "2026-01-01T01:00:00.000000+00:00",
     '{"loss": NaN, "test_error_final": 0.0183}', '{"fc1.weight": 0.96}', '{"train_s": 12.5}', None),
    ("bbb", "", '{"model": "vgg_d"}', 1, "failed", "{}",
     "2026-01-01T00:00:00.000000+00:00", "2026-01-01T00:30:00.000000+00:00",  # same created_at: rowid orders
     None, None, None, "KeyboardInterrupt: "),
    ("ccc", "lenet_dense", "{}", 2, "running", "{}",
     "2026-01-02T00:00:00.000000+00:00", "2026-01-02T00:00:01.000000+00:00", None, None, None, None),
]  # fmt: skip
V1_METRICS = [("aaa", 0, "loss", 2.3), ("aaa", 100, "loss", None), ("aaa", 100, "acc", 0.9), ("ccc", 7, "loss", 1.5)]


def _write_v1_store(root: Path) -> Path:
    """A store as sparsetrain 0.1 (schema version 1) left it: WAL, runs, metrics, an artifact."""
    root.mkdir(parents=True)
    conn = sqlite3.connect(root / "runs.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(V1_SCHEMA)
        conn.execute("PRAGMA user_version=1")
        conn.executemany(f"INSERT INTO runs VALUES ({', '.join('?' * 12)})", V1_RUNS)
        conn.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)", V1_METRICS)
    finally:
        conn.close()
    (root / "runs" / "aaa").mkdir(parents=True)
    (root / "runs" / "aaa" / "mask.safetensors").write_bytes(b"mask bytes")
    return root


# Schema version 2, exactly as sparsetrain wrote it (store.py _SCHEMA before leases).
V2_SCHEMA = """
CREATE TABLE groups (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (kind, name)
);
CREATE TABLE runs (
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
);
CREATE INDEX runs_created_at ON runs (created_at);
CREATE INDEX runs_group_id ON runs (group_id);
CREATE INDEX runs_parent ON runs (parent);
CREATE TABLE metrics (
    key   TEXT NOT NULL,
    step  INTEGER NOT NULL,
    name  TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (key, step, name)
) WITHOUT ROWID;
"""


def _write_v2_store(root: Path) -> Path:
    """A store as sparsetrain with groups and parents (schema version 2) left it: a group, the v1
    runs (one a child in the group, one 'running' as a killed process leaves it), metrics."""
    root.mkdir(parents=True)
    conn = sqlite3.connect(root / "runs.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(V2_SCHEMA)
        conn.execute("PRAGMA user_version=2")
        conn.execute("INSERT INTO groups VALUES (1, 'experiment', 'snip-table1', '2026-01-01T00:00:00.000000+00:00')")
        rows = [(*run, 1 if run[0] == "ccc" else None, "aaa" if run[0] == "ccc" else None) for run in V1_RUNS]
        conn.executemany(f"INSERT INTO runs VALUES ({', '.join('?' * 14)})", rows)
        conn.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)", V1_METRICS)
    finally:
        conn.close()
    return root


OLD_STORES = {1: _write_v1_store, 2: _write_v2_store}  # every older schema version -> a writer of such a store


def _user_version(root: Path) -> int:
    conn = sqlite3.connect(root / "runs.sqlite")
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def _schema(root: Path) -> list[tuple[str, str, str]]:
    """(type, name, sql) of every table and index, with quoting that RENAME adds taken out."""
    conn = sqlite3.connect(root / "runs.sqlite")
    try:
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    finally:
        conn.close()
    return [(kind, name, (sql or "").replace('"runs"', "runs")) for kind, name, sql in rows]


def test_every_older_version_has_a_writer_and_an_upgrade_step():
    assert SCHEMA_VERSION == 3
    assert set(OLD_STORES) == set(range(1, SCHEMA_VERSION)) == set(store_module._UPGRADES)


@pytest.mark.parametrize("version", sorted(OLD_STORES))
def test_upgraded_store_has_the_fresh_schema(tmp_path, version):
    old = OLD_STORES[version](tmp_path / "old")
    RunStore(old)
    RunStore(tmp_path / "fresh")
    assert _user_version(old) == _user_version(tmp_path / "fresh") == SCHEMA_VERSION
    assert _schema(old) == _schema(tmp_path / "fresh")


def test_v1_store_keeps_every_run_metric_and_artifact(tmp_path):
    root = _write_v1_store(tmp_path / "store")
    store = RunStore(root)
    assert _user_version(root) == SCHEMA_VERSION

    runs = store.list()
    assert [r.key for r in runs] == ["aaa", "bbb", "ccc"]  # created_at, then rowid, as before
    for record, row in zip(runs, V1_RUNS):
        assert (record.key, record.name, record.seed, record.status) == (row[0], row[1], row[3], row[4])
        assert (record.created_at, record.updated_at, record.error) == (row[6], row[7], row[11])
        assert (record.group_kind, record.group_name, record.parent) == (None, None, None)
    done = store.get("aaa")
    assert done.config == {"model": "lenet300", "sparsity": 0.95}
    assert done.versions["torch"] == "2.4.0" and done.layer_sparsity == {"fc1.weight": 0.96}
    assert math.isnan(done.results["loss"]) and done.results["test_error_final"] == 0.0183
    assert done.timings == {"train_s": 12.5}
    series = store.metrics("aaa")
    assert series["acc"] == [(100, 0.9)]
    assert series["loss"][0] == (0, 2.3) and math.isnan(series["loss"][1][1])
    assert store.metrics("ccc") == {"loss": [(7, 1.5)]}
    assert (store.artifact_dir("aaa") / "mask.safetensors").read_bytes() == b"mask bytes"

    # The old statuses keep their meaning ...
    with pytest.raises(SparsetrainError, match="already finished"):
        store.begin("aaa", {}, 0, versions={})
    assert store.begin("bbb", {"model": "vgg_d"}, 1, versions={}).status == "running"
    # ... and the new statuses, groups and parents work on the upgraded file.
    store.fail("bbb", "SIGTERM", status="interrupted")
    store.finish("ccc", {"diverged_at_step": 9}, status="infeasible")
    child = store.begin("ddd", {}, 3, versions={}, group=("experiment", "snip-table1"), parent="aaa")
    assert child.group == RunGroup("experiment", "snip-table1") and child.parent == "aaa"
    store.finish("ddd", {}, status="stopped")
    assert [r.status for r in store.list()] == ["finished", "interrupted", "infeasible", "stopped"]
    assert [r.key for r in store.children("aaa")] == ["ddd"]
    assert store.groups()[0].counts["stopped"] == 1
    assert store.delete("aaa") and store.metrics("aaa") == {}

    RunStore(root)  # opening again changes nothing
    assert _user_version(root) == SCHEMA_VERSION and len(store.list()) == 3


def test_failed_upgrade_leaves_the_old_store_untouched(tmp_path, monkeypatch):
    root = _write_v1_store(tmp_path / "store")
    before = _schema(root)
    real_step = store_module._UPGRADES[1]

    def broken_step(conn):
        real_step(conn)  # every change made ...
        raise sqlite3.OperationalError("disk I/O error")  # ... then the upgrade dies before COMMIT

    monkeypatch.setitem(store_module._UPGRADES, 1, broken_step)
    with pytest.raises(SparsetrainError, match="disk I/O error"):
        RunStore(root)
    assert _user_version(root) == 1 and _schema(root) == before
    conn = sqlite3.connect(root / "runs.sqlite")
    try:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == len(V1_RUNS)
        assert conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == len(V1_METRICS)
    finally:
        conn.close()
    monkeypatch.undo()
    assert len(RunStore(root).list()) == len(V1_RUNS)  # the next open upgrades it


def _open_store(root: str, barrier, results) -> None:
    barrier.wait(timeout=60)
    store = RunStore(root)
    results.put(len(store.list()))


def test_concurrent_openers_upgrade_once(tmp_path):
    root = _write_v1_store(tmp_path / "store")
    ctx = multiprocessing.get_context("spawn")
    workers = 2  # and this process: three openers race for the upgrade
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=_open_store, args=(str(root), barrier, results)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    _open_store(str(root), barrier, results)
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * workers
    for proc in procs:
        proc.close()
    assert [results.get(timeout=10) for _ in range(workers + 1)] == [len(V1_RUNS)] * (workers + 1)
    results.close()
    results.join_thread()
    assert _user_version(root) == SCHEMA_VERSION
    assert [r.key for r in RunStore(root).list()] == ["aaa", "bbb", "ccc"]


def test_v2_store_gains_leases_and_keeps_every_run(tmp_path):
    root = _write_v2_store(tmp_path / "store")
    store = RunStore(root)
    assert _user_version(root) == SCHEMA_VERSION
    runs = store.list()
    assert [(r.key, r.status, r.lease) for r in runs] == [
        ("aaa", "finished", None), ("bbb", "failed", None), ("ccc", "running", None)]
    assert store.get("ccc").group == RunGroup("experiment", "snip-table1") and store.get("ccc").parent == "aaa"
    assert store.metrics("ccc") == {"loss": [(7, 1.5)]}
    with store.take_lease("ccc") as lease:
        assert store.lease("ccc").token == lease.token
    assert store.lease("ccc") is None


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 99])
def test_newer_store_is_refused_and_left_alone(tmp_path, version):
    RunStore(tmp_path)
    conn = sqlite3.connect(tmp_path / "runs.sqlite")
    try:
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(SparsetrainError, match=f"schema version {version}, newer than.*upgrade sparsetrain"):
        RunStore(tmp_path)
    assert _user_version(tmp_path) == version
