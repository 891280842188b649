"""Alpaca-style instruction data: loading, validation, prompt formatting and splitting.

Everything downstream (tokenisation, training, evaluation) trusts what this module returns,
so bad input is rejected here with a message naming the file, the entry and the field,
rather than surfacing later as a cryptic tensor or tokenizer error.

Files are read with :mod:`gpt2_instruct.safe_json` (size, nesting-depth and number-length
limits). Suspicious data is decided per case, so nothing is silently lost:

* errors (the stage stops, one line naming the file, the entry and the field): a field
  repeated in one entry with different values (JSON would keep only the last); a key that
  differs from ``instruction``, ``input`` or ``output`` only by case, whitespace, ``_``/``-``
  or one typo (``Input``, ``" output"``, ``inupt``: its text would be dropped); an
  ``instruction`` or ``output`` that is blank after normalisation (nothing left once
  whitespace, control characters such as U+0001 and invisible ones such as U+200B are
  removed);
* warnings (kept, printed on stderr by prepare and counted in ``metrics/prepare.json``,
  see :class:`DataWarning`): a key repeated with the same value (``duplicate_key``) and a
  non-empty ``input`` that is blank after normalisation (``blank_input``; kept as written,
  so the prompt still gets its ``### Input:`` section).
"""

from __future__ import annotations

import os
import random
import typing
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gpt2_instruct.io import write_json
from gpt2_instruct.safe_json import JSONError, duplicate_keys, read_json

__all__ = [
    "PROMPT_STYLES",
    "RESPONSE_EXTRACTIONS",
    "DataError",
    "DataWarning",
    "Entry",
    "PromptStyle",
    "ResponseExtraction",
    "Split",
    "extract_response",
    "find_duplicates",
    "format_example",
    "format_prompt",
    "is_blank",
    "load_entries",
    "overlap",
    "split_entries",
    "validate_entries",
    "write_entries",
]

# The choices are written once, as Literal types (params.py's types for the params.yaml
# keys tokenize.prompt_style and generate.response_extraction); the tuples derive from them.
PromptStyle = Literal["alpaca", "phi3"]
PROMPT_STYLES: tuple[str, ...] = typing.get_args(PromptStyle)
# How extract_response cuts an answer: the reference's replace-all (default) or leading only.
ResponseExtraction = Literal["reference", "leading"]
RESPONSE_EXTRACTIONS: tuple[str, ...] = typing.get_args(ResponseExtraction)

_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_ALPACA_RESPONSE_HEADER = "### Response:"
_PHI3_ASSISTANT_HEADER = "<|assistant|>"


class DataError(ValueError):
    """Invalid instruction data; the message names the file, the entry and the problem."""


@dataclass(frozen=True)
class DataWarning:
    """Suspicious but usable data: ``kind`` is ``duplicate_key`` or ``blank_input``."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


WARNING_KINDS: tuple[str, ...] = ("duplicate_key", "blank_input")
FIELDS: tuple[str, ...] = ("instruction", "input", "output")


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


# Code points that show nothing although Unicode does not class them as whitespace: the
# Default_Ignorable_Code_Point ranges (zero-width spaces and joiners, fillers, variation
# selectors, tags) and the blank Braille pattern. Control (Cc), format (Cf) and separator
# (Z*) characters are found by category.
_INVISIBLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x2800, 0x2800), (0x3164, 0x3164), (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)  # fmt: skip


def _invisible(char: str) -> bool:
    if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
        return True
    code = ord(char)
    return any(low <= code <= high for low, high in _INVISIBLE_RANGES)


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: only whitespace, control and invisible characters."""
    return all(_invisible(char) for char in text)


def _key_shape(key: str) -> str:
    """A key without case, invisible characters, ``_``, ``-`` or spaces, to spot near misses."""
    return "".join(c for c in key.casefold() if not _invisible(c) and c not in "_-")


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether one insertion, deletion, substitution or swap of neighbours turns a into b."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diffs) == 1 or (
            len(diffs) == 2 and diffs[1] == diffs[0] + 1 and a[diffs[0]] == b[diffs[1]]
            and a[diffs[1]] == b[diffs[0]]
        )  # fmt: skip
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _near_miss(key: str) -> str | None:
    """The field ``key`` was probably meant to be (``Input``, ``" output"``, ``inupt``)."""
    if key in FIELDS or len(key) > 40:
        return None
    shape = _key_shape(key)
    for field in FIELDS:
        if shape == field or _one_edit_apart(shape, field):
            return field
    return None


