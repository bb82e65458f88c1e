"""Pruning after training (lwc, lottery): masks, start weights, rounds, parent links, reuse, resume
and bad options, against oracles computed here (torch.topk on the |w| of the recorded weights, the
init drawn again by hand, a dense run stopped at the rewind point).

mlp-tiny (784-32-10) on the synthetic set, a few dozen iterations per run.
"""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

from sparsetrain import fsio
from sparsetrain.cli.main import main
from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.init import initialize_
from sparsetrain.masks import load_mask
from sparsetrain.models import create_model
from sparsetrain.pipeline import build, find_mask
from sparsetrain.run import run
from sparsetrain.state_io import load_state
from sparsetrain.store import RunStore

run_module = importlib.import_module("sparsetrain.run")

WEIGHTS = ("1.weight", "3.weight")  # mlp-tiny's prunable set (biases are not pruned by default)
M = 784 * 32 + 32 * 10


def tiny(method: str, sparsity: float, iterations: int = 30, **options) -> RunConfig:
    return RunConfig(model="mlp-tiny", dataset="synthetic").replace(
        prune={"method": method, "sparsity": sparsity, "options": options},
        train={"iterations": iterations, "val_every": 10, "checkpoint_every": 10})


@pytest.fixture
def starts(monkeypatch):
    """The weights each training run starts from, in order (a copy taken as the stage is called)."""
    seen: list[dict[str, torch.Tensor]] = []
    real = run_module.train_stage

    def recording(config, built, model, hooks, mask, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(config, built, model, hooks, mask, **kwargs)

    monkeypatch.setattr(run_module, "train_stage", recording)
    return seen


def chain(store: RunStore, key: str) -> list:
    """The records from ``key`` up through its parents: last round first, the dense run last."""
    records = [store.get(key)]
    while records[-1].parent is not None:
        records.append(store.get(records[-1].parent))
    return records


def final_model(store: RunStore, key: str) -> dict[str, torch.Tensor]:
    return load_state(store.root / "runs" / key / "checkpoint.safetensors")["model"]


def saved_mask(store: RunStore, key: str) -> dict[str, torch.Tensor]:
    return dict(load_mask(store.root / "runs" / key / "mask.safetensors"))


def top_kappa(weights: dict[str, torch.Tensor], kappa: int, alive: dict[str, torch.Tensor] | None = None):
    """The oracle: torch.topk over the concatenated |w| (pruned entries below every kept one)."""
    flat = torch.cat([weights[n].abs().flatten() if alive is None else
                      torch.where(alive[n], weights[n].abs(), torch.tensor(-1.0)).flatten() for n in WEIGHTS])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, kappa).indices] = True
    out, at = {}, 0
    for n in WEIGHTS:
        size = weights[n].numel()
        out[n] = keep[at:at + size].view_as(weights[n])
        at += size
    return out


def test_lwc_prunes_the_trained_weights_by_magnitude_and_retrains_from_them(tmp_path, starts):
    store = RunStore(tmp_path)
    config = tiny("lwc", 0.9)
    outcome = run(config, store=store, progress=None)

    child, dense = chain(store, outcome.key)
    assert outcome.key == child.key == config.key() and dense.config["prune"]["method"] == "dense"
    assert child.group == dense.group and child.config["prune"]["method"] == "lwc"
    trained = final_model(store, dense.key)
    expected = top_kappa(trained, round(M * 0.1))
    mask = saved_mask(store, child.key)
    assert all(torch.equal(mask[n], expected[n]) for n in WEIGHTS)
    # two runs trained: the dense one from its init, the child from the trained weights times the mask
    assert len(starts) == 2
    for name, value in trained.items():
        assert torch.equal(starts[1][name], value * mask[name] if name in mask else value), name
    assert outcome.results["sparsity"] == pytest.approx(1 - round(M * 0.1) / M)


def test_lwc_rounds_prune_each_retrained_network_in_turn(tmp_path, starts):
    store = RunStore(tmp_path)
    config = tiny("lwc", 0.99, iterations=20).replace(prune={"rounds": 2}, train={"iterations": 20})
    config = config.replace(prune={"options": {"iterations": 10, "lr_factor": 0.1}})
    run(config, store=store, progress=None)

    second, first, dense = chain(store, config.key())
    assert first.config["prune"]["sparsity"] == pytest.approx(0.9) and second.config["train"]["iterations"] == 10
    assert second.results["steps"] == 10 and second.config["train"]["lr"] == pytest.approx(0.01)
    first_mask = top_kappa(final_model(store, dense.key), round(M * 0.1))
    assert all(torch.equal(saved_mask(store, first.key)[n], first_mask[n]) for n in WEIGHTS)
    second_mask = top_kappa(final_model(store, first.key), round(M * 0.01), alive=first_mask)
    assert all(torch.equal(saved_mask(store, second.key)[n], second_mask[n]) for n in WEIGHTS)
    assert torch.equal(starts[2]["1.weight"], final_model(store, first.key)["1.weight"] * second_mask["1.weight"])


