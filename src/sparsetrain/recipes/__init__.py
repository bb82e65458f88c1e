"""The bundled recipes: one TOML file per paper row or demo, found by name.

    >>> "demo" in list_recipes()
    True
    >>> recipe_path("demo").name
    'demo.toml'
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from ..errors import SparsetrainError

__all__ = ["list_recipes", "load_recipe", "recipe_path"]


def recipe_path(name_or_path: str | Path) -> Path:
    """The file of a bundled recipe ``name``, or ``name_or_path`` itself when it is a path (ends
    in ``.toml`` or exists). Unknown names raise SparsetrainError with the closest names."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return path
    bundled = resources.files(__name__) / f"{name_or_path}.toml"
    if not bundled.is_file():
        names = list_recipes()
        close = difflib.get_close_matches(str(name_or_path), names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise SparsetrainError(f"unknown recipe {str(name_or_path)!r}.{hint} Known recipes: {', '.join(names)}.")
    return Path(str(bundled))


def list_recipes() -> list[str]:
    """Names of the bundled recipes, sorted."""
    folder = resources.files(__name__)
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str | Path):
    """The :class:`~sparsetrain.config.RunConfig` of a bundled recipe or a TOML file."""
    from ..config import RunConfig

    return RunConfig.from_toml(recipe_path(name_or_path))
