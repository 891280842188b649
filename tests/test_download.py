"""Tests for gpt2_instruct.download against local files and HTTP servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2_instruct import download
from gpt2_instruct.download import DownloadError, fetch, is_remote, local_path

BODY = b'[{"instruction": "Say hi", "input": "", "output": "hi"}]\n' * 50
BODY_SHA = hashlib.sha256(BODY).hexdigest()

# A behaviour takes the handler and writes one complete (or deliberately broken) response.
Behaviour = Callable[[BaseHTTPRequestHandler], None]


def ok(body: bytes = BODY) -> Behaviour:
    """A normal 200 response with a correct Content-Length."""

    def run(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return run


def status(code: int) -> Behaviour:
    """An error status with a short body."""

    def run(h: BaseHTTPRequestHandler) -> None:
        payload = f"status {code}".encode()
        h.send_response(code)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    return run


def truncated(reset: bool) -> Behaviour:
    """Promise the whole body, send half, then close (cleanly, or with a TCP reset)."""

    def run(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(BODY)))
        h.end_headers()
        h.wfile.write(BODY[: len(BODY) // 2])
        h.wfile.flush()
        if reset:
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
        h.close_connection = True

    return run


def slow(headers_first: bool, delay: float = 0.8) -> Behaviour:
    """Stall for ``delay`` seconds, before the headers or in the middle of the body."""

    def run(h: BaseHTTPRequestHandler) -> None:
        if headers_first:
            h.send_response(200)
            h.send_header("Content-Length", str(len(BODY)))
            h.end_headers()
            h.wfile.write(BODY[:10])
            h.wfile.flush()
        time.sleep(delay)
        # The client has usually given up by now: ignore the broken pipe.
        with contextlib.suppress(OSError):
            if not headers_first:
                h.send_response(200)
                h.send_header("Content-Length", str(len(BODY)))
                h.end_headers()
            h.wfile.write(BODY)

    return run


class Server:
    """A scripted HTTP server: each GET to a path consumes the next behaviour for it."""

    def __init__(self) -> None:
        self.script: dict[str, list[Behaviour]] = {}
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                    queue = server.script.get(self.path, [])
                    behaviour = queue.pop(0) if len(queue) > 1 else (queue or [status(404)])[0]
                behaviour(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class QuietServer(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def route(self, path: str, *behaviours: Behaviour) -> str:
        """Script ``path`` (the last behaviour repeats) and return its URL."""
        self.script[path] = list(behaviours)
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def leftovers(directory: Path) -> list[str]:
    """Names in ``directory`` (temp files from atomic_path start with a dot)."""
    return sorted(p.name for p in directory.iterdir())


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- helpers -------------------------------------------------------------------------------


def test_is_remote_and_local_path(tmp_path: Path) -> None:
    assert is_remote("https://example.org/x.json")
    assert is_remote("HTTP://example.org/x.json")
    assert not is_remote("data/x.json")
    assert not is_remote((tmp_path / "x.json").as_uri())
    assert local_path("https://example.org/x.json") is None
    assert local_path("data/x.json") == Path("data/x.json")
    assert local_path((tmp_path / "a b.json").as_uri()) == tmp_path / "a b.json"
    with pytest.raises(DownloadError, match=r"s3://bucket/x: unsupported URL scheme"):
        local_path("s3://bucket/x")


def test_bad_pin_rejected_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        fetch("missing.json", tmp_path / "out.json", sha256="abc")


# --- local sources -------------------------------------------------------------------------


def test_local_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src.json").write_bytes(BODY)
    monkeypatch.chdir(tmp_path)
    out = fetch("src.json", "out/copy.json", sha256=BODY_SHA.upper())
    assert out == Path("out/copy.json")
    assert (tmp_path / "out/copy.json").read_bytes() == BODY
    assert leftovers(tmp_path / "out") == ["copy.json"]


def test_local_file_url(tmp_path: Path) -> None:
    src = tmp_path / "dir with space" / "src.json"
    src.parent.mkdir()
    src.write_bytes(BODY)
    out = fetch(src.as_uri(), tmp_path / "out.json")
    assert out.read_bytes() == BODY


def test_local_pin_mismatch_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a.json"
    src.parent.mkdir()
    src.write_bytes(BODY)
    out_dir = tmp_path / "out"
    with pytest.raises(DownloadError) as info:
        fetch(str(src), out_dir / "a.json", sha256="0" * 64)
    msg = str(info.value)
    assert str(src) in msg and "0" * 64 in msg and BODY_SHA in msg
    assert leftovers(out_dir) == []


def test_missing_local_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DownloadError, match="not found") as info:
        fetch(str(missing), tmp_path / "out.json")
    assert str(missing) in str(info.value)
    assert not (tmp_path / "out.json").exists()


def test_local_copy_does_not_clobber_dest_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out.json"
    dest.write_text("previous")
    with pytest.raises(DownloadError):
        fetch(str(tmp_path / "nope.json"), dest)
    assert dest.read_text() == "previous"


# --- HTTP ----------------------------------------------------------------------------------


def test_http_success_with_pin_and_progress(server: Server, tmp_path: Path) -> None:
    url = server.route("/data.json", ok())
    out = fetch(url, tmp_path / "sub" / "data.json", sha256=BODY_SHA, progress=True)
    assert out == tmp_path / "sub" / "data.json"
    assert out.read_bytes() == BODY
    assert server.hits["/data.json"] == 1
    assert leftovers(tmp_path / "sub") == ["data.json"]


def test_http_pin_mismatch_not_retried_nothing_left(server: Server, tmp_path: Path) -> None:
    url = server.route("/data.json", ok())
    with pytest.raises(DownloadError) as info:
        fetch(url, tmp_path / "data.json", sha256="f" * 64, retries=3, backoff=0.01)
    msg = str(info.value)
    assert url in msg and "expected " + "f" * 64 in msg and "got " + BODY_SHA in msg
    assert server.hits["/data.json"] == 1
    assert leftovers(tmp_path) == []


def test_http_404_not_retried(server: Server, tmp_path: Path) -> None:
    url = server.route("/missing.json", status(404))
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(url, tmp_path / "x.json", retries=3, backoff=0.01)
    assert url in str(info.value)
    assert server.hits["/missing.json"] == 1
    assert leftovers(tmp_path) == []


def test_http_500_then_success(server: Server, tmp_path: Path) -> None:
    url = server.route("/flaky.json", status(500), status(429), ok())
    out = fetch(url, tmp_path / "x.json", retries=3, backoff=0.01)
    assert out.read_bytes() == BODY
    assert server.hits["/flaky.json"] == 3


def test_http_persistent_500_gives_up(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(download.time, "sleep", delays.append)
    url = server.route("/down.json", status(503))
    with pytest.raises(DownloadError, match=r"failed after 4 attempt\(s\): HTTP 503") as info:
        fetch(url, tmp_path / "x.json", retries=3, backoff=0.5)
    assert url in str(info.value)
    assert server.hits["/down.json"] == 4
    assert delays == [0.5, 1.0, 2.0]
    assert leftovers(tmp_path) == []


def test_connection_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    url = f"http://127.0.0.1:{closed_port()}/x.json"
    with pytest.raises(DownloadError, match="connection failed") as info:
        fetch(url, tmp_path / "x.json", retries=1, backoff=0.01, timeout=2)
    assert url in str(info.value) and "2 attempt(s)" in str(info.value)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("reset", [False, True], ids=["truncated", "reset"])
def test_broken_body_then_success(server: Server, tmp_path: Path, reset: bool) -> None:
    url = server.route("/big.bin", truncated(reset), ok())
    out = fetch(url, tmp_path / "big.bin", sha256=BODY_SHA, retries=2, backoff=0.01)
    assert out.read_bytes() == BODY
    assert server.hits["/big.bin"] == 2


@pytest.mark.parametrize("reset", [False, True], ids=["truncated", "reset"])
def test_broken_body_always_fails(server: Server, tmp_path: Path, reset: bool) -> None:
    dest = tmp_path / "big.bin"
    dest.write_bytes(b"old")
    url = server.route("/big.bin", truncated(reset))
    with pytest.raises(DownloadError) as info:
        fetch(url, dest, retries=1, backoff=0.01)
    assert url in str(info.value)
    assert server.hits["/big.bin"] == 2
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == ["big.bin"]


@pytest.mark.parametrize("headers_first", [False, True], ids=["no-headers", "stalled-body"])
def test_slow_server_times_out(server: Server, tmp_path: Path, headers_first: bool) -> None:
    url = server.route("/slow.json", slow(headers_first))
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"(?i)timed out") as info:
        fetch(url, tmp_path / "slow.json", timeout=0.2, retries=1, backoff=0.01)
    assert time.monotonic() - start < 3
    assert url in str(info.value)
    assert server.hits["/slow.json"] == 2
    assert leftovers(tmp_path) == []
