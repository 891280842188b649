"""Fetch pipeline inputs (data sets, weights) from a URL or a local path.

Downloads are the least reliable step of the pipeline, so :func:`fetch` retries transient
failures, detects truncated bodies, can verify a sha256 pin and an exact size, and writes
through :func:`gpt2_instruct.io.atomic_path` so an interrupted or failed download never
leaves a partial file where DVC would cache it.

Every download is bounded: the body may not exceed the pinned size (or ``max_bytes``),
counted after Content-Encoding is decoded so a small gzip cannot expand without limit;
``timeout`` bounds each connect and each read, and ``deadline_s`` the whole fetch (all
attempts and waits): a :class:`gpt2_instruct.deadline.Watchdog` shuts the connection down
when it passes, which also stops a server that trickles its headers or body a few bytes at
a time. Credentials in a URL (``https://user:password@host/``) never appear in a message:
see :func:`gpt2_instruct.deadline.redact`.

A host that cannot be reached at all (its name does not resolve, or it refuses the
connection) fails at once, in one line that names the URL and how to work offline: on a
machine without network, retrying only delays that answer (see :func:`unreachable_reason`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests

from gpt2_instruct.deadline import Watchdog, redact, watched_session
from gpt2_instruct.io import atomic_path

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_BYTES",
    "MAX_RETRIES",
    "DownloadError",
    "causes",
    "copy_file",
    "fetch",
    "is_remote",
    "local_path",
    "unreachable_message",
    "unreachable_reason",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20  # a cap for callers that name none (None: no cap)
DEFAULT_DEADLINE_S = 3600.0
MAX_RETRIES = 20
_MAX_BACKOFF_S = 60.0
_CHUNK_SIZE = 1 << 16
_REMOTE_SCHEMES = ("http", "https")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# What to do without network, for the download stage (other callers name their own param).
DEFAULT_OFFLINE_HINT = "use a local copy: -S download.url=<local file>"


class DownloadError(RuntimeError):
    """A source could not be fetched; the message names the source and the problem.

    Credentials in URLs are redacted from the message, whoever builds it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class _RetryableError(Exception):
    """Internal: a transient failure worth another attempt (the message says what happened)."""


class _DeadlinePassed(Exception):
    """Internal: the fetch's overall deadline passed (never retried)."""


def is_remote(source: str) -> bool:
    """True for http(s) URLs, which need the network; everything else is read locally."""
    return urlsplit(source).scheme.lower() in _REMOTE_SCHEMES


def local_path(source: str) -> Path | None:
    """Return the filesystem path of a ``file://`` URL or plain path, None for http(s) URLs.

    Raises DownloadError for other URL schemes (ftp://, s3://, ...) so a typo in a config
    fails loudly instead of being treated as a relative path.
    """
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in _REMOTE_SCHEMES:
        return None
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{source}: file:// URLs with a remote host are not supported")
        return Path(url2pathname(unquote(parts.path)))
    # A one-letter "scheme" is a Windows drive letter (C:\data.json), i.e. a plain path.
    if scheme and len(scheme) > 1:
        raise DownloadError(f"{source}: unsupported URL scheme {parts.scheme!r}")
    return Path(source)


def unreachable_reason(error: BaseException) -> str | None:
    """Why no connection could be opened at all (name not resolved, refused), else None.

    Follows the chain of causes, which every HTTP client here keeps (requests/urllib3 and
    huggingface_hub's httpx), down to the socket's own error. Those two failures are what a
    machine without network (or a wrong host or port) gives: not worth a retry, unlike a
    timeout or a connection dropped mid-body.
    """
    for cause in causes(error):
        if isinstance(cause, socket.gaierror):
            return f"name not resolved ({cause.strerror or cause})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
    return None


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it (``__cause__``, else ``__context__``), and so on."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def unreachable_message(source: str, reason: str, hint: str, also: str = "") -> str:
    """The one line for an unreachable host: the URL, the host, why, and the offline fix.

    ``also`` is said before the fix (``, and it is not in the cache``).
    """
    host = urlsplit(source).hostname or "?"
    return (
        f"{redact(source)}: cannot reach {host}: {reason} (not retried){also}. No network? {hint}"
    )


