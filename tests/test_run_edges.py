"""run()'s edges: a wrong device is refused before anything is recorded; a run whose own mask file
was damaged while it was interrupted says how to start it over; the mask a run saves names its model."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import load_mask
from sparsetrain.models import create_model
from sparsetrain.run import run
from sparsetrain.store import RunStore


def tiny(iterations: int = 20) -> RunConfig:
    train = {"iterations": iterations, "val_every": 10, "checkpoint_every": 10}
    return RunConfig(model="mlp-tiny", dataset="synthetic", name="tiny").replace(prune={"sparsity": 0.9}, train=train)


def test_a_wrong_device_records_nothing(tmp_path):
    with pytest.raises(SparsetrainError, match="unknown device 'gpu'"):
        run(tiny(), store=tmp_path / "store", device="gpu", progress=False)
    assert not (tmp_path / "store").exists() or RunStore(tmp_path / "store").list() == []


def test_a_runs_own_mask_names_its_model_and_a_damaged_one_says_start_over(tmp_path):
    store = RunStore(tmp_path / "store")
    outcome = run(tiny(), store=store, progress=False)
    mask_file = store.artifact_dir(outcome.key) / "mask.safetensors"
    loaded = load_mask(mask_file)
    assert loaded.metadata["model"] == "mlp-tiny"
    assert loaded.metadata["model_parameters"] == str(sum(p.numel() for p in create_model("mlp-tiny").parameters()))

    # Interrupted (status running), then its mask damaged on disk: resuming refuses and says --force.
    store.fail(outcome.key, "KeyboardInterrupt", status="interrupted")
    data = bytearray(mask_file.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    mask_file.write_bytes(bytes(data))
    with pytest.raises(SparsetrainError, match=r"cannot resume: mask file .* is damaged.*--force"):
        run(tiny(), store=store, progress=False)
    fresh = run(tiny(), store=store, progress=False, force=True)
    assert fresh.status == "finished" and torch.isclose(torch.tensor(fresh.results["sparsity"]), torch.tensor(0.9), atol=0.01)


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt(), 130), ("terminated", 143)])
def test_the_command_line_exits_as_the_shell_expects_for_ctrl_c_and_sigterm(monkeypatch, capsys, stop, code):
    """128 + the signal's number: 130 for Ctrl-C (SIGINT 2), 143 for SIGTERM (15), so that a job
    scheduler can tell a run it stopped from one the user stopped."""
    from sparsetrain.cli import commands, main
    from sparsetrain.run import Terminated

    error = Terminated("SIGTERM") if stop == "terminated" else stop

    def stopped(args):
        raise error

    monkeypatch.setitem(commands.COMMANDS, "list", (*commands.COMMANDS["list"][:2], stopped))
    assert main.main(["list"]) == code
    assert "resumes from its last checkpoint" in capsys.readouterr().err


def test_a_label_outside_the_classes_only_in_an_evaluation_split_is_explained():
    """Training never saw it (the check there runs on the training batches): evaluate() says what
    is wrong instead of torch's IndexError, whether the label is in the first batch or a later one."""
    from sparsetrain.train.loop import evaluate

    model = torch.nn.Linear(4, 3)
    good = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    bad = (torch.randn(5, 4), torch.tensor([0, 1, 3, 0, 1]))
    for loader in ([bad, good], [good, bad]):
        with pytest.raises(SparsetrainError, match=r"targets must be class indices 0\.\.2 .* got 3"):
            evaluate(model, loader)
    error, _ = evaluate(model, [good])
    assert 0.0 <= error <= 1.0
