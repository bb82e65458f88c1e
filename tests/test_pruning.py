"""SNIP and the baselines, checked against independent computations."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from sparsetrain import SparsetrainError, create_model, list_methods, list_models, prune_at_init
from sparsetrain.masks import prunable_parameters
from sparsetrain.models import default_input_shape
from sparsetrain.pruning import connection_sensitivity, method_spec, select_top
from sparsetrain.pruning.select import kept_count


def batch(n=16, shape=(1, 28, 28), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def oracle_sensitivity(model, names, batches):
    """|dL/dc| at c = 1 with explicit multiplicative masks c, normalised: the SNIP definition,
    computed with torch.func instead of the |g * w| shortcut the library uses."""
    model.eval()
    params = dict(model.named_parameters())
    cs = {n: torch.ones_like(params[n], requires_grad=True) for n in names}
    total = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in batches:
        weights = {n: (p.detach() * cs[n] if n in cs else p.detach()) for n, p in params.items()}
        loss = F.cross_entropy(functional_call(model, weights, (x,)), y)
        grads = torch.autograd.grad(loss, [cs[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += g
    raw = {n: t.abs() for n, t in total.items()}
    norm = sum(r.sum() for r in raw.values())
    return {n: r / norm for n, r in raw.items()}


@pytest.mark.parametrize("name", list_models("*tiny"))
@pytest.mark.parametrize("include_biases", [False, True])
def test_snip_scores_equal_the_mask_gradient(name, include_biases):
    torch.manual_seed(0)
    model = create_model(name).double()
    x, y = batch(shape=default_input_shape(name))  # images (C, H, W) or sequences (T, F)
    x = x.double()
    params = prunable_parameters(model, include_biases)
    ours = connection_sensitivity(model, params, [(x, y)], F.cross_entropy)
    expected = oracle_sensitivity(model, list(params), [(x, y)])
    for n in params:
        torch.testing.assert_close(ours[n], expected[n], rtol=1e-9, atol=1e-14)
    assert abs(sum(float(s.sum()) for s in ours.values()) - 1.0) < 1e-9


def test_snip_over_several_batches_sums_gradients_before_abs():
    torch.manual_seed(0)
    model = create_model("lenet-5-caffe").double()
    batches = [tuple(t.double() if t.is_floating_point() else t for t in batch(8, seed=s)) for s in range(3)]
    params = prunable_parameters(model)
    ours = connection_sensitivity(model, params, batches, F.cross_entropy)
    expected = oracle_sensitivity(model, list(params), batches)
    for n in params:
        torch.testing.assert_close(ours[n], expected[n])


def test_snip_keeps_the_top_scores_globally_exactly():
    torch.manual_seed(0)
    model = create_model("lenet-300-100")
    x, y = batch(100)
    mask = prune_at_init(model, "snip", sparsity=0.95, batches=(x, y))
    params = prunable_parameters(model)
    scores = oracle_sensitivity(model, list(params), [(x, y)])
    flat = torch.cat([s.flatten() for s in scores.values()])
    kept = torch.cat([m.flatten() for m in mask.values()])
    assert int(kept.sum()) == round(flat.numel() * 0.05)
    # every kept score is >= every pruned score (global top-kappa)
    assert flat[kept].min() >= flat[~kept].max()


def test_scoring_runs_in_inference_mode_and_restores_training_mode():
    model = create_model("conv-tiny")
    model.train()
    bn = model[1]
    before = bn.running_mean.clone()
    x, y = batch()
    prune_at_init(model, "snip", sparsity=0.5, batches=(x, y))
    assert torch.equal(bn.running_mean, before)  # batch-norm statistics not updated
    assert model.training
    assert all(p.grad is None for p in model.parameters())  # the model's .grad is untouched


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.987])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_exact_kept_count_and_determinism(method, sparsity, scope):
    torch.manual_seed(0)
    model = create_model("conv-tiny")
    data = batch()
    # Methods that run their own rounds (SynFlow 100, FORCE 60 by default) run 3 here: exactness and
    # determinism do not depend on the count, and the suite stays quick.
    spec = method_spec(method)
    fields = {f.name for f in dataclasses.fields(spec.options)} if spec.options is not None else set()
    options = {"rounds": 3} if "rounds" in fields else None
    mask = prune_at_init(model, method, sparsity=sparsity, batches=data, scope=scope, seed=3, options=options)
    again = prune_at_init(model, method, sparsity=sparsity, batches=data, scope=scope, seed=3, options=options)
    params = prunable_parameters(model)
    assert list(mask) == list(params)
    assert all(m.dtype == torch.bool and m.shape == params[n].shape for n, m in mask.items())
    assert all(torch.equal(mask[n], again[n]) for n in mask)
    if scope == "global":
        assert sum(int(m.sum()) for m in mask.values()) == kept_count(sum(p.numel() for p in params.values()), sparsity)
    else:
        assert all(int(m.sum()) == kept_count(m.numel(), sparsity) for m in mask.values())


def test_ties_go_to_the_first_entries():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    mask = select_top(scores, sparsity=0.6)  # keep round(10 * 0.4) = 4
    assert mask["a"].flatten().tolist() == [True] * 4 + [False] * 2
    assert mask["b"].tolist() == [False] * 4
    scores = {"a": torch.tensor([5.0, 1.0, 1.0, 1.0]), "b": torch.tensor([1.0, 7.0])}
    mask = select_top(scores, sparsity=0.5)  # keep 3: 7, 5, and the first of the tied 1s
    assert mask["a"].tolist() == [True, True, False, False]
    assert mask["b"].tolist() == [False, True]


def test_magnitude_keeps_the_largest_weights_and_random_is_uniform():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 1000))
    mask = prune_at_init(model, "magnitude", sparsity=0.9)
    w = torch.cat([model[0].weight.abs().flatten(), model[1].weight.abs().flatten()])
    kept = torch.cat([mask["0.weight"].flatten(), mask["1.weight"].flatten()])
    assert w[kept].min() >= w[~kept].max()
    mask = prune_at_init(model, "random", sparsity=0.9, seed=1)
    density = [float(m.float().mean()) for m in mask.values()]
    assert all(abs(d - 0.1) < 0.02 for d in density)
    assert not torch.equal(mask["1.weight"], prune_at_init(model, "random", sparsity=0.9, seed=2)["1.weight"])


def test_prunable_parameters_cover_every_architecture():
    assert set(prunable_parameters(create_model("lstm-tiny"))) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"}
    names = set(prunable_parameters(create_model("attention-tiny"), include_biases=True))
    assert {"encoder.self_attn.in_proj_weight", "encoder.self_attn.in_proj_bias",
            "encoder.self_attn.out_proj.weight", "encoder.linear1.weight", "embed.bias"} <= names
    assert not any("norm" in n for n in names)
    # the positional table, a raw 2-D nn.Parameter of the model itself, is a weight matrix like
    # any other: prunable by default (it was left dense while only known layer classes were)
    assert "pos" in names
    assert "1.weight" not in prunable_parameters(create_model("conv-tiny"))  # batch-norm is never pruned


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, "0.9"])
def test_sparsity_outside_the_unit_interval_is_refused(sparsity):
    with pytest.raises(SparsetrainError, match="sparsity must be"):
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=sparsity, batches=batch())


def test_unknown_method_names_close_matches():
    with pytest.raises(SparsetrainError, match="'snip'"):
        prune_at_init(create_model("mlp-tiny"), "snp", sparsity=0.5, batches=batch())


def test_model_without_prunable_parameters():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x.flatten(1)[:, :10] * self.a

    with pytest.raises(SparsetrainError, match="no prunable parameters"):
        prune_at_init(Scale(), "snip", sparsity=0.5, batches=batch())
    mask = prune_at_init(Scale(), "snip", sparsity=0.0, batches=batch(), params=["a"])
    assert list(mask) == ["a"]
    with pytest.raises(SparsetrainError, match="not parameters of the model"):
        prune_at_init(Scale(), "snip", sparsity=0.5, batches=batch(), params=["b"])


def test_batch_that_does_not_fit_the_model():
    with pytest.raises(SparsetrainError, match=r"does not fit.*\(16, 3, 32, 32\)|\(16, 3, 32, 32\).*does not fit"):
        prune_at_init(create_model("lenet-300-100"), "snip", sparsity=0.5, batches=batch(shape=(3, 32, 32)))


def test_nan_inputs_and_infinite_scores_are_refused():
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(SparsetrainError, match="loss at initialization is nan"):
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.5, batches=(x, y))
    model = create_model("mlp-tiny")
    with torch.no_grad():
        model[1].weight[0, 0] = 1e38  # finite loss, overflowing |g * w|
        model[3].weight.fill_(1e-3)
    x, y = batch()
    x[:, 0, 0, 0] = 1e3
    with pytest.raises(SparsetrainError, match="NaN or infinite|loss at initialization"):
        prune_at_init(model, "snip", sparsity=0.5, batches=(x, y))


def test_all_zero_scores_are_refused():
    model = create_model("mlp-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.raises(SparsetrainError, match="every SNIP score is zero"):
        prune_at_init(model, "snip", sparsity=0.5, batches=batch())


def test_snip_needs_data():
    with pytest.raises(SparsetrainError, match="'snip' needs data"):
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.5)
    with pytest.raises(SparsetrainError, match="empty"):
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.5, batches=[])


def _oracle_top(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Independent oracle: a stable descending sort over all entries (ties: first position wins)."""
    flat = torch.cat([s.flatten() for s in scores.values()]).double()
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return out


