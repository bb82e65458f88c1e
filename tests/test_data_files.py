"""Tests for sparsetrain.data.files: any data set's files, downloads, checksums, the cache, archives.

Files and archives are generated here; mirrors are ``file://`` folders in tmp_path, so nothing
reaches the network.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from sparsetrain.data import MIRRORS, DataFile, ensure_extracted, locate_files
from sparsetrain.data import files as files_module
from sparsetrain.errors import SparsetrainError

NAME = "tiny-archive"  # a data set name no library module uses
CONTENTS = {"batches/data_1": b"first batch " * 50, "batches/data_2": b"second batch " * 40, "batches/meta": b"m"}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(files_module, "_VERIFIED_IN_PROCESS", set())
    monkeypatch.setitem(MIRRORS, NAME, [(tmp_path / "no-such-mirror").as_uri()])
    monkeypatch.delenv("SPARSETRAIN_DATA", raising=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tar(path: Path, members: dict[str, bytes], links: dict[str, tuple[str, bytes]] | None = None) -> str:
    """Write a .tar.gz of ``members`` (name -> bytes) and special ``links`` (name -> (kind, target));
    return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = target.decode()
            tar.addfile(info)
    return sha256(path.read_bytes())


@pytest.fixture
def archive_mirror(tmp_path, monkeypatch):
    """A file:// mirror serving tiny.tar.gz; returns (its DataFile, the mirror folder)."""
    folder = tmp_path / "mirror"
    digest = make_tar(folder / "tiny.tar.gz", CONTENTS)
    monkeypatch.setitem(MIRRORS, NAME, [(tmp_path / "dead").as_uri(), folder.as_uri()])
    return DataFile("tiny.tar.gz", digest), folder


# ---------------------------------------------------------------------------------------------
# Plain files


def test_plain_file_download_checks_raw_bytes_and_caches(tmp_path, monkeypatch):
    payload = b"0123456789" * 100
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "table.bin").write_bytes(payload)
    monkeypatch.setitem(MIRRORS, NAME, [mirror.as_uri()])
    (tmp_path / "root").mkdir()  # a data root the caller names must exist
    (path,) = locate_files(NAME, [DataFile("table.bin", sha256(payload))], tmp_path / "root")
    assert path == tmp_path / "root" / NAME / "table.bin" and path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == [".verified.json", "table.bin"]  # no .part left


def test_corrupt_plain_download_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "table.bin").write_bytes(b"wrong")
    monkeypatch.setitem(MIRRORS, NAME, [mirror.as_uri()])
    (tmp_path / "root").mkdir()
    with pytest.raises(SparsetrainError, match="corrupt") as info:
        locate_files(NAME, [DataFile("table.bin", "0" * 64)], tmp_path / "root")
    assert mirror.as_uri() in str(info.value) and "table.bin" in str(info.value)
    assert list((tmp_path / "root" / NAME).iterdir()) == []


