"""The study engine on many machines: one PostgreSQL database, hosts that each have only their own
folder. Two `sparsetrain study work` commands with their own --dir ("hosts") finish one study
together, every trial recorded once, the spec and every curve read from the database by a third
folder that ran nothing; a worker killed with SIGKILL mid-trial has its trial retried after the
grace period; a plan index never gets two finished trials, whichever storage; bad URLs say what
to fix.

The PostgreSQL tests need a server: ``make test`` starts a throwaway one with
``scripts/postgres-server`` when PostgreSQL's binaries are on the machine and exports its URL as
``$SPARSETRAIN_TEST_POSTGRES``; each test gets a database of its own on it. Without a server they
skip, unless ``SPARSETRAIN_REQUIRE_POSTGRES=1`` (CI), where they fail."""

from __future__ import annotations

import math
import os
import threading
import uuid

import optuna
import pytest
from test_study_engine import check_killed_study, killed_study_spec, killer, spec_of, tiny_workload

from sparsetrain.store import RunStore
from sparsetrain.study import engine

POSTGRES_ENV, REQUIRE_ENV = "SPARSETRAIN_TEST_POSTGRES", "SPARSETRAIN_REQUIRE_POSTGRES"
NO_SERVER = (f"no PostgreSQL server for the study engine's many-machine tests: run `make test` on a machine with "
             f"PostgreSQL's binaries (scripts/postgres-server starts a throwaway server; Debian: apt-get install "
             f"postgresql), or set {POSTGRES_ENV}=postgresql://USER@HOST:PORT/DB (a user that may create databases)")


@pytest.fixture(scope="module")
def server() -> str:
    """The server's URL; skips (or fails, under SPARSETRAIN_REQUIRE_POSTGRES=1) without one."""
    url = os.environ.get(POSTGRES_ENV)
    missing = NO_SERVER if not url else None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing = "psycopg is not installed: pip install -e '.[test]'"
    if missing:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {missing}")
        pytest.skip(missing)
    return url