def test_lottery_rewinds_to_the_init_and_reaches_the_target_in_nested_rounds(tmp_path, starts):
    store = RunStore(tmp_path)
    config = tiny("lottery", 0.8, fraction=0.5)  # rounds at 50%, 75%, then the rest to 80%
    run(config, store=store, progress=None)

    records = chain(store, config.key())[::-1]  # dense, round 1, 2, 3
    assert [r.config["prune"]["sparsity"] for r in records] == pytest.approx([0.0, 0.5, 0.75, 0.8])
    assert len({r.group for r in records}) == 1 and records[0].parent is None
    init = create_model("mlp-tiny")
    initialize_(init, "default", 0)  # the dense run's iteration 0, drawn again
    masks = [saved_mask(store, r.key) for r in records[1:]]
    alive = None
    for parent, mask, start, sparsity in zip(records, masks, starts[1:], (0.5, 0.75, 0.8)):
        expected = top_kappa(final_model(store, parent.key), round(M * (1 - sparsity)), alive)
        assert all(torch.equal(mask[n], expected[n]) for n in WEIGHTS)
        assert sum(int(mask[n].sum()) for n in WEIGHTS) == round(M * (1 - sparsity))  # exactly kappa
        if alive is not None:
            assert all(bool((mask[n] <= alive[n]).all()) for n in WEIGHTS)  # a subset of the last round's
        for name, value in init.state_dict().items():
            assert torch.equal(start[name], value * mask[name] if name in mask else value), name
        alive = mask


def test_lottery_rewinds_to_iteration_k_kept_by_the_dense_run_or_replayed(tmp_path, starts):
    config = tiny("lottery", 0.36, rewind=10)  # two rounds of 20%
    dense = config.replace(prune={"method": "dense", "sparsity": 0.0, "options": {}})
    # the oracle: a separate dense run of 10 iterations (the constant-rate schedule of the first 10 of 30)
    oracle_store = RunStore(tmp_path / "oracle")
    run(dense.replace(train={"iterations": 10}), store=oracle_store, progress=None)
    at_10 = final_model(oracle_store, dense.replace(train={"iterations": 10}).key())

    kept = RunStore(tmp_path / "kept")  # the lottery run trains its dense parent: it keeps iteration 10
    run(config, store=kept, progress=None)
    replayed = RunStore(tmp_path / "replayed")  # the dense run recorded first, without it: replayed
    run(dense, store=replayed, progress=None)
    assert not (replayed.root / "runs" / dense.key() / "weights-10.safetensors").exists()
    run(config, store=replayed, progress=None)

    for store in (kept, replayed):
        records = chain(store, config.key())
        assert records[-1].key == dense.key() and len(records) == 3
        assert (store.root / "runs" / dense.key() / "weights-10.safetensors").exists()
    # starts: oracle dense, kept dense, 2 rounds, replayed dense, 2 rounds
    for store, rounds in ((kept, starts[2:4]), (replayed, starts[5:7])):
        for record, start in zip(chain(store, config.key())[-2::-1], rounds):
            mask = saved_mask(store, record.key)
            for name, value in at_10.items():
                assert torch.equal(start[name], value * mask[name] if name in mask else value), name


def test_lottery_chains_to_two_targets_share_their_first_rounds(tmp_path, starts):
    store = RunStore(tmp_path)
    run(tiny("lottery", 0.7, fraction=0.5), store=store, progress=None)  # dense, 50%, 70%
    run(tiny("lottery", 0.8, fraction=0.5), store=store, progress=None)  # 75% and 80% new
    assert len(starts) == 5 and len(store.list()) == 5
    assert chain(store, tiny("lottery", 0.8, fraction=0.5).key())[2].key == chain(
        store, tiny("lottery", 0.7, fraction=0.5).key())[1].key  # the 50% round


