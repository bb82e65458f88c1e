"""Jacobian singular values (sparsetrain.signal) against oracles computed here: products of
weight matrices, D W written by hand, torch.autograd.functional.jacobian one example at a time,
and torch's own recurrent cells."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import apply_mask_
from sparsetrain.models import create_model
from sparsetrain.signal import JSVStats, input_output_jsv, lanczos_extremes, layerwise_jsv, singular_values
from sparsetrain.signal import jsv
from sparsetrain.signal.jsv import layer_jacobians, recurrent_step_jacobians


def svd_loop(model, x):
    """The oracle: each example's Jacobian by torch.autograd.functional.jacobian, one at a time."""
    out = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).squeeze(0), xi)
        out.append(torch.linalg.svdvals(j.reshape(j.shape[0], -1).double()))
    return torch.stack(out)  # (B, min(classes, inputs))


def test_deep_linear_masked_equals_product_of_masked_weights():
    torch.manual_seed(0)
    sizes = [12, 9, 8, 8, 7, 5]
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])
    g = torch.Generator().manual_seed(1)
    mask = {f"{i}.weight": torch.rand(b, a, generator=g) > 0.4 for i, (a, b) in enumerate(zip(sizes, sizes[1:]))}
    apply_mask_(model, mask)
    product = torch.eye(12, dtype=torch.float64)
    for i, layer in enumerate(model):
        product = (layer.weight.detach().double() * mask[f"{i}.weight"]) @ product
    expected = torch.linalg.svdvals(product)  # (5,)
    stats = input_output_jsv(model, [torch.randn(3, 12), (torch.randn(4, 12), torch.zeros(4))])
    assert stats.count == 7 * 5
    got = stats.values.reshape(7, 5)
    assert torch.allclose(got, expected.expand(7, 5), atol=1e-5 * float(expected[0]))
    assert stats.max == pytest.approx(float(expected[0]), rel=1e-5)
    assert stats.mean == pytest.approx(float(expected.mean()), rel=1e-5)
    assert stats.std == pytest.approx(float(expected.std(correction=0)), rel=1e-4)


def test_layerwise_mlp_tanh_is_d_times_w_by_hand():
    torch.manual_seed(0)
    model = create_model("mlp-3", input_shape=(1, 4, 3), width=6, num_classes=4, activation="tanh")
    x = torch.randn(5, 1, 4, 3)
    result = layerwise_jsv(model, x)
    assert list(result) == ["1", "3", "5"]  # the Linear modules of Flatten, Linear, Tanh, Linear, Tanh, Linear
    assert result["1"].layer == "Linear(12->6) + Tanh" and result["5"].layer == "Linear(6->4)"
    h = x.reshape(5, -1).double()
    for name in ["1", "3", "5"]:
        layer = model[int(name)]
        w, b = layer.weight.detach().double(), layer.bias.detach().double()
        pre = h @ w.T + b
        d = 1 - torch.tanh(pre) ** 2 if name != "5" else torch.ones_like(pre)  # tanh' at the pre-activation
        expected = torch.stack([torch.linalg.svdvals(torch.diag(d[i]) @ w) for i in range(5)])
        assert torch.allclose(result[name].values.reshape(5, -1), expected, atol=1e-5), name
        h = torch.tanh(pre)


def test_layerwise_linear_batch_norm_tanh_by_hand_and_pooling_ends_a_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    model[1].weight.data.uniform_(0.5, 2)
    x = torch.randn(6, 5)
    result = layerwise_jsv(model, x)
    assert result["0"].layer == "Linear(5->4) + BatchNorm1d + Tanh"
    bn = model[1]
    w = model[0].weight.detach().double()
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double()
    pre = ((x.double() @ w.T + model[0].bias.detach().double()) - bn.running_mean.double()) * scale \
        + bn.bias.detach().double()
    d = 1 - torch.tanh(pre) ** 2
    expected = torch.stack([torch.linalg.svdvals(torch.diag(d[i] * scale) @ w) for i in range(6)])
    assert torch.allclose(result["0"].values.reshape(6, -1), expected, atol=1e-5)
    pooled = layerwise_jsv(nn.Sequential(nn.Conv1d(1, 2, 3), nn.MaxPool1d(2), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(8, 2)), torch.randn(2, 1, 10))
    assert pooled["0"].layer == "Conv1d(1->2, k=(3,))"


