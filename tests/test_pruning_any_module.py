"""Pruning any nn.Module correctly by default: tied weights, raw parameter matrices, layer classes
the library has never seen (weights stored (in, out)), dict batches. Each model is built here and
checked against an independent |g * w| from plain autograd."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain import SparsetrainError, create_model, list_models, prune_at_init
from sparsetrain.masks import (
    GradientMask,
    apply_mask_,
    check_mask,
    format_sparsity_table,
    prunable_parameters,
)
from sparsetrain.pruning import connection_sensitivity
from sparsetrain.pruning.select import kept_count


def oracle_scores(model, tensors: dict[str, torch.Tensor], loss_of_model) -> dict[str, torch.Tensor]:
    """|dL/dw * w| for each (distinct) tensor, with plain autograd, in eval mode."""
    model.eval()
    grads = torch.autograd.grad(loss_of_model(), list(tensors.values()))
    return {n: (g * t).abs().detach() for (n, t), g in zip(tensors.items(), grads)}


def oracle_top(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """A stable descending sort over all entries (ties: first position wins)."""
    flat = torch.cat([s.flatten() for s in scores.values()]).double()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return out


def assert_exact_top(mask, scores, sparsity):
    total = sum(s.numel() for s in scores.values())
    assert list(mask) == list(scores)
    assert sum(int(m.sum()) for m in mask.values()) == kept_count(total, sparsity)
    expected = oracle_top(scores, kept_count(total, sparsity))
    for n in scores:
        assert torch.equal(mask[n], expected[n]), n


# --- tied (shared) parameters ---------------------------------------------------------------------


class TiedLM(nn.Module):
    """An output layer that shares the embedding's weight (vocab, dim), as language models do."""

    def __init__(self, vocab=12, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):  # (B, T)
        h = torch.tanh(self.hidden(self.embed(ids).mean(1)))  # (B, dim)
        return self.out(h)  # (B, vocab)


def tied_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (6, 5), generator=g), torch.randint(0, 12, (6,), generator=g)


def test_a_tied_weight_is_scored_counted_and_named_once():
    torch.manual_seed(0)
    model = TiedLM().double()
    ids, y = tied_data()
    mask = prune_at_init(model, "snip", sparsity=0.6, batches=(ids, y))
    assert list(mask) == ["embed.weight", "hidden.weight"]  # the first name of the shared tensor
    scores = oracle_scores(model, {"embed.weight": model.embed.weight, "hidden.weight": model.hidden.weight},
                           lambda: F.cross_entropy(model(ids), y))
    assert_exact_top(mask, scores, 0.6)  # kappa counts the shared tensor once
    ours = connection_sensitivity(model, prunable_parameters(model), [(ids, y)])
    norm = sum(s.sum() for s in scores.values())
    for n in scores:  # |g w|, not |g| w^2 (the gradient scaled twice in place)
        torch.testing.assert_close(ours[n], scores[n] / norm)


def test_a_mask_of_a_tied_model_applies_to_it():
    torch.manual_seed(0)
    model = TiedLM()
    mask = prune_at_init(model, "snip", sparsity=0.6, batches=tied_data())
    check_mask(mask, model)
    hook = GradientMask(model, mask)
    apply_mask_(model, mask)
    assert torch.equal(model.out.weight != 0, mask["embed.weight"] & (model.out.weight != 0))
    assert int(torch.count_nonzero(model.embed.weight)) <= int(mask["embed.weight"].sum())
    F.cross_entropy(model(tied_data()[0]), tied_data()[1]).backward()
    hook.after_backward()
    assert (model.embed.weight.grad[~mask["embed.weight"]] == 0).all()
    # any name of the shared tensor is accepted; naming it twice is not
    apply_mask_(model, {"out.weight": mask["embed.weight"]})
    with pytest.raises(SparsetrainError, match="name the same shared tensor"):
        apply_mask_(model, {"embed.weight": mask["embed.weight"], "out.weight": mask["embed.weight"]})


def test_params_may_name_a_tied_weight_by_its_alias():
    model = TiedLM()
    mask = prune_at_init(model, "magnitude", sparsity=0.5, params=["out.weight"])
    assert list(mask) == ["embed.weight"]
    assert mask.left_out["hidden.weight"] == "not in params="


# --- unknown layer classes ------------------------------------------------------------------------


