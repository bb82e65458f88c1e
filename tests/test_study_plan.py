"""The study's workloads and plan: Sobol points against values worked out by hand and against
effect-dps-public's own points, the metaparameter mappings, the bundled workloads, the linear
decay of the original, and the inputs a study refuses."""

from __future__ import annotations

import re

import pytest
import torch

from sparsetrain.config import TrainConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.study import engine
from sparsetrain.study.plan import plan_points, unit_points
from sparsetrain.study.workloads import SEARCH_SPACE, Workload, load_workload
from sparsetrain.train.optim import build_schedule

# effect-dps-public's points: its sobol_lib.i4_sobol_generate(2, 6, skip=2), printed (the first two
# of the four dimensions it generates for ResNet-8; the Sobol sequence after its origin).
ORIGINAL_POINTS_2D = [(0.5, 0.5), (0.75, 0.25), (0.25, 0.75), (0.375, 0.375), (0.875, 0.875), (0.625, 0.125)]

TINY = """
model = "mlp-tiny"
dataset = "synthetic"
[train]
iterations = 100
schedule = "constant"
momentum = 0.0
val_every = 10
goal_error = 0.1
"""


def test_first_two_dimensions_are_the_originals_points():
    assert unit_points(2, 6).tolist() == [list(p) for p in ORIGINAL_POINTS_2D]


def test_learning_rate_points_by_hand():
    # 1-D Sobol after the origin: 1/2, 3/4, 1/4, 3/8, 7/8; lr = 10 ** (4u - 4)
    lrs = [p["learning_rate"] for p in plan_points(("learning_rate",), 5)]
    assert lrs == pytest.approx([1e-2, 1e-1, 1e-3, 10 ** -2.5, 10 ** -0.5], rel=1e-12)


def test_momentum_points_by_hand_reverse_log():
    # second dimension 1/2, 1/4, 3/4, 3/8; momentum = 1 - 10 ** (3u - 4) (u = 0: 0.9999; u -> 1: 0.9)
    points = plan_points(("learning_rate", "momentum"), 4)
    assert [p["momentum"] for p in points] == pytest.approx(
        [1 - 10 ** -2.5, 1 - 10 ** -3.25, 1 - 10 ** -1.75, 1 - 10 ** -2.875], rel=1e-12)
    assert SEARCH_SPACE["momentum"].from_unit(0.0) == pytest.approx(0.9999)
    assert SEARCH_SPACE["momentum"].from_unit(1.0) == pytest.approx(0.9)


def test_four_dimensions_by_hand_with_integer_decay_steps():
    # scipy's unscrambled points 1 and 2 in 4-D: (1/2, 1/2, 1/2, 1/2) and (3/4, 1/4, 1/4, 1/4)
    first, second = plan_points(("learning_rate", "momentum", "decay_steps", "end_learning_rate_factor"), 2)
    assert first["decay_steps"] == 45000 and isinstance(first["decay_steps"], int)
    assert first["end_learning_rate_factor"] == pytest.approx(10 ** -2.5)  # 10 ** (3u - 4)
    assert second["learning_rate"] == pytest.approx(0.1)
    assert second["decay_steps"] == 37500  # int(0.25 * 30000 + 30000)
    assert second["end_learning_rate_factor"] == pytest.approx(10 ** -3.25)


def test_plan_is_deterministic_and_enqueued_once(tmp_path):
    assert plan_points(("learning_rate", "momentum"), 16) == plan_points(("learning_rate", "momentum"), 16)
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    spec = engine.StudySpec((load_workload(path),), (8,), (0.0,), trials=5)
    engine.plan(tmp_path / "s", spec)
    engine.plan(tmp_path / "s", spec)  # planning again adds nothing
    rows = engine.status_rows(tmp_path / "s")
    assert [(r["waiting"], r["finished"]) for r in rows] == [(5, 0)]


def test_bundled_workloads_match_effect_dps_public():
    sgd = load_workload("dps-mnist-simple-cnn-sgd")
    assert (sgd.goal_error, sgd.budget, sgd.search, sgd.config.model, sgd.config.dataset) == (
        0.02, 40000, ("learning_rate",), "simple-cnn", "mnist")
    assert (sgd.config.train.schedule, sgd.config.train.momentum, sgd.config.prune.batches) == ("constant", 0.0, 0)
    assert sgd.check_interval == 100
    resnet = load_workload("dps-cifar10-resnet-8-nesterov")
    assert (resnet.goal_error, resnet.budget, resnet.config.train.nesterov) == (0.4, 100000, True)
    assert resnet.search == ("learning_rate", "momentum", "decay_steps", "end_learning_rate_factor")
    for name in ("dps-mnist-simple-cnn-momentum", "dps-mnist-simple-cnn-nesterov",
                 "dps-fashion-mnist-simple-cnn-nesterov"):
        assert load_workload(name).search == ("learning_rate", "momentum")


