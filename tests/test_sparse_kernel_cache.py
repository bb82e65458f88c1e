"""The compiled kernel's cache survives damage: a truncated library is rebuilt (said once on
stderr), never loaded; a failed build falls back to torch's CSR path with a message; a full disk
while building leaves no file behind. Each load runs in a fresh process (the kernel is loaded
once per process), with its own cache folder (``SPARSETRAIN_KERNEL_CACHE``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from sparsetrain.errors import SparsetrainError
from sparsetrain.fsio import simulate_full_disk
from sparsetrain.sparse import kernels

# Loads the kernel, multiplies a fixed sparse matrix, and prints whether the C++ kernel ran and
# the largest difference from the dense product (the oracle: x @ w.T).
PROBE = """
import json, torch
from sparsetrain.sparse import kernels
g = torch.Generator().manual_seed(0)
w = torch.randn(37, 53, generator=g) * (torch.rand(37, 53, generator=g) < 0.2)
x = torch.randn(9, 53, generator=g)
y = kernels.csr_linear(x, kernels.CSRMatrix.from_dense(w))
print(json.dumps({"kernel": kernels.extension_available(), "diff": float((y - x @ w.T).abs().max())}))
"""


def probe(cache, **env) -> tuple[dict, str]:
    environ = {**os.environ, "SPARSETRAIN_KERNEL_CACHE": str(cache), **env}
    environ.pop("SPARSETRAIN_NO_KERNEL", None)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, timeout=300)
    assert done.returncode == 0, f"the process died ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def built_library(cache):
    (lib,) = cache.glob("*/csr_kernel.so")
    return lib


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_a_truncated_library_is_rebuilt_not_loaded(tmp_path):
    result, err = probe(tmp_path)
    assert result["kernel"] and result["diff"] < 1e-4, err
    lib = built_library(tmp_path)
    recorded = lib.with_name("csr_kernel.so.sha256").read_text().split()[0]
    good = lib.read_bytes()
    assert recorded == hashlib.sha256(good).hexdigest() and kernels._damage(lib) is None  # loaded as is next time

    with open(lib, "r+b") as f:  # a killed copy / a full disk: the first half only
        f.truncate(len(good) // 2)
    result, err = probe(tmp_path)  # (it crashed with a bus error and no message)
    assert result["kernel"] and result["diff"] < 1e-4
    assert err.count("rebuilding it") == 1 and "differs from the one recorded" in err
    assert kernels._damage(lib) is None and len(lib.read_bytes()) == len(good)

    lib.with_name("csr_kernel.so.sha256").unlink()  # a library without its checksum is not trusted either
    assert kernels._damage(lib) == "it has no recorded checksum"


def test_a_failed_build_falls_back_to_torch_with_a_message(tmp_path):
    result, err = probe(tmp_path, CXX="false")  # a compiler that always fails
    assert not result["kernel"] and result["diff"] < 1e-4
    assert "C++ sparse kernel is unavailable" in err and "torch's CSR path" in err
    assert not list(tmp_path.glob("*/csr_kernel.so*")) and not list(tmp_path.glob("*/.*"))


def test_a_full_disk_while_building_leaves_nothing(tmp_path):
    with simulate_full_disk("kernel"), pytest.raises(SparsetrainError, match="cannot write the kernel"):
        kernels._build(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []
