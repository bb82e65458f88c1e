"""`sparsetrain study lipschitz`: one curve per sparsity, measured along a retraining of the trial
that set K*, checked against an oracle computed here (the first measured L taken by hand from the
weights of a plain retraining, the full-batch gradient in one piece); lipschitz.json round-trips,
a second call measures nothing, the report draws the curves; bad input is refused. Tiny workloads:
mlp-tiny on the synthetic data set, as tests/test_study_engine.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsetrain.cli.main import main
from sparsetrain.errors import SparsetrainError
from sparsetrain.fsio import simulate_full_disk
from sparsetrain.pipeline import build, init_under_mask, train_stage
from sparsetrain.study import engine
from sparsetrain.study.lipschitz import GAMMAS, LIPSCHITZ_FILE, LipschitzCurve, load_curves, measure_study
from test_study_engine import tiny_workload
from sparsetrain.train.loop import Callback

EXAMPLES, CHUNK, EVERY = 96, 40, 10  # a "full" batch of 96 examples in chunks of 40 (the last one 16)


def tiny_study(root, batch_sizes=(32,), sparsities=(0.0, 0.5), trials=2, easy=False):
    """8 x 8 images: at B = 32 plan point 0 (learning rate 0.01) never reaches the goal and point 1
    (0.1) does, after 40 steps dense and 150 at sparsity 0.5 (``easy``: 28 x 28, point 0 reaches it).
    The study's one batch size keeps it fast; tests/test_study_engine.py covers several."""
    workload = tiny_workload(root, iterations=200, shape=None if easy else (1, 8, 8))
    spec = engine.StudySpec((workload,), batch_sizes, sparsities, trials, heartbeat_interval=1, grace_period=3)
    engine.plan(root / "study", spec)
    return root / "study"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study run to its end, then its curves at B = 32 measured once (about 8 s, most of
    it the study's four trials through Optuna)."""
    folder = tiny_study(tmp_path_factory.mktemp("lipschitz"))
    engine.work_loop(folder)
    said: list[str] = []
    curves = measure_study(folder, batch_size=32, every=EVERY, chunk=CHUNK, examples=EXAMPLES, say=said.append)
    return folder, curves, said


class Snapshots(Callback):
    """Keeps the trainable weights after the given steps."""

    def __init__(self, model, steps):
        self.model, self.steps, self.kept = model, set(steps), {}

    def on_step(self, step, loss):
        if step in self.steps:
            self.kept[step] = [p.detach().clone() for p in self.model.parameters()]


def _oracle_first_value(folder, workload, trial, sparsity):
    """L at step EVERY by hand: the best trial's config retrained plainly (no Lipschitz callback)
    with the study's mask, the weights kept after steps EVERY - 1 and EVERY, and the maximum over
    gamma of ||g(w + gamma d) - g(w)|| / ||gamma d|| with g the masked gradient of the mean
    cross-entropy over the first EXAMPLES training examples, taken in one piece."""
    config = workload.trial_config(32, sparsity, trial.params, seed=trial.plan_index)
    mask = engine.shared_mask(folder, config)
    config = config.replace(train={"iterations": EVERY, "goal_error": 0.0})
    built = build(config)
    model, hooks = init_under_mask(config, built, mask)
    snaps = Snapshots(model, (EVERY - 1, EVERY))
    train_stage(config, built, model, hooks, mask, progress=False, callbacks=[snaps])
    train = built.loaders.train
    x = train.x[:EXAMPLES] if train.prepare is None else train.prepare(train.x[:EXAMPLES])
    y = train.y[:EXAMPLES]
    keep = [torch.ones_like(p) if mask is None or n not in mask else mask[n].to(p.dtype)
            for n, p in model.named_parameters()]
    model.eval()

    def gradient(weights):
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return torch.cat([(g * k).reshape(-1) for g, k in zip(grads, keep)]).double()

    before, after = snaps.kept[EVERY - 1], snaps.kept[EVERY]
    d = [a - b for a, b in zip(after, before)]
    norm = torch.cat([t.reshape(-1) for t in d]).double().norm()
    g0 = gradient(before)
    return max(float((gradient([b + g * t for b, t in zip(before, d)]) - g0).norm() / (g * norm)) for g in GAMMAS)


def test_one_curve_per_sparsity_from_the_best_trial_equal_to_a_hand_computed_first_value(study):
    folder, curves, said = study
    best = engine.best_trials(engine.outcomes(folder))
    workload = engine.load_spec(folder).workloads[0]
    assert [(c.workload, c.sparsity, c.batch_size) for c in curves] == [("tiny", 0.0, 32), ("tiny", 0.5, 32)]
    for c in curves:
        trial = best[("tiny", 32, c.sparsity)]
        assert (c.plan_index, c.params, c.k_star) == (trial.plan_index, trial.params, trial.steps_to_result)
        # default steps: K*; the retraining is the trial's exact run, so it reaches the goal at K* again
        assert trial.plan_index == 1 and c.k_star >= 4 * EVERY  # the second plan point, some way into training
        assert c.steps == c.k_star and c.goal_reached_at == c.k_star
        assert [s for s, _ in c.values] == list(range(EVERY, c.k_star + 1, EVERY))
        assert all(math.isfinite(v) and v > 0 for _, v in c.values)
        assert c.values[0][1] == pytest.approx(_oracle_first_value(folder, workload, trial, c.sparsity), rel=1e-4)
    assert any("retraining trial" in line for line in said)


def test_the_curves_round_trip_and_a_second_call_measures_nothing(study):
    folder, curves, _ = study
    assert load_curves(folder) == curves
    text = (folder / LIPSCHITZ_FILE).read_text()
    assert [LipschitzCurve.from_dict(c) for c in json.loads(text)["curves"]] == curves
    said: list[str] = []
    again = measure_study(folder, batch_size=32, every=EVERY, chunk=CHUNK, examples=EXAMPLES, say=said.append)
    assert again == curves and (folder / LIPSCHITZ_FILE).read_text() == text
    assert len(said) == 2 and all("already measured" in line for line in said)


def test_the_report_draws_the_curves_and_says_where_they_came_from(study, tmp_path):
    folder, curves, _ = study
    assert main(["study", "report", "--dir", str(folder), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "lipschitz-tiny.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "report.md").read_text()
    c = curves[1]
    assert f"| 0.5 | 32 | {c.plan_index} | learning_rate=" in text and f"| {EVERY} | {EXAMPLES} |" in text
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["workloads"]["tiny"]["lipschitz"] == [x.to_dict() for x in curves]


def test_a_point_without_a_complete_trial_is_skipped_and_none_at_all_is_refused(tmp_path, capsys):
    folder = tiny_study(tmp_path, trials=1, easy=True)
    with pytest.raises(SparsetrainError, match="no complete trial at any batch size yet"):
        measure_study(folder)
    engine.work_loop(folder, max_trials=1)  # the first point only: sparsity 0
    assert engine.outcomes(folder)[0].status == "complete"
    capsys.readouterr()
    steps = engine.outcomes(folder)[0].steps_to_result + 2 * EVERY  # --steps: on past the goal, which stops nothing
    argv = ["--every", str(EVERY), "--steps", str(steps), "--chunk", str(CHUNK), "--examples", str(EXAMPLES)]
    assert main(["study", "lipschitz", "--dir", str(folder), *argv]) == 0
    assert "tiny/b32/s0.5: skipped, no complete trial" in capsys.readouterr().out
    [curve] = load_curves(folder)
    assert (curve.sparsity, curve.batch_size, curve.steps, len(curve.values)) == (0.0, 32, steps, steps // EVERY)
    assert curve.goal_reached_at == curve.k_star == steps - 2 * EVERY


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "16"], "--batch-size 16 is not one of the study's batch sizes (32)"),
    (["--every", "1"], "--every must be a whole number >= 2"),
    (["--every", "0"], "--every must be a whole number >= 2"),
    (["--steps", "0"], "--steps must be a whole number >= 1"),
    (["--examples", "-3"], "--examples must be a whole number >= 1"),
])
def test_bad_input_is_refused_before_anything_is_trained(study, argv, message, capsys):
    folder, _, _ = study
    before = (folder / LIPSCHITZ_FILE).read_text()
    assert main(["study", "lipschitz", "--dir", str(folder), *argv]) == 2
    assert message in capsys.readouterr().err
    assert (folder / LIPSCHITZ_FILE).read_text() == before


def test_a_full_disk_leaves_the_curves_as_they_were(study):
    folder, curves, _ = study
    before = (folder / LIPSCHITZ_FILE).read_text()
    with simulate_full_disk("report"), pytest.raises(SparsetrainError, match="no space left"):
        measure_study(folder, batch_size=32, every=2 * EVERY, steps=2 * EVERY, chunk=CHUNK, examples=EXAMPLES,
                      say=lambda line: None)
    assert (folder / LIPSCHITZ_FILE).read_text() == before and load_curves(folder) == curves
