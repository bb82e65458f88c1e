"""Tests for data set arguments (sparsetrain.data.args / base) and per-channel standardisation."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from sparsetrain.options import describe_options
import torch

from sparsetrain.data import (
    AugmentedImageArgs,
    ImageArgs,
    SyntheticArgs,
    create_loaders,
    dataset_args,
    dataset_spec,
    list_datasets,
    load_dataset,
    make_synthetic,
    preprocess,
)
from sparsetrain.errors import SparsetrainError

# ---------------------------------------------------------------------------------------------
# Every registered data set declares its arguments


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_declares_frozen_documented_args(name):
    spec = dataset_spec(name)
    assert dataclasses.is_dataclass(spec.args) and spec.args.__dataclass_params__.frozen
    assert issubclass(spec.args, ImageArgs)  # every data set so far is an image data set: it takes view
    hints = typing.get_type_hints(spec.args)
    for f in dataclasses.fields(spec.args):
        assert f.default is not dataclasses.MISSING, f"{name}.{f.name} needs a default"
        assert f.metadata.get("help"), f"{name}.{f.name} needs a help string"
        assert f.name in hints
    assert dataset_args(name) == spec.args() == dataset_args(name, {})
    assert spec.summary


def test_mnist_takes_view_and_random_labels_and_nothing_else():
    for name in ("mnist", "fashion-mnist"):
        assert [f.name for f in dataclasses.fields(dataset_spec(name).args)] == ["view", "random_labels"]


def test_synthetic_args_defaults_reproduce_todays_data():
    assert dataset_args("synthetic") == SyntheticArgs(
        view="image", random_labels=False, n_train=600, n_test=200, shape=(1, 28, 28), num_classes=10, seed=0
    )
    raw, today = load_dataset("synthetic"), make_synthetic(600, 200)
    assert torch.equal(raw.train_x, today.train_x) and torch.equal(raw.test_y, today.test_y)


def test_synthetic_args_from_toml_values():
    values = {"n_train": 40, "n_test": 8, "shape": [3, 8, 8], "num_classes": 4, "seed": 2}  # as TOML reads them
    args = dataset_args("synthetic", values)
    assert args.shape == (3, 8, 8) and isinstance(args.shape, tuple)
    raw = load_dataset("synthetic", args=values)
    expected = make_synthetic(40, 8, (3, 8, 8), 4, seed=2)
    assert torch.equal(raw.train_x, expected.train_x) and torch.equal(raw.test_x, expected.test_x)
    loaders = create_loaders("synthetic", batch_size=8, data_args={"n_train": 40, "shape": [3, 8, 8]})
    assert loaders.input_shape == (3, 8, 8) and loaders.train.num_examples == 36
    assert loaders.args == dataset_args("synthetic", {"n_train": 40, "shape": (3, 8, 8)})


def test_args_instance_and_json_round_trip():
    args = dataset_args("synthetic", {"shape": [2, 4, 4]})
    assert dataset_args("synthetic", args) is args
    assert dataset_args("synthetic", dataclasses.asdict(args)) == args  # asdict -> JSON/TOML -> back


def test_describe_args_for_help_texts():
    rows = {line.split(" ")[0]: line for line in describe_options(SyntheticArgs)}
    assert rows["n_train"].startswith("n_train (an int) = 600")
    assert rows["shape"].startswith("shape (a list of ints) = (1, 28, 28)")
    assert "prototypes" in rows["seed"]
    assert [line.split(" ")[0] for line in describe_options(AugmentedImageArgs)] == ["view", "random_labels", "random_crop", "flip"]


# ---------------------------------------------------------------------------------------------
# Bad data args: clear errors


def test_unknown_data_arg_lists_valid_keys():
    with pytest.raises(SparsetrainError, match="unknown data arg 'n_trian'") as info:
        dataset_args("synthetic", {"n_trian": 5})
    for key in ("view", "n_train", "n_test", "shape", "num_classes", "seed"):
        assert key in str(info.value)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"n_train": "600"}, "'n_train' of data set 'synthetic' must be an int, got '600'"),
        ({"n_train": 6.0}, "must be an int"),
        ({"n_train": True}, "must be an int"),  # a bool is not a count
        ({"shape": 28}, "'shape' .* must be a list of ints"),
        ({"shape": [1, "28", 28]}, "must be a list of ints"),
        ({"view": 3}, "'view' .* must be one of 'image', 'rows', 'pixels', got 3"),
    ],
)
def test_wrong_type_names_the_expected_type(values, match):
    with pytest.raises(SparsetrainError, match=match):
        dataset_args("synthetic", values)


def test_unknown_view_lists_views():
    with pytest.raises(SparsetrainError, match="'view' .* must be one of 'image', 'rows', 'pixels', got 'columns'"):
        create_loaders("synthetic", data_args={"view": "columns"})


def test_transform_on_a_dataset_without_one_is_refused_before_loading(tmp_path):
    # No MNIST files in tmp_path and downloads off: the args are refused first, by name.
    for key, value in (("flip", True), ("random_crop", 4)):
        with pytest.raises(SparsetrainError, match=f"'mnist' has no train-time transform '{key}'") as info:
            create_loaders("mnist", data_dir=tmp_path, download=False, data_args={key: value})
        assert "valid data args for 'mnist': view" in str(info.value)


def test_data_args_must_be_a_table():
    with pytest.raises(SparsetrainError, match="must be a table"):
        dataset_args("synthetic", ["view", "rows"])


def test_bad_synthetic_values_are_refused():
    with pytest.raises(SparsetrainError, match="n_train >= 1"):
        create_loaders("synthetic", data_args={"n_train": 0})


def test_unknown_dataset_in_dataset_args():
    with pytest.raises(SparsetrainError, match="unknown dataset 'mnsit'.*'mnist'"):
        dataset_args("mnsit", {})


def test_negative_random_crop_is_refused():
    with pytest.raises(SparsetrainError, match="random_crop"):
        AugmentedImageArgs(random_crop=-1)


# ---------------------------------------------------------------------------------------------
# Per-channel standardisation


def test_one_channel_statistics_are_todays_scalar_ones_bit_for_bit():
    raw = make_synthetic(10, 4)
    raw.train_x = torch.randint(0, 256, (300, 1, 7, 5), dtype=torch.uint8)
    raw.test_x = torch.randint(0, 256, (40, 1, 7, 5), dtype=torch.uint8)
    train_x, test_x, mean, std = preprocess(raw)
    # Today's recipe, written out: scalar statistics of all training pixels, applied in place.
    old_train, old_test = raw.train_x.to(torch.float32).div_(255), raw.test_x.to(torch.float32).div_(255)
    old_std, old_mean = (float(v) for v in torch.std_mean(old_train, correction=0))
    for x in (old_train, old_test):
        x.sub_(old_mean).div_(old_std)
    assert isinstance(mean, float) and isinstance(std, float)
    assert (mean, std) == (old_mean, old_std)
    assert torch.equal(train_x, old_train) and torch.equal(test_x, old_test)


def test_per_channel_statistics_and_standardisation():
    raw = make_synthetic(10, 4)
    gen = torch.Generator().manual_seed(0)
    raw.train_x = torch.randint(0, 256, (200, 3, 6, 6), dtype=torch.uint8, generator=gen)
    raw.train_x[:, 1] //= 4  # channels with clearly different statistics
    raw.train_x[:, 2] = 255 - raw.train_x[:, 2] // 8
    raw.test_x = torch.randint(0, 256, (30, 3, 6, 6), dtype=torch.uint8, generator=gen)
    train_x, test_x, mean, std = preprocess(raw)
    assert isinstance(mean, tuple) and len(mean) == 3 and len(std) == 3
    pixels = raw.train_x.double() / 255
    for c in range(3):  # oracle: float64 statistics of each channel
        assert mean[c] == pytest.approx(pixels[:, c].mean().item(), rel=1e-5)
        assert std[c] == pytest.approx(pixels[:, c].std(correction=0).item(), rel=1e-5)
        assert abs(train_x[:, c].mean().item()) < 1e-5 and abs(train_x[:, c].std(correction=0).item() - 1) < 1e-4
        torch.testing.assert_close(test_x[:, c], (raw.test_x[:, c].float() / 255 - mean[c]) / std[c])
    assert len(set(round(m, 3) for m in mean)) == 3


def test_constant_channel_is_not_divided_by_zero():
    raw = make_synthetic(10, 4)
    raw.train_x = torch.zeros(20, 2, 3, 3, dtype=torch.uint8)
    raw.train_x[:, 1] = torch.randint(0, 256, (20, 3, 3), dtype=torch.uint8)
    raw.test_x = torch.zeros(5, 2, 3, 3, dtype=torch.uint8)
    train_x, _, mean, std = preprocess(raw)
    assert mean[0] == 0.0 and std[0] == 1.0 and torch.isfinite(train_x).all()


def test_loaders_report_per_channel_statistics():
    loaders = create_loaders("synthetic", batch_size=10, data_args={"n_train": 60, "shape": [3, 4, 4]})
    assert isinstance(loaders.mean, tuple) and len(loaders.mean) == 3 and len(loaders.std) == 3
    assert isinstance(create_loaders("synthetic").mean, float)


def test_real_mnist_mean_std_are_the_scalar_statistics(shared_datasets):
    loaders = create_loaders("mnist", data_dir=shared_datasets, download=False)
    pixels = load_dataset("mnist", shared_datasets, download=False).train_x.to(torch.float32).div_(255)
    std, mean = (float(v) for v in torch.std_mean(pixels, correction=0))
    assert (loaders.mean, loaders.std) == (mean, std)
    assert loaders.args == dataset_args("mnist")


# ---------------------------------------------------------------------------------------------
# Backward compatibility: today's loaders, batch for batch


def todays_loaders(raw, batch_size, val_fraction, split_seed, shuffle_seed):
    """The recipe create_loaders followed before args, views and channels, written out."""
    from sparsetrain.data import EvalLoader, TrainStream, split_train_val

    train_x = raw.train_x.to(torch.float32).div_(255) if raw.train_x.dtype == torch.uint8 else raw.train_x.clone()
    test_x = raw.test_x.to(torch.float32).div_(255) if raw.test_x.dtype == torch.uint8 else raw.test_x.clone()
    std, mean = (float(v) for v in torch.std_mean(train_x, correction=0))
    for x in (train_x, test_x):
        x.sub_(mean).div_(std)
    (tr_x, tr_y), val = split_train_val(train_x, raw.train_y, val_fraction, split_seed)
    train = TrainStream(tr_x, tr_y, batch_size, seed=shuffle_seed)
    return train, EvalLoader(*val, 1000), EvalLoader(test_x, raw.test_y, 1000), mean, std


def assert_same_as_today(name, data_dir=None):
    kwargs = dict(batch_size=100, val_fraction=0.1, split_seed=3, shuffle_seed=5)
    loaders = create_loaders(name, data_dir=data_dir, download=False, **kwargs)
    raw = load_dataset(name, data_dir, download=False)
    train, val, test, mean, std = todays_loaders(raw, **kwargs)
    assert (loaders.mean, loaders.std) == (mean, std)
    steps = train.steps_per_epoch
    for step in (0, 1, steps - 1, steps, 3 * steps + 7):
        (x, y), (xo, yo) = loaders.train.batch(step), train.batch(step)
        assert torch.equal(x, xo) and torch.equal(y, yo)
    for new, old in ((loaders.val, val), (loaders.test, test)):
        assert torch.equal(new.x, old.x) and torch.equal(new.y, old.y)


def test_synthetic_loaders_are_todays_bit_for_bit():
    assert_same_as_today("synthetic")


def test_real_mnist_loaders_are_todays_bit_for_bit(shared_datasets):
    assert_same_as_today("mnist", shared_datasets)


# ---------------------------------------------------------------------------------------------
# Helpers for configs and the command line


def test_non_default_args_keep_run_keys_stable():
    from sparsetrain.data import non_default_args

    assert non_default_args(dataset_args("synthetic")) == {}
    args = dataset_args("synthetic", {"shape": [3, 8, 8], "seed": 0, "view": "rows"})
    assert non_default_args(args) == {"shape": [3, 8, 8], "view": "rows"}
    assert dataset_args("synthetic", non_default_args(args)) == args
