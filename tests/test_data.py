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
    DataWarning,
    Entry,
    extract_response,
    find_duplicates,
    format_example,
    format_prompt,
    is_blank,
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


@pytest.mark.parametrize("mode", ["reference", "leading"])
@pytest.mark.parametrize(
    ("generated", "style", "expected"),
    [
        ("The answer.\n", "alpaca", "The answer."),
        ("\n\n### Response:\n  The answer. \n", "alpaca", "The answer."),
        ("### Response:The answer.", "alpaca", "The answer."),
        ("  The answer.  ", "phi3", "The answer."),
        ("<|assistant|>\nThe answer.", "phi3", "The answer."),
        ("\n\n", "alpaca", ""),
    ],
)
def test_extract_response(generated: str, style: str, mode: str, expected: str) -> None:
    assert extract_response(generated, style, mode) == expected


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("reference", "The answer.\n kept"),  # the default: every header goes
        ("leading", "The answer.\n### Response: kept"),
    ],
)
def test_extract_response_mid_answer_header(mode: str, expected: str) -> None:
    generated = "The answer.\n### Response: kept"
    assert extract_response(generated, "alpaca", mode) == expected
    if mode == "reference":
        assert extract_response(generated) == expected


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

nonblank = st.text(min_size=1).filter(lambda s: not is_blank(s))
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


# --- hostile input: limits, suspicious keys, invisible text (issue 22) ---------------------


def load_error(tmp_path: Path, text: str) -> str:
    path = write_raw(tmp_path, text)
    with pytest.raises(DataError) as info:
        load_entries(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert len(message) < 400
    return message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, ["nested more than 100 levels", "line 1, column 101"]),
        ('{"a":' * 5000 + "1" + "}" * 5000, ["nested more than 100 levels"]),
        (json.dumps([GOOD])[:-1] + ', {"id": ' + "7" * 5000 + "}]", ["number of 5000"]),
        ("[" + "-" + "1" * 200 + "]", ["number of 201 characters"]),
        ('[{"instruction": "a", "output": "b", "x": 1e999}]', ["out of range"]),
        ('[{"instruction": "a", "output": "b", "x": NaN}]', ["NaN is not valid JSON"]),
        ('[{"instruction": "a", "output": "b", "x": -Infinity}]', ["-Infinity is not valid"]),
    ],
    ids=["deep-lists", "deep-objects", "5000-digits", "long-number", "1e999", "NaN", "-inf"],
)
def test_reader_limits_are_one_clear_error(tmp_path: Path, text: str, words: list[str]) -> None:
    message = load_error(tmp_path, text)
    for word in words:
        assert word in message


def test_deep_nesting_inside_a_string_is_text(tmp_path: Path) -> None:
    deep = "[" * 5000 + '\\"{' * 100
    path = write_list(tmp_path, [{**GOOD, "output": deep}])
    assert load_entries(path)[0].output == deep


def test_reader_size_limit_and_unreadable_paths(tmp_path: Path) -> None:
    from gpt2_instruct.safe_json import JSONError, read_json

    path = write_list(tmp_path, [GOOD])
    with pytest.raises(JSONError, match=r"larger than the limit of 10 bytes"):
        read_json(path, max_bytes=10)
    with pytest.raises(DataError, match="cannot read file"):
        load_entries(tmp_path)  # a directory


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_duplicate_field_with_different_values_is_an_error(tmp_path: Path, field: str) -> None:
    entry = '{"instruction": "a", "input": "i", "output": "b", "FIELD": "other"}'
    message = load_error(tmp_path, f"[{json.dumps(GOOD)}, {entry.replace('FIELD', field)}]")
    assert f"entry 1: field '{field}' appears more than once with different values" in message


