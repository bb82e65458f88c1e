"""Inspecting recorded runs: ``sparsetrain runs`` (listing, show, export, delete, check) and
``load_run``. The oracles are the store's own records read directly, hand-computed values, and a
test error counted here batch by batch."""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys

import pytest
import torch

import sparsetrain as st
from sparsetrain import fsio
from sparsetrain.cli.main import build_parser, main
from sparsetrain.data import create_loaders
from sparsetrain.inspect_run import BLOCKS, find_run, flatten, sparkline
from sparsetrain.store import RunStore, format_runs_table

TRAIN = {"iterations": 60, "val_every": 20, "lr": 0.05}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store holding one finished 90%-sparse mlp-tiny run (shared: tests here only read it)."""
    root = tmp_path_factory.mktemp("trained") / "store"
    config = st.RunConfig(model="mlp-tiny", dataset="synthetic").replace(prune={"sparsity": 0.9}, train=TRAIN)
    outcome = st.run(config, store=root, progress=False, device="cpu")
    return RunStore(root), outcome.key, config


def _cells(table: str, key: str) -> dict[str, str]:
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == key[:10]:
            return dict(zip(header, cells))
    raise AssertionError(f"no row for {key} in\n{table}")


# --- the listing ---------------------------------------------------------------------------------

def test_listing_shows_iterations_lr_and_errors(capsys, trained, tmp_path):
    store, key, _ = trained
    code, out, _ = cli(capsys, "runs", "--store", store.root)
    assert code == 0
    row = _cells(out, key)
    results = store.get(key).results
    assert row["iterations"] == "60/60" and row["lr"] == "0.05"
    assert row["test_error_final"] == f"{100 * results['test_error_final']:.2f}%"
    assert row["test_error_best_val"] == f"{100 * results['test_error_best_val']:.2f}%"
    assert row["model"] == "mlp-tiny" and row["status"] == "finished" and row["sparsity"] == "0.9"


def test_listing_a_run_in_progress_shows_its_last_logged_step(capsys, tmp_path):
    store = RunStore(tmp_path)
    store.begin("aaaa000011112222", {"model": "m", "train": {"iterations": 300, "lr": 0.2}}, seed=0)
    store.log_metrics("aaaa000011112222", 50, {"train_loss": 1.0})
    store.log_metrics("aaaa000011112222", 100, {"train_loss": 0.5})
    store.begin("bbbb000011112222", {"model": "m", "train": {"iterations": 0, "epochs": 2.5}}, seed=0)
    code, out, _ = cli(capsys, "runs", "--store", tmp_path)
    assert code == 0
    assert _cells(out, "aaaa000011112222")["iterations"] == "100/300"
    assert _cells(out, "aaaa000011112222")["lr"] == "0.2"
    assert _cells(out, "bbbb000011112222")["iterations"] == "-/2.5ep"  # nothing logged yet


def test_format_runs_table_new_columns_on_request_only(tmp_path):
    store = RunStore(tmp_path)
    store.begin("cccc000011112222", {"train": {"iterations": 10, "lr": 0.1}}, seed=0)
    store.finish("cccc000011112222", {"steps": 7, "test_error_final": 0.5})
    records = store.list()
    assert "iterations" not in format_runs_table(records).splitlines()[0]  # the default columns are unchanged
    row = _cells(format_runs_table(records, columns=["key", "iterations", "lr"]), "cccc000011112222")
    assert row == {"key": "cccc000011", "iterations": "7/10", "lr": "0.1"}


# --- show ----------------------------------------------------------------------------------------

def test_sparkline_against_hand_computed_blocks():
    # (v - min) / (max - min) * 7, rounded: 0 -> 0, 1 -> 2.33 -> 2, 2 -> 4.67 -> 5, 3 -> 7
    assert sparkline([0, 1, 2, 3]) == BLOCKS[0] + BLOCKS[2] + BLOCKS[5] + BLOCKS[7]
    assert sparkline([5, 5, 5]) == BLOCKS[3] * 3  # flat: the middle block
    assert sparkline([1, math.nan, 0]) == BLOCKS[7] + " " + BLOCKS[0]
    assert sparkline([math.inf]) == " "
    # 8 values averaged down to 4 characters: pairs (0, 2) (4, 6) (8, 10) (12, 14) -> 1, 5, 9, 13
    assert sparkline([0, 2, 4, 6, 8, 10, 12, 14], width=4) == BLOCKS[0] + BLOCKS[2] + BLOCKS[5] + BLOCKS[7]


def test_flatten_keeps_empty_tables():
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}


def test_show_prints_config_layers_results_curves_and_writes_a_png(capsys, trained):
    store, key, config = trained
    record = store.get(key)
    code, out, err = cli(capsys, "runs", "show", key[:6], "--store", store.root)
    assert code == 0, err
    assert out.startswith(f"run {key}  finished")
    assert re.search(r"^  train\.lr\s+0\.05$", out, re.M) and re.search(r"^  prune\.sparsity\s+0\.9$", out, re.M)
    assert "iterations 60 of 60" in out
    for name, row in record.layer_sparsity.items():  # each layer's kept and total as recorded
        assert re.search(rf"^  {re.escape(name)}\s+\S+\s+{row['kept']}\s+{row['total']}\s", out, re.M), name
    assert re.search(rf"test_error_final\s+{100 * record.results['test_error_final']:.2f}%", out)
    for name, points in store.metrics(key).items():
        values = [v for _, v in points]
        line = next(x for x in out.splitlines() if x.startswith(f"  {name} "))
        assert f"min {min(values):.4g}  max {max(values):.4g}  last {values[-1]:.4g}" in line
        assert f"(it {points[-1][0]}, {len(points)} points)" in line
    png = store.root / "runs" / key / "curves.png"
    assert f"curves written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_plot_elsewhere_or_not_at_all(capsys, trained, tmp_path):
    store, key, _ = trained
    code, out, _ = cli(capsys, "runs", "--store", store.root, "show", key, "--plot", tmp_path / "c.png")
    assert code == 0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = cli(capsys, "runs", "show", key, "--store", store.root, "--no-plot")
    assert code == 0 and "curves written" not in out
    code, _, err = cli(capsys, "runs", "show", key, "--store", store.root, "--plot", tmp_path / "c.jpg")
    assert code == 2 and "PNG" in err


def test_show_on_a_full_disk(capsys, trained, tmp_path):
    store, key, _ = trained
    target = tmp_path / "c.png"
    target.write_bytes(b"old")
    with fsio.simulate_full_disk("export"):
        code, _, err = cli(capsys, "runs", "show", key, "--store", store.root, "--plot", target)
        assert code == 2 and "cannot write the export" in err and "no space left" in err
        assert target.read_bytes() == b"old"  # the previous file is intact
        # the default place: the record was shown; the missing PNG is only a warning
        code, out, err = cli(capsys, "runs", "show", key, "--store", store.root)
        assert code == 0 and out.startswith(f"run {key}") and "warning: the curves were not drawn" in err


def test_show_json(capsys, trained):
    import json

    store, key, _ = trained
    code, out, _ = cli(capsys, "runs", "show", key, "--json", "--store", store.root)
    data = json.loads(out)
    assert code == 0 and data["key"] == key
    assert {n: [tuple(p) for p in pts] for n, pts in data["metrics"].items()} == store.metrics(key)


def test_a_key_prefix_must_be_unique_and_known(capsys, tmp_path):
    store = RunStore(tmp_path)
    for key in ("abc1000000000000", "abc2000000000000"):
        store.begin(key, {"model": "m"}, seed=0)
    assert find_run(store, "abc1").key == "abc1000000000000"
    code, _, err = cli(capsys, "runs", "show", "abc", "--store", tmp_path, "--no-plot")
    assert code == 2 and "'abc' is the start of 2 run keys" in err and "abc1000000000000" in err
    code, _, err = cli(capsys, "runs", "show", "zzz", "--store", tmp_path)
    assert code == 2 and "no run in the run store" in err and "starting with 'zzz'" in err
    code, _, err = cli(capsys, "runs", "show", "../x", "--store", tmp_path)  # not a key: no match, no escape
    assert code == 2 and "no run in the run store" in err


def test_show_a_run_without_results_or_metrics(capsys, tmp_path):
    store = RunStore(tmp_path)
    store.begin("dddd000011112222", {"model": "m"}, seed=0)
    code, out, _ = cli(capsys, "runs", "show", "dddd", "--store", tmp_path)
    assert code == 0
    assert "none yet" in out and "curves: no metrics recorded" in out and "curves written" not in out


# --- export --------------------------------------------------------------------------------------

def test_export_csv_holds_every_metric_point_and_one_row_per_run(capsys, trained, tmp_path):
    store, key, _ = trained
    out_dir = tmp_path / "export"
    code, out, err = cli(capsys, "runs", "export", "--out", out_dir, "--store", store.root)
    assert code == 0, err
    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    exported: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        assert row["key"] == key
        exported.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    assert exported == store.metrics(key)  # every point, values exact (repr round-trips)
    with open(out_dir / "runs.csv", newline="") as f:
        (run_row,) = list(csv.DictReader(f))
    record = store.get(key)
    assert run_row["key"] == key and run_row["status"] == "finished"
    assert float(run_row["config.train.lr"]) == record.config["train"]["lr"]
    assert run_row["config.model"] == "mlp-tiny"
    assert float(run_row["results.test_error_final"]) == record.results["test_error_final"]
    assert run_row["config.prune.options"] == "{}"


def test_export_filters_and_bad_output(capsys, trained, tmp_path):
    store, _, _ = trained
    code, _, err = cli(capsys, "runs", "export", "--status", "failed", "--out", tmp_path / "e", "--store", store.root)
    assert code == 2 and "no runs" in err and not (tmp_path / "e").exists()
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, "runs", "export", "--out", tmp_path / "file", "--store", store.root)
    assert code == 2 and "is a file" in err


def test_export_on_a_full_disk_keeps_the_previous_export(capsys, trained, tmp_path):
    store, _, _ = trained
    out_dir = tmp_path / "export"
    assert cli(capsys, "runs", "export", "--out", out_dir, "--store", store.root)[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    with fsio.simulate_full_disk("export", after=1):  # metrics.csv written, runs.csv fails
        code, _, err = cli(capsys, "runs", "export", "--out", out_dir, "--store", store.root)
    assert code == 2 and "cannot write the export" in err and "runs.csv" in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # no temporary files left


def test_export_tensorboard_without_tensorboard_says_how_to_install(capsys, trained, tmp_path, monkeypatch):
    store, _, _ = trained
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    code, _, err = cli(capsys, "runs", "export", "--format", "tensorboard", "--out", tmp_path / "tb",
                       "--store", store.root)
    assert code == 2 and "pip install tensorboard" in err
    assert not (tmp_path / "tb").exists()


def test_export_tensorboard_puts_every_point_in_each_runs_folder(capsys, trained, tmp_path, monkeypatch):
    """The plumbing, with a stand-in SummaryWriter (tensorboard itself is not a dependency)."""
    import types

    calls: dict[str, list[tuple[str, float, int]]] = {}

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir
            calls[log_dir] = []

        def add_scalar(self, name, value, step):
            calls[self.log_dir].append((name, value, step))

        def add_text(self, name, text):
            pass

        def close(self):
            from pathlib import Path

            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.log_dir) / "events.out.tfevents.1").write_bytes(b"events")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    store, key, _ = trained
    code, out, err = cli(capsys, "runs", "export", "--format", "tensorboard", "--out", tmp_path / "tb",
                         "--store", store.root)
    assert code == 0, err
    (points,) = calls.values()
    assert sorted(points) == sorted((n, v, s) for n, pts in store.metrics(key).items() for s, v in pts)
    assert (tmp_path / "tb" / key / "events.out.tfevents.1").read_bytes() == b"events"
    assert [p.name for p in (tmp_path / "tb").iterdir()] == [key]  # no temporary files left


def test_export_tensorboard_on_a_full_disk_writes_nothing(capsys, trained, tmp_path, monkeypatch):
    import errno
    import types

    class Writer:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    store, _, _ = trained
    code, _, err = cli(capsys, "runs", "export", "--format", "tensorboard", "--out", tmp_path / "tb",
                       "--store", store.root)
    assert code == 2 and "cannot write the export" in err and "no space left on device" in err
    assert not (tmp_path / "tb").exists()


def test_export_tensorboard_writes_event_files(capsys, trained, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store, key, _ = trained
    code, _, err = cli(capsys, "runs", "export", "--format", "tensorboard", "--out", tmp_path / "tb",
                       "--store", store.root)
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "tb" / key))
    events.Reload()
    for name, points in store.metrics(key).items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in points]


# --- delete --------------------------------------------------------------------------------------

def _two_runs(root):
    store = RunStore(root)
    for key in ("eeee000011112222", "ffff000011112222"):
        store.begin(key, {"model": "m"}, seed=0)
        store.finish(key, {"steps": 1})
        store.log_metrics(key, 1, {"train_loss": 1.0})
        (store.artifact_dir(key) / "checkpoint.safetensors").write_bytes(b"x")
    return store


def test_delete_with_yes_removes_records_metrics_and_artifacts(capsys, tmp_path):
    store = _two_runs(tmp_path)
    code, out, _ = cli(capsys, "runs", "delete", "eeee", "--yes", "--store", tmp_path)
    assert code == 0 and "deleted run eeee000011112222" in out
    assert store.get("eeee000011112222") is None and store.metrics("eeee000011112222") == {}
    assert not (tmp_path / "runs" / "eeee000011112222").exists()
    assert store.get("ffff000011112222") is not None and (tmp_path / "runs" / "ffff000011112222").is_dir()


def test_delete_asks_on_a_terminal_and_refuses_without_one(capsys, tmp_path, monkeypatch):
    store = _two_runs(tmp_path)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    code, _, err = cli(capsys, "runs", "delete", "eeee", "ffff", "--store", tmp_path)
    assert code == 2 and "pass --yes" in err
    assert len(store.list()) == 2
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    code, out, _ = cli(capsys, "runs", "delete", "eeee", "--store", tmp_path)
    assert code == 1 and "nothing deleted" in out and len(store.list()) == 2
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    code, out, _ = cli(capsys, "runs", "delete", "eeee", "ffff", "--store", tmp_path)
    assert code == 0 and "eeee000011112222" in out and store.list() == []


def test_delete_refuses_a_run_being_trained(capsys, tmp_path):
    store = _two_runs(tmp_path)
    store.begin("1111000011112222", {"model": "m"}, seed=0)
    lease = store.take_lease("1111000011112222")
    try:
        code, out, _ = cli(capsys, "runs", "show", "1111", "--store", tmp_path)
        assert code == 0 and f"being trained now: its lease is held by pid {os.getpid()}" in out
        code, _, err = cli(capsys, "runs", "delete", "1111", "eeee", "--yes", "--store", tmp_path)
        assert code == 2 and "run 1111000011112222 is being trained" in err and "pid" in err
        assert len(store.list()) == 3  # nothing deleted, not even the other run
    finally:
        lease.release()
    code, _, _ = cli(capsys, "runs", "delete", "1111", "--yes", "--store", tmp_path)
    assert code == 0 and store.get("1111000011112222") is None


def test_delete_when_the_artifact_folder_cannot_be_removed(capsys, tmp_path, monkeypatch):
    store = _two_runs(tmp_path)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("sparsetrain.store.shutil.rmtree", refuse)
    code, _, err = cli(capsys, "runs", "delete", "eeee", "--yes", "--store", tmp_path)
    assert code == 2 and "its artifact folder could not be removed" in err and "by hand" in err
    assert store.get("eeee000011112222") is None and store.get("ffff000011112222") is not None


def test_delete_on_a_full_disk_deletes_nothing(capsys, tmp_path):
    store = _two_runs(tmp_path)
    with fsio.simulate_full_disk("store"):
        code, _, err = cli(capsys, "runs", "delete", "eeee", "--yes", "--store", tmp_path)
    assert code == 2 and "no space left" in err
    assert store.get("eeee000011112222") is not None and (tmp_path / "runs" / "eeee000011112222").is_dir()


def test_delete_unknown_key(capsys, tmp_path):
    _two_runs(tmp_path)
    code, _, err = cli(capsys, "runs", "delete", "eeee", "9999", "--yes", "--store", tmp_path)
    assert code == 2 and "'9999'" in err
    assert len(RunStore(tmp_path).list()) == 2  # all keys are resolved before anything is deleted


# --- check ---------------------------------------------------------------------------------------

def test_check_a_sound_store(capsys, tmp_path):
    _two_runs(tmp_path)
    code, out, _ = cli(capsys, "runs", "check", "--store", tmp_path)
    assert code == 0 and out.strip()


def test_check_finds_damage_and_repair_keeps_the_readable_runs(capsys, tmp_path):
    store = RunStore(tmp_path)
    for i in range(60):  # enough rows for several pages of the runs table
        store.begin(f"{i:04d}{'a' * 12}", {"model": "m", "pad": "x" * 400}, seed=i)
    db = tmp_path / "runs.sqlite"
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    # the runs-table page holding run 30's row (its key followed by its config; the key index has it alone)
    page = next(m.start() // page_size for m in re.finditer(b"0030aaaaaaaaaaaa", data)
                if b"x" * 100 in data[m.start(): m.start() + 1000])
    data[page * page_size: (page + 1) * page_size] = b"\xa5" * page_size  # not a b-tree page any more
    db.write_bytes(bytes(data))
    code, out, _ = cli(capsys, "runs", "check", "--store", tmp_path)
    assert code == 1 and out.strip()
    code, out, err = cli(capsys, "runs", "--store", tmp_path)  # the listing still shows what it can read
    assert code == 0 and "0000aaaaaa" in out and "0059aaaaaa" in out
    assert "could not be read" in err and "0030aaaaaaaaaaaa" in err and "runs check --repair" in err
    assert "0030aaaaaa" not in out
    code, out, _ = cli(capsys, "runs", "check", "--repair", "--store", tmp_path)
    assert out.strip()
    kept = {r.key for r in RunStore(tmp_path).list()}
    assert "0000aaaaaaaaaaaa" in kept and "0059aaaaaaaaaaaa" in kept
    code, _, _ = cli(capsys, "runs", "check", "--store", tmp_path)
    assert code == 0


# --- load_run ------------------------------------------------------------------------------------

def _test_error(model, config) -> float:
    """Counted here: argmax over the test split, built from the recorded config's data settings."""
    t = config.train
    loaders = create_loaders(config.dataset, batch_size=t.batch_size, val_fraction=t.val_fraction,
                             split_seed=t.split_seed, shuffle_seed=config.seed, device="cpu")
    wrong = total = 0
    with torch.no_grad():
        for x, y in loaders.test:
            wrong += int((model(x).argmax(dim=1) != y).sum())
            total += len(y)
    return wrong / total


