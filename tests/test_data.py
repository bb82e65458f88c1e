"""Tests for sparsetrain.data: IDX reading/locating/checksums/downloads, synthetic data, loaders.

IDX files are written here with ``struct`` (an oracle independent of the reader); downloads use
``file://`` mirrors in tmp_path, so nothing ever reaches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.data import (
    DATASETS,
    MIRRORS,
    SHA256,
    EvalLoader,
    TrainStream,
    create_loaders,
    list_datasets,
    load_dataset,
    load_idx_dataset,
    make_synthetic,
    preprocess,
    read_idx,
    resolve_data_root,
    split_train_val,
)
from sparsetrain.data import files as files_module
from sparsetrain.data import idx as idx_module
from sparsetrain.errors import SparsetrainError

FILES = idx_module.IDX_FILES  # train images, train labels, test images, test labels


# ---------------------------------------------------------------------------------------------
# Helpers: write IDX files by hand


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big_endian.tobytes()


def write_file(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def fake_arrays(n_train: int = 12, n_test: int = 5, h: int = 4, w: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        FILES[0]: rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
        FILES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        FILES[2]: rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
        FILES[3]: (np.arange(n_test) * 3 % 10).astype(np.uint8),
    }


def write_fake_dataset(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> dict[str, str]:
    """Write the four IDX files into ``folder``; return their decompressed sha256 by file name."""
    hashes = {}
    for base, array in arrays.items():
        payload = idx_bytes(array, 0x08)
        write_file(folder / (base + (".gz" if gz else "")), payload)
        hashes[base] = hashlib.sha256(payload).hexdigest()
    return hashes


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test may reach the internet or depend on the user's environment or earlier tests."""
    dead = (tmp_path / "no-such-mirror").as_uri()
    for name in list(MIRRORS):
        monkeypatch.setitem(MIRRORS, name, [dead])
    monkeypatch.delenv("SPARSETRAIN_DATA", raising=False)
    monkeypatch.setattr(files_module, "_VERIFIED_IN_PROCESS", set())


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A tiny "mnist" under tmp_path/root/mnist, with the checksum table pointing at it."""
    arrays = fake_arrays()
    root = tmp_path / "root"
    for base, digest in write_fake_dataset(root / "mnist", arrays).items():
        monkeypatch.setitem(SHA256, f"mnist/{base}", digest)
    return root, arrays


# ---------------------------------------------------------------------------------------------
# Reading IDX


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "dtype, code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)]
)
def test_read_idx_round_trip(tmp_path, suffix, dtype, code):
    values = np.arange(30).reshape(2, 3, 5)
    array = (values * 8 if dtype == np.uint8 else values * 3 - 40).astype(dtype)
    path = write_file(tmp_path / f"a{suffix}", idx_bytes(array, code))
    tensor = read_idx(path)
    assert tuple(tensor.shape) == (2, 3, 5)
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_load_fake_mnist_shapes_and_values(fake_mnist):
    root, arrays = fake_mnist
    raw = load_dataset("mnist", root, download=False)
    assert raw.train_x.dtype == torch.uint8 and raw.train_x.shape == (12, 1, 4, 3)
    assert raw.test_x.shape == (5, 1, 4, 3)
    assert raw.train_y.dtype == torch.int64 and raw.num_classes == 10
    np.testing.assert_array_equal(raw.train_x[:, 0].numpy(), arrays[FILES[0]])
    np.testing.assert_array_equal(raw.test_y.numpy(), arrays[FILES[3]])


def test_uncompressed_files_are_accepted(tmp_path, monkeypatch):
    arrays = fake_arrays()
    for base, digest in write_fake_dataset(tmp_path / "mnist", arrays, gz=False).items():
        monkeypatch.setitem(SHA256, f"mnist/{base}", digest)
    raw = load_dataset("mnist", tmp_path, download=False)
    np.testing.assert_array_equal(raw.train_y.numpy(), arrays[FILES[1]])


# ---------------------------------------------------------------------------------------------
# Locating


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "sparsetrain"
    monkeypatch.setenv("SPARSETRAIN_DATA", str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"


def test_env_var_locates_data(fake_mnist, monkeypatch):
    root, arrays = fake_mnist
    monkeypatch.setenv("SPARSETRAIN_DATA", str(root))
    raw = load_dataset("mnist", None, download=False)
    assert len(raw.train_y) == len(arrays[FILES[1]])


def test_missing_files_error_names_folder_and_files(tmp_path):
    with pytest.raises(SparsetrainError) as info:
        load_dataset("mnist", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "mnist") in message
    for base in FILES:
        assert f"{base}.gz" in message
    assert "--data-dir" in message and "SPARSETRAIN_DATA" in message


def test_missing_error_hints_when_root_is_the_dataset_folder(fake_mnist):
    root, _ = fake_mnist
    with pytest.raises(SparsetrainError, match="must be its parent"):
        load_dataset("mnist", root / "mnist", download=False)


# ---------------------------------------------------------------------------------------------
# Damaged files


def test_corrupt_gzip(fake_mnist):
    root, _ = fake_mnist
    bad = root / "mnist" / f"{FILES[1]}.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(SparsetrainError, match="gzip") as info:
        load_dataset("mnist", root, download=False)
    assert str(bad) in str(info.value) and "Delete it" in str(info.value)


def test_truncated_gzip_stream(fake_mnist):
    root, _ = fake_mnist
    bad = root / "mnist" / f"{FILES[0]}.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(SparsetrainError, match="gzip") as info:
        load_dataset("mnist", root, download=False)
    assert str(bad) in str(info.value)


def test_truncated_payload(tmp_path):
    array = np.zeros((3, 4, 4), dtype=np.uint8)
    path = write_file(tmp_path / "x.gz", idx_bytes(array, 0x08)[:-5])
    with pytest.raises(SparsetrainError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_wrong_magic(tmp_path):
    path = write_file(tmp_path / "x", b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"ab")
    with pytest.raises(SparsetrainError, match="magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_unknown_type_code(tmp_path):
    path = write_file(tmp_path / "x", b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab")
    with pytest.raises(SparsetrainError, match="type code"):
        read_idx(path)


def test_count_mismatch_names_both_files(tmp_path, monkeypatch):
    arrays = fake_arrays()
    arrays[FILES[1]] = arrays[FILES[1]][:-1]  # one label short
    for base, digest in write_fake_dataset(tmp_path / "mnist", arrays).items():
        monkeypatch.setitem(SHA256, f"mnist/{base}", digest)
    with pytest.raises(SparsetrainError, match="12 images but .* 11 labels") as info:
        load_dataset("mnist", tmp_path, download=False)
    assert FILES[0] in str(info.value) and FILES[1] in str(info.value)


def test_label_out_of_range(tmp_path, monkeypatch):
    arrays = fake_arrays()
    arrays[FILES[3]][2] = 12
    for base, digest in write_fake_dataset(tmp_path / "mnist", arrays).items():
        monkeypatch.setitem(SHA256, f"mnist/{base}", digest)
    with pytest.raises(SparsetrainError, match=r"labels must lie in \[0, 10\)") as info:
        load_dataset("mnist", tmp_path, download=False)
    assert FILES[3] in str(info.value)


def test_checksum_mismatch(fake_mnist, monkeypatch):
    root, _ = fake_mnist
    found = SHA256[f"mnist/{FILES[2]}"]
    monkeypatch.setitem(SHA256, f"mnist/{FILES[2]}", "0" * 64)
    with pytest.raises(SparsetrainError, match="corrupt") as info:
        load_dataset("mnist", root, download=False)
    message = str(info.value)
    assert FILES[2] in message and "0" * 64 in message and found in message


def test_verify_false_skips_checksum(fake_mnist, monkeypatch):
    root, _ = fake_mnist
    monkeypatch.setitem(SHA256, f"mnist/{FILES[2]}", "0" * 64)
    assert load_idx_dataset("mnist", root, download=False, verify=False).num_classes == 10


def test_verification_is_cached_and_redone_for_changed_files(fake_mnist, monkeypatch):
    root, _ = fake_mnist
    load_dataset("mnist", root, download=False)
    assert (root / "mnist" / ".verified.json").is_file()

    # A new process (empty in-memory cache) trusts the JSON cache and hashes nothing.
    monkeypatch.setattr(files_module, "_VERIFIED_IN_PROCESS", set())
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(files_module.hashlib, "sha256", lambda *a: pytest.fail("hashed a verified file"))
    load_dataset("mnist", root, download=False)
    monkeypatch.setattr(files_module.hashlib, "sha256", real_sha256)

    # A changed file is hashed again and refused.
    changed = root / "mnist" / f"{FILES[1]}.gz"
    write_file(changed, idx_bytes(np.full(12, 3, dtype=np.uint8), 0x08))
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    with pytest.raises(SparsetrainError, match="corrupt"):
        load_dataset("mnist", root, download=False)


# ---------------------------------------------------------------------------------------------
# Downloading


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A file:// mirror serving a tiny "mnist", with the checksum table pointing at it."""
    arrays = fake_arrays()
    folder = tmp_path / "mirror"
    for base, digest in write_fake_dataset(folder, arrays).items():
        monkeypatch.setitem(SHA256, f"mnist/{base}", digest)
    return folder, arrays


