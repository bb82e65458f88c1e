"""Tests for sequence views (sparsetrain.data.views) and train-time transforms (.transforms).

No registered data set takes augmentation yet, so the transform hook is tested through a data set
registered here for the duration of a test (the library's registry is restored afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.data import (
    DATASETS,
    AugmentedImageArgs,
    RandomCropFlip,
    RawData,
    TrainStream,
    apply_view,
    create_loaders,
    list_datasets,
    make_synthetic,
    register_dataset,
    view_shape,
)
from sparsetrain.errors import SparsetrainError

# ---------------------------------------------------------------------------------------------
# Views


@pytest.mark.parametrize("view, shape", [("image", (1, 28, 28)), ("rows", (28, 28)), ("pixels", (784, 1))])
def test_views_of_synthetic_equal_the_reshaped_images(view, shape):
    image = create_loaders("synthetic", batch_size=30, eval_batch_size=70)
    viewed = create_loaders("synthetic", batch_size=30, eval_batch_size=70, data_args={"view": view})
    assert viewed.input_shape == shape
    for step in (0, 1, 17, 18, 40):  # across epochs (18 steps each)
        (xi, yi), (xv, yv) = image.train.batch(step), viewed.train.batch(step)
        assert torch.equal(xv, xi.reshape(len(xi), *shape)) and torch.equal(yv, yi)
    for a, b in ((image.val, viewed.val), (image.test, viewed.test)):
        for (xi, yi), (xv, yv) in zip(a, b, strict=True):
            assert torch.equal(xv, xi.reshape(len(xi), *shape)) and torch.equal(yv, yi)
    assert (viewed.mean, viewed.std) == (image.mean, image.std)


def test_multichannel_views_against_an_index_oracle():
    x = torch.randn(2, 3, 4, 5)  # (N, C, H, W)
    rows, pixels = apply_view("rows", x), apply_view("pixels", x)
    assert rows.shape == (2, 4, 15) and pixels.shape == (2, 20, 3)
    assert view_shape("rows", (3, 4, 5)) == (4, 15) and view_shape("pixels", (3, 4, 5)) == (20, 3)
    for n in range(2):
        for c in range(3):
            for h in range(4):
                for w in range(5):
                    assert rows[n, h, c * 5 + w] == x[n, c, h, w]  # step h: row h, channel-major
                    assert pixels[n, h * 5 + w, c] == x[n, c, h, w]  # step h*W + w: that pixel's channels


def test_view_errors():
    with pytest.raises(SparsetrainError, match="unknown view 'cols'; views: image, rows, pixels"):
        apply_view("cols", torch.zeros(1, 1, 2, 2))
    with pytest.raises(SparsetrainError, match=r"view 'rows' needs image examples .*, got \(5,\)"):
        create_loaders("synthetic", batch_size=10, data_args={"shape": [5], "view": "rows"})
    assert create_loaders("synthetic", batch_size=10, data_args={"shape": [5]}).input_shape == (5,)


# ---------------------------------------------------------------------------------------------
# A data set that takes augmentation, registered for one test


@dataclass(frozen=True)
class TinyAugmentedArgs(AugmentedImageArgs):
    channels: int = field(default=3, metadata={"help": "number of channels"})


@pytest.fixture
def augmented(monkeypatch) -> str:
    """Registers "tiny-augmented": uint8 3-channel 6x6 images whose args take random_crop and flip."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))  # restored after the test

    @register_dataset("tiny-augmented", args=TinyAugmentedArgs)
    def tiny(data_dir: str | Path | None, download: bool, args: TinyAugmentedArgs) -> RawData:
        """Random uint8 images, (3, 6, 6), 4 classes."""
        gen = torch.Generator().manual_seed(0)
        raw = make_synthetic(80, 20, (args.channels, 6, 6), 4)
        raw.train_x = torch.randint(0, 256, (80, args.channels, 6, 6), dtype=torch.uint8, generator=gen)
        raw.test_x = torch.randint(0, 256, (20, args.channels, 6, 6), dtype=torch.uint8, generator=gen)
        return raw

    assert "tiny-augmented" in list_datasets()
    return "tiny-augmented"


def loaders(name: str, **data_args):
    return create_loaders(name, batch_size=16, eval_batch_size=7, shuffle_seed=3, data_args=data_args)