def test_verify_plain_file_is_cached(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    files_module.verify(path, sha256(b"abc"))
    monkeypatch.setattr(files_module, "_VERIFIED_IN_PROCESS", set())  # as in a new process
    real_hash_file = files_module._hash_file
    monkeypatch.setattr(files_module, "_hash_file", lambda p: pytest.fail("hashed a verified file"))
    files_module.verify(path, sha256(b"abc"))  # the .verified.json entry is trusted
    monkeypatch.setattr(files_module, "_hash_file", real_hash_file)
    with pytest.raises(SparsetrainError, match=f"{path} is corrupt"):
        files_module.verify(path, "1" * 64)


def test_gzip_file_needs_gz_name():
    with pytest.raises(ValueError, match=".gz"):
        DataFile("labels", None, gzip=True)


# ---------------------------------------------------------------------------------------------
# Archives


def test_archive_is_downloaded_checked_and_extracted_once(tmp_path, archive_mirror, monkeypatch):
    archive, _ = archive_mirror
    root = tmp_path / "root"
    root.mkdir()
    folder = ensure_extracted(NAME, archive, list(CONTENTS), root)
    assert folder == root / NAME
    for name, data in CONTENTS.items():
        assert (folder / name).read_bytes() == data
    assert not [p for p in folder.iterdir() if p.name.startswith(".extract-") or p.name.endswith(".part")]

    # Extracted once: the contents suffice, the archive is neither needed nor read again.
    (folder / "tiny.tar.gz").unlink()
    monkeypatch.setitem(MIRRORS, NAME, [])
    monkeypatch.setattr(files_module, "_extract", lambda *a: pytest.fail("extracted twice"))
    assert ensure_extracted(NAME, archive, list(CONTENTS), root, download=False) == folder


def test_archive_on_disk_is_used_without_download(tmp_path):
    root = tmp_path / "root"
    digest = make_tar(root / NAME / "tiny.tar.gz", CONTENTS)
    folder = ensure_extracted(NAME, DataFile("tiny.tar.gz", digest), list(CONTENTS), root, download=False)
    assert (folder / "batches" / "meta").read_bytes() == b"m"


def test_archive_with_wrong_checksum_is_not_extracted(tmp_path):
    root = tmp_path / "root"
    make_tar(root / NAME / "tiny.tar.gz", CONTENTS)
    with pytest.raises(SparsetrainError, match="corrupt") as info:
        ensure_extracted(NAME, DataFile("tiny.tar.gz", "0" * 64), list(CONTENTS), root, download=False)
    assert "tiny.tar.gz" in str(info.value) and "Delete it" in str(info.value)
    assert not (root / NAME / "batches").exists()


def test_archive_missing_error_names_folder_file_and_fix(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(SparsetrainError) as info:
        ensure_extracted(NAME, DataFile("tiny.tar.gz", None), list(CONTENTS), root, download=False)
    message = str(info.value)
    assert str(root / NAME) in message and "tiny.tar.gz" in message
    assert "--data-dir" in message and "SPARSETRAIN_DATA" in message and "download=False" in message


def test_archive_without_the_expected_contents(tmp_path):
    root = tmp_path / "root"
    digest = make_tar(root / NAME / "tiny.tar.gz", {"other/file": b"x"})
    with pytest.raises(SparsetrainError, match="lacks batches/data_1"):
        ensure_extracted(NAME, DataFile("tiny.tar.gz", digest), list(CONTENTS), root, download=False)


def test_damaged_archive(tmp_path):
    root = tmp_path / "root"
    (root / NAME).mkdir(parents=True)
    (root / NAME / "tiny.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(SparsetrainError, match="cannot extract") as info:
        ensure_extracted(NAME, DataFile("tiny.tar.gz", None), list(CONTENTS), root, download=False)
    assert "tiny.tar.gz" in str(info.value)


@pytest.mark.parametrize(
    "members, links, match",
    [
        ({"../escaped": b"x"}, None, "outside the data folder"),
        ({"batches/../../escaped": b"x"}, None, "outside the data folder"),
        ({"/tmp/absolute-escaped": b"x"}, None, "outside the data folder"),
        ({}, {"batches/link": ("sym", b"../../escaped")}, "link pointing outside"),
        ({}, {"batches/link": ("sym", b"/etc/passwd")}, "link pointing outside"),
        ({}, {"batches/hard": ("hard", b"../escaped")}, "hard link"),
        ({}, {"batches/pipe": ("fifo", b"")}, "special file"),
    ],
)
def test_unsafe_archive_members_are_refused(tmp_path, members, links, match):
    root = tmp_path / "sandbox" / "root"
    digest = make_tar(root / NAME / "evil.tar.gz", {**CONTENTS, **members}, links)
    with pytest.raises(SparsetrainError, match=match) as info:
        ensure_extracted(NAME, DataFile("evil.tar.gz", digest), list(CONTENTS), root, download=False)
    assert "evil.tar.gz" in str(info.value)
    # Nothing was written: neither outside the folder nor the archive's good members inside it.
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["root"]
    assert sorted(p.name for p in (root / NAME).iterdir() if not p.name.startswith(".")) == ["evil.tar.gz"]
    assert not (root / NAME / "batches").exists()


def test_safe_relative_links_inside_the_folder_are_kept(tmp_path):
    root = tmp_path / "root"
    digest = make_tar(root / NAME / "tiny.tar.gz", CONTENTS, {"batches/alias": ("sym", b"data_1")})
    folder = ensure_extracted(NAME, DataFile("tiny.tar.gz", digest), [*CONTENTS, "batches/alias"], root)
    assert (folder / "batches" / "alias").read_bytes() == CONTENTS["batches/data_1"]


def test_read_only_shared_copy_is_hashed_once_per_process(tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "f.bin"
    path.write_bytes(b"abc")
    os.chmod(folder, 0o555)
    try:
        files_module.verify(path, sha256(b"abc"))
        assert not (folder / ".verified.json").exists()
        monkeypatch.setattr(files_module, "_hash_file", lambda p: pytest.fail("hashed twice in one process"))
        files_module.verify(path, sha256(b"abc"))
    finally:
        os.chmod(folder, 0o755)