def test_download_from_file_mirror(tmp_path, mirror, monkeypatch):
    folder, arrays = mirror
    dead = (tmp_path / "dead").as_uri() + "/"
    monkeypatch.setitem(MIRRORS, "mnist", [dead, folder.as_uri() + "/"])
    root = tmp_path / "root"
    root.mkdir()  # a data root the caller names must exist
    raw = load_dataset("mnist", root, download=True)
    np.testing.assert_array_equal(raw.train_y.numpy(), arrays[FILES[1]])
    on_disk = sorted(p.name for p in (root / "mnist").iterdir())
    assert on_disk == sorted([".verified.json", *(f"{b}.gz" for b in FILES)])  # no leftover temp files


def test_download_skips_mirror_with_corrupt_copy(tmp_path, mirror, monkeypatch):
    folder, arrays = mirror
    bad = tmp_path / "bad-mirror"
    write_fake_dataset(bad, fake_arrays(n_train=7))  # valid IDX, wrong content
    monkeypatch.setitem(MIRRORS, "mnist", [bad.as_uri(), folder.as_uri()])
    (tmp_path / "root").mkdir()
    raw = load_dataset("mnist", tmp_path / "root", download=True)
    assert len(raw.train_y) == len(arrays[FILES[1]])


def test_download_fetches_only_missing_files(tmp_path, mirror, monkeypatch):
    folder, arrays = mirror
    monkeypatch.setitem(MIRRORS, "mnist", [folder.as_uri()])
    root = tmp_path / "root"
    kept = write_file(root / "mnist" / FILES[3], idx_bytes(arrays[FILES[3]], 0x08))  # uncompressed
    load_dataset("mnist", root, download=True)
    assert kept.is_file() and not (root / "mnist" / f"{FILES[3]}.gz").exists()
    assert (root / "mnist" / f"{FILES[0]}.gz").is_file()


