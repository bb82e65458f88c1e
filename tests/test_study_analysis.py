"""The study analysis (K* per point, the fit K* = c1/B + c2, regimes, the report) and Shallue et
al.'s published layout, checked against values computed here by hand, never the code's own output."""

from __future__ import annotations

import csv
import json
import math
import random
import re

import numpy as np
import pytest

from sparsetrain.errors import SparsetrainError
from sparsetrain.fsio import simulate_full_disk
from sparsetrain.study.analysis import REGIMES, Fit, fit_k_star, fits, points, report
from sparsetrain.study.lipschitz import LipschitzCurve
from sparsetrain.study.outcome import TrialOutcome
from sparsetrain.study.shallue import read_layout, write_layout

GOAL = 0.02


def _curve(k: int | None, end: int, interval: int = 100) -> list[tuple[int, float]]:
    """A validation curve checked every ``interval`` steps that first reaches GOAL at ``k`` (None:
    never, up to ``end``)."""
    last = k if k is not None else end
    return [(s, GOAL if s == k else GOAL + 0.5 * (1 - s / (last + interval))) for s in range(interval, last + 1, interval)]


def _trial(b, sparsity, index, status, k=None, workload="mnist/simple_cnn/sgd", end=1000, params=None):
    curve = _curve(k, end) if status == "complete" else _curve(None, end)
    if status == "infeasible":
        curve = curve[:2] + [(300, math.nan)]
    return TrialOutcome(workload, b, sparsity, index, params if params is not None else {"learning_rate": 0.01 * (index + 1)},
                        status, k, curve)


# --- K* ---------------------------------------------------------------------------------------------


def test_k_star_is_the_fewest_steps_over_complete_trials_whatever_the_order():
    trials = [
        _trial(8, 0.0, 0, "complete", 700), _trial(8, 0.0, 1, "incomplete"), _trial(8, 0.0, 2, "complete", 400),
        _trial(8, 0.0, 3, "stopped"), _trial(8, 0.0, 4, "infeasible"), _trial(8, 0.0, 5, "complete", 400),
        _trial(16, 0.0, 0, "incomplete"), _trial(16, 0.0, 1, "infeasible"),
        _trial(8, 0.9, 0, "complete", 900), _trial(8, 0.9, 7, "complete", 500),
    ]
    # By hand: (8, 0.0): complete steps 700, 400, 400 -> 400, first in plan order is trial 2.
    expected = {(0.0, 8): (400, 2, 6, 3), (0.0, 16): (None, None, 2, 0), (0.9, 8): (500, 7, 2, 2)}
    rng = random.Random(0)
    for _ in range(20):
        shuffled = trials[:]
        rng.shuffle(shuffled)
        got = {(p.sparsity, p.batch_size): (p.k_star, p.best.plan_index if p.best else None, p.trials,
                                            p.counts["complete"]) for p in points(shuffled)}
        assert got == expected
    best = next(p for p in points(trials) if (p.sparsity, p.batch_size) == (0.0, 8)).best
    assert best.params == {"learning_rate": 0.03}


# --- the fit ----------------------------------------------------------------------------------------


BATCHES = [2 ** i for i in range(1, 11)]  # 2 .. 1024


def test_the_fit_recovers_c1_and_c2_from_an_exact_curve():
    c1, c2 = 2.0e5, 400.0
    fit = fit_k_star(BATCHES, [c1 / b + c2 for b in BATCHES])
    assert fit.c1 == pytest.approx(c1, rel=1e-6)
    assert fit.c2 == pytest.approx(c2, rel=1e-6)
    assert fit.critical_batch_size == pytest.approx(500.0, rel=1e-6)
    assert fit.r2_log == pytest.approx(1.0, abs=1e-9)
    assert fit.rms_relative_error < 1e-6
    # A pure 1/B law: c2 at its bound 0, the critical batch size infinite, every B linear scaling.
    pure = fit_k_star([4, 8, 16, 32], [1000, 500, 250, 125])
    assert pure.c1 == pytest.approx(4000, rel=1e-6) and pure.c2 == 0.0
    assert pure.critical_batch_size == math.inf and pure.regime(1024) == "linear scaling"


