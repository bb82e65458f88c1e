"""Tests for sparsetrain.state_io (safetensors state files) and sparsetrain.store (SQLite run store)."""

from __future__ import annotations

import errno

import importlib.metadata
import math
import multiprocessing
from collections import Counter
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from sparsetrain.errors import SparsetrainError
from sparsetrain.state_io import load_state, load_tensors, read_metadata, save_state, save_tensors
from sparsetrain.store import SCHEMA_VERSION, RunRecord, RunStore, current_versions, format_runs_table

# ============================================================================= state_io


def _assert_same(a, b):
    """Deep equality where tuples may have become lists and nan equals nan."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.detach().cpu(), b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True))
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        assert [type(k) for k in a] == [type(k) for k in b]
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert type(a) is type(b) and a == b


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99)),
    ],
    ids=["sgd_momentum", "adam"],
)
def test_optimizer_state_round_trip_continues_identically(tmp_path, make_opt):
    model = _make_model()
    opt = make_opt(model.parameters())
    for step in range(2):
        _train_step(model, opt, seed=step)
    path = tmp_path / "ckpt.safetensors"
    save_state(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2})

    loaded = load_state(path)
    _assert_same(opt.state_dict(), loaded["optimizer"])
    _assert_same(model.state_dict(), loaded["model"])
    assert loaded["epoch"] == 2
    assert isinstance(next(iter(loaded["optimizer"]["state"])), int)

    fresh_model = _make_model()
    fresh_opt = make_opt(fresh_model.parameters())
    fresh_model.load_state_dict(loaded["model"])
    fresh_opt.load_state_dict(loaded["optimizer"])
    _train_step(model, opt, seed=99)
    _train_step(fresh_model, fresh_opt, seed=99)
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)


def test_scheduler_and_rng_state_round_trip(tmp_path):
    model = _make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    multistep = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 2, 5], gamma=0.5)
    for _ in range(3):
        opt.step()
        lambda_lr.step()
        multistep.step()
    path = tmp_path / "sched.safetensors"
    save_state(path, {"lambda": lambda_lr.state_dict(), "multi": multistep.state_dict(), "rng": torch.get_rng_state()})
    loaded = load_state(path)
    _assert_same(lambda_lr.state_dict(), loaded["lambda"])
    assert loaded["multi"]["milestones"] == multistep.state_dict()["milestones"]
    assert type(loaded["multi"]["milestones"]) is Counter
    torch.set_rng_state(loaded["rng"])
    expected = torch.rand(3)
    torch.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)


def test_model_state_dict_round_trip_with_tied_weights(tmp_path):
    model = _make_model()
    head = nn.Linear(8, 8)
    model.append(head)
    model[0].weight = nn.Parameter(torch.randn(8, 4))
    tied = nn.Linear(4, 8)
    tied.weight = model[0].weight  # shares memory: safetensors alone would refuse
    model.append(nn.ModuleDict({"tied": tied}))
    state = model.state_dict()
    path = tmp_path / "model.safetensors"
    save_state(path, state)
    loaded = load_state(path)
    _assert_same(state, loaded)
    assert loaded["0.weight"].data_ptr() != loaded["5.tied.weight"].data_ptr()
    assert loaded["1.num_batches_tracked"].dtype == torch.int64 and loaded["1.num_batches_tracked"].dim() == 0


def test_nested_structure_round_trip(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        0: {"a": 1, 2: [1.5, "x", None, True]},
        "floats": [float("nan"), float("inf"), -float("inf"), -0.0, 1e-300],
        3.5: (1, (2, 3)),
        None: "none-key",
        True: False,
        "masks": {"w": torch.tensor([[True, False], [False, True]]), "empty": torch.zeros(0, 3)},
        "scalars": [torch.tensor(3), torch.tensor(2.5, dtype=torch.float64), torch.tensor(False)],
        "dtypes": [torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.int8)],
        "views": [base, base[3:6], base.view(3, 4).t(), base.view(3, 4)],
        "grad": torch.ones(3, requires_grad=True) * 2,
        "unicode": "ünï\"{}[]",
        "nested_empty": [{}, [], ()],
        "json_lookalike": {"__tensor__": "t0", "__dict__": []},
    }
    path = tmp_path / "nested.safetensors"
    save_state(path, state)
    loaded = load_state(path)
    _assert_same(state, loaded)
    assert loaded["views"][2].is_contiguous()


def test_shared_memory_tensors_are_stored_independently(tmp_path):
    x = torch.arange(6.0)
    path = tmp_path / "shared.safetensors"
    save_state(path, {"a": x, "b": x, "c": x[1:4]})
    loaded = load_state(path)
    assert torch.equal(loaded["a"], x) and torch.equal(loaded["b"], x) and torch.equal(loaded["c"], x[1:4])
    loaded["a"].zero_()
    assert torch.equal(loaded["b"], x)


def test_state_metadata_kept_and_reserved_keys_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state(path, [1], metadata={"run": "abc"})
    assert read_metadata(path)["run"] == "abc"
    with pytest.raises(SparsetrainError, match="reserved"):
        save_state(path, [1], metadata={"sparsetrain.state": "x"})
    with pytest.raises(SparsetrainError, match="str -> str"):
        save_state(path, [1], metadata={"n": 1})


@pytest.mark.parametrize("bad", [{"x": [object()]}, {"x": {(1, 2): 3}}, {"x": torch.zeros(2).to_sparse()}])
def test_unsupported_values_are_refused_with_location(tmp_path, bad):
    with pytest.raises(SparsetrainError, match="x"):
        save_state(tmp_path / "bad.safetensors", bad)
    assert not list(tmp_path.iterdir())


def test_missing_corrupt_and_foreign_files_name_the_path(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(SparsetrainError, match="missing.safetensors"):
        load_state(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SparsetrainError, match="corrupt.safetensors"):
        load_state(corrupt)
    with pytest.raises(SparsetrainError, match="corrupt.safetensors"):
        load_tensors(corrupt)
    foreign = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(SparsetrainError, match="plain.safetensors.*not a sparsetrain state"):
        load_state(foreign)


def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_state(path, {"version": 1, "w": torch.ones(3)})

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    # A real OSError on the way becomes the one worded write error (sparsetrain.fsio), not a traceback.
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(SparsetrainError, match="cannot write the checkpoint .*no space left on device"):
        save_state(path, {"version": 2, "w": torch.zeros(3)})
    with pytest.raises(SparsetrainError, match="no space left on device.*previous file, if any, is intact"):
        save_tensors(path, {"w": torch.zeros(3)})
    monkeypatch.undo()

    loaded = load_state(path)
    assert loaded["version"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp files left


def test_save_tensors_round_trip(tmp_path):
    weight = torch.rand(4, 5) > 0.5
    masks = {"conv.weight": weight, "fc.weight": weight[:2], "fc.bias": torch.ones(3, dtype=torch.bool)}
    path = tmp_path / "sub" / "masks.safetensors"
    save_tensors(path, masks, {"sparsity": "0.9"})
    tensors, meta = load_tensors(path)
    assert meta == {"sparsity": "0.9"}
    assert set(tensors) == set(masks)
    for name, mask in masks.items():
        assert tensors[name].dtype == torch.bool and torch.equal(tensors[name], mask)
    save_tensors(path, {"x": torch.zeros(1)})  # overwrite, no metadata
    tensors, meta = load_tensors(path)
    assert list(tensors) == ["x"] and torch.equal(tensors["x"], torch.zeros(1)) and meta == {}
    with pytest.raises(SparsetrainError, match="str -> Tensor"):
        save_tensors(path, {"x": [1, 2]})


# ============================================================================= store


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "store")


CONFIG = {"model": "lenet300", "dataset": "mnist", "method": "snip", "sparsity": 0.95, "lr": 0.1}


def _parse_utc(text: str) -> datetime:
    stamp = datetime.fromisoformat(text)
    assert stamp.tzinfo is not None and stamp.utcoffset().total_seconds() == 0
    return stamp


def test_store_creates_database_in_wal_mode(tmp_path):
    RunStore(tmp_path / "a" / "b")
    db = tmp_path / "a" / "b" / "runs.sqlite"
    assert db.is_file()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()
    assert {"groups", "runs", "metrics"} <= tables
    RunStore(tmp_path / "a" / "b")  # reopening is fine


def test_begin_get_finish_round_trip(store):
    assert store.get("abc") is None
    started = store.begin("abc", CONFIG, seed=3, name="lenet_snip")
    assert isinstance(started, RunRecord)
    assert (started.key, started.name, started.config, started.seed, started.status) == (
        "abc", "lenet_snip", CONFIG, 3, "running",
    )  # fmt: skip
    assert set(started.versions) == {"python", "torch", "sparsetrain"}
    assert started.versions["torch"] == torch.__version__
    assert started.results is None and started.error is None
    assert _parse_utc(started.created_at) <= datetime.now(timezone.utc)

    store.finish(
        "abc",
        {"test_error_final": 0.0183, "test_error_best_val": 0.0175, "loss": float("nan")},
        layer_sparsity={"fc1.weight": 0.96},
        timings={"train_s": 12.5},
    )
    done = store.get("abc")
    assert done.status == "finished"
    assert done.results["test_error_final"] == 0.0183 and math.isnan(done.results["loss"])
    assert done.layer_sparsity == {"fc1.weight": 0.96} and done.timings == {"train_s": 12.5}
    assert done.created_at == started.created_at
    assert _parse_utc(done.updated_at) >= _parse_utc(started.updated_at)
    with pytest.raises(SparsetrainError, match="already finished"):
        store.begin("abc", CONFIG, seed=3)


def test_explicit_and_fallback_versions(store, monkeypatch):
    assert store.begin("v1", {}, 0, versions={"torch": "x"}).versions == {"torch": "x"}

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert current_versions()["sparsetrain"] == "unknown"
    assert store.begin("v2", {}, 0).versions["sparsetrain"] == "unknown"


def test_metrics_upsert_on_relog_sorted_by_step(store):
    store.begin("k", CONFIG, seed=0)
    store.log_metrics("k", 2, {"loss": 0.5, "acc": 0.9})
    store.log_metrics("k", 1, {"loss": 1.0, "acc": 0.5})
    store.log_metrics("k", 2, {"loss": 0.4})  # resumed run re-logs step 2
    store.log_metrics("k", 3, {"loss": float("nan"), "acc": torch.tensor(0.95)})
    series = store.metrics("k")
    assert series["loss"][:2] == [(1, 1.0), (2, 0.4)] and math.isnan(series["loss"][2][1])
    assert series["acc"] == [(1, 0.5), (2, 0.9), (3, pytest.approx(0.95))]
    assert store.metrics("k", "acc") == {"acc": series["acc"]}
    assert store.metrics("k", "nope") == {} and store.metrics("unknown") == {}
    with pytest.raises(SparsetrainError, match="number"):
        store.log_metrics("k", 4, {"loss": "1.0"})
    with pytest.raises(SparsetrainError, match="step"):
        store.log_metrics("k", 1.5, {"loss": 1.0})
    assert len(store.metrics("k")["loss"]) == 3  # failed calls wrote nothing


def test_begin_on_unfinished_run_resumes_and_keeps_metrics(store):
    first = store.begin("k", CONFIG, seed=0, name="old")
    store.log_metrics("k", 1, {"loss": 1.0})
    store.fail("k", "Traceback: boom")
    failed = store.get("k")
    assert failed.status == "failed" and failed.error == "Traceback: boom"

    resumed = store.begin("k", CONFIG, seed=0, name="new")
    assert resumed.status == "running" and resumed.error is None and resumed.name == "new"
    assert resumed.created_at == first.created_at
    assert store.metrics("k") == {"loss": [(1, 1.0)]}
    # A run that died while 'running' can be resumed too.
    assert store.begin("k", CONFIG, seed=0).status == "running"


def test_operations_on_unknown_runs_and_bad_input(store):
    for call in (
        lambda: store.log_metrics("ghost", 0, {"loss": 1.0}),
        lambda: store.finish("ghost", {}),
        lambda: store.fail("ghost", "x"),
    ):
        with pytest.raises(SparsetrainError, match="ghost"):
            call()
    for key in ("", "../escape", "a/b", ".hidden", 7):
        with pytest.raises(SparsetrainError, match="invalid run key"):
            store.begin(key, {}, 0)
    with pytest.raises(SparsetrainError, match="JSON"):
        store.begin("k", {"path": object()}, 0)
    with pytest.raises(SparsetrainError, match="seed"):
        store.begin("k", {}, True)
    assert store.list() == []


def test_list_filters_and_orders(store):
    store.begin("k1", CONFIG, 0, name="lenet_snip")
    store.begin("k2", CONFIG, 1, name="lenet_dense")
    store.begin("k3", CONFIG, 0, name="vgg_snip")
    store.finish("k2", {})
    store.fail("k3", "oom")
    assert [r.key for r in store.list()] == ["k1", "k2", "k3"]
    assert [r.key for r in store.list(name_pattern="*_snip")] == ["k1", "k3"]
    assert [r.key for r in store.list(name_pattern="lenet_snip")] == ["k1"]
    assert [r.key for r in store.list(status="finished")] == ["k2"]
    assert [r.key for r in store.list(name_pattern="lenet*", status="running")] == ["k1"]
    assert store.list(name_pattern="LENET*") == []
    with pytest.raises(SparsetrainError, match="status"):
        store.list(status="done")


def test_delete_removes_row_metrics_and_artifacts(store):
    store.begin("k", CONFIG, 0)
    store.begin("other", CONFIG, 0)
    store.log_metrics("k", 0, {"loss": 1.0})
    store.log_metrics("other", 0, {"loss": 2.0})
    folder = store.artifact_dir("k")
    assert folder == store.root / "runs" / "k" and folder.is_dir()
    (folder / "ckpt.safetensors").write_bytes(b"x")
    assert store.delete("k") is True
    assert store.get("k") is None and store.metrics("k") == {} and not folder.exists()
    assert store.metrics("other") == {"loss": [(0, 2.0)]}
    assert store.delete("k") is False
    store.begin("k", CONFIG, 0)  # forced re-run starts from scratch
    assert store.metrics("k") == {}


def _log_concurrently(root: str, worker: int, steps: int, barrier) -> None:
    store = RunStore(root)
    store.begin(f"own{worker}", {"worker": worker}, seed=worker)
    barrier.wait(timeout=60)  # start logging together, after both paid the import time
    for step in range(steps):
        store.log_metrics("shared", step, {f"w{worker}/loss": step / 10, f"w{worker}/acc": 1.0})
        store.log_metrics(f"own{worker}", step, {"loss": float(step)})
    store.finish(f"own{worker}", {"steps": steps})


def test_two_processes_log_concurrently(tmp_path):
    root = tmp_path / "store"
    store = RunStore(root)
    store.begin("shared", {}, 0)
    steps = 60
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_log_concurrently, args=(str(root), w, steps, barrier)) for w in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    for proc in procs:
        proc.close()
    series = store.metrics("shared")
    assert set(series) == {"w0/loss", "w0/acc", "w1/loss", "w1/acc"}
    assert all(len(points) == steps for points in series.values())
    assert series["w1/loss"][-1] == (steps - 1, (steps - 1) / 10)
    for w in range(2):
        assert store.get(f"own{w}").status == "finished"
        assert len(store.metrics(f"own{w}")["loss"]) == steps


def test_corrupt_database_file(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    (root / "runs.sqlite").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(SparsetrainError, match=r"runs\.sqlite.*not a SQLite database.*delete it"):
        RunStore(root)


def test_newer_schema_is_refused(tmp_path):
    RunStore(tmp_path)
    conn = sqlite3.connect(tmp_path / "runs.sqlite")
    try:
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(SparsetrainError, match="schema version 99"):
        RunStore(tmp_path)


def test_store_root_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SparsetrainError, match="file"):
        RunStore(tmp_path / "file")


def test_format_runs_table_cells(store):
    store.begin("0123456789abcdef", CONFIG, seed=7, name="lenet_snip")
    store.finish("0123456789abcdef", {"test_error_final": 0.0183, "test_error_best_val": 0.0175})
    nested = {"model": {"name": "vgg_d"}, "data": {"dataset": "cifar10"}, "pruning": {"method": "snip"}}
    store.begin("fedcba9876543210", nested, seed=1)
    records = store.list()
    table = format_runs_table(records)
    lines = table.splitlines()
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # aligned
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "key", "name", "model", "dataset", "method", "sparsity", "seed", "status",
        "test_error_final", "test_error_best_val", "created_at", "updated_at",
    ]  # fmt: skip
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first[:10] == [
        "0123456789", "lenet_snip", "lenet300", "mnist", "snip", "0.95", "7", "finished", "1.83%", "1.75%",
    ]  # fmt: skip
    assert first[10] == records[0].created_at[:19].replace("T", " ")
    assert first[11] == records[0].updated_at[:19].replace("T", " ")
    second = [c.strip() for c in lines[3].strip("|").split("|")]
    assert second[:10] == ["fedcba9876", "-", "vgg_d", "cifar10", "snip", "-", "1", "running", "-", "-"]

    short = format_runs_table(records, columns=["key", "status"]).splitlines()
    assert [c.strip() for c in short[2].strip("|").split("|")] == ["0123456789", "finished"]
    assert len(format_runs_table([]).splitlines()) == 2
    with pytest.raises(SparsetrainError, match="columns"):
        format_runs_table(records, columns=["bogus"])
