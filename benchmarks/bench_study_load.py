"""Benchmark: the study engine's many-machine storage under load. A study of ``--trials`` short
trials (a tiny network on the synthetic data set, ``--iterations`` steps each, every trial to its
budget) worked by ``--processes`` worker processes against one PostgreSQL server on this machine
(a throwaway one, started and stopped by ``scripts/postgres-server``, as the tests use). The
workers are split over ``--hosts`` `sparsetrain study work` commands, each with its own folder, as
separate machines would run them (the spec comes from the database).

Measured: trials per minute (the work commands' wall time), trials lost (plan indexes without a
finished trial) and duplicated (plan indexes with two or more), failed attempts, and the server's
client connections (``pg_stat_activity``, sampled every 0.2 s while the workers run: peak and
median). Not a test: nothing fails a build.

    .venv/bin/python benchmarks/bench_study_load.py            # writes docs/results/bench_study_load.md
    .venv/bin/python benchmarks/bench_study_load.py --trials 40 --processes 2 --out -
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import psycopg

from sparsetrain.measure import Provenance, load_average, publish_report
from sparsetrain.study import engine
from sparsetrain.study.workloads import load_workload

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "scripts" / "postgres-server"

WORKLOAD = """
model = "mlp-tiny"
dataset = "synthetic"
seed = 0
[train]
optimizer = "sgd"
momentum = 0.0
weight_decay = 0.0
schedule = "constant"
iterations = {iterations}
batch_size = 32
checkpoint_every = {iterations}
val_every = {val_every}
goal_error = 0.0001
"""


def start_server() -> tuple[str, str]:
    """A throwaway server: (its URL, its folder)."""
    out = subprocess.run([str(SERVER), "start"], check=True, capture_output=True, text=True).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))
    return env["SPARSETRAIN_TEST_POSTGRES"], env["SPARSETRAIN_POSTGRES_DIR"]


class ConnectionSampler:
    """Counts the server's client connections every ``interval`` seconds (this sampler's own
    connection left out) until stopped."""

    QUERY = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"

    def __init__(self, url: str, interval: float = 0.2):
        self.url, self.interval, self.samples = url, interval, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                self.samples.append(conn.execute(self.QUERY).fetchone()[0])
                self.stop.wait(self.interval)

    def __enter__(self) -> "ConnectionSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def count_trials(url: str, root: Path, study: str) -> dict:
    """Per plan index, how many finished trials; failed attempts; duplicates refused."""
    S = optuna.trial.TrialState
    with engine.open_study(root, storage=url, study=study) as opened:
        finished, failed, duplicates = {}, 0, 0
        for w, b, s in opened.spec.points():
            for t in opened.point_study(w, b, s).get_trials(deepcopy=False):
                if t.state in (S.COMPLETE, S.PRUNED):
                    key = (b, s, t.user_attrs["plan_index"])
                    finished[key] = finished.get(key, 0) + 1
                elif t.state == S.FAIL:
                    failed += 1
                    duplicates += "duplicate_of" in t.user_attrs
        planned = [(b, s, i) for _, b, s in opened.spec.points() for i in range(opened.spec.trials)]
    return {"planned": len(planned), "finished": sum(finished.values()),
            "lost": sum(finished.get(k, 0) == 0 for k in planned),
            "duplicated": sum(n > 1 for n in finished.values()), "failed_attempts": failed,
            "duplicates_refused": duplicates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=500, help="trials in the study (default 500)")
    parser.add_argument("--processes", type=int, default=8, help="worker processes in all (default 8)")
    parser.add_argument("--hosts", type=int, default=2, help="`study work` commands sharing them (default 2)")
    parser.add_argument("--iterations", type=int, default=20, help="training steps per trial (default 20)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "bench_study_load.md"),
                        help="the Markdown report ('-': print only)")
    args = parser.parse_args(argv)
    batch_sizes = (8, 16, 32, 64)
    if args.trials % len(batch_sizes) or args.processes % args.hosts:
        parser.error(f"--trials must be a multiple of {len(batch_sizes)} and --processes of --hosts")
    provenance = Provenance.now(["python", "benchmarks/bench_study_load.py", *(argv or sys.argv[1:])])
    url, server_dir = start_server()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-study-load-") as tmp:
            root = Path(tmp)
            (root / "tiny.toml").write_text(WORKLOAD.format(iterations=args.iterations,
                                                            val_every=max(1, args.iterations // 2)))
            spec = engine.StudySpec((load_workload(root / "tiny.toml"),), batch_sizes, (0.0,),
                                    trials=args.trials // len(batch_sizes), early_stop=False,
                                    heartbeat_interval=5, grace_period=30)
            engine.plan(root / "planner", spec, storage=url, study="load")
            sparsetrain = Path(sys.executable).with_name("sparsetrain")
            env = {**os.environ, "SPARSETRAIN_HOME": str(root / "home")}
            load_before = load_average()
            with ConnectionSampler(url) as sampler:
                start = time.perf_counter()
                hosts = [subprocess.Popen([str(sparsetrain), "study", "work", "--storage", url, "--study", "load",
                                           "--dir", str(root / f"host-{h}"),
                                           "--workers", str(args.processes // args.hosts)],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for h in range(args.hosts)]
                codes = [p.wait() for p in hosts]
                seconds = time.perf_counter() - start
            load_after = load_average()
            counts = count_trials(url, root, "load")
    finally:
        subprocess.run([str(SERVER), "stop", server_dir], check=False)
    result = {
        "trials": args.trials, "processes": args.processes, "hosts": args.hosts, "iterations": args.iterations,
        "exit_codes": codes, "seconds": round(seconds, 1),
        "trials_per_minute": round(counts["finished"] / seconds * 60, 1), **counts,
        "connections_peak": max(sampler.samples), "connections_median": statistics.median(sampler.samples),
        "connection_samples": len(sampler.samples), "load_average_before": load_before,
        "load_average_after": load_after,
    }
    per_process = result["connections_peak"] / args.processes
    text = "\n".join([
        "# The study engine on PostgreSQL under load",
        "",
        f"A study of {args.trials} trials (mlp-tiny on the synthetic data set, {args.iterations} SGD steps and "
        f"two validation checks each, every trial to its budget; {len(batch_sizes)} batch sizes x "
        f"{args.trials // len(batch_sizes)} plan points) worked by {args.processes} worker processes in "
        f"{args.hosts} `sparsetrain study work --storage postgresql://... --workers "
        f"{args.processes // args.hosts}` commands with their own folders, against one PostgreSQL server on "
        "this machine (a throwaway one from `scripts/postgres-server`: trust authentication, fsync off). "
        "*lost*: plan indexes without a finished trial; *duplicated*: plan indexes with two or more; "
        "*connections*: the server's client backends, sampled every 0.2 s while the workers ran (the "
        "sampler's own left out).",
        "",
        "| trials | processes | wall s | trials / min | lost | duplicated | failed attempts | connections: peak "
        "/ median | peak per process |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {counts['finished']} of {counts['planned']} | {args.processes} | {result['seconds']} | "
        f"{result['trials_per_minute']} | {counts['lost']} | {counts['duplicated']} | {counts['failed_attempts']} | "
        f"{result['connections_peak']} / {result['connections_median']:g} | {per_process:.2f} |",
        "",
        f"Work commands' exit codes: {codes}. Load average (1, 5, 15 min) before the workers: {load_before}; "
        f"after: {load_after}. The machine was shared with a background reproduction queue (two training "
        "processes) and other jobs, so the rate is this machine's under that load, not the server's limit: "
        "a trial here is mostly its process's own work (building the run, the data, training, the run "
        "store), which the cores' contention slows.",
    ])
    publish_report(args.out, text, {"result": result, "args": vars(args)}, provenance=provenance)
    return 0 if counts["lost"] == 0 and counts["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
