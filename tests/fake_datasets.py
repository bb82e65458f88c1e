"""Small CIFAR-10, CIFAR-100 and Tiny-ImageNet data sets in their official on-disk formats, for tests.

None of these data sets can be downloaded on the test machines, so the tests generate a few
images per class in exactly the layout the real ones ship in, written with plain ``pickle``,
NumPy, PIL, ``tarfile`` and ``zipfile`` (nothing from ``sparsetrain``), and read them back through
the library's real code path. Each writer returns a :class:`FakeData` holding the arrays it wrote
(the test's oracle) and, when it wrote an archive, the archive's path and md5.

    write_cifar10(root)                      # <root>/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    write_cifar10(root, archive=True)        # <root>/cifar10/cifar-10-python.tar.gz only
    write_cifar100(root)                     # <root>/cifar100/cifar-100-python/{train,test,meta}
    write_tiny_imagenet(root, archive=True)  # <root>/tiny-imagenet/tiny-imagenet-200.zip

The library expects the md5 of the real archives; a test using ``archive=True`` patches the
expected checksum to ``FakeData.md5`` (see tests/test_data_cifar.py).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
TINY_DIR = "tiny-imagenet-200"


@dataclass
class FakeData:
    """What a writer wrote: the data set's folder, the images (uint8, (N, C, H, W)) and labels
    (int64, (N,)) of each split in file order, and the archive (with its md5) when one was made.
    ``extra`` holds format-specific details (CIFAR-100's coarse labels, Tiny-ImageNet's wnids)."""

    folder: Path
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    archive: Path | None = None
    md5: str | None = None
    extra: dict = field(default_factory=dict)


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _images(rng: np.random.Generator, n: int, shape=(3, 32, 32)) -> np.ndarray:
    """Random uint8 images, each channel with its own brightness so the per-channel statistics differ."""
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8).astype(np.int64)
    scale = np.array([1.0, 0.6, 0.3][: shape[0]]).reshape(1, -1, 1, 1)
    return (x * scale).astype(np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    # Protocol 2, as the official (Python 2) files; str keys are read back as str.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _tar_gz(folder: Path, inner: str, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / inner, arcname=inner)
    shutil.rmtree(folder / inner)


def write_cifar10(
    root: str | Path, per_batch: int = 20, n_test: int = 20, archive: bool = False, seed: int = 0
) -> FakeData:
    """CIFAR-10 in ``<root>/cifar10/``: five training batches of ``per_batch`` images and a test
    batch of ``n_test`` (dicts with ``data`` uint8 (N, 3072), channel-major rows of 32x32, and
    ``labels`` a list of ints), plus ``batches.meta``. Labels cycle through the 10 classes.
    ``archive``: write only ``cifar-10-python.tar.gz`` holding the folder, as downloaded."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar10"
    inner = folder / CIFAR10_DIR
    inner.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for b in range(1, 6):
        x = _images(rng, per_batch)
        y = (np.arange(per_batch) + b) % 10
        _pickle(inner / f"data_batch_{b}", {
            "batch_label": f"training batch {b} of 5", "labels": [int(v) for v in y],
            "data": x.reshape(per_batch, 3072), "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
        })
        xs.append(x)
        ys.append(y)
    test_x = _images(rng, n_test)
    test_y = np.arange(n_test) % 10
    _pickle(inner / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": [int(v) for v in test_y],
        "data": test_x.reshape(n_test, 3072), "filenames": [f"test_{i}.png" for i in range(n_test)],
    })
    _pickle(inner / "batches.meta", {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_cases_per_batch": per_batch, "num_vis": 3072,
    })
    data = FakeData(folder, np.concatenate(xs), np.concatenate(ys).astype(np.int64), test_x,
                    test_y.astype(np.int64), 10)
    if archive:
        data.archive = folder / "cifar-10-python.tar.gz"
        _tar_gz(folder, CIFAR10_DIR, data.archive)
        data.md5 = md5_of(data.archive)
    return data