def test_load_run_gives_the_trained_model(trained):
    store, key, config = trained
    loaded = st.load_run(key[:8], store=store.root)
    record = store.get(key)
    assert loaded.record.key == key and loaded.step == 60 and not loaded.model.training
    assert _test_error(loaded.model, config) == record.results["test_error_final"]
    params = dict(loaded.model.named_parameters())
    for name, keep in loaded.mask.items():
        assert bool((params[name][~keep] == 0).all()), name  # pruned weights are zero
        assert int(keep.sum()) == record.layer_sparsity[name]["kept"]
    best = st.load_run(key, store=store.root, weights="best_val")
    assert best.step == record.results["best_val_step"]
    assert _test_error(best.model, config) == record.results["test_error_best_val"]


def test_load_run_of_a_sparse_execution_run_is_dense_with_zeros(tmp_path):
    config = st.RunConfig(model="mlp-tiny", dataset="synthetic").replace(
        prune={"sparsity": 0.9}, train={**TRAIN, "execution": "sparse"})
    outcome = st.run(config, store=tmp_path, progress=False, device="cpu")
    loaded = st.load_run(outcome.key, store=tmp_path)
    assert isinstance(loaded.model[1], torch.nn.Linear)
    assert _test_error(loaded.model, config) == outcome.results["test_error_final"]


