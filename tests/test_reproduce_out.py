"""Reproductions write where they are told, a quick look never replaces a full table, and long
reproductions say how far they are."""

from __future__ import annotations

import json
import re

import pytest

from sparsetrain import RunConfig
from sparsetrain.cli.main import main
from sparsetrain.experiments import ReproduceOptions
from sparsetrain.experiments import common
from sparsetrain.experiments import snip_table1 as t1

FULL_TABLE = "# SNIP paper, Table 1 (MNIST): reproduced\n\n| a full table |\n"


def reproduce(capsys, *argv) -> tuple[int, str, str]:
    code = main(["reproduce", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_default_table_goes_under_the_store_not_into_the_repository(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (the old default, docs/results/, relative to here)
    store = tmp_path / "store"
    code, _, err = reproduce(capsys, "snip-table1", "--report-only", "--store", store)
    assert code == 0, err
    table = store / "results" / "snip_table1.md"
    assert table.is_file() and table.with_suffix(".json").is_file()
    assert f"table written to {table}" in err
    assert not (tmp_path / "docs").exists()
    assert table.read_text().splitlines()[0] == "# SNIP paper, Table 1 (MNIST): reproduced"  # full: no mark


@pytest.mark.parametrize("shortening, reason", [
    (["--iterations", "300"], "--iterations 300 (the recipes: 30,000, 60,000; schedules compressed to match)"),
    (["--seeds", "0"], "seeds 0 (full: 0 1 2)"),
    (["--rows", "snip-table1-lenet300-95"], "rows snip-table1-lenet300-95 (full: 6 rows)"),
])
def test_a_shortened_table_is_refused_over_a_full_one_before_training(capsys, tmp_path, shortening, reason):
    out = tmp_path / "snip_table1.md"
    out.write_text(FULL_TABLE)
    code, _, err = reproduce(capsys, "snip-table1", *shortening, "--store", tmp_path / "store", "--out", out)
    assert code == 2
    assert f"{out} holds a full reproduction, and this one is shortened ({reason})" in err and "--force" in err
    assert out.read_text() == FULL_TABLE
    assert "run(s) to go through" not in err and "[1/" not in err  # refused before anything trained


def test_force_writes_a_shortened_table_titled_so(capsys, tmp_path):
    out = tmp_path / "snip_table1.md"
    out.write_text(FULL_TABLE)
    code, _, err = reproduce(capsys, "snip-table1", "--seeds", "0", "--report-only", "--store", tmp_path / "store",
                             "--out", out, "--force")
    assert code == 0, err
    title = out.read_text().splitlines()[0]
    assert title == "# SNIP paper, Table 1 (MNIST): reproduced (shortened: seeds 0 (full: 0 1 2))"
    assert json.loads(out.with_suffix(".json").read_text())["shortened"] == ["seeds 0 (full: 0 1 2)"]
    # a shortened table may replace a shortened one without --force, and a full one replaces either
    code, _, err = reproduce(capsys, "snip-table1", "--seeds", "0", "--iterations", "5", "--report-only",
                             "--store", tmp_path / "store", "--out", out)
    assert code == 0, err
    code, _, err = reproduce(capsys, "snip-table1", "--report-only", "--store", tmp_path / "store", "--out", out)
    assert code == 0, err
    assert out.read_text().splitlines()[0] == "# SNIP paper, Table 1 (MNIST): reproduced"


def test_structured_cost_marks_a_shortened_table_too(capsys, tmp_path):
    out = tmp_path / "sc.md"
    code, _, err = reproduce(capsys, "structured-cost", "--rows", "vgg-snip90", "--seeds", "0", "--iterations", "2",
                             "--report-only", "--store", tmp_path / "store", "--out", out)
    assert code == 0, err
    assert out.read_text().startswith("# The error cost of hardware-friendly SNIP masks (shortened: --iterations 2")
    assert json.loads(out.with_suffix(".json").read_text())["meta"]["shortened"][0].startswith("--iterations 2")


@pytest.mark.parametrize("argv, needle", [
    (["--out", "table.json"], "name the Markdown file to write"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--iterations", "0"], "--iterations must be at least 1"),
])
def test_bad_reproduce_options(capsys, tmp_path, argv, needle):
    code, _, err = reproduce(capsys, "snip-table1", "--store", tmp_path / "store", "--report-only", *argv)
    assert code == 2 and needle in err


def test_shortened_reasons_by_hand():
    assert common.shortened_reasons(seeds=(2, 1, 0), rows=["b", "a"], default_rows=["a", "b"], iterations=None,
                                    recipe_iterations=[100]) == []
    assert common.shortened_reasons(seeds=(0, 1, 2, 3), rows=["a", "b", "c"], default_rows=["a", "b"],
                                    iterations=200, recipe_iterations=[100, 200]) == []  # longer is not shorter
    assert common.shortened_reasons(seeds=(0, 1, 2), rows=["a"], default_rows=["a"], iterations=150,
                                    recipe_iterations=[100, 200]) == [
        "--iterations 150 (the recipes: 100, 200; schedules compressed to match)"]


def test_shorten_compresses_a_step_schedule():
    """A shortened run decays at the same fractions of its length: the Table 1 MNIST recipe
    (60,000 iterations, x0.1 every 25,000) at 3,000 iterations decays every 1,250, so its
    learning rate is 0.1, 0.01 and 0.001 over the same thirds-and-a-bit as the full run's."""
    from sparsetrain.config import RunConfig
    from sparsetrain.errors import SparsetrainError
    from sparsetrain.recipes import recipe_path

    full = RunConfig.from_toml(recipe_path("snip-table2-gru-s-dense"))
    assert (full.train.iterations, full.train.decay_every) == (60_000, 25_000)
    short = common.shorten(full, 3000)
    assert (short.train.iterations, short.train.decay_every) == (3000, 1250)
    assert short.train.checkpoint_every == 3000  # the recipe's 5,000 is longer than the run
    assert short.train.val_every == 1000 and short.train.lr == full.train.lr
    tiny = common.shorten(full, 7)
    assert (tiny.train.decay_every, tiny.train.val_every, tiny.train.test_every) == (3, 7, 7)
    assert common.shorten(full, None) is full
    cosine = full.replace(train={"schedule": "cosine"})
    assert common.shorten(cosine, 3000).train.decay_every == cosine.train.decay_every  # relative already
    with pytest.raises(SparsetrainError, match="at least 1"):
        common.shorten(full, 0)


def test_holds_full_table(tmp_path):
    f = tmp_path / "t.md"
    assert not common.holds_full_table(f)
    f.write_text("# Title (shortened: seeds 0)\n")
    assert not common.holds_full_table(f)
    f.write_text(FULL_TABLE)
    assert common.holds_full_table(f)


def tiny_configs(n: int) -> list[RunConfig]:
    base = RunConfig(model="mlp-tiny", dataset="synthetic", name="tiny").replace(
        train={"iterations": 20, "val_every": 10, "checkpoint_every": 0})
    return [base.replace(seed=s) for s in range(n)]


def test_progress_lines_say_runs_done_the_current_iteration_and_the_time_left(capsys, tmp_path):
    configs = tiny_configs(2)
    options = ReproduceOptions(out=tmp_path / "t.md", store=tmp_path / "store", seeds=(0, 1))
    records, failures = common.run_rows(configs, options, ("experiment", "tiny"))
    assert failures == [] and len(records) == 2
    err = capsys.readouterr().err
    assert "2 run(s) to go through" in err
    # each run's validation checks (no TTY: lines, not a bar), then one line per finished run
    assert err.count("step 10/20  val error") == 2 and err.count("step 20/20  loss") == 2
    first = re.search(r"\[1/2\] tiny \(seed 0\): test error [\d.]+% \(best-val [\d.]+%\), sparsity 95.00% in \d+ s; "
                      r"1 to go, about \d+ s left", err)
    assert first, err
    assert re.search(r"\[2/2\] tiny \(seed 1\): .* all done in \d+ s", err)
    # again: both recorded, reused, nothing trains
    common.run_rows(configs, options, ("experiment", "tiny"))
    err = capsys.readouterr().err
    assert "step 10/20" not in err and err.count("(already recorded)") == 2


def test_without_progress_only_the_finished_run_lines(capsys, tmp_path):
    options = ReproduceOptions(out=tmp_path / "t.md", store=tmp_path / "store", seeds=(0,), progress=False)
    common.run_rows(tiny_configs(1), options, ("experiment", "tiny"))
    err = capsys.readouterr().err
    assert "step 10/20" not in err and "[1/1] tiny (seed 0)" in err


def test_time_left_by_hand():
    left = common._TimeLeft(total=5, workers=2)
    left.add(common.Finished("a", {}, None, reused=True, seconds=0.0))
    assert left.text() == "4 to go"
    left.add(common.Finished("b", {}, None, reused=False, seconds=60.0))
    left.add(common.Finished("c", {}, None, reused=False, seconds=120.0))
    assert left.text() == "2 to go, about 1.5 min left"  # 2 runs x 90 s mean / 2 workers


def test_a_full_disk_while_writing_the_table_keeps_the_previous_one(capsys, tmp_path):
    from sparsetrain.fsio import simulate_full_disk

    out = tmp_path / "snip_table1.md"
    out.write_text(FULL_TABLE)
    with simulate_full_disk("report"):
        code, _, err = reproduce(capsys, "snip-table1", "--report-only", "--store", tmp_path / "store", "--out", out)
    assert code == 2 and "cannot write the report" in err and "no space left on device" in err
    assert out.read_text() == FULL_TABLE and not out.with_suffix(".json").exists()


class _InProcessPool:
    """multiprocessing's Pool, run in this process (the worker processes' silence is what is tested)."""

    def __init__(self, workers):
        self.workers = workers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)


def test_with_workers_progress_comes_from_finished_runs_only(capsys, tmp_path, monkeypatch):
    class Context:
        Pool = _InProcessPool

    monkeypatch.setattr(common.mp, "get_context", lambda method: Context)
    options = ReproduceOptions(out=tmp_path / "t.md", store=tmp_path / "store", seeds=(0, 1), workers=2, threads=1)
    records, failures = common.run_rows(tiny_configs(2), options, ("experiment", "tiny"))
    assert failures == [] and len(records) == 2
    err = capsys.readouterr().err
    assert "(2 at a time)" in err and "step 10/20" not in err  # the workers print nothing of their own
    assert "[1/2] tiny" in err and "[2/2] tiny" in err and "all done in" in err