def test_download_failure_of_all_mirrors(tmp_path, monkeypatch):
    urls = [(tmp_path / "m1").as_uri() + "/", (tmp_path / "m2").as_uri() + "/"]
    monkeypatch.setitem(MIRRORS, "mnist", urls)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(SparsetrainError) as info:
        load_dataset("mnist", root, download=True)
    message = str(info.value)
    assert str(root / "mnist") in message
    for base in FILES:
        assert f"{base}.gz" in message
    for url in urls:
        assert url in message
    assert "--data-dir" in message and "SPARSETRAIN_DATA" in message
    assert not [p for p in (root / "mnist").iterdir() if p.name.endswith(".part")]


# ---------------------------------------------------------------------------------------------
# Registry and synthetic data


def test_registry_lists_datasets():
    assert {"mnist", "fashion-mnist", "synthetic"} <= set(list_datasets())
    assert list_datasets("*mnist") == ["fashion-mnist", "mnist"]
    assert "synthetic" in DATASETS


def test_unknown_dataset_suggests_close_matches():
    with pytest.raises(SparsetrainError, match="'mnist'"):
        create_loaders("mnsit")


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_synthetic(40, 10, shape=(3, 8, 8), num_classes=4), make_synthetic(40, 10, (3, 8, 8), 4)
    assert a.train_x.shape == (40, 3, 8, 8) and a.train_x.dtype == torch.float32
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert torch.bincount(a.train_y).tolist() == [10, 10, 10, 10]
    assert not torch.equal(a.train_x, make_synthetic(40, 10, (3, 8, 8), 4, seed=1).train_x)
    raw = load_dataset("synthetic")
    assert raw.train_x.shape == (600, 1, 28, 28) and raw.test_x.shape == (200, 1, 28, 28)
    assert raw.num_classes == 10


def test_synthetic_is_learnable():
    raw = make_synthetic(600, 200)
    # Nearest class mean, fitted on train: a learner far simpler than any network.
    means = torch.stack([raw.train_x[raw.train_y == c].mean(0) for c in range(10)]).flatten(1)
    predictions = torch.cdist(raw.test_x.flatten(1), means).argmin(1)
    assert (predictions == raw.test_y).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------
# Preprocessing and split


def test_preprocess_scales_and_standardises():
    raw = make_synthetic(10, 4)
    raw.train_x = torch.randint(0, 256, (50, 1, 5, 5), dtype=torch.uint8)
    raw.test_x = torch.randint(0, 256, (20, 1, 5, 5), dtype=torch.uint8)
    train_x, test_x, mean, std = preprocess(raw)
    assert train_x.dtype == torch.float32
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std(correction=0).item() - 1) < 1e-4
    expected = (raw.test_x.float() / 255 - mean) / std
    torch.testing.assert_close(test_x, expected)
    assert 0 < mean < 1  # statistics of [0, 1] pixels, not of 0..255