def _shown(key: str) -> str:
    return repr(key if len(key) <= 40 else key[:40] + "...")


def _check_keys(item: dict[str, Any], where: str, warnings: list[DataWarning] | None) -> None:
    """Reject near-miss field names and conflicting repeated keys; warn on harmless repeats."""
    for key in item:
        expected = _near_miss(key)
        if expected is not None:
            raise DataError(
                f"{where}: field {_shown(key)} looks like a misspelt {expected!r} (names must "
                "match exactly, case included): as written its text would be ignored"
            )
    for key, same in duplicate_keys(item):
        if not same and key in FIELDS:
            raise DataError(
                f"{where}: field {_shown(key)} appears more than once with different values "
                "(JSON keeps only the last)"
            )
        if warnings is not None:
            what = "the same value" if same else "different values (an ignored field)"
            warnings.append(
                DataWarning("duplicate_key", f"{where}: field {_shown(key)} repeated with {what}")
            )


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
    if is_blank(value):
        raise DataError(
            f"{where}: field {field!r} must be a non-empty string, got only invisible "
            f"characters (whitespace, control or zero-width, e.g. U+{ord(value.strip()[0]):04X})"
        )
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


def validate_entries(
    raw: Any, source: str | os.PathLike[str], warnings: list[DataWarning] | None = None
) -> list[Entry]:
    """Turn parsed JSON into entries, or raise DataError naming ``source`` and the entry.

    ``instruction`` and ``output`` must be non-blank strings; ``input`` may be missing or
    null (both mean ""). Unknown extra keys are ignored so richer Alpaca variants load,
    unless they look like a misspelt field (see the module doc, which also says what is an
    error and what a warning). Warnings are appended to ``warnings`` when it is given.
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
        _check_keys(item, where, warnings)
        entry = Entry(
            instruction=_required_text(item, "instruction", where),
            input=_optional_text(item, "input", where),
            output=_required_text(item, "output", where),
        )
        if entry.input and is_blank(entry.input) and warnings is not None:
            warnings.append(
                DataWarning(
                    "blank_input",
                    f"{where}: field 'input' is blank (only whitespace, control or zero-width "
                    "characters) but not empty: kept, so the prompt has an empty-looking "
                    "### Input: section",
                )
            )
        entries.append(entry)
    return entries


def load_entries(
    path: str | os.PathLike[str], warnings: list[DataWarning] | None = None
) -> list[Entry]:
    """Read and validate a UTF-8 JSON list of Alpaca-style entries.

    Every problem (unreadable, empty, too large, not UTF-8, malformed or truncated JSON,
    nested too deep, absurdly long numbers, wrong shape, bad fields) raises DataError naming
    the file, plus the byte offset, line/column or ``entry N`` and field as applicable.
    Suspicious but usable data is appended to ``warnings`` (see the module doc). Text
    containing ``<|endoftext|>`` is accepted: it is treated as plain text downstream
    (tokenised as ordinary characters, never as GPT-2's end-of-text token), so it cannot
    truncate an example.
    """
    source = os.fspath(path)
    try:
        raw = read_json(path)
    except JSONError as err:
        raise DataError(str(err)) from None
    return validate_entries(raw, source, warnings)


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


def extract_response(generated_text: str, style: str = "alpaca", mode: str = "reference") -> str:
    """The answer in a generated continuation (the text after the prompt).

    The style's response header ("### Response:" for alpaca, "<|assistant|>" for phi3),
    which a model may repeat, is removed and surrounding whitespace stripped:

    * ``mode="reference"`` (default) is the reference's
      ``.replace("### Response:", "").strip()``: every occurrence of the header goes,
      wherever it is, then the whitespace around the result;
    * ``mode="leading"`` strips, drops one leading header and strips again, keeping headers
      inside the answer as part of what the model said.
    """
    _check_style(style)
    if mode not in RESPONSE_EXTRACTIONS:
        valid = ", ".join(repr(m) for m in RESPONSE_EXTRACTIONS)
        raise ValueError(f"unknown response extraction {mode!r}; valid modes: {valid}")
    header = _ALPACA_RESPONSE_HEADER if style == "alpaca" else _PHI3_ASSISTANT_HEADER
    if mode == "reference":
        return generated_text.replace(header, "").strip()
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