def test_the_fit_recovers_c1_and_c2_from_noisy_trials_with_incomplete_points():
    """A simulated study: each trial needs (c1/B + c2) * (1 + |noise|) steps, rounded up to the next
    check; trials over the 40k budget are incomplete, some diverge, and B=2 never completes."""
    c1, c2, budget = 2.0e5, 400.0, 40_000
    rng = np.random.default_rng(1)
    outcomes = []
    for b in BATCHES:
        for index in range(16):
            status_roll = rng.random()
            needed = (c1 / b + c2) * (1 + abs(rng.normal(0, 0.5))) * math.exp(rng.normal(0, 0.05))
            k = int(math.ceil(needed / 100) * 100)
            if status_roll < 0.2:
                outcomes.append(TrialOutcome("w", b, 0.5, index, {}, "infeasible", None, []))
            elif k > budget:
                outcomes.append(TrialOutcome("w", b, 0.5, index, {}, "incomplete", None, []))
            else:
                outcomes.append(TrialOutcome("w", b, 0.5, index, {}, "complete", k, []))
    rng.shuffle(outcomes)
    ps = points(outcomes)
    assert next(p for p in ps if p.batch_size == 2).k_star is None  # c1/2 = 100k steps > budget
    assert all(p.k_star is not None for p in ps if p.batch_size > 8)
    fit = fits(ps)[("w", 0.5)]
    assert fit.n == sum(p.k_star is not None for p in ps) < len(BATCHES)
    assert fit.c1 == pytest.approx(c1, rel=0.15)
    assert fit.c2 == pytest.approx(c2, rel=0.15)
    assert fit.r2_log > 0.99


def test_the_fit_is_in_log_space_so_large_batch_sizes_count():
    """One outlier at the smallest B: a fit in log space keeps c2 (set by the large B) where an
    unweighted fit on K* would give it up to match the big value."""
    k = [1e5 / b + 100 for b in BATCHES]
    k[0] *= 1.3
    fit = fit_k_star(BATCHES, k)
    assert fit.c2 == pytest.approx(100, rel=0.1)


@pytest.mark.parametrize("bs, ks, words", [
    ([8], [100], "two or more batch sizes"),
    ([8, 8], [100, 90], "two or more batch sizes"),
    ([8, 16], [100, 0], "finite positive"),
    ([8, 16], [100], "one K* per batch size"),
])
def test_the_fit_refuses_too_few_or_bad_points(bs, ks, words):
    with pytest.raises(SparsetrainError, match=re.escape(words)):
        fit_k_star(bs, ks)


def test_regimes_follow_the_documented_rule():
    fit = Fit(c1=1e5, c2=100.0, r2_log=1.0, rms_relative_error=0.0, n=5)  # critical B = 1000
    assert fit.critical_batch_size == 1000
    # Linear scaling up to 250: there K* is at most 1.25x the perfect-scaling c1/B.
    assert fit.predict(250) / (1e5 / 250) == pytest.approx(1.25)
    assert [fit.regime(b) for b in (2, 250, 251, 1000, 3999, 4000, 10 ** 6)] == [
        REGIMES[0], REGIMES[0], REGIMES[1], REGIMES[1], REGIMES[1], REGIMES[2], REGIMES[2]]
    # From 4000 K* is within 1.25x of its floor c2.
    assert fit.predict(4000) / 100 == pytest.approx(1.25)


# --- the report --------------------------------------------------------------------------------------


