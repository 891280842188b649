"""Tests for the offline answer scores."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from gpt2_instruct.evaluation import (
    PER_ENTRY_FIELDS,
    SCORE_FIELDS,
    chrf_corpus,
    chrf_sentence,
    exact_match,
    normalize_answer,
    rouge_f1,
    score_entries,
    worst_entries,
    write_per_entry_csv,
    write_scores_csv,
)


def entry(output: str, response: str, instruction: str = "Do it.", inp: str = "") -> dict:
    return {"instruction": instruction, "input": inp, "output": output, "model_response": response}


ENTRIES = [
    entry("The capital of France is Paris.", "The capital of France is Paris."),
    entry("the cat sat on the mat", "the cat on a mat"),
    entry("Photosynthesis makes sugar.", "I do not know"),
    entry('A, B and "C"\nnext line', "   "),
]


def test_normalize_answer_strips_and_collapses_whitespace() -> None:
    assert normalize_answer("  Hello \t  world\n\nagain  ") == "Hello world again"
    assert normalize_answer("\u00a0x\u2003y ") == "x y"  # Unicode whitespace counts too
    assert normalize_answer("") == ""
    assert normalize_answer("Case, Kept.") == "Case, Kept."


def test_exact_match_forgives_layout_only() -> None:
    assert exact_match("Paris is  the\ncapital. ", " Paris is the capital.")
    assert not exact_match("paris", "Paris")
    assert not exact_match("Paris.", "Paris")
    assert exact_match("", "  \n")


def test_rouge_identical_and_disjoint() -> None:
    assert rouge_f1("the quick brown fox", "the quick brown fox") == {
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
    }
    assert rouge_f1("alpha beta gamma", "delta epsilon zeta") == {
        "rouge1": 0.0,
        "rouge2": 0.0,
        "rougeL": 0.0,
    }


def test_rouge_partial_by_hand() -> None:
    # reference: the cat sat on the mat (6 tokens); prediction: the cat on a mat (5 tokens)
    # ROUGE-L: LCS = "the cat on mat" = 4, P = 4/5, R = 4/6, F1 = 2*4/(5+6) = 8/11.
    # ROUGE-1: clipped unigram overlap the, cat, on, mat = 4 -> also 8/11.
    # ROUGE-2: ref bigrams {the cat, cat sat, sat on, on the, the mat}, prediction bigrams
    #   {the cat, cat on, on a, a mat}: overlap 1, P = 1/4, R = 1/5, F1 = 2/9.
    scores = rouge_f1("the cat on a mat", "the cat sat on the mat")
    assert scores["rougeL"] == pytest.approx(8 / 11)
    assert scores["rouge1"] == pytest.approx(8 / 11)
    assert scores["rouge2"] == pytest.approx(2 / 9)


def test_rouge_uses_stemmer_and_lowercases() -> None:
    assert rouge_f1("Running DOGS", "run dog")["rouge1"] == pytest.approx(1.0)


def test_chrf_identical_is_100_and_disjoint_low() -> None:
    assert chrf_sentence("Hello there, world!", "Hello there, world!") == pytest.approx(100.0)
    assert chrf_sentence("xyz", "abc") == pytest.approx(0.0)
    assert 0.0 < chrf_sentence("Hello world", "Hello there world") < 100.0
    assert chrf_corpus(["a b c", "hello"], ["a b c", "hello"]) == pytest.approx(100.0)


def test_chrf_corpus_length_mismatch() -> None:
    with pytest.raises(ValueError, match="as many predictions"):
        chrf_corpus(["a"], ["a", "b"])


def test_score_entries_rows_and_summary_means() -> None:
    rows, summary = score_entries(ENTRIES)
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    assert list(rows[0]) == [field for field in PER_ENTRY_FIELDS if field != "response_loss"]
    assert rows[0]["exact_match"] is True
    assert rows[0]["rougeL"] == pytest.approx(1.0)
    assert rows[0]["chrf"] == pytest.approx(100.0)
    assert rows[1]["rougeL"] == pytest.approx(8 / 11)
    assert rows[3]["response_chars"] == 3

    assert summary["count"] == 4
    assert summary["exact_match"] == pytest.approx(0.25)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert summary[key] == pytest.approx(sum(row[key] for row in rows) / 4)
    assert summary["chrf_sentence_mean"] == pytest.approx(sum(row["chrf"] for row in rows) / 4)
    responses = [e["model_response"] for e in ENTRIES]
    assert summary["chrf"] == pytest.approx(chrf_corpus(responses, [e["output"] for e in ENTRIES]))
    assert summary["empty_responses"] == 1
    assert "mean_response_loss" not in summary
    assert "response_perplexity" not in summary
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in summary.values())


def test_score_entries_losses_give_perplexity() -> None:
    losses = [0.5, 1.0, 2.5, 3.0]
    rows, summary = score_entries(ENTRIES, losses)
    assert [row["response_loss"] for row in rows] == losses
    assert list(rows[0]) == list(PER_ENTRY_FIELDS)
    assert summary["mean_response_loss"] == pytest.approx(1.75)
    assert summary["response_perplexity"] == pytest.approx(math.exp(1.75))


def test_score_entries_loss_count_mismatch() -> None:
    with pytest.raises(ValueError, match="3 response losses for 4 entries"):
        score_entries(ENTRIES, [1.0, 2.0, 3.0])


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1.0", None, True])
def test_score_entries_bad_loss_value(bad: Any) -> None:
    with pytest.raises(ValueError, match="response loss 2"):
        score_entries(ENTRIES, [1.0, 1.0, bad, 1.0])


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"instruction": "x", "output": "y"}, "entry 1 has no 'model_response' field"),
        ({"instruction": "x", "model_response": "y"}, "entry 1 has no 'output' field"),
        (entry(output=None, response="y"), "entry 1 field 'output' is a NoneType"),  # type: ignore[arg-type]
        (entry(output="y", response=["y"]), "entry 1 field 'model_response' is a list"),  # type: ignore[arg-type]
        ("just a string", "entry 1 is a str, not an object"),
    ],
)
def test_score_entries_malformed_entry(broken: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_entries([ENTRIES[0], broken])


def test_score_entries_empty_list() -> None:
    with pytest.raises(ValueError, match="empty"):
        score_entries([])


def test_missing_instruction_or_input_is_tolerated() -> None:
    rows, _ = score_entries([{"output": "a", "model_response": "a", "input": None}])
    assert rows[0]["instruction"] == ""
    assert rows[0]["input"] == ""


def test_csv_round_trip(tmp_path: Path) -> None:
    tricky = entry(
        output='He said, "hi"\nthen left; ünïcödé',
        response='He said "hi",\r\nthen, left',
        instruction='Quote "this", please',
        inp="line one\nline two",
    )
    rows, _ = score_entries([*ENTRIES, tricky], [0.1, 0.2, 0.3, 0.4, 0.5])
    dest = tmp_path / "sub" / "per_entry.csv"
    write_per_entry_csv(dest, rows)

    assert [p.name for p in dest.parent.iterdir()] == ["per_entry.csv"]  # no temp file left
    with open(dest, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == list(PER_ENTRY_FIELDS)
        read = list(reader)
    assert len(read) == len(rows)
    for got, want in zip(read, rows, strict=True):
        for field in ("instruction", "input", "output", "model_response"):
            assert got[field] == want[field]
        assert int(got["index"]) == want["index"]
        assert got["exact_match"] == str(want["exact_match"])
        for field in ("rouge1", "rouge2", "rougeL", "chrf", "response_loss"):
            assert float(got[field]) == want[field]  # repr round-trips floats exactly
        assert int(got["response_chars"]) == want["response_chars"]


def test_csv_without_rows_has_header(tmp_path: Path) -> None:
    dest = tmp_path / "empty.csv"
    write_per_entry_csv(dest, [])
    with open(dest, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert list(reader) == []
        assert "rougeL" in (reader.fieldnames or [])


@pytest.mark.parametrize("losses", [[0.1, 0.2, 0.3, 0.4, 0.5], None])
def test_scores_csv_has_the_numbers_and_no_text(tmp_path: Path, losses: list | None) -> None:
    """The table dvc.yaml plots: DVC copies every column of it into a <script> of its HTML."""
    hostile = entry("</script><script>alert(1)</script>", '</script>, "quoted"\nline')
    rows, _ = score_entries([*ENTRIES, hostile], losses)
    dest = tmp_path / "scores.csv"
    write_scores_csv(dest, rows)
    text = dest.read_text(encoding="utf-8")
    assert "script" not in text and '"' not in text
    with open(dest, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        read = list(reader)
    expected = [f for f in SCORE_FIELDS if losses is not None or f != "response_loss"]
    assert reader.fieldnames == expected
    assert [int(r["exact_match"]) for r in read] == [int(r["exact_match"]) for r in rows]
    assert [int(r["exact_match"]) for r in read][:2] == [1, 0]
    for got, want in zip(read, rows, strict=True):
        assert int(got["index"]) == want["index"]
        for field in expected[2:]:
            assert float(got[field]) == want[field], field


def test_worst_entries() -> None:
    rows, _ = score_entries(ENTRIES, [0.5, 1.0, 2.5, 3.0])
    worst = worst_entries(rows, 2)
    assert [row["index"] for row in worst] == [2, 3]  # both 0.0; ties keep entry order
    assert [row["index"] for row in worst_entries(rows, 10)] == [2, 3, 1, 0]
    by_loss = worst_entries(rows, 1, key="response_loss", higher_is_better=False)
    assert by_loss[0]["index"] == 3
    assert worst_entries(rows, 0) == []
    with pytest.raises(ValueError, match="no 'bleu' score"):
        worst_entries(rows, 1, key="bleu")
    with pytest.raises(ValueError, match="k must be"):
        worst_entries(rows, -1)


# --- the responses file: one clear line naming the file, the entry and the field -----------


def _responses_error(tmp_path: Path, text: str) -> str:
    from gpt2_instruct.data import DataError
    from gpt2_instruct.evaluation import load_responses

    path = tmp_path / "test.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_responses(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


GOOD_RESPONSE = '{"instruction": "i", "input": "", "output": "o", "model_response": "r"}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"[{GOOD_RESPONSE}, {GOOD_RESPONSE}]"[:-30], "invalid JSON at line 1"),
        (
            f"[{GOOD_RESPONSE}, " + '{"output": "o", "model_response": null}]',
            "entry 1: field 'model_response' must be a string, got null",
        ),
        (
            f"[{GOOD_RESPONSE}, " + '{"output": "o"}]',
            "entry 1: missing required field 'model_response'",
        ),
        ('[{"model_response": "r"}]', "entry 0: missing required field 'output'"),
        ('[{"output": 3, "model_response": "r"}]', "entry 0: field 'output' must be a string"),
        ('[{"output": "o", "model_response": "r", "input": 1}]', "string or null, got int"),
        ('[{"output": "o", "model_response": "a", "model_response": "b"}]', "more than once"),
        ('[{"output": "o", "model_response": "\\udc00"}]', "unpaired surrogate"),
        ("[3]", "entry 0: must be a JSON object, got int"),
        ("[]", "no entries"),
        ('{"a": 1}', "top level must be a JSON list"),
        ("[" * 1000 + "]" * 1000, "nested more than"),
        ('[{"output": "o", "model_response": "r", "id": ' + "1" * 5000 + "}]", "number of 5000"),
    ],
    ids=[
        "truncated",
        "null-response",
        "no-response",
        "no-output",
        "int-output",
        "int-input",
        "duplicate",
        "surrogate",
        "not-object",
        "empty",
        "not-list",
        "deep",
        "huge-int",
    ],
)
def test_load_responses_names_file_entry_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert expected in _responses_error(tmp_path, text)


def test_load_responses_accepts_what_generate_writes(tmp_path: Path) -> None:
    from gpt2_instruct.evaluation import load_responses

    path = tmp_path / "test.json"
    entries = [entry("o", ""), {"output": "o", "model_response": "r", "input": None}]
    path.write_text(json.dumps(entries), encoding="utf-8")
    assert load_responses(path) == entries
