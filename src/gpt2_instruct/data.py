"""Alpaca-style instruction data: loading, validation, prompt formatting and splitting.

Everything downstream (tokenisation, training, evaluation) trusts what this module returns,
so bad input is rejected here with a message naming the file, the entry and the field,
rather than surfacing later as a cryptic tensor or tokenizer error.
"""

from __future__ import annotations

import codecs
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_instruct.io import write_json

__all__ = [
    "PROMPT_STYLES",
    "DataError",
    "Entry",
    "Split",
    "extract_response",
    "find_duplicates",
    "format_example",
    "format_prompt",
    "load_entries",
    "overlap",
    "split_entries",
    "validate_entries",
    "write_entries",
]

PROMPT_STYLES: tuple[str, ...] = ("alpaca", "phi3")

_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_ALPACA_RESPONSE_HEADER = "### Response:"
_PHI3_ASSISTANT_HEADER = "<|assistant|>"


class DataError(ValueError):
    """Invalid instruction data; the message names the file, the entry and the problem."""


@dataclass(frozen=True)
class Entry:
    """One instruction example; ``input`` is "" when the example has no extra context."""

    instruction: str
    input: str
    output: str

    def to_dict(self) -> dict[str, str]:
        """The JSON form written by :func:`write_entries` (always with all three keys)."""
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


SPLITS = ("train", "val", "test")
"""The partitions' names, in the order the reference cuts them (as ``Split``'s fields)."""


@dataclass
class Split:
    """Train / validation / test partitions of one data set."""

    train: list[Entry]
    val: list[Entry]
    test: list[Entry]

    def sizes(self) -> dict[str, int]:
        """Partition sizes, for logs and metrics files."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# --- loading and validation ----------------------------------------------------------------


def _json_type(value: Any) -> str:
    """Name a parsed JSON value's type the way a data author thinks of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _check_encodable(where: str, field: str, value: str) -> None:
    """Reject lone surrogates (from \\ud800-style escapes): they cannot be written or tokenised."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: field {field!r} contains an unpaired surrogate "
            f"{value[exc.start]!r} at character {exc.start}"
        ) from None


def _required_text(item: dict[str, Any], field: str, where: str) -> str:
    """A field that must be a non-blank string (instruction, output)."""
    if field not in item:
        raise DataError(f"{where}: missing required field {field!r}")
    value = item[field]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} must be a non-empty string, got {_json_type(value)}"
        )
    if not value.strip():
        what = "an empty string" if value == "" else "a whitespace-only string"
        raise DataError(f"{where}: field {field!r} must be a non-empty string, got {what}")
    _check_encodable(where, field, value)
    return value


def _optional_text(item: dict[str, Any], field: str, where: str) -> str:
    """A field that may be missing or null (both mean "") but otherwise must be a string."""
    value = item.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} must be a string or null, got {_json_type(value)}"
        )
    _check_encodable(where, field, value)
    return value


def validate_entries(raw: Any, source: str | os.PathLike[str]) -> list[Entry]:
    """Turn parsed JSON into entries, or raise DataError naming ``source`` and the entry.

    ``instruction`` and ``output`` must be non-blank strings; ``input`` may be missing or
    null (both mean ""). Unknown extra keys are ignored so richer Alpaca variants load.
    Strings are kept exactly as written (no stripping), so prompts are reproducible.
    """
    source = os.fspath(source)
    if not isinstance(raw, list):
        raise DataError(
            f"{source}: top level must be a JSON list of entries, got {_json_type(raw)}"
        )
    if not raw:
        raise DataError(f"{source}: contains no entries (empty list)")
    entries: list[Entry] = []
    for index, item in enumerate(raw):
        where = f"{source}: entry {index}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: must be a JSON object, got {_json_type(item)}")
        entries.append(
            Entry(
                instruction=_required_text(item, "instruction", where),
                input=_optional_text(item, "input", where),
                output=_required_text(item, "output", where),
            )
        )
    return entries


def _decode(data: bytes, source: str) -> str:
    """Strict UTF-8 (a leading BOM is tolerated), reporting the first bad byte's offset."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise DataError(
            f"{source}: not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
            f"({exc.reason})"
        ) from None


def load_entries(path: str | os.PathLike[str]) -> list[Entry]:
    """Read and validate a UTF-8 JSON list of Alpaca-style entries.

    Every problem (unreadable, empty, not UTF-8, malformed or truncated JSON, wrong shape,
    bad fields) raises DataError naming the file, plus the byte offset, line/column or
    ``entry N`` and field as applicable. Text containing ``<|endoftext|>`` is accepted: it is
    treated as plain text downstream (tokenised as ordinary characters, never as GPT-2's
    end-of-text token), so it cannot truncate an example.
    """
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot read file: {exc.strerror or exc}") from exc
    text = _decode(data, source)
    if not text.strip():
        raise DataError(f"{source}: file is empty")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (unexpected end of file: truncated?)" if exc.pos >= len(text.rstrip()) else ""
        raise DataError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}"
        ) from None
    return validate_entries(raw, source)