@pytest.mark.parametrize("sparsity", [0.0005, 0.3, 0.5, 0.9, 0.99, 0.99999])
@pytest.mark.parametrize("kind", ["distinct", "ties", "skewed"])
def test_large_selection_matches_a_sorting_oracle(sparsity, kind):
    # Above 65,536 scores the k-th value comes from a sampled bound and a candidate set; it must
    # still be exact, from either end (kept fraction below or above one half), with ties.
    g = torch.Generator().manual_seed(7)
    shapes = {"a": (300, 250), "b": (40_000,), "c": (17,)}
    if kind == "distinct":
        scores = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    elif kind == "ties":  # only 50 distinct values: many ties straddle every threshold
        scores = {n: torch.randint(0, 50, s, generator=g).float() for n, s in shapes.items()}
    else:  # one tensor holds all the large scores: a strided sample sees few of them
        scores = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
        scores["c"] = scores["c"] + 10.0
        scores["b"][::1000] += 5.0
    total = sum(s.numel() for s in scores.values())
    k = kept_count(total, sparsity)
    mask = select_top(scores, sparsity)
    expected = _oracle_top(scores, k)
    assert sum(int(m.sum()) for m in mask.values()) == k
    assert all(torch.equal(mask[n], expected[n]) for n in scores)


@pytest.mark.parametrize("k", [1, 2, 17, 5_000, 57_500, 115_000, 115_016])
def test_kth_largest_value_is_exact(k):
    # The value itself (top_k's tie handling would hide an off-by-one here), against a full sort.
    import numpy as np

    from sparsetrain.pruning.select import _kth_largest_numpy

    rng = np.random.default_rng(k)
    arrays = [rng.random(75_000, dtype=np.float32), rng.integers(0, 300, 40_000).astype(np.float32) / 300, rng.random(17, dtype=np.float32)]
    expected = float(np.sort(np.concatenate(arrays))[::-1][k - 1])
    assert _kth_largest_numpy([a.copy() for a in arrays], k) == expected
