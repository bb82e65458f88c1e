"""The ``sparsetrain`` command: each subcommand through ``main(argv)``, plus the installed entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sparsetrain.recipes import list_recipes, recipe_path
from sparsetrain.cli.main import main
from sparsetrain.store import RunStore

TINY = ["--dataset", "synthetic", "--model", "mlp-tiny", "--no-progress"]
TRAIN = ["--iterations", "30", "--val-every", "10"]
MLP_TINY_M = 784 * 32 + 32 * 10  # prunable weights of mlp-tiny


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def layer_rows(out: str) -> dict[str, tuple[int, int, float]]:
    """name -> (kept, total, sparsity %) from the per-layer table printed by run/train."""
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\S+)\s+(\d+)\s+(\d+)\s+([\d.]+)%(\s.*)?", line.strip())  # then FLOPs, effective
        if m:
            rows[m[1]] = (int(m[2]), int(m[3]), float(m[4]))
    return rows


def test_entry_point_is_installed():
    script = Path(sys.executable).with_name("sparsetrain")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sparsetrain.cli.main"]
    done = subprocess.run(command + ["list", "recipes"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "recipes:" in done.stdout and "demo" in done.stdout
    done = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command_name in ("run", "prune", "train", "list", "runs", "reproduce"):
        assert command_name in done.stdout


def test_list_shows_models_with_sizes_and_recipes(capsys):
    code, out, _ = cli(capsys, "list")
    assert code == 0
    for section in ("models:", "datasets:", "methods:", "inits:", "recipes:", "optimizers:", "schedules:"):
        assert section in out
    assert re.search(r"lenet-300-100\s+266,610 parameters", out)
    assert re.search(r"lenet-5-caffe\s+431,080 parameters", out)
    for recipe in list_recipes():
        assert f"  {recipe}\n" in out
    assert "dense" in out and "snip" in out and "synthetic" in out


def test_list_one_section_with_pattern(capsys):
    code, out, _ = cli(capsys, "list", "models", "--pattern", "lenet*")
    assert code == 0
    assert out.splitlines()[0] == "models:" and len(out.splitlines()) == 3
    assert "mlp-tiny" not in out and "recipes:" not in out


def test_run_prints_results_then_runs_lists_it_then_reuses(capsys, tmp_path):
    store = tmp_path / "store"
    code, out, err = cli(capsys, "run", *TINY, *TRAIN, "--sparsity", "0.9", "--store", store)
    assert code == 0, err
    key = re.search(r"run ([0-9a-f]{16}) finished", out)[1]
    assert "mlp-tiny on synthetic, snip at 90.00% sparsity" in out
    error = re.search(r"test error \(final model\):\s+([\d.]+)%", out)
    assert error and 0 <= float(error[1]) <= 100
    assert re.search(r"test error \(best validation, it (10|20|30)\)", out)
    rows = layer_rows(out)
    assert set(rows) == {"1.weight", "3.weight"}
    assert rows["1.weight"][1] == 784 * 32 and rows["3.weight"][1] == 32 * 10
    assert sum(kept for kept, _, _ in rows.values()) == round(MLP_TINY_M * 0.1)

    record = RunStore(store).get(key)
    assert record.status == "finished" and record.config["train"]["iterations"] == 30
    assert record.config["prune"]["sparsity"] == 0.9 and record.config["train"]["epochs"] == 0.0
    assert float(error[1]) == pytest.approx(100 * record.results["test_error_final"], abs=0.006)

    code, out, _ = cli(capsys, "runs", "--store", store)
    assert code == 0
    assert key[:10] in out and "mlp-tiny" in out and "finished" in out
    code, out, _ = cli(capsys, "runs", "--store", store, "--json")
    assert code == 0 and [r["key"] for r in json.loads(out)] == [key]
    code, out, _ = cli(capsys, "runs", "--store", store, "--status", "failed")
    assert code == 0 and "match --status failed" in out  # runs exist, none failed

    code, out, _ = cli(capsys, "run", *TINY, *TRAIN, "--sparsity", "0.9", "--store", store)
    assert code == 0
    assert f"run {key} already recorded" in out
    assert layer_rows(out) == rows
    assert len(RunStore(store).list()) == 1


def test_runs_on_empty_store(capsys, tmp_path):
    code, out, _ = cli(capsys, "runs", "--store", tmp_path / "empty")
    assert code == 0 and "no runs recorded" in out


def test_prune_then_train_with_that_mask(capsys, tmp_path):
    mask_file = tmp_path / "m.safetensors"
    code, out, err = cli(capsys, "prune", *TINY, "--sparsity", "0.8", "--out", mask_file)
    assert code == 0, err
    assert f"mask written to {mask_file}" in out
    mask = load_file(str(mask_file))
    assert set(mask) == {"1.weight", "3.weight"}
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == round(MLP_TINY_M * 0.2)

    # train at the recipe's default sparsity (0.95): the mask's 0.8 must win
    store = tmp_path / "store"
    code, out, err = cli(capsys, "train", *TINY, *TRAIN, "--mask", mask_file, "--store", store)
    assert code == 0, err
    rows = layer_rows(out)
    assert {n: r[0] for n, r in rows.items()} == {n: int(m.sum()) for n, m in mask.items()}
    (record,) = RunStore(store).list()
    assert record.results["sparsity"] == pytest.approx(1 - kept / MLP_TINY_M, abs=1e-12)
    trained_mask = load_file(str(Path(store) / "runs" / record.key / "mask.safetensors"))
    assert all(bool((trained_mask[n] == mask[n]).all()) for n in mask)


def test_train_with_a_mask_for_another_model(capsys, tmp_path):
    mask_file = tmp_path / "conv.safetensors"
    assert cli(capsys, "prune", "--dataset", "synthetic", "--model", "conv-tiny", "--sparsity", "0.5",
               "--out", mask_file)[0] == 0
    code, out, err = cli(capsys, "train", *TINY, *TRAIN, "--mask", mask_file, "--store", tmp_path / "s")
    assert code == 2
    assert "does not fit" in err and str(mask_file) in err
    assert "Traceback" not in err


def test_prune_dense_is_refused(capsys, tmp_path):
    code, _, err = cli(capsys, "prune", *TINY, "--method", "dense", "--out", tmp_path / "m.safetensors")
    assert code == 2 and "no mask" in err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--sparsity", "1.5"], ["sparsity must be a fraction in [0, 1)", "1.5"]),
        (["--model", "lenet-300"], ["'lenet-300'", "'lenet-300-100'"]),
        (["--method", "snp"], ["'snp'", "'snip'"]),
        (["--recipe", "nosuch"], ["unknown recipe 'nosuch'", "demo"]),
        (["--recipe", "snip-table1-lenet300"], ["snip-table1-lenet300-95"]),
        (["--set", "train.nosuch=1"], ["nosuch", "[train]", "lr"]),
        (["--set", "bad"], ["SECTION.KEY=VALUE", "'bad'"]),
        (["--set", "other.lr=1"], ["prune or train"]),
        (["--set", "prune.sparsity=high"], ["'sparsity'", "float"]),
        (["--set", "prune=5"], ["prune"]),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, tmp_path, argv, needles):
    store = tmp_path / "store"
    code, out, err = cli(capsys, "run", *TINY, *TRAIN, *argv, "--store", store)
    assert code == 2
    assert err.startswith("sparsetrain run: error: ")
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err and out == ""
    assert RunStore(store).list() == []


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--sparsity", "lots"])
    assert info.value.code == 2
    assert "--sparsity" in capsys.readouterr().err


def test_set_values_reach_the_config(capsys):
    code, out, _ = cli(capsys, "run", *TINY, "--set", "train.end_lr_factor=0.01", "--set", "seed=4",
                       "--set", "prune.reinit=variance-scaling", "--lr", "0.05", "--print-config")
    assert code == 0
    data = tomllib.loads(out)
    assert data["train"]["end_lr_factor"] == 0.01 and data["seed"] == 4
    assert data["prune"]["reinit"] == "variance-scaling" and data["train"]["lr"] == 0.05
    assert data["model"] == "mlp-tiny" and data["dataset"] == "synthetic"


def test_print_config_of_a_recipe(capsys):
    code, out, _ = cli(capsys, "run", "--recipe", "demo", "--print-config")
    assert code == 0
    printed = tomllib.loads(out)
    recipe = tomllib.loads(recipe_path("demo").read_text())
    assert printed["name"] == "demo"
    for key, value in recipe.items():
        if isinstance(value, dict):
            for k, v in value.items():
                assert printed[key][k] == v, (key, k)
        else:
            assert printed[key] == value, key


def test_flags_override_the_recipe(capsys):
    code, out, _ = cli(capsys, "run", "--recipe", "demo", "--epochs", "2", "--sparsity", "0.5", "--print-config")
    assert code == 0
    printed = tomllib.loads(out)
    assert printed["train"]["epochs"] == 2.0 and printed["train"]["iterations"] == 0  # one length only
    assert printed["prune"]["sparsity"] == 0.5 and printed["model"] == "lenet-300-100"


def test_reproduce_writes_table_and_json(capsys, tmp_path, mnist_root):
    out_md = tmp_path / "t.md"
    code, out, err = cli(
        capsys, "reproduce", "snip-table1", "--rows", "snip-table1-lenet300-95", "--seeds", "0",
        "--iterations", "20", "--store", tmp_path / "store", "--out", out_md, "--data-dir", mnist_root,
        "--no-progress",
    )
    assert code == 0, err
    table = out_md.read_text()
    assert "LeNet-300-100" in table and "| 95% |" in table and "| 20 |" in table
    data = json.loads(out_md.with_suffix(".json").read_text())
    (row,) = data["snip-table1-lenet300-95"]
    assert row["seed"] == 0 and 0 <= row["test_error_final"] < 0.9  # 20 SGD steps beat chance on MNIST
    assert row["sparsity"] == pytest.approx(0.95, abs=1e-4)
    (record,) = RunStore(tmp_path / "store").list()
    assert record.status == "finished" and record.name == "snip-table1-lenet300-95"
    assert record.key == row["key"]


def test_reproduce_unknown_row(capsys, tmp_path):
    code, _, err = cli(capsys, "reproduce", "snip-table1", "--rows", "nosuch", "--store", tmp_path / "s",
                       "--out", tmp_path / "t.md")
    assert code == 2 and "nosuch" in err
    assert not (tmp_path / "t.md").exists()


def test_output_piped_into_a_reader_that_has_gone_ends_quietly():
    """`sparsetrain runs show KEY | head -1`: the reader closes the pipe; the command ends without
    a traceback (exit 128 + SIGPIPE), as Unix tools do. Here the pipe's read end is closed before
    the command starts, so its first write fails."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "sparsetrain.cli.main", "list", "models"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141
