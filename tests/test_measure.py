"""sparsetrain.measure: the interleaved timer's protocol (order, warm-up, set-up, rounds, budget)
with counting functions, the statistics on given samples, and the report writer. No time is
checked against a limit."""

from __future__ import annotations

import gc
import json
import math

import pytest

from sparsetrain.measure import Provenance, Timings, ratio, time_interleaved, write_report


def recorder():
    calls: list[str] = []

    def fn(name):
        return lambda: calls.append(name)

    return calls, fn


def test_rounds_alternate_order_after_warmup():
    calls, fn = recorder()
    t = time_interleaved({"a": fn("a"), "b": fn("b"), "c": fn("c")}, rounds=4, warmup=2, number=1)
    warm = calls[:6]
    timed = calls[6:]
    assert warm == ["a", "b", "c"] * 2
    assert timed == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert t.rounds == 4 and all(len(v) == 4 for v in t.samples.values())
    assert all(x >= 0 for v in t.samples.values() for x in v)


def test_number_calls_back_to_back_and_setup_is_untimed_and_fresh():
    calls, fn = recorder()
    t = time_interleaved({"a": fn("a")}, rounds=3, warmup=1, number=5)
    assert len(calls) == 1 + 3 * 5 and t.number == 5
    made, used = [], []
    t = time_interleaved({"op": (lambda: made.append(len(made)) or len(made), used.append)}, rounds=3, warmup=1)
    assert made == [0, 1, 2, 3] and used == [1, 2, 3, 4]  # one fresh set-up per call, passed to run
    assert t.number == 1


def test_budget_cuts_rounds_but_not_below_min_rounds():
    calls, fn = recorder()
    t = time_interleaved({"a": fn("a")}, rounds=50, warmup=1, number=1, budget_s=0.0, min_rounds=3)
    assert t.rounds == 3
    t = time_interleaved({"a": fn("a")}, rounds=2, warmup=1, number=1, budget_s=0.0, min_rounds=3)
    assert t.rounds == 2  # never more than asked


def test_sync_runs_around_each_sample_and_gc_state_is_restored():
    synced = []
    assert gc.isenabled()
    time_interleaved({"a": lambda: None}, rounds=2, warmup=1, number=1, sync=lambda: synced.append(1))
    assert len(synced) == 2 * 3  # before and after each of 1 warm-up + 2 timed samples
    assert gc.isenabled()


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        time_interleaved({})
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved({"a": lambda: None}, rounds=0)


def test_statistics_and_the_ratio_convention():
    t = Timings({"dense": [2.0, 4.0, 3.0, 100.0], "sparse": [1.0, 1.0, 3.0, 50.0]})
    assert t.median("dense") == 3.5 and t.medians() == {"dense": 3.5, "sparse": 2.0}
    # ratio(a, b) = time a / time b, paired round by round: rounds 2, 4, 1, 2 -> median 2
    assert t.ratio("dense", "sparse") == 2.0 == ratio(t.samples, "dense", "sparse")
    assert t.ratio("sparse", "dense") == pytest.approx(0.5)
    assert t.quantile("dense", 0.0) == 2.0 and t.quantile("dense", 1.0) == 100.0
    assert t.quantile("dense", 0.5) == 3.5
    assert t.spread("dense") == pytest.approx((t.quantile("dense", 0.75) - t.quantile("dense", 0.25)) / 3.5)
    s = t.summary()
    assert s["sparse"]["median"] == 2.0 and s["sparse"]["rounds"] == 4
    assert math.isinf(Timings({"z": [0.0, 0.0]}).spread("z"))


def test_write_report_atomic_with_provenance(tmp_path):
    prov = Provenance.now(["sparsetrain", "bench", "--model", "x y"])
    assert prov.command == "sparsetrain bench --model 'x y'"
    assert prov.machine and prov.threads >= 1 and prov.date
    out = tmp_path / "sub" / "r.md"
    md, js = write_report(out, "# Title\n\ntext", {"x": [1.0, float("nan")], "inf": float("inf")}, provenance=prov)
    assert (md, js) == (out, out.with_suffix(".json"))
    text = md.read_text()
    assert text.startswith("# Title\n\ntext\n\nCommand: `sparsetrain bench --model 'x y'`")
    assert "Machine: " in text and "Date: " in text and "load average" in text
    data = json.loads(js.read_text())
    assert data["x"] == [1.0, None] and data["inf"] is None
    assert data["provenance"]["command"] == prov.command
    assert sorted(p.name for p in md.parent.iterdir()) == ["r.json", "r.md"]  # no temporary files left
    # rewriting replaces both; without provenance nothing is added
    write_report(out, "# Again\n", {"y": 1}, provenance=None)
    assert md.read_text() == "# Again\n" and json.loads(js.read_text()) == {"y": 1}
    with pytest.raises(ValueError, match=".md"):
        write_report(tmp_path / "r.json", "x", {}, provenance=None)


def test_publish_report_prints_and_writes_only_where_told(tmp_path, capsys):
    from sparsetrain.measure import Provenance, publish_report

    prov = Provenance.now(["python", "bench.py"])
    publish_report("-", "| a |\n|---|\n| 1 |", {"a": 1}, provenance=prov)
    out = capsys.readouterr()
    assert out.out.startswith("| a |") and "Command: `python bench.py`" in out.out and out.err == ""
    assert list(tmp_path.iterdir()) == []
    publish_report(tmp_path / "r.md", "| a |\n|---|\n| 1 |", {"a": 1}, provenance=prov)
    assert "written to" in capsys.readouterr().err
    assert (tmp_path / "r.md").read_text().startswith("| a |") and (tmp_path / "r.json").exists()
