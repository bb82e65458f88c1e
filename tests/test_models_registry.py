"""Every registered model, as the registry holds it when the tests start: it runs forward and
backward on its own default input shape, SNIP prunes it at 90% keeping exactly kappa of its
prunable entries, and it trains two steps with the mask held. A model added to the registry is
covered without a line here; batches of 2 keep the largest (17m parameters) at a few seconds."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.cli.commands import _model_line
from sparsetrain.cli.main import main
from sparsetrain.masks import GradientMask, apply_mask_
from sparsetrain.models import MODELS, create_model, default_input_shape, list_models
from sparsetrain.pruning import prune_at_init
from sparsetrain.threads import choose_threads

ALL_MODELS = list_models()
NORM = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def default_classes(name: str) -> int:
    return inspect.signature(MODELS.get(name)).parameters["num_classes"].default


def batch(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *default_input_shape(name), generator=g)
    return x, torch.randint(0, default_classes(name), (2,), generator=g)


def prunable_by_rule(model: nn.Module) -> dict[str, nn.Parameter]:
    """The documented default set, written out here: every parameter of 2+ dimensions whose
    module is not a normalisation layer (biases are 1-D)."""
    found = {}
    for module_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and not isinstance(module, NORM):
                found[f"{module_name}.{leaf}" if module_name else leaf] = p
    return found


@pytest.mark.parametrize("name", ALL_MODELS)
def test_runs_is_pruned_by_snip_to_kappa_and_trains_with_the_mask_held(name):
    # One build and three forward-backward passes per model (the SNIP batch, two steps): the
    # largest models take about a second each on a quiet 2-core machine.
    shape = default_input_shape(name)
    assert len(shape) in (2, 3)  # (C, H, W) images or (T, F) sequences
    # The library's thread rule, judged on a meta-device copy (free): on a machine whose cores are
    # busy one thread runs these steps 3-4x faster than two (measured on the shared 2-core box).
    with torch.device("meta"):
        torch.set_num_threads(choose_threads(create_model(name), shape, batch_size=2))  # conftest restores it
    torch.manual_seed(0)
    model = create_model(name)
    # `sparsetrain list models` counts without building (on the meta device): the same count
    listed = int(re.search(r"([\d,]+) parameters", _model_line(name)[0])[1].replace(",", ""))
    assert listed == sum(p.numel() for p in model.parameters())

    x, y = batch(name)
    mask = prune_at_init(model, "snip", sparsity=0.9, batches=(x, y))
    expected = prunable_by_rule(model)
    assert set(mask) == set(expected)
    m = sum(p.numel() for p in expected.values())
    assert sum(int(t.sum()) for t in mask.values()) == round(m * (1 - 0.9))

    apply_mask_(model, mask)
    hook = GradientMask(model, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    for step in range(2):
        x, y = batch(name, seed=step + 1)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)  # forward on its own input shape
        assert out.shape == (2, default_classes(name)) and torch.isfinite(out).all()
        F.cross_entropy(out, y).backward()
        # every parameter takes part in the forward pass (none is dead weight)
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        hook.after_backward()
        optimizer.step()
        hook.after_step()
    for n, p in expected.items():
        assert torch.count_nonzero(p.detach()[~mask[n].bool()]) == 0, f"{name}: pruned entries of {n} moved"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_list_models_shows_every_model_with_its_count_and_input_shape(capsys):
    assert main(["list", "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {}
    for line in lines[1:]:
        found = re.fullmatch(r"  (\S+)\s+([\d,]+) parameters  input (\(.*\))", line)
        if found:
            rows[found[1]] = (int(found[2].replace(",", "")), found[3])
    assert list(rows) == ALL_MODELS
    assert {n: shape for n, (_, shape) in rows.items()} == {n: str(default_input_shape(n)) for n in ALL_MODELS}
    # counts by formula for a few: LSTM-s (3,712 + 132,096 + 1,290), MLP-7 of width 100
    assert rows["lstm-s"][0] == (28 * 128 + 128) + 4 * (2 * 128 * 128 + 2 * 128) + (128 * 10 + 10)
    assert rows["mlp-7"][0] == (784 * 100 + 100) + 5 * (100 * 100 + 100) + (100 * 10 + 10)
    assert "        model_args: width (an int) = 100, activation (one of 'linear', 'tanh', 'relu') = 'linear'" in lines
