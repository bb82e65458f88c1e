"""run(): prune, train, test and record; reuse, force, resume, reinit, and bad input.

Everything runs on the synthetic data set (600 train / 200 test, 10 classes, 1x28x28) with
mlp-tiny (784-32-10) for a few dozen iterations.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.init import initialize_
from sparsetrain.models import create_model
from sparsetrain.run import run
from sparsetrain.state_io import load_state
from sparsetrain.store import RunStore

# ``sparsetrain.run`` the attribute is the function (re-exported by the package), so
# ``import sparsetrain.run as m`` gives the function; the module is fetched by name.
run_module = importlib.import_module("sparsetrain.run")
# the stages the run calls (train, prune_at_init) live in the pipeline module
pipeline_module = importlib.import_module("sparsetrain.pipeline")

# mlp-tiny's prunable weights (biases are not pruned by default): 784 x 32 and 32 x 10.
MLP_TINY_WEIGHTS = {"1.weight": (32, 784), "3.weight": (10, 32)}
MLP_TINY_M = 784 * 32 + 32 * 10  # 25,408
SYNTHETIC_TRAIN = 600 - 60  # 10% held out for validation


def tiny(sparsity: float = 0.9, iterations: int = 40, **changes) -> RunConfig:
    prune = {"sparsity": sparsity, **changes.pop("prune", {})}
    train = {"iterations": iterations, "val_every": 20, "checkpoint_every": 20, **changes.pop("train", {})}
    return RunConfig(model="mlp-tiny", dataset="synthetic", name="tiny").replace(prune=prune, train=train, **changes)


def artifacts(store: RunStore, key: str):
    return store.root / "runs" / key


def test_run_prunes_trains_and_records(tmp_path):
    store = RunStore(tmp_path / "store")
    config = tiny(sparsity=0.9, iterations=60)
    outcome = run(config, store=store, progress=False)

    assert outcome.reused is False and outcome.key == config.key()
    r = outcome.results
    for k in ("test_error_final", "test_error_best_val", "best_val_error"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["steps"] == 60 and r["device"] == "cpu"
    assert r["test_error_final"] < 0.5, "training must beat chance (0.9) clearly"
    assert r["best_val_step"] in (20, 40, 60)

    # exact kept count: kappa = round(m * (1 - s)) over all prunable weights
    kept = round(MLP_TINY_M * (1 - 0.9))
    layers = {n: v for n, v in outcome.layer_sparsity.items() if "left_out" not in v}
    assert set(layers) == set(MLP_TINY_WEIGHTS)
    # the tensors left dense are listed with the reason
    left_out = {n: v["left_out"] for n, v in outcome.layer_sparsity.items() if "left_out" in v}
    assert set(left_out) == {"1.bias", "3.bias"} and all("bias" in why for why in left_out.values())
    for name, shape in MLP_TINY_WEIGHTS.items():
        assert tuple(layers[name]["shape"]) == shape
        assert layers[name]["total"] == shape[0] * shape[1]
        assert layers[name]["sparsity"] == pytest.approx(1 - layers[name]["kept"] / layers[name]["total"])
    assert sum(v["kept"] for v in layers.values()) == kept
    assert r["sparsity"] == pytest.approx(1 - kept / MLP_TINY_M, abs=1e-12)

    # the record
    record = store.get(config.key())
    assert record.status == "finished" and record.name == "tiny"
    assert record.results == r and record.layer_sparsity == outcome.layer_sparsity
    assert RunConfig.from_dict(record.config) == config
    curves = store.metrics(config.key())
    assert [s for s, _ in curves["val_error"]] == [20, 40, 60]
    assert curves["test_error"][-1] == (60, r["test_error_final"])

    # the mask on disk is the one trained: pruned weights are exactly zero at the end
    mask = load_file(str(artifacts(store, config.key()) / "mask.safetensors"))
    assert sum(int(m.sum()) for m in mask.values()) == kept
    final = load_state(artifacts(store, config.key()) / "checkpoint.safetensors")
    assert final["step"] == 60
    for name, m in mask.items():
        w = final["model"][name]
        assert bool((w[~m.bool()] == 0).all()), name
        assert int((w[m.bool()] != 0).sum()) == int(m.sum())  # kept weights did train


def test_same_config_is_reused_without_training(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "store")
    config = tiny(iterations=20)
    first = run(config, store=store, progress=False)

    def must_not_train(*args, **kwargs):
        raise AssertionError("train() called for a finished run")

    monkeypatch.setattr(pipeline_module, "train", must_not_train)
    again = run(config, store=store, progress=False)
    assert again.reused is True
    assert again.results == first.results and again.layer_sparsity == first.layer_sparsity
    # a different name is the same run
    assert run(config.replace(name="other"), store=store, progress=False).reused is True
    # but a different seed is not
    with pytest.raises(AssertionError, match="finished run"):
        run(config.replace(seed=1), store=store, progress=False)


def test_force_runs_again(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "store")
    config = tiny(iterations=20)
    first = run(config, store=store, progress=False)
    calls = []
    real_train = pipeline_module.train
    monkeypatch.setattr(pipeline_module, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    again = run(config, store=store, progress=False, force=True)
    assert calls == [1] and again.reused is False
    assert again.results["test_error_final"] == first.results["test_error_final"]  # deterministic on CPU
    assert store.get(config.key()).status == "finished"
    assert len(store.list()) == 1


def test_store_none_records_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = run(tiny(iterations=20), store=None, progress=False)
    assert outcome.reused is False and 0 <= outcome.results["test_error_final"] <= 1
    assert list(tmp_path.iterdir()) == []


def test_default_store_is_sparsetrain_home(tmp_path, monkeypatch):
    home = tmp_path / "home-store"
    monkeypatch.setenv("SPARSETRAIN_HOME", str(home))
    outcome = run(tiny(iterations=20), progress=False)
    assert RunStore(home).get(outcome.key).status == "finished"


def test_interrupted_run_resumes_bit_identically(tmp_path, monkeypatch):
    config = tiny(sparsity=0.8, iterations=60)  # checkpoints at 20 and 40
    reference_store = RunStore(tmp_path / "reference")
    reference = run(config, store=reference_store, progress=False)

    store = RunStore(tmp_path / "interrupted")
    real_log = RunStore.log_metrics
    logged_steps = []
    armed = [True]

    def log_then_interrupt(self, key, step, metrics):
        if armed[0] and step >= 50:  # after the checkpoint at step 40
            armed[0] = False
            raise KeyboardInterrupt
        logged_steps.append(step)
        return real_log(self, key, step, metrics)

    monkeypatch.setattr(RunStore, "log_metrics", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(config, store=store, progress=False)
    record = store.get(config.key())
    assert record.status == "interrupted" and "KeyboardInterrupt" in record.error  # Ctrl-C: resumable
    assert store.lease(config.key()) is None, "the lease is released when the run ends"
    assert load_state(artifacts(store, config.key()) / "checkpoint.safetensors")["step"] == 40

    logged_steps.clear()
    resumed = run(config, store=store, progress=False)
    assert resumed.reused is False
    assert min(logged_steps) > 40, "the second run must continue from the checkpoint, not start over"
    assert store.get(config.key()).status == "finished"

    skip = {"seconds"}  # wall time differs
    assert {k: v for k, v in resumed.results.items() if k not in skip} == \
        {k: v for k, v in reference.results.items() if k not in skip}
    assert resumed.layer_sparsity == reference.layer_sparsity

    a = load_state(artifacts(store, config.key()) / "checkpoint.safetensors")
    b = load_state(artifacts(reference_store, config.key()) / "checkpoint.safetensors")
    assert a["step"] == b["step"] == 60
    assert a["model"].keys() == b["model"].keys()
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in b["best_model"]:
        assert torch.equal(a["best_model"][name], b["best_model"][name]), name
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momentum_a) == len(momentum_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    # the curves after the resume point match too
    ma, mb = store.metrics(config.key()), reference_store.metrics(config.key())
    assert ma["val_error"] == mb["val_error"] and ma["test_error"] == mb["test_error"]


def test_dense_method_has_no_sparsity(tmp_path):
    store = RunStore(tmp_path / "store")
    outcome = run(tiny(iterations=20, prune={"method": "dense"}), store=store, progress=False)
    assert outcome.results["sparsity"] == 0.0
    model = create_model("mlp-tiny")
    assert {n: v["total"] for n, v in outcome.layer_sparsity.items()} == {n: p.numel() for n, p in model.named_parameters()}
    assert all(v["kept"] == v["total"] and v["sparsity"] == 0.0 for v in outcome.layer_sparsity.values())
    assert not (artifacts(store, outcome.key) / "mask.safetensors").exists()
    assert 0 <= outcome.results["test_error_final"] <= 1


@pytest.mark.parametrize("batches, expected", [(0, SYNTHETIC_TRAIN // 100), (2, 2)])
def test_prune_batches(batches, expected, monkeypatch):
    seen = []
    real = pipeline_module.prune_at_init

    def counting(model, method, *, batches, **kwargs):
        batches = list(batches)
        seen.append(len(batches))
        assert all(x.shape == (100, 1, 28, 28) for x, _ in batches)
        return real(model, method, batches=batches, **kwargs)

    monkeypatch.setattr(pipeline_module, "prune_at_init", counting)
    outcome = run(tiny(sparsity=0.5, iterations=20, prune={"batches": batches}), store=None, progress=False)
    assert seen == [expected]  # 0 = one whole epoch of the training split
    assert sum(v["kept"] for v in outcome.layer_sparsity.values() if "left_out" not in v) == round(MLP_TINY_M * 0.5)


def test_reinit_trains_a_fresh_draw_under_the_same_mask(tmp_path, monkeypatch):
    starts = []
    real_train = pipeline_module.train

    def capture(model, *args, **kwargs):
        starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "train", capture)
    store = RunStore(tmp_path / "store")
    plain = tiny(sparsity=0.9, iterations=20, init="variance-scaling")
    fresh = plain.replace(prune={"reinit": "variance-scaling-zero-bias"})
    a = run(plain, store=store, progress=False)
    b = run(fresh, store=store, progress=False)
    assert a.key != b.key

    mask_a = load_file(str(artifacts(store, a.key) / "mask.safetensors"))
    mask_b = load_file(str(artifacts(store, b.key) / "mask.safetensors"))
    assert mask_a.keys() == mask_b.keys() == MLP_TINY_WEIGHTS.keys()
    assert all(torch.equal(mask_a[n], mask_b[n]) for n in mask_a)  # scored on the same weights

    # without reinit, training starts from the scored weights (the init scheme's draw), masked
    scored = initialize_(create_model("mlp-tiny"), "variance-scaling", seed=0)
    for n, p in scored.named_parameters():
        expected = p.detach() * mask_a[n].to(p.dtype) if n in mask_a else p.detach()
        assert torch.equal(starts[0][n], expected), n
    # with reinit, from another draw: same mask, zero biases, different kept weights
    for n in mask_b:
        m = mask_b[n].bool()
        assert bool((starts[1][n][~m] == 0).all())
        assert not torch.equal(starts[1][n][m], starts[0][n][m])
    assert all(bool((starts[1][n] == 0).all()) for n in ("1.bias", "3.bias"))
    assert not all(bool((starts[0][n] == 0).all()) for n in ("1.bias", "3.bias"))

    wa = load_state(artifacts(store, a.key) / "checkpoint.safetensors")["model"]
    wb = load_state(artifacts(store, b.key) / "checkpoint.safetensors")["model"]
    assert not torch.equal(wa["1.weight"], wb["1.weight"])


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_bad_sparsity(sparsity, tmp_path):
    store = RunStore(tmp_path / "store")
    with pytest.raises(SparsetrainError, match=r"sparsity must be a fraction in \[0, 1\)"):
        run(tiny(sparsity=sparsity), store=store, progress=False)
    assert store.list() == []  # refused before anything was recorded


@pytest.mark.parametrize(
    "changes, wrong, suggestion",
    [
        ({"model": "lenet-300"}, "lenet-300", "lenet-300-100"),
        ({"dataset": "mnits"}, "mnits", "mnist"),
        ({"prune": {"method": "snp"}}, "snp", "snip"),
        ({"init": "variance_scaling"}, "variance_scaling", "variance-scaling"),
        ({"prune": {"reinit": "varience-scaling"}}, "varience-scaling", "variance-scaling"),
        ({"train": {"optimizer": "adamm"}}, "adamm", "adam"),
        ({"train": {"schedule": "cosin"}}, "cosin", "cosine"),
    ],
)
def test_unknown_names_suggest_close_matches(changes, wrong, suggestion, tmp_path):
    store = RunStore(tmp_path / "store")
    with pytest.raises(SparsetrainError) as info:
        run(tiny().replace(**changes), store=store, progress=False)
    message = str(info.value)
    assert repr(wrong) in message and repr(suggestion) in message
    assert store.list() == []


def test_other_bad_values(tmp_path):
    with pytest.raises(SparsetrainError, match="scope"):
        run(tiny(prune={"scope": "per-layer"}), store=None, progress=False)
    with pytest.raises(SparsetrainError, match="batches"):
        run(tiny(prune={"batches": -1}), store=None, progress=False)
    with pytest.raises(SparsetrainError, match="exactly one of train.iterations or train.epochs"):
        run(tiny(train={"epochs": 1.0}), store=None, progress=False)


def test_missing_data_set_names_the_folder_and_the_files(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    store = RunStore(tmp_path / "store")
    config = tiny().replace(dataset="mnist")
    with pytest.raises(SparsetrainError) as info:
        run(config, store=store, data_dir=empty, download=True, progress=False)
    message = str(info.value)
    assert str(empty / "mnist") in message
    for base in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert base in message
    assert "no-such-mirror" in message  # the (dead) mirror it tried
    record = store.get(config.key())
    assert record.status == "failed" and "not found" in record.error
