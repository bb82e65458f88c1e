"""The thread rule (sparsetrain.threads) and the --threads flag of run/train/prune/reproduce:
multiply-adds counted by hand, the rule's two branches, an explicit choice winning, the count
recorded in the results and the process left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsetrain import RunConfig, create_model, run
from sparsetrain import threads as th
from sparsetrain.cli.main import main
from sparsetrain.store import RunStore


def test_step_flops_counts_linear_and_conv_multiply_adds_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    conv = 4 * 26 * 26 * (1 * 3 * 3)  # outputs x multiply-adds each
    linear = 10 * 4 * 26 * 26
    assert th.step_flops(model, (1, 28, 28), batch_size=100) == 3 * 100 * (conv + linear)
    model.train()
    th.step_flops(model, (1, 28, 28), 7)
    assert model.training  # left as it was


@pytest.mark.parametrize("cell, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_step_flops_counts_recurrent_layers_by_hand(cell, gates):
    """A recurrent layer's work is gates x (inputs + hidden) x hidden per step, example, layer and
    direction (it was invisible to the rule, so LSTM-b trained on one thread even on a quiet machine)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(5, 7, num_layers=2, bidirectional=True, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    per_step = 2 * gates * (5 + 7) * 7 + 2 * gates * (14 + 7) * 7  # layer 1, layer 2 (inputs: both directions)
    assert th.step_flops(Net(), (11, 5), batch_size=4) == 3 * 4 * 11 * per_step
    lstm_b = create_model("lstm-b")  # 28 steps of 28, hidden 256: the recurrent layer dominates
    assert th.step_flops(lstm_b, (28, 28), batch_size=100) > th.SMALL_STEP_FLOPS


def test_step_flops_of_the_lenets_at_batch_100():
    # LeNet-300-100: 784*300 + 300*100 + 100*10 multiply-adds an example
    assert th.step_flops(create_model("lenet-300-100"), (1, 28, 28), 100) == 3 * 100 * (784 * 300 + 300 * 100 + 1000)
    lenet5 = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10
    assert th.step_flops(create_model("lenet-5-caffe"), (1, 28, 28), 100) == 3 * 100 * lenet5


@pytest.mark.parametrize("idle, expected", [(2.0, 2), (1.1, 1), (0.2, 1), (None, 2)])
def test_the_rule(monkeypatch, idle, expected):
    monkeypatch.setattr(th, "DEFAULT_THREADS", 2)
    small = create_model("lenet-300-100")  # 8e7 multiply-adds a step: always one thread
    assert th.choose_threads(small, (1, 28, 28), 100, idle=idle) == 1
    big = create_model("vgg-cifar-small")  # 3e9: the cores the load leaves idle, at most torch's default
    assert th.choose_threads(big, (3, 32, 32), 100, idle=idle) == expected
    assert th.choose_threads(big, (3, 32, 32), 100, idle=16.0) == 2


def test_training_threads_restores_the_count_and_a_request_wins(monkeypatch):
    monkeypatch.setattr(th, "DEFAULT_THREADS", 2)
    torch.set_num_threads(2)
    model = create_model("lenet-300-100")
    with th.training_threads(model, (1, 28, 28), 100) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    th.request_threads(2)
    with th.training_threads(model, (1, 28, 28), 100) as n:
        assert n == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1])
def test_a_bad_thread_count_is_refused(capsys, bad):
    code = main(["run", "--dataset", "synthetic", "--model", "mlp-tiny", "--iterations", "2", "--threads", str(bad),
                 "--no-progress"])
    assert code == 2
    assert "--threads must be a whole number of at least 1" in capsys.readouterr().err


def test_run_records_the_threads_it_trained_on(capsys, tmp_path):
    argv = ["run", "--dataset", "synthetic", "--model", "mlp-tiny", "--iterations", "20", "--val-every", "10",
            "--no-progress", "--store", str(tmp_path / "s")]
    assert main(argv + ["--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "threads 1" in err  # beside every validation line
    config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(train={"iterations": 20, "val_every": 10})
    (record,) = RunStore(tmp_path / "s").list()
    assert record.results["threads"] == 1
    # the thread count is not part of the run's identity: another count reuses the record
    assert main(argv + ["--threads", "2"]) == 0
    assert "already recorded" in capsys.readouterr().out
    assert run(config, store=None, progress=None).results["threads"] >= 1


def test_every_training_command_has_the_flag(capsys):
    for command in ("run", "train", "prune", "reproduce"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--threads N" in capsys.readouterr().out, command
