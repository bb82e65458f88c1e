"""Packing: K trials of one study point trained together (stacked parameters and masks, vmap)
equal the same trials run alone. The oracle is the real single-trial path (:func:`sparsetrain.run`
with the study's shared mask), run in the test: every check's validation error to 1e-5, the same
end step and status (goal reached, early stop past a best K*, divergence, budget spent), for SGD,
momentum and Nesterov, dense and sparse, a linear and a convolutional network. Tiny workloads:
synthetic data, budgets of 60-100 steps."""

from __future__ import annotations

import math

import pytest
from torch import nn

from sparsetrain.models.registry import MODELS
from sparsetrain.run import run
from sparsetrain.store import RunStore
from sparsetrain.study import engine, packed
from sparsetrain.study.plan import plan_points
from test_study_engine import tiny_workload

def workload(tmp_path, *, model="mlp-tiny", shape=(1, 4, 4), momentum=0.0, nesterov=False, weight_decay=0.0,
             schedule="constant", iterations=100, goal=0.1):
    """A study workload on synthetic data; 4x4 images make the classes overlap, so that some
    trials reach the goal and others do not."""
    return tiny_workload(tmp_path, goal=goal, iterations=iterations, name="workload", model=model, shape=shape,
                         momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, schedule=schedule,
                         decay_every=50, end_lr_factor=0.1)


class FakeTrial:
    """What TrialWatch reports to (an Optuna trial's ``report``)."""

    def report(self, value, step):
        pass


def watch(best_known, goal):
    """The engine's own early stop (TrialWatch) with a fixed best K* for the point."""
    return engine.TrialWatch(FakeTrial(), goal, lambda: best_known, early_stop=True)


def trials_of(w, tmp_path, sparsity, count, params=None, batch_size=32):
    """``count`` trials of the point (batch_size, sparsity): configs (plan index = seed) and shared masks."""
    params = params or plan_points(w.search, count)
    configs = [w.trial_config(batch_size, sparsity, p, seed=i) for i, p in enumerate(params)]
    return configs, [engine.shared_mask(tmp_path, c) for c in configs]


def single(config, mask, store, callbacks=()):
    """The oracle: the trial through the single path, its status, end step and metrics."""
    outcome = run(config, store=store, mask=mask, progress=None, callbacks=list(callbacks))
    return outcome.status, outcome.results["steps"], store.metrics(outcome.key)


def check_equal(configs, masks, tmp_path, callbacks=lambda i: ()):
    """Each packed trial against its single run; returns the statuses."""
    store = RunStore(tmp_path / "oracle")
    alone = [single(c, m, store, callbacks(i)) for i, (c, m) in enumerate(zip(configs, masks))]
    results = packed.train_pack([packed.Member(c, m, list(callbacks(i))) for i, (c, m) in
                                 enumerate(zip(configs, masks))])
    for (status, steps, metrics), result, config in zip(alone, results, configs):
        where = f"trial seed {config.seed} lr {config.train.lr:g}"
        assert (result.status, result.steps) == (status, steps), where
        for name in ("val_error", "val_loss", "train_loss", "train_error", "lr", "test_error"):
            want, got = metrics.get(name, []), result.curves.get(name, [])
            assert [s for s, _ in got] == [s for s, _ in want], (where, name)
            for (_, a), (_, b) in zip(want, got):
                if name == "val_error" or name == "test_error":
                    assert abs(a - b) <= 1e-5, (where, name, want, got)
                elif math.isfinite(a):
                    assert b == pytest.approx(a, rel=1e-4, abs=1e-6), (where, name, want, got)
                else:
                    assert not math.isfinite(b), (where, name)
    return [r.status for r in results], [r.steps for r in results]


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_packed_sgd_equals_single_with_goal_and_early_stop(tmp_path, sparsity):
    w = workload(tmp_path, iterations=60)
    configs, masks = trials_of(w, tmp_path, sparsity, 4)

    def early(i):  # odd trials see a best K* of 30 for their point
        return [watch(30, w.goal_error)] if i % 2 else []

    statuses, steps = check_equal(configs, masks, tmp_path, callbacks=early)
    assert "stopped" in statuses and "finished" in statuses  # goal or early stop; budget spent
    assert any(s < 60 for s in steps) and any(s == 60 for s in steps)


