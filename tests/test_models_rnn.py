"""SNIP Table 2's recurrent networks: their sizes by formula and against the paper, SNIP on their
gates, masked training, and sequential MNIST (rows and pixels) end to end."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.cli.main import main
from sparsetrain.data import create_loaders
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import GradientMask, apply_mask_
from sparsetrain.models import create_model
from sparsetrain.pruning import prune_at_init

# name -> (gates of the cell: 4 for an LSTM, 3 for a GRU; hidden units; the paper's count)
PAPER = {"lstm-s": (4, 128, 137_000), "lstm-b": (4, 256, 535_000),
         "gru-s": (3, 128, 104_000), "gru-b": (3, 256, 404_000)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_count(gates: int, h: int, features: int = 28, classes: int = 10, layers: int = 1) -> int:
    """Input projection F*h + h; each recurrent layer gates*(h*h + h*h + 2h) (input and hidden
    weights, both bias vectors, as torch has them); head h*classes + classes."""
    return (features * h + h) + layers * gates * (h * h + h * h + 2 * h) + (h * classes + classes)


@pytest.mark.parametrize("name", PAPER)
def test_counts_match_the_formula_and_the_paper(name):
    gates, h, paper = PAPER[name]
    count = n_params(create_model(name))
    assert count == expected_count(gates, h)
    assert abs(count - paper) / paper < 0.02
    if name == "lstm-s":  # the breakdown: 3,712 + 132,096 + 1,290
        assert count == 3_712 + 132_096 + 1_290 == 137_098


def test_model_args_change_width_and_depth():
    model = create_model("gru-s", hidden=16, layers=2)
    assert (model.rnn.hidden_size, model.rnn.num_layers) == (16, 2)
    assert n_params(model) == expected_count(3, 16, layers=2)
    assert n_params(create_model("lstm-b", input_shape=(784, 1), num_classes=5)) == expected_count(4, 256, 1, 5)


@pytest.mark.parametrize("name", ["lstm-s", "gru-b"])
def test_image_examples_are_refused_with_the_view_to_use(name):
    with pytest.raises(SparsetrainError, match="view = 'rows'"):
        create_model(name, input_shape=(1, 28, 28))


def test_nonpositive_sizes_are_refused():
    with pytest.raises(SparsetrainError, match="hidden >= 1 and layers >= 1"):
        create_model("lstm-s", layers=0)


def test_the_last_steps_hidden_state_decides():
    # An oracle for the forward pass: project, run torch's own LSTM cell step by step, head on h_T.
    torch.manual_seed(0)
    model = create_model("lstm-s", hidden=8, forget_bias=0.0).eval()  # forget_bias: tested below
    x = torch.randn(3, 5, 28)  # (B, T, F)
    cell = nn.LSTMCell(8, 8)
    rnn = model.rnn
    with torch.no_grad():
        for ours, theirs in [("weight_ih_l0", "weight_ih"), ("weight_hh_l0", "weight_hh"),
                             ("bias_ih_l0", "bias_ih"), ("bias_hh_l0", "bias_hh")]:
            getattr(cell, theirs).copy_(getattr(rnn, ours))
        h = c = torch.zeros(3, 8)
        for t in range(5):
            h, c = cell(x[:, t] @ model.project.weight.T + model.project.bias, (h, c))
        torch.testing.assert_close(model(x), h @ model.head.weight.T + model.head.bias)


@pytest.mark.parametrize("name", ["lstm-s", "gru-s"])
def test_snip_scores_the_gates_and_masked_training_keeps_them_zero(name):
    torch.manual_seed(0)
    model = create_model(name, hidden=16)
    x, y = torch.randn(8, 28, 28), torch.randint(0, 10, (8,))
    mask = prune_at_init(model, "snip", sparsity=0.9, batches=(x, y), include_biases=True)
    recurrent = {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"}
    assert recurrent <= set(mask)

    # Oracle: |dL/dw * w| over every weight and bias, the top round(m * 0.1) kept globally.
    params = dict(model.named_parameters())
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    scores = torch.cat([(params[n].grad * params[n]).abs().flatten() for n in mask])
    kappa = round(scores.numel() * (1 - 0.9))
    assert sum(int(m.sum()) for m in mask.values()) == kappa
    threshold = scores.topk(kappa).values[-1]
    expected = {n: (params[n].grad * params[n]).abs() >= threshold for n in mask}
    for n in mask:
        assert torch.equal(mask[n].bool(), expected[n]), n
    assert not any(mask[n].all() for n in recurrent)  # the gates lost entries like any other layer

    apply_mask_(model, mask)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook = GradientMask(model, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        hook.after_backward()
        optimizer.step()
        hook.after_step()
    for n in recurrent:
        p, kept = params[n], mask[n].bool()
        assert torch.count_nonzero(p[~kept]) == 0, n  # pruned gate entries stay exactly zero
        if kept.any():
            assert not torch.equal(p[kept], before[n][kept]), n  # the kept ones trained
    # the module computes with the masked tensors (no stale flattened copy of the weights)
    with torch.no_grad():
        reference = create_model(name, hidden=16)
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), reference(x))


def test_pixels_view_gives_784_steps_of_one_pixel(mnist_root):
    # 784 steps of tiny operations: one thread (a second waits at each step when a core is busy)
    torch.set_num_threads(1)  # conftest restores it
    loaders = create_loaders("mnist", batch_size=2, data_dir=mnist_root, download=False,
                             data_args={"view": "pixels"})
    assert loaders.input_shape == (784, 1)
    x, y = loaders.train.batch(0)
    model = create_model("lstm-s", input_shape=loaders.input_shape)
    assert model.project.in_features == 1
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in model.parameters())


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.slow  # about 6 s: validation and test passes over 16,000 real sequences
def test_lstm_s_on_sequential_mnist_rows_end_to_end(mnist_root, capsys):
    code, out = run_cli(capsys, "run", "--model", "lstm-s", "--dataset", "mnist", "--data-arg", "view=rows",
                        "--iterations", "20", "--data-dir", mnist_root, "--no-progress")
    assert code == 0, out
    assert "finished: lstm-s on mnist" in out
    assert re.search(r"rnn\.weight_hh_l0\s+\d+\s+65536\s", out)  # the recurrent weights were pruned
    error = float(re.search(r"test error \(final model\):\s+([\d.]+)%", out)[1])
    assert 0 <= error <= 100


def test_gru_s_on_pixelwise_sequences_end_to_end(capsys):
    # 784 steps per example make real MNIST's 16,000 evaluation examples too slow for a test; the
    # synthetic data set runs the same path (view, model shape, SNIP, training, evaluation). One
    # thread: 784 steps of tiny operations gain nothing from a second and lose much on a busy core.
    code, out = run_cli(capsys, "run", "--model", "gru-s", "--dataset", "synthetic", "--data-arg", "view=pixels",
                        "--data-arg", "n_train=40", "--data-arg", "n_test=8", "--model-arg", "hidden=16",
                        "--batch-size", "8", "--iterations", "2", "--threads", "1", "--no-progress")
    assert code == 0, out
    assert re.search(r"project\.weight\s+\d+\s+16\s", out)  # a 1 -> 16 projection: one pixel a step


def test_an_image_view_is_refused_by_the_command_line_with_the_fix(capsys):
    code, out = run_cli(capsys, "run", "--model", "lstm-s", "--dataset", "synthetic", "--iterations", "2",
                        "--no-progress")
    assert code == 2
    assert "lstm-s takes sequences of shape (steps, features), got examples of shape (1, 28, 28)" in out
    assert "view = 'rows'" in out and "Traceback" not in out


def test_lstm_forget_bias_is_tensorflows_constant_on_the_forget_gate():
    """The LSTM with forget_bias=1 computes, step by step, the cell written out here by hand (gates
    in nn.LSTM's order i, f, g, o; 1 added to f's pre-activation); it adds no parameter, and a
    pruned (zero) forget-gate bias still leaves the gate at sigmoid(1) for a zero input."""
    torch.manual_seed(0)
    model = create_model("lstm-s", hidden=8, input_shape=(5, 3))
    assert model.forget_bias == 1.0
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in create_model("lstm-s", hidden=8, input_shape=(5, 3), forget_bias=0.0).parameters())
    x = torch.randn(2, 5, 3)
    r, hidden = model.rnn, 8
    projected = model.project(x)
    h = c = torch.zeros(2, hidden)
    for t in range(5):
        gates = projected[:, t] @ r.weight_ih_l0.T + r.bias_ih_l0 + h @ r.weight_hh_l0.T + r.bias_hh_l0
        i, f, g, o = gates.split(hidden, 1)
        c = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    torch.testing.assert_close(model(x), model.head(h))
    model(x).sum().backward()
    assert r.bias_ih_l0.grad is not None and r.bias_ih_l0.grad.abs().sum() > 0
    with pytest.raises(SparsetrainError, match="unknown model_args 'forget_bias' for model 'gru-s'"):
        create_model("gru-s", forget_bias=1.0)
