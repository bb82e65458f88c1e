"""Data-parallel training (sparsetrain.distributed): two CPU processes equal one process.

The oracle is the single-process run of the same config at the same global batch: its mask,
final weights and recorded curves. Two processes start, import torch and read MNIST, so each
launch costs several seconds; the launches are few and short (30 iterations).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from sparsetrain import RunConfig, run
from sparsetrain import distributed
from sparsetrain.cli.main import main
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import load_mask
from sparsetrain.state_io import load_state
from sparsetrain.store import RunStore
from sparsetrain.train.loop import Callback

CONFIG = RunConfig(model="lenet-300-100", dataset="mnist").replace(
    prune={"method": "snip", "sparsity": 0.95},
    train={"iterations": 30, "batch_size": 100, "val_every": 10, "checkpoint_every": 10},
)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The oracle: CONFIG trained in this process, recorded in its own store."""
    from conftest import find_mnist_root

    root = find_mnist_root()
    if root is None:
        pytest.skip("no real MNIST")
    store = RunStore(tmp_path_factory.mktemp("one") / "store")
    outcome = run(CONFIG, store=store, data_dir=root, device="cpu", progress=None)
    return store, outcome, root


def _weights(store: RunStore, key: str) -> dict[str, torch.Tensor]:
    return load_state(store.artifact_dir(key) / "checkpoint.safetensors")["model"]


def _assert_same_training(ddp_store: RunStore, one_store: RunStore, key: str) -> None:
    one, two = _weights(one_store, key), _weights(ddp_store, key)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    curves_one, curves_two = one_store.metrics(key), ddp_store.metrics(key)
    assert curves_two.keys() == curves_one.keys()
    for name in ("train_loss", "train_error", "val_error", "val_loss", "test_error"):
        steps_one, values_one = zip(*curves_one[name])
        steps_two, values_two = zip(*curves_two[name])
        assert steps_two == steps_one, name  # each step once: rank 1 logged nothing
        assert values_two == pytest.approx(values_one, rel=1e-5, abs=1e-7), name


@pytest.mark.slow  # two fresh processes import torch and read MNIST: ~10 s quiet, ~25 s on a loaded 2-core machine
def test_two_processes_equal_one_at_the_same_global_batch(one_process, tmp_path, monkeypatch):
    one_store, one, root = one_process
    monkeypatch.chdir(tmp_path)  # anything a rank wrote outside the store would land here
    store = tmp_path / "store"
    outcome = distributed.run_ddp(CONFIG, 2, store=store, data_dir=root, device="cpu", progress=None)
    assert outcome.key == one.key  # the run's identity does not depend on the process count
    assert outcome.results["nproc"] == 2 and "nproc" not in one.results
    ddp_store = RunStore(store)
    # one mask on every rank (run_rank compares their checksums), equal to the one process's
    mask, reference = load_mask(ddp_store.artifact_dir(one.key) / "mask.safetensors"), \
        load_mask(one_store.artifact_dir(one.key) / "mask.safetensors")
    assert mask.keys() == reference.keys()
    assert all(torch.equal(mask[n], reference[n]) for n in mask)
    _assert_same_training(ddp_store, one_store, one.key)
    weights = _weights(ddp_store, one.key)
    for name, kept in mask.items():  # pruned weights stay zero
        assert not weights[name][~kept].any(), name
    # only rank 0 wrote, and only into its store: one run, nothing beside the store
    assert [r.key for r in ddp_store.list()] == [one.key]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    # recorded: found, not trained again, by one process or by two (which then start no process)
    assert run(CONFIG, store=ddp_store, data_dir=root, device="cpu", progress=None).reused
    started = time.monotonic()
    again = distributed.run_ddp(CONFIG, 2, store=store, data_dir=root, device="cpu", progress=None)
    assert again.reused and again.results == outcome.results
    assert time.monotonic() - started < 2.0  # (a launch takes 10 s or more here)


