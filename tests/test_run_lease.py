"""One run trains once: the lease a training run holds in the store (in-process tests); and a run
trained with a given mask records that mask's method and real sparsity.

Each test trains mlp-tiny on the synthetic data for a few dozen iterations, or only takes leases.
The real two-process and kill tests are in test_run_processes.py.
"""

from __future__ import annotations

import importlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import torch

import sparsetrain.store as store_module
from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import load_mask, save_mask
from sparsetrain.run import run
from sparsetrain.store import RunStore
from sparsetrain.train.loop import Callback

# ``sparsetrain.run`` the attribute is the function (re-exported by the package); the module by name.
combined_key = importlib.import_module("sparsetrain.run").combined_key


def tiny(iterations: int = 40) -> RunConfig:
    train = {"iterations": iterations, "val_every": 20, "checkpoint_every": 20}
    return RunConfig(model="mlp-tiny", dataset="synthetic", name="tiny").replace(prune={"sparsity": 0.9}, train=train)


def _plant_lease(store: RunStore, key: str, *, host: str, pid: int, age_s: float) -> None:
    """A lease row as another process would have written it (written here with plain SQL)."""
    beat = time.time() - age_s
    conn = sqlite3.connect(store.db_path)
    try:
        conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (key, host, pid, "someone-else", "2026-01-01T00:00:00.000000+00:00",
                      "2026-01-01T00:00:00.000000+00:00", beat))
        conn.commit()
    finally:
        conn.close()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_run_is_refused_naming_the_holder(tmp_path):
    store = RunStore(tmp_path / "store")
    config = tiny()
    lease = store.take_lease(config.key())
    try:
        with pytest.raises(SparsetrainError, match=rf"run {config.key()} is being trained by pid \d+ on host "
                           rf"{socket.gethostname()} since .* UTC; wait for it, or pass --wait"):
            run(config, store=store, progress=False)
    finally:
        lease.release()
    assert store.get(config.key()) is None, "refused before any record or work"
    assert run(config, store=store, progress=False).reused is False


def test_a_fresh_lease_of_another_host_is_respected_and_a_stale_one_taken_over(tmp_path):
    store = RunStore(tmp_path / "store")
    config = tiny()
    _plant_lease(store, config.key(), host="elsewhere", pid=4242, age_s=1.0)
    with pytest.raises(SparsetrainError, match="being trained by pid 4242 on host elsewhere"):
        run(config, store=store, progress=False)
    _plant_lease(store, config.key(), host="elsewhere", pid=4242, age_s=store_module.LEASE_STALE_S + 5)
    outcome = run(config, store=store, progress=False)
    assert outcome.reused is False and outcome.status == "finished"
    assert store.lease(config.key()) is None


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    store = RunStore(tmp_path / "store")
    config = tiny()
    _plant_lease(store, config.key(), host=socket.gethostname(), pid=_dead_pid(), age_s=0.0)
    assert store.lease(config.key()).stale
    assert run(config, store=store, progress=False).reused is False


