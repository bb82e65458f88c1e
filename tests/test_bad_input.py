"""What a user can get wrong is refused with a message that says what and what to do: the CLI
exits 2 without a traceback, the API raises SparsetrainError, and nothing is recorded or created.

Covered: config values out of range (CLI flags, --set, recipes, the API), the training length, a
data root that does not exist, --device, prune --out, targets outside the model's classes, targets
of another length, and inputs without targets."""

from __future__ import annotations

import pytest
import torch

from sparsetrain import PruneConfig, RunConfig, SparsetrainError, TrainConfig, create_loaders, create_model, run, train
from sparsetrain.cli.main import main
from sparsetrain.pruning import prune_at_init
from sparsetrain.train.loop import resolve_device

TINY = ["--dataset", "synthetic", "--model", "mlp-tiny", "--no-progress"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- config values ---------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

# (section, field, bad value, the words that finish "<section>.<field> must be ...")
OUT_OF_RANGE = [
    ("train", "lr", 0.0, "a positive finite number"),
    ("train", "lr", -0.1, "a positive finite number"),
    ("train", "lr", NAN, "a positive finite number"),
    ("train", "lr", INF, "a positive finite number"),
    ("train", "momentum", 1.0, "a fraction in [0, 1)"),
    ("train", "momentum", -0.5, "a fraction in [0, 1)"),
    ("train", "weight_decay", -1e-4, "a finite number >= 0"),
    ("train", "weight_decay", NAN, "a finite number >= 0"),
    ("train", "batch_size", 0, "a positive whole number"),
    ("train", "iterations", -5, "a positive whole number (or 0 when train.epochs gives the length)"),
    ("train", "epochs", -1.0, "a positive finite number (or 0 when train.iterations gives the length)"),
    ("train", "epochs", NAN, "a positive finite number (or 0 when train.iterations gives the length)"),
    ("train", "val_fraction", 1.0, "a fraction in [0, 1)"),
    ("train", "val_fraction", -0.1, "a fraction in [0, 1)"),
    ("train", "decay_every", 0, "a positive whole number"),
    ("train", "decay_factor", 0.0, "a positive finite number"),
    ("train", "end_lr_factor", -0.1, "a finite number >= 0"),
    ("train", "val_every", -1, "a whole number >= 0"),
    ("train", "checkpoint_every", -1, "a whole number >= 0"),
    ("train", "goal_error", 1.0, "a fraction in [0, 1)"),
    ("prune", "sparsity", 1.0, "a fraction in [0, 1)"),
    ("prune", "sparsity", -0.1, "a fraction in [0, 1)"),
    ("prune", "sparsity", NAN, "a fraction in [0, 1)"),
    ("prune", "batches", -1, "a whole number >= 0"),
    ("prune", "rounds", 0, "a positive whole number"),
]


def _id(case):
    section, name, value, _ = case
    return f"{section}.{name}={value}"


@pytest.mark.parametrize("case", OUT_OF_RANGE, ids=[_id(c) for c in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_in_every_way_a_config_is_made(case):
    section, name, value, words = case
    expected = f"{section}.{name} must be {words}; got {value!r}"
    cls = {"train": TrainConfig, "prune": PruneConfig}[section]
    with pytest.raises(SparsetrainError) as direct:
        cls(**{name: value})
    with pytest.raises(SparsetrainError) as replaced:
        RunConfig().replace(**{section: {name: value}})
    with pytest.raises(SparsetrainError) as read:
        RunConfig.from_dict({section: {name: value}})
    for info in (direct, replaced, read):
        assert str(info.value) == expected


def test_values_at_the_edges_of_their_ranges_are_accepted():
    TrainConfig(momentum=0.0, weight_decay=0.0, val_fraction=0.0, end_lr_factor=0.0, val_every=0,
                checkpoint_every=0, batch_size=1, lr=1e-12, epochs=0.5)
    PruneConfig(sparsity=0.0, batches=0, rounds=1)
    PruneConfig(sparsity=0.999999)


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "nan"], "train.lr must be a positive finite number; got nan"),
    (["--lr", "0"], "train.lr must be a positive finite number; got 0.0"),
    (["--momentum", "1"], "train.momentum must be a fraction in [0, 1); got 1.0"),
    (["--batch-size", "0"], "train.batch_size must be a positive whole number; got 0"),
    (["--weight-decay", "-0.1"], "train.weight_decay must be a finite number >= 0; got -0.1"),
    (["--val-fraction", "1"], "train.val_fraction must be a fraction in [0, 1); got 1.0"),
    (["--sparsity", "1"], "prune.sparsity must be a fraction in [0, 1); got 1.0"),
    (["--set", "train.lr=nan"], "train.lr must be a positive finite number; got nan"),
    (["--iterations", "-5"], "train.iterations must be a positive whole number"),
    (["--epochs", "-1"], "train.epochs must be a positive finite number"),
    (["--iterations", "0"], "the training length must be positive"),
    (["--epochs", "0"], "the training length must be positive"),
])
def test_the_cli_refuses_bad_values_before_anything_is_recorded(capsys, tmp_path, flags, needle):
    store = tmp_path / "store"
    length = [] if {"--iterations", "--epochs"} & set(flags) else ["--iterations", "10"]
    code, out, err = cli(capsys, "run", *TINY, *length, *flags, "--store", store)
    assert code == 2, err
    assert err.startswith("sparsetrain run: error: ") and needle in err
    assert "Traceback" not in err and out == ""
    assert not store.exists()  # no record, not even the store's folder


