"""The training loop: masked weights stay zero, schedules, resume, divergence."""


import pytest
import torch

from sparsetrain import (
    GradientMask, SparsetrainError, TrainConfig, apply_mask_, create_model, initialize_, prune_at_init, train,
)
from sparsetrain.data import make_synthetic
from sparsetrain.data.loaders import EvalLoader, Loaders, TrainStream
from sparsetrain.train.optim import build_optimizer, build_schedule, total_iterations


def loaders(n_train=200, n_test=60, batch_size=20, seed=0):
    raw = make_synthetic(n_train, n_test, shape=(1, 28, 28), seed=seed)
    return Loaders(
        train=TrainStream(raw.train_x[:160], raw.train_y[:160], batch_size, seed=seed),
        val=EvalLoader(raw.train_x[160:], raw.train_y[160:], 50),
        test=EvalLoader(raw.test_x, raw.test_y, 50),
        input_shape=(1, 28, 28), num_classes=10, name="synthetic",
    )


def pruned(model_name="conv-tiny", sparsity=0.8, seed=0):
    torch.manual_seed(seed)
    model = create_model(model_name)
    data = loaders()
    mask = prune_at_init(model, "snip", sparsity=sparsity, batches=data.train.batch(0))
    apply_mask_(model, mask)
    return model, mask, data


@pytest.mark.parametrize("optimizer,extra", [
    ("sgd", {"momentum": 0.9, "weight_decay": 5e-4}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("adam", {"weight_decay": 1e-3}),
    ("adamw", {"weight_decay": 1e-2}),
])
def test_pruned_weights_stay_exactly_zero_after_every_step(optimizer, extra):
    model, mask, data = pruned()
    params = dict(model.named_parameters())

    class CheckZero:
        def after_backward(self):
            pass

        def after_step(self):
            for n, m in mask.items():
                assert torch.count_nonzero(params[n][~m]) == 0, n

    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3, schedule="constant",
                      iterations=30, val_every=10, checkpoint_every=0, **extra)
    train(model, data, cfg, hooks=[GradientMask(model, mask), CheckZero()], progress=False)
    kept_changed = any(not torch.equal(params[n][m], params[n][m] * 0) for n, m in mask.items())
    assert kept_changed


def test_training_learns():
    model, mask, data = pruned("mlp-tiny", sparsity=0.5)
    cfg = TrainConfig(lr=0.05, schedule="constant", iterations=60, val_every=20, checkpoint_every=0)
    result = train(model, data, cfg, hooks=[GradientMask(model, mask)], progress=False)
    assert result.final_test_error < 0.3  # chance is 0.9
    assert result.best_val_step in (20, 40, 60)
    assert result.best_val_error == min(v for _, v in result.curves["val_error"])


def test_schedules_match_their_formulas():
    cfg = TrainConfig(lr=0.1, schedule="step", decay_every=25000, decay_factor=0.1, iterations=60000)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = build_schedule(opt, cfg, 60000)
    f = sched.lr_lambdas[0]
    assert [f(0), f(24999), f(25000), f(49999), f(50000)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    lin = build_schedule(opt, TrainConfig(schedule="linear", end_lr_factor=0.01), 100).lr_lambdas[0]
    assert [lin(0), lin(50), lin(100)] == pytest.approx([1, 0.505, 0.01])
    cos = build_schedule(opt, TrainConfig(schedule="cosine"), 100).lr_lambdas[0]
    assert [cos(0), cos(50), cos(100)] == pytest.approx([1, 0.5, 0], abs=1e-12)
    assert total_iterations(TrainConfig(epochs=2.5), 40) == 100
    with pytest.raises(SparsetrainError, match="exactly one of iterations or epochs"):
        total_iterations(TrainConfig(iterations=10, epochs=1), 40)


def test_seeded_training_is_bit_for_bit_reproducible():
    outs = []
    for _ in range(2):
        model, mask, data = pruned("conv-tiny")
        cfg = TrainConfig(iterations=20, val_every=10, checkpoint_every=0)
        train(model, data, cfg, hooks=[GradientMask(model, mask)], seed=5, progress=False)
        outs.append(model.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(iterations=70, val_every=10, test_every=20, checkpoint_every=25, schedule="step", decay_every=30)
    model, mask, data = pruned("conv-tiny")
    full = train(model, data, cfg, hooks=[GradientMask(model, mask)], seed=1, progress=False)
    expected = model.state_dict()

    ckpt = tmp_path / "ckpt.safetensors"
    model, mask, data = pruned("conv-tiny")

    def crash(step, values):
        if step >= 60:
            raise Interrupt  # after the checkpoint at 50, before the end

    with pytest.raises(Interrupt):
        train(model, data, cfg, hooks=[GradientMask(model, mask)], seed=1, progress=False,
              checkpoint_path=ckpt, on_metrics=crash)
    model, mask, data = pruned("conv-tiny")
    initialize_(model, "default", seed=99)  # a different start: all state must come from the checkpoint
    resumed = train(model, data, cfg, hooks=[GradientMask(model, mask)], seed=1, progress=False, checkpoint_path=ckpt)
    assert all(torch.equal(expected[k], model.state_dict()[k]) for k in expected)
    for field in ("final_test_error", "best_val_step", "best_val_error", "best_val_test_error", "min_test_error"):
        assert getattr(resumed, field) == getattr(full, field), field


def test_divergence_is_reported():
    model, mask, data = pruned("mlp-tiny")
    cfg = TrainConfig(lr=1e6, momentum=0.9, schedule="constant", iterations=100, checkpoint_every=0)
    with pytest.raises(SparsetrainError, match="diverged at iteration"):
        train(model, data, cfg, hooks=[GradientMask(model, mask)], progress=False)


def test_nonpositive_learning_rate_is_refused():
    model, mask, data = pruned("mlp-tiny")
    with pytest.raises(SparsetrainError, match=r"train\.lr must be a positive finite number; got 0\.0"):
        train(model, data, TrainConfig(lr=0.0, iterations=5), progress=False)  # refused by the config
