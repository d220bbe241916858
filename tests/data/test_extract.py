"""Safe extraction: tar (every compression) and zip, refusing members that would escape the target."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

import pytest

from blocklora.data.errors import ExtractionError
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


def test_tar_symlink_inside_target_is_allowed(tmp_path):
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        data = tarfile.TarInfo("top/real.txt")
        data.size = 2
        tar.addfile(data, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("top/alias.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "real.txt"
        tar.addfile(link)
    safe_extract(tmp_path / "x.tar", tmp_path / "out")
    assert (tmp_path / "out/top/alias.txt").read_text() == "hi"


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
