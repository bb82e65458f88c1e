"""Data set arguments: one frozen dataclass per data set, built and checked from plain values.

Each registered data set declares the arguments it takes as a frozen dataclass whose fields have
types, defaults and a ``help`` string (``field(metadata={"help": ...})``); configs and the command
line hold plain values (TOML/JSON: a list where the dataclass has a tuple), and
:func:`build_args` turns them into the dataclass, refusing unknown keys and wrong types.

    >>> build_args(ImageArgs, {"view": "rows"}, "mnist")
    ImageArgs(view='rows', random_labels=False)
    >>> build_args(ImageArgs, {"flip": True}, "mnist")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparsetrain.errors.SparsetrainError: data set 'mnist' has no train-time transform 'flip' ...

Shared bases, so that data sets of one kind take the same arguments:

- :class:`ImageArgs`: ``view``, how examples are presented (``"image"``, ``"rows"``, ``"pixels"``;
  see :mod:`sparsetrain.data.views`), and ``random_labels`` (the memorization test).
- :class:`AugmentedImageArgs`: adds the train-time transforms ``random_crop`` and ``flip`` (see
  :mod:`sparsetrain.data.transforms`), for natural-image data sets.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import SparsetrainError
from ..options import build_options

#: How examples are presented to the model; see :mod:`sparsetrain.data.views`.
View = Literal["image", "rows", "pixels"]


@dataclass(frozen=True)
class ImageArgs:
    """Arguments every image data set takes."""

    view: View = field(
        default="image",
        metadata={"help": "how examples are presented: image (C, H, W); rows (H steps of C*W features); "
                          "pixels (H*W steps of C features)"},
    )
    random_labels: bool = field(
        default=False,
        metadata={"help": "replace every training and validation label by a random class (uniform, fixed per "
                          "example by the split seed; test labels stay true): the memorization test of Zhang "
                          "et al. 2017, as in the SNIP paper's section 5.3"},
    )


@dataclass(frozen=True)
class AugmentedImageArgs(ImageArgs):
    """Image arguments plus the train-time transforms (natural images: CIFAR, Tiny-ImageNet)."""

    random_crop: int = field(
        default=0,
        metadata={"help": "random translation: pad each training image by this many black pixels per side, "
                          "then crop it back at a random offset (0: off; CIFAR recipes use 4)"},
    )
    flip: bool = field(
        default=False, metadata={"help": "flip each training image left-right with probability 1/2"}
    )

    def __post_init__(self):
        if self.random_crop < 0:
            raise SparsetrainError(f"data arg 'random_crop' must be >= 0 (0: off), got {self.random_crop}")


#: Argument names that ask for a train-time transform (on data sets whose args do not have them,
#: asking for them is an error that says so).
TRANSFORM_ARGS = tuple(f.name for f in dataclasses.fields(AugmentedImageArgs) if f.name not in
                       {g.name for g in dataclasses.fields(ImageArgs)})


def build_args(cls: type, values: Any, owner: str) -> Any:
    """An instance of args dataclass ``cls`` from ``values`` (a mapping, None for the defaults, or
    an args instance); ``owner`` names the data set in error messages. Types are checked by
    :mod:`sparsetrain.options` (lists become tuples where the field is a tuple); asking a data set
    without train-time transforms for one says so."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type) and not isinstance(values, cls):
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
    if isinstance(values, typing.Mapping):
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in fields and key in TRANSFORM_ARGS:
                raise SparsetrainError(
                    f"data set {owner!r} has no train-time transform {key!r} (it takes no augmentation); "
                    f"valid data args for {owner!r}: {', '.join(fields) or '(none)'}"
                )
    return build_options(cls, values, "data arg", f"of data set {owner!r}")


def non_default_args(args: Any) -> dict[str, Any]:
    """The fields of args instance ``args`` that differ from their defaults, JSON-ready (tuples as
    lists): what a run key should hold, so that adding an argument with a default changes no key.

    >>> non_default_args(ImageArgs()), non_default_args(ImageArgs(view="pixels"))
    ({}, {'view': 'pixels'})
    """
    out = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