class RawMatrix(nn.Module):
    """A raw nn.Parameter matrix (no known layer class), a bias, and a normalisation layer."""

    def __init__(self, d_in=12, d_out=10):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.w = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):  # (B, d_in) -> (B, d_out)
        return F.linear(self.norm(x), self.w, self.bias)


def test_a_raw_weight_matrix_is_pruned_and_the_rest_is_accounted_for():
    torch.manual_seed(0)
    model = RawMatrix().double()
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 10, (8,))
    mask = prune_at_init(model, "snip", sparsity=0.7, batches=(x, y))
    scores = oracle_scores(model, {"w": model.w}, lambda: F.cross_entropy(model(x), y))
    assert_exact_top(mask, scores, 0.7)
    assert mask.left_out == {
        "norm.weight": "normalisation layer",
        "norm.bias": "normalisation layer",
        "bias": "1-D (bias; include_biases=False)",
    }
    table = format_sparsity_table(mask)
    assert "norm.weight: normalisation layer" in table and "bias: 1-D (bias; include_biases=False)" in table
    assert list(prune_at_init(model, "snip", sparsity=0.7, batches=(x, y), include_biases=True)) == ["w", "bias"]
    apply_mask_(model, mask)
    assert int(torch.count_nonzero(model.w)) <= int(mask["w"].sum())


class Conv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)  # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):  # (B, in) -> (B, out)
        return x @ self.weight + self.bias


class InOutLinear(Conv1D):
    """Another class the library has never seen, also storing (in, out)."""


class InOutNet(nn.Module):
    def __init__(self, layer=Conv1D, d_in=8, hidden=12, classes=4):
        super().__init__()
        self.layer = layer(hidden, d_in)  # weight (8, 12): 12 outputs of 8 inputs
        self.head = nn.Linear(hidden, classes)  # weight (4, 12)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)))


def in_out_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)


def nm_oracle_rows(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N of every M along each row of a (rows, row) matrix, ties to the first, with loops."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for start in range(0, scores.shape[1], m):
            group = sorted(range(start, start + m), key=lambda j: (-float(scores[r, j]), j))
            keep[r, group[:n]] = True
    return keep


@pytest.mark.parametrize("layer, input_dims", [(Conv1D, None), (InOutLinear, {"layer.weight": 0})])
def test_2_4_groups_along_the_input_axis_of_in_out_weights(layer, input_dims):
    torch.manual_seed(0)
    model = InOutNet(layer).double()
    x, y = in_out_data()
    mask = prune_at_init(model, "snip", batches=(x, y), structure="2:4", input_dims=input_dims)
    scores = oracle_scores(model, {"layer.weight": model.layer.weight, "head.weight": model.head.weight},
                           lambda: F.cross_entropy(model(x), y))
    w = mask["layer.weight"]  # (in 8, out 12): each output's 8 inputs are a column
    assert (w.T.reshape(12, 2, 4).sum(-1) == 2).all()
    assert torch.equal(w.T, nm_oracle_rows(scores["layer.weight"].T, 2, 4))
    assert torch.equal(mask["head.weight"], nm_oracle_rows(scores["head.weight"], 2, 4))  # (out, in) as ever
    assert not mask.notes  # a known class, or told by input_dims
    apply_mask_(model, mask)
    assert torch.equal(model.layer.weight != 0, mask["layer.weight"])


def test_an_unknown_class_is_assumed_out_in_with_a_note():
    torch.manual_seed(0)
    model = InOutNet(InOutLinear).double()
    x, y = in_out_data()
    mask = prune_at_init(model, "snip", batches=(x, y), structure="2:4")
    assert set(mask.notes) == {"layer.weight"}
    assert "unknown class InOutLinear, assumed dim 1" in mask.notes["layer.weight"]
    assert (mask["layer.weight"].reshape(8, 3, 4).sum(-1) == 2).all()  # rows of 12 grouped by 4
    assert "unknown class InOutLinear" in format_sparsity_table(mask)
    with pytest.raises(SparsetrainError, match="input_dims"):
        prune_at_init(model, "snip", batches=(x, y), structure="2:4", input_dims={"layer.weight": 2})
    with pytest.raises(SparsetrainError, match="not a parameter"):
        prune_at_init(model, "snip", batches=(x, y), structure="2:4", input_dims={"nope": 0})


def test_blocks_on_an_in_out_weight_tile_its_transposed_view():
    model = InOutNet(Conv1D)
    mask = prune_at_init(model, "magnitude", sparsity=0.5, structure="block4x2", params=["layer.weight"])
    w = model.layer.weight.detach().abs().T  # (out 12, in 8): 3 x 4 tiles of 4 outputs x 2 inputs
    tiles = w.reshape(3, 4, 4, 2).sum((1, 3)).flatten()
    view = mask["layer.weight"].T.reshape(3, 4, 4, 2)
    assert (view == view[:, :1, :, :1]).all()  # whole tiles
    kept = view[:, 0, :, 0].flatten()
    assert int(kept.sum()) == 6 and tiles[kept].min() >= tiles[~kept].max()


# --- dict batches ---------------------------------------------------------------------------------


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class DictModel(nn.Module):
    """Takes model(**batch) with input_ids and labels, returns an output with .loss and .logits."""

    def __init__(self, vocab=11, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.norm(self.embed(input_ids).mean(1)))
        return Output(logits, None if labels is None else F.cross_entropy(logits, labels))


def dict_batch(seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, 11, (6, 5), generator=g)}
    if labels:
        batch["labels"] = torch.randint(0, 3, (6,), generator=g)
    return batch