def test_batched_equals_one_example_at_a_time_conv_net():
    torch.manual_seed(0)
    model = create_model("conv-tiny", input_shape=(1, 10, 10), num_classes=3)
    x = torch.randn(6, 1, 10, 10)
    stats = input_output_jsv(model, x, chunk_size=4)
    assert model.training
    model.eval()  # batch-norm's running statistics, as input_output_jsv uses them
    assert torch.allclose(stats.values.reshape(6, 3), svd_loop(model, x), atol=1e-5)


def test_recurrent_input_output_equals_the_loop_and_eval_mode_is_restored():
    torch.manual_seed(0)
    model = create_model("lstm-s", input_shape=(5, 4), hidden=8, num_classes=3)
    x = torch.randn(4, 5, 4)
    model.train()
    stats = input_output_jsv(model, (x, torch.zeros(4)))
    assert model.training
    assert torch.allclose(stats.values.reshape(4, 3), svd_loop(model, x), atol=1e-6)


def test_attention_without_a_vmap_rule_equals_the_loop_without_warnings():
    torch.manual_seed(0)
    model = create_model("attention-tiny", input_shape=(4, 6), dim=8, heads=2, num_classes=3).eval()
    x = torch.randn(3, 4, 6)
    stats = input_output_jsv(model, x)  # the suite turns torch's vmap fallback warning into an error
    assert torch.allclose(stats.values.reshape(3, 3), svd_loop(model, x), atol=1e-6)


def test_batch_norm_uses_running_statistics_and_mode_comes_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(6, 5)
    stats = input_output_jsv(model, x)
    assert model.training and model[1].training
    model.eval()
    assert torch.allclose(stats.values.reshape(6, 3), svd_loop(model, x), atol=1e-6)


def conv_tanh():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    return conv, (lambda u: torch.tanh(conv(u))), torch.randn(3, 2, 6, 6)


def test_conv_layer_jacobian_agrees_with_autograd():
    conv, g, u = conv_tanh()
    jac = layer_jacobians(g, u)  # (3, 4*6*6, 2*6*6)
    for i in range(3):
        expected = torch.autograd.functional.jacobian(lambda v: g(v.unsqueeze(0)).squeeze(0), u[i])
        assert torch.allclose(jac[i], expected.reshape(144, 72), atol=1e-6)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(144, 3))
    result = layerwise_jsv(model, u)
    assert result["0"].method == "exact" and result["0"].layer == "Conv2d(2->4, k=(3, 3)) + Tanh"
    expected = torch.linalg.svdvals(jac.double())
    assert torch.allclose(result["0"].values.reshape(3, -1), expected, atol=1e-5)


def test_matrix_free_estimates_agree_with_exact_values_on_a_small_input():
    _, g, u = conv_tanh()
    exact = torch.linalg.svdvals(layer_jacobians(g, u).double())  # (3, 72): J is 144 x 72, n = 72
    # Fewer steps than singular values: max within 0.1%; the min an upper bound of the true min;
    # mean and mean square (stochastic quadrature, 32 random probes of a 72-dimensional space)
    # within 5%.
    est = lanczos_extremes(g, u, steps=24, seed=1, probes=32)
    assert est.n == 72 and est.steps == 24
    assert torch.allclose(est.max, exact[:, 0], rtol=1e-3)
    assert torch.all(est.min >= exact[:, -1] - 1e-6) and torch.all(est.max <= exact[:, 0] + 1e-6)
    assert torch.allclose(est.mean, exact.mean(1), rtol=0.05)
    assert torch.allclose(est.mean_square, (exact**2).mean(1), rtol=0.05)
    # As many steps as values: the extremes are exact (the mean still depends on the probe).
    full = lanczos_extremes(g, u, steps=72)
    assert torch.allclose(full.min, exact[:, -1], rtol=1e-4)
    assert torch.allclose(full.max, exact[:, 0], rtol=1e-6)
    # Wide layers (more inputs than outputs) run on J J^T: a strided conv.
    conv = nn.Conv2d(2, 1, 3, stride=2)
    wide = lanczos_extremes(conv, u, steps=4)
    exact_wide = torch.linalg.svdvals(layer_jacobians(conv, u).double())  # (3, 4): J is 4 x 72
    assert wide.n == 4 and torch.allclose(wide.max, exact_wide[:, 0], rtol=1e-5)
    assert torch.allclose(wide.min, exact_wide[:, -1], rtol=1e-4)


