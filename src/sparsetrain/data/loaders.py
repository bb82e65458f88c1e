"""In-memory batching: preprocessing, the train/validation split, and the loaders.

No ``torch.utils.data.DataLoader``: MNIST-sized data sets fit in memory, and indexing a tensor
is far cheaper on CPU than collating per-example items. Every batch order is a pure function of
seeds and the step number, so an interrupted run resumes with exactly the batches it would have
seen.

Large natural-image data sets (CIFAR, Tiny-ImageNet) ask to stay uint8 (``RawData.keep_uint8``):
their loaders hold the 0..255 pixels and standardise each batch as it is drawn
(:class:`Standardise`), with the same arithmetic as :func:`preprocess`, so that Tiny-ImageNet takes
1.35 GB instead of a 5.4 GB float32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import SparsetrainError
from .base import RawData, dataset_spec
from .transforms import BatchTransform, ThenView, train_transform
from .views import apply_view

Batch = tuple[torch.Tensor, torch.Tensor]

# Mixes the seed and the epoch into one generator seed; a prime, so that (seed, epoch) pairs of
# everyday sizes never collide.
_EPOCH_SEED_STRIDE = 1_000_003


class TrainStream:
    """An endless stream of shuffled training batches of exactly ``batch_size`` examples.

    Epoch ``e`` visits the examples in the order ``torch.randperm(N)`` drawn from a generator
    seeded with ``seed * 1_000_003 + e``; the last incomplete batch of each epoch is dropped, so
    an epoch has ``steps_per_epoch = N // batch_size`` steps. Step ``s`` is therefore batch
    ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, whatever happened before it:
    ``iter_from(s)`` continues an interrupted run exactly.

    The data is moved to ``device`` once, at construction, so batches are produced there.
    ``transform`` (optional, see :mod:`sparsetrain.data.transforms`) changes each batch as a pure
    function of (batch, ``seed``, step), so resuming stays exact; ``x`` holds the examples before it.
    ``prepare`` (optional) turns stored examples into model inputs before ``transform``: a
    :class:`Standardise` when ``x`` is kept as uint8.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        transform: BatchTransform | None = None,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        _check_pair(x, y)
        if batch_size < 1 or batch_size > len(x):
            raise SparsetrainError(
                f"training batch size must be between 1 and the number of training examples "
                f"({len(x)}), got {batch_size}; use a smaller batch size or a smaller validation fraction"
            )
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.transform = transform
        self.prepare = prepare
        self.steps_per_epoch = len(x) // batch_size
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return len(self.x)

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The example order of ``epoch`` (on the data's device)."""
        if epoch != self._perm_epoch:  # one permutation per epoch, not per step
            gen = torch.Generator().manual_seed(self.seed * _EPOCH_SEED_STRIDE + epoch)
            self._perm = torch.randperm(len(self.x), generator=gen).to(self.x.device)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> Batch:
        """The (inputs, labels) batch of global step ``step`` (0-based)."""
        if step < 0:
            raise SparsetrainError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.epoch_permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        x = self.x[idx] if self.prepare is None else self.prepare(self.x[idx])
        if self.transform is None:
            return x, self.y[idx]
        return self.transform(x, self.seed, step), self.y[idx]

    def iter_from(self, step: int = 0) -> Iterator[Batch]:
        """Batches of steps ``step``, ``step + 1``, ... forever."""
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)