def write_cifar100(
    root: str | Path, n_train: int = 200, n_test: int = 100, archive: bool = False, seed: int = 1
) -> FakeData:
    """CIFAR-100 in ``<root>/cifar100/cifar-100-python/``: ``train`` and ``test`` (dicts with
    ``data`` uint8 (N, 3072), ``fine_labels`` 0..99 and ``coarse_labels`` 0..19) and ``meta``.
    The fine label of example i is i % 100, its coarse label (fine % 20); ``train_y``/``test_y``
    are the fine labels, ``extra["train_coarse"]``/``extra["test_coarse"]`` the coarse ones.
    ``archive``: write only ``cifar-100-python.tar.gz``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar100"
    inner = folder / CIFAR100_DIR
    inner.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n)
        fine = np.arange(n) % 100
        coarse = fine % 20
        _pickle(inner / split, {
            "filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": f"{split} batch",
            "fine_labels": [int(v) for v in fine], "coarse_labels": [int(v) for v in coarse],
            "data": x.reshape(n, 3072),
        })
        out[split] = (x, fine.astype(np.int64), coarse.astype(np.int64))
    _pickle(inner / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                             "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    data = FakeData(folder, out["train"][0], out["train"][1], out["test"][0], out["test"][1], 100,
                    extra={"train_coarse": out["train"][2], "test_coarse": out["test"][2]})
    if archive:
        data.archive = folder / "cifar-100-python.tar.gz"
        _tar_gz(folder, CIFAR100_DIR, data.archive)
        data.md5 = md5_of(data.archive)
    return data


def _png_or_jpeg(image: np.ndarray, mode: str = "RGB") -> bytes:
    """``image`` (C, H, W) uint8 as JPEG bytes at quality 100 (lossy: the oracle is what PIL decodes)."""
    from PIL import Image

    pil = Image.fromarray(image.transpose(1, 2, 0)).convert(mode)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=100)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy()


def write_tiny_imagenet(
    root: str | Path, wnids: int = 3, per_class: int = 4, val_per_class: int = 2, archive: bool = False,
    seed: int = 2, grey: bool = True, size: int = 64,
) -> FakeData:
    """Tiny-ImageNet in ``<root>/tiny-imagenet/tiny-imagenet-200/``: ``wnids.txt`` (in an unsorted
    order, as the real file), ``words.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG`` with
    ``train/<wnid>/<wnid>_boxes.txt``, ``val/images/val_<i>.JPEG`` with ``val/val_annotations.txt``,
    and ``test/images/test_<i>.JPEG`` (unlabelled). ``grey``: one training image is stored as a
    one-channel JPEG (the real set has some). Images are 64x64 JPEGs; the oracle arrays are what
    PIL decodes from the written bytes (converted to RGB), train in (sorted wnid, file name) order,
    val in file name order; a class is its wnid's index in the sorted wnids
    (``extra["wnids"]``). ``archive``: write only ``tiny-imagenet-200.zip``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "tiny-imagenet"
    base = folder / TINY_DIR
    names = [f"n{int(v):08d}" for v in rng.choice(10**8, size=wnids, replace=False)]
    sorted_names = sorted(names)
    files: dict[str, bytes] = {
        "wnids.txt": "".join(f"{w}\n" for w in names).encode(),
        "words.txt": "".join(f"{w}\tthing {i}\n" for i, w in enumerate(names)).encode(),
    }
    train_x, train_y = [], []
    for w in sorted_names:
        boxes = []
        for i in range(per_class):
            mode = "L" if grey and i == 0 and w == sorted_names[0] else "RGB"
            blob = _png_or_jpeg(_images(rng, 1, (3, size, size))[0], mode)
            files[f"train/{w}/images/{w}_{i}.JPEG"] = blob
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}\n")
        files[f"train/{w}/{w}_boxes.txt"] = "".join(boxes).encode()
    for w in sorted_names:  # file name order within a class is sorted: _0 .. _{n-1} for n <= 10
        for i in range(per_class):
            train_x.append(_decode(files[f"train/{w}/images/{w}_{i}.JPEG"]))
            train_y.append(sorted_names.index(w))
    val_x, val_y, lines = [], [], []
    n_val = wnids * val_per_class
    for i in range(n_val):
        w = names[i % wnids]
        blob = _png_or_jpeg(_images(rng, 1, (3, size, size))[0])
        files[f"val/images/val_{i}.JPEG"] = blob
        lines.append(f"val_{i}.JPEG\t{w}\t1\t2\t30\t40\n")
    for i in sorted(range(n_val), key=lambda i: f"val_{i}.JPEG"):
        val_x.append(_decode(files[f"val/images/val_{i}.JPEG"]))
        val_y.append(sorted_names.index(names[i % wnids]))
    files["val/val_annotations.txt"] = "".join(lines).encode()
    for i in range(2):
        files[f"test/images/test_{i}.JPEG"] = _png_or_jpeg(_images(rng, 1, (3, size, size))[0])
    folder.mkdir(parents=True, exist_ok=True)
    data = FakeData(folder, np.stack(train_x), np.array(train_y, dtype=np.int64), np.stack(val_x),
                    np.array(val_y, dtype=np.int64), wnids, extra={"wnids": sorted_names})
    if archive:
        data.archive = folder / "tiny-imagenet-200.zip"
        with zipfile.ZipFile(data.archive, "w") as z:
            for rel, blob in files.items():
                z.writestr(f"{TINY_DIR}/{rel}", blob)
        data.md5 = md5_of(data.archive)
    else:
        for rel, blob in files.items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(blob)
    return data