def _normalise_pin(source: str, sha256: str | None) -> str | None:
    """Lower-case and check a sha256 pin up front, so a bad config fails before any download."""
    if sha256 is None:
        return None
    pin = sha256.strip().lower()
    if not _SHA256_RE.match(pin):
        raise ValueError(f"{redact(source)}: sha256 pin must be 64 hex digits, got {sha256!r}")
    return pin


def _check_limits(
    source: str,
    *,
    size: int | None,
    max_bytes: int | None,
    timeout: float,
    deadline_s: float,
    retries: int,
) -> None:
    """Reject limits that would make a download unbounded (inf, nan, <= 0) before any work."""
    where = redact(source)
    for name, value in (("timeout", timeout), ("deadline_s", deadline_s)):
        if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"{where}: {name} must be a finite number of seconds > 0, got {value!r}"
            )
    for name, count in (("size", size), ("max_bytes", max_bytes)):
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count <= 0
        ):
            raise ValueError(f"{where}: {name} must be a whole number of bytes > 0, got {count!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(
            f"{where}: retries must be an integer in 0..{MAX_RETRIES}, got {retries!r}"
        )


def _check_pin(source: str, expected: str | None, actual: str) -> None:
    """Raise if the content hash differs from the pin (never retried: the source is wrong)."""
    if expected is not None and actual != expected:
        raise DownloadError(f"{source}: sha256 mismatch: expected {expected}, got {actual}")


def _limit_text(size: int | None, cap: int | None) -> str:
    """How the cap is described in messages: the pinned size or max_bytes."""
    if size is not None:
        return f"the pinned size of {size:,} bytes"
    return f"the cap of {cap:,} bytes (max_bytes)"


def _copy_local(
    source: str, path: Path, dest: Path, pin: str | None, size: int | None, cap: int | None
) -> str:
    """Copy a local file to ``dest`` atomically, verifying size and pin before it lands.

    Returns the sha256 of what was copied (hashed on the way, not re-read).
    """
    if not path.exists():
        raise DownloadError(f"{source}: local file not found: {path}")
    if not path.is_file():
        raise DownloadError(f"{source}: not a regular file: {path}")
    actual_size = path.stat().st_size
    if cap is not None and actual_size > cap:
        raise DownloadError(
            f"{source}: {actual_size:,} bytes, larger than {_limit_text(size, cap)}"
        )
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        copied = 0
        try:
            with open(path, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if cap is not None and copied > cap:  # the file grew while we copied
                        raise DownloadError(
                            f"{source}: larger than {_limit_text(size, cap)} (still growing?)"
                        )
                    out.write(chunk)
                    digest.update(chunk)
        except OSError as exc:
            raise DownloadError(f"{source}: cannot copy {path}: {exc}") from exc
        _check_pin(source, pin, digest.hexdigest())  # before the size: it says more
        if size is not None and copied != size:
            raise DownloadError(
                f"{source}: {copied:,} bytes, expected the pinned size of {size:,} bytes"
            )
    return digest.hexdigest()


def copy_file(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    shown: str | None = None,
) -> str:
    """Copy a local file to ``dest`` (atomically, at most ``max_bytes``); return its sha256.

    For files that are already on disk (a cache's copy): the digest comes from the bytes
    written, so what is recorded is what landed. Errors name ``shown`` (default: the path).
    """
    path = Path(source)
    name = shown if shown is not None else str(path)
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0
    ):
        raise ValueError(f"{name}: max_bytes must be a whole number > 0, got {max_bytes!r}")
    if Path(dest).is_dir():
        raise DownloadError(f"{name}: destination {dest} is a directory")
    return _copy_local(name, path, Path(dest), None, None, max_bytes)


# --- HTTP ------------------------------------------------------------------------------


