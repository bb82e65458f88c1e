"""The training step that the benchmarks time: zero_grad, forward, cross-entropy, backward, hooks,
SGD step, as ``sparsetrain.train`` runs it, with the state restored between timed calls.

    >>> import torch, torch.nn as nn
    >>> from sparsetrain.measure import TrainStep, time_interleaved
    >>> step = TrainStep(nn.Linear(8, 3))
    >>> x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    >>> t = time_interleaved({"step": (step.reset, lambda _: step.step(x, y))}, rounds=3, warmup=1)
    >>> t.rounds
    3
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LR", "MOMENTUM", "TrainStep", "WEIGHT_DECAY"]

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4  # the SNIP paper's SGD


class TrainStep:
    """One model, its SGD optimizer and the hooks of a training step (``after_backward`` and
    ``after_step``, as ``sparsetrain.train`` calls them, e.g. a ``GradientMask``).

    Time ``(step.reset, lambda _: step.step(x, y))`` with :func:`~sparsetrain.measure.time_interleaved`:
    :meth:`reset` (untimed) restores the initial weights, so thousands of steps on one batch
    cannot drift towards overflow or denormals, and drops the gradients, so each step allocates
    its own."""

    def __init__(self, model: nn.Module, hooks=()):
        self.model = model.train()
        self.hooks = list(hooks)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        for h in self.hooks:
            h.after_backward()
        self.optimizer.step()
        for h in self.hooks:
            h.after_step()

    @torch.no_grad()
    def reset(self) -> None:
        for k, v in self.model.state_dict().items():
            v.copy_(self.snapshot[k])
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Parameters, buffers and optimizer state (momentum) held between steps."""
        tensors = list(self.model.state_dict().values())
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)