class FailOnRank(Callback):
    """Raises on one rank at one step (the other rank is then stopped by the launcher)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step(self, step, loss):
        if step == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            raise SparsetrainError(f"rank {self.rank} gives up at iteration {step}")
        return None


@pytest.mark.slow  # two launches of two processes: ~20 s quiet, ~50 s on a loaded 2-core machine
def test_a_failed_rank_stops_the_run_which_resumes_from_rank_0s_checkpoint(one_process, tmp_path):
    one_store, one, root = one_process
    store = tmp_path / "store"
    started = time.monotonic()
    with pytest.raises(SparsetrainError, match=r"rank 1 of 2: rank 1 gives up at iteration 25"):
        distributed.run_ddp(CONFIG, 2, store=store, data_dir=root, device="cpu", progress=None,
                            callbacks=[FailOnRank(1, 25)])
    assert time.monotonic() - started < distributed.TIMEOUT_S  # stopped, not timed out
    ddp_store = RunStore(store)
    assert ddp_store.get(one.key).status in ("interrupted", "failed")  # rank 0 was stopped: resumable
    assert load_state(ddp_store.artifact_dir(one.key) / "checkpoint.safetensors")["step"] == 20
    # resumed by the command line in two processes from rank 0's checkpoint (iteration 20) and mask:
    # the same run (the same key as CONFIG's, given as flags)
    code = main(["run", "--model", "lenet-300-100", "--dataset", "mnist", "--method", "snip", "--sparsity", "0.95",
                 "--iterations", "30", "--batch-size", "100", "--val-every", "10", "--checkpoint-every", "10",
                 "--data-dir", str(root), "--store", str(store), "--device", "cpu", "--no-progress", "--nproc", "2"])
    assert code == 0
    assert ddp_store.get(one.key).status == "finished"
    _assert_same_training(ddp_store, one_store, one.key)


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(SparsetrainError, match=r"train.batch_size 100 cannot be split evenly over 3 processes.*"
                                               r"divisible by 3 \(e.g. 99 or 102\)"):
        distributed.run_ddp(CONFIG, 3, store=None)
    with pytest.raises(SparsetrainError, match=r"prune.batch_size 75 cannot be split evenly over 2"):
        distributed.run_ddp(CONFIG.replace(prune={"batch_size": 75}), 2, store=None)
    with pytest.raises(SparsetrainError, match="--nproc must be a whole number of at least 1, got 0"):
        distributed.run_ddp(CONFIG, 0, store=None)


def test_the_command_line_refuses_before_starting_processes(capsys, tmp_path):
    code = main(["run", "--dataset", "synthetic", "--model", "mlp-tiny", "--batch-size", "50", "--iterations", "5",
                 "--nproc", "4", "--store", str(tmp_path / "store"), "--no-progress"])
    assert code == 2
    assert "train.batch_size 50 cannot be split evenly over 4 processes" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_methods_that_cannot_be_averaged_over_slices_are_refused_with_the_way_round():
    with pytest.raises(SparsetrainError, match=r"pruning method 'grasp' cannot find its mask from scores averaged "
                                               r"over 2 processes.*sparsetrain prune --method grasp.*"
                                               r"sparsetrain train --mask mask.safetensors --nproc 2"):
        distributed.run_ddp(CONFIG.replace(prune={"method": "grasp"}), 2, store=None)
    with pytest.raises(SparsetrainError, match="method 'lwc' prunes after training in several recorded runs"):
        distributed.run_ddp(CONFIG.replace(prune={"method": "lwc", "sparsity": 0.5}), 2, store=None)
    for method in ("snip", "force", "random", "magnitude", "synflow"):  # averaged, or data-free
        distributed.check_method(method, method in ("random", "magnitude", "synflow"), 2)


def test_different_masks_on_the_ranks_fail_loudly(monkeypatch):
    """The checksum comparison, with the other rank's checksum made to differ."""
    def another_rank_differs(tensor, op=None):
        tensor.add_(1.0)  # the maximum over the ranks is not this rank's value

    monkeypatch.setattr(distributed.dist, "all_reduce", another_rank_differs)
    ranks = distributed.Ranks(0, 2, torch.device("cpu"))
    mask = {"w": torch.tensor([True, False])}
    with pytest.raises(SparsetrainError, match="the pruning masks differ across the 2 ranks"):
        ranks.check_same_mask(mask)

    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor, op=None: None)  # every rank agrees
    ranks.check_same_mask(mask)


def test_a_rank_takes_its_slice_of_the_global_batch():
    x, y = torch.arange(12.0).view(6, 2), torch.arange(6)
    first, second = distributed.Ranks(0, 3, torch.device("cpu")), distributed.Ranks(2, 3, torch.device("cpu"))
    assert first.shard((x, y))[1].tolist() == [0, 1]
    assert second.shard((x, y))[1].tolist() == [4, 5]
    assert second.shard({"input": x, "labels": y})["input"].tolist() == [[8.0, 9.0], [10.0, 11.0]]


