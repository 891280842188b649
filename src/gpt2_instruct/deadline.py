"""A deadline for HTTP requests made with ``requests``, and URLs without their credentials.

``requests``' ``timeout`` bounds each connect and each socket read, so a server that
sends a byte every few seconds, or trickles its TLS handshake or its headers, is never
timed out. A :class:`Watchdog` bounds the whole of whatever runs under it: it keeps a
duplicate of every socket that the calling thread's :func:`watched_session` requests
use (opened, or reused from the pool, while it runs) and shuts them all down when its
time is up, so a blocked read or write returns at once, whatever phase it is in. The
caller then sees a connection error and asks :attr:`Watchdog.expired` whether the
deadline was the cause. Used by ``gpt2_instruct.download`` (one watchdog a fetch, retries
included) and ``gpt2_instruct.judge`` (one a request).

Plain HTTP proxies are watched too; SOCKS proxies keep their own connection pools, so
there only the caller's checks between reads apply.

:func:`redact` removes the ``user:password@`` of every URL in a text, for messages.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from types import TracebackType
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import ProxyManager

__all__ = ["Watchdog", "redact", "watched_session"]

# The userinfo of any URL in a text: scheme://user:password@host -> scheme://***@host.
_USERINFO_RE = re.compile(r"(?<=://)[^/?#\s]*@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``."""
    return _USERINFO_RE.sub("***@", text)


_active = threading.local()  # the innermost watchdog running in this thread


class Watchdog:
    """Shuts down the sockets of the calling thread's requests once ``seconds`` have passed.

    Use as a context manager around the requests it bounds. Sockets are registered from
    the thread that entered it (see :func:`watched_session`); the timer fires in another.
    A socket registered after the time is up is shut down at once.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._previous: Watchdog | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.end - time.monotonic()

    def passed(self) -> bool:
        """Whether the deadline has passed (the timer fired, or is about to)."""
        return self.expired or self.remaining() <= 0

    def register(self, sock: socket.socket | None) -> None:
        """Watch ``sock`` (through a duplicate, which stays valid when TLS wraps it)."""
        if sock is None:
            return
        try:
            # A plain socket object on a new descriptor, also for an SSLSocket (whose
            # dup() is not implemented): its shutdown() ends the byte stream for every
            # reader of the connection without touching the TLS state of the original.
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type, sock.proto)
        except (OSError, ValueError, AttributeError):  # closed, or not a socket (TLS in TLS:
            return  # its socket underneath was registered when it was opened)
        with self._lock:
            self._sockets.append(dup)
            if not self.expired:
                return
        _shutdown(dup)

    def release(self) -> None:
        """Close the duplicates registered so far (their requests are done with)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def __enter__(self) -> Watchdog:
        self._previous = getattr(_active, "watchdog", None)
        _active.watchdog = self
        self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        _active.watchdog = self._previous
        self.release()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _register(sock: socket.socket | None) -> None:
    watchdog = getattr(_active, "watchdog", None)
    if watchdog is not None:
        watchdog.register(sock)


# The sockets are found through urllib3's connection classes: a new one as soon as it is
# opened (before any proxy tunnel or TLS handshake), and the current one of a connection
# before each request is sent on it (a kept-alive connection from the pool, opened under
# an earlier watchdog or none).


class _Watched:
    """Registers a connection's socket when it opens and before each request on it."""

    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        _register(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self.sock)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}
# Messages quote these classes' names ('HTTPConnectionPool(host=...)'): keep urllib3's.
for _cls in (*_WATCHED_POOLS.values(), _WatchedHTTPConnection, _WatchedHTTPSConnection):
    _cls.__name__ = _cls.__qualname__ = _cls.__name__.removeprefix("_Watched")
del _cls


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter, with connections (direct or through an HTTP proxy) watched."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_WATCHED_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is ProxyManager:  # SOCKS keeps its own pools: checked between reads
            manager.pool_classes_by_scheme = dict(_WATCHED_POOLS)
        return manager


def watched_session() -> requests.Session:
    """A ``requests.Session`` whose http(s) requests the thread's :class:`Watchdog` bounds."""
    session = requests.Session()
    adapter = _WatchedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