def test_a_recipe_with_a_bad_value_is_refused(capsys, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('model = "mlp-tiny"\ndataset = "synthetic"\n[train]\niterations = 10\nlr = -0.1\n')
    store = tmp_path / "store"
    code, _, err = cli(capsys, "run", "--recipe", recipe, "--store", store, "--no-progress")
    assert code == 2 and f"recipe {recipe}: train.lr must be a positive finite number; got -0.1" in err
    assert not store.exists()


def test_the_api_refuses_a_zero_length_before_recording(tmp_path):
    from sparsetrain.store import RunStore

    store = RunStore(tmp_path / "store")
    config = RunConfig(model="mlp-tiny", dataset="synthetic")  # neither iterations nor epochs
    with pytest.raises(SparsetrainError, match="the training length must be positive"):
        run(config, store=store, progress=False)
    assert list(store.list()) == []


# --- the data root ---------------------------------------------------------------------------------

@pytest.mark.parametrize("download", [True, False])
def test_a_data_root_that_does_not_exist_is_not_created(tmp_path, download):
    root = tmp_path / "nonexistent" / "data"
    with pytest.raises(SparsetrainError) as info:
        create_loaders("mnist", data_dir=root, download=download)
    assert str(info.value) == f"data root {root} does not exist; create it or pass an existing --data-dir"
    assert not (tmp_path / "nonexistent").exists()


def test_a_data_root_from_the_environment_must_exist(tmp_path, monkeypatch):
    root = tmp_path / "missing"
    monkeypatch.setenv("SPARSETRAIN_DATA", str(root))
    with pytest.raises(SparsetrainError, match=r"does not exist; create it or point \$SPARSETRAIN_DATA at"):
        create_loaders("mnist")
    assert not root.exists()


def test_a_data_root_that_exists_gets_only_the_data_sets_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(SparsetrainError, match="Downloading"):  # the mirrors are dead in tests
        create_loaders("mnist", data_dir=root)
    assert [p.name for p in root.iterdir()] == ["mnist"]


def test_the_cli_names_a_missing_data_root(capsys, tmp_path):
    root = tmp_path / "nonexistent" / "data"
    code, _, err = cli(capsys, "prune", "--dataset", "mnist", "--data-dir", root, "--out", tmp_path / "m.safetensors",
                       "--no-progress")
    assert code == 2 and f"data root {root} does not exist; create it or pass an existing --data-dir" in err
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "m.safetensors").exists()


