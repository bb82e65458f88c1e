"""Nested training state (model, optimizer, scheduler, RNG, counters) to and from safetensors files.

File layout written by :func:`save_state`:

* every tensor of the structure is a safetensors entry named ``t0``, ``t1``, ... in the order met
  by a depth-first walk;
* the structure itself is JSON in the safetensors metadata under ``sparsetrain.state``, with each
  tensor replaced by ``{"__tensor__": "t<i>"}``;
* ``sparsetrain.format`` holds :data:`STATE_FORMAT` so a reader can tell a state file from a
  mask file.

JSON encoding of the structure (every JSON object in it is a tag, so user dicts can never be
mistaken for one):

* ``dict`` -> ``{"__dict__": [[key, value], ...]}``: keys keep their type (``str``, ``int``,
  ``float``, ``bool`` or ``None``), which an optimizer ``state_dict()`` (int keys) needs;
* ``collections.Counter`` -> ``{"__counter__": [[key, value], ...]}`` (comes back as a Counter;
  other dict subclasses such as OrderedDict come back as plain dicts);
* ``list`` and ``tuple`` -> JSON array (tuples come back as lists);
* ``float`` nan/inf -> ``{"__float__": "nan" | "inf" | "-inf"}`` so the JSON stays standard;
* ``int``, finite ``float``, ``bool``, ``None``, ``str`` -> themselves; numpy scalars are
  converted to the matching Python scalar.

All writes are atomic: the file is written under a temporary name in the destination folder and
moved over the destination with :func:`os.replace`, so a crash mid-write leaves either the old
file or the new one, never a truncated one.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors
import safetensors.torch as st
import torch

from sparsetrain.errors import SparsetrainError
from sparsetrain.fsio import atomic_write

__all__ = [
    "STATE_FORMAT",
    "load_state",
    "load_tensors",
    "read_metadata",
    "save_state",
    "save_tensors",
]

STATE_FORMAT = "sparsetrain.state/1"
_FORMAT_KEY = "sparsetrain.format"
_STATE_KEY = "sparsetrain.state"
_RESERVED_KEYS = frozenset({_FORMAT_KEY, _STATE_KEY})

_FLOAT_TAGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ----------------------------------------------------------------------------- public API


def save_state(
    path: str | os.PathLike, state: Any, metadata: dict[str, str] | None = None, *, what: str = "checkpoint"
) -> None:
    """Write a nested structure of dicts, lists/tuples, tensors and JSON scalars to ``path``.

    Tensors are detached, moved to CPU and made contiguous; tensors sharing memory are stored as
    independent copies. ``metadata`` (str -> str) is stored alongside; the keys
    ``sparsetrain.format`` and ``sparsetrain.state`` are reserved. The write is atomic.

    Raises SparsetrainError for values that cannot be stored (e.g. arbitrary objects, sparse
    tensors), naming where in the structure they sit.
    """
    user_meta = _check_metadata(metadata, reserved=_RESERVED_KEYS)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, where="state")
    full_meta = {**user_meta, _FORMAT_KEY: STATE_FORMAT, _STATE_KEY: json.dumps(encoded, allow_nan=False)}
    _atomic_save(path, _storable(tensors), full_meta, what)


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Read back what :func:`save_state` wrote, with tensors on ``device``.

    The result equals the saved structure except that tuples come back as lists and dict
    subclasses other than Counter as plain dicts. Raises
    SparsetrainError naming ``path`` if it is missing, unreadable or not a state file.
    """
    tensors, meta = load_tensors(path, device=device)
    if meta.get(_FORMAT_KEY) != STATE_FORMAT or _STATE_KEY not in meta:
        raise SparsetrainError(
            f"{path} is not a sparsetrain state file (format {meta.get(_FORMAT_KEY)!r}, "
            f"expected {STATE_FORMAT!r}); was it written by save_state?"
        )
    try:
        encoded = json.loads(meta[_STATE_KEY])
        return _decode(encoded, tensors)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise SparsetrainError(f"{path}: corrupt state structure ({exc}); delete the file and rerun") from exc


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
    *, what: str = "file",
) -> None:
    """Atomically write a flat ``name -> tensor`` dict (e.g. pruning masks) as safetensors.
    ``what`` names the file in errors and is its write site for :mod:`sparsetrain.fsio`.

    Tensors are detached, moved to CPU and made contiguous; shared-memory tensors are copied.
    """
    if not isinstance(tensors, dict):
        raise SparsetrainError(f"save_tensors needs a dict of tensors, got {type(tensors).__name__}")
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise SparsetrainError(
                f"save_tensors needs str -> Tensor entries, got {name!r} -> {type(value).__name__}"
            )
    _atomic_save(path, _storable(tensors), _check_metadata(metadata, reserved=frozenset()), what)


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: ``(name -> tensor on device, metadata)`` (metadata ``{}`` if none).

    Raises SparsetrainError naming ``path`` if it is missing or not a valid safetensors file.
    """
    path = Path(path)

    def read() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            return {name: f.get_tensor(name) for name in f.keys()}, dict(meta)

    return _reading(path, read)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file without loading its tensors (``{}`` if none)."""
    path = Path(path)

    def read() -> dict[str, str]:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})

    return _reading(path, read)


