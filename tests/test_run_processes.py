"""Real processes: SIGTERM ends a run as interrupted, a SIGKILLed one shows as interrupted once its
lease is stale, and either resumes to the same weights, bit for bit; two processes starting the
same run at once train it once.

A child process trains mlp-tiny on the synthetic data for 300 iterations (checkpoint every 10),
slowed by a callback that sleeps at each step (a callback changes nothing in the arithmetic), so
that the kill lands mid-run. The reference is an uninterrupted run in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsetrain.config import RunConfig
from sparsetrain.run import run
from sparsetrain.state_io import load_state
from sparsetrain.store import RunStore

CONFIG = """
from sparsetrain.config import RunConfig
def config():
    train = {"iterations": 300, "val_every": 50, "checkpoint_every": 10}
    return RunConfig(model="mlp-tiny", dataset="synthetic", name="kill").replace(prune={"sparsity": 0.9}, train=train)
"""
CHILD = CONFIG + """
import sys, time
from sparsetrain.run import run
from sparsetrain.train.loop import Callback

class Slow(Callback):
    def on_step(self, step, loss):
        time.sleep(float(sys.argv[2]))

try:
    outcome = run(config(), store=sys.argv[1], progress=False, callbacks=[Slow()], wait=sys.argv[3] == "wait")
except KeyboardInterrupt:
    sys.exit(130)
print("RESULT", outcome.reused, outcome.status, flush=True)
"""

pytestmark = pytest.mark.slow


def _config() -> RunConfig:
    scope: dict = {}
    exec(CONFIG, scope)
    return scope["config"]()


def _child(store: Path, sleep: float, wait: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(store), str(sleep), "wait" if wait else "no"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(path: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the child ended early: {proc.communicate()}"
        if path.exists():
            saved = load_state(path)["step"]
            if saved >= step:
                return saved
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def _same_weights(a_path: Path, b_path: Path) -> None:
    a, b = load_state(a_path), load_state(b_path)
    assert a["step"] == b["step"] == 300
    assert a["model"].keys() == b["model"].keys()
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in b["best_model"]:
        assert torch.equal(a["best_model"][name], b["best_model"][name]), name


def test_a_terminated_then_killed_run_resumes_bit_identically(tmp_path):
    config = _config()
    key = config.key()
    reference_store = RunStore(tmp_path / "reference")
    reference = run(config, store=reference_store, progress=False)

    store = RunStore(tmp_path / "stopped")
    checkpoint = store.root / "runs" / key / "checkpoint.safetensors"

    # SIGTERM: the run ends 'interrupted' and lets go of its lease.
    proc = _child(store.root, sleep=0.01)
    _wait_for_checkpoint(checkpoint, 30, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    record = store.get(key)
    assert record.status == "interrupted" and "SIGTERM" in record.error and record.lease is None
    resumed_from = load_state(checkpoint)["step"]

    # SIGKILL of the resumed run: no word from it; its lease is left behind, stale since its pid is gone.
    proc = _child(store.root, sleep=0.01)
    killed_at = _wait_for_checkpoint(checkpoint, resumed_from + 40, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and killed_at < 300
    record = store.get(key)
    assert record.status == "interrupted", "a killed run's lease is stale (its pid is gone): shown interrupted"
    assert record.lease is not None and record.lease.pid == proc.pid and record.lease.stale

    resumed = run(config, store=store, progress=False)  # takes the stale lease over and resumes
    assert resumed.reused is False and resumed.status == "finished"
    assert store.get(key).status == "finished" and store.lease(key) is None
    skip = {"seconds"}
    assert {k: v for k, v in resumed.results.items() if k not in skip} == \
        {k: v for k, v in reference.results.items() if k not in skip}
    _same_weights(checkpoint, reference_store.root / "runs" / key / "checkpoint.safetensors")
    for name in ("val_error", "val_loss", "test_error"):
        assert store.metrics(key)[name] == reference_store.metrics(key)[name], name


def test_two_processes_starting_one_run_train_it_once(tmp_path):
    store = RunStore(tmp_path / "store")
    procs = [_child(store.root, sleep=0.003, wait=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert lines == ["RESULT False finished", "RESULT True finished"], "one trains, the other waits and reuses"
    assert [r.status for r in store.list()] == ["finished"]