@pytest.mark.parametrize("nesterov", [False, True])
def test_packed_momentum_and_nesterov_with_per_trial_schedules(tmp_path, nesterov):
    w = workload(tmp_path, momentum=0.9, nesterov=nesterov, schedule="linear", weight_decay=1e-3, goal=0.05,
                 iterations=60)
    assert w.search == ("learning_rate", "momentum", "decay_steps", "end_learning_rate_factor")
    params = [{"learning_rate": lr, "momentum": mu, "decay_steps": d, "end_learning_rate_factor": e}
              for lr, mu, d, e in [(0.01, 0.9, 40, 0.1), (0.003, 0.99, 70, 0.01), (0.03, 0.95, 20, 0.5),
                                   (0.001, 0.999, 90, 0.001)]]
    configs, masks = trials_of(w, tmp_path, 0.5, 4, params)
    assert {c.train.schedule for c in configs} == {"linear-then-constant"}
    check_equal(configs, masks, tmp_path, callbacks=lambda i: [watch(50, w.goal_error)])


def test_packed_convolutional_network_sparse(tmp_path):
    w = workload(tmp_path, model="simple-cnn", shape=(1, 16, 16), iterations=30, goal=0.02)
    configs, masks = trials_of(w, tmp_path, 0.5, 3)
    check_equal(configs, masks, tmp_path)


