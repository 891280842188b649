"""How an answer is cut from generated text: the reference's replace-all, or leading only.

The reference (LLMs-from-scratch ch07) scores
``generated_text[len(input_text):].replace("### Response:", "").strip()``, so a header the
model writes again anywhere in its answer disappears. ``extract_response`` does exactly that
by default (``mode="reference"``); ``mode="leading"`` only drops one header before the answer.
The generate stage, the command line and the streamed chat output all follow the mode.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_instruct import cli
from gpt2_instruct.data import RESPONSE_EXTRACTIONS, Entry, extract_response, write_entries
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.params import GenerateParams, ParamsError, load_section
from gpt2_instruct.stages import generate as generate_stage
from gpt2_instruct.tokenizer import load_tokenizer
from gpt2_instruct.weights import save_model

ALPACA = "### Response:"
PHI3 = "<|assistant|>"
HEADERS = {"alpaca": ALPACA, "phi3": PHI3}

# Answers that repeat the header: leading, in the middle, trailing, several times, split
# by whitespace, glued to words, and a header only completed by a removal (not re-scanned).
REPEATED = [
    "### Response:\nBlue.",
    "\n\n### Response:\n  Blue. \n",
    "Blue.\n### Response: kept",
    "A ### Response: B",
    "Blue.\n### Response:",
    "Blue.\n\n### Response:\n\n",
    "### Response:\n\nB",
    "### Response:### Response:",
    "### Response: ### Response:\n\n### Response:Red",
    "Red\n### Response:\ngreen\n\n### Response:\nblue \n### Response:",
    "x### Response:y### Response:z",
    "### Resp### Response:onse: done",
    "### Response",
    "   ",
    "",
]


# --- extract_response ----------------------------------------------------------------------


@pytest.mark.parametrize("text", REPEATED)
def test_reference_mode_is_the_references_replace_then_strip(text: str) -> None:
    expected = text.replace("### Response:", "").strip()
    assert extract_response(text, "alpaca", "reference") == expected
    assert extract_response(text, "alpaca") == expected  # the default
    assert extract_response(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A ### Response: B", "A  B"),  # the spaces around a removed header stay inside
        ("### Response:\n\nB", "B"),  # ... or become leading and are stripped
        ("A\n### Response:", "A"),  # ... or trailing
        ("Red\n### Response:\ngreen\n### Response:", "Red\n\ngreen"),
        ("### Resp### Response:onse: done", "### Response: done"),  # one pass, like replace
    ],
)
def test_reference_mode_examples(text: str, expected: str) -> None:
    assert extract_response(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\n### Response:\nBlue.\n", "Blue."),
        ("Blue.\n### Response: kept", "Blue.\n### Response: kept"),
        ("### Response:\nBlue.\n### Response: kept", "Blue.\n### Response: kept"),
        ("### Response: ### Response:", "### Response:"),
        ("A ### Response: B", "A ### Response: B"),
    ],
)
def test_leading_mode_keeps_headers_inside_the_answer(text: str, expected: str) -> None:
    assert extract_response(text, "alpaca", "leading") == expected


def test_phi3_uses_its_own_header() -> None:
    text = "<|assistant|>\nHi ### Response: there\n<|assistant|> again <|assistant|>"
    assert extract_response(text, "phi3") == text.replace(PHI3, "").strip()
    assert extract_response(text, "phi3") == "Hi ### Response: there\n again"
    assert extract_response(text, "phi3", "leading") == (
        "Hi ### Response: there\n<|assistant|> again <|assistant|>"
    )


@pytest.mark.parametrize("mode", ["replace", "Reference", "", "all"])
def test_unknown_mode_is_refused(mode: str) -> None:
    with pytest.raises(ValueError, match=f"unknown response extraction {mode!r}") as info:
        extract_response("text", "alpaca", mode)
    for name in RESPONSE_EXTRACTIONS:
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="unknown response extraction"):
        cli.ResponseStream("alpaca", mode)


# --- params and command line agree ---------------------------------------------------------


def test_param_literal_default_and_cli_option_match_the_modes(tmp_path: Path) -> None:
    hints = typing.get_type_hints(GenerateParams)
    assert typing.get_args(hints["response_extraction"]) == RESPONSE_EXTRACTIONS
    assert RESPONSE_EXTRACTIONS[0] == GenerateParams().response_extraction == "reference"
    for argv in (["chat", "--model", "m"], ["generate", "--model", "m", "--instruction", "i"]):
        args = cli.build_parser().parse_args(argv)
        assert args.response_extraction == GenerateParams().response_extraction
    path = tmp_path / "params.yaml"
    path.write_text("generate:\n  response_extraction: leading\n", encoding="utf-8")
    assert load_section("generate", path).response_extraction == "leading"
    path.write_text("generate:\n  response_extraction: all\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="response_extraction"):
        load_section("generate", path)


# --- streaming -----------------------------------------------------------------------------

_FRAGMENTS = [
    ALPACA,
    PHI3,
    *(ALPACA[:k] for k in range(1, len(ALPACA))),
    *(ALPACA[k:] for k in range(1, len(ALPACA))),
    *(PHI3[:k] for k in range(1, len(PHI3))),
    *(PHI3[k:] for k in range(1, len(PHI3))),
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    " \n ",
    "A",
    "Blue.",
    "word",
    "#",
    "<",
    "|",
    ":",
]


@st.composite
def _chunked_texts(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = "".join(draw(st.lists(st.sampled_from(_FRAGMENTS), max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 2)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


def _stream(chunks: list[str], style: str, mode: str) -> list[str]:
    stream = cli.ResponseStream(style, mode)
    return [stream.feed(chunk) for chunk in chunks] + [stream.finish()]


@settings(max_examples=600, deadline=None)
@given(_chunked_texts(), st.sampled_from(["alpaca", "phi3"]), st.sampled_from(RESPONSE_EXTRACTIONS))
def test_stream_equals_extract_response_for_every_split(
    chunked: tuple[str, list[str]], style: str, mode: str
) -> None:
    text, chunks = chunked
    pieces = _stream(chunks, style, mode)
    assert "".join(pieces) == extract_response(text, style, mode)
    if mode == "reference":
        assert "".join(pieces) == text.replace(HEADERS[style], "").strip()


@pytest.mark.parametrize("mode", RESPONSE_EXTRACTIONS)
def test_stream_holds_back_only_what_may_be_a_header(mode: str) -> None:
    chunks = ["Blue", " ###", " Resp", "onse", ":", " sky", " ##", "#x"]
    pieces = _stream(chunks, "alpaca", mode)
    if mode == "reference":
        # " ###" could start a header: nothing of it shows until "onse:" settles it.
        assert pieces == ["Blue", "", "", "", "", "  sky", "", " ###x", ""]
    else:
        assert pieces == ["Blue", " ###", " Resp", "onse", ":", " sky", " ##", "#x", ""]


# --- the generate stage and the command line -----------------------------------------------

MODEL_TEXT = "\n### Response:\nBlue.\n\n### Response:\nGreen. ### Response: end\n### Response:"
EXPECTED = {
    "reference": "Blue.\n\n\nGreen.  end",
    "leading": "Blue.\n\n### Response:\nGreen. ### Response: end\n### Response:",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, write_bpe) -> Path:
    """A random tiny alpaca model directory; the tests replace its generation anyway."""
    directory = write_bpe(tmp_path_factory.mktemp("tiny") / "model", [])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=257, context_length=256, n_embd=16, n_layer=2, n_head=2)
    save_model(
        GPTModel(config), directory, extra_config={"gpt2_instruct": {"prompt_style": "alpaca"}}
    )
    return directory


def test_expected_answers_are_the_modes_extractions() -> None:
    assert EXPECTED["reference"] == MODEL_TEXT.replace("### Response:", "").strip()
    for mode, expected in EXPECTED.items():
        assert extract_response(MODEL_TEXT, "alpaca", mode) == expected


@pytest.mark.parametrize("mode", RESPONSE_EXTRACTIONS)
def test_generate_stage_honours_response_extraction(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(MODEL_TEXT)
    assert tokenizer.decode(ids) == MODEL_TEXT

    def answers(model, prompts, **kwargs):
        return [list(ids) for _ in prompts]

    monkeypatch.setattr(generate_stage, "generate", answers)
    entries = [Entry("Name a color.", "", "Blue."), Entry("And another?", "sky", "Green.")]
    write_entries(tmp_path / "test.json", entries)
    params = GenerateParams(
        max_new_tokens=len(ids) + 1, batch_size=1, device="cpu", response_extraction=mode
    )
    generate_stage.generate_responses(
        params, model_dir, tmp_path / "test.json", tmp_path / "r.json", tmp_path / "g.json"
    )
    results = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert [r["model_response"] for r in results] == [EXPECTED[mode]] * len(entries)
    assert [r["output"] for r in results] == ["Blue.", "Green."]


@pytest.fixture
def scripted_model(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``cli.generate`` answers MODEL_TEXT one (byte-level) token at a time."""
    ids = load_tokenizer(model_dir).encode(MODEL_TEXT)

    def fake_generate(model, prompts, *, eos_id, sampling, on_token=None):
        for token in ids:
            if on_token is not None:
                on_token(0, token)
        return [list(ids)]

    monkeypatch.setattr(cli, "generate", fake_generate)
    return ids


def _main(capsys: pytest.CaptureFixture[str], argv: list[str], stdin: str = "") -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", io.StringIO(stdin))
        assert cli.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("mode", [None, *RESPONSE_EXTRACTIONS])
def test_cli_chat_and_generate_honour_response_extraction(
    model_dir: Path, scripted_model: list[int], capsys: pytest.CaptureFixture[str], mode
) -> None:
    expected = EXPECTED[mode or "reference"]  # the reference's extraction by default
    common = ["--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "12"]
    if mode is not None:
        common += ["--response-extraction", mode]
    assert _main(capsys, ["chat", *common], stdin="Name a color.\n\n") == expected + "\n\n"
    assert _main(capsys, ["generate", *common, "--instruction", "Hi"]) == expected + "\n"
    out = _main(capsys, ["generate", *common, "--instruction", "Hi", "--json"])
    assert json.loads(out)["model_response"] == expected


def test_cli_rejects_an_unknown_response_extraction(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(model_dir), "--instruction", "Hi"]
    assert cli.main([*argv, "--response-extraction", "all"]) == 2
    assert "--response-extraction" in capsys.readouterr().err
