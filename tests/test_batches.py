"""Batch forms: (inputs, targets) and dict batches for model(**batch), with a tiny dict model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain import SparsetrainError
from sparsetrain.batches import (
    batch_size_of,
    forward_loss,
    is_batch,
    logits_of,
    loss_of,
    targets_of,
    to_device,
)


@dataclass
class Output:
    """Like transformers' ModelOutput: attributes, loss only when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class TinyDictModel(nn.Module):
    """Takes input_ids (B, T) and optional labels (B,), as a Hugging Face classifier does."""

    def __init__(self, vocab=11, dim=8, classes=3, as_dict=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)
        self.as_dict = as_dict

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids)  # (B, T, dim)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        logits = self.head(h.mean(1))  # (B, classes)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        if self.as_dict:
            return {"logits": logits, **({"loss": loss} if loss is not None else {})}
        return Output(logits, loss)


def dict_batch(n=5, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, 11, (n, 7), generator=g), "attention_mask": torch.ones(n, 7)}
    if labels:
        batch["labels"] = torch.randint(0, 3, (n,), generator=g)
    return batch


def test_tuple_batch_uses_cross_entropy_or_the_given_loss():
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss, out = forward_loss(model, (x, y))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    assert torch.equal(out, model(x))
    loss, _ = forward_loss(model, [x, y], lambda o, t: (o ** 2).mean())  # a list, as DataLoader gives
    torch.testing.assert_close(loss, (model(x) ** 2).mean())


@pytest.mark.parametrize("as_dict", [False, True])
def test_dict_batch_uses_the_models_own_loss_or_loss_fn(as_dict):
    torch.manual_seed(0)
    model = TinyDictModel(as_dict=as_dict)
    batch = dict_batch()
    loss, out = forward_loss(model, batch)
    expected = F.cross_entropy(model.head(model.embed(batch["input_ids"]).mean(1)), batch["labels"])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits_of(out), model(**batch)["logits"] if as_dict else model(**batch).logits)
    loss, _ = forward_loss(model, batch, lambda logits, t: F.nll_loss(logits, t))
    torch.testing.assert_close(loss, F.nll_loss(logits_of(out), batch["labels"]))


def test_dict_batch_without_a_loss_says_what_to_do():
    model = TinyDictModel()
    with pytest.raises(SparsetrainError, match="no loss.*include 'labels'.*or pass loss_fn"):
        forward_loss(model, dict_batch(labels=False))
    with pytest.raises(SparsetrainError, match="has no 'labels'"):
        forward_loss(model, dict_batch(labels=False), F.cross_entropy)


def test_accessors():
    out = Output(torch.ones(2, 3), torch.tensor(1.0))
    assert logits_of(out) is out.logits and loss_of(out) is out.loss
    assert logits_of({"logits": out.logits}) is out.logits and loss_of({"loss": out.loss}) is out.loss
    t = torch.ones(2)
    assert logits_of(t) is t and loss_of(t) is None
    assert logits_of({"loss": t}) is None and logits_of(object()) is None  # judged by its loss alone
    x, y = torch.zeros(4, 2), torch.zeros(4)
    assert targets_of((x, y)) is y and targets_of(dict_batch()) is not None
    assert targets_of(dict_batch(labels=False)) is None
    assert batch_size_of((x, y)) == 4 and batch_size_of(dict_batch(n=5)) == 5
    assert batch_size_of(({"input_ids": torch.zeros(3, 2)}, y)) == 3


def test_is_batch_tells_one_batch_from_many():
    x, y = torch.zeros(4, 2), torch.zeros(4)
    assert is_batch((x, y)) and is_batch([x, y]) and is_batch(dict_batch())
    assert not is_batch([(x, y), (x, y)]) and not is_batch([dict_batch(), dict_batch()])
    assert not is_batch([(x, y)]) and not is_batch(iter([(x, y)]))


def test_to_device_moves_nested_tensors():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), 3], "c": "text"}
    moved = to_device(batch, "cpu")
    assert moved["b"][1] == 3 and moved["c"] == "text" and isinstance(moved["b"], list)
    assert to_device((torch.ones(1), torch.ones(1)), "cpu")[0].device.type == "cpu"


def test_a_batch_that_does_not_fit_shows_its_shapes():
    with pytest.raises(SparsetrainError, match=r"\(6, 5\).*does not fit Linear"):
        forward_loss(nn.Linear(4, 3), (torch.randn(6, 5), torch.zeros(6, dtype=torch.long)))
    bad = {"input_ids": torch.randint(0, 11, (2, 3)), "attention_mask": torch.ones(2, 4)}
    with pytest.raises(SparsetrainError, match=r"'attention_mask': \(2, 4\).*does not fit TinyDictModel"):
        forward_loss(TinyDictModel(), bad)
