"""sparsetrain.sparse.bench and `sparsetrain bench`: rows, FLOP limit, bytes, CLI, plot, bad input.

Timings are never checked against a limit (they are positive numbers, nothing more): tiny models,
tiny repeats, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import sparsetrain as st
from sparsetrain.cli.main import main
from sparsetrain.errors import SparsetrainError
from sparsetrain.sparse import sparse_report, to_sparse
from sparsetrain.sparse.bench import END_TO_END, bench, flop_limit, make_mask, plot_sweep, sweep

FAST = dict(repeats=2, budget_s=0.01, threads=1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    return bench("mlp-tiny", 0.9, batch_sizes=[1, 8], **FAST)


def test_rows_for_every_layer_and_batch_size(result):
    layers = [n for n, m in st.create_model("mlp-tiny").named_modules() if isinstance(m, nn.Linear)]
    for b in (1, 8):
        assert [r.layer for r in result.layers(b)] == layers
        assert result.end_to_end(b).batch_size == b
    assert len(result.rows) == 2 * (len(layers) + 1)
    for r in result.rows:
        assert r.dense_time > 0 and r.sparse_time > 0 and r.speedup > 0
        assert r.layout in ("dense", "csr:kernel", "csr:torch") or r.layer == END_TO_END
    # the converted model computes what the dense masked model computes
    assert all(d < 1e-4 for d in result.max_abs_diff.values())


def test_flop_limit_is_one_over_density(result):
    assert flop_limit(0.9) == pytest.approx(10.0)
    assert flop_limit(0.0) == 1.0
    assert math.isinf(flop_limit(1.0))
    # the same mask, computed again: bench's per-layer limits are 1 / (kept fraction of the weight)
    torch.manual_seed(0)  # bench seeds the model with its seed (0) before building it
    model = st.create_model("mlp-tiny").eval()
    mask = make_mask(model, 0.9)
    for r in result.layers(1):
        m = mask[f"{r.layer}.weight"]
        assert r.flop_limit == pytest.approx(m.numel() / int(m.sum()))
        assert r.nnz == int(m.sum())
    e2e = result.end_to_end(8)
    kept, total = sum(int(m.sum()) for m in mask.values()), sum(m.numel() for m in mask.values())
    assert e2e.flop_limit == pytest.approx(total / kept)
    assert e2e.flop_limit == pytest.approx(1 / (1 - 0.9), rel=1e-2)
    assert e2e.of_limit == pytest.approx(e2e.speedup / e2e.flop_limit)


def test_bytes_equal_sparse_report(result):
    torch.manual_seed(0)
    model = st.create_model("mlp-tiny").eval()
    mask = make_mask(model, 0.9)
    for b in (1, 8):
        rows = result.layers(b)
        # force each layer's chosen layout, so the report does not depend on a second timing
        forced = to_sparse(model, mask, layouts=("csr",))
        report = {r.name: r for r in sparse_report(forced)}
        dense_report = {r.name: r for r in sparse_report(to_sparse(model, mask, layouts=("dense",)))}
        for r in rows:
            ref = report[r.layer] if r.layout.startswith("csr") else dense_report[r.layer]
            assert (r.dense_bytes, r.stored_bytes) == (ref.dense_bytes, ref.stored_bytes)
        e2e = result.end_to_end(b)
        assert e2e.dense_bytes == sum(r.dense_bytes for r in rows)
        assert e2e.stored_bytes == sum(r.stored_bytes for r in rows)


def test_markdown_and_dict(result):
    text = result.to_markdown()
    assert "| batch | layer |" in text and "**end to end**" in text and "FLOP limit" in text
    d = json.loads(json.dumps(result.to_dict()))
    assert len(d["rows"]) == len(result.rows) and d["model"] == "mlp-tiny"


def test_module_and_given_mask():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    mask = st.prune_at_init(model, "random", sparsity=0.8, seed=1)
    r = bench(model, None, mask=mask, batch_sizes=[2], input_shape=(64,), num_classes=4, **FAST)
    assert [x.layer for x in r.layers(2)] == ["0", "2"]
    assert r.mask_sparsity == pytest.approx(0.8, abs=0.01)


def test_cli_prints_table_and_writes_files(tmp_path, capsys):
    out = tmp_path / "bench.md"
    code = main(["bench", "--model", "mlp-tiny", "--sparsity", "0.9", "--batch-sizes", "1", "4",
                 "--repeats", "2", "--budget", "0.01", "--threads", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| batch | layer |" in printed and "**end to end**" in printed
    assert out.read_text().startswith("# sparsetrain bench")
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["environment"]["command"].startswith("sparsetrain bench")
    assert {r["batch_size"] for r in data["bench"]["rows"]} == {1, 4}


def test_cli_sweep_plot_writes_png(tmp_path, capsys):
    png = tmp_path / "speedup.png"
    code = main(["bench", "--model", "mlp-tiny", "--sweep", "0.5", "0.9", "--batch-sizes", "1", "4",
                 "--repeats", "2", "--budget", "0.01", "--threads", "1", "--plot", str(png)])
    assert code == 0
    assert "FLOP limit" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_sweep_points_and_linear_plot(tmp_path):
    res = sweep("mlp-tiny", [0.0, 0.9], batch_sizes=[2], **FAST)
    assert [(p.sparsity, p.batch_size) for p in res.points] == [(0.0, 2), (0.9, 2)]
    assert res.point(0.0, 2).flop_limit == 1.0
    assert all(p.speedup > 0 and p.dense_time > 0 and p.sparse_time > 0 for p in res.points)
    path = plot_sweep(res, tmp_path / "plain.png", log_x=False)
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv, words", [
    (["--model", "mlp-tiny", "--sparsity", "1.0"], "sparsity"),
    (["--model", "no-such-model", "--sparsity", "0.5"], "no-such-model"),
    (["--model", "mlp-tiny", "--sparsity", "0.5", "--batch-sizes", "0"], "batch sizes"),
    (["--model", "mlp-tiny"], "--sparsity"),
    (["--model", "mlp-tiny", "--sweep", "0.5", "1.5"], "sparsity"),
])
def test_cli_bad_input_exits_2(argv, words, capsys):
    assert main(["bench", *argv, "--repeats", "2", "--budget", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "sparsetrain bench: error:" in err and words in err


def test_bad_input_in_python():
    with pytest.raises(SparsetrainError, match="sparsity"):
        bench("mlp-tiny", 1.0, **FAST)
    with pytest.raises(SparsetrainError, match="nn.Module"):
        bench(42, 0.5, **FAST)
