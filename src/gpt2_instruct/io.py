"""Atomic file output, stale-temp cleanup and hashing.

Every output that DVC may cache is written through these helpers: data go to a
temporary file (or directory) in the destination's directory and are renamed into place
only when complete, so an interrupted stage never leaves a half-written file behind.

Temporaries are named ``.<name>.<8 characters>.tmp`` beside ``<name>``. A process that is
killed (SIGKILL, SIGTERM, power loss) cannot remove its own, so every stage calls
:func:`remove_stale_temps` on its paths before it starts. They are created with the
modes an ordinary ``open``/``mkdir`` would give (files ``0o666 & ~umask``, directories
``0o777 & ~umask``), not ``tempfile``'s private 0600/0700, so outputs can be shared
(a group-writable DVC cache, other users).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_path",
    "is_temp_name",
    "remove_stale_temps",
    "sha256_file",
    "write_json",
]

_TEMP_SUFFIX = ".tmp"
_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile's alphabet
_TOKEN_LEN = 8
_TOKEN_RE = rf"[{_TOKEN_CHARS}]{{{_TOKEN_LEN}}}"
# Any temporary this module makes (or tempfile.mkstemp made with our prefix and suffix).
_ANY_TEMP_RE = re.compile(rf"\..+\.{_TOKEN_RE}{re.escape(_TEMP_SUFFIX)}")


def _temp_re(name: str) -> re.Pattern[str]:
    """The temporaries of one output named ``name`` (plus the old ``.name.old`` backup)."""
    escaped = re.escape(name)
    return re.compile(rf"\.{escaped}\.{_TOKEN_RE}{re.escape(_TEMP_SUFFIX)}|\.{escaped}\.old")


def is_temp_name(name: str, output: str | None = None) -> bool:
    """True if ``name`` is one of our temporaries (of ``output`` when given)."""
    pattern = _ANY_TEMP_RE if output is None else _temp_re(output)
    return pattern.fullmatch(name) is not None


def _new_temp(dest: Path, *, directory: bool) -> Path:
    """Create an empty temporary file or directory beside ``dest``, honouring the umask."""
    for _ in range(100):
        token = "".join(secrets.choice(_TOKEN_CHARS) for _ in range(_TOKEN_LEN))
        tmp = dest.with_name(f".{dest.name}.{token}{_TEMP_SUFFIX}")
        try:
            if directory:
                os.mkdir(tmp, 0o777)  # the kernel applies the umask, as for any mkdir
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{dest}: no free temporary name beside it after 100 tries")


def _perms(path: Path) -> int:
    """The rwx bits of ``path`` (a new temporary's are what the umask allows)."""
    return os.lstat(path).st_mode & 0o777


def _set_perms(path: str | Path, perms: int) -> None:
    """Give ``path`` the rwx bits ``perms``, keeping setgid and the like; links untouched.

    Writers that replace our temporary by their own (safetensors writes a private 0600
    file and renames it over ours) would otherwise leave their mode on the output.
    """
    st = os.lstat(path)
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o777 != perms:
        os.chmod(path, (stat.S_IMODE(st.st_mode) & ~0o777) | perms)


def _remove(path: Path) -> None:
    """Remove a file, a link or a whole directory tree (links are never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale_temps(*outputs: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries left beside (and directly inside) ``outputs`` by killed runs.

    Beside each output only its own temporaries go (``.<name>.<8 chars>.tmp`` and the old
    ``.<name>.old``); inside an output directory (written in place, such as a checkpoint
    directory) any of our temporaries. Call it before a stage's work starts: a temporary
    there can only be a leftover, as DVC never runs two stages on one workspace at once.
    Best effort: what cannot be removed stays. Returns what was removed.
    """
    removed: list[Path] = []
    for output in outputs:
        out = Path(output)
        candidates: list[Path] = []
        if out.name:
            own = _temp_re(out.name)
            with contextlib.suppress(OSError):
                candidates += [p for p in out.parent.iterdir() if own.fullmatch(p.name)]
        if out.is_dir() and not out.is_symlink():
            with contextlib.suppress(OSError):
                candidates += [p for p in out.iterdir() if _ANY_TEMP_RE.fullmatch(p.name)]
        for path in candidates:
            try:
                _remove(path)
            except FileNotFoundError:
                continue
            except OSError:
                continue  # e.g. no permission: leave it, the stage may still succeed
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` on success.

    The temporary file exists (empty, mode ``0o666 & ~umask``) when yielded; write to it by
    name. ``dest`` gets that mode even if the writer replaced the file by one of its own.
    On any exception the temporary is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(dest, directory=False)
    perms = _perms(tmp)
    try:
        yield tmp
        _set_perms(tmp, perms)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(dest: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``dest`` when closed cleanly."""
    if mode not in {"w", "wb"}:
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    with atomic_path(dest) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_json(dest: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as UTF-8 JSON, atomically."""
    with atomic_open(dest) as handle:
        json.dump(obj, handle, indent=indent, ensure_ascii=False)
        handle.write("\n")


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces the directory ``dest`` on success.

    ``dest`` gets mode ``0o777 & ~umask``, and everything in it the same (files without
    the x bits), whatever wrote them. On any exception the temporary directory is removed
    with all it holds and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(dest, directory=True)
    perms = _perms(tmp)
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):  # whatever wrote them: the umask's modes
            for name in dirs:
                _set_perms(os.path.join(root, name), perms)
            for name in files:
                _set_perms(os.path.join(root, name), perms & 0o666)
        if dest.exists() or dest.is_symlink():
            # Move the old output aside under a temporary name (cleaned up by the next
            # stage if we are killed right here), then put the new one in place.
            old = _new_temp(dest, directory=True)
            old.rmdir()
            os.replace(dest, old)
            os.replace(tmp, dest)
            with contextlib.suppress(OSError):
                _remove(old)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large weights need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
