"""Lipschitz smoothness along training, against oracles computed here: on a quadratic loss the
estimate is ||H d|| / ||d|| for the step d taken (so between H's extreme eigenvalues); on a small
non-linear network it is the maximum over gamma of a full-batch gradient difference taken in one
piece with torch.func."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from sparsetrain.config import RunConfig, TrainConfig
from sparsetrain.data.loaders import EvalLoader, Loaders, TrainStream
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import GradientMask, apply_mask_
from sparsetrain.study.lipschitz import (GAMMAS, LipschitzCallback, along_training, full_batch_gradient,
                                         plot_lipschitz, training_chunks)
from sparsetrain.train.loop import train

N, D = 37, 5


class Regression(nn.Module):
    """x . w + b: with the loss mean (x . w + b - y)^2 / 2, a quadratic in (w, b)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return x @ self.w + self.b


def half_square(out, y):
    return 0.5 * ((out - y) ** 2).mean()


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64) + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64)
    return x, y


def _hessian_and_offset(x, y):
    """Independent: the loss is (1/N) sum (a . theta - y)^2 / 2 with a = (x, 1), theta = (w, b), so
    its Hessian is (1/N) sum a a^T and its gradient H theta - (1/N) sum a y."""
    a = np.concatenate([x.numpy(), np.ones((len(x), 1))], axis=1)
    return a.T @ a / len(x), a.T @ y.numpy() / len(x)


def _loaders(x, y, batch_size=4):
    return Loaders(train=TrainStream(x, y, batch_size, seed=0), val=None, test=EvalLoader(x, y, 64),
                   input_shape=(D,), num_classes=1, name="regression")


CFG = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, schedule="constant", iterations=7,
                  batch_size=4, val_every=0, checkpoint_every=0)


class Snapshots:
    """A hook keeping the weights after every step (the oracle's iterates)."""

    def __init__(self, model):
        self.model, self.weights = model, [_flat(model)]

    def after_backward(self):
        pass

    def after_step(self):
        self.weights.append(_flat(self.model))


def _flat(model):
    return np.concatenate([p.detach().numpy().reshape(-1).copy() for p in model.parameters()])


def test_on_a_quadratic_the_estimate_is_the_hessian_times_the_step_taken():
    x, y = _data()
    h, _ = _hessian_and_offset(x, y)
    model = Regression()
    snaps = Snapshots(model)
    seen = []
    callback = LipschitzCallback(model, training_chunks(TrainStream(x, y, 4), size=10), every=3, loss_fn=half_square,
                                 on_value=lambda step, value: seen.append((step, value)))
    train(model, _loaders(x, y), CFG, hooks=[snaps], callbacks=[callback], progress=None, loss_fn=half_square)
    assert [s for s, _ in callback.values] == [3, 6] and seen == callback.values
    eig = np.linalg.eigvalsh(h)
    for step, value in callback.values:
        d = snaps.weights[step] - snaps.weights[step - 1]
        expected = np.linalg.norm(h @ d) / np.linalg.norm(d)
        assert value == pytest.approx(expected, rel=1e-9)
        assert eig[0] - 1e-12 <= value <= eig[-1] + 1e-12
    # Measuring changed nothing: the same run without the callback ends at the same weights.
    plain = Regression()
    train(plain, _loaders(x, y), CFG, progress=None, loss_fn=half_square)
    assert np.array_equal(_flat(plain), _flat(model))


def test_a_pruned_networks_gradient_leaves_out_its_pruned_weights():
    x, y = _data()
    h, c = _hessian_and_offset(x, y)
    keep = torch.tensor([True, False, True, True, False])
    mask = {"w": keep}
    model = Regression()
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.5, 0.0, -1.0, 2.0, 0.0], dtype=torch.float64))
        model.b.fill_(0.25)
    theta = _flat(model)
    kept = np.concatenate([keep.numpy(), [True]]).astype(float)
    expected = kept * (h @ theta - c)
    for size in (1, 7, N):  # the chunking never changes the full-batch gradient
        got = full_batch_gradient(model, training_chunks(TrainStream(x, y, 4), size), loss_fn=half_square, mask=mask)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)

    # Along training with the mask: ||P H d|| / ||d||, P keeping the unpruned rows.
    model, snaps = Regression(), None
    apply_mask_(model, mask)
    snaps = Snapshots(model)
    callback = LipschitzCallback(model, training_chunks(TrainStream(x, y, 4), 10), every=2, loss_fn=half_square,
                                 mask=mask)
    train(model, _loaders(x, y), CFG, hooks=[GradientMask(model, mask), snaps], callbacks=[callback],
          progress=None, loss_fn=half_square)
    assert [s for s, _ in callback.values] == [2, 4, 6]
    for step, value in callback.values:
        d = snaps.weights[step] - snaps.weights[step - 1]
        assert d[[1, 4]].tolist() == [0.0, 0.0]
        assert value == pytest.approx(np.linalg.norm(kept * (h @ d)) / np.linalg.norm(d), rel=1e-9)


