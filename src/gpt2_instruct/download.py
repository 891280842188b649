"""Fetch pipeline inputs (data sets, weights) from a URL or a local path.

Downloads are the least reliable step of the pipeline, so :func:`fetch` retries transient
failures, detects truncated bodies, can verify a sha256 pin, and writes through
:func:`gpt2_instruct.io.atomic_path` so an interrupted or failed download never leaves a
partial file where DVC would cache it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests

from gpt2_instruct.io import atomic_path, sha256_file

__all__ = ["DownloadError", "fetch", "is_remote", "local_path"]

log = logging.getLogger(__name__)

_CHUNK_SIZE = 1 << 16
_REMOTE_SCHEMES = ("http", "https")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    """A source could not be fetched; the message names the source and the problem."""


class _RetryableError(Exception):
    """Internal: a transient failure worth another attempt (the message says what happened)."""


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


def _normalise_pin(source: str, sha256: str | None) -> str | None:
    """Lower-case and check a sha256 pin up front, so a bad config fails before any download."""
    if sha256 is None:
        return None
    pin = sha256.strip().lower()
    if not _SHA256_RE.match(pin):
        raise ValueError(f"{source}: sha256 pin must be 64 hex digits, got {sha256!r}")
    return pin


def _check_pin(source: str, expected: str | None, actual: str) -> None:
    """Raise if the content hash differs from the pin (never retried: the source is wrong)."""
    if expected is not None and actual != expected:
        raise DownloadError(f"{source}: sha256 mismatch: expected {expected}, got {actual}")


def _copy_local(source: str, path: Path, dest: Path, pin: str | None) -> None:
    """Copy a local file to ``dest`` atomically, verifying the pin before it lands."""
    if not path.exists():
        raise DownloadError(f"{source}: local file not found: {path}")
    if not path.is_file():
        raise DownloadError(f"{source}: not a regular file: {path}")
    with atomic_path(dest) as tmp:
        try:
            shutil.copyfile(path, tmp)
        except OSError as exc:
            raise DownloadError(f"{source}: cannot copy {path}: {exc}") from exc
        _check_pin(source, pin, sha256_file(tmp))


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
    source: str, response: requests.Response, handle: IO[bytes], progress: bool
) -> tuple[int, str]:
    """Write the body to ``handle``; return (decoded bytes written, their sha256)."""
    digest = hashlib.sha256()
    written = 0
    bar = _progress_bar(progress, _expected_length(response), Path(urlsplit(source).path).name)
    try:
        for chunk in response.iter_content(chunk_size=_CHUNK_SIZE):
            if not chunk:
                continue
            handle.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return written, digest.hexdigest()


def _attempt_http(
    source: str, dest: Path, *, pin: str | None, timeout: float, progress: bool
) -> None:
    """One download attempt into a temp file beside ``dest``.

    Raises _RetryableError for transient failures and DownloadError for permanent ones;
    either way the temp file is removed and ``dest`` is untouched.
    """
    try:
        with (
            requests.get(source, stream=True, timeout=timeout) as response,
            atomic_path(dest) as tmp,
        ):
            status = response.status_code
            if status == 429 or status >= 500:
                raise _RetryableError(f"HTTP {status} {response.reason}")
            if status >= 400:
                raise DownloadError(f"{source}: HTTP {status} {response.reason} (not retried)")
            with open(tmp, "wb") as handle:
                received, actual = _stream_body(source, response, handle, progress)
                handle.flush()
                os.fsync(handle.fileno())
            expected = _expected_length(response)
            encoding = response.headers.get("Content-Encoding", "identity").lower()
            if encoding not in ("", "identity"):
                # Content-Length counts the compressed bytes; compare with what came off the wire.
                received = response.raw.tell()
            if expected is not None and received != expected:
                raise _RetryableError(
                    f"truncated body: received {received} of {expected} bytes (Content-Length)"
                )
            _check_pin(source, pin, actual)
    except requests.Timeout as exc:
        raise _RetryableError(f"timed out (timeout={timeout} s): {exc}") from exc
    except requests.exceptions.ChunkedEncodingError as exc:
        raise _RetryableError(f"connection broken mid-body: {exc}") from exc
    except requests.ConnectionError as exc:
        raise _RetryableError(f"connection failed: {exc}") from exc
    except requests.RequestException as exc:
        raise DownloadError(f"{source}: {type(exc).__name__}: {exc}") from exc


def fetch(
    source: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool = False,
) -> Path:
    """Fetch ``source`` (http(s) URL, ``file://`` URL or local path) to ``dest``; return it.

    Transient HTTP failures (connection errors, timeouts, 5xx, 429, truncated bodies) are
    retried up to ``retries`` extra times, sleeping ``backoff * 2**attempt`` seconds between
    attempts; other 4xx statuses and sha256 mismatches fail at once. ``timeout`` bounds each
    connect and each read, not the whole transfer. ``dest`` only ever holds a complete,
    verified file: on any error nothing is written there and no temp file is left behind.
    """
    dest = Path(dest)
    pin = _normalise_pin(source, sha256)
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if dest.is_dir():
        raise DownloadError(f"{source}: destination {dest} is a directory")

    path = local_path(source)
    if path is not None:
        _copy_local(source, path, dest, pin)
        return dest

    last_problem = "no attempt made"
    for attempt in range(retries + 1):
        try:
            _attempt_http(source, dest, pin=pin, timeout=timeout, progress=progress)
            return dest
        except _RetryableError as exc:
            last_problem = str(exc)
            if attempt < retries:
                delay = backoff * 2**attempt
                log.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                    source,
                    attempt + 1,
                    retries + 1,
                    last_problem,
                    delay,
                )
                time.sleep(delay)
    raise DownloadError(f"{source}: failed after {retries + 1} attempt(s): {last_problem}")