class Cubic(nn.Module):
    """A linear classifier with cubed logits: its gradient grows with its weights, so a large
    learning rate diverges (the loss NaN) within a few steps while a small one trains."""

    def __init__(self, *, input_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        return 10 * self.fc(x.flatten(1)) ** 3  # (B, classes)


@pytest.fixture
def cubic_model():
    MODELS.register("packed-test-cubic")(Cubic)  # for this test only (not in the model listings)
    yield "packed-test-cubic"
    MODELS.unregister("packed-test-cubic")


def test_a_diverging_trial_leaves_the_pack_as_it_would_alone(tmp_path, cubic_model):
    w = workload(tmp_path, model=cubic_model, iterations=60, goal=0.02)
    configs, masks = trials_of(w, tmp_path, 0.0, 3)  # learning rates 0.01, 0.1, 0.001: the second diverges
    statuses, steps = check_equal(configs, masks, tmp_path)
    assert statuses.count("infeasible") >= 1 and statuses.count("finished") >= 1
    assert {s for s, st in zip(steps, statuses) if st == "infeasible"} == {50}  # the first loss check


def test_what_cannot_be_packed_is_refused_with_the_reason(tmp_path):
    w = workload(tmp_path)
    configs, _ = trials_of(w, tmp_path, 0.0, 2)
    assert packed.why_not_packable(configs) is None
    other = [configs[0], configs[1].replace(train={"batch_size": 16})]
    assert "differ in more than" in packed.why_not_packable(other)
    adam = [c.replace(train={"optimizer": "adam"}) for c in configs]
    assert "optimizer 'adam'" in packed.why_not_packable(adam)
    with pytest.raises(Exception, match="cannot be packed.*--pack 1"):
        packed.train_pack([packed.Member(c) for c in adam])
    assert "buffers" in packed.why_not_packable_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert "dropout" in packed.why_not_packable_model(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5", ""])
def test_pack_flag_refuses_what_is_not_auto_or_a_count(text, tmp_path, capsys):
    from sparsetrain.cli.main import main

    with pytest.raises(Exception, match="--pack takes auto or a whole number >= 1"):
        packed.parse_pack(text)
    assert main(["study", "work", "--dir", str(tmp_path / "s"), "--pack", text]) == 2  # before any worker starts
    assert "--pack takes auto or a whole number >= 1" in capsys.readouterr().err


def test_measure_times_a_pack_against_single_steps_and_choose_follows_the_ratio(tmp_path):
    w = workload(tmp_path)
    configs, masks = trials_of(w, tmp_path, 0.5, 3)
    measured = packed.measure([packed.Member(c, m) for c, m in zip(configs, masks)], steps=2, rounds=1,
                              check_rounds=1, val_examples=40)
    assert measured["pack"] == 3 and measured["val_examples"] == 40
    step, check = measured["step_s"], measured["check_s"]
    assert min(*step.values(), *check.values()) > 0
    assert measured["step_ratio"] == pytest.approx(step["single"] / step["pack"])  # one round: its own ratio
    assert measured["check_ratio"] == pytest.approx(check["single"] / check["pack"])
    # a trial's time per check interval (10 steps here) and one check of the 60 validation examples
    assert measured["ratio"] == pytest.approx((10 * step["single"] + check["single"]) / (10 * step["pack"] + check["pack"]))
    assert check["pack"] > 0 and measured["threads"] >= 1
    assert packed.choose({**measured, "ratio": packed.PAYS}) == 3
    assert packed.choose({**measured, "ratio": packed.PAYS * 0.99}) == 1


# ----------------------------------------------------------------------------- in the engine


def study_spec(w, **changes):
    settings = {"batch_sizes": (8, 32), "sparsities": (0.5,), "trials": 4, "heartbeat_interval": 1,
                "grace_period": 3, **changes}
    return engine.StudySpec((w,), **settings)


def work(folder, pack):
    """Work the study in ``folder`` to its end in this process with ``--pack pack``."""
    return engine.work_loop(folder, pack=pack)


@pytest.mark.slow  # two small studies of 8 trials: ~8 s quiet, ~20 s on a loaded 2-core machine
def test_packed_study_records_every_trial_once_with_the_single_curves_and_k_star(tmp_path):
    # the oracle: the study one trial at a time without early stop (every curve whole); packed
    # with early stop, each trial's curve is a prefix of its whole one and K* is the same
    w = workload(tmp_path, shape=(1, 8, 8), iterations=50, goal=0.4)
    engine.plan(tmp_path / "single", study_spec(w, early_stop=False))
    engine.plan(tmp_path / "packed", study_spec(w))
    assert work(tmp_path / "single", 1) == 8 and work(tmp_path / "packed", 3) == 8
    single, pack = engine.outcomes(tmp_path / "single"), engine.outcomes(tmp_path / "packed")
    assert [(o.point, o.plan_index) for o in pack] == [(o.point, o.plan_index) for o in single]  # each once
    for whole, part in zip(single, pack):
        assert [s for s, _ in part.curve] == [s for s, _ in whole.curve][:len(part.curve)]
        assert all(abs(e - f) <= 1e-5 for (_, e), (_, f) in zip(whole.curve, part.curve))
        if part.status == "stopped":  # early stop: it would not have reached the goal by its stop step
            assert whole.status != "complete" or whole.steps_to_result > part.curve[-1][0]
        else:
            assert (part.status, part.steps_to_result) == (whole.status, whole.steps_to_result)
    assert {o.status for o in pack} >= {"complete", "stopped"} and {o.status for o in single} >= {"incomplete"}
    assert {p: steps(single, p) for p in points(single)} == {p: steps(pack, p) for p in points(pack)}
    best_single, best_pack = engine.best_trials(single), engine.best_trials(pack)
    assert {p: o.plan_index for p, o in best_single.items()} == {p: o.plan_index for p, o in best_pack.items()}
    runs = RunStore(tmp_path / "packed" / "runs").list()
    assert len(runs) == 8 and {r.group_name for r in runs} == {"packed"}
    assert sorted(r.results.get("packed", 1) for r in runs) == [1] * 2 + [3] * 6  # 4 trials a point: 3 + 1
    rows = engine.status_rows(tmp_path / "packed")
    assert all(r["finished"] == 4 and r["running"] == r["waiting"] == r["failed_attempts"] == 0 for r in rows)
    assert [r["packing"] for r in rows] == ["3 (asked)"] * 2


def points(outcomes):
    return sorted({o.point for o in outcomes})


def steps(outcomes, point):
    from sparsetrain.study.outcome import steps_to_result

    return steps_to_result([o for o in outcomes if o.point == point])


def test_auto_packs_only_where_the_measured_ratio_pays_and_records_it(tmp_path, monkeypatch):
    measured = []

    def fake_measure(members, **kw):  # pays at B = 8, not at B = 32
        measured.append((members[0].config.train.batch_size, len(members)))
        ratio = 3.0 if members[0].config.train.batch_size == 8 else 0.5
        return {"pack": len(members), "steps": 3, "rounds": 5, "pack_s": 1.0, "single_s": ratio, "ratio": ratio}

    monkeypatch.setattr(packed, "measure", fake_measure)
    w = workload(tmp_path, iterations=30)
    folder = tmp_path / "study"
    engine.plan(folder, study_spec(w, trials=2, early_stop=False))
    assert work(folder, "auto") == 4
    assert measured == [(8, 2), (32, 2)]  # once a point (2 trials planned), then read back
    rows = engine.status_rows(folder)
    assert [r["finished"] for r in rows] == [2, 2]
    assert [r["packing"] for r in rows] == ["2 (measured 3.00x)", "1 (measured 0.50x)"]
    runs = RunStore(folder / "runs").list()
    assert sorted(r.results.get("packed", 1) for r in runs) == [1, 1, 2, 2]


class Normed(nn.Module):
    """A linear classifier after batch norm: running statistics, which a pack does not keep per trial."""

    def __init__(self, *, input_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        self.norm = nn.BatchNorm1d(math.prod(input_shape))
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        return self.fc(self.norm(x.flatten(1)))


class Recurrent(nn.Module):
    """A GRU over the image's rows: torch's fused GRU kernel has no vmap batching rule."""

    def __init__(self, *, input_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        self.gru = nn.GRU(input_shape[-1], 8, batch_first=True)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        out, _ = self.gru(x.flatten(1, 2))  # (B, rows, 8)
        return self.fc(out[:, -1])


@pytest.fixture(params=[(Normed, "1 (Normed has buffers (e.g. batch norm's running statistics))"),
                        (Recurrent, "1 (vmap cannot train it (RuntimeError: Batching rule not implemented for "
                                    "aten::gru.input")], ids=["batch-norm", "gru"])
def unpackable(request):
    model, shown = request.param
    MODELS.register("packed-test-unpackable")(model)  # for this test only (not in the model listings)
    yield "packed-test-unpackable", shown
    MODELS.unregister("packed-test-unpackable")


def test_a_network_that_cannot_be_packed_runs_one_trial_at_a_time_with_the_reason(tmp_path, unpackable):
    model, shown = unpackable
    w = workload(tmp_path, model=model, iterations=20)
    folder = tmp_path / "study"
    engine.plan(folder, study_spec(w, batch_sizes=(8,), trials=2, early_stop=False))
    assert work(folder, 2) == 2
    [row] = engine.status_rows(folder)
    assert row["finished"] == 2 and row["packing"].startswith(shown)
    assert all("packed" not in r.results for r in RunStore(folder / "runs").list())


def test_a_worker_process_body_takes_pack_from_its_command_line(tmp_path):
    w = workload(tmp_path, iterations=20)
    folder = tmp_path / "study"
    engine.plan(folder, study_spec(w, batch_sizes=(8,), trials=3, early_stop=False))
    engine._worker_main(str(folder), "", "", "", "3")  # what `study work --pack 3` hands each worker
    assert sorted(r.results.get("packed") for r in RunStore(folder / "runs").list()) == [3, 3, 3]


def interrupt_pack_at(monkeypatch, at: int):
    """Ctrl-C in the middle of a pack, as its step ``at`` begins; returns the real step."""
    step = packed.Pack.step

    def interrupted(self, n):
        if n == at:
            raise KeyboardInterrupt
        return step(self, n)

    monkeypatch.setattr(packed.Pack, "step", interrupted)
    return step


def counted(monkeypatch, module, name):
    """Count the calls of ``module.name`` (still calling it)."""
    real, calls = getattr(module, name), []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize("at, resumed_from", [(15, 0), (45, 40)], ids=["before-a-checkpoint", "after-two"])
def test_an_interrupted_pack_gives_its_trials_back_and_they_resume_from_their_checkpoints(
        tmp_path, monkeypatch, at, resumed_from):
    # the workload checkpoints every 20 steps: interrupted at step 15 nothing is kept, and the retries
    # are packed again from the start; at step 45 each trial's checkpoint of step 40 is its single
    # run's, and the retries resume there through the single loop (20 steps each, no packed step)
    from sparsetrain.train import loop

    w = workload(tmp_path, iterations=60)
    folder = tmp_path / "study"
    engine.plan(folder, study_spec(w, batch_sizes=(8,), trials=3, early_stop=False))
    step = interrupt_pack_at(monkeypatch, at)
    with pytest.raises(KeyboardInterrupt):
        work(folder, 3)
    store = RunStore(folder / "runs")
    assert sorted(r.status for r in store.list()) == ["interrupted"] * 3
    monkeypatch.setattr(packed.Pack, "step", step)
    packed_steps = counted(monkeypatch, packed.Pack, "step")
    single_steps = counted(monkeypatch, loop, "forward_loss")
    assert work(folder, 3) == 3  # the retries
    assert len(single_steps) == (3 * (60 - resumed_from) if resumed_from else 0)
    assert len(packed_steps) == (0 if resumed_from else 60)  # (the point's pack size is recorded: no probe)
    [row] = engine.status_rows(folder)
    assert (row["finished"], row["failed_attempts"], row["waiting"], row["running"]) == (3, 3, 0, 0)
    configs, masks = trials_of(w, folder, 0.5, 3, batch_size=8)
    alone = packed.train_pack([packed.Member(c, m) for c, m in zip(configs, masks)])
    for o, result in zip(engine.outcomes(folder), alone):  # whole, and nothing left of the first attempt
        want = result.curves["val_error"]
        assert [s for s, _ in o.curve] == [s for s, _ in want]
        assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(o.curve, want))


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, True)], ids=["sgd", "nesterov"])
def test_a_packed_trials_checkpoint_is_the_one_its_single_run_writes(tmp_path, momentum, nesterov):
    # the oracle: the single loop's own checkpoint file, written by sparsetrain.run at step 40
    # (interrupted as step 41 ends) and at the end (step 60: the final weights); each trial's packed
    # checkpoints there must hold the same: weights, SGD's momentum buffers and groups, the
    # schedule, the running training loss (popped at 40 and 60: empty), the best check, the
    # generator's state
    from sparsetrain.state_io import load_state

    class StopAt41:
        def on_step(self, step, loss):
            if step == 41:
                raise KeyboardInterrupt

        def on_eval(self, step, metrics):
            return None

    w = workload(tmp_path, momentum=momentum, nesterov=nesterov, schedule="linear", weight_decay=1e-3,
                 iterations=60, goal=0.001)  # (4x4 images: a goal never reached)
    params = plan_points(w.search, 2)
    configs, masks = trials_of(w, tmp_path, 0.5, 2, params)
    handed: dict[int, dict] = {}
    members = [packed.Member(c, m, on_checkpoint=lambda step, state, i=i: handed.setdefault(i, {}).update(
        {step: state})) for i, (c, m) in enumerate(zip(configs, masks))]
    packed.train_pack(members)
    assert all(sorted(handed[i]) == [20, 40, 60] for i in range(2))  # every checkpoint_every, and the end
    for step, stop in ((40, [StopAt41()]), (60, [])):
        store = RunStore(tmp_path / f"oracle-{step}")
        for i, (config, mask) in enumerate(zip(configs, masks)):
            if stop:
                with pytest.raises(KeyboardInterrupt):
                    run(config, store=store, mask=mask, progress=None, callbacks=stop)
            else:
                assert run(config, store=store, mask=mask, progress=None).results["steps"] == 60
            [record] = [r for r in store.list() if r.seed == config.seed]
            want = load_state(store.artifact_dir(record.key) / "checkpoint.safetensors")
            got = load_state_roundtrip(tmp_path, handed[i][step])
            assert set(got) == set(want)
            assert_same(got, want, where=f"trial {i} step {step}")