def _progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar when asked for (imported lazily: tqdm is only needed for interactive runs)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def _expected_length(response: requests.Response) -> int | None:
    """Content-Length as an int, or None when absent or unparsable."""
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _stream_body(
    source: str,
    response: requests.Response,
    handle: IO[bytes],
    *,
    progress: bool,
    cap: int | None,
    limit: str,
    watchdog: Watchdog,
    received: list[int],
) -> str:
    """Write the decoded body to ``handle`` (at most ``cap`` bytes); return its sha256.

    ``received[0]`` counts the decoded bytes as they come, for the deadline's message.
    """
    digest = hashlib.sha256()
    bar = _progress_bar(progress, _expected_length(response), Path(urlsplit(source).path).name)
    try:
        # iter_content decodes Content-Encoding; urllib3 hands out at most a chunk at a time,
        # so the cap is checked on decoded bytes, one chunk past it at most.
        for chunk in response.iter_content(chunk_size=_CHUNK_SIZE):
            if watchdog.passed():
                raise _DeadlinePassed
            if not chunk:
                continue
            if cap is not None and received[0] + len(chunk) > cap:
                raise DownloadError(
                    f"{source}: body is larger than {limit}; stopped after "
                    f"{received[0] + len(chunk):,} bytes"
                )
            handle.write(chunk)
            digest.update(chunk)
            received[0] += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


def _attempt_http(
    session: requests.Session,
    source: str,
    dest: Path,
    *,
    pin: str | None,
    size: int | None,
    cap: int | None,
    timeout: float,
    progress: bool,
    watchdog: Watchdog,
    received: list[int],
    offline_hint: str,
) -> None:
    """One download attempt into a temp file beside ``dest``.

    Raises _RetryableError for transient failures, _DeadlinePassed when the deadline
    passed, and DownloadError for permanent failures (an unreachable host among them);
    either way the temp file is removed and ``dest`` is untouched.
    """
    limit = _limit_text(size, cap)
    received[0] = 0
    try:
        with (
            session.get(source, stream=True, timeout=timeout) as response,
            atomic_path(dest) as tmp,
        ):
            status = response.status_code
            if status == 429 or status >= 500:
                raise _RetryableError(f"HTTP {status} {response.reason}")
            if status >= 400:
                raise DownloadError(f"{source}: HTTP {status} {response.reason} (not retried)")
            expected = _expected_length(response)
            encoding = response.headers.get("Content-Encoding", "identity").lower().strip()
            identity = encoding in ("", "identity")
            if expected is not None and identity and cap is not None and expected > cap:
                raise DownloadError(  # refused before reading a byte of the body
                    f"{source}: Content-Length {expected:,} bytes is larger than {limit}"
                )
            with open(tmp, "wb") as handle:
                actual = _stream_body(
                    source,
                    response,
                    handle,
                    progress=progress,
                    cap=cap,
                    limit=limit,
                    watchdog=watchdog,
                    received=received,
                )
                handle.flush()
                os.fsync(handle.fileno())
            if watchdog.passed():  # the watchdog may have ended the body early
                raise _DeadlinePassed
            body_length = received[0]
            if not identity:
                # Content-Length counts the compressed bytes; compare with what came off the wire.
                body_length = response.raw.tell()
            if expected is not None and body_length != expected:
                raise _RetryableError(
                    f"truncated body: received {body_length} of {expected} bytes (Content-Length)"
                )
            _check_pin(source, pin, actual)  # before the size: it says more
            if size is not None and received[0] != size:
                raise DownloadError(
                    f"{source}: {received[0]:,} bytes, expected the pinned size of {size:,} bytes"
                )
    except (_DeadlinePassed, DownloadError, _RetryableError):
        if watchdog.passed():
            raise _DeadlinePassed from None
        raise
    except requests.RequestException as exc:
        if watchdog.passed():
            raise _DeadlinePassed from None
        problem = redact(str(exc))
        reason = unreachable_reason(exc)
        if reason is not None:
            raise DownloadError(unreachable_message(source, reason, offline_hint)) from None
        if isinstance(exc, requests.Timeout):
            raise _RetryableError(f"timed out (timeout={timeout} s): {problem}") from exc
        if isinstance(exc, requests.exceptions.ChunkedEncodingError):
            raise _RetryableError(f"connection broken mid-body: {problem}") from exc
        if isinstance(exc, requests.ConnectionError):
            raise _RetryableError(f"connection failed: {problem}") from exc
        raise DownloadError(f"{source}: {type(exc).__name__}: {problem}") from exc
    except OSError as exc:  # not wrapped by requests: the socket itself, or our disk
        if watchdog.passed():
            raise _DeadlinePassed from None
        reason = unreachable_reason(exc)
        if reason is not None:
            raise DownloadError(unreachable_message(source, reason, offline_hint)) from None
        if isinstance(exc, ConnectionError | TimeoutError):
            raise _RetryableError(f"connection failed: {redact(str(exc))}") from exc
        raise DownloadError(f"{source}: cannot write {dest}: {exc}") from exc