def test_on_a_network_it_is_the_largest_gradient_change_over_the_interpolation_points():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    chunks = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]
    callback = LipschitzCallback(net, chunks, every=2)
    callback.on_step(1, None)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    after = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    callback.on_step(2, None)
    assert net.training  # measured in inference mode, then put back

    # Oracle: the whole set in one batch, through torch.func, in inference mode (no dropout).
    net.eval()
    loss = lambda params: nn.functional.cross_entropy(torch.func.functional_call(net, params, (x,)), y)  # noqa: E731
    grad = lambda params: torch.cat([g.reshape(-1) for g in torch.func.grad(loss)(params).values()])  # noqa: E731
    g0 = grad(before)
    d = torch.cat([(after[n] - before[n]).reshape(-1) for n in before])
    expected = max(float(torch.linalg.vector_norm(grad({n: before[n] + g * (after[n] - before[n]) for n in before}) - g0))
                   / (g * float(torch.linalg.vector_norm(d))) for g in GAMMAS)
    assert callback.values[0][0] == 2
    assert callback.values[0][1] == pytest.approx(expected, rel=1e-4)
    for n, p in net.named_parameters():  # the model is back at the later iterate
        assert torch.equal(p, after[n])


def test_the_callback_keeps_the_models_mode_and_skips_a_broken_pair():
    net = nn.Sequential(nn.Linear(3, 2))
    chunks = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    callback = LipschitzCallback(net, chunks, every=5)
    net.train()
    callback.on_step(4, None)
    assert net.training
    callback.on_step(10, None)  # resumed past step 5: no consecutive pair, nothing measured
    assert callback.values == []
    callback.on_step(9, None)
    callback.on_step(10, None)  # the iterates are equal: no step to measure along
    assert len(callback.values) == 1 and math.isnan(callback.values[0][1])


@pytest.mark.parametrize("kwargs, words", [
    ({"every": 1}, "interval must be a whole number of steps >= 2"),
    ({"every": 100.0}, "interval must be a whole number of steps >= 2"),
    ({"gammas": (0.0, 0.5)}, "must lie in"),
    ({"gammas": ()}, "must lie in"),
])
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(SparsetrainError, match=words):
        LipschitzCallback(nn.Linear(2, 2), [], **kwargs)


def test_bad_chunks_are_refused():
    x, y = _data()
    with pytest.raises(SparsetrainError, match="chunk size"):
        training_chunks(TrainStream(x, y, 4), 0)
    with pytest.raises(SparsetrainError, match="examples must be a whole number from 1 to the training split's 37"):
        training_chunks(TrainStream(x, y, 4), 10, examples=38)
    with pytest.raises(SparsetrainError, match="at least one example"):
        full_batch_gradient(Regression(), [], loss_fn=half_square)


def test_the_plot_is_written(tmp_path):
    path = plot_lipschitz({0.0: [(1000, 2.0), (2000, 1.5)], 0.9: [(1000, 4.0), (2000, float("nan"))]},
                          tmp_path / "lipschitz.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_along_training_measures_a_pruned_run_through_the_pipeline(tmp_path):
    config = RunConfig(model="mlp-tiny", dataset="synthetic", name="tiny").replace(
        prune={"sparsity": 0.9}, train={"iterations": 6, "batch_size": 32, "val_every": 0, "checkpoint_every": 0})
    values, result = along_training(config, every=3, chunk=128, examples=256, data_dir=tmp_path)
    assert [s for s, _ in values] == [3, 6] and result.steps == 6
    assert all(math.isfinite(v) and v > 0 for _, v in values)
    with pytest.raises(SparsetrainError, match="train.execution = 'dense'"):
        along_training(config.replace(train={"execution": "sparse"}), data_dir=tmp_path)
