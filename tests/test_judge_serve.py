"""The judge's OpenAI-compatible backend against a real ``gpt2-instruct serve`` on 127.0.0.1.

Kept apart from tests/test_judge.py (fake servers) and tests/test_serve.py (the server): this
is the end-to-end path judge -> HTTP -> server -> model and back. A random model does not
answer with a number, so its rows must be ``unparseable`` with the server's very reply kept;
a model built to answer "85" must be scored 85.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve import MODEL_ID, digit_model_dir, random_model_dir, running_server

from gpt2_instruct.data import Entry, extract_response, format_prompt
from gpt2_instruct.generation import generate
from gpt2_instruct.judge import build_prompt, judge_entries, parse_score
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import JudgeParams, SamplingParams

ENTRIES: list[dict[str, Any]] = [
    {"instruction": "Name a color.", "input": "", "output": "Blue.", "model_response": "Red."},
    {
        "instruction": "Rewrite the sentence.",
        "input": "The car is fast.",
        "output": "The car is as fast as lightning.",
        "model_response": "The car is quick.",
    },
]
DEFAULT_MAX_TOKENS = 12  # the judge sends no max_tokens: the server's default applies


def judge_params(url: str) -> JudgeParams:
    return JudgeParams(backend="openai", url=url, model=MODEL_ID, retries=0, timeout=120.0)


def served_answer(model_dir: Path, prompt: str) -> str:
    """What the server should reply to a one-message chat: our greedy answer, extracted."""
    model, tokenizer, style = load_instruct_model(model_dir)
    ids = tokenizer.encode(format_prompt(Entry(prompt, "", ""), style))
    sampling = SamplingParams(max_new_tokens=DEFAULT_MAX_TOKENS)
    [new] = generate(model, [ids], eos_id=tokenizer.eot_id, sampling=sampling)
    return extract_response(tokenizer.decode(new), style)


@contextlib.contextmanager
def serve(model_dir: Path) -> Iterator[str]:
    defaults = SamplingParams(max_new_tokens=DEFAULT_MAX_TOKENS)
    with running_server(model_dir, defaults=defaults) as (url, _):
        yield url


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory, write_bpe: Callable[..., Path]) -> Path:
    return random_model_dir(tmp_path_factory.mktemp("judge") / "random", write_bpe)


@pytest.fixture(scope="module")
def digit_dir(tmp_path_factory: pytest.TempPathFactory, write_bpe: Callable[..., Path]) -> Path:
    return digit_model_dir(tmp_path_factory.mktemp("judge") / "digits", write_bpe)


def test_a_random_model_judge_is_unparseable_with_its_reply_kept(random_dir: Path) -> None:
    expected = [served_answer(random_dir, build_prompt(entry)) for entry in ENTRIES]
    assert all(reply and parse_score(reply) is None for reply in expected)  # the premise
    with serve(random_dir) as url:
        rows, summary = judge_entries(ENTRIES, judge_params(url))
    assert [row["reply"] for row in rows] == expected
    assert [row["reason"] for row in rows] == ["unparseable", "unparseable"]
    assert all(row["score"] is None for row in rows)
    assert summary["judge_count"] == 0 and summary["judge_unparseable"] == len(ENTRIES)
    assert "scored none" in summary["judge_error"]


def test_a_model_that_answers_85_is_scored_85(digit_dir: Path) -> None:
    assert served_answer(digit_dir, build_prompt(ENTRIES[0])) == "85"  # the model works
    with serve(digit_dir) as url:
        rows, summary = judge_entries(ENTRIES, judge_params(url))
    assert [row["score"] for row in rows] == [85, 85]
    assert [row["reply"] for row in rows] == ["85", "85"]
    assert all(row["reason"] is None and row["error"] is None for row in rows)
    assert summary["judge_count"] == 2 and summary["judge_mean"] == 85
    assert summary["judge_histogram"]["80-89"] == 2 and summary["judge_error"] is None


def test_a_wrong_model_name_stops_the_judge_at_the_first_entry(digit_dir: Path) -> None:
    with serve(digit_dir) as url:
        params = JudgeParams(backend="openai", url=url, model="llama3", retries=0)
        rows, summary = judge_entries(ENTRIES, params)
    assert [row["reason"] for row in rows] == ["http_status", "http_status"]
    assert "404" in rows[0]["error"]
    assert "refused the first request" in summary["judge_error"]
