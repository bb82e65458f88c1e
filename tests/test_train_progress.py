"""What a training run shows as it goes: one line per validation check without a bar
(``progress=False``, ``--no-progress``), the validation error beside the bar with one, nothing
in worker processes (``progress=None``)."""

from __future__ import annotations

import re

import torch

from sparsetrain import TrainConfig, create_model, train
from sparsetrain.data import make_synthetic
from sparsetrain.data.loaders import EvalLoader, Loaders, TrainStream

LINE = re.compile(r"step (\d+)/(\d+)  loss ([\d.]+)  val error ([\d.]+)%  sparsity 0\.500  \(([\d.]+) s\)")


def tiny_loaders():
    raw = make_synthetic(200, 60, shape=(1, 28, 28), seed=0)
    return Loaders(
        train=TrainStream(raw.train_x[:160], raw.train_y[:160], 20, seed=0),
        val=EvalLoader(raw.train_x[160:], raw.train_y[160:], 50),
        test=EvalLoader(raw.test_x, raw.test_y, 50),
        input_shape=(1, 28, 28), num_classes=10, name="synthetic",
    )


def run_tiny(progress):
    torch.manual_seed(0)
    cfg = TrainConfig(iterations=100, val_every=50, checkpoint_every=0)
    return train(create_model("mlp-tiny"), tiny_loaders(), cfg, progress=progress, postfix={"sparsity": "0.500"})


def test_no_progress_prints_one_line_per_validation_check(capsys):
    result = run_tiny(False)
    out, err = capsys.readouterr()
    assert out == ""
    lines = [LINE.fullmatch(line) for line in err.strip().splitlines()]
    assert all(lines), err
    assert [(int(m[1]), int(m[2])) for m in lines] == [(50, 100), (100, 100)]
    # the figures are the run's own measurements: its curves are the oracle
    vals = dict(result.curves["val_error"])
    losses = dict(result.curves["train_loss"])
    for m in lines:
        step = int(m[1])
        assert float(m[4]) == round(100 * vals[step], 2)
        assert float(m[3]) == round(losses[step], 3)
    assert float(lines[0][5]) <= float(lines[1][5])


def test_the_bar_shows_the_validation_error(capsys):
    result = run_tiny(True)
    err = capsys.readouterr().err
    last = 100 * result.curves["val_error"][-1][1]
    assert f"val error={last:.2f}%" in err and "sparsity=0.500" in err
    assert not LINE.search(err)


def test_worker_runs_print_nothing(capsys):
    run_tiny(None)
    assert capsys.readouterr() == ("", "")
