"""Initialization schemes by name, for the weights that are scored (``init``, ``--init``) and the
weights that are trained (``prune.reinit``, ``--reinit``). See docs/init.md.

An init string is a scheme's name and, after a colon, its parameters: ``he-normal``,
``normal:std=0.1``, ``truncated-normal:std=0.05``, ``variance-scaling:scale=2,mode=fan_in,
distribution=uniform``, ``orthogonal:gain=1``, ``glorot-uniform:zero_bias=true``
(:mod:`.spec`). The schemes (:mod:`.schemes`, laws in :mod:`.laws`): ``default`` (PyTorch's
``reset_parameters``); ``zeros``; ``normal``, ``truncated-normal`` (cut at 2 std, as TensorFlow)
and ``uniform`` with a fixed scale; ``variance-scaling`` (TensorFlow's: scale, mode fan_in /
fan_out / fan_avg, distribution truncated_normal / normal / uniform; its defaults are TF1's
default initializer, snip-public's) and its named forms ``lecun-``, ``glorot-`` and
``he-normal`` / ``-uniform``; ``orthogonal``; ``delta-orthogonal`` for convolutions. Biases are
drawn from the weights' law unless ``zero_bias=true`` (``zeros`` and the orthogonal schemes set
them to zero). ``variance-scaling-zero-bias`` is the older name of
``variance-scaling:zero_bias=true``, kept with the runs recorded under it.

    >>> import torch
    >>> layer = torch.nn.Linear(100, 10)
    >>> _ = initialize_(layer, "variance-scaling-zero-bias", seed=0)
    >>> float(layer.bias.detach().abs().sum())
    0.0
    >>> _ = initialize_(layer, "orthogonal", seed=0)
    >>> bool(torch.allclose(layer.weight @ layer.weight.T, torch.eye(10), atol=1e-5))
    True
    >>> TABLE3_SCHEMES["he"]
    'variance-scaling:scale=2'
    >>> with_zero_bias(TABLE3_SCHEMES["he"])
    'variance-scaling:scale=2,zero_bias=true'
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from ..options import describe_options
from .schemes import TABLE3_SCHEMES
from .spec import INITS, parse_init, register_init


def initialize_(model: nn.Module, scheme: str, seed: int) -> nn.Module:
    """Re-draw every parameter of ``model`` in place with the init string ``scheme``,
    reproducibly from ``seed`` (the global RNG is left as it was)."""
    init = INITS.get(scheme)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init(model)
    return model


def list_inits(pattern: str = "*") -> list[str]:
    return INITS.list(pattern)


def describe_init(name: str) -> list[str]:
    """``[summary, "name (type) = default  help", ...]`` of scheme ``name``: the first line of
    its docstring, then one line per parameter (``required`` for one without a default)."""
    spec = INITS.spec(name)
    summary = (spec.init.__doc__ or "").strip().split("\n")[0]
    fields = dataclasses.fields(spec.options) if spec.options else ()
    lines = describe_options(spec.options)
    for i, f in enumerate(fields):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            lines[i] = lines[i].replace(f" = {dataclasses.MISSING!r}", ", required")
    return [summary] + lines


def with_zero_bias(scheme: str) -> str:
    """The init string that draws the weights of ``scheme`` with zero biases: snip-public's fresh
    draw that is trained, for ``prune.reinit``. ``variance-scaling`` gives its older name
    ``variance-scaling-zero-bias`` (the recorded runs' key); schemes whose biases are zero
    already come back unchanged."""
    spec, _ = INITS.resolve(scheme)
    name, values = parse_init(scheme)
    if name == "variance-scaling" and not values:
        return "variance-scaling-zero-bias"
    fields = [f.name for f in dataclasses.fields(spec.options)] if spec.options else []
    if "zero_bias" not in fields:
        if name == "default":
            raise SparsetrainError("init scheme 'default' is PyTorch's own draw, biases included, and has no "
                                   "zero-bias form; name the scheme PyTorch uses for a layer instead")
        return scheme
    values["zero_bias"] = True
    return name + ":" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())


__all__ = ["INITS", "TABLE3_SCHEMES", "describe_init", "initialize_", "list_inits", "register_init", "with_zero_bias"]
