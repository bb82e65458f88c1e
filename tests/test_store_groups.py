"""Run store: groups (studies, experiments), parent runs and the status vocabulary."""

from __future__ import annotations

import sqlite3

import pytest

from sparsetrain.errors import SparsetrainError
from sparsetrain.store import (
    DEFAULT_COLUMNS,
    RESUMABLE_STATUSES,
    RUN_STATUSES,
    TABLE_COLUMNS,
    TERMINAL_STATUSES,
    GroupSummary,
    RunGroup,
    RunStatus,
    RunStore,
    format_runs_table,
)

CONFIG = {"model": "lenet300", "dataset": "mnist", "method": "snip", "sparsity": 0.95}
NO_VERSIONS: dict[str, str] = {}  # skips importing torch for current_versions()


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "store")


def _begin(store: RunStore, key: str, **kwargs):
    return store.begin(key, CONFIG, 0, versions=NO_VERSIONS, **kwargs)


# ----------------------------------------------------------------------------- vocabulary


def test_one_status_vocabulary_split_into_terminal_and_resumable():
    assert RUN_STATUSES == ("running", "finished", "failed", "stopped", "infeasible", "interrupted")
    assert RUN_STATUSES == tuple(RunStatus)
    assert all(type(s) is str for s in RUN_STATUSES)  # plain text, for argparse choices and JSON
    assert set(TERMINAL_STATUSES) == {"finished", "stopped", "infeasible"}
    assert set(RESUMABLE_STATUSES) == {"running", "failed", "interrupted"}
    assert sorted(TERMINAL_STATUSES + RESUMABLE_STATUSES) == sorted(RUN_STATUSES)
    assert RunStatus.INFEASIBLE == "infeasible" and str(RunStatus.STOPPED) == "stopped"


def test_schema_check_allows_exactly_the_vocabulary(store):
    _begin(store, "k")
    conn = sqlite3.connect(store.db_path)
    try:
        for status in RUN_STATUSES:
            conn.execute("UPDATE runs SET status = ? WHERE key = 'k'", (status,))
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE runs SET status = 'done' WHERE key = 'k'")
    finally:
        conn.close()


# ----------------------------------------------------------------------------- statuses


@pytest.mark.parametrize("status", TERMINAL_STATUSES)
def test_finish_with_each_terminal_status_is_not_rerun(store, status):
    _begin(store, "k")
    store.finish("k", {"diverged_at_step": 300} if status == "infeasible" else {"steps": 10}, status=status)
    record = store.get("k")
    assert record.status == status and record.error is None and record.results
    with pytest.raises(SparsetrainError, match=f"already {status}.*delete it"):
        _begin(store, "k")
    assert [r.key for r in store.list(status=status)] == ["k"]
    assert store.delete("k")  # the way to re-run it
    assert _begin(store, "k").status == "running"


def test_finish_accepts_enum_members_and_refuses_unfinished_statuses(store):
    _begin(store, "k")
    store.finish("k", {}, status=RunStatus.STOPPED)
    stored = store.get("k").status
    assert stored == "stopped" and type(stored) is str
    for status in ("running", "failed", "interrupted", "done"):
        with pytest.raises(SparsetrainError, match="finish.*finished, stopped, infeasible.*fail"):
            store.finish("k", {}, status=status)
    assert store.get("k").status == "stopped"


@pytest.mark.parametrize("status", ["failed", "interrupted"])
def test_failed_and_interrupted_runs_resume(store, status):
    first = _begin(store, "k")
    store.log_metrics("k", 5, {"loss": 0.5})
    store.fail("k", "KeyboardInterrupt: ", status=status)
    record = store.get("k")
    assert record.status == status and record.error == "KeyboardInterrupt: "
    resumed = _begin(store, "k")
    assert resumed.status == "running" and resumed.error is None and resumed.created_at == first.created_at
    assert store.metrics("k") == {"loss": [(5, 0.5)]}


def test_fail_refuses_terminal_statuses(store):
    _begin(store, "k")
    for status in (*TERMINAL_STATUSES, "running"):
        with pytest.raises(SparsetrainError, match="fail.*failed, interrupted.*finish"):
            store.fail("k", "x", status=status)
    assert store.get("k").status == "running"


def test_list_by_several_statuses(store):
    for key, end in (("a", "finished"), ("b", "stopped"), ("c", "failed"), ("d", None)):
        _begin(store, key)
        if end == "failed":
            store.fail(key, "boom")
        elif end:
            store.finish(key, {}, status=end)
    assert [r.key for r in store.list(status=TERMINAL_STATUSES)] == ["a", "b"]
    assert [r.key for r in store.list(status=RESUMABLE_STATUSES)] == ["c", "d"]
    for bad in ("done", ["finished", "done"], []):
        with pytest.raises(SparsetrainError, match="unknown run status.*interrupted"):
            store.list(status=bad)


# ----------------------------------------------------------------------------- groups


def test_group_recorded_on_begin_and_listed(store):
    table1 = RunGroup("experiment", "snip-table1")
    plain = _begin(store, "k0")
    assert (plain.group_kind, plain.group_name, plain.parent, plain.group) == (None, None, None, None)
    record = _begin(store, "k1", group=table1)
    assert (record.group_kind, record.group_name, record.group) == ("experiment", "snip-table1", table1)
    _begin(store, "k2", group=("experiment", "snip-table1"))  # a tuple works too
    _begin(store, "k3", group=("study", "snip-table1"))  # same name, other kind: another group
    assert [r.key for r in store.list(group=table1)] == ["k1", "k2"]
    assert [r.key for r in store.list(group=("study", "snip-table1"))] == ["k3"]
    assert store.list(group=("study", "nothing")) == []
    assert [r.key for r in store.list(group=table1, name_pattern="*", status="running")] == ["k1", "k2"]


