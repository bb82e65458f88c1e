"""Tiny-ImageNet through the real code path, on a small folder in the official layout (3 classes
of 4 JPEGs, 6 validation images with their annotations) written by tests/fake_datasets.py with
PIL; the oracle is what PIL decodes from the written bytes."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest
import torch

from fake_datasets import write_tiny_imagenet
from sparsetrain import fsio
from sparsetrain.data import create_loaders, load_dataset, tiny_imagenet
from sparsetrain.errors import SparsetrainError


def test_published_md5():
    assert tiny_imagenet.MD5 == {"tiny-imagenet": "90528d7ca1a48142e341f4ef8d21d0de"}


def test_folder_is_read_with_sorted_wnids_and_val_as_test(tmp_path):
    data = write_tiny_imagenet(tmp_path)
    raw = load_dataset("tiny-imagenet", tmp_path, download=False)
    assert raw.train_x.dtype == torch.uint8 and raw.train_x.shape == (12, 3, 64, 64) and raw.keep_uint8
    assert np.array_equal(raw.train_x.numpy(), data.train_x) and np.array_equal(raw.train_y.numpy(), data.train_y)
    assert np.array_equal(raw.test_x.numpy(), data.test_x) and np.array_equal(raw.test_y.numpy(), data.test_y)
    assert raw.num_classes == 3
    grey = data.train_x[0]  # written as a one-channel JPEG: converted to three equal channels
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])


def test_decoded_arrays_are_cached_and_a_changed_folder_is_decoded_again(tmp_path, monkeypatch):
    data = write_tiny_imagenet(tmp_path)
    load_dataset("tiny-imagenet", tmp_path, download=False)
    cache = data.folder / "tiny-imagenet-200.uint8.npz"
    assert cache.is_file()
    decoded = []
    real = tiny_imagenet.decode_folder
    monkeypatch.setattr(tiny_imagenet, "decode_folder", lambda items: decoded.append(len(items)) or real(items))
    raw = load_dataset("tiny-imagenet", tmp_path, download=False)
    assert decoded == [] and np.array_equal(raw.train_x.numpy(), data.train_x)  # from the cache
    assert raw.train_x.dtype == torch.uint8 and raw.keep_uint8
    victim = data.folder / "tiny-imagenet-200" / "train" / data.extra["wnids"][2] / "images" / f"{data.extra['wnids'][2]}_3.JPEG"
    victim.unlink()
    raw = load_dataset("tiny-imagenet", tmp_path, download=False)
    assert decoded == [11, 6] and np.array_equal(raw.train_x.numpy(), data.train_x[:11])
    cache.write_bytes(b"damaged")
    raw = load_dataset("tiny-imagenet", tmp_path, download=False)  # a damaged cache is decoded again
    assert decoded == [11, 6, 11, 6] and np.array_equal(raw.test_x.numpy(), data.test_x)


def test_full_disk_while_caching_warns_and_still_loads(tmp_path):
    data = write_tiny_imagenet(tmp_path)
    with fsio.simulate_full_disk("data"), pytest.warns(UserWarning, match="was not cached.*no space left"):
        raw = load_dataset("tiny-imagenet", tmp_path, download=False)
    assert np.array_equal(raw.train_x.numpy(), data.train_x)
    assert not (data.folder / "tiny-imagenet-200.uint8.npz").exists()
    assert not [p for p in data.folder.iterdir() if p.name.endswith(".tmp")]


def test_zip_is_checked_by_md5_and_extracted(tmp_path, monkeypatch):
    data = write_tiny_imagenet(tmp_path, archive=True)
    with pytest.raises(SparsetrainError, match=f"md5 of the file is {data.md5}, expected 90528d7c"):
        load_dataset("tiny-imagenet", tmp_path, download=False)
    assert data.md5 == hashlib.md5(data.archive.read_bytes()).hexdigest()
    monkeypatch.setitem(tiny_imagenet.MD5, "tiny-imagenet", data.md5)
    raw = load_dataset("tiny-imagenet", tmp_path, download=False)
    assert np.array_equal(raw.train_x.numpy(), data.train_x) and np.array_equal(raw.test_y.numpy(), data.test_y)


def test_zip_member_outside_the_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "tiny-imagenet"
    folder.mkdir()
    archive = folder / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("tiny-imagenet-200/wnids.txt", "n01\n")
        z.writestr("../escaped.txt", "x")
    monkeypatch.setitem(tiny_imagenet.MD5, "tiny-imagenet", hashlib.md5(archive.read_bytes()).hexdigest())
    with pytest.raises(SparsetrainError, match="'../escaped.txt' would be written outside the data folder"):
        load_dataset("tiny-imagenet", tmp_path, download=False)
    assert not (tmp_path / "escaped.txt").exists() and not (folder / "tiny-imagenet-200").exists()


def test_loaders_keep_uint8_standardise_per_channel_and_flip(tmp_path):
    data = write_tiny_imagenet(tmp_path)
    loaders = create_loaders("tiny-imagenet", batch_size=4, data_dir=tmp_path, download=False, val_fraction=0,
                             data_args={"flip": True, "random_crop": 0})
    pixels = data.train_x.astype(np.float64) / 255
    mean, std = pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))
    assert loaders.mean == pytest.approx(tuple(mean), rel=1e-9) and loaders.std == pytest.approx(tuple(std), rel=1e-9)
    assert loaders.train.x.dtype == torch.uint8 and loaders.test.x.dtype == torch.uint8
    assert loaders.input_shape == (3, 64, 64) and loaders.num_classes == 3
    standard = (pixels - mean[None, :, None, None]) / std[None, :, None, None]
    x, _ = loaders.train.batch(0)
    idx = loaders.train.epoch_permutation(0)[:4].numpy()
    for got, original in zip(x.numpy(), standard[idx]):
        assert np.allclose(got, original, atol=1e-5) or np.allclose(got, original[:, :, ::-1], atol=1e-5)


def test_missing_folder_names_the_archive_and_the_unpacked_layout(tmp_path):
    with pytest.raises(SparsetrainError) as e:
        load_dataset("tiny-imagenet", tmp_path, download=False)
    msg = str(e.value)
    assert f"tiny-imagenet data not found in {tmp_path / 'tiny-imagenet'}" in msg
    assert "tiny-imagenet-200.zip" in msg and "tiny-imagenet-200/val/val_annotations.txt" in msg


@pytest.mark.parametrize("damage", ["class folder", "unknown wnid", "missing val image", "corrupt jpeg", "wrong size"])
def test_damaged_folder_is_refused_with_what_to_do(tmp_path, damage):
    from PIL import Image

    data = write_tiny_imagenet(tmp_path)
    base = data.folder / "tiny-imagenet-200"
    wnid = data.extra["wnids"][1]
    if damage == "class folder":
        for f in (base / "train" / wnid / "images").iterdir():
            f.unlink()
        (base / "train" / wnid / "images").rmdir()
        expected = f"class {wnid} of wnids.txt has no folder"
    elif damage == "unknown wnid":
        with open(base / "val" / "val_annotations.txt", "a") as f:
            f.write("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
        expected = "class 'n99999999' is not in wnids.txt"
    elif damage == "missing val image":
        (base / "val" / "images" / "val_1.JPEG").unlink()
        expected = "val_1.JPEG, which does not exist"
    elif damage == "corrupt jpeg":
        (base / "train" / wnid / "images" / f"{wnid}_2.JPEG").write_bytes(b"not a jpeg")
        expected = "cannot be decoded as an image"
    else:
        Image.new("RGB", (32, 32)).save(base / "val" / "images" / "val_3.JPEG", format="JPEG")
        expected = "is 32x32, Tiny-ImageNet images are 64x64"
    with pytest.raises(SparsetrainError, match=expected) as e:
        load_dataset("tiny-imagenet", tmp_path, download=False)
    assert "again" in str(e.value)  # says what to do: unpack / delete and download again
