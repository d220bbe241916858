"""Downloads: resume, retries, checksums, error messages, Google Drive staging (all against 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from blocklora.data import fetch as dl
from blocklora.data.errors import ChecksumError, DownloadError
from blocklora.data.fetch import download_gdrive, download_url

PAYLOAD = os.urandom(300_000)
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"backoff": 0.0, "timeout": 5.0, "progress": False}


def test_plain_download_is_verified_and_renamed(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, sha256=SHA256, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.bin.part").exists()


def test_download_resumes_with_range_after_cut_connection(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.cut_after["a.bin"] = 100_000
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, retries=2, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert file_server.log[0] == ("a.bin", None)
    _, range_header = file_server.log[1]
    resumed_at = int(range_header.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 100_000, "the second request resumes from the bytes already received"


def test_interrupted_download_keeps_part_file_only_and_resumes_next_run(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.cut_after["a.bin"] = 120_000
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError) as err:
        download_url(file_server.url("a.bin"), dest, md5=MD5, retries=0, dataset="toy", **FAST)
    assert not dest.exists()
    part = tmp_path / "a.bin.part"
    received = part.stat().st_size
    assert 0 < received <= 120_000
    assert "resume" in str(err.value) and str(part) in str(err.value)
    download_url(file_server.url("a.bin"), dest, md5=MD5, retries=0, **FAST)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert file_server.log[-1] == ("a.bin", f"bytes={received}-")


def test_server_ignoring_range_restarts_from_scratch(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.ignore_range.add("a.bin")
    (tmp_path / "a.bin.part").write_bytes(b"garbage that is not the file's start")
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_file_is_verified_and_renamed(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert file_server.log == [("a.bin", f"bytes={len(PAYLOAD)}-")]


def test_part_file_longer_than_the_file_restarts(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD + b"extra")
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, retries=1, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert file_server.log[-1] == ("a.bin", None)


def test_checksum_mismatch_leaves_no_file(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    url = file_server.url("a.bin")
    with pytest.raises(ChecksumError) as err:
        download_url(url, dest, md5="0" * 32, dataset="toy_pets", manual="put a.bin in /archives", **FAST)
    assert not dest.exists() and not (tmp_path / "a.bin.part").exists()
    message = str(err.value)
    for expected in ("toy_pets", url, "0" * 32, MD5, "put a.bin in /archives"):
        assert expected in message


def test_a_sha256_given_is_checked_on_download_and_on_a_file_found_locally(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    with pytest.raises(ChecksumError, match=f"sha256 of .* is {SHA256}, expected {'1' * 64}"):
        download_url(file_server.url("a.bin"), tmp_path / "a.bin", sha256="1" * 64, **FAST)
    assert not (tmp_path / "a.bin").exists()
    (tmp_path / "b.bin").write_bytes(PAYLOAD)
    with pytest.raises(ChecksumError, match="sha256"):
        download_url(file_server.url("a.bin"), tmp_path / "b.bin", sha256="1" * 64, **FAST)
    assert download_url(file_server.url("a.bin"), tmp_path / "b.bin", sha256=SHA256, **FAST).is_file()


def test_404_names_dataset_url_and_manual_fallback(file_server, tmp_path):
    url = file_server.url("missing.tar.gz")
    with pytest.raises(DownloadError) as err:
        download_url(
            url, tmp_path / "m.tar.gz", md5=MD5, dataset="toy_dtd", manual="get it from the authors", **FAST
        )
    message = str(err.value)
    for expected in ("404", "toy_dtd", url, "Manual fallback", "get it from the authors"):
        assert expected in message
    assert len(file_server.log) == 1, "a 404 is not retried"
    assert not (tmp_path / "m.tar.gz").exists()


def test_transient_503_is_retried_until_success(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.fail_times["a.bin"] = 2
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, retries=3, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(file_server.log) == 3


def test_retry_waits_with_exponential_backoff(file_server, tmp_path, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(dl.time, "sleep", sleeps.append)
    file_server.files["a.bin"] = PAYLOAD
    file_server.fail_times["a.bin"] = 3
    download_url(
        file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, retries=3, backoff=0.5, progress=False
    )
    assert sleeps == [0.5, 1.0, 2.0]


def test_exhausted_retries_raise_with_last_error(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.fail_times["a.bin"] = 10
    url = file_server.url("a.bin")
    with pytest.raises(DownloadError) as err:
        download_url(url, tmp_path / "a.bin", md5=MD5, retries=2, dataset="toy", **FAST)
    message = str(err.value)
    assert "3 attempts" in message and "503" in message and url in message and "Manual fallback" in message
    assert not (tmp_path / "a.bin").exists()


def test_timeout_raises_with_dataset_url_and_fallback(file_server, tmp_path):
    file_server.files["slow.bin"] = PAYLOAD
    file_server.delay["slow.bin"] = 1.0
    url = file_server.url("slow.bin")
    with pytest.raises(DownloadError) as err:
        download_url(
            url,
            tmp_path / "slow.bin",
            md5=MD5,
            retries=1,
            backoff=0.0,
            timeout=0.2,
            dataset="toy",
            progress=False,
        )
    message = str(err.value)
    assert (
        "timed out" in message.lower()
        and url in message
        and "toy" in message
        and "Manual fallback" in message
    )


def test_existing_file_with_wrong_checksum_is_reported_not_replaced(file_server, tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError, match="delete it"):
        download_url(file_server.url("a.bin"), dest, md5=MD5, **FAST)
    assert dest.read_bytes() == b"old"
    assert file_server.log == []


def _fake_gdown(content: bytes | None = None, error: Exception | None = None):
    calls: list[dict] = []

    def fake(*, id: str, output: str, **kwargs: object) -> str:
        calls.append({"id": id, "output": output, **kwargs})
        if error is not None:
            raise error
        Path(output).write_bytes(content or b"")
        return output

    return fake, calls


def test_gdrive_download_is_staged_verified_and_renamed(tmp_path, monkeypatch):
    import gdown

    fake, calls = _fake_gdown(PAYLOAD)
    monkeypatch.setattr(gdown, "download", fake)
    dest = download_gdrive("FILEID", tmp_path / "split.json", md5=MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert calls[0]["id"] == "FILEID" and calls[0]["output"] != str(dest) and calls[0]["resume"] is True


def test_gdrive_checksum_mismatch_leaves_no_file(tmp_path, monkeypatch):
    import gdown

    fake, _ = _fake_gdown(b"an HTML quota page")
    monkeypatch.setattr(gdown, "download", fake)
    with pytest.raises(ChecksumError, match=r"drive\.google\.com/uc\?id=FILEID"):
        download_gdrive("FILEID", tmp_path / "x.zip", md5=MD5, dataset="toy", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["x.zip.lock"]  # no partial or corrupt file


def test_gdrive_refusal_names_manual_fallback(tmp_path, monkeypatch):
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    fake, _ = _fake_gdown(error=FileURLRetrievalError("Too many users have viewed or downloaded this file"))
    monkeypatch.setattr(gdown, "download", fake)
    with pytest.raises(DownloadError) as err:
        download_gdrive(
            "FILEID", tmp_path / "x.zip", md5=MD5, dataset="ucf101", manual="place x.zip in archives/"
        )
    message = str(err.value)
    assert "ucf101" in message and "FILEID" in message and "place x.zip in archives/" in message
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(file_server, tmp_path, status):
    file_server.files["a.bin"] = PAYLOAD
    file_server.fail_times["a.bin"], file_server.fail_status = 1, status
    assert download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, **FAST).read_bytes() == PAYLOAD
    assert len(file_server.log) == 2


@pytest.mark.parametrize("status", [400, 403, 407, 409, 424, 426, 428, 430, 499, 501, 505])
def test_other_error_statuses_fail_at_once_naming_the_status(file_server, tmp_path, status):
    file_server.files["a.bin"] = PAYLOAD
    file_server.fail_times["a.bin"], file_server.fail_status = 1, status
    with pytest.raises(DownloadError, match=f"HTTP {status}"):
        download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, **FAST)
    assert len(file_server.log) == 1


def test_a_resume_whose_total_is_unknown_completes(file_server, tmp_path):
    """Content-Range "bytes a-b/*": the total is what was kept plus what is announced."""
    file_server.files["a.bin"] = PAYLOAD
    file_server.cut_after["a.bin"] = 100_000
    file_server.unknown_total.add("a.bin")
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, **FAST)
    assert dest.read_bytes() == PAYLOAD
    first, second = (r for _, r in file_server.log)
    assert first is None and second.startswith("bytes=")  # resumed, not restarted


def test_a_body_without_content_length_is_read_to_the_end(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.no_length.add("a.bin")
    assert download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, **FAST).read_bytes() == PAYLOAD


def test_a_download_makes_its_folders(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    dest = download_url(file_server.url("a.bin"), tmp_path / "x" / "y" / "a.bin", md5=MD5, **FAST)
    assert dest.read_bytes() == PAYLOAD and sorted(p.name for p in dest.parent.iterdir()) == [
        "a.bin",
        "a.bin.lock",
    ]


def test_progress_false_prints_no_bar_and_true_does(file_server, tmp_path, capsys):
    file_server.files["a.bin"] = PAYLOAD
    download_url(file_server.url("a.bin"), tmp_path / "quiet.bin", md5=MD5, **FAST)
    assert capsys.readouterr().err == ""
    download_url(file_server.url("a.bin"), tmp_path / "shown.bin", md5=MD5, **{**FAST, "progress": True})
    assert "shown.bin" in capsys.readouterr().err


def test_gdrive_is_quiet_when_progress_is_off_and_makes_its_folders(tmp_path, monkeypatch):
    import gdown

    fake, calls = _fake_gdown(PAYLOAD)
    monkeypatch.setattr(gdown, "download", fake)
    download_gdrive("FILEID", tmp_path / "a" / "b" / "split.json", md5=MD5, progress=False)
    download_gdrive("FILEID", tmp_path / "c" / "split.json", md5=MD5, progress=True)
    assert [c["quiet"] for c in calls] == [True, False]


def test_a_redirect_is_followed(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.redirects["latest.bin"] = "a.bin"
    assert (
        download_url(file_server.url("latest.bin"), tmp_path / "a.bin", md5=MD5, **FAST).read_bytes()
        == PAYLOAD
    )


def test_an_answer_for_another_byte_range_restarts_the_download(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.cut_after["a.bin"] = 100_000
    file_server.shift_range["a.bin"] = 200_000  # the resume is answered from further on than the file ends
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [r is None for _, r in file_server.log] == [True, False, True]  # cut, wrong range, whole again


def test_gdrive_saying_done_without_a_file_is_a_named_failure(tmp_path, monkeypatch):
    import gdown

    monkeypatch.setattr(gdown, "download", lambda *, output, **kwargs: output)  # writes nothing
    with pytest.raises(DownloadError, match="Google Drive returned nothing"):
        download_gdrive("FILEID", tmp_path / "x.zip", md5=MD5, dataset="toy", progress=False)


# ---------------------------------------------------------------------------------------------
# Every file verified; resumes that cannot splice two versions; one writer per file.


def _unchecked_source_spec(url: str):
    """A dataset whose one file has no published checksum (as FGVC-Aircraft, UCF101's frames, ...)."""
    import dataclasses

    from blocklora.data.registry import Source, get_dataset

    source = Source(filename="a.bin", url=url, kind="file")
    return dataclasses.replace(get_dataset("dtd"), name="toy_unpublished", sources=(source,)), source


def test_a_file_without_a_published_checksum_is_pinned_on_first_use(file_server, tmp_path, monkeypatch):
    """The first copy's sha256 goes into the lock file; a later copy that differs is refused."""
    from blocklora.data.fetch import fetch_source

    lock = tmp_path / "checksums.json"
    monkeypatch.setenv("BLOCKLORA_CHECKSUMS", str(lock))
    file_server.files["a.bin"] = PAYLOAD
    spec, source = _unchecked_source_spec(file_server.url("a.bin"))
    first = fetch_source(
        spec, source, [tmp_path / "first"], tmp_path / "first", download=True, progress=False
    )
    assert first.read_bytes() == PAYLOAD
    recorded = json.loads(lock.read_text())["files"][file_server.url("a.bin")]
    assert recorded == {"filename": "a.bin", "sha256": SHA256}
    file_server.files["a.bin"] = b"another build of the file, or an attacker's"
    with pytest.raises(
        ChecksumError, match=rf"expected {SHA256} \(recorded on first use in .*checksums\.json\)"
    ):
        fetch_source(spec, source, [tmp_path / "second"], tmp_path / "second", download=True, progress=False)
    assert not (tmp_path / "second" / "a.bin").exists()
    (tmp_path / "third").mkdir()
    (tmp_path / "third" / "a.bin").write_bytes(b"a copy placed by hand that is not it")
    with pytest.raises(ChecksumError, match=f"expected {SHA256}"):
        fetch_source(spec, source, [tmp_path / "third"], tmp_path / "third", download=False)


def test_a_resume_after_the_file_changed_on_the_server_restarts_instead_of_splicing(file_server, tmp_path):
    """If-Range: the server sends the whole new file rather than the tail of the new one after the
    head of the old one."""
    newer = os.urandom(len(PAYLOAD))
    file_server.files["a.bin"] = PAYLOAD
    file_server.cut_after["a.bin"] = 100_000
    with pytest.raises(DownloadError):
        download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, retries=0, **FAST)
    file_server.files["a.bin"] = newer  # a new release replaces the file at the same URL
    sha = hashlib.sha256(newer).hexdigest()
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", sha256=sha, retries=0, **FAST)
    assert dest.read_bytes() == newer
    assert file_server.if_range[-1] is not None and file_server.log[-1][1].startswith("bytes=")