def test_trial_config_sets_the_point_and_the_plan_values():
    w = load_workload("dps-cifar10-resnet-8-nesterov")
    params = plan_points(w.search, 1)[0]
    c = w.trial_config(64, 0.9, params, seed=3)
    t = c.train
    assert (t.batch_size, t.lr, t.momentum, t.decay_every, t.end_lr_factor) == (
        64, params["learning_rate"], params["momentum"], 45000, params["end_learning_rate_factor"])
    assert (t.goal_error, t.on_diverge, t.val_every, c.seed, c.prune.sparsity) == (0.4, "infeasible", 100, 3, 0.9)
    assert t.schedule == "linear-then-constant"  # the recipe's linear decay, over the searched decay steps
    dense = w.trial_config(64, 0.0, params, seed=3)
    assert (dense.prune.method, dense.prune.sparsity) == ("dense", 0.0)


def test_linear_then_constant_is_tf_polynomial_decay():
    # TF: lr * ((1 - end) * (1 - min(t, T) / T) + end), T = decay_steps
    cfg = TrainConfig(lr=1.0, schedule="linear-then-constant", decay_every=100, end_lr_factor=0.01, iterations=400)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_schedule(opt, cfg, 400)
    seen = {}
    for t in range(300):
        seen[t] = opt.param_groups[0]["lr"]
        opt.step()
        schedule.step()
    for t in (0, 50, 99, 100, 250):
        assert seen[t] == pytest.approx(0.99 * (1 - min(t, 100) / 100) + 0.01)


@pytest.mark.parametrize("changes, words", [
    ({"goal_error = 0.1": ""}, "has no train.goal_error, so it is not a study workload"),
    ({"val_every = 10": "val_every = 0"}, "checks the validation error every train.val_every steps"),
    ({"iterations = 100": "epochs = 1.0"}, "step budget is train.iterations"),
    ({'schedule = "constant"': 'schedule = "cosine"'}, "a constant or linear schedule"),
    ({"[train]": '[train]\noptimizer = "adam"'}, "trains with sgd"),
])
def test_bad_workloads_are_refused(tmp_path, changes, words):
    text = TINY
    for old, new in changes.items():
        text = text.replace(old, new)
    path = tmp_path / "w.toml"
    path.write_text(text)
    with pytest.raises(SparsetrainError, match=re.escape(words)):
        load_workload(path)


@pytest.mark.parametrize("changes, words", [
    ({"batch_sizes": (0, 8)}, "batch sizes must be positive"),
    ({"sparsities": (0.5, 1.0)}, r"sparsities must lie in \[0, 1\)"),
    ({"trials": 0}, "trials per point"),
    ({"heartbeat_interval": 5, "grace_period": 5}, "must exceed heartbeat_interval"),
    ({"batch_sizes": (8, 8)}, "must not repeat"),
])
def test_bad_study_specs_are_refused(tmp_path, changes, words):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    settings = {"workloads": (load_workload(path),), "batch_sizes": (8,), "sparsities": (0.0,), **changes}
    with pytest.raises(SparsetrainError, match=words):
        engine.StudySpec(**settings)


def test_a_folder_keeps_its_plan(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    w = load_workload(path)
    engine.plan(tmp_path / "s", engine.StudySpec((w,), (8,), (0.0,), trials=2))
    with pytest.raises(SparsetrainError, match="already holds a study planned with other settings"):
        engine.plan(tmp_path / "s", engine.StudySpec((w,), (8, 16), (0.0,), trials=2))
    with pytest.raises(SparsetrainError, match="holds no study"):
        engine.load_spec(tmp_path / "nothing")


def test_search_follows_the_optimizer_and_schedule(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text(TINY)
    assert load_workload(path).search == ("learning_rate",)
    assert load_workload(path, {"train": {"momentum": 0.9, "nesterov": True}}).search == ("learning_rate", "momentum")
    assert load_workload(path, {"train": {"schedule": "linear"}}).search == (
        "learning_rate", "decay_steps", "end_learning_rate_factor")


def test_workload_round_trips_through_its_dict():
    w = load_workload("dps-mnist-simple-cnn-nesterov")
    again = Workload.from_dict(w.to_dict())
    assert again == w and again.config.key() == w.config.key()