def test_load_run_of_an_isometry_run_does_not_redo_the_isometry(tmp_path, monkeypatch):
    """The weights come from the checkpoint: the isometry step is not run again to load them."""
    import sparsetrain.pipeline as pipeline

    config = st.RunConfig(model="mlp-tiny", dataset="synthetic").replace(
        prune={"sparsity": 0.5, "isometry": True}, train=TRAIN)
    outcome = st.run(config, store=tmp_path, progress=False, device="cpu")
    assert outcome.results["isometry"]["penalty_after"] < outcome.results["isometry"]["penalty_before"]

    def refuse(*args, **kwargs):
        raise AssertionError("approximate isometry ran while loading a recorded run")

    monkeypatch.setattr(pipeline, "approximate_isometry_", refuse)
    loaded = st.load_run(outcome.key, store=tmp_path)
    assert _test_error(loaded.model, config) == outcome.results["test_error_final"]


def test_load_run_refuses_what_has_no_final_weights(tmp_path):
    store = RunStore(tmp_path)
    store.begin("2222000011112222", st.RunConfig(model="mlp-tiny", dataset="synthetic").to_dict(), seed=0)
    with pytest.raises(st.SparsetrainError, match="has no final weights: it has not ended.*partial=True"):
        st.load_run("2222", store=tmp_path)
    with pytest.raises(st.SparsetrainError, match="kept no checkpoint"):
        st.load_run("2222", store=tmp_path, partial=True)
    with pytest.raises(st.SparsetrainError, match="no run in the run store"):
        st.load_run("3333", store=tmp_path)
    with pytest.raises(st.SparsetrainError, match="weights must be"):
        st.load_run("2222", store=tmp_path, weights="best")


def test_load_run_with_damaged_artifacts(tmp_path):
    config = st.RunConfig(model="mlp-tiny", dataset="synthetic").replace(train={"iterations": 20})
    outcome = st.run(config, store=tmp_path, progress=False, device="cpu")
    folder = tmp_path / "runs" / outcome.key
    checkpoint = folder / "checkpoint.safetensors"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(st.SparsetrainError, match="not a readable safetensors file"):
        st.load_run(outcome.key, store=tmp_path)
    checkpoint.write_bytes(good)
    (folder / "mask.safetensors").unlink()
    with pytest.raises(st.SparsetrainError, match="mask file .* is missing"):
        st.load_run(outcome.key, store=tmp_path)


# --- the parser ----------------------------------------------------------------------------------

def _parsers(parser: argparse.ArgumentParser, path: str = "sparsetrain"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_flag_of_every_command_has_help():
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}"
               for path, parser in _parsers(build_parser())
               for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not (a.help or "").strip()]
    assert missing == []
    assert len(list(_parsers(build_parser()))) >= 12  # the walk reached the nested runs actions
