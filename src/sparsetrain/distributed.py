"""Data-parallel training with ``torch.distributed``: N processes train one run as one process would.

Every rank draws the very global batch of B examples a single process would draw at that step
(the training stream is a pure function of the seed and the step) and keeps its own slice of
B / N examples; DistributedDataParallel averages the gradients over the ranks, so each step
applies the gradient of the mean loss over the whole global batch: N ranks equal one process at
the same global batch, to float rounding (for models without dropout or batch normalisation,
whose random draws and batch statistics are per slice, as in any data-parallel training).

- **The mask**, found once, identical on every rank: each rank scores its slice of each pruning
  batch, the gradients dL/dw are averaged over the ranks *before* a method multiplies them by the
  weights and takes the absolute value (SNIP's |w * dL/dw| of the averaged gradient is the
  single-process score; an average of absolute values would not be), then every rank selects the
  same global top-kappa. A checksum of the mask is compared across the ranks, and a difference
  fails the run. Data-free methods score the same weights on every rank. Methods whose scores are
  not built from first-order gradients summed over batches (GraSP's Hessian-gradient product) are
  refused: prune first (``sparsetrain prune``) and train the mask file.
- **The store** is written by rank 0 alone: the record, the mask file, the checkpoints and the
  metrics. A resumed run resumes from rank 0's checkpoint on every rank (rank 0 reads it and sends
  it to the others, so it needs to be on rank 0's machine only).
- **The run's key** does not depend on the number of processes (nor on ``--threads`` or the
  device) where the result is one process's: such a run is the same run, recorded once. A model
  with dropout (each rank draws its own masks for its slice) or, on CPU, batch normalisation
  (each rank normalises its slice; on CUDA the layers become SyncBatchNorm, which normalises over
  the global batch, as one process) trains differently in N processes: its key then includes N
  (:func:`run_key`).
- **Failures**: a rank that raises ends its process; the launcher then stops the others, and
  :func:`run_ddp` raises the failed rank's error. Every collective operation has a timeout
  (:data:`TIMEOUT_S`), so a rank whose peer vanished (another machine) fails instead of waiting.

Launch N local processes with :func:`run_ddp` (``sparsetrain run --nproc N``), or start
``sparsetrain run`` under ``torchrun`` (any number of machines): each process then runs
:func:`run_rank`. Backend gloo on CPU, NCCL on CUDA (rank r on ``cuda:<local rank>``); each rank
gets ``cores / N`` torch threads unless ``--threads`` says otherwise. See docs/ddp.md.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import RunConfig
from .errors import SparsetrainError
from .masks import Mask

#: Seconds a rank waits in one collective operation before it fails (a peer that died elsewhere).
TIMEOUT_S = 600.0

#: Pruning methods whose scores come from dL/dw summed over the pruning batches (then multiplied by
#: weights and made absolute): averaging each batch's gradient over the ranks gives the scores of
#: one process. Data-free methods need nothing; any other method is refused with ``--nproc``.
GRADIENT_METHODS = ("snip", "snip-unsupervised", "iter-snip", "force")

_LAUNCHED = "TORCHELASTIC_RUN_ID"  # set by torchrun (and run_ddp) in every process it starts


def backend_for(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched() -> bool:
    """True in a process that torchrun (or :func:`run_ddp`) started as one rank of a group."""
    return _LAUNCHED in os.environ and "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Ranks:
    """The process group as one rank sees it: what the pipeline, the run and the training loop
    ask of data parallelism (passed as ``parallel=``; ``None`` there means one process)."""

    rank: int
    world: int
    device: torch.device

    @property
    def writer(self) -> bool:
        """Rank 0: the one process that writes the run store."""
        return self.rank == 0

    # --- what rank 0 knows, sent to every rank ------------------------------------------------

    def from_writer(self, value: Callable[[], Any]) -> Any:
        """``value()`` evaluated on rank 0 alone and sent to every rank (any picklable object)."""
        box = [value() if self.writer else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    # --- the global batch, split ----------------------------------------------------------------

    def shard(self, batch: Any) -> Any:
        """This rank's slice of a training (or pruning) batch of B examples: examples
        ``[r * B/N, (r + 1) * B/N)`` of every tensor of an ``(inputs, targets)`` pair or a dict
        batch; B not divisible by N is refused."""
        return self._cut(batch, even=True)

    def part(self, batch: Any) -> Any:
        """This rank's part of an evaluation batch of any size n: examples
        ``[r * n // N, (r + 1) * n // N)`` (possibly none), so the parts cover the batch once."""
        return self._cut(batch, even=False)

    def _cut(self, batch: Any, even: bool) -> Any:
        def cut(t):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                return t
            n = t.shape[0]
            if even:
                check_divisible(n, self.world, "batch")
            return t[self.rank * n // self.world:(self.rank + 1) * n // self.world]

        if isinstance(batch, dict):
            return {k: cut(v) for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._cut(b, even) if isinstance(b, dict) else cut(b) for b in batch)
        return cut(batch)

    def shard_stream(self, stream) -> "ShardStream":
        """The training stream this rank draws from: its slice of every global batch."""
        return ShardStream(stream, self)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (a new tensor, on this rank's device)."""
        out = values.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    # --- training -------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (its gradients averaged over the ranks in the
        backward pass; rank 0's weights and buffers copied to every rank now). On CUDA its batch
        norm layers become SyncBatchNorm first (statistics of the global batch; the parameters
        and buffers are the same tensors, so ``model`` keeps training and saving them)."""
        if self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index])
        return nn.parallel.DistributedDataParallel(model)

    def run_key(self, config: RunConfig, key: str) -> str:
        """The key of ``config`` trained by these ranks (see :func:`run_key`)."""
        return run_key(config, key, self.world, self.device)

    # --- the mask ------------------------------------------------------------------------------

    def check_method(self, method: str, data_free: bool) -> None:
        """Refuse a pruning method whose scores cannot be averaged over the ranks' slices."""
        check_method(method, data_free, self.world)

    @contextlib.contextmanager
    def averaged_gradients(self, model: nn.Module) -> Iterator[None]:
        """Within the block, every gradient computed for a parameter of ``model`` (by
        ``backward`` or ``torch.autograd.grad``) is averaged over the ranks as it is computed:
        each rank scores its slice, and the method sees the gradient of the whole batch's mean
        loss (for equal slices). The graph is the same on every rank, so the hooks fire in the
        same order everywhere."""
        def average(grad: torch.Tensor) -> torch.Tensor:
            out = grad.detach().clone()
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            return out.div_(self.world)

        seen: set[int] = set()
        handles = []
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                handles.append(p.register_hook(average))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def check_same_mask(self, mask: Mask | None) -> None:
        """Fail unless every rank holds the same mask (a checksum of its names and bits, compared
        by its minimum and maximum over the ranks)."""
        digest = hashlib.sha256()
        for name in sorted(mask or {}):
            digest.update(name.encode())
            digest.update(mask[name].to(torch.uint8).cpu().numpy().tobytes())
        value = int.from_bytes(digest.digest()[:6], "big")  # exact in float64
        both = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if int(both[0]) != value or int(-both[1]) != value:
            raise SparsetrainError(
                f"the pruning masks differ across the {self.world} ranks (rank {self.rank}'s checksum "
                f"{value:x}): the ranks would train different networks. Prune once (`sparsetrain prune "
                "--out mask.safetensors`) and train that file (`sparsetrain train --mask mask.safetensors "
                "--nproc N`), and report this as a bug"
            )


class ShardStream:
    """A training stream's interface (``batch``, ``iter_from``, ``steps_per_epoch``,
    ``batch_size``) over one rank's slices of another stream's global batches."""

    def __init__(self, stream, ranks: Ranks):
        self.stream, self.ranks = stream, ranks
        self.steps_per_epoch = stream.steps_per_epoch
        self.batch_size = check_divisible(stream.batch_size, ranks.world, "train.batch_size")

    def batch(self, step: int):
        return self.ranks.shard(self.stream.batch(step))

    def iter_from(self, step: int = 0):
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self):
        return self.iter_from(0)


def differs_from_one_process(config: RunConfig, device: torch.device | str) -> list[str]:
    """What in ``config``'s model makes N processes train differently from one (beyond float
    rounding): dropout, and batch normalisation off CUDA. Read from the model built on the meta
    device (no memory, no initialisation); a model that cannot be built there counts as differing."""
    from .models import create_model

    try:
        with torch.device("meta"):
            model = create_model(config.model, **config.model_args)
    except Exception:  # (its real build, later, says what is wrong with it)
        return ["a model whose layers could not be inspected"]
    found = []
    if any((isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or (isinstance(m, nn.RNNBase) and m.dropout > 0)
           for m in model.modules()):
        found.append("dropout (each process draws its own masks for its slice)")
    if torch.device(device).type != "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                    for m in model.modules()):
        found.append("batch normalisation on CPU (each process normalises its slice; SyncBatchNorm needs CUDA)")
    return found


def run_key(config: RunConfig, key: str, nproc: int, device: torch.device | str) -> str:
    """``key`` (the one-process key of ``config``) where N processes train as one does; else a
    key of its own that includes ``nproc`` (:func:`differs_from_one_process`)."""
    if nproc == 1 or not differs_from_one_process(config, device):
        return key
    return hashlib.sha256(f"{key}|nproc={nproc}".encode()).hexdigest()[:16]


def check_divisible(batch_size: int, nproc: int, what: str) -> int:
    """``batch_size / nproc``, refused unless whole: every rank takes an equal slice, so that the
    averaged gradient is the whole batch's.

        >>> check_divisible(128, 4, "train.batch_size")
        32
        >>> check_divisible(100, 3, "train.batch_size")
        Traceback (most recent call last):
        ...
        sparsetrain.errors.SparsetrainError: train.batch_size 100 cannot be split evenly over 3 processes: ...
    """
    if batch_size % nproc:
        lower, upper = batch_size - batch_size % nproc, batch_size + nproc - batch_size % nproc
        raise SparsetrainError(
            f"{what} {batch_size} cannot be split evenly over {nproc} processes: each takes an equal "
            f"slice of the global batch. Choose a {what} divisible by {nproc} (e.g. {lower or upper} or "
            f"{upper}), or another --nproc"
        )
    return batch_size // nproc


def check_method(method: str, data_free: bool, nproc: int) -> None:
    """Refuse a method whose scores are not first-order gradients summed over batches."""
    if data_free or method in GRADIENT_METHODS:
        return
    raise SparsetrainError(
        f"pruning method {method!r} cannot find its mask from scores averaged over {nproc} processes' "
        f"slices (only {', '.join(GRADIENT_METHODS)} and the data-free methods can): prune first in one "
        f"process (`sparsetrain prune --method {method} ... --out mask.safetensors`) and train that mask "
        f"with `sparsetrain train --mask mask.safetensors --nproc {nproc}`"
    )


def check_config(config: RunConfig, nproc: int, mask: Mask | None = None) -> None:
    """What ``--nproc N`` needs of a config, refused before any process starts: N >= 1, the
    global batch (and the pruning batch) divisible by N, a pruning method that can be averaged,
    and no pruning after training (which arranges several runs)."""
    from .pipeline import AFTER_TRAINING, DENSE
    from .pruning import METHODS

    if not isinstance(nproc, int) or nproc < 1:
        raise SparsetrainError(f"--nproc must be a whole number of at least 1, got {nproc!r}")
    p, t = config.prune, config.train
    check_divisible(t.batch_size, nproc, "train.batch_size")
    if p.method in AFTER_TRAINING and mask is None:
        raise SparsetrainError(
            f"method {p.method!r} prunes after training in several recorded runs, which --nproc does not "
            "arrange: run it in one process (leave --nproc out)"
        )
    if mask is None and p.method != DENSE:
        data_free = getattr(METHODS.get(p.method), "data_free", False)
        check_method(p.method, data_free, nproc)
        if not data_free:
            check_divisible(p.batch_size or t.batch_size, nproc, "prune.batch_size")


# --- one rank ---------------------------------------------------------------------------------

def run_rank(config: RunConfig, *, store: str | Path | None = "default", data_dir: str | Path | None = None,
             device: str | None = None, force: bool = False, progress: bool = True, download: bool = True,
             mask: Mask | None = None, threads: int | None = None, callbacks: list = (),
             timeout_s: float = TIMEOUT_S):
    """This process's part of a data-parallel run, in a process torchrun (or :func:`run_ddp`)
    started (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the rendezvous
    address in the environment). Returns rank 0's :class:`~sparsetrain.run.RunOutcome` on rank 0
    and None on the others."""
    from .run import RunStore, default_store_root, run
    from .threads import request_threads
    from .train.loop import resolve_device

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    check_config(config, world, mask)
    where = resolve_device(device)
    if where.type == "cuda":
        where = resolve_device(f"cuda:{local_rank}")
        torch.cuda.set_device(where)
    request_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend_for(where), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        ranks = Ranks(rank, world, where)
        opened = None
        if ranks.writer and store is not None:
            opened = store if isinstance(store, RunStore) else RunStore(
                default_store_root() if store == "default" else store)

        def recorded() -> bool:  # rank 0 returns the recorded outcome; the others have nothing to do
            return opened is not None and not force and _recorded(opened, config, mask, world, where) is not None

        if ranks.from_writer(recorded) and not ranks.writer:
            return None
        outcome = run(config, store=opened, data_dir=data_dir, device=str(where), force=force,
                      progress=progress if ranks.writer else None, download=download, mask=mask,
                      callbacks=callbacks, parallel=ranks)
        return outcome if ranks.writer else None
    finally:
        dist.destroy_process_group()


# --- N local processes ---------------------------------------------------------------------------

def run_ddp(config: RunConfig, nproc: int, *, store: str | Path | None = "default",
            data_dir: str | Path | None = None, device: str | None = None, force: bool = False,
            progress: bool = True, download: bool = True, mask: Mask | None = None,
            threads: int | None = None, callbacks: list = (), timeout_s: float = TIMEOUT_S):
    """Train ``config`` in ``nproc`` processes on this machine (torch's elastic launcher, a
    rendezvous on a free local port), each running :func:`run_rank`; returns rank 0's
    :class:`~sparsetrain.run.RunOutcome`. ``nproc=1`` is :func:`sparsetrain.run` in this process.
    On CUDA rank r trains on ``cuda:r`` (nproc at most the device count). A failed rank's error
    is raised here (as :class:`SparsetrainError` when it was one). ``callbacks`` and ``mask`` are
    pickled to the processes."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .pipeline import validate
    from .run import RunStore, Terminated, default_store_root, run
    from .train.loop import resolve_device

    validate(config)
    check_config(config, nproc, mask)
    where = resolve_device(device)
    if where.type == "cuda" and nproc > torch.cuda.device_count():
        raise SparsetrainError(f"--nproc {nproc} on CUDA needs {nproc} devices, one per process; this machine "
                               f"has {torch.cuda.device_count()}: use --nproc {torch.cuda.device_count()} or fewer")
    if isinstance(store, (str, Path)):  # a path the processes can open (a RunStore stays here)
        store = str(default_store_root() if store == "default" else store)
    elif store is not None:
        store = str(store.root)
    if store is not None and not force and Path(store).exists():  # recorded: no processes to start
        done = _recorded(RunStore(store), config, mask, nproc, where)
        if done is not None:
            return done
    kwargs = dict(store=store, data_dir=None if data_dir is None else str(data_dir), device=device,
                  force=force, progress=progress, download=download, mask=mask, threads=threads,
                  callbacks=list(callbacks), timeout_s=timeout_s)
    if nproc == 1:
        from .threads import request_threads

        if threads is not None:
            request_threads(threads)
        return run(config, store=store, data_dir=data_dir, device=device, force=force, progress=progress,
                   download=download, mask=mask, callbacks=callbacks)
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"sparsetrain-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        with _launcher_quiet():  # its log repeats a failed rank's traceback; the error below says it once
            results = elastic_launch(launch, _launched_rank)(config, kwargs)
    except ChildFailedError as err:
        raise _failure(err, nproc) from None
    except SignalException as err:  # Ctrl-C or SIGTERM: the ranks got it too, and rank 0 recorded the run as interrupted
        if err.sigval == signal.SIGTERM:
            raise Terminated("SIGTERM: the run is kept and resumes from its last checkpoint when started again") from None
        raise KeyboardInterrupt(str(err)) from None
    return results[0]


@contextlib.contextmanager
def _launcher_quiet() -> Iterator[None]:
    """The launcher's own loggers (torch elastic, torch.multiprocessing) above warnings muted
    within the block."""
    names = [name for name in logging.root.manager.loggerDict
             if name.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]
    loggers = [logging.getLogger(name) for name in ["torch.distributed.elastic", "torch.multiprocessing", *names]]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _recorded(store, config: RunConfig, mask: Mask | None, nproc: int, device):
    """The outcome ``store`` holds for this run in ``nproc`` processes if it is finished, else None."""
    from .run import recorded_outcome
    from .run import run_key as one_process_key

    return recorded_outcome(store, run_key(config, one_process_key(config, mask), nproc, device), config, mask)


def _launched_rank(config: RunConfig, kwargs: dict[str, Any]):
    """The entry point of each process :func:`run_ddp` starts."""
    return run_rank(config, **kwargs)


def _failure(err, nproc: int) -> Exception:
    """The first failed rank's error: a :class:`SparsetrainError` (bad input) as its message, as
    one process would have said it; anything else as a RuntimeError carrying the rank's traceback."""
    rank, failure = min(err.failures.items(), key=lambda item: item[1].timestamp or 0)
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", str(message))
    text = str(message).strip()
    prefix = "SparsetrainError: "
    if text.startswith(prefix):
        return SparsetrainError(f"rank {rank} of {nproc}: {text[len(prefix):]}")
    data = failure.error_file_data if isinstance(getattr(failure, "error_file_data", None), dict) else {}
    stack = (data.get("message") or {}).get("extraInfo", {}).get("py_callstack", "") \
        if isinstance(data.get("message"), dict) else ""
    return RuntimeError(f"rank {rank} of {nproc} failed (exit code {failure.exitcode}): {text}; the other "
                        "processes were stopped" + (f"\n\nrank {rank}'s traceback:\n{stack}" if stack else ""))

