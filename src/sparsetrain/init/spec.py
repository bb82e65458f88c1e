"""Init schemes by name, with parameters written in the name: ``name`` or
``name:key=value,key=value`` (``normal:std=0.1``, ``variance-scaling:scale=2,mode=fan_avg``).

One string, because ``init`` and ``prune.reinit`` are config strings recorded in a run's key: the
string is the run's identity as written, so ``he-normal`` and ``he-normal:zero_bias=false`` draw
the same weights but are two runs in the store (write only what differs from the defaults).

A scheme is a function ``init(model, options)`` registered with :func:`register_init` and a frozen
dataclass of parameters (or none: ``init(model)``, which ``INITS.register(name)`` also registers).
``INITS.get(string)`` parses and checks the parameters and returns ``init(model)`` with them
bound, so the pipeline's validation (``INITS.get(config.init)``) refuses a bad name or parameter
before anything is built. Values are numbers, ``true``/``false`` or bare words.

    >>> parse_init("variance-scaling:scale=2,mode=fan_avg")
    ('variance-scaling', {'scale': 2, 'mode': 'fan_avg'})
    >>> parse_init("he-normal")
    ('he-normal', {})
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ..errors import SparsetrainError
from ..options import build_options
from ..registry import Registry

#: Names other libraries use for the same schemes: an unknown name that uses one is answered
#: with the name it has here.
SYNONYMS = {"xavier": "glorot", "kaiming": "he"}


@dataclass(frozen=True)
class InitSpec:
    """A registered scheme: its function and its parameters' dataclass (None: no parameters)."""

    name: str
    init: Callable[..., None]
    options: type | None = None

    def bind(self, options: Any) -> Callable[[nn.Module], None]:
        return self.init if self.options is None else functools.partial(self.init, options=options)


def parse_init(text: str) -> tuple[str, dict[str, Any]]:
    """``(name, {key: value})`` of an init string; a malformed string raises SparsetrainError."""
    if not isinstance(text, str):
        raise SparsetrainError(f"an init scheme is a string such as 'he-normal' or 'normal:std=0.1'; got {text!r}")
    name, colon, rest = text.partition(":")
    name = name.strip()
    values: dict[str, Any] = {}
    if not colon:
        return name, values
    if not rest.strip():
        raise SparsetrainError(f"init scheme {text!r}: nothing after ':'; write {name!r} alone, or "
                               f"{name}:key=value,key=value")
    for item in rest.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise SparsetrainError(f"init scheme {text!r}: {item.strip()!r} is not key=value; write "
                                   f"{name}:key=value,key=value (e.g. normal:std=0.1)")
        if key in values:
            raise SparsetrainError(f"init scheme {text!r}: parameter {key!r} is given twice")
        values[key] = _value(value)
    return name, values


def _value(text: str) -> Any:
    """A parameter value: an int, a float, true/false, or else the word itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


class InitRegistry(Registry):
    """The init schemes; :meth:`get` takes a whole init string (name and parameters)."""

    def get(self, text: str) -> Callable[[nn.Module], None]:
        spec, options = self.resolve(text)
        return spec.bind(options)

    def resolve(self, text: str) -> tuple[InitSpec, Any]:
        """The scheme of an init string and its parameters (its dataclass, or None)."""
        name, values = parse_init(text)
        if name not in self._entries:
            self._unknown(name)
        spec = self.spec(name)
        if spec.options is None:
            if values:
                raise SparsetrainError(f"init scheme {name!r} takes no parameters; got {', '.join(map(repr, values))} "
                                       f"(`sparsetrain list inits` shows each scheme's parameters)")
            return spec, None
        fields = dataclasses.fields(spec.options)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in values]
        if missing and set(values) <= {f.name for f in fields}:  # an unknown key is the likelier mistake
            raise SparsetrainError(f"init scheme {name!r} needs parameter{'s' if len(missing) > 1 else ''} "
                                   f"{', '.join(missing)}, e.g. {name}:{','.join(f'{m}=0.1' for m in missing)}")
        try:
            return spec, build_options(spec.options, values, "parameter", f"of init scheme {name!r}")
        except SparsetrainError as error:  # a range check of the dataclass does not know the scheme
            if f"of init scheme {name!r}" in str(error):
                raise
            raise SparsetrainError(f"init scheme {text!r}: {error}") from None

    def spec(self, name: str) -> InitSpec:
        """The registered scheme ``name`` (a bare name, no parameters)."""
        entry = super().get(name)
        return entry if isinstance(entry, InitSpec) else InitSpec(name, entry)

    def _unknown(self, name: str) -> None:
        for other, ours in SYNONYMS.items():
            if other in name and name.replace(other, ours) in self._entries:
                raise SparsetrainError(f"unknown init scheme {name!r}: it is called {name.replace(other, ours)!r} "
                                       f"here. Known init schemes: {', '.join(self.list())}.")
        super().get(name)  # the registry's own message, with close matches

    def unregister(self, name: str) -> None:
        """Remove a scheme (tests and notebooks that register one for a while)."""
        self._entries.pop(name, None)


INITS = InitRegistry("init scheme")


def register_init(name: str, *, options: type | None = None) -> Callable:
    """Register ``init(model, options)`` as scheme ``name`` with the frozen dataclass ``options``
    (its parameters; a field without a default is a required parameter), or ``init(model)``
    without parameters. Called under a seeded RNG by :func:`sparsetrain.init.initialize_`."""
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"register_init({name!r}): options must be a dataclass type, got {options!r}")

    def decorator(fn: Callable) -> Callable:
        INITS.register(name)(InitSpec(name, fn, options))
        return fn

    return decorator
