"""benchmarks/bench_gpu_structured.py: the parts that run without a GPU (options, masks, report)
and its refusal, with exit status 2, where there is no CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sparsetrain.sparse import detect_block_size
from sparsetrain.sparse.block import is_2to4

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_structured.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_structured", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_help_works(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    assert "CUDA" in capsys.readouterr().out


def test_without_cuda_it_exits_2_with_a_message(bench, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.md"
    assert bench.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:  # bad options are argparse errors (status 2) too
        bench.main(["--features", "100"])
    assert exc.value.code == 2


def test_masks_and_report_without_a_gpu(bench):
    layer, masks = bench.snip_layer_and_masks(256, 64, 0.75, 16, seed=0)
    assert is_2to4(masks["2:4"].float()) and masks["2:4"].float().mean() == 0.5
    assert detect_block_size(masks["block"].float()) == (64, 64)
    assert masks["block"].float().mean() == 0.25  # 4 of 16 tiles
    rows = [{"dtype": "fp16", "tokens": 1024, "dense_s": 2e-3, "2:4_s": 1.5e-3, "2:4_speedup": 1.33,
             "block_s": 1.2e-3, "block_speedup": 1.7, "rel_err": {"2:4": 1e-3, "block": 2e-3},
             "error": {}, "mode": {"dense": "graph", "2:4": "graph", "block": "eager (graph capture failed: X)"},
             "ok": True}]
    meta = {"gpu": "G", "cuda": "c", "features": 256, "block": 64, "block_sparsity": 0.75, "block_density": 0.25, "score_batch": 16,
            "replays": 3, "inner": 1}
    text = bench.to_markdown(rows, meta)
    assert "| fp16 | 1024 | 2.000 | 1.500 | 1.33x | PASS | 1.200 | 1.70x | MISS |" in text
    assert "timed eager (graph capture failed: X)" in text


def test_no_benchmark_imports_another_through_sys_path():
    """Shared pieces live in the library (sparsetrain.measure, sparsetrain.sparse.bench)."""
    for script in SCRIPT.parent.glob("*.py"):
        source = script.read_text()
        assert "sys.path" not in source, f"{script.name} edits sys.path"
        others = {p.stem for p in SCRIPT.parent.glob("*.py")} - {script.stem}
        for other in others:
            assert f"from {other} import" not in source and f"import {other}" not in source, (script.name, other)
