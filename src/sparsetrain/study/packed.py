"""Many trials of one study point trained at once on one device ("packing").

The trials of one (workload, batch size, sparsity) share everything but their seed (their plan
index: their own initialization, mask and data order) and their metaparameters (learning rate,
momentum, decay steps, end learning-rate factor). A pack of K such trials keeps every parameter
stacked, ``(K, *shape)``, with the masks stacked beside them, and trains all K with one call per
step: ``torch.func.vmap`` over ``grad_and_value`` of ``functional_call`` on one module, each
trial on its own batch (``(K, B, ...)``, trial k's batch being the one its run alone would draw
at that step). SGD (plain, momentum, Nesterov, weight decay) is written on the stacked tensors
with the metaparameters as ``(K,)`` tensors, in the order ``torch.optim.SGD`` applies them; the
learning rate of each step is each trial's own schedule (the same registered schedule functions
a single run uses). Gradients are multiplied by the mask, as :class:`~sparsetrain.masks.GradientMask`
does for a single run.

Each trial keeps the single loop's bookkeeping (:func:`sparsetrain.train.loop.train`): the
running training loss checked every 50 steps (not finite: the trial ends 'infeasible' there),
the full validation error every ``val_every`` steps, its own callbacks (``TrialWatch``'s early
stop, :class:`~sparsetrain.train.loop.StopAtGoal` for ``goal_error``), and leaves the pack at its
own end, with its test errors measured as the single run measures them. A packed trial's curve
equals the same trial run alone up to float rounding (vmap's batched kernels sum in another
order): tests/test_study_packed.py checks every check's error to 1e-5 and the early-stop step.
Every ``checkpoint_every`` steps each trial hands out the checkpoint its single run would have
written there (:meth:`Pack.handover`), so that a killed pack's trials resume through the single
loop.

What can be packed (:func:`why_not_packable`, :func:`why_not_packable_model`): SGD, dense
execution, models without buffers or dropout (batch norm's running statistics and dropout's random
draws are not per-trial here) whose operations vmap can batch (not torch's fused RNN kernels:
:meth:`Pack.probe` finds out), and trials whose configs differ only in seed and the searched
metaparameters. Anything else runs one trial at a time, which stays the reference.

Whether packing pays depends on the device and the step's size: on a GPU a small network at a
small batch leaves most of the device idle, and a pack fills it; on a CPU the per-step work is
already spread over the cores, and vmap's grouped convolutions can be slower than K separate ones.
:func:`measure` times a few steps of a pack against the same steps one trial at a time, in the
same process, and :func:`choose` packs only where the measured ratio pays.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain.batches import logits_of
from sparsetrain.config import RunConfig
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import Mask, resolve_mask
from sparsetrain.init import initialize_
from sparsetrain.models import create_model
from sparsetrain.pipeline import Built, build, init_under_mask, validate
from sparsetrain.threads import training_threads
from sparsetrain.train.loop import FINISHED, INFEASIBLE, STOPPED, Callback, StopAtGoal, TrainResult, handover_state
from sparsetrain.train.optim import SCHEDULES, total_iterations

#: The settings trials of one pack may differ in (besides the seed): the searched metaparameters.
PER_TRIAL = ("lr", "momentum", "decay_every", "end_lr_factor")
#: The pack size ``--pack auto`` tries.
AUTO_PACK = 16
#: ``--pack auto`` measures packs of at most this many examples a step (K * B): large batches fill
#: a device alone, and K of them would hold K times the activations.
AUTO_EXAMPLES = 4096
#: ``--pack auto`` packs when a pack trains at least this many times the trials per second of one
#: trial at a time (a margin over 1: the measurement is a few steps on a possibly loaded machine).
PAYS = 1.2
LOSS_EVERY = 50  # the single loop reads its running training loss every 50 steps


class NotPackable(SparsetrainError):
    """These trials cannot train as one pack; ``why`` says what stands in the way."""

    def __init__(self, why: str):
        super().__init__(f"these trials cannot be packed: {why}; run them one at a time (--pack 1)")
        self.why = why


def parse_pack(text: str | int) -> str | int:
    """``--pack``'s value: ``"auto"`` or a whole number >= 1 (1: one trial at a time).

    >>> parse_pack("auto"), parse_pack("8"), parse_pack(1)
    ('auto', 8, 1)
    """
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if isinstance(text, bool) or value < 1 or str(value) != str(text).strip():
        raise SparsetrainError(f"--pack takes auto or a whole number >= 1 (1: one trial at a time, K: up to K "
                               f"trials of a point trained together); got {text!r}")
    return value


def default_pack(device: str | None) -> str | int:
    """``--pack``'s default for ``device`` (None: CUDA when available, as the runs): ``"auto"`` on a
    GPU, where small trials leave the device idle; 1 on a CPU, where packing measured 0.71x at B = 16
    and 0.45x at B = 128 (docs/results/bench_packing.md), so auto's minute or two of measuring a
    point would buy nothing.

    >>> default_pack("cpu"), default_pack("cuda:1")
    (1, 'auto')
    """
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "auto" if torch.device(name).type == "cuda" else 1


# ----------------------------------------------------------------------------- what packs


def why_not_packable(configs: list[RunConfig]) -> str | None:
    """Why these trial configs cannot train as one pack (None: they can)."""
    if not configs:
        return "no trials"
    first = configs[0]
    t = first.train
    if t.optimizer != "sgd":
        return f"optimizer {t.optimizer!r} (packing writes SGD's update: plain, momentum, Nesterov)"
    if t.execution != "dense":
        return f"execution {t.execution!r} (packing trains dense tensors under masks)"
    if t.val_every <= 0:
        return "no validation checks (train.val_every 0)"
    if first.prune.isometry:
        return "prune.isometry (a single run records its summary)"

    def shared(c: RunConfig) -> dict[str, Any]:
        d = c.replace(seed=0, train={k: getattr(t, k) for k in PER_TRIAL}).to_dict()
        d.pop("name", None)
        return d

    base = shared(first)
    for c in configs[1:]:
        if shared(c) != base:
            return "trials that differ in more than their seed and searched metaparameters"
    return None


def why_not_packable_model(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained stacked (None: it can)."""
    if any(True for _ in model.buffers()):
        return f"{type(model).__name__} has buffers (e.g. batch norm's running statistics)"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return f"{type(model).__name__} has dropout (its random draws would not be each trial's own)"
    return None


