"""The study engine: trial statuses, early stopping that never changes K*, four worker processes
with one killed by SIGKILL mid-trial (its trial retried after the heartbeat's grace period, every
trial recorded once), and a study interrupted mid-trial and between trials that resumes to the
same outcomes. Tiny workloads: mlp-tiny on the synthetic data set."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from sparsetrain.models.registry import MODELS
from sparsetrain.store import RunStatus, RunStore
from sparsetrain.study import engine
from sparsetrain.study.outcome import RUN_STATUS_OF, TRIAL_STATUSES, TrialOutcome, steps_to_result
from sparsetrain.study.workloads import load_workload

def workload_toml(*, model="mlp-tiny", shape=None, momentum=0.0, nesterov=None, weight_decay=0.0,
                  schedule="constant", decay_every=None, end_lr_factor=None, iterations=150, goal=0.1) -> str:
    """The study tests' workload on synthetic data: SNIP 50% on a 16-example batch, SGD at batch 32,
    a check every 10 steps; ``shape`` (e.g. (1, 4, 4)) shrinks the images so that the classes
    overlap; settings left None are not written (the recipe's defaults)."""
    optional = {"nesterov": None if nesterov is None else str(nesterov).lower(),
                "decay_every": decay_every, "end_lr_factor": end_lr_factor}
    extra = "".join(f"{k} = {v}\n" for k, v in optional.items() if v is not None)
    data = "" if shape is None else f"data_args = {{shape = {list(shape)}}}\n"
    return f"""
model = "{model}"
dataset = "synthetic"
seed = 0
{data}[prune]
method = "snip"
sparsity = 0.5
batches = 1
batch_size = 16
[train]
optimizer = "sgd"
momentum = {momentum}
weight_decay = {weight_decay}
schedule = "{schedule}"
{extra}iterations = {iterations}
batch_size = 32
checkpoint_every = 20
val_every = 10
goal_error = {goal}
"""


def tiny_workload(tmp_path, goal=0.1, iterations=150, name="tiny", model=None, hard=False, **settings):
    """:func:`workload_toml` written to ``<name>.toml`` and loaded; ``hard``: 4x4 images, where the
    classes overlap, so no trial reaches a small goal error."""
    if hard:
        settings.setdefault("shape", (1, 4, 4))
    text = workload_toml(model=model or "mlp-tiny", iterations=iterations, goal=goal, **settings)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_workload(path)


def spec_of(workload, **changes):
    settings = {"batch_sizes": (8, 32), "sparsities": (0.5,), "trials": 3, "heartbeat_interval": 1,
                "grace_period": 3, **changes}
    return engine.StudySpec((workload,), **settings)


def k_stars(outcomes):
    points = sorted({o.point for o in outcomes})
    return {p: steps_to_result([o for o in outcomes if o.point == p]) for p in points}


reference_folders: list[Path] = []  # where the module's reference study lies


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny study run to its end by one in-process worker, with early stopping."""
    root = tmp_path_factory.mktemp("reference")
    reference_folders.append(root / "study")
    engine.plan(root / "study", spec_of(tiny_workload(root)))
    assert engine.work_loop(root / "study") == 6
    return engine.outcomes(root / "study")


# ----------------------------------------------------------------------------- statuses


def test_classify_statuses_by_hand():
    curve = [(10, 0.9), (20, 0.4), (30, 0.08), (40, 0.05)]
    assert engine.classify(RunStatus.STOPPED, curve, 0.1) == ("complete", 30)  # first check at or below
    assert engine.classify(RunStatus.STOPPED, curve, 0.08) == ("complete", 30)  # "at" counts
    assert engine.classify(RunStatus.FINISHED, curve, 0.01) == ("incomplete", None)
    assert engine.classify(RunStatus.STOPPED, curve[:2], 0.1) == ("stopped", None)
    assert engine.classify(RunStatus.INFEASIBLE, [(10, 0.9)], 0.1) == ("infeasible", None)
    with pytest.raises(Exception, match="not an end"):
        engine.classify(RunStatus.RUNNING, curve[:1], 0.1)


def test_every_trial_status_has_one_run_status():
    assert set(RUN_STATUS_OF) == set(TRIAL_STATUSES)
    assert set(RUN_STATUS_OF.values()) <= {s.value for s in RunStatus}
    with pytest.raises(Exception, match="only complete trials reach the goal"):
        TrialOutcome("w", 8, 0.0, 0, {}, "incomplete", 100, [])
    with pytest.raises(Exception, match="is not one of"):
        TrialOutcome("w", 8, 0.0, 0, {}, "done", None, [])
    o = TrialOutcome("w", 8, 0.5, 2, {"learning_rate": 0.1}, "complete", 30, [(10, 0.5), (20, math.nan), (30, 0.0)])
    again = TrialOutcome.from_dict(o.to_dict())
    assert again.curve[0] == (10, 0.5) and math.isnan(again.curve[1][1]) and again.steps_to_result == 30


def test_trials_share_one_mask_per_seed_and_sparsity(reference, tmp_path):
    # the reference study: B = 8 and 32, plan indexes (seeds) 0..2, one sparsity: three masks
    folder = next(iter({Path(p) for p in reference_folders}))
    masks = sorted((folder / engine.MASKS_DIR).iterdir())
    assert len(masks) == 3
    runs = RunStore(folder / "runs").list()
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r.seed, set()).add(r.config["mask"]["sha256"])
        assert r.config["prune"]["method"] == "snip" and r.config["prune"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert sorted(by_seed) == [0, 1, 2] and all(len(shas) == 1 for shas in by_seed.values())
    assert len({next(iter(shas)) for shas in by_seed.values()}) == 3  # each seed its own mask


def test_one_scoring_finds_a_seeds_masks_at_every_sparsity(tmp_path):
    from sparsetrain.masks import load_mask
    from sparsetrain.pipeline import build, find_mask

    workload = tiny_workload(tmp_path)
    folder = tmp_path / "study"
    engine.plan(folder, spec_of(workload, batch_sizes=(8,), sparsities=(0.0, 0.5, 0.8), trials=2))
    assert engine.work_loop(folder, max_trials=3) == 3  # dense 0 and 1, then s = 0.5 plan index 0
    masks = sorted((folder / engine.MASKS_DIR).iterdir())
    assert len(masks) == 2  # the trial's seed at 0.5, and at 0.8 found with it

    def config_of(sparsity, seed):
        return engine.mask_config(workload.trial_config(8, sparsity, {"learning_rate": 0.1}, seed=seed))

    # the seed is the plan index the point took first (the hint may pick index 1)
    seeds = [i for i in (0, 1) if (folder / engine.MASKS_DIR / f"{config_of(0.5, i).key()}.safetensors").exists()]
    assert len(seeds) == 1
    for sparsity in (0.5, 0.8):  # each as find_mask gives it alone, scored again here
        config = config_of(sparsity, seeds[0])
        alone = find_mask(config, build(config))
        saved = load_mask(folder / engine.MASKS_DIR / f"{config.key()}.safetensors")
        assert sorted(saved) == sorted(alone) and all(torch.equal(saved[n], alone[n]) for n in alone)


def test_reference_study_records_statuses_curves_and_optuna_states(reference, tmp_path):
    assert len(reference) == 6 and sorted(o.plan_index for o in reference) == [0, 0, 1, 1, 2, 2]
    for o in reference:
        assert o.status in ("complete", "stopped", "incomplete")
        assert [s for s, _ in o.curve] == list(range(10, 10 * len(o.curve) + 1, 10))  # every check_interval
        if o.status == "complete":
            assert o.curve[-1] == (o.steps_to_result, o.curve[-1][1]) and o.curve[-1][1] <= 0.1
            assert all(e > 0.1 for _, e in o.curve[:-1])


class NaNInTraining(nn.Module):
    """Finite in evaluation, NaN logits in training: every trial diverges at its first loss check."""

    def __init__(self, *, input_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        out = self.fc(x.flatten(1))  # (B, classes)
        return out * torch.nan if self.training else out


@pytest.fixture
def nan_model():
    """A model registered for the test only: left in the registry it would show in every listing
    of the models (tests/test_models_registry.py checks that listing)."""
    MODELS.register("study-test-nan")(NaNInTraining)
    yield "study-test-nan"
    MODELS.unregister("study-test-nan")


def test_a_diverging_trial_is_infeasible(tmp_path, nan_model):
    workload = tiny_workload(tmp_path, iterations=60, model=nan_model)
    folder = tmp_path / "study"
    engine.plan(folder, spec_of(workload, batch_sizes=(8,), sparsities=(0.0,), trials=1))
    engine.work_loop(folder)
    [o] = engine.outcomes(folder)
    assert (o.status, o.steps_to_result) == ("infeasible", None)
    storage = engine.open_storage(folder, engine.load_spec(folder))
    [t] = optuna.load_study(study_name="tiny/b8/s0", storage=storage).get_trials()
    assert t.state == optuna.trial.TrialState.COMPLETE and t.value == math.inf
    [run] = RunStore(folder / "runs").list()
    assert run.status == RUN_STATUS_OF["infeasible"] == "infeasible"
    assert run.group_kind == "study" and run.group_name == "study"


# ----------------------------------------------------------------------------- early stopping


def test_early_stop_never_changes_k_star_or_the_best_trial(reference, tmp_path):
    folder = tmp_path / "study"
    engine.plan(folder, spec_of(tiny_workload(tmp_path), early_stop=False))
    engine.work_loop(folder)
    full = engine.outcomes(folder)
    assert "stopped" not in {o.status for o in full}
    assert k_stars(full) == k_stars(reference)
    assert all(v is not None for v in k_stars(full).values())
    best_full, best_early = engine.best_trials(full), engine.best_trials(reference)
    assert {p: (o.plan_index, o.params) for p, o in best_full.items()} == {
        p: (o.plan_index, o.params) for p, o in best_early.items()}
    assert "stopped" in {o.status for o in reference}  # the early stop did stop something ...
    assert sum(len(o.curve) for o in reference) < sum(len(o.curve) for o in full)  # ... and saved checks
    # each early-stopped trial ran to the first check at or past the K* known then, no further
    for o in reference:
        if o.status == "stopped":
            assert o.curve[-1][0] >= k_stars(reference)[o.point]


def test_a_point_tries_first_the_best_plan_index_of_the_nearest_point(tmp_path):
    # Outcomes told by hand (no training): each claimed trial is recorded with the steps below.
    folder = tmp_path / "study"
    engine.plan(folder, spec_of(tiny_workload(tmp_path), batch_sizes=(8, 32, 512), sparsities=(0.0, 0.5)))

    def claim_and_record(opened, steps_by_index):
        point, study, trial_id = engine._claim(opened)
        index = study._storage.get_trial(trial_id).user_attrs["plan_index"]
        steps = steps_by_index[index]
        engine.record_trial(study, optuna.Trial(study, trial_id), index,
                            "complete" if steps else "incomplete", steps, f"run{index}", [])
        return point[1:], index

    with engine.open_study(folder) as opened:
        # the first point has nothing to go by: plan order; index 2 is its best
        assert [claim_and_record(opened, {0: 300, 1: None, 2: 100}) for _ in range(3)] == [
            ((8, 0.0), 0), ((8, 0.0), 1), ((8, 0.0), 2)]
        # same batch size, other sparsity: index 2 first, then plan order; here index 1 is best
        assert [claim_and_record(opened, {0: None, 1: 40, 2: 60}) for _ in range(3)] == [
            ((8, 0.5), 2), ((8, 0.5), 0), ((8, 0.5), 1)]
        # B = 32 is two doublings from B = 8 at both sparsities: the same sparsity decides
        assert engine.hinted_index(opened, opened.spec.workloads[0], 32, 0.0) == 2
        assert engine.hinted_index(opened, opened.spec.workloads[0], 32, 0.5) == 1
        # at (32, 0.0) indexes 2 and 0 both take 90 steps: the tie goes to index 0, and B = 512
        # takes its hint from B = 32 (two doublings away) rather than B = 8 (six)
        assert claim_and_record(opened, {2: 90}) == ((32, 0.0), 2)
        assert claim_and_record(opened, {0: 90}) == ((32, 0.0), 0)
        assert engine.hinted_index(opened, opened.spec.workloads[0], 512, 0.0) == 0
        assert engine.hinted_index(opened, opened.spec.workloads[0], 512, 0.5) == 0  # nearer in B first


# ----------------------------------------------------------------------------- interruptions


def test_interrupted_study_resumes_to_the_same_outcomes(reference, tmp_path, monkeypatch):
    folder = tmp_path / "study"
    engine.plan(folder, spec_of(tiny_workload(tmp_path)))
    assert engine.work_loop(folder, max_trials=1) == 1  # stopped between trials

    real_on_eval, hits = engine.TrialWatch.on_eval, []

    def ctrl_c_at_step_10(self, step, metrics):  # Ctrl-C inside the next trial, at its first check
        if step == 10 and not hits:
            hits.append(step)
            raise KeyboardInterrupt
        return real_on_eval(self, step, metrics)

    monkeypatch.setattr(engine.TrialWatch, "on_eval", ctrl_c_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        engine.work_loop(folder)
    rows = engine.status_rows(folder)
    assert sum(r["failed_attempts"] for r in rows) == 1 and sum(r["running"] for r in rows) == 0
    engine.work_loop(folder, max_trials=2)
    engine.work_loop(folder)
    resumed = engine.outcomes(folder)
    assert hits == [10]
    assert k_stars(resumed) == k_stars(reference)
    assert [(o.point, o.plan_index, o.status, o.steps_to_result, o.curve) for o in resumed] == [
        (o.point, o.plan_index, o.status, o.steps_to_result, o.curve) for o in reference]


def killer(storage, names, killed: list[int]):
    """An ``on_start`` for :func:`engine.work`: a thread that SIGKILLs the first of ``pids`` seen
    in the middle of a 300-step trial of the Optuna studies ``names`` (a check reported, none past
    step 150) and appends its pid to ``killed``."""

    def kill_one_worker(pids):
        def watch():
            deadline = time.time() + 60
            while time.time() < deadline and not killed:
                for name in names:
                    study = optuna.load_study(study_name=name, storage=storage)
                    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                        pid = int(t.user_attrs.get("worker", ":0").rsplit(":", 1)[1])
                        steps = t.intermediate_values
                        if pid in pids and steps and max(steps) <= 150:  # a worker in the middle of 300 steps
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
                            return
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()

    return kill_one_worker


def check_killed_study(folder, db, names, result, killed, workers, where=None):
    """What a study of :func:`killed_study_spec` worked by ``workers`` processes, one killed
    mid-trial, must show: every plan index finished exactly once, to its whole budget, the killed
    attempt failed and retried once, six finished runs in ``folder``'s run store. ``db``: the open
    storage holding the Optuna studies ``names``; ``where``: the study's storage URL and name."""
    where = where or {}
    assert len(killed) == 1 and sorted(result["exit_codes"]) == [-signal.SIGKILL] + [0] * (workers - 1)
    assert result["finished"] == result["total"] == 6
    outcomes = engine.outcomes(folder, **where)  # raises if a plan index has two finished trials
    assert sorted((o.batch_size, o.plan_index) for o in outcomes) == [(b, i) for b in (8, 32) for i in range(3)]
    assert {o.status for o in outcomes} == {"incomplete"}
    assert all(o.curve[-1][0] == 300 and len(o.curve) == 30 for o in outcomes)
    rows = engine.status_rows(folder, **where)
    assert sum(r["failed_attempts"] for r in rows) == 1  # the killed attempt, retried once
    retried = [t for name in names for t in optuna.load_study(study_name=name, storage=db).get_trials()
               if "failed_trial" in t.system_attrs]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    runs = RunStore(folder / "runs").list()
    assert len(runs) == 6 and {r.status for r in runs} == {"finished"}


def killed_study_spec(tmp_path):
    """Budgets no trial reaches: each trial runs its whole 300 steps, long enough to be killed in."""
    return spec_of(tiny_workload(tmp_path, goal=0.01, iterations=300, hard=True), early_stop=False, trials=3)


@pytest.mark.slow  # four fresh interpreters import torch and optuna: ~15 s quiet, ~60 s on a loaded 2-core machine
def test_four_workers_one_killed_mid_trial_every_trial_recorded_once(tmp_path):
    folder = tmp_path / "study"
    engine.plan(folder, killed_study_spec(tmp_path))
    storage = engine.open_storage(folder, engine.load_spec(folder))
    killed: list[int] = []
    names = ("tiny/b8/s0.5", "tiny/b32/s0.5")
    result = engine.work(folder, 4, progress=False, on_start=killer(storage, names, killed))
    check_killed_study(folder, storage, names, result, killed, 4)


# ----------------------------------------------------------------------------- the command line


def test_study_commands_plan_status_report(tmp_path, capsys):
    from sparsetrain.cli.main import main

    tiny_workload(tmp_path, iterations=40)
    folder = tmp_path / "study"
    assert main(["study", "plan", "--dir", str(folder), "--workload", str(tmp_path / "tiny.toml"),
                 "--batch-sizes", "8", "--sparsities", "0", "--trials", "2", "--heartbeat-interval", "1",
                 "--grace-period", "3"]) == 0
    engine.work_loop(folder)
    capsys.readouterr()
    assert main(["study", "status", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "| tiny/b8/s0 | 2 " in out and "2 of 2 trials finished (100%)" in out
    assert main(["study", "report", "--dir", str(folder), "--out", str(tmp_path / "report")]) == 0


@pytest.mark.parametrize("argv, words", [
    (["plan", "--workload", "dps-mnist-simple-cnn-sgd", "--batch-sizes", "8,x", "--sparsities", "0"],
     "--batch-sizes takes numbers separated by commas"),
    (["plan", "--workload", "dps-mnist-simple-cnn-sgd", "--batch-sizes", "8", "--sparsities", "1"],
     "sparsities must lie in [0, 1)"),
    (["plan", "--workload", "demo", "--batch-sizes", "8", "--sparsities", "0"], "has no train.goal_error"),
    (["status"], "holds no study"),
    (["work", "--workers", "0"], "--workers must be a positive whole number; got 0"),
])
def test_study_commands_refuse_bad_input(tmp_path, capsys, argv, words):
    from sparsetrain.cli.main import main

    assert main(["study", argv[0], "--dir", str(tmp_path / "s"), *argv[1:]]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.slow  # ResNet-8 pruned and trained 4 steps on CPU: ~5 s quiet, ~15 s on a loaded 2-core machine
def test_the_cifar_workload_runs_on_cifar_format_files(tmp_path):
    from fake_datasets import write_cifar10

    write_cifar10(tmp_path / "data", per_batch=20, n_test=10)
    workload = load_workload("dps-cifar10-resnet-8-nesterov",
                             {"train": {"iterations": 4, "val_every": 2, "checkpoint_every": 2},
                              "prune": {"batch_size": 10}})
    folder = tmp_path / "study"
    engine.plan(folder, engine.StudySpec((workload,), (8,), (0.9,), trials=1, heartbeat_interval=1, grace_period=3))
    engine.work_loop(folder, data_dir=tmp_path / "data")
    [o] = engine.outcomes(folder)
    assert o.status in ("complete", "incomplete") and [s for s, _ in o.curve] == [2, 4]
    assert set(o.params) == {"learning_rate", "momentum", "decay_steps", "end_learning_rate_factor"}
    [run] = RunStore(folder / "runs").list()
    assert run.config["train"]["schedule"] == "linear-then-constant"
    assert run.config["train"]["decay_every"] == o.params["decay_steps"] == 45000
    assert run.results["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_running_progress_names_each_running_trial_and_its_last_check(tmp_path):
    """What the bar of `study work` shows beside the count: a running trial's point, plan index
    and last reported validation error (a trial at a small batch size runs for minutes)."""
    engine.plan(tmp_path / "s", spec_of(tiny_workload(tmp_path)))
    with engine.open_study(tmp_path / "s") as opened:
        assert engine.running_progress(opened) == ""
        point, study, trial_id = engine._claim(opened)
        assert point[1:] == (8, 0.5)
        assert engine.running_progress(opened) == "b8/s0.5 #0 starting"
        trial = optuna.trial.Trial(study, trial_id)
        trial.report(0.25, 10)
        trial.report(0.125, 1200)
        assert engine.running_progress(opened) == "b8/s0.5 #0 step 1,200 val 12.50%"
        engine._claim(opened)  # a second worker's trial, the next plan index
        assert engine.running_progress(opened) == "b8/s0.5 #0 step 1,200 val 12.50%; b8/s0.5 #1 starting"