def _study():
    outcomes = []
    for sparsity, (c1, c2) in ((0.0, (1e5, 200.0)), (0.9, (2e5, 300.0))):
        for b in (8, 32, 128, 512):
            k = int(math.ceil((c1 / b + c2) / 100) * 100)
            outcomes += [_trial(b, sparsity, 0, "incomplete", end=k + 500),
                         _trial(b, sparsity, 1, "complete", k + 200), _trial(b, sparsity, 2, "complete", k)]
    return outcomes


def test_report_writes_the_tables_the_figures_and_the_json(tmp_path):
    outcomes = _study()
    lipschitz = [LipschitzCurve("mnist/simple_cnn/sgd", s, 128, 2, {"learning_rate": 0.03}, 900, 900, 300, 1000,
                                10_000, values, 900) for s, values in ((0.0, ((300, 3.0), (600, 2.5))),
                                                                        (0.9, ((300, 6.0), (600, 5.0))))]
    text = report(outcomes, tmp_path, lipschitz=lipschitz)
    for name in ("report.md", "report.json", "k_star-mnist-simple_cnn-sgd.png", "lipschitz-mnist-simple_cnn-sgd.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "k_star-mnist-simple_cnn-sgd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "report.json").read_text())
    got = {(p["sparsity"], p["batch_size"]): (p["k_star"], p["best_plan_index"], p["best_params"])
           for p in data["workloads"]["mnist/simple_cnn/sgd"]["points"]}
    # K* by hand: ceil((c1/B + c2) / 100) * 100, reached by trial 2 (learning rate 0.03).
    assert got[(0.0, 8)] == (12700, 2, {"learning_rate": 0.03})
    assert got[(0.9, 512)] == (700, 2, {"learning_rate": 0.03})
    assert data["workloads"]["mnist/simple_cnn/sgd"]["fits"]["0.9"]["c1"] == pytest.approx(2e5, rel=0.1)
    assert "| 0.9 | 512 | 700 | 2 / 3 | 0 |" in text and "learning_rate=0.03" in text
    curves = data["workloads"]["mnist/simple_cnn/sgd"]["lipschitz"]
    assert [c["sparsity"] for c in curves] == [0.0, 0.9] and curves[1]["values"] == [[300, 6.0], [600, 5.0]]
    assert "| 0.9 | 128 | 2 | learning_rate=0.03 | 900 | 900 | 900 | 300 | 10000 | 6 .. 5 | 6 |" in text


def test_report_on_a_study_where_nothing_reached_the_goal(tmp_path):
    outcomes = [_trial(b, 0.0, i, status) for b in (8, 64) for i, status in enumerate(("incomplete", "infeasible"))]
    text = report(outcomes, tmp_path)
    assert "| 0 | 8 | - | 0 / 2 | 1 | - | - | - |" in text and "fewer than 2 with a K*" in text
    assert json.loads((tmp_path / "report.json").read_text())["workloads"]["mnist/simple_cnn/sgd"]["fits"] == {"0": None}


def test_report_refuses_no_outcomes_and_keeps_old_files_on_a_full_disk(tmp_path):
    with pytest.raises(SparsetrainError, match="no trial outcomes"):
        report([], tmp_path)
    report(_study(), tmp_path)
    before = (tmp_path / "report.md").read_text()
    with simulate_full_disk("report"), pytest.raises(SparsetrainError, match="no space left"):
        report(_study()[:6], tmp_path)
    assert (tmp_path / "report.md").read_text() == before


# --- Shallue et al.'s layout -------------------------------------------------------------------------


def _layout_outcomes():
    out = []
    for sparsity in (0.0, 0.9):
        for b in (16, 256):
            out += [
                _trial(b, sparsity, 0, "complete", 300, params={"learning_rate": 0.1234567890123, "decay_steps": 31234}),
                _trial(b, sparsity, 1, "incomplete", end=800),
                _trial(b, sparsity, 2, "infeasible"),
                _trial(b, sparsity, 10, "stopped", end=400),
            ]
    return out


def _key(o: TrialOutcome):
    return (o.workload, o.sparsity, o.batch_size, o.plan_index)


