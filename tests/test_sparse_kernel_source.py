"""The C++ kernel is a file of its own (package data): readable through importlib.resources,
accepted by a compiler on its own, and its build cache is keyed by its contents."""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess

import pytest

from sparsetrain.sparse import kernels


def test_source_is_package_data():
    text = importlib.resources.files("sparsetrain.sparse").joinpath("csr_kernel.cpp").read_text()
    assert text == kernels._cpp_source()
    for symbol in ("csr_matmul_f32", "csr_matmul_f64", "csr_linear_rows_f32", "transpose_f64"):
        assert symbol in text


def test_cache_folder_is_keyed_by_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETRAIN_KERNEL_CACHE", str(tmp_path))
    first = kernels._cache_dir()
    assert first.parent == tmp_path
    source = kernels._cpp_source()
    monkeypatch.setattr(kernels, "_cpp_source", lambda: source + "\n// edited\n")
    assert kernels._cache_dir() != first


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_a_compiler_accepts_the_file_alone():
    path = importlib.resources.files("sparsetrain.sparse").joinpath("csr_kernel.cpp")
    with importlib.resources.as_file(path) as p:
        proc = subprocess.run(["g++", "-fsyntax-only", "-std=c++17", "-fopenmp", "-march=native", "-Wall", str(p)],
                              capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
