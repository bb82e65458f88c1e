"""The sparse-aware init (prune.kept_fan_in): each unit's kept weights scaled by sqrt(fan_in / kept).

Oracles: the pre-activation variance of a pruned layer fed unit-variance inputs (the quantity the
rescale exists to restore, measured, not computed from the gains), and a per-unit loop written
here for conv and recurrent shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sparsetrain import RunConfig, run
from sparsetrain.cli.main import main
from sparsetrain.errors import SparsetrainError
from sparsetrain.experiments.grid import select
from sparsetrain.experiments.spp_table1 import CELLS
from sparsetrain.init import initialize_
from sparsetrain.init.kept_fan_in import rescale_kept_fan_in_
from sparsetrain.pipeline import validate
from sparsetrain.store import RunStore

TINY = RunConfig(model="mlp-tiny", dataset="synthetic").replace(train={"iterations": 5})


def test_pruned_layer_gets_back_the_dense_pre_activation_variance():
    torch.manual_seed(0)
    layer = nn.Linear(784, 300, bias=False)
    initialize_(layer, "variance-scaling", seed=0)  # variance 1 / fan_in
    draw = torch.Generator().manual_seed(123)  # not the init's stream: a mask independent of the weights
    mask = {"weight": (torch.rand(300, 784, generator=draw) < 0.02).float()}  # 98% pruned, ~16 kept per unit
    x = torch.randn(4000, 784, generator=draw)
    with torch.no_grad():
        dense_var = layer(x).var().item()
        layer.weight.mul_(mask["weight"])
        pruned_var = layer(x).var().item()
        rescale_kept_fan_in_(layer, mask)
        rescaled_var = layer(x).var().item()
    assert pruned_var < 0.05 * dense_var  # the signal the pruning lost
    assert rescaled_var == pytest.approx(dense_var, rel=0.15)


@pytest.mark.parametrize("module", [nn.Conv2d(3, 8, 3), nn.LSTM(5, 4)])
def test_gains_per_unit_against_a_loop(module):
    torch.manual_seed(1)
    name = "weight" if isinstance(module, nn.Conv2d) else "weight_hh_l0"
    weight = dict(module.named_parameters())[name]
    mask = {name: (torch.rand_like(weight) < 0.3).float()}
    mask[name][0].zero_()  # a unit with nothing kept stays as it was
    before = weight.detach().clone()
    rescale_kept_fan_in_(module, mask)
    fan_in = before[0].numel()
    for unit in range(before.shape[0]):
        kept = int(mask[name][unit].sum())
        gain = math.sqrt(fan_in / kept) if kept else 1.0
        assert torch.allclose(weight[unit], before[unit] * gain, rtol=1e-6)


def test_a_run_records_the_gains_and_trains():
    outcome = run(TINY.replace(prune={"kept_fan_in": True, "sparsity": 0.9}), store=None, progress=False)
    assert outcome.results["kept_fan_in"]["tensors"] >= 1
    assert outcome.results["kept_fan_in"]["mean_gain"] > 1.5  # about sqrt(10) at 90%


def test_cli_flag(capsys, tmp_path):
    code = main(["run", "--model", "mlp-tiny", "--dataset", "synthetic", "--no-progress", "--iterations", "5",
                 "--sparsity", "0.5", "--kept-fan-in", "--store", str(tmp_path / "s")])
    capsys.readouterr()
    assert code == 0
    (record,) = RunStore(tmp_path / "s").list()
    assert record.config["prune"]["kept_fan_in"] is True


@pytest.mark.parametrize("prune, words", [
    ({"method": "dense", "kept_fan_in": True}, "method 'dense' makes no mask"),
    ({"kept_fan_in": True, "isometry": True}, "choose one"),
    ({"method": "lwc", "kept_fan_in": True, "sparsity": 0.9}, "prune.kept_fan_in does not apply to method 'lwc'"),
])
def test_refused_where_it_means_nothing(prune, words):
    with pytest.raises(SparsetrainError, match=words):
        validate(TINY.replace(prune=prune))


def test_spp_table1_cells_change_only_the_start_of_the_trained_weights():
    plain, iso, fan, ortho = select(CELLS, ["lenet-300-100"])
    base = plain.config()
    assert iso.config().replace(prune={"isometry": False}, name=base.name) == base
    assert fan.config().replace(prune={"kept_fan_in": False}, name=base.name) == base
    assert ortho.config().prune.reinit == "orthogonal" and base.prune.reinit != "orthogonal"
    assert {c.info["variant"] for c in select(CELLS, ["kept-fan-in"])} == {"kept-fan-in"}
