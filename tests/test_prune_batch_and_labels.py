"""The pruning batch size (prune.batch_size: the SNIP paper scores batches of 1 to 10,000 examples)
and random labels (data arg random_labels: the memorization test)."""

from __future__ import annotations

import pytest
import torch

from sparsetrain import RunConfig
from sparsetrain.batches import rebatch
from sparsetrain.cli.main import main
from sparsetrain.data import create_loaders
from sparsetrain.errors import SparsetrainError
from sparsetrain.pipeline import build, find_mask, pruning_batches
from sparsetrain.pruning import prune_at_init
from sparsetrain.store import RunStore


def _first_epoch(loaders) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(loaders.train.batch(i) for i in range(loaders.train.steps_per_epoch)))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("size,count", [(1, 3), (10, 2), (35, 4), (100, 1)])
def test_pruning_batches_are_the_first_examples_in_order(size, count):
    loaders = create_loaders("synthetic", batch_size=20, data_args={"n_train": 300})
    x, y = _first_epoch(loaders)
    got = list(pruning_batches(loaders, count, size))
    assert len(got) == count
    for i, (bx, by) in enumerate(got):
        assert torch.equal(bx, x[i * size:(i + 1) * size]) and torch.equal(by, y[i * size:(i + 1) * size])


def test_pruning_batches_zero_means_the_training_batch_and_the_whole_epoch():
    loaders = create_loaders("synthetic", batch_size=20, data_args={"n_train": 300})
    x, _ = _first_epoch(loaders)
    default = list(pruning_batches(loaders, 2))
    assert [len(b[0]) for b in default] == [20, 20] and torch.equal(default[1][0], x[20:40])
    whole = list(pruning_batches(loaders, 0, 50))  # an epoch is 13 batches of 20 (260 examples): 5 batches of 50
    assert [len(b[0]) for b in whole] == [50] * 5
    assert torch.equal(torch.cat([b[0] for b in whole]), x[:250])


def test_too_many_pruning_examples_is_refused_with_what_to_lower():
    loaders = create_loaders("synthetic", batch_size=20, data_args={"n_train": 300})
    with pytest.raises(SparsetrainError, match="an epoch of the training split has 260.*lower prune.batch_size"):
        pruning_batches(loaders, 1, 1000)


def test_rebatch_of_dict_batches_and_running_out():
    parts = [{"input_ids": torch.arange(4).reshape(2, 2), "labels": torch.tensor([0, 1])}] * 3
    got = list(rebatch(parts, 3, 2))
    assert got[0]["labels"].tolist() == [0, 1, 0] and got[1]["input_ids"].tolist() == [[2, 3], [0, 1], [2, 3]]
    with pytest.raises(SparsetrainError, match="fewer than the 3 batches of 3"):
        list(rebatch(parts, 3, 3))


def test_snip_on_a_pruning_batch_of_one_scores_that_example():
    config = RunConfig(model="mlp-tiny", dataset="synthetic", seed=3).replace(
        prune={"sparsity": 0.8, "batch_size": 1}, train={"batch_size": 20})
    built = build(config, device="cpu")
    first = built.loaders.train.batch(0)
    expected = prune_at_init(built.model, "snip", sparsity=0.8, batches=[(first[0][:1], first[1][:1])], seed=3)
    mask = find_mask(config, built)
    assert all(torch.equal(mask[k], expected[k]) for k in expected)
    other = find_mask(config.replace(prune={"batch_size": 0}), built)  # the whole first training batch
    assert any(not torch.equal(other[k], expected[k]) for k in expected)


def test_batch_size_is_recorded_only_when_set(tmp_path):
    base = RunConfig(model="mlp-tiny", dataset="synthetic")
    assert base.key() == base.replace(prune={"batch_size": 0}).key()
    assert base.key() != base.replace(prune={"batch_size": 1}).key()
    with pytest.raises(SparsetrainError, match="prune.batch_size"):
        base.replace(prune={"batch_size": -1})
    store = tmp_path / "runs"
    assert main(["run", "--model", "mlp-tiny", "--dataset", "synthetic", "--sparsity", "0.5", "--iterations", "3",
                 "--prune-batch-size", "1", "--store", str(store), "--no-progress"]) == 0
    (record,) = RunStore(store).list()
    assert record.config["prune"]["batch_size"] == 1


def test_random_labels_replace_train_and_val_labels_not_test():
    args = {"n_train": 2000, "n_test": 300}
    true = create_loaders("synthetic", batch_size=50, data_args=args, val_fraction=0.1)
    rand = create_loaders("synthetic", batch_size=50, data_args=args | {"random_labels": True}, val_fraction=0.1)
    again = create_loaders("synthetic", batch_size=50, data_args=args | {"random_labels": True}, val_fraction=0.1)
    assert torch.equal(true.train.x, rand.train.x) and torch.equal(true.test.y, rand.test.y)
    assert torch.equal(rand.train.y, again.train.y) and torch.equal(rand.val.y, again.val.y)
    agree = (true.train.y == rand.train.y).float().mean().item()
    assert 0.05 < agree < 0.15  # independent of the true class: about 1 in 10
    counts = torch.bincount(rand.train.y, minlength=10)
    assert counts.min() > 130 and counts.max() < 230  # uniform over the 10 classes (1800 labels)
    assert not torch.equal(true.val.y, rand.val.y)
    other = create_loaders("synthetic", batch_size=50, data_args=args | {"random_labels": True}, val_fraction=0.1,
                           split_seed=1)
    assert (other.train.y == rand.train.y).float().mean().item() < 0.3  # another seed, other labels
