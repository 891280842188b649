"""Tests for gpt2_instruct.download against local files and HTTP servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2_instruct import download
from gpt2_instruct.deadline import Watchdog, redact, watched_session
from gpt2_instruct.download import DownloadError, fetch, is_remote, local_path
from gpt2_instruct.io import is_temp_name
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.params import DownloadParams, FetchParams, ParamsError, load_params
from gpt2_instruct.stages import download as download_stage
from gpt2_instruct.stages import fetch_gpt2 as fetch_gpt2_stage
from gpt2_instruct.tokenizer import ENCODER_JSON, VOCAB_BPE
from gpt2_instruct.weights import WeightsError, save_model

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
            stopping = threading.Event()  # set at teardown: slow behaviours end early

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
        srv.httpd.stopping.set()
        srv.httpd.shutdown()
        srv.httpd.server_close()


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the retry waits of this thread's fetch instead of sleeping them.

    time.sleep is patched process-wide, so other threads (servers) still really sleep.
    """
    delays: list[float] = []
    main, real_sleep = threading.get_ident(), time.sleep

    def sleep(seconds: float) -> None:
        if threading.get_ident() == main:
            delays.append(seconds)
        else:
            real_sleep(seconds)

    monkeypatch.setattr(download.time, "sleep", sleep)
    return delays


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
    delays = record_sleeps(monkeypatch)
    url = server.route("/down.json", status(503))
    with pytest.raises(DownloadError, match=r"failed after 4 attempt\(s\): HTTP 503") as info:
        fetch(url, tmp_path / "x.json", retries=3, backoff=0.5)
    assert url in str(info.value)
    assert server.hits["/down.json"] == 4
    assert delays == [0.5, 1.0, 2.0]
    assert leftovers(tmp_path) == []


def test_connection_refused_fails_at_once_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused connection is not worth a retry: one line, the URL, how to work offline."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    delays = record_sleeps(monkeypatch)
    url = f"http://127.0.0.1:{closed_port()}/x.json"
    started = time.monotonic()
    with pytest.raises(DownloadError, match="connection refused") as info:
        fetch(url, tmp_path / "x.json", retries=3, backoff=0.01, timeout=2)
    assert time.monotonic() - started < 2
    message = str(info.value)
    assert message.startswith(f"{url}: cannot reach 127.0.0.1: connection refused (not retried)")
    assert message.endswith("-S download.url=<local file>") and "\n" not in message
    assert delays == []  # no retry, no wait
    assert leftovers(tmp_path) == []


def test_a_name_that_does_not_resolve_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_dns: list[str]
) -> None:
    """No network usually means no DNS: a clear line, not three retries of urllib3's trace."""
    lookups = no_dns
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    delays = record_sleeps(monkeypatch)
    url = "https://user:secret@data.example.org/instruction-data.json"
    with pytest.raises(DownloadError) as info:
        fetch(url, tmp_path / "x.json", retries=5, offline_hint="try -S x.url=<file>")
    assert str(info.value) == (
        "https://***@data.example.org/instruction-data.json: cannot reach data.example.org: "
        "name not resolved (Name or service not known) (not retried). No network? "
        "try -S x.url=<file>"
    )
    assert lookups == ["data.example.org"] and delays == []
    assert leftovers(tmp_path) == []


def test_a_timeout_is_still_retried(server: Server, tmp_path: Path) -> None:
    """Only a host that cannot be reached fails at once; a slow one gets its retries."""
    url = server.route("/slow.json", slow(headers_first=False, delay=0.6), ok())
    out = fetch(url, tmp_path / "x.json", retries=1, backoff=0.01, timeout=0.2)
    assert out.read_bytes() == BODY
    assert server.hits["/slow.json"] == 2


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


# --- bounded downloads: size caps, gzip bombs, deadlines -----------------------------------

MiB = 1 << 20