def test_harmless_duplicate_keys_are_warnings(tmp_path: Path) -> None:
    text = (
        '[{"instruction": "a", "output": "b", "output": "b"},'
        ' {"instruction": "a", "output": "b", "id": 1, "id": 2}]'
    )
    warnings: list[DataWarning] = []
    entries = load_entries(write_raw(tmp_path, text), warnings)
    assert entries == [Entry("a", "", "b")] * 2
    assert [w.kind for w in warnings] == ["duplicate_key", "duplicate_key"]
    assert "entry 0: field 'output' repeated with the same value" in str(warnings[0])
    assert "entry 1: field 'id' repeated with different values" in str(warnings[1])
    assert load_entries(write_raw(tmp_path, text)) == entries  # no list: no warnings kept


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Input", "input"),
        ("INSTRUCTION", "instruction"),
        (" output", "output"),
        ("output\t", "output"),
        ("in_put", "input"),
        ("Out-put", "output"),
        ("inupt", "input"),  # swapped letters
        ("instrution", "instruction"),  # a letter missing
        ("outputs", "output"),  # one too many
        ("input\u200b", "input"),  # a zero-width space
    ],
)
def test_near_miss_key_is_an_error_naming_key_and_field(
    tmp_path: Path, key: str, expected: str
) -> None:
    item = {"instruction": "a", "output": "b", key: "text that would be lost"}
    message = load_error(tmp_path, json.dumps([GOOD, item]))
    assert f"entry 1: field {key!r} looks like a misspelt {expected!r}" in message


@pytest.mark.parametrize("key", ["id", "text", "extra", "category", "system", "history", "in"])
def test_other_extra_keys_are_still_ignored(tmp_path: Path, key: str) -> None:
    assert load_entries(write_list(tmp_path, [{**GOOD, key: "x"}])) == [Entry("Say hi.", "", "hi")]


BLANKS = ["\x01\x02", "\x00", "\u200b", "\u200b\u200b \n", "\ufeff", "\u2800", "\u3164", "\u00ad"]


@pytest.mark.parametrize("field", ["instruction", "output"])
@pytest.mark.parametrize("blank", BLANKS)
def test_invisible_instruction_or_output_is_an_error(
    tmp_path: Path, field: str, blank: str
) -> None:
    message = load_error(tmp_path, json.dumps([{**GOOD, field: blank}]))
    assert f"entry 0: field '{field}' must be a non-empty string" in message
    assert "invisible" in message or "whitespace-only" in message


@pytest.mark.parametrize("blank", ["  ", *BLANKS])
def test_invisible_input_is_a_warning_and_kept(tmp_path: Path, blank: str) -> None:
    warnings: list[DataWarning] = []
    entries = load_entries(write_list(tmp_path, [GOOD, {**GOOD, "input": blank}]), warnings)
    assert entries[1].input == blank  # kept exactly as written
    [warning] = warnings
    assert warning.kind == "blank_input"
    assert "entry 1: field 'input' is blank" in warning.message


def test_visible_text_with_invisible_characters_is_fine() -> None:
    assert not is_blank("a\u200b") and not is_blank("\x01x") and not is_blank("日本")
    assert is_blank("") and is_blank(" \t\u200b\u2060\x7f")


JSON_FRAGMENTS = [
    *["[", "]", "{", "}", ",", ":", '"', "\\", "1", "-", "1e999", "NaN", "null", "true"],
    *['"instruction"', '"input"', '"output"', '"Input"', '"a"', '""'],
    *['"\\u200b"', '"\\ud800"', '"\\u0001"', "9" * 60, " ", "\n"],
]
JSONISH = st.lists(st.sampled_from(JSON_FRAGMENTS) | st.text(max_size=3), max_size=40)


@settings(max_examples=300, deadline=None)
@given(parts=JSONISH, prefix=st.binary(max_size=4))
def test_any_jsonish_text_raises_only_data_error(parts: list[str], prefix: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        path.write_bytes(prefix + "".join(parts).encode("utf-8", "surrogatepass"))
        try:
            entries = load_entries(path, [])
        except DataError as err:
            assert "\n" not in str(err) and str(err).startswith(str(path))
        else:
            assert all(isinstance(entry, Entry) for entry in entries)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_parsed_value_raises_only_data_error(value: Any) -> None:
    try:
        validate_entries(value, "mem.json", [])
    except DataError as err:
        assert str(err).startswith("mem.json: ")