def _same(a: TrialOutcome, b: TrialOutcome) -> bool:
    nan_safe = lambda c: [(s, None if math.isnan(e) else e) for s, e in c]  # noqa: E731
    return (_key(a), a.params, a.status, a.steps_to_result, nan_safe(a.curve)) == \
           (_key(b), b.params, b.status, b.steps_to_result, nan_safe(b.curve))


def test_the_layout_round_trips(tmp_path):
    outcomes = _layout_outcomes()
    written = write_layout(outcomes, tmp_path, goal_error=GOAL, train_steps=1000)
    assert len(written) == 4
    back = sorted(read_layout(tmp_path), key=_key)
    assert len(back) == len(outcomes)
    for a, b in zip(sorted(outcomes, key=_key), back):
        assert _same(a, b), (a, b)
    # One analysis serves both: the same K* per point.
    assert [(p.batch_size, p.k_star) for p in points(back)] == [(p.batch_size, p.k_star) for p in points(outcomes)]


def test_written_files_are_what_batch_science_data_loader_reads(tmp_path):
    """google-research batch_science/data_loader.py: batch-size folders and trial folders are
    integer names (sorted with int), study.json has batch_size/dataset/model/optimizer,
    metadata.json has trial_id and status in COMPLETE/INCOMPLETE/INFEASIBLE, measurements.csv is
    read with index_col="step"."""
    write_layout(_layout_outcomes(), tmp_path, goal_error=GOAL, train_steps=1000)
    workload_dir = tmp_path / "sparsity-0.9" / "mnist" / "simple_cnn" / "sgd"
    assert sorted(int(d.name) for d in workload_dir.iterdir()) == [16, 256]
    study_dir = workload_dir / "256"
    study = json.loads((study_dir / "study.json").read_text())
    assert (study["batch_size"], study["dataset"], study["model"], study["optimizer"]) == (256, "mnist", "simple_cnn", "sgd")
    assert study["parameter_configs"]["learning_rate"] == {"max_value": 1.0, "min_value": 0.0001,
                                                           "scale": "LOG_SCALE", "type": "DOUBLE"}
    assert study["parameter_configs"]["decay_steps"]["type"] == "INTEGER"
    trial_dirs = sorted((d for d in study_dir.iterdir() if d.is_dir()), key=lambda d: int(d.name))
    assert [d.name for d in trial_dirs] == ["0", "1", "2", "10"]
    statuses = {}
    for d in trial_dirs:
        meta = json.loads((d / "metadata.json").read_text())
        statuses[meta["trial_id"]] = meta["status"]
        with open(d / "measurements.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["step", "val/classification_error"]
    assert statuses == {0: "COMPLETE", 1: "COMPLETE", 2: "INFEASIBLE", 10: "INCOMPLETE"}
    complete = json.loads((study_dir / "0" / "metadata.json").read_text())
    assert complete["steps"] == 300 and complete["parameters"]["decay_steps"] == 31234


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_reads_a_study_written_the_way_shallue_et_al_published_theirs(tmp_path):
    """Files as in their README: no sparsity, no goal, extra columns and fields, folders 2 and 10."""
    study_dir = tmp_path / "fashion_mnist" / "simple_cnn_base" / "nesterov_momentum" / "64"
    _write(study_dir / "study.json", json.dumps({
        "batch_size": 64, "dataset": "fashion_mnist", "early_stopping": False, "model": "simple_cnn_base",
        "optimizer": "nesterov_momentum", "parameter_configs": {}, "train_steps": 3000}))
    header = "step,train/cross_entropy_error,train/classification_error,val/cross_entropy_error,val/classification_error\n"
    trials = {
        2: ("COMPLETE", "0,2.3,0.9,2.3,0.91\n1000,0.5,0.2,0.6,0.31\n2000,0.3,0.1,0.4,0.29\n3000,0.2,0.05,0.4,0.25\n"),
        10: ("COMPLETE", "0,2.3,0.9,2.3,0.9\n1000,0.9,0.4,1.0,0.45\n3000,0.8,0.35,0.9,0.4\n"),
        3: ("INFEASIBLE", "0,2.3,0.9,2.3,0.9\n1000,nan,nan,nan,nan\n"),
        4: ("INCOMPLETE", "0,2.3,0.9,2.3,0.9\n1000,0.4,0.1,0.5,0.2\n"),
    }
    for trial_id, (status, rows) in trials.items():
        _write(study_dir / str(trial_id) / "metadata.json", json.dumps({
            "_internal_study_name": "x", "_internal_trial_id": trial_id, "parameters": {"learning_rate": 0.5},
            "status": status, "steps": 3000, "trial_id": trial_id}))
        _write(study_dir / str(trial_id) / "measurements.csv", header + rows)
    with pytest.raises(SparsetrainError, match="names no goal error"):
        read_layout(tmp_path)
    got = {o.plan_index: (o.status, o.steps_to_result) for o in read_layout(tmp_path, goal_error=0.3)}
    # By hand: trial 2 first at or below 0.3 at step 2000; trial 10 never; 3 diverged; 4 was cut short.
    assert got == {2: ("complete", 2000), 10: ("incomplete", None), 3: ("infeasible", None), 4: ("stopped", None)}
    one = read_layout(study_dir, goal_error=0.3)[0]
    assert (one.workload, one.sparsity, one.batch_size) == ("fashion_mnist/simple_cnn_base/nesterov_momentum", 0.0, 64)
    with pytest.raises(SparsetrainError, match="pass metric="):
        read_layout(tmp_path, goal_error=0.3, metric="val/error")


def test_the_layout_refuses_what_it_could_not_read_back(tmp_path):
    bad = TrialOutcome("mnist/simple_cnn/sgd", 8, 0.0, 0, {}, "complete", 500, _curve(300, 1000))
    with pytest.raises(SparsetrainError, match="first reaches the goal 0.02 at 300"):
        write_layout([bad], tmp_path, goal_error=GOAL, train_steps=1000)
    with pytest.raises(SparsetrainError, match="dataset/model/optimizer folders"):
        write_layout([_trial(8, 0.0, 0, "incomplete", workload="no-such-workload")], tmp_path, goal_error=GOAL,
                     train_steps=1000)
    twice = [_trial(8, 0.0, 0, "incomplete"), _trial(8, 0.0, 0, "stopped")]
    with pytest.raises(SparsetrainError, match="one plan index"):
        write_layout(twice, tmp_path, goal_error=GOAL, train_steps=1000)
    with pytest.raises(SparsetrainError, match="no study.json"):
        read_layout(tmp_path / "nowhere")
    written = write_layout(_layout_outcomes()[:4], tmp_path / "ok", goal_error=GOAL, train_steps=1000)
    (written[0].parent / "plots").mkdir()
    with pytest.raises(SparsetrainError, match="integer trial id"):
        read_layout(tmp_path / "ok")


def test_the_layout_names_a_recipe_workloads_folders(tmp_path):
    written = write_layout([_trial(8, 0.0, 0, "incomplete", workload="dps-mnist-simple-cnn-sgd")], tmp_path,
                           goal_error=GOAL, train_steps=40000)
    assert written[0].relative_to(tmp_path).parts == ("sparsity-0", "mnist", "simple-cnn", "sgd", "8", "study.json")
    assert read_layout(tmp_path)[0].workload == "dps-mnist-simple-cnn-sgd"


def test_layout_writes_go_through_the_atomic_writer(tmp_path):
    with simulate_full_disk("export"), pytest.raises(SparsetrainError, match="cannot write the export"):
        write_layout(_layout_outcomes()[:1], tmp_path, goal_error=GOAL, train_steps=1000)
    assert not list(tmp_path.rglob("*.json"))