def fetch(
    source: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    size: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    timeout: float = 60.0,
    deadline_s: float = DEFAULT_DEADLINE_S,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool = False,
    offline_hint: str = DEFAULT_OFFLINE_HINT,
) -> Path:
    """Fetch ``source`` (http(s) URL, ``file://`` URL or local path) to ``dest``; return it.

    Transient HTTP failures (connection errors, timeouts, 5xx, 429, truncated bodies) are
    retried up to ``retries`` extra times (at most 20), sleeping ``backoff * 2**attempt``
    seconds (at most 60) between attempts; other 4xx statuses, sha256 or size mismatches
    and bodies over the cap fail at once, and so does a host that cannot be reached at all
    (name not resolved, connection refused): one line ending with ``offline_hint``, the
    way to run without network. The body may hold at most ``size`` bytes when
    that is pinned (and exactly that many), else at most ``max_bytes`` (None: no cap),
    counted after Content-Encoding is decoded. ``timeout`` bounds each connect and each
    read; ``deadline_s`` the whole fetch, retries and waits included. ``dest`` only ever
    holds a complete, verified file: on any error nothing is written there and no temp
    file is left behind. Messages never show a URL's ``user:password@``.
    """
    dest = Path(dest)
    pin = _normalise_pin(source, sha256)
    _check_limits(
        source,
        size=size,
        max_bytes=max_bytes,
        timeout=timeout,
        deadline_s=deadline_s,
        retries=retries,
    )
    cap = size if size is not None else max_bytes
    if dest.is_dir():
        raise DownloadError(f"{source}: destination {dest} is a directory")

    path = local_path(source)
    if path is not None:
        _copy_local(source, path, dest, pin, size, cap)
        return dest

    shown = redact(source)
    last_problem = "no attempt made"
    received = [0]
    attempts = retries + 1
    with Watchdog(deadline_s) as watchdog, watched_session() as session:
        for attempt in range(attempts):
            try:
                _attempt_http(
                    session,
                    source,
                    dest,
                    pin=pin,
                    size=size,
                    cap=cap,
                    timeout=timeout,
                    progress=progress,
                    watchdog=watchdog,
                    received=received,
                    offline_hint=offline_hint,
                )
                return dest
            except _DeadlinePassed:
                raise DownloadError(
                    f"{shown}: gave up at the deadline of {deadline_s:g} s (deadline_s) in "
                    f"attempt {attempt + 1} of {attempts}, {received[0]:,} bytes received"
                ) from None
            except _RetryableError as exc:
                last_problem = redact(str(exc))
            finally:
                watchdog.release()
            if attempt < retries:
                delay = min(backoff * 2**attempt, _MAX_BACKOFF_S)
                if delay >= watchdog.remaining():
                    raise DownloadError(
                        f"{shown}: gave up at the deadline of {deadline_s:g} s (deadline_s) "
                        f"after {attempt + 1} attempt(s): {last_problem}"
                    )
                log.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                    shown,
                    attempt + 1,
                    attempts,
                    last_problem,
                    delay,
                )
                time.sleep(delay)
    raise DownloadError(f"{shown}: failed after {attempts} attempt(s): {last_problem}")