def write_entries(path: str | os.PathLike[str], entries: Iterable[Entry]) -> None:
    """Write entries atomically as a JSON list readable by :func:`load_entries`."""
    write_json(path, [entry.to_dict() for entry in entries], indent=1)


# --- prompt formatting ---------------------------------------------------------------------


def _check_style(style: str) -> None:
    """Fail early and helpfully on a misspelt style from a params file."""
    if style not in PROMPT_STYLES:
        valid = ", ".join(repr(s) for s in PROMPT_STYLES)
        raise ValueError(f"unknown prompt style {style!r}; valid styles: {valid}")


def format_prompt(entry: Entry, style: str = "alpaca") -> str:
    """The model input for ``entry``: everything up to and including the response header.

    The alpaca template is byte-identical to the reference (LLMs-from-scratch ch07), so
    results stay comparable; ``input`` sections are omitted when the input is empty.
    """
    _check_style(style)
    if style == "alpaca":
        input_text = f"\n\n### Input:\n{entry.input}" if entry.input else ""
        return (
            f"{_ALPACA_PREAMBLE}\n\n### Instruction:\n{entry.instruction}"
            f"{input_text}\n\n{_ALPACA_RESPONSE_HEADER}\n"
        )
    input_text = f"\n{entry.input}" if entry.input else ""
    return f"<|user|>\n{entry.instruction}{input_text}\n{_PHI3_ASSISTANT_HEADER}\n"


def format_example(entry: Entry, style: str = "alpaca") -> str:
    """The full training text: the prompt followed by the expected output."""
    return format_prompt(entry, style) + entry.output


def extract_response(generated_text: str, style: str = "alpaca") -> str:
    """The answer in a generated continuation (the text after the prompt).

    Surrounding whitespace is stripped, as is a leading response header the model may
    repeat ("### Response:" for alpaca, "<|assistant|>" for phi3), matching the reference's
    ``.replace("### Response:", "").strip()`` for the usual case where the header leads.
    Headers inside the answer are kept: they are part of what the model said.
    """
    _check_style(style)
    header = _ALPACA_RESPONSE_HEADER if style == "alpaca" else _PHI3_ASSISTANT_HEADER
    text = generated_text.strip()
    if text.startswith(header):
        text = text[len(header) :].strip()
    return text


# --- splitting and reporting ---------------------------------------------------------------


def split_entries(
    entries: Sequence[Entry],
    *,
    train_fraction: float = 0.85,
    test_fraction: float = 0.10,
    shuffle: bool = False,
    seed: int = 123,
) -> Split:
    """Split like the reference: first ``int(n*train)`` train, next ``int(n*test)`` test, rest val.

    File order is kept unless ``shuffle``, which shuffles a copy with ``random.Random(seed)``
    so the split is reproducible. Raises ValueError for fractions outside (0, 1), fractions
    summing above 1, or any partition that would come out empty.
    """
    for name, value in (("train_fraction", train_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
    if train_fraction + test_fraction > 1.0 + 1e-9:
        raise ValueError(
            f"train_fraction + test_fraction must not exceed 1, got "
            f"{train_fraction} + {test_fraction} = {train_fraction + test_fraction}"
        )
    items = list(entries)
    if shuffle:
        random.Random(seed).shuffle(items)
    n = len(items)
    n_train = int(n * train_fraction)
    n_test = int(n * test_fraction)
    split = Split(
        train=items[:n_train],
        test=items[n_train : n_train + n_test],
        val=items[n_train + n_test :],
    )
    empty = [name for name, size in split.sizes().items() if size == 0]
    if empty:
        raise ValueError(
            f"splitting {n} entries with train_fraction={train_fraction}, "
            f"test_fraction={test_fraction} leaves {' and '.join(empty)} empty "
            f"(sizes {split.sizes()}); use more data or other fractions"
        )
    return split


def find_duplicates(entries: Sequence[Entry]) -> list[tuple[int, int]]:
    """Pairs ``(first, later)`` of indices of identical entries, for data-quality reports.

    Each repeat is paired with the first occurrence only, so k copies give k-1 pairs.
    """
    first_seen: dict[Entry, int] = {}
    pairs: list[tuple[int, int]] = []
    for index, entry in enumerate(entries):
        first = first_seen.setdefault(entry, index)
        if first != index:
            pairs.append((first, index))
    return pairs


def overlap(a: Iterable[Entry], b: Iterable[Entry]) -> int:
    """How many entries of ``b`` share instruction and input with some entry of ``a``.

    Used to report train/test leakage; the output is ignored because the same prompt with a
    different answer is still leaked.
    """
    prompts = {(entry.instruction, entry.input) for entry in a}
    return sum((entry.instruction, entry.input) in prompts for entry in b)
