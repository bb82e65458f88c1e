"""A damaged run store: listing reads past an unreadable page, check() finds it, repair salvages.

The damage is real: one page of the runs table is overwritten in the file. Which runs sat on it is
found independently of the store's code, by locating each run's unique marker in the page's bytes.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from sparsetrain.store import DB_NAME, RunStore

RUNS = 24
PAD = "x" * 500  # ~0.6 KB per row: several rows per 4 KB page, several leaf pages, no overflow


def _marker(i: int) -> str:
    return f"marker-{i:03d}-end"


def _key(i: int) -> str:
    return f"run{i:03d}"


def _build(root: Path) -> RunStore:
    store = RunStore(root)
    for i in range(RUNS):
        store.begin(_key(i), {"marker": _marker(i), "pad": PAD}, seed=i, versions={})
        store.log_metrics(_key(i), 10, {"loss": float(i)})
        store.finish(_key(i), {"test_error_final": i / 100})
    return store


def _damage_page_of(root: Path, victim: int) -> set[int]:
    """Overwrite the page holding run ``victim``'s row; return the runs whose rows were on it."""
    db = root / DB_NAME
    wal = db.with_name(DB_NAME + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "every connection closed: the WAL is checkpointed"
    conn = sqlite3.connect(db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    offset = data.index(_marker(victim).encode())
    start = offset - offset % page_size
    page = bytes(data[start:start + page_size])
    on_page = {i for i in range(RUNS) if _marker(i).encode() in page}
    assert victim in on_page and len(on_page) < RUNS // 2
    data[start:start + page_size] = b"\xa5" * page_size  # not a b-tree page any more
    db.write_bytes(bytes(data))
    return on_page


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One healthy store, built once; each test damages its own copy."""
    root = tmp_path_factory.mktemp("pristine") / "store"
    _build(root)
    return root


def _copy(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    return root


@pytest.fixture
def damaged(pristine, tmp_path):
    root = _copy(pristine, tmp_path)
    return root, _damage_page_of(root, victim=RUNS // 2)


def test_the_damage_breaks_a_plain_query(damaged):
    """The oracle that the fixture really damaged the table: SQLite itself cannot scan it."""
    root, _ = damaged
    conn = sqlite3.connect(root / DB_NAME)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="malformed"):
            conn.execute("SELECT key, config FROM runs ORDER BY created_at").fetchall()
    finally:
        conn.close()


def test_listing_returns_the_readable_runs_and_names_the_damaged_ones(damaged):
    root, lost = damaged
    records = RunStore(root).list()
    assert [r.key for r in records] == [_key(i) for i in range(RUNS) if i not in lost]
    assert all(r.config["marker"] == _marker(int(r.key[3:])) for r in records)
    assert sorted(records.unreadable) == sorted(_key(i) for i in lost)
    message = records.damage()
    assert f"{len(lost)} run(s)" in message and "sparsetrain runs check --repair" in message
    assert all(_key(i) in message for i in lost)
    # filters still work past the damage
    assert [r.key for r in RunStore(root).list(name_pattern="nothing*")] == []


def test_check_reports_the_damage(damaged):
    root, lost = damaged
    result = RunStore(root).check()
    assert result.ok is False and result.repaired is False
    assert sorted(result.unreadable) == sorted(_key(i) for i in lost)
    assert result.problems, "integrity_check and the read both say what is wrong"
    report = result.report()
    assert report.startswith(f"{root / DB_NAME}: damaged") and "--repair" in report
    assert (root / DB_NAME).exists() and not list(root.glob("*.damaged-*")), "check alone changes nothing"


def test_repair_keeps_every_readable_run_and_the_damaged_file(damaged):
    root, lost = damaged
    original = (root / DB_NAME).read_bytes()
    result = RunStore(root).check(repair=True)
    assert result.repaired and result.salvaged_runs == RUNS - len(lost)
    assert result.salvaged_metrics == RUNS - len(lost)
    assert result.damaged_copy.name.startswith(f"{DB_NAME}.damaged-")
    assert result.damaged_copy.read_bytes() == original
    assert "repaired" in result.report()

    store = RunStore(root)
    assert store.check().ok, store.check().report()
    records = store.list()
    assert records.unreadable == []
    assert [r.key for r in records] == [_key(i) for i in range(RUNS) if i not in lost]
    for r in records:
        i = int(r.key[3:])
        assert (r.status, r.seed, r.results) == ("finished", i, {"test_error_final": i / 100})
        assert store.metrics(r.key) == {"loss": [(10, float(i))]}
    # a lost run is simply absent: starting it again trains it again
    gone = _key(min(lost))
    assert store.get(gone) is None
    assert store.begin(gone, {"marker": "again"}, seed=0, versions={}).status == "running"


def test_check_of_a_healthy_store_is_ok(pristine, tmp_path):
    store = RunStore(_copy(pristine, tmp_path))
    result = store.check(repair=True)
    assert result.ok and not result.repaired and result.unreadable == [] and result.problems == []
    assert "no damage found" in result.report()
    assert not list((tmp_path / "store").glob("*.damaged-*"))


def test_a_row_with_garbled_json_is_named_not_fatal(pristine, tmp_path):
    """A page SQLite can read but a row whose config text is cut short (bytes lost inside it)."""
    root = _copy(pristine, tmp_path)
    conn = sqlite3.connect(root / DB_NAME)
    conn.execute("UPDATE runs SET config = '{\"marker\": \"cut sh' WHERE key = ?", (_key(3),))
    conn.commit()
    conn.close()
    store = RunStore(root)
    records = store.list()
    assert [r.key for r in records] == [_key(i) for i in range(RUNS) if i != 3]
    assert records.unreadable == [_key(3)]
    result = store.check()
    assert not result.ok and result.unreadable == [_key(3)]
    assert store.check(repair=True).salvaged_runs == RUNS - 1
    assert RunStore(root).check().ok and RunStore(root).get(_key(3)) is None


def test_a_page_whose_cell_pointers_are_garbled_does_not_drop_runs_silently(pristine, tmp_path):
    """Bytes 8-200 of a runs page overwritten: the page header survives, so SQLite may scan it
    without an error but miss (or misread) the rows behind the garbled cell pointers. Every run
    is then either listed with its own content or named as unreadable: none goes missing."""
    root = _copy(pristine, tmp_path)
    db = root / DB_NAME
    conn = sqlite3.connect(db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    offset = data.index(_marker(RUNS // 2).encode())
    start = offset - offset % page_size
    data[start + 8:start + 200] = b"\xa5" * 192
    db.write_bytes(bytes(data))

    records = RunStore(root).list()
    listed = {r.key for r in records}
    assert listed.isdisjoint(records.unreadable)
    assert listed | set(records.unreadable) == {_key(i) for i in range(RUNS)}, "no run silently dropped"
    assert records.unreadable, "the damage is named"
    assert all(r.config.get("marker") == _marker(int(r.key[3:])) for r in records), "what is listed is right"
    assert RunStore(root).check().ok is False