def endless(
    total: int, content_length: int | None = None, sent: list[int] | None = None
) -> Behaviour:
    """Stream ``total`` bytes of 'x' (far more than any cap), counting what got out."""

    def run(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        if content_length is not None:
            h.send_header("Content-Length", str(content_length))
        h.end_headers()  # HTTP/1.0 without Content-Length: the body ends when we close
        block = b"x" * (64 << 10)
        with contextlib.suppress(OSError):
            for _ in range(total // len(block)):  # bounded, and stops when the client leaves
                h.wfile.write(block)
                if sent is not None:
                    sent[0] += len(block)

    return run


def gzip_bomb(expanded: int) -> tuple[bytes, Behaviour]:
    """A small gzip body (Content-Encoding: gzip) that expands to ``expanded`` zero bytes."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip container
    block = bytes(MiB)
    payload = b"".join(packer.compress(block) for _ in range(expanded // MiB)) + packer.flush()

    def run(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        with contextlib.suppress(OSError):
            h.wfile.write(payload)

    return payload, run


def trickle(phase: str, interval: float = 0.05, steps: int = 400) -> Behaviour:
    """Send 2 bytes every ``interval`` s: each read succeeds, the whole never ends.

    ``phase`` "headers" trickles the status line and headers, "body" a body promised by
    Content-Length. Bounded by ``steps`` and by the client leaving.
    """

    def run(h: BaseHTTPRequestHandler) -> None:
        if phase == "headers":
            data = b"HTTP/1.0 200 OK\r\n" + b"X-Slow: " + b"z" * 10_000 + b"\r\n"
        else:
            h.send_response(200)
            h.send_header("Content-Length", str(10 * steps))
            h.end_headers()
            h.wfile.flush()
            data = b"ab" * steps
        with contextlib.suppress(OSError):
            for i in range(0, min(len(data), 2 * steps), 2):
                if getattr(h.server, "stopping", threading.Event()).is_set():
                    return
                h.wfile.write(data[i : i + 2])
                h.wfile.flush()
                time.sleep(interval)

    return run


def test_body_longer_than_the_pinned_size_stops_at_the_size(server: Server, tmp_path: Path) -> None:
    sent = [0]
    url = server.route("/data.json", endless(1 << 30, sent=sent))  # 1 GiB, no Content-Length
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch(url, tmp_path / "data.json", sha256=BODY_SHA, size=len(BODY), retries=2)
    msg = str(info.value)
    assert url in msg and f"pinned size of {len(BODY):,} bytes" in msg
    assert "\n" not in msg
    assert time.monotonic() - start < 5
    assert server.hits["/data.json"] == 1  # not retried
    assert sent[0] < 256 * MiB  # it stopped long before the end (socket buffers aside)
    assert leftovers(tmp_path) == []


def test_content_length_over_the_cap_is_refused_before_the_body(
    server: Server, tmp_path: Path
) -> None:
    sent = [0]
    url = server.route("/big.bin", endless(1 << 30, content_length=1 << 30, sent=sent))
    with pytest.raises(DownloadError, match=r"Content-Length 1,073,741,824 bytes") as info:
        fetch(url, tmp_path / "big.bin", max_bytes=MiB)
    assert "cap of 1,048,576 bytes (max_bytes)" in str(info.value)
    with pytest.raises(DownloadError, match=r"is larger than the pinned size of 10 bytes"):
        fetch(url, tmp_path / "big.bin", size=10)
    assert leftovers(tmp_path) == []


def test_body_shorter_than_the_pinned_size(server: Server, tmp_path: Path) -> None:
    url = server.route("/data.json", ok())
    with pytest.raises(DownloadError, match="sha256 mismatch"):  # the hash says more
        fetch(url, tmp_path / "a.json", sha256="0" * 64, size=len(BODY) + 10, retries=2)
    with pytest.raises(DownloadError, match=rf"expected the pinned size of {len(BODY) + 10:,}"):
        fetch(url, tmp_path / "a.json", size=len(BODY) + 10, retries=2)
    assert server.hits["/data.json"] == 2  # neither retried
    assert leftovers(tmp_path) == []


def test_body_over_max_bytes_without_a_pin(server: Server, tmp_path: Path) -> None:
    url = server.route("/big.bin", endless(1 << 30))
    dest = tmp_path / "big.bin"
    dest.write_bytes(b"old")
    with pytest.raises(DownloadError) as info:
        fetch(url, dest, max_bytes=MiB, retries=2)
    msg = str(info.value)
    assert url in msg and "cap of 1,048,576 bytes (max_bytes)" in msg
    assert server.hits["/big.bin"] == 1
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == ["big.bin"]
    # Within the cap, the same kind of body (ended by closing) is accepted.
    url = server.route("/ok.bin", endless(2 * MiB))
    assert fetch(url, tmp_path / "ok.bin", max_bytes=4 * MiB).stat().st_size == 2 * MiB


def test_gzip_bomb_is_capped_on_decoded_bytes(server: Server, tmp_path: Path) -> None:
    payload, behaviour = gzip_bomb(256 * MiB)
    assert len(payload) < MiB  # small on the wire, far over the cap once decoded
    url = server.route("/bomb.json", behaviour)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"larger than the cap of 1,048,576 bytes") as info:
        fetch(url, tmp_path / "bomb.json", max_bytes=MiB, retries=2)
    assert url in str(info.value)
    assert time.monotonic() - start < 5
    assert server.hits["/bomb.json"] == 1
    assert leftovers(tmp_path) == []
    # A gzip body within the cap is decoded and kept.
    payload, behaviour = gzip_bomb(2 * MiB)
    url = server.route("/fine.json", behaviour)
    assert fetch(url, tmp_path / "fine.json", max_bytes=4 * MiB).read_bytes() == bytes(2 * MiB)


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_trickling_server_is_stopped_by_the_deadline(
    server: Server, tmp_path: Path, phase: str
) -> None:
    url = server.route("/slow.json", trickle(phase))
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"deadline of 1 s \(deadline_s\)") as info:
        fetch(url, tmp_path / "slow.json", timeout=5, deadline_s=1, retries=3, backoff=0.01)
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 3, elapsed  # the per-read timeout (5 s) never fired
    assert url in str(info.value)
    assert server.hits["/slow.json"] == 1  # a deadline is not retried
    assert leftovers(tmp_path) == []


def test_the_watchdog_also_ends_a_request_on_a_kept_alive_connection() -> None:
    """A connection opened before the watchdog (reused from the pool) is watched too."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    replied = threading.Event()

    def serve() -> None:  # answers the first request, then never the second
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            replied.set()
            conn.recv(65536)
            time.sleep(10)

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{port}/x"
    try:
        with watched_session() as session:
            session.trust_env = False  # no proxy between us and 127.0.0.1
            assert session.get(url, timeout=30).content == b"ok"
            assert replied.wait(5)  # the server thread may not have run set() yet
            start = time.monotonic()
            with Watchdog(0.5) as watchdog, pytest.raises(OSError):
                session.get(url, timeout=30)  # requests' errors are OSErrors too
            elapsed = time.monotonic() - start
    finally:
        listener.close()
    assert watchdog.expired
    assert 0.4 < elapsed < 5, elapsed  # the deadline, not the 30 s read timeout


def test_deadline_covers_retries_and_their_waits(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays = record_sleeps(monkeypatch)
    url = server.route("/down.json", status(503))
    with pytest.raises(DownloadError, match=r"deadline of 5 s .* after 3 attempt\(s\): HTTP 503"):
        fetch(url, tmp_path / "x.json", retries=10, backoff=1.5, deadline_s=5)
    assert delays == [1.5, 3.0]  # the next wait (6 s) would pass the deadline: give up now
    assert server.hits["/down.json"] == 3


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"timeout": float("inf")}, "timeout must be a finite"),
        ({"timeout": float("nan")}, "timeout must be a finite"),
        ({"timeout": 0}, "timeout must be a finite"),
        ({"deadline_s": float("inf")}, "deadline_s must be a finite"),
        ({"deadline_s": -1.0}, "deadline_s must be a finite"),
        ({"retries": 21}, "retries must be an integer in 0..20"),
        ({"retries": -1}, "retries must be an integer in 0..20"),
        ({"max_bytes": 0}, "max_bytes must be a whole number"),
        ({"size": 1.5}, "size must be a whole number"),
    ],
)
def test_unbounded_limits_rejected_before_any_work(
    tmp_path: Path, kwargs: dict[str, float], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        fetch("http://127.0.0.1:9/x.json", tmp_path / "x.json", **kwargs)  # type: ignore[arg-type]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("download:\n  timeout: .inf\n", ["download", "timeout", "finite"]),
        ("download:\n  timeout: .nan\n", ["download", "timeout", "finite"]),
        ("download:\n  timeout: -1\n", ["download", "timeout"]),
        ("download:\n  deadline_s: .inf\n", ["download", "deadline_s"]),
        ("download:\n  deadline_s: 0\n", ["download", "deadline_s"]),
        ("download:\n  retries: 21\n", ["download", "retries", "0..20"]),
        ("download:\n  retries: 1.0e+23\n", ["download.retries", "integer"]),
        ("download:\n  max_bytes: 0\n", ["download", "max_bytes"]),
        ("download:\n  size: 0\n", ["download", "size"]),
        ("download:\n  size: 100\n  max_bytes: 10\n", ["download", "size", "max_bytes"]),
        ("download:\n  sha256: abc\n", ["download", "sha256", "64 hex digits"]),
        ("fetch_gpt2:\n  timeout: .inf\n", ["fetch_gpt2", "timeout", "finite"]),
        ("fetch_gpt2:\n  timeout: .nan\n", ["fetch_gpt2", "timeout", "finite"]),
        ("fetch_gpt2:\n  deadline_s: .inf\n", ["fetch_gpt2", "deadline_s"]),
        ("fetch_gpt2:\n  retries: 100\n", ["fetch_gpt2", "retries"]),
        ("fetch_gpt2:\n  max_bytes: -5\n", ["fetch_gpt2", "max_bytes"]),
    ],
)
def test_params_reject_unbounded_download_limits(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


def test_copy_file_returns_the_sha256_of_what_landed_and_keeps_the_cap(tmp_path: Path) -> None:
    src = tmp_path / "cache" / "blob"
    src.parent.mkdir()
    src.write_bytes(BODY)
    assert download.copy_file(src, tmp_path / "out.json") == BODY_SHA
    assert (tmp_path / "out.json").read_bytes() == BODY
    with pytest.raises(DownloadError, match=r"^repo x\.json: .*larger than the cap of 100 bytes"):
        download.copy_file(src, tmp_path / "capped.json", max_bytes=100, shown="repo x.json")
    with pytest.raises(DownloadError, match="local file not found"):
        download.copy_file(tmp_path / "nope", tmp_path / "nope.json")
    assert leftovers(tmp_path) == ["cache", "out.json"]


def test_local_copies_are_checked_against_the_size_and_the_cap(tmp_path: Path) -> None:
    src = tmp_path / "src.json"
    src.write_bytes(BODY)
    with pytest.raises(DownloadError, match=rf"expected the pinned size of {len(BODY) + 1:,}"):
        fetch(str(src), tmp_path / "out" / "a.json", size=len(BODY) + 1)
    with pytest.raises(DownloadError, match=r"larger than the cap of 100 bytes \(max_bytes\)"):
        fetch(str(src), tmp_path / "out" / "a.json", max_bytes=100)
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []
    assert fetch(str(src), tmp_path / "b.json", size=len(BODY)).read_bytes() == BODY


# --- credentials -------------------------------------------------------------------------


def test_password_in_a_url_never_appears_in_messages(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-pw"
    plain = server.route("/missing.json", status(404))
    url = plain.replace("http://", f"http://alice:{secret}@")
    with pytest.raises(DownloadError) as info:
        fetch(url, tmp_path / "x.json", retries=0)
    assert secret not in str(info.value) and "alice" not in str(info.value)
    assert f"http://***@127.0.0.1:{server.port}/missing.json" in str(info.value)

    server.route("/flaky.json", status(500))
    url = plain.replace("http://", f"http://alice:{secret}@").replace("missing", "flaky")
    with caplog.at_level("WARNING"), pytest.raises(DownloadError) as info:
        fetch(url, tmp_path / "x.json", retries=1, backoff=0.01)
    assert "***@" in caplog.text and "***@" in str(info.value)
    assert secret not in caplog.text and secret not in str(info.value)

    refused = f"http://alice:{secret}@127.0.0.1:{closed_port()}/x.json"
    with pytest.raises(DownloadError) as info:
        fetch(refused, tmp_path / "x.json", retries=0, timeout=2)
    assert secret not in str(info.value)
    for bad in (f"ftp://alice:{secret}@example.org/x", f"file://alice:{secret}@host/x"):
        with pytest.raises(DownloadError) as info:
            fetch(bad, tmp_path / "x.json")
        assert secret not in str(info.value) and "***@" in str(info.value)
    with pytest.raises(ValueError) as err:
        fetch(url, tmp_path / "x.json", sha256="nothex")
    assert secret not in str(err.value)
    assert redact(f"see https://u:{secret}@h/a and http://v@h/b") == (
        "see https://***@h/a and http://***@h/b"
    )


def test_download_stage_logs_the_url_without_its_password(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.route("/data.json", ok()).replace("http://", "http://bob:hunter2@")
    download_stage.download(
        DownloadParams(url=url, sha256=BODY_SHA, size=len(BODY)), tmp_path / "d.json"
    )
    err = capsys.readouterr().err
    assert "hunter2" not in err and "http://***@127.0.0.1" in err


# --- stale temporaries of killed downloads --------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_download_leaves_a_temp_that_the_next_run_removes(
    server: Server, tmp_path: Path, sig: signal.Signals
) -> None:
    url = server.route("/data.json", trickle("body", interval=0.05, steps=600), ok())
    out = tmp_path / "raw" / "instruction-data.json"
    code = (
        "import sys; from gpt2_instruct.download import fetch; "
        "fetch(sys.argv[1], sys.argv[2], timeout=10, deadline_s=60, retries=0)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, url, str(out)])
    try:
        deadline = time.monotonic() + 30
        temps: list[Path] = []
        while not temps and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if out.parent.is_dir():
                temps = [p for p in out.parent.iterdir() if is_temp_name(p.name, out.name)]
        assert temps, "the download never started writing"
        time.sleep(0.2)  # mid-body
        proc.send_signal(sig)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == -sig
    assert all(t.exists() for t in temps)  # the killed run could not clean up
    assert not out.exists()

    download_stage.download(DownloadParams(url=url, sha256=BODY_SHA, timeout=5, deadline_s=20), out)
    assert out.read_bytes() == BODY
    assert leftovers(out.parent) == ["instruction-data.json"]


# --- fetch_gpt2: caps, errors that name the user's files, nothing half-written --------------


@pytest.fixture
def bpe_source(tmp_path: Path, write_bpe, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = write_bpe(tmp_path / "bpe", [("Ġ", "t")])
    pins = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in (ENCODER_JSON, VOCAB_BPE)
    }
    monkeypatch.setattr(fetch_gpt2_stage, "BPE_SHA256", pins)
    return directory


def _local_model(directory: Path, vocab_size: int) -> Path:
    model = GPTModel(
        GPTConfig(vocab_size=vocab_size, context_length=16, n_embd=8, n_layer=1, n_head=2)
    )
    save_model(model, directory)
    return directory


@pytest.mark.parametrize("damage", ["truncated", "garbage", "config"])
def test_bad_local_weights_name_the_users_file_and_leave_nothing(
    tmp_path: Path, bpe_source: Path, damage: str
) -> None:
    local = _local_model(tmp_path / "my model", vocab_size=260)
    weights = local / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        (local / "config.json").write_text("{not json")
    out = tmp_path / "out"
    params = FetchParams(source="local", local_dir=str(local), bpe_source=str(bpe_source))
    with pytest.raises(WeightsError) as info:
        fetch_gpt2_stage.fetch_gpt2(params, out / "encoding", out / "base")
    msg = str(info.value)
    named = local / ("config.json" if damage == "config" else "model.safetensors")
    assert msg.startswith(f"{named}:"), msg
    assert ".tmp" not in msg
    assert not out.exists() or leftovers(out) == []  # neither encoding/ nor base/, no temps


def test_fetch_gpt2_puts_nothing_in_place_when_the_model_part_fails(
    tmp_path: Path, bpe_source: Path
) -> None:
    local = _local_model(tmp_path / "small", vocab_size=100)  # fewer tokens than the BPE
    out = tmp_path / "out"
    params = FetchParams(source="local", local_dir=str(local), bpe_source=str(bpe_source))
    with pytest.raises(WeightsError, match="fewer than the tokenizer's"):
        fetch_gpt2_stage.fetch_gpt2(params, out / "encoding", out / "base")
    assert not out.exists() or leftovers(out) == []
    missing = FetchParams(
        source="local", local_dir=str(tmp_path / "nope"), bpe_source=str(bpe_source)
    )
    with pytest.raises(DownloadError, match="not found"):
        fetch_gpt2_stage.fetch_gpt2(missing, out / "encoding", out / "base")
    assert not out.exists() or leftovers(out) == []


def test_fetch_gpt2_caps_the_weights_and_cleans_stale_temps(
    tmp_path: Path, bpe_source: Path
) -> None:
    local = _local_model(tmp_path / "m", vocab_size=260)
    out = tmp_path / "out"
    stale = out / ".base.abcd1234.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    (out / ".encoding.zzzzzzzz.tmp").write_bytes(b"half")
    capped = FetchParams(
        source="local", local_dir=str(local), bpe_source=str(bpe_source), max_bytes=1000
    )
    with pytest.raises(DownloadError, match=r"larger than the cap of 1,000 bytes \(max_bytes\)"):
        fetch_gpt2_stage.fetch_gpt2(capped, out / "encoding", out / "base")
    assert leftovers(out) == []  # the stale temps went at the start
    params = FetchParams(source="local", local_dir=str(local), bpe_source=str(bpe_source))
    fetch_gpt2_stage.fetch_gpt2(params, out / "encoding", out / "base")
    assert leftovers(out) == ["base", "encoding"]
    assert leftovers(out / "base") == ["config.json", "model.safetensors"]


def test_default_weights_caps_allow_the_real_hub_files() -> None:
    # model.safetensors on the Hub: fp32 weights plus a causal mask per layer (bytes).
    hub_sizes = {"gpt2": 548_105_171, "gpt2-xl": 6_431_829_964}
    for model, real in hub_sizes.items():
        cap = fetch_gpt2_stage.weights_max_bytes(model)
        assert real < cap < 1.3 * real, model
    assert fetch_gpt2_stage.weights_max_bytes(None) == fetch_gpt2_stage.weights_max_bytes("gpt2-xl")


def test_gpt2_bpe_pins_have_known_sizes(shared_data: Path) -> None:
    """The real BPE files are fetched at their exact sizes (checked on the shared copies)."""
    from gpt2_instruct.tokenizer import BPE_SHA256

    for name, pin in BPE_SHA256.items():
        path = shared_data / "gpt2-encoding" / name
        if not path.is_file():
            pytest.skip(f"{path} not present")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == pin
        assert fetch_gpt2_stage.BPE_SIZES[pin] == path.stat().st_size
    data = shared_data / "instruction-data.json"
    pin = hashlib.sha256(data.read_bytes()).hexdigest()
    assert download_stage.KNOWN_SIZES[pin] == data.stat().st_size


def test_a_full_disk_is_one_clear_error(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download.os, "fsync", full)
    url = server.route("/data.json", ok())
    with pytest.raises(DownloadError, match="No space left on device") as info:
        fetch(url, tmp_path / "data.json", retries=2, backoff=0.01)
    assert url in str(info.value) and str(tmp_path / "data.json") in str(info.value)
    assert server.hits["/data.json"] == 1
    assert leftovers(tmp_path) == []
