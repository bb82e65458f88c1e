"""`sparsetrain bench` says how much to trust each figure: the spread of its timings beside it,
*noisy* with advice where the spread is wide, and why a speed-up above the FLOP limit is real
(a cache holds the sparse weights, not the dense ones) or probably noise. Timed by a fake timer:
the figures are known in advance, so every check has an oracle."""

from __future__ import annotations

import math

import pytest

from sparsetrain.cli.main import main
from sparsetrain.measure import Timings
from sparsetrain.sparse import bench as sb

QUIET = [2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]  # dense, sparse: 2x, spread 0
# sorted [0.4, 0.5, 1, 2, 3]: quartiles 0.5 and 2, median 1: spread 1.5
NOISY = [2.0, 2.0, 2.0, 2.0, 2.0], [0.5, 1.0, 2.0, 3.0, 0.4]


def fake_timer(dense, sparse):
    """Every name but "dense" (the sparse model, and to_sparse's sparse candidates) gets ``sparse``."""
    def timer(fns, **_):
        return Timings({name: list(dense if name == "dense" else sparse) for name in fns})
    return timer


def run_bench(samples):
    return sb.bench("mlp-tiny", 0.9, batch_sizes=[1], repeats=2, budget_s=0.01, threads=1, timer=fake_timer(*samples))


def test_quiet_figures_carry_their_spread_and_no_mark():
    result = run_bench(QUIET)
    row = result.end_to_end(1)
    assert row.speedup == 2.0 and row.dense_spread == 0.0 and row.sparse_spread == 0.0 and not row.noisy
    text = result.to_markdown()
    assert "| **2.00x** | 0.00 / 0.00 |" in text
    assert "x noisy" not in text and "Notes:" not in text


def test_noisy_figures_are_marked_with_advice():
    result = run_bench(NOISY)
    row = result.end_to_end(1)
    assert row.sparse_spread == pytest.approx(1.5) and row.noisy
    text = result.to_markdown()
    assert "| **2.00x** noisy | 0.00 / 1.50 |" in text
    assert "figures are marked noisy" in text and "quiet machine" in text and "--threads" in text
    assert result.to_dict()["rows"][-1]["sparse_spread"] == pytest.approx(1.5)


def test_the_sweep_marks_noisy_figures_too():
    result = sb.sweep("mlp-tiny", [0.9], batch_sizes=[1], repeats=2, budget_s=0.01, threads=1,
                      timer=fake_timer(*NOISY))
    assert "2.00x (" in result.to_markdown() and ") noisy |" in result.to_markdown()
    assert "Note: 1 of 1 figures are noisy" in result.to_markdown()


def row(speedup, flop_limit, stored, dense):
    return sb.BenchRow(batch_size=1, layer="0", kind="Linear", layout="csr:kernel", shape=(1, 1), nnz=1,
                       sparsity=1 - 1 / flop_limit, dense_bytes=dense, stored_bytes=stored, dense_time=1.0,
                       sparse_time=1 / speedup, speedup=speedup, flop_limit=flop_limit)


CACHES = {"L1": 32 * 2**10, "L2": 2**20, "L3": 32 * 2**20}


def test_a_speedup_above_the_flop_limit_is_explained_by_the_cache():
    # 4096x4096 float32 at 99%: dense 64 MiB (beyond L3), CSR about 1.3 MiB (in L3, not L2)
    note = sb.above_limit_note(row(290.0, 100.0, stored=1_350_000, dense=64 * 2**20), CACHES)
    assert note.startswith("290.0x is above the FLOP limit 100.0x, and real")
    assert "fit in the L3 cache (32.0 MiB)" in note and "(64.0 MiB) do not" in note


def test_a_speedup_above_the_limit_without_a_cache_reason_is_called_noise():
    note = sb.above_limit_note(row(30.0, 20.0, stored=50_000, dense=200_000), CACHES)  # both in L2, neither in L1
    assert "with no cache to explain it" in note and "probably noise" in note
    assert sb.above_limit_note(row(30.0, 20.0, stored=10_000, dense=200_000), {}) is not None
    assert sb.above_limit_note(row(19.0, 20.0, stored=10_000, dense=64 * 2**20), CACHES) is None  # below it
    assert sb.above_limit_note(row(5.0, math.inf, stored=0, dense=100), CACHES) is None


def test_cache_sizes_from_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                            (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert sb.cache_sizes(tmp_path) == {"L1": 32 * 2**10, "L2": 2**20, "L3": 32 * 2**20}
    assert sb.cache_sizes(tmp_path / "absent") == {}


def test_the_command_prints_the_mark_and_the_advice(capsys, monkeypatch):
    monkeypatch.setattr(sb, "time_interleaved", fake_timer(*NOISY))
    code = main(["bench", "--model", "mlp-tiny", "--sparsity", "0.9", "--batch-sizes", "1", "--repeats", "2",
                 "--budget", "0.01", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "noisy" in out and "quiet machine" in out