def test_layerwise_estimates_beyond_the_exact_limit():
    conv, _, u = conv_tanh()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(144, 3))
    exact = layerwise_jsv(model, u)["0"]
    est = layerwise_jsv(model, u, exact_limit=100, lanczos_steps=72, probes=16)["0"]
    assert est.method == "lanczos-72" and est.values is None and est.count == exact.count
    assert est.max == pytest.approx(exact.max, rel=1e-5) and est.min == pytest.approx(exact.min, rel=1e-4)
    assert est.mean == pytest.approx(exact.mean, rel=0.05) and est.std == pytest.approx(exact.std, rel=0.1)
    with pytest.raises(SparsetrainError, match="no histogram for singular values estimated by lanczos-72"):
        est.histogram()


def lstm_oracle_step(rnn, bias_offset, x, t, b):
    """dh_t/dh_{t-1} for example b by autograd through nn.LSTMCell with the module's weights."""
    cell = nn.LSTMCell(rnn.input_size, rnn.hidden_size)
    with torch.no_grad():
        cell.weight_ih.copy_(rnn.weight_ih_l0)
        cell.weight_hh.copy_(rnn.weight_hh_l0)
        cell.bias_ih.copy_(rnn.bias_ih_l0 + bias_offset)
        cell.bias_hh.copy_(rnn.bias_hh_l0)
    h = c = torch.zeros(1, rnn.hidden_size)
    for s in range(t):
        h, c = cell(x[b : b + 1, s], (h, c))
    return torch.autograd.functional.jacobian(lambda hp: cell(x[b : b + 1, t], (hp, c))[0], h)[0, :, 0]


def test_lstm_step_jacobian_against_torch_lstm_cell_with_forget_bias():
    torch.manual_seed(0)
    model = create_model("lstm-s", input_shape=(5, 4), hidden=6, num_classes=3)  # forget_bias 1.0
    x = torch.randn(2, 5, 4)
    result = layerwise_jsv(model, x)
    assert list(result) == ["project", "rnn.l0", "head"]
    assert result["rnn.l0"].count == 2 * 5 * 6
    projected = model.project(x).detach()
    offset = model._forget_offset
    got = result["rnn.l0"].values.reshape(2, 5, 6)
    for b in range(2):
        for t in range(5):
            expected = torch.linalg.svdvals(lstm_oracle_step(model.rnn, offset, projected, t, b).double())
            assert torch.allclose(got[b, t], expected, atol=1e-6), (b, t)


def test_gru_step_jacobian_matrices_against_torch_gru_cell():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 5, batch_first=True)
    x = torch.randn(2, 4, 3)
    weights = {k: getattr(rnn, f"{k}_l0").detach() for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    states, jac = recurrent_step_jacobians(rnn, weights, x, torch.zeros(2, 5))
    assert torch.allclose(states[0], rnn(x)[0], atol=1e-6)
    cell = nn.GRUCell(3, 5)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in rnn.state_dict().items()})
    for b in range(2):
        h = torch.zeros(1, 5)
        for t in range(4):
            expected = torch.autograd.functional.jacobian(lambda hp: cell(x[b : b + 1, t], hp), h)[0, :, 0]
            assert torch.allclose(jac[b, t], expected, atol=1e-6)
            h = cell(x[b : b + 1, t], h)


