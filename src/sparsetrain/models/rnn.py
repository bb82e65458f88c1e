"""The recurrent networks of the SNIP paper's Table 2 (sequential MNIST): LSTM-s/b and GRU-s/b.

snip-public has no recurrent code; the definition comes from the SNIP paper (Lee et al. 2019,
Table 2 and its appendix) and is pinned by its parameter counts: a linear input projection
F -> h, one recurrent layer of h units (h = 128 for "-s", 256 for "-b") with both bias vectors
(as ``nn.LSTM``/``nn.GRU`` have them), and a linear head on the last step's hidden state. For
LSTM-s: 3,712 + 132,096 + 1,290 = 137,098 (the paper: 137k).

    >>> from sparsetrain.models import create_model
    >>> sum(p.numel() for p in create_model("lstm-s").parameters())
    137098

The models take sequences (B, T, F): the data layer's ``view="rows"`` reads MNIST as 28 steps of
28 pixels (the default input shape), ``view="pixels"`` as 784 steps of one pixel (pass
``input_shape=(784, 1)``, which the pipeline does from the data). The projection has no
nonlinearity: the paper names none and the counts do not need one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from ..errors import SparsetrainError
from .registry import MODELS
from .small import sequence_features


class SequenceClassifier(nn.Module):
    """Input projection F -> hidden, ``layers`` recurrent layers of ``hidden`` units (``cell``:
    ``nn.LSTM`` or ``nn.GRU``), a linear head on the last step's output.

    ``forget_bias`` (LSTM only) is a constant added to the forget gate's pre-activation at every
    step, as TensorFlow's ``LSTMCell``/``BasicLSTMCell`` do (``forget_bias=1.0`` by default, the
    cells of the paper's time): it is not a parameter, so it is neither counted, scored nor
    pruned, and a pruned forget-gate bias still leaves the gate open. Without it, a network pruned
    to 95% keeps a few percent of its forget-gate biases and forgets half its cell state at every
    step until the remaining weights learn otherwise (a SNIP-95% LSTM-s stood at 13% test error
    after 3,000 iterations without it)."""

    def __init__(self, cell: type[nn.Module], name: str, input_shape, num_classes: int, hidden: int, layers: int,
                 forget_bias: float = 0.0):
        super().__init__()
        features = sequence_features(name, input_shape)
        if hidden < 1 or layers < 1:
            raise SparsetrainError(f"{name} needs hidden >= 1 and layers >= 1, got hidden={hidden}, layers={layers}")
        if forget_bias and cell is not nn.LSTM:
            raise SparsetrainError(f"{name}: forget_bias is an LSTM setting (a GRU has no forget gate); leave it 0")
        self.project = nn.Linear(features, hidden)
        self.rnn = cell(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)
        self.forget_bias = float(forget_bias)
        # nn.LSTM's gates are stacked (input, forget, cell, output): the offset adds to the second block
        offset = torch.zeros(4 * hidden) if cell is nn.LSTM else torch.zeros(0)
        offset[hidden:2 * hidden] = self.forget_bias
        self.register_buffer("_forget_offset", offset, persistent=False)

    def forward(self, x):  # (B, T, F)
        projected = self.project(x)
        if self.forget_bias:
            biases = {f"bias_ih_l{k}": getattr(self.rnn, f"bias_ih_l{k}") + self._forget_offset
                      for k in range(self.rnn.num_layers)}
            out, _ = functional_call(self.rnn, biases, (projected,))  # the fused kernel, the offset in the bias
        else:
            out, _ = self.rnn(projected)  # (B, T, hidden)
        return self.head(out[:, -1])  # (B, num_classes)


@MODELS.register("lstm-s")
def lstm_s(*, input_shape=(28, 28), num_classes=10, hidden: int = 128, layers: int = 1,
           forget_bias: float = 1.0) -> nn.Module:
    """SNIP Table 2's LSTM-s: 137,098 parameters (the paper: 137k); ``forget_bias`` as
    TensorFlow's LSTM cells (see :class:`SequenceClassifier`)."""
    return SequenceClassifier(nn.LSTM, "lstm-s", input_shape, num_classes, hidden, layers, forget_bias)


@MODELS.register("lstm-b")
def lstm_b(*, input_shape=(28, 28), num_classes=10, hidden: int = 256, layers: int = 1,
           forget_bias: float = 1.0) -> nn.Module:
    """SNIP Table 2's LSTM-b: 536,330 parameters (the paper: 535k); ``forget_bias`` as
    TensorFlow's LSTM cells (see :class:`SequenceClassifier`)."""
    return SequenceClassifier(nn.LSTM, "lstm-b", input_shape, num_classes, hidden, layers, forget_bias)


@MODELS.register("gru-s")
def gru_s(*, input_shape=(28, 28), num_classes=10, hidden: int = 128, layers: int = 1) -> nn.Module:
    """SNIP Table 2's GRU-s: 104,074 parameters (the paper: 104k)."""
    return SequenceClassifier(nn.GRU, "gru-s", input_shape, num_classes, hidden, layers)


@MODELS.register("gru-b")
def gru_b(*, input_shape=(28, 28), num_classes=10, hidden: int = 256, layers: int = 1) -> nn.Module:
    """SNIP Table 2's GRU-b: 404,746 parameters (the paper: 404k)."""
    return SequenceClassifier(nn.GRU, "gru-b", input_shape, num_classes, hidden, layers)