def test_taking_a_lease_is_atomic(tmp_path):
    store = RunStore(tmp_path / "store")
    threads, barrier = 6, threading.Barrier(6)
    won, refused = [], []

    def contender():
        barrier.wait()
        try:
            won.append(store.take_lease("k"))
        except SparsetrainError as exc:
            refused.append(str(exc))

    workers = [threading.Thread(target=contender) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(won) == 1 and len(refused) == threads - 1
    assert all("is being trained by" in r for r in refused)
    won[0].release()


def test_the_heartbeat_renews_and_a_lost_lease_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LEASE_HEARTBEAT_S", 0.02)
    store = RunStore(tmp_path / "store")
    lease = store.take_lease("k")
    first = store.lease("k").beat_unix
    deadline = time.time() + 5
    while store.lease("k").beat_unix == first and time.time() < deadline:
        time.sleep(0.02)
    assert store.lease("k").beat_unix > first, "the heartbeat thread renews the lease"
    _plant_lease(store, "k", host="elsewhere", pid=7, age_s=0.0)  # another process took it over
    while lease.lost is None and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(SparsetrainError, match="taken over by pid 7 on host elsewhere"):
        lease.check()
    lease.release()
    assert store.lease("k").host == "elsewhere", "releasing a lost lease leaves the new holder's"


class _Hold(Callback):
    """Blocks the training at its first step until ``go`` is set; counts steps trained."""

    def __init__(self, started: threading.Event, go: threading.Event):
        self.started, self.go, self.steps = started, go, 0

    def on_step(self, step, loss):
        self.steps += 1
        self.started.set()
        self.go.wait(timeout=60)
        return None


def test_wait_returns_the_result_the_holder_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LEASE_POLL_S", 0.02)
    store = RunStore(tmp_path / "store")
    config = tiny()
    started, go = threading.Event(), threading.Event()
    hold = _Hold(started, go)
    first: list = []
    holder = threading.Thread(target=lambda: first.append(run(config, store=store, progress=False, callbacks=[hold])))
    holder.start()
    assert started.wait(timeout=60)
    threading.Timer(0.3, go.set).start()
    second = run(config, store=store, progress=False, wait=True)  # blocks until the holder is done
    holder.join()
    assert first[0].reused is False and second.reused is True
    assert second.results == first[0].results and hold.steps == 40
    assert store.get(config.key()).status == "finished"


def test_a_run_whose_lease_is_taken_over_stops_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LEASE_HEARTBEAT_S", 0.01)
    store = RunStore(tmp_path / "store")
    config = tiny(iterations=60)

    class TakeOver(Callback):
        def on_step(self, step, loss):
            if step == 10:
                _plant_lease(store, config.key(), host="elsewhere", pid=99, age_s=0.0)
                time.sleep(0.3)  # a few heartbeats: this process learns it lost the lease
            return None

    with pytest.raises(SparsetrainError, match="taken over by pid 99 on host elsewhere"):
        run(config, store=store, progress=False, callbacks=[TakeOver()])
    record = store.get(config.key())
    assert record.status == "running" and record.error is None, "the record is the new holder's"
    assert store.lease(config.key()).host == "elsewhere"


def test_ctrl_c_ends_the_run_interrupted_and_releases_the_lease(tmp_path):
    store = RunStore(tmp_path / "store")
    config = tiny()

    class CtrlC(Callback):
        def on_step(self, step, loss):
            if step == 25:
                raise KeyboardInterrupt
            return None

    with pytest.raises(KeyboardInterrupt):
        run(config, store=store, progress=False, callbacks=[CtrlC()])
    record = store.get(config.key())
    assert record.status == "interrupted" and record.lease is None
    assert [r.key for r in store.list(status="interrupted")] == [config.key()]
    assert run(config, store=store, progress=False).status == "finished"


def test_a_killed_runs_stale_lease_lists_as_interrupted(tmp_path):
    store = RunStore(tmp_path / "store")
    store.begin("k", {}, seed=0, versions={})
    _plant_lease(store, "k", host=socket.gethostname(), pid=_dead_pid(), age_s=0.0)
    record = store.get("k")
    assert record.status == "interrupted" and record.lease.stale
    assert [r.key for r in store.list(status="interrupted")] == ["k"] and store.list(status="running") == []
    store.begin("g", {}, seed=0, versions={}, group=("study", "s"))
    _plant_lease(store, "g", host=socket.gethostname(), pid=_dead_pid(), age_s=0.0)
    store.begin("h", {}, seed=0, versions={}, group=("study", "s"))  # running, no lease: shown as stored
    summary, = store.groups()
    assert (summary.counts["interrupted"], summary.counts["running"], summary.total) == (1, 1, 2)
    conn = sqlite3.connect(store.db_path)
    assert conn.execute("SELECT status FROM runs").fetchone()[0] == "running", "stored as is; shown as it is"
    conn.close()


# --- records say what was trained ---------------------------------------------------------------

def _hand_mask(seed: int = 0):
    """A random mask for mlp-tiny's two weights keeping ~30% (counted by hand below)."""
    g = torch.Generator().manual_seed(seed)
    return {"1.weight": torch.rand(32, 784, generator=g) < 0.3, "3.weight": torch.rand(10, 32, generator=g) < 0.3}


def test_a_run_with_a_mask_file_records_the_masks_method_and_real_sparsity(tmp_path):
    tensors = _hand_mask()
    kept = sum(int(t.sum()) for t in tensors.values())
    real_sparsity = 1 - kept / (32 * 784 + 10 * 32)
    path = tmp_path / "mask.safetensors"
    save_mask(path, tensors, {"model": "mlp-tiny"}, method="random")
    mask = load_mask(path)
    config = tiny()  # says snip at 90%: not what is trained
    store = RunStore(tmp_path / "store")
    outcome = run(config, store=store, progress=False, mask=mask)

    assert outcome.key == combined_key(config, mask), "the key is unchanged"
    recorded = store.get(outcome.key).config
    assert recorded["prune"]["method"] == "random" and recorded["prune"]["sparsity"] == pytest.approx(real_sparsity)
    assert recorded["mask"]["source"] == mask.metadata["source"] and str(path) in recorded["mask"]["source"]
    assert recorded["mask"]["sha256"] == mask.metadata["sha256"] and recorded["mask"]["model"] == "mlp-tiny"
    assert outcome.config.prune.method == "random" and outcome.config.prune.sparsity == pytest.approx(real_sparsity)
    assert outcome.results["sparsity"] == pytest.approx(real_sparsity)
    assert {k: v for k, v in recorded.items() if k not in ("prune", "mask")} == \
        {k: v for k, v in config.to_dict().items() if k != "prune"}
    again = run(config, store=store, progress=False, mask=load_mask(path))
    assert again.reused and again.config.prune.method == "random"


def test_a_mask_made_in_memory_is_recorded_as_external(tmp_path):
    store = RunStore(tmp_path / "store")
    outcome = run(tiny(), store=store, progress=False, mask=_hand_mask(1))
    recorded = store.get(outcome.key).config
    assert recorded["prune"]["method"] == "external" and recorded["mask"] == {}


def test_the_command_line_refuses_a_held_run_and_waits_with_wait(tmp_path, monkeypatch, capsys):
    from sparsetrain.cli.common import config_from_args
    from sparsetrain.cli.main import build_parser, main

    monkeypatch.setattr(store_module, "LEASE_POLL_S", 0.02)
    argv = ["run", "--model", "mlp-tiny", "--dataset", "synthetic", "--iterations", "20",
            "--store", str(tmp_path / "store"), "--no-progress"]
    key = config_from_args(build_parser().parse_args(argv)).key()
    store = RunStore(tmp_path / "store")
    lease = store.take_lease(key)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparsetrain run: error: run {key} is being trained by pid {os.getpid()} on host ")
    assert "pass --wait" in err and "Traceback" not in err
    threading.Timer(0.3, lease.release).start()
    assert main(argv + ["--wait"]) == 0, "waits for the release, then trains it (nothing was recorded)"
    assert store.get(key).status == "finished"
