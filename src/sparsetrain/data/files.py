"""Data files on disk: where they are looked for, downloading, checksums, the cache, archives.

One copy for every data set. A data set's files live in ``<root>/<name>/`` with ``<root>`` from
:func:`resolve_data_root`; each is described by a :class:`DataFile` (its name as downloaded and
the sha256 it must have, or the md5 its publisher gives). :func:`locate_files` finds them there or
downloads the missing ones from ``MIRRORS[name]``; :func:`ensure_extracted` does the same for one
archive (a ``.tar.gz``, as CIFAR is distributed, or a ``.zip``, as Tiny-ImageNet is) and unpacks it
into the folder once.

    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp()) / "tiny"
    >>> folder.mkdir()
    >>> _ = (folder / "labels.txt").write_text("0 1 1 0")
    >>> wanted = DataFile("labels.txt", sha256=None)  # no known checksum: nothing to verify
    >>> [p.name for p in locate_files("tiny", [wanted], folder.parent, download=False)]
    ['labels.txt']
    >>> import shutil; shutil.rmtree(folder.parent)

Checksums. A file whose format is gzip (``DataFile(..., gzip=True)``, as the IDX files are) is
checked by the sha256 of its *decompressed* content, so recompressed copies are accepted, and an
uncompressed copy (the name without ``.gz``) is accepted too. Any other file, an archive
included, is checked by the sha256 of its bytes, or by their md5 where that is the only checksum
the publisher gives (CIFAR, Tiny-ImageNet: ``DataFile(name, sha256=None, md5=...)``; md5 guards
against damaged downloads, which is all it is asked to do here). Successful checks are remembered for the process
and in a ``.verified.json`` beside the files, keyed by size and mtime, so a changed file is checked
again. Downloads go to a temporary name and are renamed into place only once their checksum
matched: an interrupted download never leaves half a file under the real name.

Tests (and users behind a proxy) replace the entries of :data:`MIRRORS`, for example with
``file://`` folders.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import SparsetrainError

#: Base URLs tried in order, by data set name; a file's URL is ``<mirror>/<DataFile.name>``.
#: Each format module adds its data sets' entries, so that one dict says where everything comes
#: from (and one monkeypatch keeps a test suite offline).
MIRRORS: dict[str, list[str]] = {}

#: Known sha256 by ``"<data set>/<file>"`` (gzip files: of the decompressed content, keyed by the
#: name without ``.gz``). Format modules add their entries; they read it when loading, so a test
#: may replace an entry.
SHA256: dict[str, str] = {}

DATA_ENV = "SPARSETRAIN_DATA"
DOWNLOAD_TIMEOUT_S = 60.0
VERIFIED_FILE = ".verified.json"

FIX_BAD_FILE = "Delete it so that it is downloaded again, or replace it with a good copy."

# (resolved path, size, mtime_ns, expected sha256) of files already checked in this process:
# the shared copy may be read-only, so the JSON cache cannot always help.
_VERIFIED_IN_PROCESS: set[tuple[str, int, int, str]] = set()


@dataclass(frozen=True)
class DataFile:
    """One file of a data set: its ``name`` as downloaded and the ``sha256`` it must have.

    ``gzip=True``: the file is gzip-compressed (``name`` ends in ``.gz``); ``sha256`` is that of
    the decompressed content, and an uncompressed copy named without ``.gz`` is accepted too.
    ``md5``: the md5 of the file's bytes, for files whose publisher gives only that (checked
    beside ``sha256`` when both are given). Neither: nothing to check.
    """

    name: str
    sha256: str | None
    gzip: bool = False
    md5: str | None = None

    def __post_init__(self):
        if self.gzip and not self.name.endswith(".gz"):
            raise ValueError(f"DataFile({self.name!r}, gzip=True): the name must end in .gz")

    @property
    def candidates(self) -> tuple[str, ...]:
        """The names it may have on disk, in order of preference."""
        return (self.name, self.name[: -len(".gz")]) if self.gzip else (self.name,)


# ---------------------------------------------------------------------------------------------
# Locating


def resolve_data_root(data_dir: str | Path | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$SPARSETRAIN_DATA``, else ``~/.cache/sparsetrain``.

    Data set ``name`` lives in ``<root>/<name>/``. A root the user names must exist (a typo must
    not grow a tree of folders); only the default cache is created when missing
    (:func:`data_folder`).
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sparsetrain"


def check_root(root: Path, data_dir: str | Path | None = None) -> bool:
    """Refuse a data root named by ``data_dir`` or ``$SPARSETRAIN_DATA`` that is not an existing
    folder. Returns whether the root was named (False: the default cache, created when needed)."""
    given = data_dir is not None and str(data_dir) != ""
    named = given or bool(os.environ.get(DATA_ENV))
    if named and not root.is_dir():
        how = "pass an existing --data-dir" if given else f"point ${DATA_ENV} at an existing folder"
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise SparsetrainError(f"data root {root} {problem}; create it or {how}")
    return named


def data_folder(root: Path, name: str, data_dir: str | Path | None = None) -> Path:
    """Create ``<root>/<name>/`` to download into, and nothing above it in a root the user named
    (:func:`check_root`); the default cache root is created with it."""
    folder = root / name
    folder.mkdir(parents=not check_root(root, data_dir), exist_ok=True)
    return folder


def find_file(folder: Path, file: DataFile) -> Path | None:
    """The first of ``file.candidates`` that exists in ``folder``, else None."""
    for candidate in file.candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def read_content(path: Path) -> bytes:
    """The file's content; ``.gz`` files are decompressed. Errors name the file and the fix."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SparsetrainError(f"cannot read {path}: {e}") from e
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is EOFError
        raise bad_file(path, f"bad gzip data ({e})") from e


