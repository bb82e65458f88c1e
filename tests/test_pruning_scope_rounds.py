"""The self-iterating methods (SynFlow, iterative SNIP, FORCE) select every round with the caller's
scope: with ``scope="layerwise"`` each round keeps each layer's budget at that round's sparsity,
and (without revival) no pruned entry comes back; a block structure holds in every round, not only
the last; the global masks are what they were before the
scope reached the rounds (pinned below from the code before that change)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sparsetrain.pruning import force as force_module
from sparsetrain.pruning import prune_at_init
from sparsetrain.pruning import synflow as synflow_module

ROUNDS, SPARSITY = 5, 0.9


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(20, 10, generator=g, dtype=torch.float64), torch.randint(0, 4, (20,), generator=g)


def _prune(method, scope="global"):
    batches = None if method == "synflow" else _data()
    return prune_at_init(_tiny(), method, sparsity=SPARSITY, batches=batches, scope=scope,
                         options={"rounds": ROUNDS})


# Kept flat indices of each weight, from the code in which intermediate rounds selected globally.
PINNED_GLOBAL = {
    "synflow": {"0.weight": [94, 100, 101, 104, 106, 107, 124, 129, 140, 142, 144, 149],
                "2.weight": [12, 14, 26, 42, 57, 58, 62, 92, 94, 106, 185, 186, 190],
                "4.weight": [0, 3, 5, 12, 14, 15, 18, 23, 26, 27, 30, 35, 39, 45, 47]},
    "iter-snip": {"0.weight": [72, 74, 82, 90, 92, 98, 112, 113, 124, 127, 131, 139, 140, 144, 150, 151, 153,
                               155, 158, 159],
                  "2.weight": [15, 55, 57, 184, 185, 187, 188, 189, 190, 191],
                  "4.weight": [0, 3, 5, 8, 15, 22, 23, 35, 39, 47]},
    "force": {"0.weight": [12, 81, 82, 94, 95, 98, 100, 101, 102, 104, 106, 107, 125, 127, 155, 157],
              "2.weight": [58, 138, 140, 161, 162, 172, 175, 184, 185, 186, 188, 189],
              "4.weight": [3, 5, 15, 20, 21, 22, 23, 34, 39, 44, 45, 46]},
}


@pytest.mark.parametrize("method", sorted(PINNED_GLOBAL))
def test_global_scope_masks_are_unchanged(method):
    mask = _prune(method)
    assert {n: t.flatten().nonzero().flatten().tolist() for n, t in mask.items()} == PINNED_GLOBAL[method]


def _record_rounds(monkeypatch, method):
    """Spy on each round's scoring: the entries the round's mask prunes are zero in the weights
    while it scores (initial weights are never exactly zero here), so the pattern of non-zeros is
    the mask the round scores under."""
    seen = []
    module, name = (synflow_module, "flow_scores") if method == "synflow" else (force_module, "summed_gradients")
    real = getattr(module, name)

    def spy(model, params, *args):
        seen.append({n: p.detach() != 0 for n, p in params.items()})
        return real(model, params, *args)

    monkeypatch.setattr(module, name, spy)
    return seen


def _expected_sparsities():
    density = 1.0 - SPARSITY
    return [1.0 - density ** (k / ROUNDS) for k in range(1, ROUNDS + 1)]  # the exponential schedule


@pytest.mark.parametrize("method", ["synflow", "iter-snip", "force"])
def test_layerwise_rounds_keep_each_layers_budget(monkeypatch, method):
    seen = _record_rounds(monkeypatch, method)
    final = _prune(method, scope="layerwise")
    rounds = seen[1:] + [dict(final)]  # round k scores under the mask of round k - 1; the last is the result
    assert len(rounds) == ROUNDS
    for k, (mask, sparsity) in enumerate(zip(rounds, _expected_sparsities())):
        for name, keep in mask.items():
            exact = keep.numel() * (1.0 - sparsity)
            assert math.floor(exact) <= int(keep.sum()) <= math.ceil(exact), (method, k, name)
    if method != "force":  # FORCE revives by design, inside each layer's budget
        for before, after in zip(rounds, rounds[1:]):
            for name in before:
                assert not bool((after[name] & ~before[name]).any()), (method, name)


@pytest.mark.parametrize("method", ["synflow", "iter-snip"])
@pytest.mark.parametrize("scope", ["layerwise", "erk"])
def test_no_pruned_entry_comes_back_with_layer_budgets(monkeypatch, method, scope):
    seen = _record_rounds(monkeypatch, method)
    final = _prune(method, scope=scope)
    kept_before = seen[-1]  # the mask the last round scored under
    for name, keep in final.items():
        assert not bool((keep & ~kept_before[name]).any()), (scope, name)


@pytest.mark.parametrize("method", ["synflow", "iter-snip"])
def test_block_structure_holds_in_every_round(monkeypatch, method):
    seen = _record_rounds(monkeypatch, method)
    batches = None if method == "synflow" else _data()
    final = prune_at_init(_tiny(), method, sparsity=SPARSITY, batches=batches, scope="layerwise",
                          structure="block2x2", options={"rounds": ROUNDS})
    rounds = seen[1:] + [dict(final)]
    for mask in rounds:
        for name, keep in mask.items():
            tiles = keep.reshape(keep.shape[0] // 2, 2, keep.shape[1] // 2, 2).sum(dim=(1, 3))
            assert bool(((tiles == 0) | (tiles == 4)).all()), name  # every 2x2 tile kept whole or pruned whole
    for before, after in zip(rounds, rounds[1:]):
        for name in before:
            assert not bool((after[name] & ~before[name]).any()), name


# ----------------------------------------------------------------------------- prune_at_levels


@pytest.mark.parametrize("method", ["snip", "random", "magnitude", "grasp"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_prune_at_levels_equals_one_prune_at_init_per_sparsity(method, scope):
    from sparsetrain.pruning import prune_at_levels

    levels = [0.5, 0.9, 0.75]
    batches = None if method in ("random", "magnitude") else _data()
    masks = prune_at_levels(_tiny(), method, levels, batches=batches, scope=scope, seed=3)
    for level, mask in zip(levels, masks):
        alone = prune_at_init(_tiny(), method, sparsity=level, batches=batches, scope=scope, seed=3)
        assert sorted(mask) == sorted(alone)
        assert all(torch.equal(mask[n], alone[n]) for n in alone), (method, scope, level)
        kept = sum(int(m.sum()) for m in mask.values())
        total = sum(m.numel() for m in mask.values())
        assert kept == total - round(level * total) if scope == "global" else kept < total


@pytest.mark.parametrize("method, changes", [
    ("force", {}), ("iter-snip", {}), ("synflow", {}),  # rounds of their own towards the sparsity
    ("snip", {"rounds": 3}), ("snip", {"structure": "2:4"}),
])
def test_prune_at_levels_refuses_what_scores_towards_a_sparsity(method, changes):
    from sparsetrain.errors import SparsetrainError
    from sparsetrain.pruning import prune_at_levels

    batches = None if method == "synflow" else _data()
    with pytest.raises(SparsetrainError, match="call prune_at_init once per sparsity"):
        prune_at_levels(_tiny(), method, [0.5, 0.9], batches=batches, **changes)
