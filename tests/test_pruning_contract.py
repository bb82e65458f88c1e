"""The pruning contract: a method registered from this file alone (no edit of the library) gets the
mask so far and its typed options, and prune_at_init runs it in rounds."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from sparsetrain import SparsetrainError, create_model, prune_at_init
from sparsetrain.masks import prunable_parameters
from sparsetrain.pruning import (
    METHODS,
    ScoreContext,
    list_methods,
    method_options,
    method_spec,
    register_method,
    round_sparsities,
)
from sparsetrain.pruning.select import kept_count

# --- a method defined here: its scores depend on the mask of the round before ---------------------


@dataclasses.dataclass(frozen=True)
class RowOptions:
    scale: float = 1.0
    bonus: int = 1


RECORD: list[dict] = []


def row_scores_of(weights: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], options: RowOptions):
    """|w| * (bonus + kept entries in the same row of the 2-D view) * scale."""
    out = {}
    for n, w in weights.items():
        rows = mask[n].reshape(mask[n].shape[0], -1).sum(1).double()  # (rows,)
        factor = (options.bonus + rows).view(-1, *[1] * (w.dim() - 1))
        out[n] = w.detach().abs().double() * factor * options.scale
    return out


def row_count(ctx: ScoreContext, options: RowOptions) -> dict[str, torch.Tensor]:
    RECORD.append({
        "round": ctx.round,
        "rounds": ctx.rounds,
        "sparsity": ctx.sparsity,
        "mask": {n: m.clone() for n, m in ctx.mask.items()},
        "weights": {n: p.detach().clone() for n, p in ctx.params.items()},
    })
    return row_scores_of(ctx.params, ctx.mask, options)


@pytest.fixture
def row_method():
    register_method("test-row-count", options=RowOptions, data_free=True)(row_count)
    RECORD.clear()
    yield "test-row-count"
    METHODS.unregister("test-row-count")


def replay(weights, sparsities, options=RowOptions()):
    """The rounds computed independently: scores under the last mask (on the masked weights),
    pruned entries at -inf, a stable sort for the exact top kappa (ties to the first)."""
    mask = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    masks = [mask]
    total = sum(w.numel() for w in weights.values())
    for s in sparsities:
        scores = row_scores_of({n: w * mask[n] for n, w in weights.items()}, mask, options)
        flat = torch.cat([torch.where(mask[n], sc, -math.inf).flatten() for n, sc in scores.items()])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:kept_count(total, s)]] = True
        mask, start = {}, 0
        for n, w in weights.items():
            mask[n] = keep[start:start + w.numel()].view(w.shape)
            start += w.numel()
        masks.append(mask)
    return masks


def test_a_method_registered_at_runtime_is_usable_by_name(row_method):
    assert row_method in list_methods() and method_spec(row_method).data_free
    model = create_model("mlp-tiny")
    mask = prune_at_init(model, row_method, sparsity=0.9)  # data-free: no batches
    params = prunable_parameters(model)
    assert sum(int(m.sum()) for m in mask.values()) == kept_count(sum(p.numel() for p in params.values()), 0.9)


@pytest.mark.parametrize("rounds, schedule", [(3, "exponential"), (4, "linear"), (2, [0.5, 0.95])])
def test_each_round_scores_under_the_mask_of_the_round_before(row_method, rounds, schedule):
    torch.manual_seed(0)
    model = create_model("lenet-5-caffe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = {"scale": 2, "bonus": 3}
    mask = prune_at_init(model, row_method, sparsity=0.95, rounds=rounds, schedule=schedule, options=options)
    steps = round_sparsities(0.95, rounds, schedule)
    assert [r["round"] for r in RECORD] == list(range(rounds)) and {r["rounds"] for r in RECORD} == {rounds}
    assert [r["sparsity"] for r in RECORD] == steps
    params = prunable_parameters(model)
    expected = replay({n: p.detach().double() for n, p in params.items()}, steps, RowOptions(2.0, 3))
    for k, record in enumerate(RECORD):
        for n in params:
            assert torch.equal(record["mask"][n], expected[k][n]), (k, n)  # round k sees round k-1's mask
            assert torch.equal(record["weights"][n], before[n] * expected[k][n])  # pruned weights zeroed
    for n in params:
        assert torch.equal(mask[n], expected[-1][n])
        assert not (mask[n] & ~RECORD[-1]["mask"][n]).any()  # nothing pruned comes back
    total = sum(p.numel() for p in params.values())
    assert sum(int(m.sum()) for m in mask.values()) == kept_count(total, 0.95)  # exact kappa at the end
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model is not changed
    RECORD.clear()
    again = prune_at_init(model, row_method, sparsity=0.95, rounds=rounds, schedule=schedule, options=options)
    assert all(torch.equal(mask[n], again[n]) for n in mask)  # deterministic


def test_round_masks_change_the_scores(row_method):
    # the test method is only a fair probe if the mask changes the outcome
    torch.manual_seed(0)
    model = create_model("mlp-tiny")
    one = prune_at_init(model, row_method, sparsity=0.95)
    three = prune_at_init(model, row_method, sparsity=0.95, rounds=3)
    assert any(not torch.equal(one[n], three[n]) for n in one)


def test_rounds_with_snip_exact_nested_and_the_model_restored():
    torch.manual_seed(0)
    model = create_model("lenet-300-100")
    g = torch.Generator().manual_seed(0)
    batches = (x for x in [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))])
    before = [p.detach().clone() for p in model.parameters()]
    mask = prune_at_init(model, "snip", sparsity=0.98, batches=batches, rounds=3)  # a generator, read each round
    assert sum(int(m.sum()) for m in mask.values()) == kept_count(266200, 0.98)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_rounds_with_block_structure(row_method, scope):
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    mask = prune_at_init(model, row_method, sparsity=0.75, structure="block4x4", rounds=3, scope=scope)
    tiles = {n: m.reshape(m.shape[0] // 4, 4, m.shape[1] // 4, 4) for n, m in mask.items()}
    assert all((t == t[:, :1, :, :1]).all() for t in tiles.values())
    kept = {n: int(t[:, 0, :, 0].sum()) for n, t in tiles.items()}
    if scope == "global":
        assert sum(kept.values()) == kept_count(12 + 6, 0.75)
    else:
        assert kept == {"0.weight": kept_count(12, 0.75), "2.weight": kept_count(6, 0.75)}
    for k in range(1, 3):  # nested masks
        assert all(not (RECORD[k]["mask"][n] & ~RECORD[k - 1]["mask"][n]).any() for n in mask)


def test_rounds_and_n_m_structure_is_explained():
    with pytest.raises(SparsetrainError, match="2:4 fixes the sparsity.*rounds=1"):
        prune_at_init(nn.Linear(8, 4), "magnitude", structure="2:4", rounds=2)


def test_schedules():
    assert round_sparsities(0.99, 2) == [0.9, 0.99]
    assert round_sparsities(0.9, 3, "linear") == [0.3, 0.6, 0.9]
    assert round_sparsities(0.5, 1) == [0.5]
    dens = [1 - s for s in round_sparsities(0.999, 3)]
    assert dens == pytest.approx([0.1, 0.01, 0.001])
    for bad, message in [((0.9, 0), "rounds must be"), ((0.9, 2, "cubic"), "unknown schedule"),
                         ((0.9, 2, [0.95, 0.9]), "non-decreasing"), ((0.9, 2, [0.5]), "one sparsity per round")]:
        with pytest.raises(SparsetrainError, match=message):
            round_sparsities(*bad)


# --- options --------------------------------------------------------------------------------------


def test_options_are_checked_against_the_methods_dataclass(row_method):
    assert method_options(row_method, None) == RowOptions()
    assert method_options(row_method, {"scale": 3}) == RowOptions(scale=3.0)
    assert method_options(row_method, RowOptions(bonus=2)) == RowOptions(bonus=2)
    with pytest.raises(SparsetrainError, match=r"unknown option 'sclae'.*valid options: scale, bonus"):
        method_options(row_method, {"sclae": 2.0})
    with pytest.raises(SparsetrainError, match=r"'bonus' of pruning method 'test-row-count' must be an int, got 1.5"):
        method_options(row_method, {"bonus": 1.5})
    with pytest.raises(SparsetrainError, match="must be a float, got True"):
        prune_at_init(create_model("mlp-tiny"), row_method, sparsity=0.5, options={"scale": True})
    assert method_options("snip", None) is None and method_options("snip", {}) is None
    with pytest.raises(SparsetrainError, match="'snip' takes no options"):
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.5, options={"x": 1})


def test_every_method_declares_its_options_and_data_needs():
    for name in list_methods():
        spec = method_spec(name)
        assert spec.options is None or dataclasses.is_dataclass(spec.options)
        assert isinstance(spec.data_free, bool)
    assert not method_spec("snip").data_free and method_spec("random").data_free


def test_a_data_method_without_data_is_explained():
    @register_method("test-needs-data")
    def needs_data(ctx, options):
        return {n: p.detach().abs() for n, p in ctx.params.items()}

    try:
        with pytest.raises(SparsetrainError, match="'test-needs-data' needs data"):
            prune_at_init(create_model("mlp-tiny"), "test-needs-data", sparsity=0.5)
    finally:
        METHODS.unregister("test-needs-data")


def test_scores_of_the_wrong_names_or_shapes_are_explained():
    @register_method("test-bad-scores", data_free=True)
    def bad(ctx, options):
        return {n: torch.ones(3) for n in ctx.params}

    try:
        with pytest.raises(SparsetrainError, match="wrong shape"):
            prune_at_init(create_model("mlp-tiny"), "test-bad-scores", sparsity=0.5)
    finally:
        METHODS.unregister("test-bad-scores")


def test_rounds_read_a_loader_once_per_round_and_keep_a_generator():
    seen = []

    class Loader:
        def __iter__(self):
            seen.append("epoch")
            g = torch.Generator().manual_seed(0)
            yield torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)

    model = create_model("mlp-tiny")
    from_loader = prune_at_init(model, "snip", sparsity=0.9, batches=Loader(), rounds=3)
    assert seen == ["epoch"] * 3
    from_generator = prune_at_init(model, "snip", sparsity=0.9, batches=iter(Loader()), rounds=3)
    assert seen == ["epoch"] * 4
    assert all(torch.equal(from_loader[n], from_generator[n]) for n in from_loader)


def test_an_unknown_scope_is_refused_before_scoring():
    with pytest.raises(SparsetrainError, match="unknown selection scope 'local'.*global, layerwise"):
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.5, scope="local")  # no data needed to say so