def test_stats_histogram_and_json_against_numpy():
    values = torch.tensor([0.1, 0.5, 0.5, 0.9, 2.0, 1.3])
    stats = JSVStats.from_values(values)
    counts, edges = stats.histogram(bins=4)
    np_counts, np_edges = np.histogram(values.double().numpy(), bins=4)
    assert counts == np_counts.tolist() and np.allclose(edges, np_edges)
    assert stats.std == pytest.approx(float(np.std(values.double().numpy())))
    back = json.loads(json.dumps(stats.to_dict(bins=4)))
    assert back["histogram"]["counts"] == counts and back["count"] == 6


def test_bad_input_is_explained():
    model = create_model("mlp-3", input_shape=(1, 4, 3), width=6, num_classes=4)
    with pytest.raises(SparsetrainError, match="no examples .* the batches were empty"):
        input_output_jsv(model, [])
    with pytest.raises(SparsetrainError, match="no examples"):
        input_output_jsv(model, torch.randn(0, 1, 4, 3))
    with pytest.raises(SparsetrainError, match=r"the model refused inputs of shape \(2, 5\)"):
        input_output_jsv(model, torch.randn(2, 5))
    with pytest.raises(SparsetrainError, match="mapping"):
        input_output_jsv(model, {"input_ids": torch.zeros(2, 3)})
    with pytest.raises(SparsetrainError, match="floating-point tensor"):
        input_output_jsv(model, torch.zeros(2, 1, 4, 3, dtype=torch.long))
    with pytest.raises(SparsetrainError, match="max_examples must be >= 1"):
        input_output_jsv(model, torch.randn(2, 1, 4, 3), max_examples=0)
    with pytest.raises(SparsetrainError, match="ran no layer whose Jacobian layerwise_jsv knows"):
        layerwise_jsv(nn.Sequential(nn.Flatten(), nn.Tanh()), torch.randn(2, 3))
    with pytest.raises(SparsetrainError, match="takes one batch"):
        layerwise_jsv(model, [torch.randn(2, 1, 4, 3)] * 3)
    with pytest.raises(SparsetrainError, match=r"logits of shape \(batch, classes\)"):
        input_output_jsv(nn.Flatten(0), torch.randn(2, 3))


def test_max_examples_stops_early():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    stats = input_output_jsv(model, [torch.randn(3, 4)] * 3, max_examples=5)
    assert stats.count == 5 * 2


def test_chunks_of_examples_give_the_same_values(monkeypatch):
    torch.manual_seed(0)
    conv, _, u = conv_tanh()
    cnn = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(144, 3))
    lstm = create_model("lstm-s", input_shape=(5, 4), hidden=6, num_classes=3)
    seq = torch.randn(3, 5, 4)
    def run():
        return [layerwise_jsv(cnn, u), layerwise_jsv(cnn, u, exact_limit=100, lanczos_steps=8), layerwise_jsv(lstm, seq)]
    whole = run()
    monkeypatch.setattr(jsv, "CHUNK_ENTRIES", 1)  # one example per chunk
    chunked = run()
    for a, b in zip(whole, chunked):
        for name in a:
            if a[name].values is not None:
                assert torch.allclose(a[name].values, b[name].values, atol=1e-6), name
            for key in ("mean", "std", "max", "min"):  # the Lanczos start vectors too are the same
                assert getattr(a[name], key) == pytest.approx(getattr(b[name], key), rel=1e-6), (name, key)


def test_singular_values_of_ill_conditioned_matrices_against_svd():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(2, 10, 10, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(2, 30, 30, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -6, 10, dtype=torch.float64).expand(2, 10)
    j = (u * s[:, None, :]) @ v[:, :10, :]  # (2, 10, 30), singular values 1 .. 1e-6
    assert torch.allclose(singular_values(j), s, atol=1e-8)
    assert torch.allclose(singular_values(j.mT), s, atol=1e-8)  # the tall side: J^T J
