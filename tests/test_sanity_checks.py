"""Frankle et al. (2021)'s sanity checks: the layerwise shuffle (same per-layer counts, random
positions, seeded) and re-initialisation (same mask, fresh weights), as functions and in a run."""

import pytest
import torch
import torch.nn as nn

from sparsetrain import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.init import initialize_
from sparsetrain.masks import Mask
from sparsetrain.pipeline import build, find_mask, init_under_mask, validate
from sparsetrain.pruning import prune_at_init
from sparsetrain.pruning.sanity import reinitialize, shuffle_layerwise


def _mask():
    g = torch.Generator().manual_seed(3)
    return Mask({"a": torch.rand(20, 30, generator=g) < 0.1, "b": torch.rand(4, 3, 5, 5, generator=g) < 0.5},
                left_out={"a_bias": "1-D"})


def test_shuffle_keeps_every_layers_count_and_moves_the_positions():
    mask = _mask()
    shuffled = shuffle_layerwise(mask, seed=0)
    for name, m in mask.items():
        assert shuffled[name].shape == m.shape and shuffled[name].dtype == torch.bool
        assert int(shuffled[name].sum()) == int(m.sum())
        assert not torch.equal(shuffled[name], m)
    assert shuffled.left_out == {"a_bias": "1-D"}
    assert all(torch.equal(x, y) for x, y in zip(mask.values(), _mask().values()))  # the input is not changed


def test_shuffle_is_seeded_and_independent_of_the_global_torch_seed():
    mask = _mask()
    torch.manual_seed(1)
    first = shuffle_layerwise(mask, seed=7)
    torch.manual_seed(2)
    again = shuffle_layerwise(mask, seed=7)
    other = shuffle_layerwise(mask, seed=8)
    assert all(torch.equal(first[n], again[n]) for n in mask)
    assert any(not torch.equal(first[n], other[n]) for n in mask)


def test_shuffle_positions_are_uniform_over_the_layer():
    # One kept entry of 10, shuffled with 2000 seeds: each position about 200 times (an independent
    # count: a biased permutation would favour its first or last positions).
    mask = {"w": torch.tensor([True] + [False] * 9)}
    counts = torch.zeros(10)
    for seed in range(2000):
        counts += shuffle_layerwise(mask, seed)["w"].float()
    assert counts.sum() == 2000 and counts.min() > 140 and counts.max() < 260


def test_shuffle_refuses_a_mask_that_is_not_boolean():
    with pytest.raises(SparsetrainError, match="needs a boolean mask tensor for 'w'"):
        shuffle_layerwise({"w": torch.rand(3)}, seed=0)


def test_reinitialize_keeps_the_mask_and_draws_the_weights_of_the_scheme():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = prune_at_init(model, "magnitude", sparsity=0.5)
    reinitialize(model, "variance-scaling-zero-bias", seed=5, mask=mask)
    oracle = initialize_(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), "variance-scaling-zero-bias", 5)
    for name, p in model.named_parameters():
        expected = dict(oracle.named_parameters())[name].detach()
        if name in mask:
            expected = expected * mask[name]
            assert int((p != 0).sum()) <= int(mask[name].sum())
        assert torch.equal(p.detach(), expected)
        assert not torch.equal(p.detach(), before[name])


def test_a_run_with_prune_shuffle_has_the_methods_layer_counts_at_other_positions():
    config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(prune={"method": "magnitude", "sparsity": 0.8})
    built = build(config, device="cpu")
    plain = find_mask(config, built)
    shuffled_config = config.replace(prune={"shuffle": True})
    shuffled = find_mask(shuffled_config, built)
    assert {n: int(m.sum()) for n, m in shuffled.items()} == {n: int(m.sum()) for n, m in plain.items()}
    assert any(not torch.equal(shuffled[n], plain[n]) for n in plain)
    expected = shuffle_layerwise(plain, config.seed)  # the run's seed draws the permutation
    assert all(torch.equal(shuffled[n], expected[n]) for n in plain)
    assert shuffled_config.key() != config.key()
    model, _ = init_under_mask(shuffled_config, built, shuffled)
    for name, p in model.named_parameters():
        if name in shuffled:
            assert not bool(p[~shuffled[name]].any())


@pytest.mark.parametrize("prune, message", [
    ({"method": "dense", "shuffle": True}, "method 'dense' makes none"),
    ({"shuffle": True, "structure": "2:4", "sparsity": 0.5}, "would break structure '2:4'"),
])
def test_shuffle_settings_that_cannot_work_are_refused(prune, message):
    with pytest.raises(SparsetrainError, match=message):
        validate(RunConfig().replace(prune=prune))