def crops(x: torch.Tensor, padding: int, fill: torch.Tensor) -> list[torch.Tensor]:
    """Every crop (and its flip) of one (C, H, W) image padded by ``padding`` pixels of ``fill``."""
    c, h, w = x.shape
    padded = fill.view(c, 1, 1).expand(c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, padding : padding + h, padding : padding + w] = x
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_random_crop_and_flip_are_crops_of_the_padded_image(augmented):
    plain, aug = loaders(augmented), loaders(augmented, random_crop=2, flip=True)
    black = -torch.tensor(plain.mean) / torch.tensor(plain.std)  # a 0 pixel, standardised
    moved = 0
    for step in (0, 4, 9):  # the example order is the plain stream's: only the pixels change
        (x, y), (xa, ya) = plain.train.batch(step), aug.train.batch(step)
        assert torch.equal(y, ya) and xa.shape == x.shape
        for image, augmented_image in zip(x, xa):
            assert any(torch.equal(augmented_image, c) for c in crops(image, 2, black))
            moved += not torch.equal(augmented_image, image)
    assert moved > 40  # of 48: most examples were translated or flipped


def test_flip_alone_flips_about_half(augmented):
    plain, aug = loaders(augmented), loaders(augmented, flip=True)
    x, xa = plain.train.x, torch.cat([aug.train.batch(s)[0] for s in range(aug.train.steps_per_epoch)])
    order = torch.cat([plain.train.batch(s)[0] for s in range(plain.train.steps_per_epoch)])
    flipped = [torch.equal(b, a.flip(-1)) for a, b in zip(order, xa)]
    kept = [torch.equal(b, a) for a, b in zip(order, xa)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 <= sum(flipped) <= 48, sum(flipped)  # of 64
    assert x.shape == (72, 3, 6, 6)


def test_augmented_stream_resumes_exactly(augmented):
    uninterrupted = loaders(augmented, random_crop=2, flip=True).train
    seen = [b for _, b in zip(range(14), uninterrupted)]  # over three epochs (4 steps each)
    for k in (0, 3, 4, 9):
        resumed = loaders(augmented, random_crop=2, flip=True).train.iter_from(k)
        for x, y in seen[k:]:
            xr, yr = next(resumed)
            assert torch.equal(xr, x) and torch.equal(yr, y)
    # Random per step and per seed: the same examples are not transformed alike.
    other_seed = create_loaders(augmented, batch_size=16, shuffle_seed=4, data_args={"random_crop": 2}).train
    assert not torch.equal(other_seed.transform(seen[0][0], 4, 0), seen[0][0])
    t = uninterrupted.transform
    base = loaders(augmented).train.batch(0)[0]
    assert not torch.equal(t(base, 3, 0), t(base, 3, 1)) and not torch.equal(t(base, 3, 0), t(base, 4, 0))


def test_transform_is_a_no_op_on_eval_loaders(augmented):
    plain, aug = loaders(augmented), loaders(augmented, random_crop=2, flip=True)
    for a, b in ((plain.val, aug.val), (plain.test, aug.test)):
        for (x, y), (xa, ya) in zip(a, b, strict=True):
            assert torch.equal(x, xa) and torch.equal(y, ya)
    assert aug.train.transform is not None and plain.train.transform is None


def test_transform_then_view(augmented):
    aug = loaders(augmented, random_crop=1, flip=True)
    rows = loaders(augmented, random_crop=1, flip=True, view="rows")
    assert rows.input_shape == (6, 18)
    for step in (0, 5):
        assert torch.equal(rows.train.batch(step)[0], apply_view("rows", aug.train.batch(step)[0]))
    assert torch.equal(rows.test.x, apply_view("rows", aug.test.x))


def test_transform_off_by_default_and_args_refused_elsewhere(augmented):
    assert loaders(augmented).train.transform is None
    with pytest.raises(SparsetrainError, match="'synthetic' has no train-time transform 'flip'"):
        create_loaders("synthetic", data_args={"flip": True})
    with pytest.raises(SparsetrainError, match="random_crop"):
        loaders(augmented, random_crop=-2)


def test_random_crop_flip_matches_an_explicit_oracle():
    """One image, one draw: the result is F.pad then a slice (then a flip)."""
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(1, 2, 4, 5)
    t = RandomCropFlip(padding=2, flip=True, fill=(-1.0, -2.0))
    padded = torch.cat([F.pad(x[:, :1], (2, 2, 2, 2), value=-1.0), F.pad(x[:, 1:], (2, 2, 2, 2), value=-2.0)], 1)
    for step in range(20):
        out = t(x, seed=0, step=step)
        candidates = [padded[:, :, dy : dy + 4, dx : dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(-1)) for c in candidates)
    assert RandomCropFlip()(x, 0, 0) is x  # nothing asked: untouched


def test_train_stream_accepts_any_seeded_transform():
    ids = torch.arange(12, dtype=torch.float32)
    stream = TrainStream(ids, ids, batch_size=4, seed=1, transform=lambda x, seed, step: x + 100 * step + seed)
    plain = TrainStream(ids, ids, batch_size=4, seed=1)
    assert torch.equal(stream.batch(5)[0], plain.batch(5)[0] + 501)
    assert torch.equal(next(stream.iter_from(5))[0], stream.batch(5)[0])
