"""CIFAR-10 and CIFAR-100 through the real code path, on small files in the official format.

The files come from tests/fake_datasets.py (plain pickle/NumPy/tarfile, nothing of sparsetrain);
its arrays are the oracle. The checksums of the generated archives are computed here (hashlib)
and patched in for the published ones.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fake_datasets import write_cifar10, write_cifar100
from sparsetrain.cli.main import main
from sparsetrain.data import MIRRORS, RawData, cifar, create_loaders, load_dataset, preprocess
from sparsetrain.data.loaders import Standardise
from sparsetrain.errors import SparsetrainError


def test_published_md5s_are_the_authors():
    assert cifar.MD5 == {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}


def test_cifar10_extracted_folder_is_read_as_written(tmp_path):
    data = write_cifar10(tmp_path)
    raw = load_dataset("cifar10", tmp_path, download=False)
    assert raw.train_x.dtype == torch.uint8 and raw.train_x.shape == (100, 3, 32, 32)
    assert np.array_equal(raw.train_x.numpy(), data.train_x) and np.array_equal(raw.train_y.numpy(), data.train_y)
    assert np.array_equal(raw.test_x.numpy(), data.test_x) and np.array_equal(raw.test_y.numpy(), data.test_y)
    assert raw.train_y.dtype == torch.int64 and raw.num_classes == 10 and raw.keep_uint8


def test_python2_style_bytes_keys_are_read(tmp_path):
    """The official files were pickled by Python 2 with NumPy 1: their keys load as bytes, and
    they name numpy.core.multiarray (numpy._core since NumPy 2; the old name warns)."""
    data = write_cifar10(tmp_path)
    batch = data.folder / "cifar-10-batches-py" / "test_batch"
    d = pickle.loads(batch.read_bytes())
    batch.write_bytes(pickle.dumps({k.encode(): v for k, v in d.items()}, protocol=4))
    train = data.folder / "cifar-10-batches-py" / "data_batch_1"
    content = train.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in content  # protocol 2 names it as text
    train.write_bytes(content)
    raw = load_dataset("cifar10", tmp_path, download=False)  # warnings are errors in the suite
    assert np.array_equal(raw.test_x.numpy(), data.test_x) and np.array_equal(raw.train_x.numpy(), data.train_x)


def test_archive_in_the_folder_is_checked_by_md5_and_extracted(tmp_path, monkeypatch):
    data = write_cifar10(tmp_path, archive=True)
    assert data.md5 == hashlib.md5(data.archive.read_bytes()).hexdigest()
    monkeypatch.setitem(cifar.MD5, "cifar10", data.md5)
    raw = load_dataset("cifar10", tmp_path, download=False)
    assert np.array_equal(raw.train_x.numpy(), data.train_x)
    assert (data.folder / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_archive_with_a_wrong_md5_is_refused(tmp_path):
    data = write_cifar10(tmp_path, archive=True)  # the published md5 stays: the generated archive differs
    with pytest.raises(SparsetrainError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert str(data.archive) in msg and "corrupt" in msg and f"md5 of the file is {data.md5}" in msg
    assert cifar.MD5["cifar10"] in msg and "Delete it" in msg
    assert not (data.folder / "cifar-10-batches-py").exists()  # nothing unpacked


def test_download_from_a_mirror_checks_the_md5(tmp_path, monkeypatch):
    served = tmp_path / "mirror"
    data = write_cifar100(served, archive=True)
    monkeypatch.setitem(MIRRORS, "cifar100", [data.folder.as_uri() + "/"])
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(SparsetrainError, match=r"md5 [0-9a-f]{32}, expected eb9058c3a382ffc7106e4002c42a8d85"):
        load_dataset("cifar100", root)  # the published md5 does not match the generated archive
    assert not (root / "cifar100" / "cifar-100-python.tar.gz").exists()
    monkeypatch.setitem(cifar.MD5, "cifar100", data.md5)
    raw = load_dataset("cifar100", root)
    assert np.array_equal(raw.test_x.numpy(), data.test_x) and raw.num_classes == 100


def test_cifar100_fine_and_coarse_labels(tmp_path):
    data = write_cifar100(tmp_path)
    fine = load_dataset("cifar100", tmp_path, download=False)
    coarse = load_dataset("cifar100", tmp_path, download=False, args={"labels": "coarse"})
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert np.array_equal(fine.train_y.numpy(), data.train_y) and np.array_equal(fine.test_y.numpy(), data.test_y)
    assert np.array_equal(coarse.train_y.numpy(), data.extra["train_coarse"])
    assert np.array_equal(coarse.test_y.numpy(), data.extra["test_coarse"])
    assert np.array_equal(coarse.train_x.numpy(), data.train_x)
    loaders = create_loaders("cifar100", batch_size=10, data_dir=tmp_path, download=False,
                             data_args={"labels": "coarse"})
    assert loaders.num_classes == 20


def test_wrong_labels_arg_is_refused(tmp_path):
    write_cifar100(tmp_path)
    with pytest.raises(SparsetrainError, match="data arg 'labels' of data set 'cifar100' must be one of 'fine', 'coarse', got 'medium'"):
        create_loaders("cifar100", data_dir=tmp_path, download=False, data_args={"labels": "medium"})
    with pytest.raises(SparsetrainError, match="unknown data arg 'labels' of data set 'cifar10'"):
        create_loaders("cifar10", data_dir=tmp_path, download=False, data_args={"labels": "coarse"})


def _oracle_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = x.astype(np.float64) / 255
    return pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))


def test_loaders_keep_uint8_and_standardise_each_batch_per_channel(tmp_path):
    data = write_cifar10(tmp_path)
    loaders = create_loaders("cifar10", batch_size=10, eval_batch_size=7, data_dir=tmp_path, download=False)
    mean, std = _oracle_stats(data.train_x)  # the whole training set, before the validation split
    assert loaders.mean == pytest.approx(tuple(mean), rel=1e-9) and loaders.std == pytest.approx(tuple(std), rel=1e-9)
    assert len(set(np.round(mean, 3))) == 3  # the channels do differ, so per-channel is tested
    for stored in (loaders.train.x, loaders.val.x, loaders.test.x):
        assert stored.dtype == torch.uint8
    expected = (data.test_x.astype(np.float64) / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    got = torch.cat([x for x, _ in loaders.test])
    assert got.dtype == torch.float32 and loaders.input_shape == (3, 32, 32)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    x, y = loaders.train.batch(3)
    assert x.dtype == torch.float32 and x.shape == (10, 3, 32, 32)


def test_per_batch_standardisation_equals_the_whole_set_one():
    """Given the same statistics, a uint8 batch standardised as it is drawn equals, bit for bit,
    the same examples in the float32 copy ``preprocess`` makes of the whole set."""
    x = torch.randint(0, 256, (300, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.zeros(300, dtype=torch.int64)
    whole, _, mean, std = preprocess(RawData(x, labels, x[:5], labels[:5], 2))
    assert torch.equal(Standardise(mean, std)(x[17:40]), whole[17:40])
    assert torch.equal(Standardise(mean, std, view="pixels")(x[:3]), whole[:3].permute(0, 2, 3, 1).reshape(3, 64, 3))


def test_views_work_on_uint8_storage(tmp_path):
    data = write_cifar10(tmp_path)
    loaders = create_loaders("cifar10", batch_size=10, data_dir=tmp_path, download=False, val_fraction=0,
                             data_args={"view": "rows"})
    assert loaders.input_shape == (32, 96)
    mean, std = _oracle_stats(data.train_x)
    images = (data.test_x.astype(np.float64) / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    rows = images.transpose(0, 2, 1, 3).reshape(len(images), 32, 96)  # row t: red, green, blue pixels of row t
    np.testing.assert_allclose(next(iter(loaders.test))[0].numpy(), rows, rtol=1e-5, atol=1e-5)
    assert loaders.train.batch(0)[0].shape == (10, 32, 96)


def test_flip_gives_the_mirrored_image_and_resumes_exactly(tmp_path):
    data = write_cifar10(tmp_path)
    kw = dict(batch_size=25, data_dir=tmp_path, download=False, val_fraction=0, shuffle_seed=3)
    loaders = create_loaders("cifar10", **kw, data_args={"flip": True})
    mean, std = _oracle_stats(data.train_x)
    standard = (data.train_x.astype(np.float64) / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    seen = {"same": 0, "mirrored": 0}
    for step in range(4):
        x, y = loaders.train.batch(step)
        idx = loaders.train.epoch_permutation(0)[step * 25 : (step + 1) * 25].numpy()
        assert np.array_equal(y.numpy(), data.train_y[idx])
        for got, original in zip(x.numpy(), standard[idx]):
            if np.allclose(got, original, atol=1e-5):
                seen["same"] += 1
            else:
                np.testing.assert_allclose(got, original[:, :, ::-1], atol=1e-5)
                seen["mirrored"] += 1
    assert seen["same"] > 10 and seen["mirrored"] > 10
    again = create_loaders("cifar10", **kw, data_args={"flip": True})
    resumed = again.train.iter_from(2)
    for step in (2, 3, 4):
        assert torch.equal(next(resumed)[0], loaders.train.batch(step)[0])


def test_random_crop_is_a_translation_with_black_padding(tmp_path):
    data = write_cifar10(tmp_path)
    loaders = create_loaders("cifar10", batch_size=10, data_dir=tmp_path, download=False, val_fraction=0,
                             data_args={"random_crop": 4})
    mean, std = _oracle_stats(data.train_x)
    x, _ = loaders.train.batch(0)
    idx = loaders.train.epoch_permutation(0)[:10].numpy()
    padded = np.zeros((10, 3, 40, 40))  # black (0) padding, then standardised, as torchvision pads
    padded[:, :, 4:36, 4:36] = data.train_x[idx] / 255
    padded = (padded - mean[None, :, None, None]) / std[None, :, None, None]
    shifts = set()
    for i in range(10):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if np.allclose(x[i].numpy(), padded[i, :, dy : dy + 32, dx : dx + 32], atol=1e-5)]
        assert found, f"example {i} is no translation of its image by up to 4 pixels"
        shifts.add(found[0])
    assert len(shifts) > 1


def test_missing_folder_names_the_files_and_where(tmp_path):
    with pytest.raises(SparsetrainError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(e.value)
    folder = tmp_path / "cifar10"
    assert f"cifar10 data not found in {folder}" in msg and "cifar-10-python.tar.gz" in msg
    assert "cifar-10-batches-py/data_batch_1" in msg and "cifar-10-batches-py/test_batch" in msg
    assert "--data-dir" in msg


def test_folder_in_the_root_itself_is_pointed_out(tmp_path):
    """torchvision keeps <root>/cifar-10-batches-py; sparsetrain looks in <root>/cifar10/."""
    data = write_cifar10(tmp_path)
    (data.folder / "cifar-10-batches-py").rename(tmp_path / "cifar-10-batches-py")
    with pytest.raises(SparsetrainError, match=f"Note: {tmp_path} holds cifar-10-batches-py itself; "
                                               f"sparsetrain looks in {tmp_path / 'cifar10'}: move it there"):
        load_dataset("cifar10", tmp_path, download=False)


def test_partial_folder_names_what_is_missing(tmp_path):
    data = write_cifar10(tmp_path)
    (data.folder / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(SparsetrainError, match=r"missing: cifar-10-batches-py/data_batch_3\)"):
        load_dataset("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a dict", "no labels", "code"])
def test_damaged_batch_is_refused_with_the_file_named(tmp_path, damage):
    data = write_cifar10(tmp_path)
    batch = data.folder / "cifar-10-batches-py" / "data_batch_2"
    content = batch.read_bytes()
    if damage == "truncated":
        batch.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        batch.write_bytes(b"\x00not a pickle at all")
    elif damage == "not a dict":
        batch.write_bytes(pickle.dumps([1, 2, 3]))
    elif damage == "no labels":
        batch.write_bytes(pickle.dumps({"data": data.train_x[:20].reshape(20, 3072)}))
    else:  # a pickle that would run a command when loaded
        batch.write_bytes(b"cos\nsystem\n(S'true'\ntR.")  # protocol 0: os.system('true')
    with pytest.raises(SparsetrainError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert str(batch) in msg and "Delete it" in msg
    expected = {"truncated": "not a readable CIFAR batch", "garbage": "not a readable CIFAR batch",
                "not a dict": "holds a list, not a dict", "no labels": "no 'labels' entry",
                "code": "asks to build os.system"}[damage]
    assert expected in msg


def test_run_end_to_end_on_generated_cifar10(tmp_path, capsys):
    write_cifar10(tmp_path / "data")
    code = main(["run", "--model", "vgg-cifar-small", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                 "--iterations", "3", "--batch-size", "20", "--sparsity", "0.9", "--no-progress",
                 "--store", str(tmp_path / "store")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "vgg-cifar-small on cifar10" in out
    assert re.search(r"test error \(final model\):\s+[\d.]+%", out)


def test_augmented_cifar_run_resumes_bit_identically(tmp_path, monkeypatch):
    """An interrupted run on CIFAR-10 with random_crop and flip resumes with the batches and
    draws the uninterrupted run saw: the same final weights."""
    from sparsetrain.config import RunConfig
    from sparsetrain.run import run
    from sparsetrain.state_io import load_state
    from sparsetrain.store import RunStore

    write_cifar10(tmp_path / "data")
    config = RunConfig(model="mlp-tiny", dataset="cifar10", data_args={"random_crop": 4, "flip": True}).replace(
        prune={"sparsity": 0.5}, train={"iterations": 12, "batch_size": 15, "val_every": 4, "checkpoint_every": 4})
    kw = dict(data_dir=tmp_path / "data", download=False, progress=False)
    reference = RunStore(tmp_path / "reference")
    run(config, store=reference, **kw)
    store = RunStore(tmp_path / "interrupted")
    real_log = RunStore.log_metrics

    def interrupt_after_8(self, key, step, metrics):
        if step > 8:
            raise KeyboardInterrupt
        return real_log(self, key, step, metrics)

    monkeypatch.setattr(RunStore, "log_metrics", interrupt_after_8)
    with pytest.raises(KeyboardInterrupt):
        run(config, store=store, **kw)
    assert load_state(store.root / "runs" / config.key() / "checkpoint.safetensors")["step"] == 8
    monkeypatch.setattr(RunStore, "log_metrics", real_log)
    run(config, store=store, **kw)
    key = config.key()
    assert store.get(key).status == "finished"
    a = load_state(store.root / "runs" / key / "checkpoint.safetensors")
    b = load_state(reference.root / "runs" / key / "checkpoint.safetensors")
    assert a["step"] == b["step"] == 12
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
