"""A full disk at each write site of a run (checkpoint, mask, store, report): the run stops with a
clear message, nothing written before is lost, and running it again without the fault ends with the
same result and weights, bit for bit, as a run that never failed.

The disk is filled with :func:`sparsetrain.fsio.simulate_full_disk` (the write fails with ENOSPC
after N good writes at that site). mlp-tiny on the synthetic data, 60 iterations, a checkpoint
every 10, a validation every 20.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from sparsetrain import fsio
from sparsetrain.cli.main import main
from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.measure import write_report
from sparsetrain.run import run
from sparsetrain.state_io import load_state
from sparsetrain.store import RunStore


def tiny() -> RunConfig:
    train = {"iterations": 60, "val_every": 20, "checkpoint_every": 10}
    return RunConfig(model="mlp-tiny", dataset="synthetic", name="full").replace(prune={"sparsity": 0.9}, train=train)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (results, final checkpoint, metrics)."""
    store = RunStore(tmp_path_factory.mktemp("reference"))
    outcome = run(tiny(), store=store, progress=False)
    key = outcome.key
    return outcome.results, load_state(store.root / "runs" / key / "checkpoint.safetensors"), store.metrics(key)


def _checkpoint(store: RunStore):
    return store.root / "runs" / tiny().key() / "checkpoint.safetensors"


def _assert_same_as_reference(store: RunStore, outcome, reference) -> None:
    results, state, metrics = reference
    skip = {"seconds"}  # wall time
    assert outcome.reused is False and outcome.status == "finished"
    assert {k: v for k, v in outcome.results.items() if k not in skip} == {k: v for k, v in results.items() if k not in skip}
    final = load_state(_checkpoint(store))
    assert final["step"] == state["step"] == 60
    for part in ("model", "best_model"):
        assert final[part].keys() == state[part].keys()
        for name in state[part]:
            assert torch.equal(final[part][name], state[part][name]), (part, name)
    # Every curve matches, the running training loss/error first logged after the resume too (its
    # accumulator travels in the checkpoint).
    assert store.metrics(outcome.key) == metrics


def test_full_disk_at_a_checkpoint(tmp_path, reference):
    store = RunStore(tmp_path / "store")
    with fsio.simulate_full_disk("checkpoint", after=2), \
            pytest.raises(SparsetrainError, match=r"cannot write the checkpoint .*no space left on device"):
        run(tiny(), store=store, progress=False)  # checkpoints 10 and 20 written, 30 fails
    assert load_state(_checkpoint(store))["step"] == 20, "the last good checkpoint is kept"
    record = store.get(tiny().key())
    assert record.status == "failed" and "no space left" in record.error and record.lease is None
    assert not [p for p in _checkpoint(store).parent.iterdir() if p.name.endswith(".tmp")]
    _assert_same_as_reference(store, run(tiny(), store=store, progress=False), reference)


def test_full_disk_at_the_mask(tmp_path, reference):
    store = RunStore(tmp_path / "store")
    with fsio.simulate_full_disk("mask"), pytest.raises(SparsetrainError, match=r"cannot write the mask .*no space left"):
        run(tiny(), store=store, progress=False)
    assert store.get(tiny().key()).status == "failed"
    assert not (store.root / "runs" / tiny().key() / "mask.safetensors").exists()
    _assert_same_as_reference(store, run(tiny(), store=store, progress=False), reference)


def test_full_disk_in_the_store(tmp_path, reference):
    store = RunStore(tmp_path / "store")
    key = tiny().key()
    # Store writes: the lease, begin, metrics at 20 (validation), 40 (validation); then at 50 it fails.
    with fsio.simulate_full_disk("store", after=4), \
            pytest.raises(SparsetrainError, match=r"cannot write the run store .*runs\.sqlite: no space left on device"):
        run(tiny(), store=store, progress=False)
    assert load_state(_checkpoint(store))["step"] == 40, "the checkpoint before the failed write is kept"
    steps = {step for series in store.metrics(key).values() for step, _ in series}
    assert steps == {20, 40}, "the failed metric write left nothing half-written"
    # The failure could not be recorded either (the disk is full): the row says 'running', and the
    # lease this process could not release reads as stale, so the run shows as interrupted.
    conn = sqlite3.connect(store.db_path)
    assert conn.execute("SELECT status FROM runs").fetchone()[0] == "running"
    conn.close()
    assert store.get(key).status == "interrupted"
    _assert_same_as_reference(store, run(tiny(), store=store, progress=False), reference)


def test_full_disk_at_a_report_keeps_the_previous_one(tmp_path):
    path = tmp_path / "table.md"
    write_report(path, "# first\n", {"rows": [1]}, provenance=None)
    before = path.read_bytes(), path.with_suffix(".json").read_bytes()
    with fsio.simulate_full_disk("report"), pytest.raises(SparsetrainError, match=r"cannot write the report .*no space left"):
        write_report(path, "# second\n", {"rows": [1, 2]}, provenance=None)
    assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json", "table.md"], "no temporary file left"
    write_report(path, "# second\n", {"rows": [1, 2]}, provenance=None)  # again, with space
    assert path.read_text() == "# second\n" and json.loads(path.with_suffix(".json").read_text()) == {"rows": [1, 2]}


def test_full_disk_at_a_reports_second_file_keeps_both_old_files(tmp_path):
    """The Markdown and its JSON are renamed into place only once both are written: a disk that
    fills up between the two leaves the old pair, not a new JSON beside an old table."""
    path = tmp_path / "table.md"
    write_report(path, "# first\n", {"rows": [1]}, provenance=None)
    before = path.read_bytes(), path.with_suffix(".json").read_bytes()
    with fsio.simulate_full_disk("report", after=1), pytest.raises(SparsetrainError, match="no space left"):
        write_report(path, "# second\n", {"rows": [1, 2]}, provenance=None)
    assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json", "table.md"], "no temporary file left"


def test_the_command_line_prints_the_message_not_a_traceback(tmp_path, capsys):
    argv = ["run", "--model", "mlp-tiny", "--dataset", "synthetic", "--iterations", "30", "--checkpoint-every", "10",
            "--store", str(tmp_path / "store"), "--no-progress"]
    with fsio.simulate_full_disk("checkpoint", after=1):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsetrain run: error: cannot write the checkpoint ") and "no space left on device" in err
    assert "Traceback" not in err
    assert main(argv) == 0, "run again with space: it resumes and finishes"
    with fsio.simulate_full_disk("store"):
        assert main(argv[:-3] + ["--store", str(tmp_path / "other"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the run store" in err and "no space left on device" in err and "Traceback" not in err


def test_sqlites_own_disk_full_error_is_worded_and_rolled_back(tmp_path, monkeypatch):
    """A real SQLITE_FULL ("database or disk is full"), made by capping the file's page count."""
    store = RunStore(tmp_path / "store")
    store.begin("k", {}, seed=0, versions={})
    store.log_metrics("k", 0, {"loss": 1.0})
    real_open = RunStore._open

    def capped(self, write):
        conn = real_open(self, write)
        if write:
            conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
        return conn

    monkeypatch.setattr(RunStore, "_open", capped)
    with pytest.raises(SparsetrainError, match=r"cannot write the run store .*runs\.sqlite: no space left on device; "
                                               r"the previous run store, if any, is intact"):
        store.log_metrics("k", 1, {f"metric{i}": float(i) for i in range(3000)})
    monkeypatch.undo()
    assert store.metrics("k") == {"loss": [(0, 1.0)]}, "the failed transaction left nothing of itself"
    assert store.check().ok