def test_groups_count_runs_per_status(store):
    _begin(store, "a", group=("experiment", "table1"))
    _begin(store, "b", group=("experiment", "table1"))
    _begin(store, "c", group=("study", "kstar"))
    _begin(store, "d")
    store.finish("a", {})
    store.finish("c", {}, status="infeasible")
    table1, kstar = store.groups()
    assert isinstance(table1, GroupSummary)
    assert (table1.kind, table1.name, table1.group) == ("experiment", "table1", RunGroup("experiment", "table1"))
    assert table1.counts == {"running": 1, "finished": 1, "failed": 0, "stopped": 0, "infeasible": 0, "interrupted": 0}
    assert list(table1.counts) == list(RUN_STATUSES) and table1.total == 2
    assert kstar.counts["infeasible"] == 1 and kstar.total == 1
    assert table1.created_at <= kstar.created_at
    assert [g.name for g in store.groups(kind="study")] == ["kstar"]
    assert store.groups(kind="sweep") == []
    store.delete("c")  # the group stays, empty
    (kstar,) = store.groups(kind="study")
    assert kstar.total == 0 and set(kstar.counts.values()) == {0}


def test_resume_keeps_or_replaces_group_and_parent(store):
    _begin(store, "p")
    _begin(store, "k", group=("experiment", "one"), parent="p")
    store.fail("k", "boom")
    kept = _begin(store, "k")  # None keeps what was recorded
    assert kept.group == RunGroup("experiment", "one") and kept.parent == "p"
    _begin(store, "q")
    moved = _begin(store, "k", group=("experiment", "two"), parent="q")
    assert moved.group == RunGroup("experiment", "two") and moved.parent == "q"
    assert [g.total for g in store.groups()] == [0, 1]


@pytest.mark.parametrize(
    ("group", "match"),
    [
        (("Study", "x"), "invalid group kind"),
        (("", "x"), "invalid group kind"),
        (("study", ""), "group name"),
        (("study", 3), "group name"),
        ("study:x", "RunGroup or a \\(kind, name\\) tuple"),
        (("study",), "RunGroup or a \\(kind, name\\) tuple"),
    ],
)
def test_bad_groups_are_refused_before_writing(store, group, match):
    with pytest.raises(SparsetrainError, match=match):
        _begin(store, "k", group=group)
    with pytest.raises(SparsetrainError, match=match):
        store.list(group=group)
    assert store.list() == [] and store.groups() == []


def test_a_group_named_again_is_created_once(store):
    for i in range(5):
        _begin(store, f"k{i}", group=("study", "s"))
    (summary,) = store.groups()
    assert summary.total == 5
    conn = sqlite3.connect(store.db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM groups").fetchone()[0] == 1
    finally:
        conn.close()


# ----------------------------------------------------------------------------- parents


def test_parent_and_children(store):
    _begin(store, "round0")
    _begin(store, "round1", parent="round0")
    _begin(store, "rewind", parent="round0")
    _begin(store, "round2", parent="round1")
    assert store.get("round1").parent == "round0"
    assert [r.key for r in store.children("round0")] == ["round1", "rewind"]
    assert [r.key for r in store.children("round1")] == ["round2"]
    assert store.children("round2") == [] and store.children("ghost") == []
    assert [r.key for r in store.list(parent="round0", name_pattern="*")] == ["round1", "rewind"]


def test_unknown_self_and_cyclic_parents_are_refused(store):
    with pytest.raises(SparsetrainError, match="parent run 'ghost' of run 'k' is not in the run store.*begin the parent"):
        _begin(store, "k", parent="ghost")
    assert store.get("k") is None  # nothing written
    _begin(store, "k")
    with pytest.raises(SparsetrainError, match="its own parent"):
        _begin(store, "k", parent="k")
    with pytest.raises(SparsetrainError, match="invalid run key"):
        _begin(store, "j", parent="../k")
    _begin(store, "child", parent="k")
    _begin(store, "grandchild", parent="child")
    store.fail("k", "boom")
    with pytest.raises(SparsetrainError, match="'grandchild' descends from run 'k'"):
        _begin(store, "k", parent="grandchild")
    assert store.get("k").status == "failed" and store.get("k").parent is None


def test_deleting_a_parent_keeps_the_childrens_reference(store):
    _begin(store, "p")
    _begin(store, "c", parent="p")
    store.delete("p")
    assert store.get("c").parent == "p" and [r.key for r in store.children("p")] == ["c"]
    _begin(store, "p")  # re-run under the same key: the same parent again
    assert [r.key for r in store.children("p")] == ["c"]


# ----------------------------------------------------------------------------- table


def test_table_group_and_parent_columns(store):
    _begin(store, "0123456789abcdef", group=("experiment", "snip-table1"))
    _begin(store, "fedcba9876543210", parent="0123456789abcdef")
    store.finish("fedcba9876543210", {}, status="infeasible")
    records = store.list()
    assert "group" not in DEFAULT_COLUMNS and set(TABLE_COLUMNS) == {*DEFAULT_COLUMNS, "group", "parent", "iterations", "lr"}
    lines = format_runs_table(records, columns=["key", "status", "group", "parent"]).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["key", "status", "group", "parent"]
    assert cells[2] == ["0123456789", "running", "experiment:snip-table1", "-"]
    assert cells[3] == ["fedcba9876", "infeasible", "-", "0123456789"]
    assert "group" not in format_runs_table(records).splitlines()[0]
    with pytest.raises(SparsetrainError, match="choose from.*group, parent"):
        format_runs_table(records, columns=["groups"])
