"""Safe extraction: tar (every compression) and zip, refusing members that would escape the target."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from blocklora.data.errors import ChecksumError, ExtractionError
from blocklora.data.extract import safe_extract

MEMBERS = {"top/a/1.jpg": b"one", "top/b/2.jpg": b"two"}


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_of_any_compression_extracts(tmp_path, make_tar, mode):
    archive = make_tar(tmp_path / "x.tar", MEMBERS, mode)
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out/top/a/1.jpg").read_bytes() == b"one"
    assert (tmp_path / "out/top/b/2.jpg").read_bytes() == b"two"


def test_zip_extracts(tmp_path, make_zip):
    safe_extract(make_zip(tmp_path / "x.zip", MEMBERS), tmp_path / "out")
    assert (tmp_path / "out/top/b/2.jpg").read_bytes() == b"two"


@pytest.mark.parametrize("name", ["../evil.txt", "top/../../evil.txt", "/tmp/evil_abs.txt"])
def test_tar_member_outside_target_is_refused(tmp_path, make_tar, name):
    archive = make_tar(tmp_path / "x.tar.gz", {"ok.txt": b"ok", name: b"evil"})
    with pytest.raises(ExtractionError, match="refusing to extract") as err:
        safe_extract(archive, tmp_path / "out")
    assert repr(name) in str(err.value)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "out/ok.txt").exists(), "nothing is extracted from a rejected archive"


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/evil_abs.txt"])
def test_zip_member_outside_target_is_refused(tmp_path, make_zip, name):
    archive = make_zip(tmp_path / "x.zip", {"ok.txt": b"ok", name: b"evil"})
    with pytest.raises(ExtractionError, match="refusing to extract"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def _tar_with_link(path, linkname, *, hard=False):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("top/link")
        info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
        info.linkname = linkname
        tar.addfile(info)
        data = tarfile.TarInfo("top/link/passwd")
        data.size = 4
        tar.addfile(data, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize("linkname", ["/etc", "../..", "../../outside"])
def test_tar_symlink_pointing_out_is_refused(tmp_path, linkname):
    archive = _tar_with_link(tmp_path / "x.tar", linkname)
    with pytest.raises(ExtractionError, match="symlink"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out/top/link").exists()


def test_tar_hard_link_pointing_out_is_refused(tmp_path):
    archive = _tar_with_link(tmp_path / "x.tar", "../outside", hard=True)
    with pytest.raises(ExtractionError, match="hard link"):
        safe_extract(archive, tmp_path / "out")


def test_zip_symlink_pointing_out_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        info = zipfile.ZipInfo("top/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../etc")
    with pytest.raises(ExtractionError, match="symlink"):
        safe_extract(tmp_path / "x.zip", tmp_path / "out")


def test_truncated_archive_is_an_extraction_error(tmp_path, make_tar):
    archive = make_tar(tmp_path / "x.tar.gz", {"a.bin": bytes(range(256)) * 400})
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExtractionError, match=r"x\.tar\.gz"):
        safe_extract(archive, tmp_path / "out")


def test_not_an_archive_is_an_extraction_error(tmp_path):
    (tmp_path / "x.tar.gz").write_text("<html>quota exceeded</html>")
    with pytest.raises(ExtractionError, match="neither a tar nor a zip"):
        safe_extract(tmp_path / "x.tar.gz", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Hostile archives: each one escaped on the Python this project runs (3.11.7) before extraction
# refused links itself.


def landed(folder: Path) -> list[str]:
    """What is in ``folder`` but the lock that serializes extractions into it."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".extracting.lock")


def _add(
    tar: tarfile.TarFile, name: str, *, data: bytes | None = None, symlink=None, hardlink=None, folder=False
):
    info = tarfile.TarInfo(name)
    if folder:
        info.type, info.mode = tarfile.DIRTYPE, 0o777
    elif symlink is not None:
        info.type, info.linkname = tarfile.SYMTYPE, symlink
    elif hardlink is not None:
        info.type, info.linkname = tarfile.LNKTYPE, hardlink
    else:
        info.size = len(data or b"")
    tar.addfile(info, io.BytesIO(data or b"") if info.isreg() else None)