def load_state_roundtrip(tmp_path, state):
    """``state`` as the single loop reads it back from a file."""
    from sparsetrain.state_io import load_state, save_state

    save_state(tmp_path / "handed.safetensors", state)
    return load_state(tmp_path / "handed.safetensors")


def assert_same(got, want, where):
    """Nested structures equal: tensors to float rounding (the pack's batched kernels sum in
    another order), floats to 1e-6 relative, everything else exactly; ``seconds`` is wall time."""
    import torch

    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            if k != "seconds":
                assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for n, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{n}]")
    elif isinstance(want, torch.Tensor):
        assert got.shape == want.shape and got.dtype == want.dtype, where
        assert torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-6), where
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), where
    else:
        assert got == want, where


def test_an_error_in_a_pack_fails_its_trials_as_one_at_a_time_does(tmp_path, monkeypatch):
    import optuna

    w = workload(tmp_path, iterations=20)
    folder = tmp_path / "study"
    engine.plan(folder, study_spec(w, batch_sizes=(8,), trials=2, early_stop=False))

    step = packed.Pack.step

    def broken(self, n):
        if n == 5:  # (after the check that the network packs, which takes step 1)
            raise RuntimeError("device lost")
        return step(self, n)

    monkeypatch.setattr(packed.Pack, "step", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        work(folder, 2)
    trials = optuna.load_study(study_name="workload/b8/s0.5", storage=engine.open_storage(
        folder, engine.load_spec(folder))).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2  # not retried: plan enqueues them again
    assert all(t.user_attrs["error"] == "RuntimeError: device lost" for t in trials)
    assert sorted(r.status for r in RunStore(folder / "runs").list()) == ["failed"] * 2