@pytest.fixture
def database(server):
    """A fresh database on the server for one test (dropped after it): its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"sparsetrain_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def run_store_curve(folders, run_key):
    """A run's validation curve from whichever host's run store holds it (the oracle for the curve
    recorded in Optuna)."""
    for folder in folders:
        store = RunStore(folder / "runs")
        if any(r.key == run_key for r in store.list()):
            return [(int(s), float(e)) for s, e in store.metrics(run_key, "val_error")["val_error"]]
    raise AssertionError(f"run {run_key} is in no host's run store")


# ----------------------------------------------------------------------------- many hosts, one database


@pytest.mark.slow  # two worker interpreters import torch and optuna: ~10 s quiet, ~40 s on a loaded 2-core machine
def test_two_hosts_finish_one_study_every_trial_recorded_once(database, tmp_path, capsys):
    from sparsetrain.cli.main import main

    tiny_workload(tmp_path, iterations=150)
    where = ["--storage", database, "--study", "tiny-study"]
    planner, host_a, host_b = tmp_path / "laptop", tmp_path / "host-a", tmp_path / "host-b"
    assert main(["study", "plan", "--dir", str(planner), *where, "--workload", str(tmp_path / "tiny.toml"),
                 "--batch-sizes", "8,32", "--sparsities", "0.5", "--trials", "3", "--heartbeat-interval", "1",
                 "--grace-period", "3"]) == 0
    assert "on each host run: sparsetrain study work --storage URL --study tiny-study" in capsys.readouterr().out
    assert not planner.exists()  # the spec and the plan went to the database

    codes = {}

    def host(folder):  # a host knows only the URL and the study's name: the spec comes from the database
        codes[folder.name] = main(["study", "work", "--dir", str(folder), *where, "--workers", "1"])

    threads = [threading.Thread(target=host, args=(folder,)) for folder in (host_a, host_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == {"host-a": 0, "host-b": 0}
    assert not (host_a / engine.SPEC_FILE).exists() and not (host_a / engine.OPTUNA_FILE).exists()

    # a third folder that ran nothing reads everything from the database, curves included
    found = engine.outcomes(tmp_path / "elsewhere", storage=database, study="tiny-study")
    assert sorted((o.batch_size, o.plan_index) for o in found) == [(b, i) for b in (8, 32) for i in range(3)]
    storage = engine.open_storage(tmp_path, engine.load_spec(tmp_path, storage=database, study="tiny-study"),
                                  database)
    finished = {}
    for name in ("tiny-study/tiny/b8/s0.5", "tiny-study/tiny/b32/s0.5"):
        for t in optuna.load_study(study_name=name, storage=storage).get_trials():
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
                finished.setdefault((name, t.user_attrs["plan_index"]), []).append(t.user_attrs["run_key"])
    assert len(finished) == 6 and all(len(keys) == 1 for keys in finished.values())  # each plan index once
    for o in found:
        key = next(keys[0] for (name, index), keys in finished.items()
                   if index == o.plan_index and name.endswith(f"/b{o.batch_size}/s0.5"))
        assert o.curve == run_store_curve((host_a, host_b), key)  # Optuna's curve = the run's own
        assert o.status in ("complete", "stopped", "incomplete")
    storage.engine.dispose()
    runs_a, runs_b = RunStore(host_a / "runs").list(), RunStore(host_b / "runs").list()
    assert {r.group_name for r in runs_a + runs_b} == {"tiny-study"}
    assert {r.key for r in runs_a} | {r.key for r in runs_b} == {keys[0] for keys in finished.values()}

    capsys.readouterr()
    assert main(["study", "status", "--dir", str(tmp_path / "elsewhere"), *where]) == 0
    out = capsys.readouterr().out
    assert "| tiny/b8/s0.5 " in out and "6 of 6 trials finished (100%)" in out


@pytest.mark.slow  # two worker interpreters, a 3 s grace period: ~15 s quiet, ~45 s on a loaded 2-core machine
def test_a_worker_killed_mid_trial_is_retried_on_postgres(database, tmp_path):
    host = tmp_path / "host"
    where = {"storage": database, "study": "killed"}
    engine.plan(tmp_path / "planner", killed_study_spec(tmp_path), **where)
    storage = engine.open_storage(host, engine.load_spec(host, **where), database)
    names = ("killed/tiny/b8/s0.5", "killed/tiny/b32/s0.5")
    killed: list[int] = []
    try:
        result = engine.work(host, 2, progress=False, on_start=killer(storage, names, killed), **where)
        check_killed_study(host, storage, names, result, killed, 2, where)
    finally:
        storage.engine.dispose()


# ----------------------------------------------------------------------------- the spec in the database


def test_the_spec_lives_in_the_database_under_the_study_name(database, tmp_path):
    spec = spec_of(tiny_workload(tmp_path))
    engine.plan(tmp_path / "a", spec, storage=database)  # named after the folder: "a"
    assert engine.load_spec(tmp_path / "elsewhere", storage=database, study="a").to_dict() == spec.to_dict()
    assert engine.load_spec(tmp_path / "x" / "a", storage=database).to_dict() == spec.to_dict()
    engine.plan(tmp_path / "b", spec, storage=database, study="a")  # the same settings again: nothing new
    rows = engine.status_rows(tmp_path / "c", storage=database, study="a")
    assert [(r["point"], r["waiting"]) for r in rows] == [("tiny/b8/s0.5", 3), ("tiny/b32/s0.5", 3)]
    with pytest.raises(engine.SparsetrainError, match="already holds a study named 'a' planned with other"):
        engine.plan(tmp_path / "a", spec_of(spec.workloads[0], trials=4), storage=database)
    with pytest.raises(engine.SparsetrainError, match="holds no sparsetrain study named 'b'"):
        engine.load_spec(tmp_path / "b", storage=database)
    engine.plan(tmp_path / "a", spec_of(spec.workloads[0], trials=4), storage=database, study="other")
    assert [r["waiting"] for r in engine.status_rows(tmp_path, storage=database, study="other")] == [4, 4]


# ----------------------------------------------------------------------------- recorded once, whatever storage


@pytest.fixture(params=["embedded", "postgresql"])
def opened_study(request, tmp_path):
    """A planned one-point, two-trial study, opened on each storage."""
    storage = request.getfixturevalue("database") if request.param == "postgresql" else None
    spec = spec_of(tiny_workload(tmp_path), batch_sizes=(8,), trials=2)
    engine.plan(tmp_path / "study", spec, storage=storage)
    with engine.open_study(tmp_path / "study", storage=storage) as opened:
        yield opened


def test_a_plan_index_is_recorded_once_even_when_its_trial_ran_twice(opened_study):
    S = optuna.trial.TrialState
    workload, batch_size, sparsity = opened_study.spec.points()[0]
    study = opened_study.point_study(workload, batch_size, sparsity)
    [first, _] = sorted(study.get_trials(), key=lambda t: t.user_attrs["plan_index"])
    twin_id = study._storage.create_new_trial(study._study_id, template_trial=first)  # plan index 0 twice
    for trial_id in (first._trial_id, twin_id):
        study._storage.set_trial_state_values(trial_id, state=S.RUNNING)
    curve = [(10, 0.5), (20, math.nan), (30, 0.05)]
    assert engine.record_trial(study, optuna.Trial(study, first._trial_id), 0, "complete", 30, "k0", curve)
    assert not engine.record_trial(study, optuna.Trial(study, twin_id), 0, "complete", 30, "k0", curve)
    twin = study._storage.get_trial(twin_id)
    assert twin.state == S.FAIL and twin.user_attrs["duplicate_of"] == first.number
    # a trial failed as stale by another worker (its worker was alive after all) is left to its retry
    second = next(t for t in study.get_trials() if t.user_attrs["plan_index"] == 1)
    study._storage.set_trial_state_values(second._trial_id, state=S.FAIL)
    assert not engine.record_trial(study, optuna.Trial(study, second._trial_id), 1, "incomplete", None, "k1", [])
    assert "status" not in study._storage.get_trial(second._trial_id).user_attrs
    [o] = engine.outcomes(opened_study.folder, storage=None if not opened_study.shared else opened_study.where)
    assert (o.plan_index, o.status, o.steps_to_result, o.curve[0], o.curve[2]) == (0, "complete", 30, (10, 0.5),
                                                                                   (30, 0.05))
    assert math.isnan(o.curve[1][1])  # the curve comes from Optuna (there is no run store here)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("url, words", [
    ("postgresql://me:s3cret@127.0.0.1:1/studies",
     "cannot reach the study storage postgresql://me:***@127.0.0.1:1/studies (connection"),
    ("postgresql+pg8000://me@127.0.0.1:1/studies", "its database driver is not installed"),
    ("localhost:5432/studies", "is not a database URL; give e.g. postgresql://USER@HOST:5432/DATABASE"),
    ("mysql://me@db/studies", "'mysql' databases are not supported"),
])
def test_a_bad_storage_url_says_what_to_do(tmp_path, capsys, url, words):
    from sparsetrain.cli.main import main

    assert main(["study", "status", "--dir", str(tmp_path / "s"), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert words in err and "s3cret" not in err


def test_study_names_need_a_shared_storage(tmp_path, capsys):
    from sparsetrain.cli.main import main

    assert main(["study", "status", "--dir", str(tmp_path / "s"), "--study", "x"]) == 2
    assert "--study 'x' names a study in a --storage database" in capsys.readouterr().err
    with pytest.raises(engine.SparsetrainError, match="not a usable study name"):
        engine.study_name(tmp_path, "a/b")
