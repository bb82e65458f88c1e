"""Sparse training (SparseTrainLinear): the oracle is the dense masked layer.

Forward, grad_x, grad of the values and grad_bias equal the dense ``nn.Linear`` with zeros (its
weight gradient taken at the kept entries); optimizer steps on the values equal masked dense
steps; ``run(..., execution="sparse")`` trains like ``execution="dense"``, resumes bit for bit and
its model converts back to a dense one.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.cli.main import main as cli_main
from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import GradientMask, apply_mask_, load_mask
from sparsetrain.models import create_model
from sparsetrain.run import run
from sparsetrain.sparse.training import SparseTrainLinear, densify_after_training_, sparsify_for_training_
from sparsetrain.state_io import load_state
from sparsetrain.store import RunStore
from sparsetrain.train.loop import evaluate

run_module = importlib.import_module("sparsetrain.run")

TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def masked_pair(out_f: int, in_f: int, density: float, dtype=torch.float64, bias=True, seed=0):
    """A dense Linear with zeros at the pruned entries, its mask, and the SparseTrainLinear of it.
    Rows 0 and the last are fully pruned (empty CSR rows)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g, dtype=dtype))
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=g, dtype=dtype))
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[0] = False
    mask[-1] = False
    apply_mask_(linear, {"weight": mask})
    return linear, mask, SparseTrainLinear.from_dense(linear, mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "out_f, in_f, batch, density",
    [(7, 5, 1, 0.5), (33, 17, 33, 0.3), (64, 100, 33, 0.05), (10, 32, 1, 0.9), (5, 3, 4, 0.0)],
)
def test_forward_and_gradients_equal_the_dense_masked_layer(dtype, out_f, in_f, batch, density):
    linear, mask, sparse = masked_pair(out_f, in_f, density, dtype)
    assert sparse.nnz == int(mask.sum())
    x = torch.randn(batch, in_f, dtype=dtype, requires_grad=True)
    xs = x.detach().clone().requires_grad_()
    y, ys = linear(x), sparse(xs)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(ys, y, **tol)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ys.backward(grad_y)
    torch.testing.assert_close(xs.grad, x.grad, **tol)
    torch.testing.assert_close(sparse.values.grad, linear.weight.grad[mask], **tol)
    torch.testing.assert_close(sparse.bias.grad, linear.bias.grad, **tol)


def test_more_leading_dimensions_no_bias_and_no_input_grad():
    linear, mask, sparse = masked_pair(12, 9, 0.4, bias=False)
    x = torch.randn(3, 4, 9, dtype=torch.float64)  # (B, T, in); inputs need no gradient
    ys = sparse(x)
    assert ys.shape == (3, 4, 12) and sparse.bias is None
    torch.testing.assert_close(ys, linear(x), **TOLERANCE[torch.float64])
    ys.square().sum().backward()
    linear(x).square().sum().backward()
    torch.testing.assert_close(sparse.values.grad, linear.weight.grad[mask], **TOLERANCE[torch.float64])

    x = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)  # and with one
    xs = x.detach().clone().requires_grad_()
    linear(x).sum().backward()
    sparse(xs).sum().backward()
    torch.testing.assert_close(xs.grad, x.grad, **TOLERANCE[torch.float64])


