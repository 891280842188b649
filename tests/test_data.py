"""Tests for gpt2_instruct.data: validation messages, prompt templates and splitting."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_instruct.data import (
    PROMPT_STYLES,
    DataError,
    Entry,
    extract_response,
    find_duplicates,
    format_example,
    format_prompt,
    load_entries,
    overlap,
    split_entries,
    validate_entries,
    write_entries,
)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/instruction-data.json"

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


def write_raw(tmp_path: Path, content: str | bytes, name: str = "data.json") -> Path:
    """Write a test file (str as UTF-8, bytes verbatim) and return its path."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def write_list(tmp_path: Path, items: list[Any]) -> Path:
    return write_raw(tmp_path, json.dumps(items))


def make_entries(n: int) -> list[Entry]:
    return [
        Entry(f"instruction {i}", f"input {i}" if i % 2 else "", f"output {i}") for i in range(n)
    ]


# --- file-level errors ---------------------------------------------------------------------


def test_load_good_file(tmp_path: Path) -> None:
    path = write_list(tmp_path, [GOOD, {**GOOD, "input": "ctx", "extra": [1, 2], "id": 7}])
    assert load_entries(path) == [Entry("Say hi.", "", "hi"), Entry("Say hi.", "ctx", "hi")]
    assert load_entries(str(path)) == load_entries(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(DataError, match="cannot read") as info:
        load_entries(path)
    assert str(path) in str(info.value)


def test_non_utf8_reports_byte_offset(tmp_path: Path) -> None:
    good = json.dumps([GOOD]).encode()
    cut = good.index(b"hi.")
    path = write_raw(tmp_path, good[:cut] + b"\xff" + good[cut:])
    with pytest.raises(DataError) as info:
        load_entries(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    assert "UTF-8" in msg and f"byte offset {cut}" in msg and "0xff" in msg


def test_latin1_file_rejected(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path, json.dumps([{**GOOD, "output": "café"}], ensure_ascii=False).encode("latin-1")
    )
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_entries(path)


def test_utf8_bom_tolerated(tmp_path: Path) -> None:
    path = write_raw(tmp_path, b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert load_entries(path) == [Entry("Say hi.", "", "hi")]


@pytest.mark.parametrize("content", ["", "  \n\t"], ids=["empty", "whitespace"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = write_raw(tmp_path, content)
    with pytest.raises(DataError, match="file is empty") as info:
        load_entries(path)
    assert str(path) in str(info.value)


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path, '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": oops}\n]'
    )
    with pytest.raises(DataError) as info:
        load_entries(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid JSON at line 3, column 19")


def test_truncated_json(tmp_path: Path) -> None:
    text = json.dumps([GOOD, GOOD], indent=1)
    path = write_raw(tmp_path, text[: len(text) // 2])
    with pytest.raises(DataError, match=r"invalid JSON at line \d+, column \d+.*truncated") as info:
        load_entries(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "got"),
    [('{"instruction": "a", "output": "b"}', "object"), ('"text"', "string"), ("3", "int")],
)
def test_top_level_not_a_list(tmp_path: Path, content: str, got: str) -> None:
    path = write_raw(tmp_path, content)
    with pytest.raises(DataError, match=f"top level must be a JSON list of entries, got {got}"):
        load_entries(path)


def test_empty_list(tmp_path: Path) -> None:
    path = write_raw(tmp_path, "[]")
    with pytest.raises(DataError, match="no entries") as info:
        load_entries(path)
    assert str(path) in str(info.value)


# --- entry-level errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "field", "problem"),
    [
        ("not an object", None, "must be a JSON object, got string"),
        (["a", "b"], None, "must be a JSON object, got list"),
        (None, None, "must be a JSON object, got null"),
        ({"output": "b"}, "instruction", "missing required field 'instruction'"),
        ({"instruction": "a"}, "output", "missing required field 'output'"),
        ({**GOOD, "instruction": ""}, "instruction", "non-empty string, got an empty string"),
        ({**GOOD, "instruction": " \n"}, "instruction", "non-empty string, got a whitespace-only"),
        ({**GOOD, "instruction": None}, "instruction", "non-empty string, got null"),
        ({**GOOD, "instruction": ["a"]}, "instruction", "non-empty string, got list"),
        ({**GOOD, "output": ""}, "output", "non-empty string, got an empty string"),
        ({**GOOD, "output": 12}, "output", "non-empty string, got int"),
        ({**GOOD, "output": True}, "output", "non-empty string, got bool"),
        ({**GOOD, "output": {"a": 1}}, "output", "non-empty string, got object"),
        ({**GOOD, "input": 3.5}, "input", "must be a string or null, got float"),
        ({**GOOD, "input": ["x"]}, "input", "must be a string or null, got list"),
    ],
)
def test_bad_entry_names_file_entry_and_field(
    tmp_path: Path, bad: Any, field: str | None, problem: str
) -> None:
    path = write_list(tmp_path, [GOOD] * 12 + [bad, GOOD])
    with pytest.raises(DataError) as info:
        load_entries(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: entry 12: ")
    assert problem in msg
    if field is not None:
        assert repr(field) in msg


def test_error_message_format_matches_spec() -> None:
    with pytest.raises(DataError) as info:
        validate_entries([GOOD, {**GOOD, "output": 5}], "data/raw/x.json")
    assert str(info.value) == (
        "data/raw/x.json: entry 1: field 'output' must be a non-empty string, got int"
    )


def test_lone_surrogate_rejected(tmp_path: Path) -> None:
    path = write_raw(tmp_path, '[{"instruction": "a", "output": "bad \\ud800 text"}]')
    with pytest.raises(DataError, match=r"entry 0: field 'output' contains an unpaired surrogate"):
        load_entries(path)


def test_input_missing_or_null_means_empty(tmp_path: Path) -> None:
    path = write_list(
        tmp_path,
        [{"instruction": "a", "output": "b"}, {"instruction": "a", "input": None, "output": "b"}],
    )
    assert [e.input for e in load_entries(path)] == ["", ""]


def test_endoftext_is_plain_text(tmp_path: Path) -> None:
    item = {"instruction": "Repeat <|endoftext|>", "input": "", "output": "<|endoftext|>"}
    assert load_entries(write_list(tmp_path, [item])) == [Entry(**item)]


def test_write_entries_round_trip_and_format(tmp_path: Path) -> None:
    entries = [Entry("Übersetze", "naïve — 日本", "ok"), Entry("b", "", "c")]
    path = tmp_path / "out" / "train.json"
    write_entries(path, entries)
    text = path.read_text(encoding="utf-8")
    assert "日本" in text  # ensure_ascii=False
    assert text.startswith('[\n {\n  "instruction": "Übersetze",\n  "input": ')
    assert load_entries(path) == entries
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.json"]


# --- prompts -------------------------------------------------------------------------------


def test_alpaca_prompt_with_input_is_byte_exact() -> None:
    entry = Entry("Convert to passive voice.", "The cat chased the mouse.", "The mouse was chased.")
    expected_prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nConvert to passive voice.\n\n"
        "### Input:\nThe cat chased the mouse.\n\n### Response:\n"
    )
    assert format_prompt(entry) == expected_prompt
    assert format_prompt(entry, "alpaca") == expected_prompt
    assert format_example(entry, "alpaca") == expected_prompt + "The mouse was chased."


def test_alpaca_prompt_without_input_is_byte_exact() -> None:
    entry = Entry("Name a primary color.", "", "Red.")
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a primary color.\n\n"
        "### Response:\nRed."
    )
    assert format_example(entry) == expected


def test_phi3_prompt() -> None:
    with_input = Entry("Translate to German.", "Good morning", "Guten Morgen")
    assert format_prompt(with_input, "phi3") == (
        "<|user|>\nTranslate to German.\nGood morning\n<|assistant|>\n"
    )
    assert format_example(with_input, "phi3") == (
        "<|user|>\nTranslate to German.\nGood morning\n<|assistant|>\nGuten Morgen"
    )
    assert (
        format_example(Entry("Say hi.", "", "hi"), "phi3") == "<|user|>\nSay hi.\n<|assistant|>\nhi"
    )


@pytest.mark.parametrize("func", [format_prompt, format_example, extract_response])
def test_unknown_style(func: Any) -> None:
    arg = Entry("a", "", "b") if func is not extract_response else "text"
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'") as info:
        func(arg, "chatml")
    for style in PROMPT_STYLES:
        assert repr(style) in str(info.value)


@pytest.mark.parametrize(
    ("generated", "style", "expected"),
    [
        ("The answer.\n", "alpaca", "The answer."),
        ("\n\n### Response:\n  The answer. \n", "alpaca", "The answer."),
        ("### Response:The answer.", "alpaca", "The answer."),
        ("The answer.\n### Response: kept", "alpaca", "The answer.\n### Response: kept"),
        ("  The answer.  ", "phi3", "The answer."),
        ("<|assistant|>\nThe answer.", "phi3", "The answer."),
        ("\n\n", "alpaca", ""),
    ],
)
def test_extract_response(generated: str, style: str, expected: str) -> None:
    assert extract_response(generated, style) == expected


def test_extract_response_matches_reference_on_continuation() -> None:
    entry = Entry("Name a primary color.", "", "Red.")
    # The reference strips the prompt without its header, then removes the header.
    reference_prompt = format_prompt(entry).removesuffix("\n\n### Response:\n")
    generated = format_example(entry) + "\n"
    reference = generated[len(reference_prompt) :].replace("### Response:", "").strip()
    assert extract_response(generated[len(reference_prompt) :]) == reference == "Red."
    assert extract_response(generated[len(format_prompt(entry)) :]) == "Red."


# --- splitting -----------------------------------------------------------------------------


def test_split_sizes_match_reference() -> None:
    entries = make_entries(1100)
    split = split_entries(entries)
    assert split.sizes() == {"train": 935, "val": 55, "test": 110}
    # File order: train, then test, then val.
    assert split.train == entries[:935]
    assert split.test == entries[935:1045]
    assert split.val == entries[1045:]


def test_seeded_shuffle_is_deterministic() -> None:
    entries = make_entries(200)
    a = split_entries(entries, shuffle=True, seed=7)
    b = split_entries(entries, shuffle=True, seed=7)
    c = split_entries(entries, shuffle=True, seed=8)
    assert a == b
    assert a.train != entries[: len(a.train)]
    assert a.train != c.train
    assert sorted(a.train + a.val + a.test, key=entries.index) == entries
    assert entries == make_entries(200)  # input untouched


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_fraction": 0.0}, "train_fraction must be strictly between 0 and 1"),
        ({"train_fraction": 1.0}, "train_fraction must be strictly between 0 and 1"),
        ({"test_fraction": -0.1}, "test_fraction must be strictly between 0 and 1"),
        ({"test_fraction": float("nan")}, "test_fraction must be strictly between 0 and 1"),
        ({"train_fraction": 0.9, "test_fraction": 0.2}, "must not exceed 1"),
        ({"train_fraction": 0.9, "test_fraction": 0.1}, "leaves val empty"),
    ],
)
def test_split_rejects_bad_fractions(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_entries(make_entries(100), **kwargs)


def test_split_rejects_too_few_entries() -> None:
    with pytest.raises(ValueError, match=r"splitting 5 entries .* leaves test empty"):
        split_entries(make_entries(5))
    with pytest.raises(ValueError, match="leaves train and val and test empty"):
        split_entries([])


def test_split_real_file() -> None:
    if not REAL_DATA.is_file():
        pytest.skip(f"{REAL_DATA} not present")
    entries = load_entries(REAL_DATA)
    raw = json.loads(REAL_DATA.read_text(encoding="utf-8"))
    split = split_entries(entries)
    assert (len(split.train), len(split.test), len(split.val)) == (935, 110, 55)
    assert split.train[0].instruction == raw[0]["instruction"]
    assert split.val[-1].instruction == raw[-1]["instruction"]


# --- reporting -----------------------------------------------------------------------------


def test_find_duplicates_and_overlap() -> None:
    a, b, c = Entry("a", "", "x"), Entry("b", "i", "y"), Entry("a", "", "other answer")
    assert find_duplicates([a, b, a, c, a, b]) == [(0, 2), (0, 4), (1, 5)]
    assert find_duplicates([a, b, c]) == []
    assert overlap([a, b], [c, Entry("b", "", "y"), b]) == 2
    assert overlap([], [a]) == 0


# --- properties ----------------------------------------------------------------------------

nonblank = st.text(min_size=1).filter(lambda s: s.strip() != "")
raw_entry = st.fixed_dictionaries(
    {"instruction": nonblank, "output": nonblank},
    optional={"input": st.one_of(st.none(), st.text()), "extra": st.integers()},
)


@settings(max_examples=60, deadline=None)
@given(st.lists(raw_entry, min_size=1, max_size=8))
def test_valid_entries_round_trip(items: list[dict[str, Any]]) -> None:
    entries = validate_entries(items, "mem.json")
    assert [e.instruction for e in entries] == [i["instruction"] for i in items]
    assert [e.input for e in entries] == [i.get("input") or "" for i in items]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "round.json"
        write_entries(path, entries)
        assert load_entries(path) == entries


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=3000),
    train=st.floats(min_value=0.01, max_value=0.98),
    test=st.floats(min_value=0.01, max_value=0.98),
    shuffle=st.booleans(),
)
def test_split_sizes_sum_to_input(n: int, train: float, test: float, shuffle: bool) -> None:
    entries = make_entries(n)
    try:
        split = split_entries(
            entries, train_fraction=train, test_fraction=test, shuffle=shuffle, seed=n
        )
    except ValueError as exc:
        assert train + test > 1 or "empty" in str(exc)
        return
    assert len(split.train) + len(split.val) + len(split.test) == n
    assert len(split.train) == int(n * train) and len(split.test) == int(n * test)
    assert min(split.sizes().values()) > 0