# --- devices ---------------------------------------------------------------------------------------

def test_an_unknown_device_is_refused():
    with pytest.raises(SparsetrainError, match="unknown device 'gpu': use cpu, cuda or cuda:N"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_refused(capsys, tmp_path):
    expected = f"CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SparsetrainError) as info:
            resolve_device(device)
        assert str(info.value) == expected
    code, _, err = cli(capsys, "prune", *TINY, "--device", "cuda", "--out", tmp_path / "m.safetensors")
    assert code == 2 and expected in err and "Traceback" not in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_last_is_refused():
    count = torch.cuda.device_count()
    with pytest.raises(SparsetrainError, match=f"this machine has {count} CUDA device"):
        resolve_device(f"cuda:{count}")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_the_cli_refuses_an_unknown_device(capsys, tmp_path):
    code, out, err = cli(capsys, "prune", *TINY, "--device", "gpu", "--out", tmp_path / "m.safetensors")
    assert code == 2 and "unknown device 'gpu'" in err and "Traceback" not in err
    assert cli(capsys, "prune", *TINY, "--out", tmp_path / "m.safetensors")[0] == 0
    store = tmp_path / "store"
    code, out, err = cli(capsys, "train", *TINY, "--iterations", "5", "--device", "gpu", "--mask",
                         tmp_path / "m.safetensors", "--store", store)
    assert code == 2 and "unknown device 'gpu'" in err and "Traceback" not in err
    assert not store.exists()  # refused before a run was recorded


# --- prune --out -----------------------------------------------------------------------------------

def test_prune_out_naming_a_folder_or_a_path_through_a_file_is_refused(capsys, tmp_path):
    code, _, err = cli(capsys, "prune", *TINY, "--out", tmp_path)
    assert code == 2 and f"--out {tmp_path} is a folder" in err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    code, _, err = cli(capsys, "prune", *TINY, "--out", a_file / "sub" / "m.safetensors")
    assert code == 2 and f"{a_file} is a file, not a folder" in err and "Traceback" not in err
    assert a_file.read_text() == "keep me"
    code, out, err = cli(capsys, "prune", *TINY, "--out", tmp_path / "new" / "deeper" / "m.safetensors")
    assert code == 0 and (tmp_path / "new" / "deeper" / "m.safetensors").is_file()  # missing folders are made


# --- batches ---------------------------------------------------------------------------------------

def inputs_and_labels(n=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % classes


def test_a_label_outside_the_models_classes_is_refused_in_pruning():
    model = create_model("mlp-tiny")  # 10 outputs
    x, y = inputs_and_labels()
    y[3] = 10
    with pytest.raises(SparsetrainError) as info:
        prune_at_init(model, "snip", sparsity=0.9, batches=(x, y))
    assert str(info.value).startswith("targets must be class indices 0..9 for this model's 10 outputs; got 10")
    y[3] = -2
    with pytest.raises(SparsetrainError, match="class indices 0..9 .* got -2"):
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.9, batches=(x, y))


def test_a_bad_label_in_a_later_batch_is_explained_too():
    model = create_model("mlp-tiny")
    x, y = inputs_and_labels()
    bad = y.clone()
    bad[0] = 12
    with pytest.raises(SparsetrainError, match="class indices 0..9 for this model's 10 outputs; got 12"):
        prune_at_init(model, "snip", sparsity=0.9, batches=[(x, y), (x, bad)])


def test_a_label_outside_the_models_classes_is_refused_in_training():
    loaders = create_loaders("synthetic", batch_size=20, data_args={"n_train": 60, "n_test": 20, "num_classes": 12})
    model = create_model("mlp-tiny")  # 10 outputs for a 12-class data set
    with pytest.raises(SparsetrainError) as info:
        train(model, loaders, TrainConfig(iterations=3, val_every=0, checkpoint_every=0), progress=False)
    assert str(info.value).startswith("targets must be class indices 0..9 for this model's 10 outputs; got ")


def test_the_ignore_index_and_probability_targets_are_accepted():
    model = create_model("mlp-tiny")
    x, y = inputs_and_labels()
    y[0] = -100  # cross-entropy's "ignore"
    prune_at_init(model, "snip", sparsity=0.9, batches=(x, y))
    probabilities = torch.softmax(torch.randn(8, 10), 1)
    prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.9, batches=(x, probabilities))


