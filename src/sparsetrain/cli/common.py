"""Flags shared by the commands, and turning them into a :class:`RunConfig`."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from ..config import RunConfig
from ..errors import SparsetrainError

# flag -> (section, field); section None is the top level of RunConfig
OVERRIDES = {
    "model": (None, "model"),
    "dataset": (None, "dataset"),
    "seed": (None, "seed"),
    "init": (None, "init"),
    "method": ("prune", "method"),
    "sparsity": ("prune", "sparsity"),
    "prune_batches": ("prune", "batches"),
    "include_biases": ("prune", "include_biases"),
    "scope": ("prune", "scope"),
    "reinit": ("prune", "reinit"),
    "structure": ("prune", "structure"),
    "optimizer": ("train", "optimizer"),
    "lr": ("train", "lr"),
    "momentum": ("train", "momentum"),
    "nesterov": ("train", "nesterov"),
    "weight_decay": ("train", "weight_decay"),
    "schedule": ("train", "schedule"),
    "decay_every": ("train", "decay_every"),
    "iterations": ("train", "iterations"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "val_every": ("train", "val_every"),
    "test_every": ("train", "test_every"),
    "execution": ("train", "execution"),
}


def add_config_flags(p: argparse.ArgumentParser, training: bool = True) -> None:
    g = p.add_argument_group("what to run (override the recipe)")
    g.add_argument("--recipe", help="recipe name (see `sparsetrain list`) or path to a TOML file")
    g.add_argument("--model")
    g.add_argument("--dataset")
    g.add_argument("--seed", type=int)
    g.add_argument("--init", help="initialization scheme of the scored weights")
    g.add_argument("--method", help="pruning method: snip, random, magnitude, or dense")
    g.add_argument("--sparsity", type=float, help="fraction of connections removed, in [0, 1)")
    g.add_argument("--prune-batches", type=int, help="mini-batches scored (0 = whole training split)")
    g.add_argument("--include-biases", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--scope", choices=["global", "layerwise"])
    g.add_argument("--reinit", help="train a fresh draw of this init scheme (snip-public style)")
    g.add_argument("--structure", help='"2:4" (N:M; needs --sparsity 1-N/M), "block32x32", or "" (unstructured)')
    g.add_argument("--batch-size", type=int)
    if training:
        g.add_argument("--optimizer", help="sgd, adam or adamw")
        g.add_argument("--lr", type=float)
        g.add_argument("--momentum", type=float)
        g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
        g.add_argument("--weight-decay", type=float)
        g.add_argument("--schedule", help="constant, step, linear or cosine")
        g.add_argument("--decay-every", type=int, help="iterations between x0.1 decays (step schedule)")
        g.add_argument("--iterations", type=int)
        g.add_argument("--epochs", type=float)
        g.add_argument("--val-every", type=int)
        g.add_argument("--test-every", type=int, help="also record test error every N iterations")
        g.add_argument("--execution", choices=["dense", "sparse"],
                       help="sparse: pruned Linear layers train on their kept weights only (faster on CPU)")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other setting, e.g. --set train.end_lr_factor=0.01 (TOML value syntax)")
    add_env_flags(p)


def add_env_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("environment (not part of a run's identity)")
    g.add_argument("--data-dir", help="folder holding <dataset>/ IDX files (default $SPARSETRAIN_DATA)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--store", help="run store folder (default $SPARSETRAIN_HOME or ./sparsetrain-runs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return path
    bundled = resources.files("sparsetrain") / "recipes" / f"{name_or_path}.toml"
    if not bundled.is_file():
        import difflib

        names = list_recipes()
        close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SparsetrainError(f"unknown recipe {name_or_path!r}.{hint} Known recipes: {', '.join(names)}.")
    return Path(str(bundled))


def list_recipes() -> list[str]:
    folder = resources.files("sparsetrain") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    config = RunConfig.from_toml(recipe_path(args.recipe)) if args.recipe else RunConfig()
    changes: dict = {"prune": {}, "train": {}}
    for flag, (section, key) in OVERRIDES.items():
        value = getattr(args, flag, None)
        if value is not None:
            (changes[section] if section else changes)[key] = value
    if "iterations" in changes["train"]:
        changes["train"].setdefault("epochs", 0.0)
    elif "epochs" in changes["train"]:
        changes["train"]["iterations"] = 0
    for item in args.set:
        section, key, value = _parse_set(item)
        (changes[section] if section else changes)[key] = value
    return config.replace(**changes)


def _parse_set(item: str):
    import tomllib

    if "=" not in item:
        raise SparsetrainError(f"--set expects SECTION.KEY=VALUE, e.g. train.lr=0.05; got {item!r}")
    dotted, raw = item.split("=", 1)
    section, _, key = dotted.strip().rpartition(".")
    if section not in ("", "prune", "train"):
        raise SparsetrainError(f"--set {item!r}: the section must be prune or train (or none)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return section or None, key, value
