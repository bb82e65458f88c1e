"""Shared fixtures: every test runs offline, with its own run store and no user data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sparsetrain import threads as threads_module
from sparsetrain.data import idx as idx_module

# The shared, read-only copy of the real data sets (MNIST, Fashion-MNIST) on the development
# machines: <repo>/../shared/datasets.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# Where the user points the library at real data, read here at import: the autouse fixture below
# removes SPARSETRAIN_DATA from each test's environment, so that no other test reads it.
USER_DATA = os.environ.get(idx_module.DATA_ENV) or None


def has_mnist(root: Path) -> bool:
    """Whether ``root/mnist`` holds the four MNIST files (compressed or not)."""
    folder = root / "mnist"
    return all((folder / f"{base}.gz").is_file() or (folder / base).is_file() for base in idx_module.IDX_FILES)


def mnist_roots() -> list[Path]:
    """The data roots to try, in the library's order: ``$SPARSETRAIN_DATA``, then the shared copy."""
    return ([Path(USER_DATA)] if USER_DATA else []) + [SHARED_DATASETS]


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path, monkeypatch):
    """No test reaches the internet, reads the user's data folder or writes the user's run store."""
    monkeypatch.setenv("SPARSETRAIN_HOME", str(tmp_path / "sparsetrain-home"))
    dead = (tmp_path / "no-such-mirror").as_uri() + "/"
    for name in list(idx_module.MIRRORS):
        monkeypatch.setitem(idx_module.MIRRORS, name, [dead])
    monkeypatch.delenv("SPARSETRAIN_DATA", raising=False)


@pytest.fixture(autouse=True)
def torch_threads_restored(monkeypatch):
    """A test that asks for a thread count (``--threads``) leaves the next test torch's own."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads_module, "_requested", None)
    yield
    torch.set_num_threads(before)


def find_mnist_root() -> Path | None:
    """The first of :func:`mnist_roots` that holds MNIST, or ``None``."""
    return next((root for root in mnist_roots() if has_mnist(root)), None)


@pytest.fixture
def mnist_root() -> Path:
    """The data root holding the real MNIST: ``$SPARSETRAIN_DATA`` when it has one, else
    ``../shared/datasets``; the test is skipped where neither has it."""
    root = find_mnist_root()
    if root is None:
        pytest.skip("no real MNIST in " + " or ".join(str(r / "mnist") for r in mnist_roots()))
    return root


@pytest.fixture
def shared_datasets(mnist_root) -> Path:
    """The same root as :func:`mnist_root` (its former name, still used by test_data_args)."""
    return mnist_root
