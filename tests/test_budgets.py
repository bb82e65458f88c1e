"""Layer budgets (prune.scope): global, layerwise (uniform) and ERK, each keeping exactly kappa in
all, checked against hand computations on tiny shapes."""

import math

import pytest
import torch
import torch.nn as nn

from sparsetrain import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.pipeline import validate
from sparsetrain.pruning import prune_at_init
from sparsetrain.pruning.select import apportion, erk_densities, kept_count, layer_budgets, select_top


def test_layerwise_keeps_exactly_kappa_with_the_leftover_on_the_largest_fraction():
    # 8 entries at 50%: kappa 4; budgets 1.5, 1.5, 1.0. Rounding each (the old rule) kept 2 + 2 + 1 = 5.
    # Largest remainder: floors 1, 1, 1; one left over, to the first of the equal fractions 0.5.
    assert layer_budgets([(3,), (3,), (2,)], 0.5, "layerwise") == [2, 1, 1]
    scores = {"a": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([1.0, 3.0, 2.0]), "c": torch.tensor([0.0, 5.0])}
    mask = select_top(scores, 0.5, "layerwise")
    assert {n: m.tolist() for n, m in mask.items()} == {
        "a": [True, True, False], "b": [False, True, False], "c": [False, True]}
    assert sum(int(m.sum()) for m in mask.values()) == 4


def test_layerwise_per_layer_counts_on_a_tiny_mlp_against_a_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))  # weights 35 and 15: 50 entries
    mask = prune_at_init(model, "random", sparsity=0.7, scope="layerwise", seed=1)
    # kappa = round(50 * 0.3) = 15; budgets 10.5 and 4.5 -> floors 10 and 4, the one left over to
    # the first of the equal fractions: 11 and 4.
    assert {n: int(m.sum()) for n, m in mask.items()} == {"0.weight": 11, "2.weight": 4}


def test_erk_densities_follow_rigl_with_a_dense_layer_taken_out():
    # raw = sum(shape) / prod(shape): 20/100 = 0.2 and 11/10 = 1.1; density 0.5 of 110 entries: 55.
    # eps = 55 / (0.2 * 100 + 1.1 * 10) = 55/31 -> the second layer at 1.95 > 1: made dense (10),
    # then eps = 45 / 20 and the first layer's density is 0.45.
    assert erk_densities([(10, 10), (1, 10)], 0.5) == pytest.approx([0.45, 1.0])
    assert layer_budgets([(10, 10), (1, 10)], 0.5, "erk") == [45, 10]


def test_erk_counts_are_proportional_to_the_sum_of_the_shape_for_convs_and_linears():
    shapes = [(4, 2, 3, 3), (10, 16), (2, 10)]  # 72 + 160 + 20 = 252 entries; raw * m = sum(shape)
    # 80%: kappa = round(50.4) = 50; eps = 50.4 / (12 + 26 + 12); no layer above 1;
    # targets 12.096, 26.208, 12.096 -> floors 12, 26, 12 = 50.
    assert layer_budgets(shapes, 0.8, "erk") == [12, 26, 12]
    # 50%: kappa 126; eps = 126/50 puts (2, 10) at 0.6 * 2.52 > 1: dense, 20 kept; the other 106
    # in proportion 12 : 26 -> 33.47 and 72.53: floors 33 + 72 = 105, the one left to the larger
    # fraction (0.53): 33, 73, 20.
    assert layer_budgets(shapes, 0.5, "erk") == [33, 73, 20]
    scores = {str(i): torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)}
    mask = select_top(scores, 0.5, "erk")
    assert [int(m.sum()) for m in mask.values()] == [33, 73, 20]
    for name, m in mask.items():  # inside a layer, its top scores are the ones kept
        s = scores[name].flatten()
        k = int(m.sum())
        assert set(torch.nonzero(m.flatten()).flatten().tolist()) == set(torch.topk(s, k).indices.tolist())


@pytest.mark.parametrize("scope", ["global", "layerwise", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 0.99, 0.999])
def test_every_budget_keeps_exactly_kappa(scope, sparsity):
    shapes = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 256), (84, 120), (10, 84)]
    scores = {str(i): torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)}
    mask = select_top(scores, sparsity, scope)
    total = sum(math.prod(s) for s in shapes)
    assert sum(int(m.sum()) for m in mask.values()) == kept_count(total, sparsity)
    budgets = layer_budgets(shapes, sparsity, scope)
    if budgets is not None:
        assert [int(m.sum()) for m in mask.values()] == budgets
        if scope == "layerwise":  # every layer at its budget rounded down or up
            for b, s in zip(budgets, shapes):
                assert abs(b - math.prod(s) * (1 - sparsity)) < 1


def test_apportion_caps_and_totals():
    assert apportion([2.9, 0.2], [2, 5], 3) == [2, 1]  # the first is capped at its size
    with pytest.raises(SparsetrainError, match="cannot keep 9 entries"):
        apportion([1.0], [3], 9)


def test_erk_and_unknown_scopes_are_refused_where_they_cannot_work():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    with pytest.raises(SparsetrainError, match="scope 'erk' budgets single entries"):
        prune_at_init(model, "magnitude", sparsity=0.5, scope="erk", structure="block2x2")
    with pytest.raises(SparsetrainError, match="choose one of global, layerwise, erk"):
        prune_at_init(model, "magnitude", sparsity=0.5, scope="per-layer")
    with pytest.raises(SparsetrainError, match="scope 'erk' budgets single entries"):
        validate(RunConfig().replace(prune={"scope": "erk", "structure": "2:4", "sparsity": 0.5}))


def test_the_scope_keeps_old_run_keys():
    assert RunConfig().key() == RunConfig().replace(prune={"scope": "global", "shuffle": False}).key()
    assert RunConfig().key() != RunConfig().replace(prune={"scope": "erk"}).key()
