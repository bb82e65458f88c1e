"""Tiny-ImageNet in its official folder layout: the data set ``"tiny-imagenet"``.

The archive ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/, md5 :data:`MD5`) is unpacked
once into ``<root>/tiny-imagenet/`` by :func:`~sparsetrain.data.files.ensure_extracted`, giving
``tiny-imagenet-200/`` with

- ``wnids.txt``: the 200 class ids (WordNet ids), one a line; class ``k`` is the ``k``-th id in
  sorted order (as a folder-per-class reader such as torchvision's ``ImageFolder`` numbers them);
- ``train/<wnid>/images/*.JPEG``: 500 images per class, read in file name order;
- ``val/images/*.JPEG`` and ``val/val_annotations.txt`` (file name, wnid, bounding box; tab
  separated): 10000 labelled images, read in file name order, used as the test split as is usual
  (``test/`` has no labels and is not read); ``words.txt`` is not needed.

Images are 64x64 JPEGs, some of them greyscale (converted to RGB). Decoding the 110000 JPEGs takes
tens of seconds, so the decoded uint8 arrays are cached once in
``<root>/tiny-imagenet/tiny-imagenet-200.uint8.npz`` (through :func:`sparsetrain.fsio.atomic_write`,
site ``"data"``), keyed by a fingerprint of the file names and sizes, so a changed folder is decoded
again; a folder the user may not write is simply decoded every time. The images stay uint8 in
memory (1.35 GB, where float32 would be 5.4 GB) and are standardised per batch
(``RawData.keep_uint8``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SparsetrainError
from ..fsio import atomic_write
from .args import AugmentedImageArgs
from .base import RawData, register_dataset
from .files import FIX_BAD_FILE, MIRRORS, DataFile, _writable, bad_file, ensure_extracted

__all__ = ["ARCHIVE", "MD5", "NAME", "decode_folder"]

NAME = "tiny-imagenet"
INNER = "tiny-imagenet-200"
ARCHIVE = "tiny-imagenet-200.zip"
#: The md5 published for the archive (no sha256 is); read at load time, so a test may replace it.
MD5 = {NAME: "90528d7ca1a48142e341f4ef8d21d0de"}
MIRRORS.update({NAME: ["http://cs231n.stanford.edu/"]})

SIZE = 64
CONTENTS = [f"{INNER}/wnids.txt", f"{INNER}/train", f"{INNER}/val/images", f"{INNER}/val/val_annotations.txt"]
CACHE = f"{INNER}.uint8.npz"
_CACHE_VERSION = "1"  # part of the fingerprint: a new decoding invalidates old caches


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise bad_file(path, f"cannot be read as text ({e})") from e


def _wnids(base: Path) -> list[str]:
    path = base / "wnids.txt"
    ids = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not ids:
        raise bad_file(path, "lists no class ids (expected one WordNet id such as n01443537 a line)")
    if len(set(ids)) != len(ids):
        raise bad_file(path, "lists a class id twice")
    return sorted(ids)


def _listing(base: Path, wnids: list[str]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(train, val): (image path, class) in reading order, every file checked to exist."""
    train = []
    for k, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise SparsetrainError(
                f"{base}: class {wnid} of wnids.txt has no folder {folder}; the folder is incomplete. "
                f"Unpack {ARCHIVE} again (or delete {base} so that it is extracted again)."
            )
        train += [(folder / f, k) for f in sorted(os.listdir(folder)) if f.lower().endswith((".jpeg", ".jpg"))]
    index = {w: k for k, w in enumerate(wnids)}
    annotations = base / "val" / "val_annotations.txt"
    val = []
    for n, line in enumerate(_read_text(annotations).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1].strip() not in index:
            what = f"class {parts[1].strip()!r} is not in wnids.txt" if len(parts) >= 2 else "no tab-separated class"
            raise bad_file(annotations, f"line {n} ({line.strip()[:60]!r}): {what}")
        image = base / "val" / "images" / parts[0].strip()
        if not image.is_file():
            raise SparsetrainError(f"{annotations} line {n} names {image}, which does not exist; the folder is "
                                   f"incomplete. Unpack {ARCHIVE} again.")
        val.append((image, index[parts[1].strip()]))
    val.sort(key=lambda item: item[0].name)
    return train, val


def _fingerprint(base: Path, train: list[tuple[Path, int]], val: list[tuple[Path, int]]) -> str:
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    for path, label in train + val:
        digest.update(f"{path.relative_to(base)}\0{path.stat().st_size}\0{label}\n".encode())
    return digest.hexdigest()


def decode_folder(items: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 64, 64), labels int64 (N,)) of ``items`` (JPEG path, class), decoded
    with PIL into one preallocated array; greyscale images become RGB."""
    from PIL import Image, UnidentifiedImageError

    x = np.empty((len(items), 3, SIZE, SIZE), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as im:
                if im.size != (SIZE, SIZE):
                    raise bad_file(path, f"is {im.size[0]}x{im.size[1]}, Tiny-ImageNet images are {SIZE}x{SIZE}")
                x[i] = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        except SparsetrainError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:  # PIL's decoding errors
            raise bad_file(path, f"cannot be decoded as an image ({e})") from e
    y = np.array([label for _, label in items], dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def _load_cache(path: Path, fingerprint: str) -> RawData | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            arrays = [torch.from_numpy(z[k]) for k in ("train_x", "train_y", "test_x", "test_y")]
            num_classes = int(z["num_classes"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent or damaged: decode again
        return None
    return RawData(*arrays, num_classes, keep_uint8=True)


def _save_cache(path: Path, raw: RawData, fingerprint: str) -> None:
    """Best effort: the data is usable without the cache, so a failed write warns and goes on."""
    if not _writable(path.parent):
        return

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the temporary name
            np.savez(f, train_x=raw.train_x.numpy(), train_y=raw.train_y.numpy(), test_x=raw.test_x.numpy(),
                     test_y=raw.test_y.numpy(), num_classes=np.int64(raw.num_classes),
                     fingerprint=np.str_(fingerprint))

    try:
        atomic_write(path, write, what="data")
    except SparsetrainError as e:
        warnings.warn(f"the decoded Tiny-ImageNet was not cached, so the next load decodes it again: {e}",
                      stacklevel=3)


@register_dataset(NAME, args=AugmentedImageArgs)
def tiny_imagenet(
    data_dir: str | Path | None = None, download: bool = True, args: AugmentedImageArgs | None = None
) -> RawData:
    """Tiny-ImageNet: 100000 train / 10000 val (as test) uint8 images (3, 64, 64), 200 classes."""
    archive = DataFile(ARCHIVE, sha256=None, md5=MD5.get(NAME))
    folder = ensure_extracted(NAME, archive, CONTENTS, data_dir, download)
    base = folder / INNER
    wnids = _wnids(base)
    train, val = _listing(base, wnids)
    if not train or not val:
        raise SparsetrainError(f"{base} holds no {'training' if not train else 'validation'} images; the folder "
                               f"is incomplete. Unpack {ARCHIVE} again. {FIX_BAD_FILE}")
    fingerprint = _fingerprint(base, train, val)
    cached = _load_cache(folder / CACHE, fingerprint)
    if cached is not None:
        return cached
    train_x, train_y = decode_folder(train)
    test_x, test_y = decode_folder(val)
    raw = RawData(train_x, train_y, test_x, test_y, len(wnids), keep_uint8=True)
    _save_cache(folder / CACHE, raw, fingerprint)
    return raw
