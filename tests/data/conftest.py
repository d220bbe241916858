"""Fixtures for the data-layer tests: a loopback HTTP server with misbehaviours on demand, fixture archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# Seven of CoOp's split files, as published (gzip): the sampler and the class names are checked on them.
REFERENCE_SPLITS = Path(__file__).resolve().parent / "splits"
# sha256 of each decompressed file: the copies are the published files, byte for byte.
REFERENCE_SHA256 = {
    "split_zhou_Caltech101.json": "52ce83205ff8ff8a1a18119aad6376120ae35c36e783a984bc560cbf10e73fa5",
    "split_zhou_DescribableTextures.json": "f26ebeccd2b58e68d70f07a0dc39fe49bf7b69024bac34396b954dfd87969c38",
    "split_zhou_EuroSAT.json": "541503a77d0b26b735d85ec7a3e672804fe0aa466c2e5f07da772cc6c0af8ad2",
    "split_zhou_OxfordFlowers.json": "2f50c42fc1a17ca13c271cb4269b1347bdb43d2be672e34f74a4e4cbfbcca794",
    "split_zhou_OxfordPets.json": "d7f3ffe65b3919f95132e51422894ae18686b83c331fd8c0adcdc3dc2de6301e",
    "split_zhou_StanfordCars.json": "40acee7aa65c8e4727a32d90e884b7c3f8960b523422317e163f7af65432959d",
    "split_zhou_UCF101.json": "d78cb834f7c5792ceaff2c5ee2d7c76a9e4086e48a3a6b01232989d29cbefdd8",
}


@dataclass
class FileServer:
    """Files served at /<name>, with per-file misbehaviours, and a log of (path, Range header)."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # first GET sends only n bytes, then closes
    fail_times: dict[str, int] = field(default_factory=dict)  # answer fail_status this many times first
    fail_status: int = 503
    unknown_total: set[str] = field(default_factory=set)  # Content-Range "bytes a-b/*"
    no_length: set[str] = field(default_factory=set)  # no Content-Length: ends with the connection
    redirects: dict[str, str] = field(default_factory=dict)  # name -> the name it redirects to (302)
    shift_range: dict[str, int] = field(default_factory=dict)  # first Range: 206 from this offset instead
    delay: dict[str, float] = field(default_factory=dict)  # sleep before answering (every GET)
    ignore_range: set[str] = field(default_factory=set)  # answer 200 with the whole file to Range requests
    no_etag: set[str] = field(default_factory=set)  # send no ETag (If-Range then cannot be used)
    log: list[tuple[str, str | None]] = field(default_factory=list)
    if_range: list[str | None] = field(default_factory=list)  # the If-Range header of each GET
    base_url: str = ""

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            range_header = self.headers.get("Range")
            state.log.append((name, range_header))
            state.if_range.append(self.headers.get("If-Range"))
            if state.delay.get(name):
                time.sleep(state.delay[name])
            if state.fail_times.get(name, 0) > 0:
                state.fail_times[name] -= 1
                self.send_response(state.fail_status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if name in state.redirects:
                self.send_response(302)
                self.send_header("Location", f"/{state.redirects[name]}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if name not in state.files:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = state.files[name]
            etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
            changed = self.headers.get("If-Range") not in (None, etag)  # RFC 9110: then the whole file
            start = 0
            if range_header and name not in state.ignore_range and not changed:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                start = state.shift_range.pop(name, start)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                total = "*" if name in state.unknown_total else len(data)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{total}")
            else:
                self.send_response(200)
            body = data[start:]
            if name in state.no_length:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if name not in state.no_etag:
                self.send_header("ETag", etag)
            self.end_headers()
            cut = state.cut_after.pop(name, None)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def file_server():
    state = FileServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to download."""
    import gdown
    import requests

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(requests.Session, "get", refuse)
    monkeypatch.setattr(gdown, "download", refuse)


def make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    """A tar archive holding ``members`` (name -> content)."""
    with tarfile.open(path, mode) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return path


def reference_split(name: str, folder: Path) -> Path:
    """A reference split_zhou file, decompressed into ``folder`` (a missing one fails the test)."""
    path = folder / name
    if not path.is_file():
        path.write_bytes(gzip.decompress((REFERENCE_SPLITS / f"{name}.gz").read_bytes()))
    return path


@pytest.fixture(name="make_tar")
def make_tar_fixture():
    return make_tar


@pytest.fixture(name="make_zip")
def make_zip_fixture():
    return make_zip


@pytest.fixture(name="reference_split", scope="session")
def reference_split_fixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference_splits")
    return lambda name: reference_split(name, folder)