def bad_file(path: str | Path, problem: str) -> SparsetrainError:
    """The error for a damaged file: names it, the problem, and what to do."""
    return SparsetrainError(f"{path}: {problem}. {FIX_BAD_FILE}")


def locate_files(
    name: str, files: list[DataFile], data_dir: str | Path | None = None, download: bool = True
) -> list[Path]:
    """Paths of ``files`` (same order) in ``<root>/<name>/``, downloading missing ones if allowed.

    Downloads stop at the first file no mirror can serve: the data set is unusable without it.
    Files found on disk are *not* checked here (their checksum needs their content, which the
    caller reads anyway): call :func:`verify` with it. Downloaded files are checked before they
    are moved into place.
    """
    root = resolve_data_root(data_dir)
    folder = root / name
    found = {f.name: find_file(folder, f) for f in files}
    missing = [f for f in files if found[f.name] is None]
    if missing:
        check_root(root, data_dir)
    if missing and not download:
        raise not_found(name, root, folder, files, missing, "Downloading is off (download=False).")
    if missing:
        try:
            data_folder(root, name, data_dir)
        except OSError as e:
            reason = f"Cannot create {folder} to download into: {e}."
            raise not_found(name, root, folder, files, missing, reason) from e
    for file in missing:
        path, errors = download_file(name, file, folder)
        if path is None:
            tried = "".join(f"\n  {e}" for e in errors) or f" no mirrors are configured for {name!r}."
            raise not_found(name, root, folder, files, missing, f"Downloading {file.name} failed:{tried}")
        found[file.name] = path
    return [found[f.name] for f in files]


def not_found(
    name: str, root: Path, folder: Path, files: list[DataFile], missing: list[DataFile], reason: str
) -> SparsetrainError:
    """The error for missing files: the folder, the files expected and missing, why, and the fix."""
    expected = ", ".join(f.name for f in files)
    how_many = "the file" if len(files) == 1 else f"the {_count(len(files))} files"
    lines = [f"{name} data not found in {folder} (data root {root}).", f"Expected {how_many} {expected}"]
    if any(f.gzip for f in files):
        lines[-1] += " (each may also be uncompressed, without .gz)"
    lines[-1] += "."
    lines.append(f"Missing: {', '.join(f.candidates[-1] for f in missing)}.")
    lines.append(reason)
    if any(find_file(root, f) is not None for f in files):
        lines.append(f"Note: {root} itself holds {name} files; the data root must be its parent folder.")
    lines.append(
        f"Fix: put the files in {folder}, or point to a data root that has a {name}/ folder with them: "
        f"--data-dir DIR or {DATA_ENV}=DIR."
    )
    return SparsetrainError("\n".join(lines))


def _count(n: int) -> str:
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return words[n] if n < len(words) else str(n)


# ---------------------------------------------------------------------------------------------
# Checksums and the cache


