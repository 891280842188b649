"""A bounded JSON reader for files a user can hand a stage: one clear error, never a crash.

``json.loads`` alone raises ``RecursionError`` on deep nesting (``[[[[...`` 100,000
deep), ``ValueError`` on integers over Python's 4300-digit conversion limit, accepts
``NaN`` and ``Infinity`` (not JSON) and lets a repeated key silently overwrite the first.
:func:`read_json` and :func:`loads` check the text first and raise :class:`JSONError`, whose
message names the source and, where it can, the line and column:

* at most :data:`MAX_BYTES` bytes (read no further, so a FIFO or ``/dev/zero`` cannot hang
  or exhaust memory), strict UTF-8 (a leading BOM tolerated);
* nesting at most :data:`MAX_DEPTH` lists/objects deep;
* number literals at most :data:`MAX_NUMBER_CHARS` characters, finite when read, and no
  ``NaN``/``Infinity``;
* an object that repeats a key with a *different* value is kept (last value wins, as in
  ``json``) but is returned as a :class:`JSONObject` whose ``duplicate_keys`` say so, and
  the caller decides (``duplicates="error"`` makes conflicting repeats an error here).

What is returned is exactly what ``json.loads`` returns for the same text otherwise.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from typing import Any, Literal

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NUMBER_CHARS",
    "JSONError",
    "JSONObject",
    "duplicate_keys",
    "loads",
    "read_json",
]

MAX_BYTES = 256 * 1024 * 1024
MAX_DEPTH = 100
MAX_NUMBER_CHARS = 100

# A string (closed or not: an unclosed one runs to the end), a bracket, or a number literal.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]|-?[0-9][0-9.eE+-]*')


class JSONError(ValueError):
    """Unreadable or over-limit JSON; the message names the source and the place."""


class JSONObject(dict):  # type: ignore[type-arg]
    """A JSON object that repeated a key; ``duplicate_keys`` holds ``(key, same_value)``."""

    duplicate_keys: tuple[tuple[str, bool], ...] = ()


def duplicate_keys(value: Any) -> tuple[tuple[str, bool], ...]:
    """The repeated keys of a parsed object, ``(key, repeated with the same value)``; () if none."""
    return getattr(value, "duplicate_keys", ())


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {column}"


def _scan(text: str, source: str, max_depth: int, max_number_chars: int) -> None:
    """Check nesting depth and number lengths without recursion (strings are skipped)."""
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        first = token[0]
        if first in "[{":
            depth += 1
            if depth > max_depth:
                raise JSONError(
                    f"{source}: JSON nested more than {max_depth} levels deep at "
                    f"{_position(text, match.start())}"
                )
        elif first in "]}":
            depth = max(depth - 1, 0)
        elif first != '"' and len(token) > max_number_chars:
            raise JSONError(
                f"{source}: number of {len(token)} characters at "
                f"{_position(text, match.start())} (limit {max_number_chars}): "
                f"{token[:20]}..."
            )


def _decode(data: bytes, source: str) -> str:
    """Strict UTF-8 (a leading BOM is tolerated), reporting the first bad byte's offset."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise JSONError(
            f"{source}: not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
            f"({exc.reason})"
        ) from None


def loads(
    text: str,
    source: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_number_chars: int = MAX_NUMBER_CHARS,
    duplicates: Literal["record", "error"] = "record",
) -> Any:
    """Parse ``text`` (from ``source``, named in errors) within the limits; see the module doc."""
    if not text.strip():
        raise JSONError(f"{source}: file is empty")
    _scan(text, source, max_depth, max_number_chars)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        repeated: list[tuple[str, bool]] = []
        for key, value in items:
            if key in obj:
                same = obj[key] == value
                if duplicates == "error" and not same:
                    shown = key if len(key) <= 40 else key[:40] + "..."
                    raise JSONError(
                        f"{source}: an object repeats the key {shown!r} with different values"
                    )
                repeated.append((key, same))
            obj[key] = value
        if not repeated:
            return obj
        result = JSONObject(obj)
        result.duplicate_keys = tuple(repeated)
        return result

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise JSONError(f"{source}: number {literal[:20]!r} is out of range")
        return value

    def constant(name: str) -> Any:
        raise JSONError(f"{source}: {name} is not valid JSON (numbers must be finite)")

    try:
        return json.loads(
            text,
            object_pairs_hook=pairs,
            parse_float=number,
            parse_constant=constant,
        )
    except JSONError:
        raise
    except json.JSONDecodeError as exc:
        hint = " (unexpected end of file: truncated?)" if exc.pos >= len(text.rstrip()) else ""
        raise JSONError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}"
        ) from None
    except (RecursionError, ValueError) as exc:  # backstops: the scan should catch these
        raise JSONError(
            f"{source}: JSON beyond this reader's limits ({type(exc).__name__})"
        ) from None


def read_json(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_number_chars: int = MAX_NUMBER_CHARS,
    duplicates: Literal["record", "error"] = "record",
) -> Any:
    """Read a UTF-8 JSON file of at most ``max_bytes`` bytes; errors are :class:`JSONError`."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise JSONError(f"{source}: cannot read file: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise JSONError(f"{source}: file is larger than the limit of {max_bytes:,} bytes")
    return loads(
        _decode(data, source),
        source,
        max_depth=max_depth,
        max_number_chars=max_number_chars,
        duplicates=duplicates,
    )
