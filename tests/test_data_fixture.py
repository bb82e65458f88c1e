"""The real-data tests use the MNIST the user points at: ``$SPARSETRAIN_DATA`` first (read when
the tests start, before each test's environment drops it), then the shared copy."""

from __future__ import annotations

import conftest
from sparsetrain.data.idx import IDX_FILES


def fake_mnist(root):
    (root / "mnist").mkdir(parents=True)
    for base in IDX_FILES:
        (root / "mnist" / f"{base}.gz").write_bytes(b"")
    return root


def test_the_users_data_comes_first(monkeypatch, tmp_path):
    user = fake_mnist(tmp_path / "user")
    monkeypatch.setattr(conftest, "USER_DATA", str(user))
    monkeypatch.setattr(conftest, "SHARED_DATASETS", fake_mnist(tmp_path / "shared"))
    assert conftest.find_mnist_root() == user


def test_only_the_users_data(monkeypatch, tmp_path):
    # the case that was skipped: SPARSETRAIN_DATA set, no ../shared/datasets
    user = fake_mnist(tmp_path / "user")
    monkeypatch.setattr(conftest, "USER_DATA", str(user))
    monkeypatch.setattr(conftest, "SHARED_DATASETS", tmp_path / "no-shared-copy")
    assert conftest.find_mnist_root() == user


def test_the_shared_copy_without_the_variable_and_nothing_without_either(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "USER_DATA", None)
    monkeypatch.setattr(conftest, "SHARED_DATASETS", fake_mnist(tmp_path / "shared"))
    assert conftest.find_mnist_root() == tmp_path / "shared"
    monkeypatch.setattr(conftest, "SHARED_DATASETS", tmp_path / "none")
    (tmp_path / "half" / "mnist").mkdir(parents=True)  # a folder without the files does not count
    monkeypatch.setattr(conftest, "USER_DATA", str(tmp_path / "half"))
    assert conftest.find_mnist_root() is None
