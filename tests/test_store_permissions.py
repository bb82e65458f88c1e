"""A run store the user may read but not write: listing works, training says why it cannot record.

File modes do not bind root, so the reader runs as the unprivileged user ``nobody`` through
``setpriv`` in a subprocess (the test is skipped where there is no such tool or user, or where
the tests already run unprivileged and cannot switch user).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sparsetrain.store import DB_NAME, RunStore

SETPRIV = shutil.which("setpriv")


def _nobody() -> str | None:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None
    return "nobody"


pytestmark = pytest.mark.skipif(
    SETPRIV is None or _nobody() is None or os.geteuid() != 0,
    reason="needs root, setpriv and the user 'nobody' to run a reader without write access",
)


@pytest.fixture
def shared_store():
    """A store with two runs in a fresh folder under /tmp that everyone may read and only root write."""
    folder = Path(tempfile.mkdtemp(prefix="sparsetrain-ro-", dir="/tmp"))
    os.chmod(folder, 0o755)
    root = folder / "store"
    store = RunStore(root)
    store.begin("done", {"model": "mlp-tiny"}, seed=0, versions={})
    store.finish("done", {"test_error_final": 0.1})
    store.begin("open", {"model": "mlp-tiny"}, seed=1, versions={})
    store.fail("open", "KeyboardInterrupt", status="interrupted")
    os.chmod(root, 0o755)
    assert not (root / (DB_NAME + "-wal")).exists(), "the writers closed: the WAL is folded into the file"
    yield root
    shutil.rmtree(folder)


def _as_nobody(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "SPARSETRAIN_HOME": "/tmp/sparsetrain-nobody-home"}
    command = [SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module", autouse=True)
def nobody_can_import_sparsetrain():
    """Skip, saying why, where 'nobody' cannot read the checkout (a clone inside a ``mktemp -d``
    folder, mode 700): the reader would fail on the import, not on the store."""
    done = _as_nobody("-c", "import sparsetrain")
    if done.returncode != 0 and ("ModuleNotFoundError" in done.stderr or "PermissionError" in done.stderr):
        import sparsetrain

        pytest.skip(f"the user 'nobody' cannot import sparsetrain from {Path(sparsetrain.__file__).parent}: a "
                    "folder on that path is closed to others; chmod o+rx it to run these tests")


def test_a_read_only_store_lists_and_refuses_writes_saying_why(shared_store):
    script = f"""
from sparsetrain.errors import SparsetrainError
from sparsetrain.store import RunStore
store = RunStore({str(shared_store)!r})
print("LIST", sorted((r.key, r.status) for r in store.list()))
print("CHECK", store.check().ok)
for what, write in [("begin", lambda: store.begin("new", {{}}, seed=0, versions={{}})),
                    ("lease", lambda: store.take_lease("open"))]:
    try:
        write()
        print(what, "WROTE")
    except SparsetrainError as exc:
        print(what, "REFUSED", exc)
try:
    RunStore({str(shared_store / "inner")!r})
except SparsetrainError as exc:
    print("create REFUSED", exc)
"""
    done = _as_nobody("-c", script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "LIST [('done', 'finished'), ('open', 'interrupted')]"
    assert lines[1] == "CHECK True"
    for line, what in zip(lines[2:], ("begin", "lease")):
        assert line.startswith(f"{what} REFUSED the run store {shared_store} is not writable by you (user nobody): ")
        assert "reading it (sparsetrain runs) works" in line
    assert lines[4] == (f"create REFUSED the run store {shared_store / 'inner'} is not writable by you (user nobody): "
                        "cannot create the folder (Permission denied); ask its owner for write access, or pass "
                        "--store (or set SPARSETRAIN_HOME) to a folder of your own")
    assert [r.key for r in RunStore(shared_store).list()] == ["done", "open"], "nothing changed"


@pytest.mark.slow  # two command-line processes (each imports torch): ~5 s
def test_the_command_line_lists_a_read_only_store_and_refuses_to_train_into_it(shared_store):
    listing = _as_nobody("-m", "sparsetrain.cli.main", "runs", "--store", str(shared_store))
    assert listing.returncode == 0, listing.stderr
    assert "finished" in listing.stdout and "interrupted" in listing.stdout
    training = _as_nobody("-m", "sparsetrain.cli.main", "run", "--model", "mlp-tiny", "--dataset", "synthetic",
                          "--iterations", "5", "--no-progress", "--store", str(shared_store))
    assert training.returncode == 2, training.stderr
    assert training.stderr.startswith(f"sparsetrain run: error: the run store {shared_store} is not writable by you (user nobody)")
    assert "Traceback" not in training.stderr



def test_a_read_only_reader_sees_what_a_live_writer_just_wrote(shared_store):
    """While the owner's process has the store open, its latest writes sit in the -wal file; the
    reader without write access reads them through the -shm index that process keeps."""
    writer = sqlite3.connect(shared_store / DB_NAME, isolation_level=None)
    try:
        writer.execute("UPDATE runs SET name = 'renamed while open' WHERE key = 'done'")
        assert (shared_store / (DB_NAME + "-wal")).stat().st_size > 0
        done = _as_nobody("-c", f"""
from sparsetrain.store import RunStore
print(sorted((r.key, r.name) for r in RunStore({str(shared_store)!r}).list()))
""")
    finally:
        writer.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('done', 'renamed while open'), ('open', '')]"
