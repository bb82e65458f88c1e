"""Writing files so that a failure loses nothing: the one atomic writer, the one wording of write
errors, and a switch that simulates a full disk at any write site (for the fault tests).

Every file sparsetrain writes (checkpoints, masks, reports, the compiled kernel, exports) goes
through :func:`atomic_write`: the content is written to a unique temporary name in the target's
folder, flushed to disk, and renamed over the target, so a reader sees the old file or the new one,
never a partial one, and a failed write leaves the previous file as it was. An ``OSError`` on the
way (no space left, a read-only file system, no permission) becomes a :class:`SparsetrainError`
that says which file could not be written, why, and that the previous one is intact.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write(target, lambda tmp: tmp.write_text("first"), what="report")
    >>> with simulate_full_disk("report"):
    ...     atomic_write(target, lambda tmp: tmp.write_text("second"), what="report")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    sparsetrain.errors.SparsetrainError: cannot write the report ...: no space left on device (simulated); ...kept; ...
    >>> target.read_text()
    'first'

Write sites are named (``"checkpoint"``, ``"mask"``, ``"report"``, ``"store"``, ``"kernel"``,
``"export"``, ``"data"``, ``"model"``) so that :func:`simulate_full_disk` can fail one of them, all of them, or
only after a number of successful writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import SparsetrainError

__all__ = ["SITES", "atomic_write", "atomic_write_many", "check_fault", "simulate_full_disk", "write_error"]

SITES = ("checkpoint", "mask", "model", "report", "store", "kernel", "export", "data")

# site -> writes still allowed before the simulated failure (None: fail every write)
_faults: dict[str, int | None] = {}

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_ADVICE = {
    errno.ENOSPC: "free some space (or point the output elsewhere) and run the same command again",
    errno.EDQUOT: "free some space (or point the output elsewhere) and run the same command again",
    errno.EROFS: "point the output at a writable folder",
    errno.EACCES: "check the folder's owner and mode, or point the output at a folder you may write",
    errno.EPERM: "check the folder's owner and mode, or point the output at a folder you may write",
}


def write_error(exc: OSError, path: str | os.PathLike, what: str) -> SparsetrainError:
    """The message for an ``OSError`` raised while writing ``what`` at ``path``: which file, why,
    what to do; and that nothing already written was replaced."""
    reason = _REASONS.get(exc.errno, exc.strerror or str(exc))
    if getattr(exc, "simulated", False):
        reason += " (simulated)"
    advice = _ADVICE.get(exc.errno, "fix the cause and run the same command again")
    return SparsetrainError(
        f"cannot write the {what} {path}: {reason}; the previous {what}, if any, is intact and "
        f"nothing half-written was kept; {advice} (an interrupted run resumes from its last checkpoint)"
    )


def check_fault(what: str) -> None:
    """Raise the simulated ``OSError(ENOSPC)`` if :func:`simulate_full_disk` covers site ``what``
    (called by every write site just before it writes)."""
    for site in (what, "*"):
        if site in _faults:
            left = _faults[site]
            if left is None or left <= 0:
                exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                exc.simulated = True  # type: ignore[attr-defined]
                raise exc
            _faults[site] = left - 1


@contextlib.contextmanager
def simulate_full_disk(*sites: str, after: int = 0) -> Iterator[None]:
    """Within the block, writes at ``sites`` (names from :data:`SITES`; none given: every site)
    fail with ``OSError(ENOSPC)`` as on a full disk, after ``after`` successful writes there."""
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise SparsetrainError(f"unknown write site(s) {unknown}; choose from {list(SITES)}")
    keys = sites or ("*",)
    saved = {k: _faults.get(k, "absent") for k in keys}
    for k in keys:
        _faults[k] = after if after > 0 else None
    try:
        yield
    finally:
        for k, v in saved.items():
            if v == "absent":
                _faults.pop(k, None)
            else:
                _faults[k] = v  # type: ignore[assignment]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, what: str) -> None:
    """Call ``write(tmp)`` to write the content to a temporary file beside ``path``, flush it to
    disk and rename it over ``path``. On any failure the temporary file is removed and ``path`` is
    left as it was; an ``OSError`` becomes a :class:`SparsetrainError` (see :func:`write_error`)."""
    atomic_write_many([(path, write)], what=what)


def atomic_write_many(items: Sequence[tuple[str | os.PathLike, Callable[[Path], None]]], *, what: str) -> None:
    """:func:`atomic_write` for files that belong together (a report's Markdown and its JSON): every
    temporary file is written and flushed first, and only then are they renamed into place, so a
    failure while writing (a full disk) leaves all the old files, not a new one beside an old one."""
    staged: list[tuple[Path, Path]] = []
    path = Path(items[0][0]) if items else Path()
    try:
        for target, write in items:
            path = Path(target)
            # Same folder so os.replace is a rename within one file system (atomic); a unique name
            # so two writers of the same path never clobber each other's half-written file.
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            path.parent.mkdir(parents=True, exist_ok=True)
            check_fault(what)
            staged.append((tmp, path))
            write(tmp)
            _fsync(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as exc:
        for tmp, _ in staged:
            _remove(tmp)
        raise write_error(exc, path, what) from exc
    except BaseException:
        for tmp, _ in staged:
            _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    # Without this a power cut after the rename can leave the new name pointing at empty data.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
