"""Shared fixtures: every test runs offline, with its own run store and no user data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsetrain.data import idx as idx_module

# The shared, read-only copy of the real data sets (MNIST, Fashion-MNIST) on the development
# machines: <repo>/../shared/datasets.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path, monkeypatch):
    """No test reaches the internet, reads the user's data folder or writes the user's run store."""
    monkeypatch.setenv("SPARSETRAIN_HOME", str(tmp_path / "sparsetrain-home"))
    dead = (tmp_path / "no-such-mirror").as_uri() + "/"
    for name in list(idx_module.MIRRORS):
        monkeypatch.setitem(idx_module.MIRRORS, name, [dead])
    monkeypatch.delenv("SPARSETRAIN_DATA", raising=False)


@pytest.fixture
def shared_datasets() -> Path:
    """The data root holding the real MNIST; the test is skipped where it is absent."""
    folder = SHARED_DATASETS / "mnist"
    if not all((folder / f"{base}.gz").is_file() or (folder / base).is_file() for base in idx_module.IDX_FILES):
        pytest.skip(f"no shared MNIST copy in {folder}")
    return SHARED_DATASETS