def _realpath_limit_archive(path, dest: Path):
    """CPython's test archive for CVE-2025-4517: symlinks whose expansion overflows PATH_MAX, so that
    ``os.path.realpath`` stops resolving them and the "data" filter lets a hard link reach outside."""
    steps = "abcdefghijklmnop"
    max_path = os.pathconf(dest.parent, "PC_PATH_MAX")
    component = "d" * ((max_path - len(str(dest)) - 1) // (len(steps) + 1))
    with tarfile.open(path, "w") as tar:
        prefix = ""
        for step in steps:
            _add(tar, os.path.join(prefix, component), folder=True)
            _add(tar, os.path.join(prefix, step), symlink=component)
            prefix = os.path.join(prefix, component)
        link = os.path.join(*steps, "l" * 254)
        _add(tar, link, symlink=os.path.join(*[".."] * len(steps)))
        _add(tar, "escape", symlink=os.path.join(link, ".."))
        _add(tar, "flaglink", hardlink=os.path.join("escape", "flag"))
        _add(tar, "flaglink", data=b"overwrite")
        _add(tar, "escape/newfile", data=b"new")
    return path


def test_cpythons_cve_2025_4517_archive_writes_nothing_outside(tmp_path):
    dest = tmp_path / "out"
    flag = tmp_path / "flag"
    flag.write_text("precious")
    archive = _realpath_limit_archive(tmp_path / "cve.tar", dest)
    with pytest.raises(ExtractionError, match=r"refusing to extract .*cve\.tar: member '[a-p]' is a symlink"):
        safe_extract(archive, dest)
    assert flag.read_text() == "precious"
    assert not (tmp_path / "newfile").exists()
    assert not dest.exists() or landed(dest) == [], "nothing is extracted from a refused archive"


def test_a_chain_of_directory_symlinks_cannot_lead_a_file_out(tmp_path, monkeypatch):
    """``sub/up -> ..`` then ``sub/up2 -> up/..``: each link alone stays inside, the chain does not.
    Extraction must not lean on tarfile's filters: they are missing before Python 3.11.4 (as here)."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tmp_path / "chain.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "sub", folder=True)
        _add(tar, "sub/up", symlink="..")
        _add(tar, "sub/up2", symlink="up/..")
        _add(tar, "sub/up2/escaped.txt", data=b"evil")
    with pytest.raises(ExtractionError, match="'sub/up' is a symlink"):
        safe_extract(archive, tmp_path / "out" / "dataset")
    assert not (tmp_path / "out" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("symlink", "is a symlink"),
        ("hardlink", "is a hard link"),
        ("fifo", "is a FIFO"),
        ("device", "is a device"),
    ],
)
def test_every_link_device_or_fifo_member_is_refused_even_one_pointing_inside(tmp_path, kind, message):
    archive = tmp_path / "x.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "top/real.txt", data=b"hi")
        info = tarfile.TarInfo("top/other")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "real.txt"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "top/real.txt"
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(info)
    with pytest.raises(ExtractionError, match=f"member 'top/other' {message}.*no dataset needs one"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "top").exists()


def test_a_symlink_already_in_the_target_folder_is_not_followed(tmp_path, make_tar):
    """A results folder is shared: a link planted where an archive's folder will go is refused."""
    outside = tmp_path / "victim"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "top").symlink_to(outside)
    archive = make_tar(tmp_path / "x.tar.gz", MEMBERS)
    with pytest.raises(ExtractionError, match=r"out/top: it is a symlink"):
        safe_extract(archive, dest)
    assert list(outside.iterdir()) == []


def test_what_an_archive_may_expand_to_is_capped(tmp_path):
    """A bomb: 64 MiB of zeros gzip to 64 KiB; the cap stops it before it fills the disk."""
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(ExtractionError, match=r"expands to more than 16\.0 MiB.*max_bytes"):
        safe_extract(archive, tmp_path / "out", max_bytes=16 << 20)
    assert not (tmp_path / "out" / "zeros.bin").exists()
    assert landed(tmp_path / "out") == []  # no staging folder left behind either


def test_the_archive_is_verified_by_the_very_bytes_that_are_extracted(tmp_path, make_tar):
    """The checksum is taken while extracting: an archive swapped after a check cannot slip in."""
    import hashlib

    archive = make_tar(tmp_path / "x.tar.gz", MEMBERS)
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    make_tar(archive, {**MEMBERS, "top/a/1.jpg": b"swapped"})  # replaced after it was downloaded
    with pytest.raises(ChecksumError, match=rf"sha256 of .*x\.tar\.gz is [0-9a-f]{{64}}, expected {good}"):
        safe_extract(archive, tmp_path / "out", sha256=good)
    assert landed(tmp_path / "out") == []
    make_tar(archive, MEMBERS)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    safe_extract(archive, tmp_path / "out", sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.jpg")) == sorted(
        names
    )


def test_a_second_archive_merges_into_folders_the_first_made(tmp_path, make_tar, make_zip):
    safe_extract(make_tar(tmp_path / "a.tar", {"top/a/1.jpg": b"one"}, "w"), tmp_path / "out")
    safe_extract(
        make_zip(tmp_path / "b.zip", {"top/b/2.jpg": b"two", "top/a/1.jpg": b"new"}), tmp_path / "out"
    )
    assert (tmp_path / "out/top/a/1.jpg").read_bytes() == b"new"
    assert (tmp_path / "out/top/b/2.jpg").read_bytes() == b"two"


def test_a_staging_folder_left_by_a_killed_extraction_is_removed_by_the_next(tmp_path, make_tar):
    stale = tmp_path / "out" / ".extracting-k1lled"
    stale.mkdir(parents=True)
    (stale / "half.jpg").write_bytes(b"x" * 1000)
    safe_extract(make_tar(tmp_path / "x.tar", MEMBERS, "w"), tmp_path / "out")
    assert not stale.exists()
    assert (tmp_path / "out/top/a/1.jpg").read_bytes() == b"one"