def test_targets_of_another_length_are_refused():
    x, y = inputs_and_labels()
    with pytest.raises(SparsetrainError, match=r"the batch has 8 inputs but 5 targets"):
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.9, batches=(x, y[:5]))


@pytest.mark.parametrize("batches, shown", [
    (lambda x, y: x, "got a tensor of shape (1, 28, 28)"),        # iterating the inputs gives examples
    (lambda x, y: (x,), "got a tensor of shape (8, 1, 28, 28)"),  # a 1-tuple is iterated as a list
    (lambda x, y: [(x,)], "got a tuple of 1 item(s)"),
    (lambda x, y: (x, None), "has inputs but no targets (None)"),
])
def test_inputs_without_targets_are_refused(batches, shown):
    x, y = inputs_and_labels()
    with pytest.raises(SparsetrainError) as info:
        prune_at_init(create_model("mlp-tiny"), "snip", sparsity=0.9, batches=batches(x, y))
    message = str(info.value)
    assert shown in message and "(inputs, targets)" in message


def test_inputs_without_targets_are_refused_in_training():
    from sparsetrain.data.loaders import Loaders

    loaders = create_loaders("synthetic", batch_size=20, data_args={"n_train": 60, "n_test": 20})

    class InputsOnly:
        steps_per_epoch = 3

        def iter_from(self, step):
            while True:
                yield (torch.randn(20, 1, 28, 28),)

    bare = Loaders(InputsOnly(), None, loaders.test, loaders.input_shape, loaders.num_classes, "inputs-only")
    with pytest.raises(SparsetrainError, match=r"must be an \(inputs, targets\) pair"):
        train(create_model("mlp-tiny"), bare, TrainConfig(iterations=2, val_every=0, checkpoint_every=0),
              progress=False)


def test_the_cli_refuses_labels_outside_the_models_classes(capsys, tmp_path, monkeypatch):
    """A data set whose labels go past its declared classes (a mislabelled copy) stops pruning and
    training with the message, not a traceback."""
    from sparsetrain.data import DATASETS
    from sparsetrain.data.base import DatasetSpec, RawData
    from sparsetrain.data.synthetic import make_synthetic

    def mislabelled(data_dir=None, download=True, args=None):
        raw = make_synthetic(60, 20)
        train_y = raw.train_y.clone()
        train_y[:] = 10  # every label is one past the last of 10 classes
        return RawData(raw.train_x, train_y, raw.test_x, raw.test_y, 10)

    monkeypatch.setitem(DATASETS._entries, "mislabelled", DatasetSpec("mislabelled", mislabelled))
    argv = ["--dataset", "mislabelled", "--model", "mlp-tiny", "--no-progress", "--batch-size", "10"]
    code, _, err = cli(capsys, "prune", *argv, "--out", tmp_path / "m.safetensors")
    assert code == 2 and "targets must be class indices 0..9 for this model's 10 outputs; got 10" in err
    assert "Traceback" not in err and not (tmp_path / "m.safetensors").exists()
    code, _, err = cli(capsys, "run", *argv, "--method", "random", "--iterations", "3", "--store", tmp_path / "s")
    assert code == 2 and "targets must be class indices 0..9 for this model's 10 outputs; got 10" in err