# ----------------------------------------------------------------------------- one pack


@dataclass
class Member:
    """One trial of a pack: its run ``config`` and ``mask`` (None: dense), ``callbacks`` as the
    single loop takes them, ``on_metrics(step, values)`` for every value measured,
    ``on_end(result)`` called as soon as the trial leaves the pack (before the others go on), and
    ``on_checkpoint(step, state)`` every ``train.checkpoint_every`` steps and at the trial's end
    (unless it diverged) with the checkpoint the single loop would have written there
    (:func:`~sparsetrain.train.loop.handover_state`), from which the single loop resumes the trial
    and which holds a finished trial's final weights, as a single run's does."""

    config: RunConfig
    mask: Mask | None = None
    callbacks: list[Callback] = field(default_factory=list)
    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    on_end: Callable[[TrainResult], None] | None = None
    on_checkpoint: Callable[[int, dict[str, Any]], None] | None = None


def _reseeded(stream, seed: int):
    """The training stream ``stream`` with another shuffle seed (the data tensors shared)."""
    other = copy.copy(stream)
    other.seed, other._perm_epoch, other._perm = seed, None, None
    return other


class Pack:
    """K trials' stacked state, trained a step at a time. Built as each trial's single run would
    be built (:func:`sparsetrain.pipeline.build` for the first, the same data with each trial's
    seed for the others; :func:`~sparsetrain.pipeline.init_under_mask` for each)."""

    def __init__(self, members: list[Member], *, data_dir: str | Path | None = None, device=None,
                 download: bool = True):
        why = why_not_packable([m.config for m in members])
        if why is not None:
            raise NotPackable(why)
        self.members = list(members)
        first = members[0].config
        for m in members:
            validate(m.config)
        built0 = build(first, data_dir=data_dir, device=device, download=download)
        self.device, self.loaders = built0.device, built0.loaders
        models, self.streams = [], []
        for m in members:
            if m is members[0]:
                built = built0
            else:  # pipeline.build's model stage with this trial's seed, on the same data
                loaders = dataclasses.replace(built0.loaders, train=_reseeded(built0.loaders.train, m.config.seed))
                model = create_model(m.config.model, input_shape=loaders.input_shape,
                                     num_classes=loaders.num_classes, **m.config.model_args).to(self.device)
                initialize_(model, m.config.init, m.config.seed)
                built = Built(m.config, loaders, model, self.device, data_dir=data_dir, download=download)
            model, _ = init_under_mask(m.config, built, m.mask)
            why = why_not_packable_model(model)
            if why is not None:
                raise NotPackable(why)
            models.append(model)
            self.streams.append(built.loaders.train)
        self.module = models[0]  # the structure functional_call runs; its own tensors are not used
        self.names = [n for n, _ in self.module.named_parameters()]
        self.params = {n: torch.stack([dict(md.named_parameters())[n].detach() for md in models])
                       for n in self.names}  # (K, *shape) each
        self.masks = self._stack_masks(models)
        t = first.train
        self.total = total_iterations(t, self.loaders.train.steps_per_epoch)
        self.weight_decay, self.nesterov = t.weight_decay, t.nesterov
        self.schedules = [SCHEDULES.create(t.schedule, m.config.train, self.total) for m in members]
        self.base_lr = [m.config.train.lr for m in members]
        self.momentum = torch.tensor([m.config.train.momentum for m in members], device=self.device)
        self.uses_momentum = any(m.config.train.momentum != 0 for m in members)
        self.buffers: dict[str, torch.Tensor] | None = None
        self.step_fn = torch.func.vmap(torch.func.grad_and_value(self._loss, has_aux=True))
        self.eval_fn = torch.func.vmap(self._logits, in_dims=(0, None))

    def _stack_masks(self, models) -> dict[str, torch.Tensor]:
        per_trial = [resolve_mask(m.mask, md) if m.mask is not None else {} for m, md in zip(self.members, models)]
        names = [n for n in self.names if any(n in r for r in per_trial)]
        return {n: torch.stack([r[n].to(self.params[n].dtype) if n in r else torch.ones_like(self.params[n][0])
                                for r in per_trial]).to(self.device) for n in names}

    def _loss(self, params, x, y):
        logits = logits_of(torch.func.functional_call(self.module, params, (x,)))
        return F.cross_entropy(logits, y), logits

    def _logits(self, params, x):
        return logits_of(torch.func.functional_call(self.module, params, (x,)))

    def __len__(self) -> int:
        return len(self.members)

    def lr_at(self, step: int) -> list[float]:
        """Each trial's learning rate for step ``step`` (1-based): LambdaLR's ``base * f(step - 1)``."""
        return [lr * f(step - 1) for lr, f in zip(self.base_lr, self.schedules)]

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train step ``step`` (1-based) of every trial: returns the losses (K,), logits (K, B, C)
        and targets (K, B)."""
        batches = [s.batch(step - 1) for s in self.streams]
        x = torch.stack([b[0] for b in batches])  # (K, B, ...)
        y = torch.stack([b[1] for b in batches])  # (K, B)
        self.module.train()
        grads, (loss, logits) = self.step_fn(self.params, x, y)
        lr = torch.tensor(self.lr_at(step), device=self.device)
        first = self.buffers is None
        if first and self.uses_momentum:
            self.buffers = {}
        for n in self.names:
            p, g = self.params[n], grads[n]
            if n in self.masks:
                g = g * self.masks[n]  # GradientMask.after_backward
            view = (-1,) + (1,) * (p.dim() - 1)
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            if self.uses_momentum:  # torch.optim.SGD: buf = g at the first step, then mu * buf + g
                mu = self.momentum.view(view)
                if first:
                    self.buffers[n] = g.clone()
                else:
                    self.buffers[n].mul_(mu).add_(g)
                buf = self.buffers[n]
                g = g + mu * buf if self.nesterov else buf
            p.sub_(lr.view(view) * g)
        return loss.detach(), logits.detach(), y

    @torch.no_grad()
    def evaluate(self, loader, keep: list[int] | None = None) -> tuple[list[float], list[float]]:
        """(errors, mean losses) of the trials ``keep`` (default all) over ``loader``, in inference
        mode; each evaluation batch is split so that K trials' activations fit as one batch would."""
        params = self.params if keep is None else {n: p[keep] for n, p in self.params.items()}
        k = next(iter(params.values())).shape[0]
        self.module.eval()
        wrong = torch.zeros(k, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros(k, dtype=torch.float64, device=self.device)  # as the single path's Python floats
        n = 0
        for x, y in loader:
            chunk = max(1, len(x) // k)
            for start in range(0, len(x), chunk):
                xs, ys = x[start:start + chunk], y[start:start + chunk]
                logits = self.eval_fn(params, xs)  # (k, b, C)
                losses = F.cross_entropy(logits.flatten(0, 1), ys.repeat(k), reduction="none").view(k, -1)
                loss_sum += losses.sum(1).double()
                wrong += (logits.argmax(-1) != ys).sum(1)
                n += len(xs)
        self.module.train()
        return [w / n for w in wrong.tolist()], [s / n for s in loss_sum.tolist()]

    def probe(self) -> None:
        """Take a training step and evaluate two examples (on copies: the pack is unchanged), so
        that an operation vmap cannot batch (in training or in inference mode) raises now."""
        saved = (self.params, self.buffers)
        self.params = {n: p.clone() for n, p in self.params.items()}
        try:
            self.step(1)
            x, y = self.loaders.train.batch(0)
            self.evaluate([(x[:2], y[:2])])
        finally:
            self.params, self.buffers = saved

    def trial_params(self, i: int) -> dict[str, torch.Tensor]:
        return {n: p[i].clone() for n, p in self.params.items()}

    def handover(self, i: int, step: int, *, seconds: float, running: dict[str, Any] | None, best_step=None,
                 best_val_error=None, best_params=None, min_test_error: float = math.inf) -> dict[str, Any]:
        """Trial ``i``'s checkpoint after step ``step``, as its single run would have written it
        (:func:`~sparsetrain.train.loop.handover_state`): its weights, momentum buffers,
        schedule, running training loss and best validation check."""
        model = copy.deepcopy(self.module)  # (no buffers: a packable model has parameters only)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.params[n][i])
        config = self.members[i].config
        buffers = {n: b[i] for n, b in self.buffers.items()} if self.buffers is not None else None
        return handover_state(config.train, model, step, self.total, seed=config.seed, seconds=seconds,
                              momentum_buffers=buffers, running=running, best_step=best_step,
                              best_val_error=best_val_error, best_model=best_params, min_test_error=min_test_error)

    def drop(self, gone: list[int]) -> None:
        """Remove the trials at positions ``gone`` from the pack."""
        keep = [i for i in range(len(self.members)) if i not in set(gone)]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.params = {n: p.index_select(0, index).contiguous() for n, p in self.params.items()}
        self.masks = {n: m.index_select(0, index).contiguous() for n, m in self.masks.items()}
        if self.buffers is not None:
            self.buffers = {n: b.index_select(0, index).contiguous() for n, b in self.buffers.items()}
        self.momentum = self.momentum.index_select(0, index)
        for name in ("members", "streams", "schedules", "base_lr"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])


@dataclass
class _Track:
    """One trial's bookkeeping: its callbacks, best validation state, curves."""

    member: Member
    callbacks: list[Callback]
    best_step: int | None = None
    best_val_error: float | None = None
    best_params: dict[str, torch.Tensor] | None = None
    min_test_error: float = math.inf
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def record(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.curves.setdefault(k, []).append((step, v))
        if self.member.on_metrics is not None:
            self.member.on_metrics(step, values)


def train_pack(members: list[Member], *, data_dir: str | Path | None = None, device=None,
               download: bool = True) -> list[TrainResult]:
    """Train ``members`` together (see the module docstring); each trial's
    :class:`~sparsetrain.train.loop.TrainResult` in the members' order, each as its run alone
    would end (status, steps, curves, test errors; ``seconds``: the pack's time until it left)."""
    return train(Pack(members, data_dir=data_dir, device=device, download=download))


def train(pack: Pack) -> list[TrainResult]:
    """Train a built :class:`Pack` to every trial's end (:func:`train_pack`)."""
    members = list(pack.members)
    tracks = [_Track(m, list(m.callbacks) + ([StopAtGoal(m.config.train.goal_error)]
                                             if m.config.train.goal_error > 0 else [])) for m in members]
    results: dict[int, TrainResult] = {}
    ids = list(range(len(members)))  # the members' positions in the caller's list, for the live trials
    t = members[0].config.train
    started = time.perf_counter()
    torch.manual_seed(members[0].config.seed)  # as the loop does (nothing here draws from it)
    batch = t.batch_size * len(members)
    run_loss: Any = 0.0
    run_wrong: Any = 0
    batches = 0

    def checkpoint(i: int, tr: _Track, step: int) -> None:
        """Hand trial ``i`` its single run's checkpoint of ``step`` (see :class:`Member`)."""
        if tr.member.on_checkpoint is None:
            return
        running = {"loss": run_loss[i] if batches else 0.0, "wrong": run_wrong[i] if batches else 0,
                   "n": batches * t.batch_size, "batches": batches, "judged": True}
        tr.member.on_checkpoint(step, pack.handover(
            i, step, seconds=time.perf_counter() - started, running=running, best_step=tr.best_step,
            best_val_error=tr.best_val_error, best_params=tr.best_params, min_test_error=tr.min_test_error))

    with training_threads(pack.module, pack.loaders.input_shape, batch, pack.device):
        for step in range(1, pack.total + 1):
            if not len(pack):
                break
            losses, logits, targets = pack.step(step)
            # the single loop's running sums, one per trial (all trials pop them at the same steps)
            run_loss = losses + run_loss
            run_wrong = (logits.argmax(-1) != targets).sum(1) + run_wrong  # (k,)
            batches += 1
            last = step == pack.total
            popped = None
            if step % LOSS_EVERY == 0 or last:
                popped = ([x / batches for x in run_loss.tolist()],  # as float(loss) / batches, one sync
                          [w / (batches * t.batch_size) for w in run_wrong.tolist()])
                run_loss, run_wrong, batches = 0.0, 0, 0
            lrs = pack.lr_at(step + 1)  # after schedule.step(): what get_last_lr() shows
            ending: list[tuple[int, str, str | None]] = []  # (position, status, reason)
            check = pack.loaders.val is not None and (last or step % t.val_every == 0)
            val = pack.evaluate(pack.loaders.val) if check else None
            test = pack.evaluate(pack.loaders.test) if t.test_every and step % t.test_every == 0 and not last \
                else None
            for i, tr in enumerate(tracks):
                stops = [c.on_step(step, losses[i]) for c in tr.callbacks]
                if popped is not None:
                    train_loss, train_error = popped[0][i], popped[1][i]
                    if not math.isfinite(train_loss):
                        tr.record(step, {"train_loss": train_loss})
                        ending.append((i, INFEASIBLE, f"the training loss is {train_loss} at iteration {step}"))
                        continue
                    tr.record(step, {"train_loss": train_loss, "lr": lrs[i], "train_error": train_error})
                if val is not None:
                    metrics = {"val_error": val[0][i], "val_loss": val[1][i]}
                    tr.record(step, metrics)
                    if tr.best_val_error is None or metrics["val_error"] < tr.best_val_error:
                        tr.best_step, tr.best_val_error = step, metrics["val_error"]
                        tr.best_params = pack.trial_params(i)
                    stops += [c.on_eval(step, metrics) for c in tr.callbacks]
                if test is not None:
                    tr.record(step, {"test_error": test[0][i]})
                    tr.min_test_error = min(tr.min_test_error, test[0][i])
                reason = next((r for r in stops if r), None)
                if reason:
                    ending.append((i, STOPPED, reason))
                elif last:
                    ending.append((i, FINISHED, None))
            for i, status, reason in ending:
                result = _end(pack, tracks[i], i, step, status, reason, time.perf_counter() - started)
                results[ids[i]] = result
                if status != INFEASIBLE:  # the single loop's last checkpoint: the final weights
                    checkpoint(i, tracks[i], step)
                if tracks[i].member.on_end is not None:
                    tracks[i].member.on_end(result)
            if ending:
                gone = [i for i, _, _ in ending]
                keep = [i for i in range(len(tracks)) if i not in gone]
                if batches:  # (running sums are reset at every pop: only a stop between pops leaves some)
                    run_loss, run_wrong = run_loss[keep], run_wrong[keep]
                pack.drop(gone)
                tracks = [tr for i, tr in enumerate(tracks) if i not in gone]
                ids = [x for i, x in enumerate(ids) if i not in gone]
            if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:  # as the single loop does
                for i, tr in enumerate(tracks):
                    checkpoint(i, tr, step)
    return [results[i] for i in range(len(members))]


def _end(pack: Pack, tr: _Track, i: int, step: int, status: str, reason: str | None, seconds: float) -> TrainResult:
    """Trial ``i``'s result as the single loop ends it: nothing tested after divergence; else the
    test error of the final weights and of the best validation check's."""
    t = tr.member.config.train
    if status == INFEASIBLE:
        return TrainResult(steps=step, final_test_error=None, final_val_error=None, best_val_step=tr.best_step,
                           best_val_error=tr.best_val_error, best_val_test_error=None, min_test_error=None,
                           seconds=seconds, curves=tr.curves, status=status, stop_reason=reason)
    (final_test,), (final_loss,) = pack.evaluate(pack.loaders.test, keep=[i])
    tr.record(step, {"test_error": final_test, "test_loss": final_loss})
    best_test = None
    if tr.best_params is not None:
        saved = pack.params
        pack.params = {n: p.unsqueeze(0) for n, p in tr.best_params.items()}
        try:
            (best_test,), _ = pack.evaluate(pack.loaders.test)
        finally:
            pack.params = saved
    min_test = min(tr.min_test_error, final_test) if t.test_every else None
    last_val = tr.curves.get("val_error", [(None, None)])[-1][1]
    return TrainResult(steps=step, final_test_error=final_test, final_val_error=last_val, best_val_step=tr.best_step,
                       best_val_error=tr.best_val_error, best_val_test_error=best_test, min_test_error=min_test,
                       seconds=seconds, curves=tr.curves, status=status, stop_reason=reason)


# ----------------------------------------------------------------------------- does it pay


def single_stepper(member: Member, pack: Pack, index: int):
    """One trial's step as the single loop takes it (module forward/backward, the mask's
    gradient hook, ``torch.optim.SGD``), on a copy of the pack's trial ``index``: a function of
    the step number (1-based), its ``model`` attribute the module it trains."""
    from sparsetrain.batches import forward_loss
    from sparsetrain.masks import GradientMask
    from sparsetrain.train.optim import build_optimizer

    model = copy.deepcopy(pack.module)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(pack.params[n][index])
    hooks = [GradientMask(model, {n: m[index].bool() for n, m in pack.masks.items()})] if pack.masks else []
    optimizer = build_optimizer(model.parameters(), member.config.train)
    stream = pack.streams[index]

    def step(s: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = forward_loss(model, stream.batch(s - 1))
        loss.backward()
        for h in hooks:
            h.after_backward()
        optimizer.step()
        float(loss.detach())  # the device finishes the step before the clock is read

    step.model = model  # (what a benchmark evaluates to time the single path's validation check)
    return step


def measure(members: list[Member], *, steps: int = 3, rounds: int = 5, check_rounds: int = 2,
            val_examples: int = 500, data_dir=None, device=None, download: bool = True) -> dict[str, Any]:
    """Time a pack of ``members`` against the same trials one at a time, with the one interleaved
    timer (:func:`sparsetrain.measure.time_interleaved`: rounds after a warm-up, the order
    alternating, medians): ``steps`` training steps (``rounds`` rounds; each trial's single-run
    step: module forward/backward, the mask's gradient hook, ``torch.optim.SGD``), and a validation
    check (``check_rounds`` rounds, on the first ``val_examples`` validation examples, scaled to
    the whole split: evaluation is linear in the examples). Returns ``step_s`` and ``check_s``
    (median seconds of one step / one check, ``"pack"``: the pack's, ``"single"``: the K trials'
    one after the other), their paired ratios ``step_ratio`` and ``check_ratio`` (single over
    pack), and ``ratio``: the trials per hour the pack gains on this workload (``val_every`` steps
    and one check: the two paired ratios weighted by the pack's time in each; > 1: packing pays).
    Nothing is recorded and no trial is advanced."""
    from sparsetrain.measure import cuda_sync, time_interleaved
    from sparsetrain.train.loop import evaluate

    pack = Pack(members, data_dir=data_dir, device=device, download=download)
    singles = [single_stepper(m, pack, i) for i, m in enumerate(members)]

    def packed_steps() -> None:
        for s in range(1, steps + 1):
            losses, _, _ = pack.step(s)
        float(losses.sum())  # the device finishes before the clock is read

    def single_steps() -> None:
        for single in singles:
            for s in range(1, steps + 1):
                single(s)

    val, n = [], 0
    for x, y in pack.loaders.val or ():  # the first val_examples examples, in the loader's batches
        val.append((x[:val_examples - n], y[:val_examples - n]))
        n += len(val[-1][0])
        if n >= val_examples:
            break
    batch, sync = members[0].config.train.batch_size, cuda_sync(pack.device)
    with training_threads(pack.module, pack.loaders.input_shape, batch * len(members), pack.device) as threads:
        t_steps = time_interleaved({"pack": packed_steps, "single": single_steps}, rounds=rounds, warmup=1,
                                   number=1, sync=sync)
        t_checks = time_interleaved({"pack": lambda: pack.evaluate(val),
                                     "single": lambda: [evaluate(s.model, val) for s in singles]},
                                    rounds=check_rounds, warmup=1, number=1, sync=sync) if val else None
    step_s = {name: t / steps for name, t in t_steps.medians().items()}
    scale = pack.loaders.val.num_examples / n if val else 0.0
    check_s = {name: t_checks.medians()[name] * scale if val else 0.0 for name in step_s}
    # the pack's time per check interval split into steps and the check, each part sped up or slowed
    # down by its paired ratio (which cancels the load that changes between rounds; on one round
    # it is single's time over the pack's)
    step_ratio = t_steps.ratio("single", "pack")
    check_ratio = t_checks.ratio("single", "pack") if val else 1.0
    steps_part, check_part = members[0].config.train.val_every * step_s["pack"], check_s["pack"]
    ratio = (steps_part * step_ratio + check_part * check_ratio) / (steps_part + check_part)
    return {"pack": len(members), "threads": threads, "steps": steps, "rounds": rounds, "check_rounds": check_rounds,
            "val_examples": n, "step_s": step_s, "check_s": check_s,
            "step_spread": {name: t_steps.spread(name) for name in step_s},
            "step_ratio": step_ratio, "check_ratio": check_ratio if val else None, "ratio": ratio}


def choose(measured: dict[str, Any]) -> int:
    """The pack size to train with after :func:`measure`: its K where the ratio is at least
    :data:`PAYS`, else 1 (one trial at a time).

    >>> choose({"pack": 16, "ratio": 3.2}), choose({"pack": 16, "ratio": 0.67})
    (16, 1)
    """
    return measured["pack"] if measured["ratio"] >= PAYS else 1


# ----------------------------------------------------------------------------- in the study engine


def packing_summary(packing: dict[str, Any] | None) -> str | None:
    """What ``study status`` shows of a point's packing choice (the point's user attribute
    ``packing``): the pack size chosen and why.

    >>> packing_summary({"chosen": 16, "ratio": 3.21}), packing_summary({"chosen": 1, "ratio": 0.67})
    ('16 (measured 3.21x)', '1 (measured 0.67x)')
    >>> packing_summary({"chosen": 8, "asked": 8}), packing_summary({"chosen": 1, "reason": "optimizer 'adam'"})
    ('8 (asked)', "1 (optimizer 'adam')")
    """
    if not packing:
        return None
    chosen = packing["chosen"]
    if "ratio" in packing:
        return f"{chosen} (measured {packing['ratio']:.2f}x)"
    return f"{chosen} ({packing.get('reason', 'asked')})"


def _decide(opened, workload, batch_size: int, sparsity: float, study, pack, mask, *, data_dir=None,
            device=None) -> int:
    """The pack size for this point: ``pack`` when a number; for ``"auto"`` the choice already
    recorded in the point's user attribute ``packing`` (by any worker), else measured now
    (:func:`measure` on the point's first plan points: :data:`AUTO_PACK` of them at most, and at
    most :data:`AUTO_EXAMPLES` examples a step) and recorded. Trials that cannot be packed run one
    at a time, the reason recorded."""
    from sparsetrain.study.plan import plan_points

    recorded = study.user_attrs.get("packing")
    if recorded is not None and recorded.get("asked") == pack:
        return int(recorded["chosen"])
    size = min(AUTO_PACK if pack == "auto" else int(pack), opened.spec.trials)
    if pack == "auto":  # large batches fill the device alone
        size = min(size, max(2, AUTO_EXAMPLES // batch_size))
    configs = [workload.trial_config(batch_size, sparsity, p, seed=i)
               for i, p in enumerate(plan_points(workload.search, size))]
    members = [Member(c, mask) for c in configs]  # (one mask for all: it changes no timing)
    decision: dict[str, Any] = {"chosen": size, "asked": pack}
    try:
        if size < 2:
            raise NotPackable("one trial per point")
        if pack == "auto":
            measured = measure(members, data_dir=data_dir, device=device)
            decision = {"chosen": choose(measured), "asked": pack, **measured, "device": str(device or "auto")}
        else:  # a pack of two: refuses what cannot be packed
            Pack(members[:2], data_dir=data_dir, device=device).probe()
    except NotPackable as err:
        decision = {"chosen": 1, "asked": pack, "reason": err.why}
    except (RuntimeError, NotImplementedError) as err:  # an operation vmap cannot batch (e.g. a fused RNN kernel)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        decision = {"chosen": 1, "asked": pack, "reason": f"vmap cannot train it ({type(err).__name__}: {first_line})"}
    if recorded != decision:
        study.set_user_attr("packing", decision)
    return int(decision["chosen"])


def _claim_more(storage, study, count: int) -> list[int]:
    """Claim up to ``count`` more waiting trials of ``study`` (lowest plan index first), as the
    engine's claim does (Optuna's atomic WAITING -> RUNNING)."""
    import contextlib

    import optuna

    S = optuna.trial.TrialState
    taken: list[int] = []
    waiting = study.get_trials(deepcopy=False, states=(S.WAITING,))
    for t in sorted(waiting, key=lambda t: (t.user_attrs.get("plan_index", 0), t.number)):
        if len(taken) == count:
            break
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(t._trial_id, state=S.RUNNING):
                storage.record_heartbeat(t._trial_id)  # at once: a claimed trial must be taken over if we die
                taken.append(t._trial_id)
    return taken


def work_claimed(opened, claimed, pack, *, data_dir=None, device=None) -> int:
    """Run the trial the engine claimed (``claimed``: ``(point, study, trial_id)``) with up to
    K - 1 more waiting trials of the same point packed with it, K from :func:`_decide`; each
    trial is recorded as :func:`sparsetrain.study.engine.run_trial` records it (its own run in
    the run store, its outcome told to Optuna as soon as it leaves the pack). Returns how many
    trials ran."""
    from sparsetrain.study import engine

    (workload, batch_size, sparsity), study, trial_id = claimed
    frozen = study._storage.get_trial(trial_id)
    config = workload.trial_config(batch_size, sparsity, frozen.system_attrs.get("fixed_params", {}),
                                   seed=frozen.user_attrs["plan_index"])
    with engine.beating(study._storage, trial_id, opened.spec.heartbeat_interval):
        mask = engine.shared_mask(opened.folder, config, sparsities=opened.spec.sparsities, data_dir=data_dir,
                                  device=device)
        size = _decide(opened, workload, batch_size, sparsity, study, pack, mask, data_dir=data_dir, device=device)
        ids = [trial_id] + (_claim_more(opened.storage, study, size - 1) if size > 1 else [])
    kwargs = {"data_dir": data_dir, "device": device, "group_name": opened.name}
    if len(ids) == 1:
        engine.run_trial(opened.folder, opened.spec, workload, batch_size, sparsity, study, trial_id, **kwargs)
        return 1
    return run_packed(opened, workload, batch_size, sparsity, study, ids, data_dir=data_dir, device=device)


def run_packed(opened, workload, batch_size: int, sparsity: float, study, trial_ids: list[int], *,
               data_dir=None, device=None) -> int:
    """Train the claimed trials ``trial_ids`` of one point as one pack and record each (see
    :func:`work_claimed`). A trial whose run the store already holds (finished: reused; begun,
    alone or in a pack, with a checkpoint: resumed) or that another process trains now goes through
    :func:`~sparsetrain.study.engine.run_trial` instead. A KeyboardInterrupt gives every
    unrecorded trial back; an error fails them (as run_trial does) and propagates."""
    import contextlib
    import os
    import socket

    import optuna

    from sparsetrain.pipeline import layer_table, overall
    from sparsetrain.run import CHECKPOINT_FILE, run_key, what_is_trained
    from sparsetrain.store import TERMINAL_STATUSES, RunStatus, RunStore
    from sparsetrain.study import engine

    folder, spec, storage = opened.folder, opened.spec, study._storage
    store = RunStore(folder / engine.RUNS_DIR)
    group = ("study", opened.name)
    singles: list[int] = []
    open_runs: dict[int, tuple[Any, str, Any]] = {}  # trial id -> (trial, run key, lease) until recorded
    done: set[int] = set()  # trial ids recorded
    with contextlib.ExitStack() as stack:
        for tid in trial_ids:
            stack.enter_context(engine.beating(storage, tid, spec.heartbeat_interval))
        members: list[Member] = []
        try:
            for tid in trial_ids:
                trial = optuna.Trial(study, tid)
                frozen = storage.get_trial(tid)
                index = frozen.user_attrs["plan_index"]
                params = engine.suggest_params(trial, frozen.system_attrs.get("fixed_params", {}))
                trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
                config = workload.trial_config(batch_size, sparsity, params, seed=index)
                mask = engine.shared_mask(folder, config, sparsities=spec.sparsities, data_dir=data_dir, device=device)
                key = run_key(config, mask)
                try:
                    lease = store.take_lease(key)
                except SparsetrainError:  # trained by another process now: run_trial waits for it
                    singles.append(tid)
                    continue
                record = store.get(key)
                resumable = record is not None and (store.artifact_dir(key) / CHECKPOINT_FILE).exists()
                if record is not None and (record.status in TERMINAL_STATUSES or resumable):
                    lease.release()  # reused or resumed by the single path
                    singles.append(tid)
                    continue
                if record is not None:  # an attempt killed before its first checkpoint: start over
                    store.delete(key)
                _, recorded = what_is_trained(config, mask)
                store.begin(key, recorded, config.seed, name=config.name, group=group)
                open_runs[tid] = (trial, key, lease)
                watch = engine.TrialWatch(trial, workload.goal_error, lambda: engine.best_known(study),
                                          spec.early_stop)
                end = _Recorder(store, study, trial, index, key, watch, workload, open_runs, done, tid)
                members.append(Member(config, mask, [watch], _logger(store, key, lease), end,
                                      _checkpointer(store.artifact_dir(key) / CHECKPOINT_FILE, lease)))
            if members:
                pack = Pack(members, data_dir=data_dir, device=device)
                for m in members:
                    m.on_end.layers = layer_table(m.mask, pack.module, pack.loaders.input_shape)
                    m.on_end.extra = {"sparsity": overall(m.mask), "device": str(pack.device), "packed": len(members)}
                train(pack)
            for tid in singles:
                engine.run_trial(folder, spec, workload, batch_size, sparsity, study, tid, data_dir=data_dir,
                                 device=device, group_name=opened.name)
                done.add(tid)
        except KeyboardInterrupt:
            for tid in (t for t in trial_ids if t not in done):
                if tid in open_runs:
                    _end_run(store, *open_runs[tid][1:], "KeyboardInterrupt: given back", RunStatus.INTERRUPTED)
                engine.give_back(study, tid)  # (a trial run_trial gave back already stays as it is)
            raise
        except BaseException as err:
            for tid in (t for t in trial_ids if t not in done):
                if tid in open_runs:  # this pack's error: failed, as run_trial fails a trial
                    trial = open_runs[tid][0]
                    _end_run(store, *open_runs[tid][1:], f"{type(err).__name__}: {err}", RunStatus.FAILED)
                    trial.set_user_attr("error", f"{type(err).__name__}: {err}")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:  # not started (or failed by its own run_trial): retried
                    engine.give_back(study, tid)
            raise
    return len(trial_ids)


def _end_run(store, key: str, lease, error: str, status: str) -> None:
    import contextlib

    with contextlib.suppress(SparsetrainError):
        if lease.lost is None:
            store.fail(key, error, status=status)
        lease.release()


def _logger(store, key: str, lease) -> Callable[[int, dict[str, float]], None]:
    """A packed trial's ``on_metrics``: into its run's metrics, as a single run logs them."""

    def on_metrics(step: int, values: dict[str, float]) -> None:
        lease.check()  # taken over by another process: stop before writing anything of theirs
        store.log_metrics(key, step, values)

    return on_metrics


def _checkpointer(path: Path, lease) -> Callable[[int, dict[str, Any]], None]:
    """A packed trial's ``on_checkpoint``: its single run's checkpoint file, which a retry of the
    trial resumes from through the single path (:func:`run_packed` hands it over)."""
    from sparsetrain.state_io import save_state

    def on_checkpoint(step: int, state: dict[str, Any]) -> None:
        lease.check()  # taken over by another process: the file is theirs now
        save_state(path, state)

    return on_checkpoint


class _Recorder:
    """A packed trial's ``on_end``: finish its run (results, layer table, timings) and tell Optuna
    as run_trial does (:func:`sparsetrain.study.engine.record_trial`), at once, so that the
    trials still in the pack see this one's steps-to-result for their early stop."""

    def __init__(self, store, study, trial, index, key, watch, workload, open_runs, done, tid):
        self.store, self.study, self.trial, self.index, self.key = store, study, trial, index, key
        self.watch, self.workload, self.open_runs, self.done, self.tid = watch, workload, open_runs, done, tid
        self.layers: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}

    def __call__(self, result: TrainResult) -> None:
        from sparsetrain.study import engine

        _, key, lease = self.open_runs[self.tid]
        lease.check()
        self.store.finish(key, result.as_results() | self.extra, layer_sparsity=self.layers,
                          timings={"prune_seconds": 0.0, "train_seconds": result.seconds}, status=result.status)
        lease.release()
        del self.open_runs[self.tid]
        curve = self.store.metrics(key, "val_error").get("val_error", [])
        for step, error in curve:
            self.watch.report(step, error)
        status, steps = engine.classify(result.status, curve, self.workload.goal_error)
        engine.record_trial(self.study, self.trial, self.index, status, steps, key, curve)
        self.done.add(self.tid)