def verify(path: Path, expected: str | None, content: bytes | None = None, algorithm: str = "sha256") -> None:
    """Refuse ``path`` unless its ``algorithm`` (``"sha256"`` or ``"md5"``) digest is ``expected``
    (None: nothing to check).

    ``content``: the bytes to hash, when the caller has them (the decompressed content of a gzip
    file); by default the file's bytes, hashed in chunks. Remembered files are not hashed again.
    """
    if expected is None or _is_verified(path, expected, algorithm):
        return
    found = hashlib.new(algorithm, content).hexdigest() if content is not None else _hash_file(path, algorithm)
    if found != expected:
        what = "its decompressed content" if path.suffix == ".gz" and content is not None else "the file"
        raise SparsetrainError(
            f"{path} is corrupt: {algorithm} of {what} is {found}, expected {expected}. {FIX_BAD_FILE}"
        )
    _mark_verified(path, expected, algorithm)


def verify_file(path: Path, file: DataFile) -> None:
    """Refuse ``path`` unless its bytes have every checksum ``file`` gives (sha256, md5); for a
    file that is not gzip (a gzip file's sha256 is of its content: see :func:`verify`)."""
    verify(path, file.sha256)
    verify(path, file.md5, algorithm="md5")


def _hash_file(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise SparsetrainError(f"cannot read {path}: {e}") from e
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _is_verified(path: Path, expected: str, algorithm: str = "sha256") -> bool:
    resolved, size, mtime_ns = _stat_key(path)
    if (resolved, size, mtime_ns, expected) in _VERIFIED_IN_PROCESS:
        return True
    entry = _read_json(path.parent / VERIFIED_FILE).get(path.name)
    return entry == {"size": size, "mtime_ns": mtime_ns, algorithm: expected}


def _mark_verified(path: Path, expected: str, algorithm: str = "sha256") -> None:
    resolved, size, mtime_ns = _stat_key(path)
    _VERIFIED_IN_PROCESS.add((resolved, size, mtime_ns, expected))
    _update_json(path.parent / VERIFIED_FILE, path.name, {"size": size, "mtime_ns": mtime_ns, algorithm: expected})


def _update_json(dest: Path, key: str, value: object) -> None:
    """Set ``key`` in the JSON cache ``dest``; best effort (it is only a cache)."""
    if not _writable(dest.parent):  # a read-only shared copy is simply hashed once per process
        return
    entries = _read_json(dest)
    entries[key] = value
    try:
        _write_json_atomically(dest, entries)
    except OSError:
        pass


def _write_json_atomically(dest: Path, obj: object) -> None:
    # Temp file + os.replace: a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users of the folder
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _writable(folder: Path) -> bool:
    # os.access alone says yes to root; a folder without write bits is meant to stay untouched.
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def _read_json(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: it is only a cache
        return {}
    return entries if isinstance(entries, dict) else {}


# ---------------------------------------------------------------------------------------------
# Downloading


def download_file(name: str, file: DataFile, folder: Path) -> tuple[Path | None, list[str]]:
    """Fetch ``file`` into ``folder`` from the first of ``MIRRORS[name]`` that serves a good copy.

    Returns the path (None if every mirror failed) and one ``"url: error"`` line per failure.
    """
    errors = []
    for mirror in MIRRORS.get(name, []):
        url = f"{mirror.rstrip('/')}/{file.name}"
        try:
            return _fetch(url, folder / file.name, file), errors
        except (OSError, ValueError, EOFError, zlib.error) as e:  # URLError, HTTPError are OSErrors
            errors.append(f"{url}: {e}")
    return None, errors


def _fetch(url: str, dest: Path, file: DataFile) -> Path:
    """Download ``url`` to a temp file beside ``dest``, check it, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out)
        if file.gzip:  # also proves the download is whole gzip data
            found = hashlib.sha256(gzip.decompress(Path(tmp).read_bytes())).hexdigest()
        else:
            found = _hash_file(Path(tmp))
        if file.sha256 is not None and found != file.sha256:
            raise ValueError(f"downloaded file is corrupt: sha256 {found}, expected {file.sha256}")
        if file.md5 is not None and (found_md5 := _hash_file(Path(tmp), "md5")) != file.md5:
            raise ValueError(f"downloaded file is corrupt: md5 {found_md5}, expected {file.md5}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a data cache is meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if file.sha256 is not None:
        _mark_verified(dest, file.sha256)
    if file.md5 is not None:
        _mark_verified(dest, file.md5, "md5")
    return dest


# ---------------------------------------------------------------------------------------------
# Archives


def ensure_extracted(
    name: str,
    archive: DataFile,
    contents: list[str],
    data_dir: str | Path | None = None,
    download: bool = True,
) -> Path:
    """The folder ``<root>/<name>/`` holding ``contents`` (paths relative to it), extracted once
    from ``archive`` (a tar, any compression tarfile reads, or a zip) when any of them is missing.

    The archive is located or downloaded like any file and checked against ``archive.sha256``
    and ``archive.md5`` before anything is unpacked. Extraction goes to a temporary folder beside the data and is moved
    into place member by member, so a failure leaves nothing half-written under the real names;
    members that would land outside the folder (absolute paths, ``..``, links pointing out, device
    files) are refused. Once ``contents`` exist the archive is no longer needed (it is kept).
    """
    root = resolve_data_root(data_dir)
    folder = root / name
    if contents and all((folder / c).exists() for c in contents):
        return folder
    try:
        (path,) = locate_files(name, [archive], data_dir, download)
    except SparsetrainError as e:  # say that an unpacked copy would do as well, and what it lacks
        absent = [c for c in contents if not (folder / c).exists()]
        note = ""
        if contents and (root / Path(contents[0]).parts[0]).exists():  # torchvision's layout: <root>/<folder>
            note = (f"\nNote: {root} holds {Path(contents[0]).parts[0]} itself; sparsetrain looks in {folder}: "
                    f"move it there.")
        raise SparsetrainError(
            f"{e}\nOr unpack {archive.name} yourself: {folder} must then hold {', '.join(contents)} "
            f"(missing: {', '.join(absent)}).{note}"
        ) from e
    verify_file(path, archive)
    _extract(path, folder)
    absent = [c for c in contents if not (folder / c).exists()]
    if absent:
        raise SparsetrainError(
            f"{path} was extracted into {folder} but lacks {', '.join(absent)}: it is not the expected "
            f"archive. {FIX_BAD_FILE}"
        )
    return folder


def _extract(archive: Path, folder: Path) -> None:
    try:
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".extract-"))
    except OSError as e:
        raise SparsetrainError(f"cannot extract {archive}: cannot write into {folder} ({e})") from e
    try:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, tmp)
            else:
                with tarfile.open(archive) as tar:
                    members = tar.getmembers()
                    for member in members:
                        _check_member(member, archive)
                    tar.extractall(tmp, members=members, **_TAR_FILTER)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:  # SparsetrainError passes
            raise bad_file(archive, f"cannot extract ({e})") from e
        for entry in sorted(tmp.iterdir()):
            target = folder / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # an incomplete copy: the archive's is whole and checked
            try:
                os.replace(entry, target)
            except OSError:
                if not target.exists():
                    raise
                # Another process extracting the same checked archive placed it first: the same content.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Python >= 3.11.4 has tarfile's own "data" filter (refuses the same things and strips odd modes);
# _check_member refuses them on any version, so that the error names the archive and the member.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _extract_zip(archive: Path, dest: Path) -> None:
    """Unpack zip ``archive`` into ``dest``, refusing members that would land outside it and
    links (a zip stores a symlink as a member whose Unix mode says so)."""
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        for member in members:
            if not _inside(member.filename):
                raise bad_file(archive, f"member {member.filename!r} would be written outside the data folder; "
                                        "refusing to extract the archive")
            kind = (member.external_attr >> 16) & 0o170000
            if kind not in (0, 0o100000, 0o040000):  # unknown (DOS), regular file, folder
                raise bad_file(archive, f"member {member.filename!r} is a link or special file; "
                                        "refusing to extract the archive")
        z.extractall(dest, members=members)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    def refuse(why: str) -> SparsetrainError:
        return bad_file(archive, f"member {member.name!r} {why}; refusing to extract the archive")

    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise refuse("is a device or other special file")
    if not _inside(member.name):
        raise refuse("would be written outside the data folder")
    if member.issym() and not _inside(str(Path(member.name).parent / member.linkname)):
        raise refuse(f"is a link pointing outside the data folder ({member.linkname})")
    if member.islnk() and not _inside(member.linkname):
        raise refuse(f"is a hard link to a file outside the data folder ({member.linkname})")


def _inside(relative: str) -> bool:
    """Whether ``relative`` stays inside the folder it is relative to (purely lexical)."""
    if relative.startswith(("/", "\\")) or os.path.isabs(relative):
        return False
    depth = 0
    for part in Path(relative).parts:
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            return False
    return True
