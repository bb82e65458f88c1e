"""Which axis of a weight is its input: what N:M and block structure group along.

N:M sparsity keeps N of every M consecutive *input* entries of each output (the layout
cuSPARSELt and ``torch.sparse.to_sparse_semi_structured`` run on), so structured selection needs
to know each weight's input axis:

- dim 1 for the layers whose weight is ``(out, in, ...)``: Linear, Bilinear, Conv1d/2d/3d,
  RNN/LSTM/GRU weights, MultiheadAttention's ``in_proj_weight``, Embedding (its rows are the
  vectors, as in an output layer tied to it);
- dim 0 for the layers that store ``(in, out, ...)``: ConvTranspose*, and Hugging Face's
  ``Conv1D`` (GPT-2's linear layers; recognised by its class name);
- ``input_dims={"name": 0}`` overrides both, per parameter;
- any other class: dim 1, with a note saying so in ``Mask.notes``.

    >>> import torch.nn as nn
    >>> dims, notes = input_dims(nn.Sequential(nn.Linear(4, 2)), ["0.weight"])
    >>> dims, notes
    ({'0.weight': 1}, {})
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch.nn as nn

from ..errors import SparsetrainError
from ..masks import owner_module, parameter_names

# Classes whose weights are (out, in, ...).
OUT_IN = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase, nn.RNNCellBase,
          nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag)
# Classes whose weights are (in, out, ...).
IN_OUT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
IN_OUT_NAMES = ("Conv1D",)  # transformers.pytorch_utils.Conv1D, not imported here


def input_dims(
    model: nn.Module, names: Iterable[str], overrides: Mapping[str, int] | None = None
) -> tuple[dict[str, int], dict[str, str]]:
    """``({name: input axis}, {name: note})`` for the parameters ``names`` with 2+ dimensions
    (see the module docstring). ``overrides`` may use any name of a shared tensor."""
    params, canonical = parameter_names(model)
    given: dict[str, int] = {}
    for name, dim in (overrides or {}).items():
        if name not in canonical:
            raise SparsetrainError(
                f"input_dims names {name!r}, not a parameter of the model; its parameters: {', '.join(canonical)}"
            )
        if dim not in (0, 1) or isinstance(dim, bool):
            raise SparsetrainError(
                f"input_dims[{name!r}] must be 0 (weights stored (in, out, ...)) or 1 ((out, in, ...)); got {dim!r}"
            )
        given[canonical[name]] = dim
    dims: dict[str, int] = {}
    notes: dict[str, str] = {}
    for name in names:
        if params[name].dim() < 2:
            continue
        if name in given:
            dims[name] = given[name]
            continue
        owner = owner_module(model, name)
        if isinstance(owner, IN_OUT) or type(owner).__name__ in IN_OUT_NAMES:
            dims[name] = 0
        elif isinstance(owner, OUT_IN):
            dims[name] = 1
        else:
            dims[name] = 1
            notes[name] = (
                f"input axis: unknown class {type(owner).__name__}, assumed dim 1 "
                f"(pass input_dims={{{name!r}: 0}} if it stores (in, out))"
            )
    return dims, notes