def test_two_pipelines_sharing_an_archives_folder_download_a_file_once(file_server, tmp_path):
    """Two jobs ask for the same file at once: one downloads it, the other waits and finds it."""
    import threading

    file_server.files["a.bin"] = PAYLOAD
    file_server.delay["a.bin"] = 0.3
    results, errors = [], []

    def job():
        try:
            results.append(download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, **FAST))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    jobs = [threading.Thread(target=job) for _ in range(2)]
    for thread in jobs:
        thread.start()
    for thread in jobs:
        thread.join()
    assert errors == [] and len(results) == 2
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert file_server.log == [("a.bin", None)]  # one request, one writer of a.bin.part


def test_a_finished_download_is_verified_by_the_hashes_taken_while_writing_it(
    file_server, tmp_path, monkeypatch
):
    """The part file is never read back to be hashed (a copy swapped in between cannot pass)."""
    file_server.files["a.bin"] = PAYLOAD
    monkeypatch.setattr(dl.pooch, "file_hash", lambda *a, **k: pytest.fail("the download was read back"))
    dest = download_url(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, sha256=SHA256, **FAST)
    assert dest.read_bytes() == PAYLOAD
    file_server.cut_after["b.bin"], file_server.files["b.bin"] = 100_000, PAYLOAD  # resumed: hashed as well
    dest = download_url(file_server.url("b.bin"), tmp_path / "b.bin", sha256=SHA256, retries=1, **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_a_download_without_any_checksum_is_refused(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    with pytest.raises(ValueError, match="without a checksum"):
        download_url(file_server.url("a.bin"), tmp_path / "a.bin", **FAST)
    assert file_server.log == []