def test_split_sizes_determinism_and_disjointness():
    ids = torch.arange(600)
    (tr, _), (va, _) = split_train_val(ids, ids, 0.1, split_seed=0)
    assert len(tr) == 540 and len(va) == 60
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(set(tr.tolist()) | set(va.tolist())) == 600
    (_, _), (va_again, _) = split_train_val(ids, ids, 0.1, split_seed=0)
    (_, _), (va_other, _) = split_train_val(ids, ids, 0.1, split_seed=1)
    assert torch.equal(va, va_again) and not torch.equal(va, va_other)


def test_create_loaders_split_and_standardisation():
    loaders = create_loaders("synthetic", batch_size=32, eval_batch_size=64)
    assert loaders.train.num_examples == 540 and loaders.val.num_examples == 60
    assert loaders.test.num_examples == 200
    assert loaders.input_shape == (1, 28, 28) and loaders.num_classes == 10 and loaders.name == "synthetic"
    everything = torch.cat([loaders.train.x, loaders.val.x])
    assert abs(everything.mean().item()) < 1e-4 and abs(everything.std().item() - 1) < 1e-3
    again = create_loaders("synthetic", batch_size=32)
    assert torch.equal(loaders.val.x, again.val.x)
    assert create_loaders("synthetic", val_fraction=0).val is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"batch_size": 10_000}, "batch size"),
    ],
)
def test_create_loaders_validates_arguments(kwargs, match):
    with pytest.raises(SparsetrainError, match=match):
        create_loaders("synthetic", **kwargs)


# ---------------------------------------------------------------------------------------------
# Loaders


def test_train_stream_resume_matches_uninterrupted_stream():
    ids = torch.arange(23)
    stream = TrainStream(ids, ids * 10, batch_size=5, seed=3)
    assert stream.steps_per_epoch == 4
    uninterrupted = [b for _, b in zip(range(12), stream)]  # three epochs
    for k in range(12):
        resumed = TrainStream(ids, ids * 10, batch_size=5, seed=3).iter_from(k)
        for expected in uninterrupted[k:]:
            x, y = next(resumed)
            assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    epochs = [torch.cat([x for x, _ in uninterrupted[e * 4 : (e + 1) * 4]]) for e in range(3)]
    assert all(len(set(e.tolist())) == 20 for e in epochs)  # no repeats within an epoch
    assert not torch.equal(epochs[0], epochs[1])
    assert not torch.equal(epochs[0], next(TrainStream(ids, ids, 20, seed=4).iter_from(0))[0])


def test_train_stream_rejects_batch_larger_than_data():
    with pytest.raises(SparsetrainError, match="batch size"):
        TrainStream(torch.zeros(4, 2), torch.zeros(4), batch_size=5)


def test_eval_loader_covers_every_example_once():
    ids = torch.arange(23)
    loader = EvalLoader(ids, ids * 2, batch_size=5, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and loader.num_examples == 23
    assert [len(x) for x, _ in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([x for x, _ in batches]), ids)
    assert torch.equal(torch.cat([y for _, y in batches]), ids * 2)


# ---------------------------------------------------------------------------------------------
# The real data sets (skipped where the shared copy is absent)


# Read at import: the autouse fixture removes SPARSETRAIN_DATA from each test's environment.
SHARED_DATASETS = (
    Path(os.environ["SPARSETRAIN_DATA"])
    if os.environ.get("SPARSETRAIN_DATA")
    else Path(__file__).resolve().parents[2] / "shared" / "datasets"
)


@pytest.fixture
def real_root() -> Path:
    root = SHARED_DATASETS
    if not (root / "mnist").is_dir():
        pytest.skip(f"no shared MNIST copy in {root}")
    return root


def test_real_mnist(real_root):
    loaders = create_loaders("mnist", data_dir=real_root, download=False)
    assert loaders.train.num_examples == 54000 and loaders.val.num_examples == 6000
    assert loaders.test.num_examples == 10000 and loaders.input_shape == (1, 28, 28)
    assert abs(loaders.mean - 0.1307) < 1e-3 and abs(loaders.std - 0.3081) < 1e-3
    raw = load_dataset("mnist", real_root, download=False)
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert raw.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert raw.test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_real_fashion_mnist(real_root):
    if not (real_root / "fashion-mnist").is_dir():
        pytest.skip(f"no shared Fashion-MNIST copy in {real_root}")
    raw = load_dataset("fashion-mnist", real_root, download=False)
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_y.shape == (10000,)
    assert torch.bincount(raw.train_y).tolist() == [6000] * 10