# ----------------------------------------------------------------------------- encoding


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able form of ``value``; tensors are moved into ``tensors`` and replaced by tags."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise SparsetrainError(f"cannot save {where}: {value.layout} tensors are not supported; use .to_dense()")
        name = f"t{len(tensors)}"
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, dict):
        pairs = []
        for key, item in value.items():
            _check_key(key, where)
            pairs.append([_encode_scalar(key), _encode(item, tensors, f"{where}[{key!r}]")])
        # MultiStepLR keeps its milestones in a Counter and calls Counter methods on them.
        return {"__counter__" if isinstance(value, Counter) else "__dict__": pairs}
    if isinstance(value, (list, tuple)):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void)):
        return _encode_scalar(value.item())
    if value is None or isinstance(value, (bool, int, float, str)):
        return _encode_scalar(value)
    raise SparsetrainError(
        f"cannot save {where}: {type(value).__name__} is not a tensor, dict, list, tuple or JSON scalar"
    )


def _check_key(key: Any, where: str) -> None:
    # Only scalar keys have a lossless JSON form; tuples etc. would come back as lists (unhashable).
    if key is not None and not isinstance(key, (str, int, float)):
        raise SparsetrainError(f"cannot save {where}: dict key {key!r} is not a str, int, float, bool or None")


def _encode_scalar(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    return value


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`; raises KeyError/ValueError/TypeError on malformed input."""
    if isinstance(node, list):
        return [_decode(item, tensors) for item in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__dict__" in node:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in node["__dict__"]}
    if "__counter__" in node:
        return Counter({_decode(key, tensors): _decode(item, tensors) for key, item in node["__counter__"]})
    if "__float__" in node:
        return _FLOAT_TAGS[node["__float__"]]
    raise ValueError(f"unknown tag {sorted(node)}")


# ----------------------------------------------------------------------------- file handling


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, dense tensors that own their memory, as safetensors requires."""
    seen_storages: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided:
            raise SparsetrainError(f"cannot save tensor {name!r}: {tensor.layout} tensors are not supported; use .to_dense()")
        t = tensor.detach().to("cpu").resolve_conj().resolve_neg()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share a storage (it cannot restore the aliasing), and it
        # needs contiguous memory; a copy fixes both.
        if not t.is_contiguous() or (ptr != 0 and ptr in seen_storages):
            t = t.clone(memory_format=torch.contiguous_format)
        seen_storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _check_metadata(metadata: dict[str, str] | None, reserved: frozenset[str]) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SparsetrainError("metadata must be a dict of str -> str")
    clash = reserved.intersection(metadata)
    if clash:
        raise SparsetrainError(f"metadata keys {sorted(clash)} are reserved by sparsetrain")
    return dict(metadata)


def _atomic_save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> None:
    """Through the one atomic writer (:func:`sparsetrain.fsio.atomic_write`): old file or new, never half."""
    atomic_write(path, lambda tmp: st.save_file(tensors, str(tmp), metadata=metadata), what=what)


def _reading(path: Path, read: Callable[[], Any]) -> Any:
    """Run ``read`` and turn the ways a file can be missing or broken into SparsetrainError."""
    if not path.is_file():
        raise SparsetrainError(f"{path} does not exist or is not a file")
    try:
        return read()
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise SparsetrainError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt, "
            "delete it and rerun"
        ) from exc
