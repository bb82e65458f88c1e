"""One generic registry: filled by a decorator where a thing is defined, created by name.

    >>> models = Registry("model")
    >>> @models.register("tiny")
    ... def tiny(): return 1
    >>> models.create("tiny")
    1
    >>> models.list("ti*")
    ['tiny']

Unknown names raise :class:`SparsetrainError` naming the closest registered names.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

from .errors import SparsetrainError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise SparsetrainError(
                f"unknown {self.kind} {name!r}.{hint} "
                f"Known {self.kind}s: {', '.join(sorted(self._entries))}."
            )
        return self._entries[name]

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and notebooks that register one for a while: a name left behind
        shows in every listing of the registry, e.g. ``sparsetrain list models``)."""
        self._entries.pop(name, None)
