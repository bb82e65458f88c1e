"""How many torch threads a training run uses: the one rule, and the user's explicit choice.

Torch's default uses every core. When another process holds one, every parallel region waits
for the thread that shares the busy core, and a training step on the default threads takes 1.6
to 4 times as long as on the idle cores alone, more on a machine shared by several jobs (2,000
LeNet-300-100 iterations: 24 s on torch's two threads against 9.5 s on one, on a 2-core machine
with one core busy). On a quiet machine the second thread gains only about 1.15x on a step of a
few milliseconds (LeNet-300-100 at batch 100) and about 1.6x on larger ones. So the rule
(:func:`choose_threads`):

- a step below :data:`SMALL_STEP_FLOPS` multiply-adds runs on one thread (little to gain, much to
  lose if a core gets busy later);
- a larger one runs on the cores the load average leaves idle when it starts (at least one, at
  most torch's default :data:`DEFAULT_THREADS`).

An explicit choice (``--threads N``, :func:`request_threads`) always wins. The measurement behind
the rule: ``benchmarks/bench_threads.py`` (docs/results/bench_threads.md, docs/measurement.md).

    >>> import torch.nn as nn
    >>> from sparsetrain.threads import choose_threads, step_flops
    >>> step_flops(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 28, 28), batch_size=100)
    2352000
    >>> choose_threads(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 28, 28), batch_size=100)
    1
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .errors import SparsetrainError

__all__ = ["DEFAULT_THREADS", "SMALL_STEP_FLOPS", "choose_threads", "idle_cores", "request_threads",
           "requested_threads", "step_flops", "training_threads"]

#: torch's own thread count in this process before sparsetrain changed it (its default: the
#: physical cores, or ``OMP_NUM_THREADS``).
DEFAULT_THREADS = torch.get_num_threads()

#: Multiply-adds per training step (forward, and backward for inputs and weights: 3x the forward's)
#: below which one thread is used: a step of a few milliseconds. At batch 100 LeNet-300-100 is
#: 8e7 (2 ms a step), LeNet-5-Caffe 7e8 (30-45 ms), vgg-cifar-small 3e9 (90-130 ms).
SMALL_STEP_FLOPS = 3e8

_requested: int | None = None


def request_threads(n: int | None) -> None:
    """Use ``n`` torch threads from now on, whatever the rule says (``None``: the rule again)."""
    global _requested
    if n is not None and (not isinstance(n, int) or n < 1):
        raise SparsetrainError(f"--threads must be a whole number of at least 1, got {n!r}")
    _requested = n
    if n is not None:
        torch.set_num_threads(n)


def requested_threads() -> int | None:
    """The explicit thread count (``--threads``), or ``None`` when the rule decides."""
    return _requested


def step_flops(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> int:
    """Multiply-adds of one training step of ``model`` on a batch of ``batch_size`` examples of
    ``input_shape``: the Linear, Conv2d and recurrent (RNN/LSTM/GRU) layers' forward multiply-adds, times 3 (the backward
    computes the input and the weight gradients, each as many). Counted on a forward pass of two
    examples in inference mode (no gradients; the model is left as it was)."""
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            macs += output.numel() * per_output
        elif isinstance(module, nn.RNNBase):
            macs += _recurrent_macs(module, output[0] if isinstance(output, tuple) else output)

    layers = (nn.Linear, nn.Conv2d, nn.RNNBase)
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, layers)]
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        x = torch.zeros((2, *input_shape), device=p.device if p is not None else None)
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return 3 * macs * batch_size // 2


def _recurrent_macs(module: nn.RNNBase, output: torch.Tensor) -> int:
    """Multiply-adds of one forward pass of an RNN/LSTM/GRU that produced ``output`` (a padded
    tensor): per step and example, gates x (inputs + hidden) x hidden for each layer and direction
    (4 gates for an LSTM, 3 for a GRU, 1 for a plain RNN)."""
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        return 0
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    directions = 2 if module.bidirectional else 1
    steps_and_examples = output.numel() // output.shape[-1]  # (B, T) or (T, B), or T unbatched
    hidden = module.hidden_size
    per_step = 0
    for layer in range(module.num_layers):
        inputs = module.input_size if layer == 0 else hidden * directions
        per_step += directions * gates * (inputs + hidden) * hidden
    return steps_and_examples * per_step


def idle_cores() -> float | None:
    """Cores not busy by the 1-minute load average (``None`` where the system has no load average)."""
    try:
        return (os.cpu_count() or 1) - os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def choose_threads(model: nn.Module, input_shape: Sequence[int], batch_size: int, *,
                   idle: float | str | None = "now") -> int:
    """The rule: 1 thread for a step below :data:`SMALL_STEP_FLOPS` multiply-adds; else the idle
    cores (``idle``, default :func:`idle_cores` now; ``None``: unknown, all of torch's default),
    rounded, between 1 and :data:`DEFAULT_THREADS`. Ignores an explicit request (see
    :func:`apply_threads`)."""
    if DEFAULT_THREADS <= 1:
        return 1
    try:
        flops = step_flops(model, input_shape, batch_size)
    except Exception:  # a model the probe cannot run (dict inputs, ...): judged by the load alone
        flops = math.inf
    if flops < SMALL_STEP_FLOPS:
        return 1
    idle = idle_cores() if idle == "now" else idle
    if idle is None:
        return DEFAULT_THREADS
    return max(1, min(DEFAULT_THREADS, math.floor(idle + 0.5)))


@contextlib.contextmanager
def training_threads(model: nn.Module, input_shape: Sequence[int], batch_size: int, device=None) -> Iterator[int]:
    """Within the block, torch runs on the threads for training ``model`` (the request, else the
    rule); yields that count, and restores the previous count after (a library call leaves the
    process as it found it). Off the CPU the count is left as it is (the host threads only feed
    the device)."""
    if _requested is not None:
        n = _requested
    elif device is not None and torch.device(device).type != "cpu":
        n = torch.get_num_threads()
    else:
        n = choose_threads(model, input_shape, batch_size)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