def test_stacked_sparse_layers_match_the_dense_masked_mlp():
    """Layers feed each other the transposed-view outputs; gradients flow through ReLU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    mask = {f"{i}.weight": torch.rand_like(model[i].weight) < 0.4 for i in (0, 2, 4)}
    apply_mask_(model, mask)
    sparse = sparsify_for_training_(copy.deepcopy(model), mask)
    x = torch.randn(33, 20, dtype=torch.float64)
    y = torch.randint(0, 4, (33,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(sparse(x), y).backward()
    for i in (0, 2, 4):
        torch.testing.assert_close(sparse[i].values.grad, model[i].weight.grad[mask[f"{i}.weight"]])
        torch.testing.assert_close(sparse[i].bias.grad, model[i].bias.grad)


@pytest.mark.parametrize(
    "name, make",
    [
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)),
        ("nesterov", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
        ("adam", lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_optimizer_steps_equal_dense_masked_steps(name, make, dtype):
    linear, mask, sparse = masked_pair(24, 30, 0.2, dtype)
    hook = GradientMask(linear, {"weight": mask})
    dense_opt, sparse_opt = make(linear.parameters()), make(sparse.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 30, generator=g, dtype=dtype)
        target = torch.randn(8, 24, generator=g, dtype=dtype)
        for layer, opt in ((linear, dense_opt), (sparse, sparse_opt)):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(layer(x), target).backward()
            if layer is linear:
                hook.after_backward()
            opt.step()
    torch.testing.assert_close(sparse.values.detach(), linear.weight.detach()[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(sparse.bias.detach(), linear.bias.detach(), rtol=0, atol=1e-6)
    assert bool((linear.weight[~mask] == 0).all())


def test_dense_round_trip_and_state_dict():
    linear, mask, sparse = masked_pair(9, 11, 0.3)
    back = sparse.to_dense_linear()
    assert type(back) is nn.Linear and back.weight.dtype == torch.float64
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    assert torch.equal(sparse.mask(), mask)

    state = sparse.state_dict()
    assert set(state) == {"values", "bias", "crow_indices", "col_indices", "t_crow_indices", "t_col_indices", "t_perm"}
    assert state["crow_indices"].dtype == state["col_indices"].dtype == torch.int32
    other = SparseTrainLinear.from_dense(nn.Linear(11, 9, dtype=torch.float64), mask)
    other.load_state_dict(state)
    assert torch.equal(other.values, sparse.values)

    # a dense masked layer's state dict loads too (its weight on the structure becomes the values)
    other.load_state_dict(linear.state_dict())
    assert torch.equal(other.values, sparse.values)
    bad = linear.state_dict()
    bad["weight"] = bad["weight"] + 1.0
    with pytest.raises(SparsetrainError, match="outside the sparse layer's structure"):
        other.load_state_dict(bad)


def test_sparsify_replaces_only_plain_masked_linears_and_densify_undoes_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # out_proj: a Linear subclass
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
            self.conv = nn.Conv1d(8, 8, 1)

        def forward(self, x):  # (B, T, 8)
            x = self.attn(x, x, x, need_weights=False)[0]
            x = self.body(x)
            return self.conv(x.transpose(1, 2)).mean((1, 2))

    torch.manual_seed(0)
    model = Net()
    names = ["attn.out_proj.weight", "body.0.weight", "conv.weight"]
    params = dict(model.named_parameters())
    mask = {n: torch.rand_like(params[n]) < 0.5 for n in names}
    apply_mask_(model, mask)
    x = torch.randn(2, 5, 8)
    expected = model(x)

    assert sparsify_for_training_(model, mask) is model
    assert type(model.body[0]) is SparseTrainLinear and type(model.body[2]) is nn.Linear
    assert type(model.attn.out_proj) is not SparseTrainLinear and type(model.conv) is nn.Conv1d
    remaining = dict(model.named_parameters())
    assert "body.0.values" in remaining and "body.0.weight" not in remaining
    assert [n for n in mask if n in remaining] == ["attn.out_proj.weight", "conv.weight"]
    torch.testing.assert_close(model(x), expected)

    assert densify_after_training_(model) is model
    assert type(model.body[0]) is nn.Linear and torch.equal(model.body[0].weight == 0, ~mask["body.0.weight"])
    torch.testing.assert_close(model(x), expected)

    # a model that is one Linear: the new layer is returned
    single = nn.Linear(4, 3)
    layer = sparsify_for_training_(single, {"weight": torch.ones(3, 4, dtype=torch.bool)})
    assert isinstance(layer, SparseTrainLinear) and isinstance(densify_after_training_(layer), nn.Linear)


def test_bad_mask_is_refused():
    with pytest.raises(SparsetrainError, match="bool tensor of the weight's shape"):
        SparseTrainLinear.from_dense(nn.Linear(4, 3), torch.ones(4, 3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# run() with execution = "sparse"
# --------------------------------------------------------------------------------------------


def tiny(execution: str, iterations: int = 40, **train) -> RunConfig:
    return RunConfig(model="mlp-tiny", dataset="synthetic", name="tiny").replace(
        prune={"sparsity": 0.9},
        train={"iterations": iterations, "val_every": 20, "checkpoint_every": 20, "execution": execution, **train},
    )


def test_run_sparse_trains_like_dense(tmp_path):
    dense = run(tiny("dense"), store=RunStore(tmp_path / "d"), progress=False).results
    sparse = run(tiny("sparse"), store=RunStore(tmp_path / "s"), progress=False).results
    assert sparse["test_error_final"] < 0.5
    # float rounding only: errors equal or one example apart (200 test, 60 validation examples)
    assert abs(sparse["test_error_final"] - dense["test_error_final"]) <= 1 / 200 + 1e-12
    assert abs(sparse["best_val_error"] - dense["best_val_error"]) <= 1 / 60 + 1e-12
    assert sparse["sparsity"] == dense["sparsity"]


def test_run_sparse_uses_sparse_layers_and_masks_the_rest(tmp_path, monkeypatch):
    seen = {}

    def capture(model, loaders, cfg, *, hooks=(), **kwargs):
        seen["model"], seen["hooks"] = model, list(hooks)
        return real_train(model, loaders, cfg, hooks=hooks, **kwargs)

    pipeline_module = importlib.import_module("sparsetrain.pipeline")  # where the run's stages live
    real_train = pipeline_module.train
    monkeypatch.setattr(pipeline_module, "train", capture)
    # biases pruned too: they stay dense parameters, masked by GradientMask
    run(tiny("sparse", iterations=10).replace(prune={"include_biases": True}), store=None, progress=False)
    model = seen["model"]
    assert [type(m) for m in model if isinstance(m, (nn.Linear, SparseTrainLinear))] == [SparseTrainLinear] * 2
    (hook,) = seen["hooks"]
    params = dict(model.named_parameters())
    assert [p is params["1.bias"] or p is params["3.bias"] for p in hook.params] == [True, True]

    seen.clear()
    run(tiny("sparse", iterations=10), store=None, progress=False)
    assert seen["hooks"] == []  # every masked parameter is a sparse layer's


def test_run_sparse_resumes_bit_identically_and_converts_back_to_dense(tmp_path, monkeypatch):
    config = tiny("sparse", iterations=60)  # checkpoints at 20 and 40
    reference_store = RunStore(tmp_path / "reference")
    reference = run(config, store=reference_store, progress=False)

    store = RunStore(tmp_path / "interrupted")
    real_log = RunStore.log_metrics
    armed = [True]

    def log_then_interrupt(self, key, step, metrics):
        if armed[0] and step >= 50:  # after the checkpoint at step 40
            armed[0] = False
            raise KeyboardInterrupt
        return real_log(self, key, step, metrics)

    monkeypatch.setattr(RunStore, "log_metrics", log_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(config, store=store, progress=False)
    folder = store.root / "runs" / config.key()
    assert load_state(folder / "checkpoint.safetensors")["step"] == 40
    resumed = run(config, store=store, progress=False)

    skip = {"seconds"}
    assert {k: v for k, v in resumed.results.items() if k not in skip} == \
        {k: v for k, v in reference.results.items() if k not in skip}
    a = load_state(folder / "checkpoint.safetensors")
    b = load_state(reference_store.root / "runs" / config.key() / "checkpoint.safetensors")
    assert "1.values" in b["model"] and "1.weight" not in b["model"]
    assert a["model"].keys() == b["model"].keys()
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momentum_a) == len(momentum_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))

    # the final model, rebuilt from the checkpoint and converted back to dense, gives the result
    mask = load_mask(folder / "mask.safetensors")
    model = sparsify_for_training_(create_model("mlp-tiny"), mask)
    model.load_state_dict(a["model"])
    dense = densify_after_training_(model)
    assert all(type(m) is not SparseTrainLinear for m in dense.modules())
    for name, m in mask.items():
        assert bool((dict(dense.named_parameters())[name][~m] == 0).all())
    from sparsetrain.data import create_loaders

    loaders = create_loaders("synthetic", batch_size=100, download=False)
    assert evaluate(dense, loaders.test)[0] == pytest.approx(reference.results["test_error_final"], abs=1 / 200 + 1e-12)


def test_execution_is_validated_and_has_a_flag(tmp_path, capsys):
    with pytest.raises(SparsetrainError, match="unknown execution 'gpu'"):
        run(tiny("gpu"), store=None, progress=False)
    code = cli_main(["run", "--model", "mlp-tiny", "--dataset", "synthetic", "--execution", "sparse", "--print-config"])
    assert code == 0 and 'execution = "sparse"' in capsys.readouterr().out
    assert tiny("sparse").key() != tiny("dense").key()  # a sparse run never resumes a dense checkpoint