def test_a_dict_batch_model_is_pruned_by_its_own_loss():
    torch.manual_seed(0)
    model = DictModel().double()
    batches = [dict_batch(0), dict_batch(1)]
    mask = prune_at_init(model, "snip", sparsity=0.8, batches=batches)
    tensors = {"embed.weight": model.embed.weight, "head.weight": model.head.weight}
    scores = oracle_scores(model, tensors, lambda: model(**batches[0]).loss + model(**batches[1]).loss)
    assert_exact_top(mask, scores, 0.8)
    one = prune_at_init(model, "snip", sparsity=0.8, batches=batches[0])  # one dict is one batch
    assert_exact_top(one, oracle_scores(model, tensors, lambda: model(**batches[0]).loss), 0.8)
    apply_mask_(model, mask)


def test_a_dict_batch_without_a_loss_is_explained():
    with pytest.raises(SparsetrainError, match="include 'labels'.*or pass loss_fn"):
        prune_at_init(DictModel(), "snip", sparsity=0.5, batches=dict_batch(labels=False))


# --- the default prunable set keeps every registered model's set --------------------------------

OLD_PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                       nn.ConvTranspose3d, nn.RNNBase, nn.Embedding, nn.MultiheadAttention)


def old_prunable(model, include_biases):
    """The rule before any module was prunable: weights of a fixed list of torch layer classes."""
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, OLD_PRUNABLE_LAYERS):
            for leaf, p in module.named_parameters(recurse=False):
                if p.requires_grad and ("weight" in leaf or (include_biases and "bias" in leaf)):
                    found.append(f"{module_name}.{leaf}" if module_name else leaf)
    return found


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("include_biases", [False, True])
def test_registered_models_keep_their_prunable_tensors_in_order(name, include_biases):
    model = create_model(name)
    new = list(prunable_parameters(model, include_biases))
    added = [n for n in new if n not in old_prunable(model, include_biases)]
    assert [n for n in new if n not in added] == old_prunable(model, include_biases)
    assert added == (["pos"] if name == "attention-tiny" else [])
    if name.startswith("lenet"):  # the recorded Table 1 masks depend on exactly this set
        assert new == old_prunable(model, include_biases)


def test_exclude_and_left_out_reasons():
    model = create_model("attention-tiny")
    mask = prune_at_init(model, "magnitude", sparsity=0.5, exclude=["pos*", "encoder.linear?.weight"])
    assert mask.left_out["pos"] == "excluded by pattern 'pos*'"
    assert mask.left_out["encoder.linear1.weight"] == "excluded by pattern 'encoder.linear?.weight'"
    assert mask.left_out["encoder.norm1.weight"] == "normalisation layer"
    assert mask.left_out["head.bias"] == "1-D (bias; include_biases=False)"
    assert set(mask) | set(mask.left_out) == {n for n, _ in model.named_parameters()}
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    frozen[0].weight.requires_grad_(False)
    assert prune_at_init(frozen, "magnitude", sparsity=0.5).left_out["0.weight"] == "requires_grad=False"


def test_norm_layers_cover_the_usual_kinds():
    from sparsetrain.masks import NORM_LAYERS

    for layer in (nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.InstanceNorm2d(3, affine=True), nn.LayerNorm(3),
                  nn.GroupNorm(1, 3)):
        assert isinstance(layer, NORM_LAYERS)