def test_the_key_is_one_process_s_unless_the_model_trains_differently_in_several():
    """LeNet-300-100 trains as one process does in any number: the same key. conv-tiny's batch
    norm normalises each slice on CPU (SyncBatchNorm needs CUDA): its key includes N."""
    from sparsetrain.run import run_key as one_process_key

    lenet = CONFIG
    assert distributed.run_key(lenet, one_process_key(lenet), 2, "cpu") == one_process_key(lenet)
    tiny = CONFIG.replace(model="conv-tiny")
    assert distributed.differs_from_one_process(tiny, "cpu") == [
        "batch normalisation on CPU (each process normalises its slice; SyncBatchNorm needs CUDA)"]
    keys = {distributed.run_key(tiny, one_process_key(tiny), n, "cpu") for n in (1, 2, 4)}
    assert len(keys) == 3 and one_process_key(tiny) in keys
    assert distributed.run_key(tiny, one_process_key(tiny), 2, "cuda") == one_process_key(tiny)  # SyncBatchNorm


class _OneRankAlone(distributed.Ranks):
    """Rank 0 of 2 with no process group: the other rank's callback stops it at ``stop_at``."""

    def __init__(self, stop_at: int):
        super().__init__(0, 1, torch.device("cpu"))
        self.stop_at, self.steps = stop_at, 0

    def from_writer(self, value):
        return value()

    def wrap(self, model):
        return model

    def all_sum(self, values):
        if values.dim() == 0:  # the stop flag, once a step
            self.steps += 1
            return values + (self.steps == self.stop_at)
        return values.clone()


def test_a_callback_that_stops_another_rank_stops_this_one():
    from sparsetrain import TrainConfig, create_loaders, create_model, train

    loaders = create_loaders("synthetic", batch_size=50)
    result = train(create_model("mlp-tiny"), loaders, TrainConfig(iterations=20, val_every=10), progress=None,
                   callbacks=[FailOnRank(rank=1, step=0)], parallel=_OneRankAlone(stop_at=7))
    assert (result.status, result.steps) == ("stopped", 7)
    assert result.stop_reason == "a callback on another rank stopped the run"
    # callbacks that judge evaluations only (the goal error) see the same metrics on every rank: no flag
    from sparsetrain.train.loop import StopAtGoal

    alone = _OneRankAlone(stop_at=7)
    train(create_model("mlp-tiny"), loaders, TrainConfig(iterations=20, val_every=10), progress=None,
          callbacks=[StopAtGoal(0.0)], parallel=alone)
    assert alone.steps == 0


def test_wait_does_not_apply_to_a_data_parallel_run(capsys):
    code = main(["run", "--dataset", "synthetic", "--model", "mlp-tiny", "--iterations", "5", "--nproc", "2",
                 "--wait", "--no-progress"])
    assert code == 2
    assert "--wait does not apply to a data-parallel run (--nproc); leave it out" in capsys.readouterr().err


def test_evaluation_parts_cover_a_batch_of_any_size_once():
    for n, world in ((5, 3), (1, 2), (1000, 2), (7, 4)):
        y = torch.arange(n)
        parts = [distributed.Ranks(r, world, torch.device("cpu")).part((y.float(), y))[1] for r in range(world)]
        assert torch.cat(parts).tolist() == list(range(n)), (n, world)


def test_dropout_gives_the_run_a_key_of_its_own_on_any_device():
    config = CONFIG.replace(model="wrn-16-8", dataset="cifar10", model_args={"dropout": 0.3})
    assert distributed.differs_from_one_process(config, "cuda") == [
        "dropout (each process draws its own masks for its slice)"]
    assert distributed.differs_from_one_process(config.replace(model_args={}), "cuda") == []


def test_under_torchrun_sparsetrain_run_joins_the_group_as_one_rank(monkeypatch, capsys, tmp_path):
    """torchrun sets RANK, WORLD_SIZE and its run id in each process it starts: `sparsetrain run`
    then runs that rank's part (run_rank) instead of starting processes of its own."""
    calls = []
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "run_ddp", lambda *a, **k: pytest.fail("started processes under torchrun"))
    monkeypatch.setattr(distributed, "run_rank", lambda config, **kwargs: calls.append((config, kwargs)))
    code = main(["run", "--dataset", "synthetic", "--model", "mlp-tiny", "--iterations", "5", "--threads", "3",
                 "--store", str(tmp_path / "store"), "--no-progress"])
    assert code == 0 and capsys.readouterr().out == ""  # rank 1 prints nothing
    [(config, kwargs)] = calls
    assert config.model == "mlp-tiny" and kwargs["threads"] == 3 and kwargs["store"] == tmp_path / "store"