class EvalLoader:
    """Fixed-order batches covering every example exactly once; the last may be smaller.

    The data is moved to ``device`` once, at construction. Batches are views of the stored
    tensors: do not modify them in place. ``prepare`` (optional) turns each batch of stored
    examples into model inputs (a :class:`Standardise` for data kept as uint8).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        device: str | torch.device = "cpu",
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        _check_pair(x, y)
        if batch_size < 1:
            raise SparsetrainError(f"evaluation batch size must be >= 1, got {batch_size}")
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size = batch_size
        self.prepare = prepare

    @property
    def num_examples(self) -> int:
        return len(self.x)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)  # ceiling division

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.x), self.batch_size):
            x = self.x[start : start + self.batch_size]
            yield x if self.prepare is None else self.prepare(x), self.y[start : start + self.batch_size]


@dataclass
class Loaders:
    """Everything training needs from a data set. ``val`` is None when ``val_fraction`` was 0.

    ``input_shape``: one example's shape as the model sees it, after the view ((C, H, W) for
    ``view="image"``; (T, F) for the sequence views). ``mean`` / ``std``: the statistics the
    inputs were standardised with, per channel: a float for one-channel data (MNIST), a tuple of
    C floats otherwise. ``args``: the data set's args dataclass instance the loaders were built
    with (None when built by hand).
    """

    train: TrainStream
    val: EvalLoader | None
    test: EvalLoader
    input_shape: tuple[int, ...]
    num_classes: int
    name: str
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0
    args: Any = None


def create_loaders(
    name: str,
    batch_size: int = 100,
    eval_batch_size: int = 1000,
    data_dir: str | Path | None = None,
    download: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    shuffle_seed: int = 0,
    device: str | torch.device = "cpu",
    data_args: dict[str, Any] | None = None,
) -> Loaders:
    """Load data set ``name`` and build its train stream and validation/test loaders.

    Inputs become float32 (uint8 pixels divided by 255), standardised per channel by the mean and
    std of the full training set (as in the SNIP paper for MNIST, and CIFAR recipes).
    ``val_fraction`` of the training set is held out for validation, chosen by ``split_seed``;
    ``shuffle_seed`` drives the training order and the train-time transforms. ``data_args``: the
    data set's arguments (see :func:`~sparsetrain.data.dataset_args`), e.g. ``{"view": "rows"}``;
    unknown keys, wrong types and transforms the data set does not take raise SparsetrainError.

        >>> loaders = create_loaders("synthetic", batch_size=10, data_args={"view": "pixels", "n_train": 50})
        >>> loaders.input_shape, tuple(loaders.train.batch(0)[0].shape)
        ((784, 1), (10, 784, 1))
    """
    _check_args(batch_size, eval_batch_size, val_fraction)
    spec = dataset_spec(name)
    args = spec.make_args(data_args)
    raw = spec.load(data_dir, download, args)
    view = getattr(args, "view", "image")
    if raw.keep_uint8 and raw.train_x.dtype == torch.uint8:  # standardised per batch, as it is drawn
        mean, std = uint8_channel_stats(raw.train_x)
        train_x, test_x = raw.train_x, raw.test_x
        standardise = Standardise(*_per_channel(mean, std))
        stored_view, as_input = (lambda x: x), Standardise(standardise.mean, standardise.std, view)
    else:
        train_x, test_x, mean, std = preprocess(raw)
        standardise = None
        stored_view, as_input = (lambda x: apply_view(view, x)), None
    train_y = random_labels(raw.train_y, raw.num_classes, split_seed) if getattr(args, "random_labels", False) \
        else raw.train_y
    (tr_x, tr_y), val = split_train_val(train_x, train_y, val_fraction, split_seed)
    input_shape = tuple(apply_view(view, train_x[:1]).shape[1:])  # also refuses a view the data cannot take
    augment = train_transform(args, *_per_channel(mean, std))
    if augment is None:
        train = TrainStream(stored_view(tr_x), tr_y, batch_size, seed=shuffle_seed, device=device, prepare=as_input)
    else:  # the stream keeps images; each batch is (standardised,) transformed, then viewed
        if train_x.dim() != 4:
            raise SparsetrainError(
                f"train-time transforms need image examples (C, H, W); {name!r} has {tuple(train_x.shape[1:])}"
            )
        transform = augment if view == "image" else ThenView(augment, view)
        train = TrainStream(tr_x, tr_y, batch_size, seed=shuffle_seed, device=device, transform=transform,
                            prepare=standardise)
    return Loaders(
        train=train,
        val=None if val is None else EvalLoader(stored_view(val[0]), val[1], eval_batch_size, device=device,
                                                prepare=as_input),
        test=EvalLoader(stored_view(test_x), raw.test_y, eval_batch_size, device=device, prepare=as_input),
        input_shape=input_shape,
        num_classes=raw.num_classes,
        name=name,
        mean=mean,
        std=std,
        args=args,
    )


def random_labels(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Labels of the same shape and dtype drawn uniformly from ``num_classes`` classes, the same
    for the same ``seed`` (Zhang et al. 2017's random labels: nothing about an example predicts
    its label, so a network can only fit them by memorising)."""
    generator = torch.Generator().manual_seed(seed + 7919)  # apart from the split's own draw
    return torch.randint(num_classes, labels.shape, generator=generator).to(labels.dtype)


