"""RunConfig: TOML recipes, identity keys, validation of keys and types, the bundled recipes."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from sparsetrain.recipes import list_recipes, recipe_path
from sparsetrain.config import PruneConfig, RunConfig, TrainConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.run import validate


def unusual_config() -> RunConfig:
    """Every field off its default, with values that stress the TOML writer."""
    return RunConfig(
        model="mlp-tiny",
        dataset="synthetic",
        seed=7,
        init="variance-scaling",
        prune=PruneConfig(method="random", sparsity=0.98, batches=0, include_biases=True,
                          scope="layerwise", reinit="variance-scaling-zero-bias"),
        train=TrainConfig(optimizer="adamw", lr=1e-05, momentum=0.5, nesterov=True, weight_decay=0.0,
                          schedule="cosine", decay_every=3, decay_factor=0.5, end_lr_factor=0.01,
                          iterations=123, epochs=0.0, batch_size=17, val_fraction=0.25, split_seed=3,
                          val_every=7, test_every=11, checkpoint_every=13),
        name='a "quoted" name \\ with é',
    )


@pytest.mark.parametrize("config", [RunConfig(), unusual_config()], ids=["default", "unusual"])
def test_toml_round_trip(config):
    text = config.to_toml()
    data = tomllib.loads(text)
    assert set(data) == {"model", "dataset", "seed", "init", "model_args", "data_args", "name", "prune", "train"}
    assert RunConfig.from_dict(data) == config
    # and the parsed values have TOML's natural types
    assert isinstance(data["train"]["lr"], float) and isinstance(data["train"]["iterations"], int)
    assert isinstance(data["prune"]["include_biases"], bool)


def test_from_toml_names_the_run_after_the_file(tmp_path):
    path = tmp_path / "my-recipe.toml"
    path.write_text('model = "mlp-tiny"\n[prune]\nsparsity = 0.5\n[train]\niterations = 10\n')
    config = RunConfig.from_toml(path)
    assert config.name == "my-recipe"
    assert config.model == "mlp-tiny" and config.prune.sparsity == 0.5 and config.train.iterations == 10
    assert config.prune.method == PruneConfig().method  # unspecified: defaults
    assert isinstance(config.prune.sparsity, float)


def test_int_is_accepted_for_float_and_converted():
    config = RunConfig.from_dict({"prune": {"sparsity": 0}, "train": {"lr": 1}})
    assert config.prune.sparsity == 0.0 and isinstance(config.prune.sparsity, float)
    assert isinstance(config.train.lr, float)


def test_key_ignores_name_only():
    base = RunConfig(model="mlp-tiny", dataset="synthetic")
    assert base.key() == base.replace(name="another label").key()
    assert base.key() == RunConfig(model="mlp-tiny", dataset="synthetic").key()  # stable
    changed = [
        base.replace(prune={"sparsity": 0.9}),
        base.replace(seed=1),
        base.replace(train={"lr": 0.05}),
        base.replace(model="conv-tiny"),
        base.replace(prune={"reinit": "variance-scaling"}),
        base.replace(train={"iterations": 10}),
    ]
    keys = {c.key() for c in changed}
    assert base.key() not in keys and len(keys) == len(changed)
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in keys | {base.key()})


def test_replace_takes_section_dicts_and_keeps_the_rest():
    base = RunConfig(model="mlp-tiny")
    new = base.replace(prune={"sparsity": 0.5}, train={"iterations": 3}, seed=2)
    assert new.prune == dataclasses.replace(base.prune, sparsity=0.5)
    assert new.train == dataclasses.replace(base.train, iterations=3)
    assert new.seed == 2 and new.model == "mlp-tiny"
    assert base.prune.sparsity == PruneConfig().sparsity  # frozen original untouched


@pytest.mark.parametrize(
    "data, section, valid",
    [
        ({"prune": {"sparsty": 0.9}}, "[prune]", "sparsity"),
        ({"train": {"learning_rate": 0.1}}, "[train]", "lr"),
        ({"modle": "mlp-tiny"}, "top level", "model"),
    ],
)
def test_unknown_keys_list_the_valid_ones(data, section, valid):
    with pytest.raises(SparsetrainError) as info:
        RunConfig.from_dict(data)
    message = str(info.value)
    bad = next(iter(data["prune"] if "prune" in data else data["train"] if "train" in data else data))
    assert bad in message and section in message and valid in message


def test_unknown_key_via_replace():
    with pytest.raises(SparsetrainError, match="nosuch"):
        RunConfig().replace(train={"nosuch": 1})
    with pytest.raises(SparsetrainError, match="nosuch"):
        RunConfig().replace(nosuch=1)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"prune": {"sparsity": "high"}}, "sparsity"),
        ({"seed": "0"}, "seed"),
        ({"seed": True}, "seed"),  # bool is not an int here
        ({"seed": 1.5}, "seed"),
        ({"train": {"iterations": 10.0}}, "iterations"),
        ({"prune": {"include_biases": 1}}, "include_biases"),
        ({"model": 3}, "model"),
        ({"train": {"lr": [0.1]}}, "lr"),
    ],
)
def test_wrong_types_are_errors(data, key):
    with pytest.raises(SparsetrainError) as info:
        RunConfig.from_dict(data)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize("data", [{"prune": 5}, {"train": "fast"}, {"prune": [1]}])
def test_a_section_that_is_not_a_table_is_an_error(data):
    with pytest.raises(SparsetrainError):
        RunConfig.from_dict(data)


def test_replacing_a_section_by_a_scalar_is_an_error():
    with pytest.raises(SparsetrainError, match="prune"):
        RunConfig().replace(prune=5)
    # a whole section object is fine
    assert RunConfig().replace(prune=PruneConfig(sparsity=0.5)).prune.sparsity == 0.5


def test_bad_recipe_files(tmp_path):
    with pytest.raises(SparsetrainError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("model = \n")
    with pytest.raises(SparsetrainError, match="not valid TOML"):
        RunConfig.from_toml(broken)


def test_bundled_recipes_exist():
    recipes = list_recipes()
    assert "demo" in recipes
    assert {f"snip-table1-{r}" for r in ("lenet300-95", "lenet300-98", "lenet300-dense",
                                         "lenet5-98", "lenet5-99", "lenet5-dense")} <= set(recipes)


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_bundled_recipe_loads_and_validates(recipe):
    path = recipe_path(recipe)
    config = RunConfig.from_toml(path)
    validate(config)
    assert config.name == recipe
    raw = tomllib.loads(path.read_text())
    # every setting written in the file is what the config holds
    for key, value in raw.items():
        if isinstance(value, dict):
            section = getattr(config, key)  # [prune]/[train] are dataclasses; [model_args]/[data_args] dicts
            for k, v in value.items():
                held = section[k] if isinstance(section, dict) else getattr(section, k)
                assert held == v, (recipe, key, k)
        else:
            assert getattr(config, key) == value, (recipe, key)
    t = config.train
    assert (t.iterations > 0) != (t.epochs > 0), "exactly one training length"


def test_table1_recipes_follow_the_paper():
    for recipe in [r for r in list_recipes() if r.startswith("snip-table1-")]:
        config = RunConfig.from_toml(recipe_path(recipe))
        assert config.dataset == "mnist" and config.train.batch_size == 100
        assert config.model == ("lenet-300-100" if "lenet300" in recipe else "lenet-5-caffe")
        if recipe.endswith("dense"):
            assert config.prune.method == "dense"
        else:
            assert config.prune.method == "snip"
            assert config.prune.sparsity == int(recipe.rsplit("-", 1)[1]) / 100


def test_keys_of_recorded_runs_survive_new_settings():
    # Computed before prune.structure and train.execution existed: adding a setting must not
    # change the identity of runs already in a store (they would be re-run instead of found).
    assert RunConfig().key() == "7c7510f30385eeb1"
    assert RunConfig().replace(prune={"structure": "2:4", "sparsity": 0.5}).key() != RunConfig().replace(prune={"sparsity": 0.5}).key()