def test_a_rerun_trains_nothing_and_a_killed_round_resumes(tmp_path, starts):
    config = tiny("lottery", 0.5, fraction=0.3)  # 30%, then the rest to 50%
    whole = RunStore(tmp_path / "whole")
    expected = run(config, store=whole, progress=None)
    assert len(starts) == 3
    again = run(config, store=whole, progress=None)
    assert again.reused and again.results == expected.results and len(starts) == 3

    class KillOnce:  # Ctrl-C at iteration 15 of the second round
        runs = 0

        def on_step(self, step, loss):
            self.runs += step == 1
            if self.runs == 3 and step == 15:
                raise KeyboardInterrupt
            return None

        def on_eval(self, step, metrics):
            return None

    store = RunStore(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        run(config, store=store, progress=None, callbacks=[KillOnce()])
    assert store.get(config.key()).status == "interrupted"
    del starts[:]
    resumed = run(config, store=store, progress=None)
    assert len(starts) == 1  # the dense run and the first round reused, the second round resumed
    assert resumed.results["test_error_final"] == expected.results["test_error_final"]
    assert torch.equal(final_model(store, config.key())["1.weight"], final_model(whole, config.key())["1.weight"])


def test_the_cli_runs_lwc_and_runs_show_names_the_parent(tmp_path, capsys):
    store = tmp_path / "store"
    argv = ["run", "--model", "mlp-tiny", "--dataset", "synthetic", "--method", "lwc", "--sparsity", "0.8",
            "--iterations", "20", "--store", str(store), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lwc at 80.00% sparsity" in out
    key = out.split()[1]
    parent = RunStore(store).get(key).parent
    assert main(["runs", "--store", str(store), "show", key]) == 0
    assert f"parent {parent}" in capsys.readouterr().out
    assert main(["list", "methods", "--pattern", "l*"]) == 0
    listed = capsys.readouterr().out
    assert "lwc  (prunes after training" in listed and "lottery  (prunes after training" in listed


def test_without_a_store_the_runs_live_in_a_temporary_one(tmp_path):
    outcome = run(tiny("lwc", 0.5, iterations=10), store=None, progress=None)
    assert outcome.results["sparsity"] == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("changes, words", [
    ({"options": {"rewind": 31}}, "past the end of the dense run (30 iterations)"),
    ({"options": {"fraction": 0.0}}, "must lie in (0, 1)"),
    ({"options": {"fraction": 1.0}}, "must lie in (0, 1)"),
    ({"sparsity": 0.999, "options": {"max_rounds": 5}}, "it takes 31"),
    ({"rounds": 3}, "leave prune.rounds at 1"),
    ({"sparsity": 0.0}, "use method 'dense'"),
    ({"shuffle": True}, "prune.shuffle does not apply"),
    ({"options": {"rewnd": 3}}, "valid options: fraction, rewind, max_rounds"),
    ({"method": "lwc", "options": {"lr_factor": 0.0}}, "must be a positive number"),
    ({"method": "lwc", "options": {"iterations": -1}}, "must be >= 0"),
])
def test_bad_lottery_settings_are_refused_before_anything_runs(tmp_path, changes, words):
    config = tiny("lottery", 0.9).replace(prune=changes)
    with pytest.raises(SparsetrainError) as err:
        run(config, store=tmp_path / "store", progress=None)
    assert words in str(err.value)
    assert not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").iterdir())


def test_a_rewind_past_the_dense_runs_end_and_a_mask_at_init_are_refused(tmp_path):
    config = tiny("lottery", 0.5, rewind=100).replace(train={"iterations": 0, "epochs": 1.0})  # 540 // 100 steps
    with pytest.raises(SparsetrainError, match=r"past the end of the dense run \(5 iterations\)"):
        run(config, store=tmp_path, progress=None)
    assert RunStore(tmp_path).list() == []  # refused before the dense run began
    stopped = tiny("lottery", 0.5, rewind=20).replace(train={"goal_error": 0.5})  # stops at its first check, 10
    with pytest.raises(SparsetrainError, match=r"stopped at iteration 10 \(val_error .*before the rewind point 20"):
        run(stopped, store=tmp_path, progress=None)
    with pytest.raises(SparsetrainError, match="prunes a trained network"):
        find_mask(tiny("lwc", 0.5), build(tiny("lwc", 0.5)))


def test_a_dense_parent_another_process_trains_is_waited_for_not_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("sparsetrain.store"), "LEASE_POLL_S", 0.02)
    store = RunStore(tmp_path)
    config = tiny("lwc", 0.9, iterations=10)  # a table's other sparsities prune the same dense run
    dense_key = config.replace(prune={"method": "dense", "sparsity": 0.0, "options": {}}).key()
    held = store.take_lease(dense_key)  # as a worker training that dense run holds it
    threading.Timer(0.3, held.release).start()
    outcome = run(config, store=store, progress=None)  # wait=False: only the config's own run is refused
    assert outcome.status == "finished" and store.get(outcome.key).parent == dense_key


def test_a_full_disk_at_the_rewind_point_fails_the_dense_run_resumably(tmp_path):
    config = tiny("lottery", 0.2, iterations=20, rewind=10)  # one round
    dense_key = config.replace(prune={"method": "dense", "sparsity": 0.0, "options": {}}).key()
    reference = RunStore(tmp_path / "reference")
    run(config, store=reference, progress=None)
    store = RunStore(tmp_path / "full")
    with fsio.simulate_full_disk("checkpoint"), pytest.raises(SparsetrainError) as err:
        run(config, store=store, progress=None)
    assert "cannot write the checkpoint" in str(err.value) and "weights-10.safetensors" in str(err.value)
    assert store.get(dense_key).status == "failed" and store.get(config.key()) is None
    run(config, store=store, progress=None)  # the disk has room again: the same result
    assert torch.equal(load_state(store.root / "runs" / dense_key / "weights-10.safetensors")["model"]["1.weight"],
                       load_state(reference.root / "runs" / dense_key / "weights-10.safetensors")["model"]["1.weight"])
    assert torch.equal(final_model(store, config.key())["1.weight"], final_model(reference, config.key())["1.weight"])
