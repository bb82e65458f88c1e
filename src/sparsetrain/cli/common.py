"""Flags generated from the config schema, and turning them into a :class:`RunConfig`.

Every field of :class:`~sparsetrain.config.RunConfig` and its sections becomes a flag
(``--<field-name>``, or the field's own ``flag``), typed from the field's annotation, with the
field's help text; a field naming a registry lists that registry's current names. So a field, a
model or a method added to the library appears in the CLI without an edit here.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from typing import Any

from ..config import SECTIONS, RunConfig, schema
from ..errors import SparsetrainError
from ..pipeline import CHOICES
from ..recipes import recipe_path

# Training settings that also decide which batches pruning sees (the prune command takes these).
PRUNING_TRAIN_FIELDS = ("batch_size", "val_fraction", "split_seed")
_PREFIX = "cfg__"


def _dest(section: str, name: str) -> str:
    return f"{_PREFIX}{section}__{name}"


def _hint(section: str, name: str) -> Any:
    """The annotation of field ``name`` of ``section`` ("" for the top level)."""
    return typing.get_type_hints(SECTIONS[section])[name]


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    registry = f.metadata.get("registry")
    if registry in CHOICES:
        text += f" (one of: {', '.join(CHOICES[registry]())})"
    return text.replace("%", "%%")


def add_config_flags(p: argparse.ArgumentParser, training: bool = True) -> None:
    """One flag per config setting (generated), plus ``--recipe`` and ``--set``."""
    g = p.add_argument_group("what to run (override the recipe)")
    g.add_argument("--recipe", help="recipe name (see `sparsetrain list recipes`) or path to a TOML file")
    for section, f in schema():
        if f.name == "name" or (section == "train" and not training and f.name not in PRUNING_TRAIN_FIELDS):
            continue
        hint = _hint(section, f.name)
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"dest": _dest(section, f.name), "help": _help(f), "default": None}
        origin = typing.get_origin(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is dict:
            kwargs.update(action="append", metavar="KEY=VALUE",
                          help=_help(f) + "; repeat for several, TOML value syntax")
        elif origin is tuple:
            kwargs.update(nargs="*", metavar="PATTERN")
        else:
            kwargs.update(type=hint, metavar=f.name.upper())
        g.add_argument(flag, **kwargs)
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any setting, e.g. --set train.end_lr_factor=0.01 or --set prune.options.KEY=VALUE "
                        "(TOML value syntax)")
    add_env_flags(p)


def add_env_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("environment (not part of a run's identity)")
    g.add_argument("--data-dir", help="data root holding <dataset>/ folders (default $SPARSETRAIN_DATA, "
                                      "else ~/.cache/sparsetrain)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--store", help="run store folder (default $SPARSETRAIN_HOME or ./sparsetrain-runs)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one line per validation check instead")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (default: 1 for a small training step, e.g. LeNet-300-100 at batch 100, "
                        "else the cores the load average leaves idle: torch's default on every core ran 1.6-4x "
                        "slower when another process holds one; reproduce --workers W: cores / W each)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The recipe (or the defaults) with the flags and ``--set`` values applied."""
    config = RunConfig.from_toml(recipe_path(args.recipe)) if args.recipe else RunConfig()
    changes: dict = {"prune": {}, "train": {}}
    for section, f in schema():
        value = getattr(args, _dest(section, f.name), None)
        if value is None:
            continue
        if typing.get_origin(_hint(section, f.name)) is dict:  # KEY=VALUE items added to the recipe's table
            current = dict(getattr(config if not section else getattr(config, section), f.name))
            value = current | dict(_parse_pair(item, "--" + f.metadata["flag"]) for item in value)
        (changes[section] if section else changes)[f.name] = value
    if "iterations" in changes["train"]:
        changes["train"].setdefault("epochs", 0.0)
    elif "epochs" in changes["train"]:
        changes["train"]["iterations"] = 0
    for item in args.set:
        _apply_set(config, changes, item)
    return config.replace(**changes)


def _parse_pair(item: str, flag: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SparsetrainError(f"{flag} expects KEY=VALUE, e.g. {flag} width=2; got {item!r}")
    key, raw = item.split("=", 1)
    return key.strip(), _value(raw)


def _value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word is a string


_DICT_FIELDS = {("", "model_args"), ("", "data_args"), ("prune", "options")}


def _apply_set(config: RunConfig, changes: dict, item: str) -> None:
    """``--set [SECTION.]KEY=VALUE``; ``prune.options.K``, ``model_args.K`` and ``data_args.K``
    set one entry of those tables."""
    if "=" not in item:
        raise SparsetrainError(f"--set expects SECTION.KEY=VALUE, e.g. train.lr=0.05; got {item!r}")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    value = _value(raw)
    for section, table in _DICT_FIELDS:
        prefix = ([section] if section else []) + [table]
        if parts[: len(prefix)] == prefix and len(parts) == len(prefix) + 1:
            target = changes[section] if section else changes
            current = target.get(table, getattr(getattr(config, section) if section else config, table))
            target[table] = dict(current) | {parts[-1]: value}
            return
    if len(parts) == 1:
        changes[parts[0]] = value
    elif len(parts) == 2 and parts[0] in ("prune", "train"):
        changes[parts[0]][parts[1]] = value
    else:
        raise SparsetrainError(
            f"--set {item!r}: the section must be prune or train (or none), or the table prune.options, "
            "model_args or data_args"
        )