def preprocess(raw: RawData) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """(train_x, test_x, mean, std): float32 inputs in [0, 1] for uint8 data, then standardised
    per channel by the mean and (population) std of all training inputs of that channel.

    ``mean`` / ``std`` are floats for one-channel data (the scalar statistics of all training
    inputs, exactly as before channels were separated) and tuples of C floats for C channels.
    Channels are dimension 1 of (N, C, ...) data; data of shape (N, F) counts as one channel.
    """
    train_x, test_x = _to_float(raw.train_x), _to_float(raw.test_x)
    channels = train_x.shape[1] if train_x.dim() >= 3 else 1
    means, stds = [], []
    for c in range(channels):
        std, mean = (float(v) for v in torch.std_mean(_channel(train_x, c), correction=0))
        std = std if std > 0 else 1.0  # constant data: nothing to scale, avoid dividing by zero
        # In place: the float copies are ours, and MNIST's are 188 MB.
        for x in (train_x, test_x):
            _channel(x, c).sub_(mean).div_(std)
        means.append(mean)
        stds.append(std)
    if channels == 1:
        return train_x, test_x, means[0], stds[0]
    return train_x, test_x, tuple(means), tuple(stds)


def uint8_channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[Any, Any]:
    """(mean, std) of uint8 images (N, C, ...) divided by 255, per channel, without a float copy:
    each channel's histogram of the 256 values is counted in chunks of ``chunk`` examples, and the
    mean and population std follow from it exactly (in float64). Floats for one channel, tuples of
    C floats otherwise, as :func:`preprocess` returns them; a constant channel gets std 1.

        >>> x = torch.tensor([[[0, 255]], [[255, 255]]], dtype=torch.uint8).unsqueeze(1)  # (2, 1, 1, 2)
        >>> uint8_channel_stats(x)
        (0.75, 0.4330127018922193)
    """
    channels = x.shape[1] if x.dim() >= 3 else 1
    counts = torch.zeros(channels, 256, dtype=torch.int64)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        for c in range(channels):
            counts[c] += torch.bincount(_channel(part, c).reshape(-1).to(torch.int64), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(channels):
        n = counts[c].sum().to(torch.float64)
        mean = (counts[c] * values).sum() / n
        std = float(((counts[c] * (values - mean) ** 2).sum() / n).sqrt())
        means.append(float(mean))
        stds.append(std if std > 0 else 1.0)
    if channels == 1:
        return means[0], stds[0]
    return tuple(means), tuple(stds)


@dataclass(frozen=True)
class Standardise:
    """A batch of uint8 examples (B, C, ...) as model inputs: float32 divided by 255, standardised
    per channel by ``mean`` / ``std`` (one entry per channel), then presented in ``view``.

    The same operations, in the same order and precision, as :func:`preprocess` applies to a
    whole data set (here on all channels at once, with the statistics as float32 tensors: the
    same float32 arithmetic), so a batch standardised here equals the same examples standardised
    up front with the same statistics; only the batch is ever float.

        >>> s = Standardise(mean=(0.5,), std=(0.25,))
        >>> s(torch.tensor([[[[0, 255]]]], dtype=torch.uint8)).tolist()
        [[[[-2.0, 2.0]]]]
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    view: str = "image"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_float(x)
        shape = (1, len(self.mean)) + (1,) * (x.dim() - 2) if x.dim() >= 3 else (1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return apply_view(self.view, x.sub_(mean).div_(std))


def _channel(x: torch.Tensor, c: int) -> torch.Tensor:
    """Channel ``c`` of (N, C, ...) data as a view (N, 1, ...); (N, F) data is one channel.

    For one-channel data this is ``x`` itself (same shape, strides and storage), so the
    statistics are bit for bit the scalar ones of the whole tensor.
    """
    return x[:, c : c + 1] if x.dim() >= 3 else x


def _per_channel(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``preprocess``'s statistics as tuples, one entry per channel."""
    return tuple(mean) if isinstance(mean, tuple) else (mean,), tuple(std) if isinstance(std, tuple) else (std,)


def split_train_val(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, split_seed: int = 0
) -> tuple[Batch, Batch | None]:
    """((train_x, train_y), (val_x, val_y) or None): a random ``val_fraction`` held out.

    The split is ``torch.randperm(N)`` from a generator seeded with ``split_seed``; both parts keep
    the original order of their examples. ``val_fraction > 0`` holds out at least one example.
    """
    if val_fraction == 0:
        return (x, y), None
    n_val = max(1, round(len(x) * val_fraction))
    if n_val >= len(x):
        raise SparsetrainError(
            f"val_fraction={val_fraction} of {len(x)} training examples leaves none for training; "
            "use a smaller one"
        )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def _to_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255)
    return x.to(torch.float32, copy=True)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if len(x) != len(y):
        raise SparsetrainError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")


def _check_args(batch_size: int, eval_batch_size: int, val_fraction: float) -> None:
    if batch_size < 1:
        raise SparsetrainError(f"batch_size must be >= 1, got {batch_size}")
    if eval_batch_size < 1:
        raise SparsetrainError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    if not 0 <= val_fraction < 1:
        raise SparsetrainError(f"val_fraction must be in [0, 1), got {val_fraction}")
