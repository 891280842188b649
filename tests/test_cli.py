"""The ``chat`` and ``generate`` commands on a tiny random model with a hand-made BPE.

The model directory is built here (no download, no GPU), so these tests pin the command
line's behaviour, not a checkpoint's answers: same text as the library, same prompt format
as training, clean streaming of split UTF-8 characters and clear errors.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from gpt2_instruct import cli
from gpt2_instruct.data import Entry, extract_response, format_prompt
from gpt2_instruct.generation import SamplingConfig, generate
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.model_dir import ModelDirError, load_instruct_model
from gpt2_instruct.params import GenerateParams, SamplingParams
from gpt2_instruct.tokenizer import load_tokenizer
from gpt2_instruct.weights import save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MERGES = [("t", "h"), ("th", "e")]
VOCAB_SIZE = 256 + len(MERGES) + 1  # bytes, merges, <|endoftext|>
MAX_NEW = "12"


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode characters in encoder.json order (printable bytes first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


def _write_bpe(model_dir: Path) -> None:
    """A 259-token GPT-2-format BPE: the 256 bytes, two merges and <|endoftext|>."""
    encoder = {ch: i for i, ch in enumerate(_byte_chars())}
    for left, right in MERGES:
        encoder[left + right] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    assert len(encoder) == VOCAB_SIZE
    (model_dir / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in MERGES)]
    (model_dir / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _make_model_dir(model_dir: Path, style: str | None = "alpaca") -> Path:
    """A random tiny model saved like a fine-tuned one (weights, config, BPE files)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB_SIZE, context_length=64, n_embd=16, n_layer=2, n_head=2)
    extra = None if style is None else {"gpt2_instruct": {"prompt_style": style}}
    save_model(GPTModel(config), model_dir, extra_config=extra)
    _write_bpe(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _run(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    """``main(argv)`` with captured output; ``stdin`` is fed as piped (non-TTY) input."""
    if stdin is not None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stdin", io.StringIO(stdin))
            code = cli.main(list(argv))
    else:
        code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _gen_args(model_dir: Path, instruction: str, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(model_dir),
        "--instruction",
        instruction,
        "--device",
        "cpu",
        "--max-new-tokens",
        MAX_NEW,
        *extra,
    ]


def _chat_args(model_dir: Path, *extra: str) -> list[str]:
    return [
        "chat",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--max-new-tokens",
        MAX_NEW,
        *extra,
    ]


def _library_answer(model_dir: Path, entry: Entry) -> tuple[list[int], str]:
    """What the library itself answers (greedy), to compare the command line with."""
    model, tokenizer, style = load_instruct_model(model_dir)
    prompt = tokenizer.encode(format_prompt(entry, style))
    sampling = SamplingConfig(max_new_tokens=int(MAX_NEW))
    [new] = generate(model, [prompt], eos_id=tokenizer.eot_id, sampling=sampling)
    return new, extract_response(tokenizer.decode(new), style)


# --- model directory -----------------------------------------------------------------------


def test_hand_made_bpe_loads_and_merges(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.eot_id == VOCAB_SIZE - 1
    assert tokenizer.encode("the") == [257]
    assert tokenizer.encode("th") == [256]
    text = "the café, ☕ ok\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(("style", "expected"), [("phi3", "phi3"), (None, "alpaca")])
def test_prompt_style_comes_from_config(tmp_path: Path, style: str | None, expected: str) -> None:
    model, tokenizer, got = load_instruct_model(_make_model_dir(tmp_path / "m", style))
    assert got == expected
    assert not model.training
    assert tokenizer.vocab_size == model.config.vocab_size


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_missing_vocab_bpe_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    broken = _make_model_dir(tmp_path / "broken")
    (broken / "vocab.bpe").unlink()
    argv = _gen_args(broken, "Hi") if command == "generate" else _chat_args(broken)
    code, out, err = _run(capsys, *argv, stdin="Hi\n\n")
    assert code != 0
    assert out == ""
    assert str(broken) in err
    assert "vocab.bpe" in err
    assert "Traceback" not in err
    with pytest.raises(ModelDirError, match=r"missing vocab\.bpe"):
        load_instruct_model(broken)


def test_unknown_prompt_style_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="prompt_style 'chatml'"):
        load_instruct_model(_make_model_dir(tmp_path / "m", "chatml"))


# --- generate ------------------------------------------------------------------------------


def test_generate_prints_what_the_library_generates(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = Entry("Name a colour.", "The sky", "")
    tokens, expected = _library_answer(model_dir, entry)
    assert tokens  # a random tiny model still says something, so the check has teeth
    code, out, err = _run(capsys, *_gen_args(model_dir, entry.instruction, "--input", entry.input))
    assert code == 0
    # The alpaca prompt is longer than the tiny context: the cut is reported, not silent.
    assert "warning: prompt has" in err
    assert out == expected + "\n"


def test_generate_json_output_parses(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, plain, _ = _run(capsys, *_gen_args(model_dir, "Say “hi”.", "--input", "é"))
    assert code == 0
    code, out, _ = _run(capsys, *_gen_args(model_dir, "Say “hi”.", "--input", "é", "--json"))
    assert code == 0
    record = json.loads(out)
    assert record == {"instruction": "Say “hi”.", "input": "é", "model_response": plain[:-1]}


def test_seeded_sampling_is_reproducible(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def sample(seed: str) -> str:
        sampling = ("--temperature", "1.0", "--top-k", "100", "--top-p", "0.95", "--seed", seed)
        code, out, _ = _run(capsys, *_gen_args(model_dir, "Write a word.", *sampling, "--json"))
        assert code == 0
        return json.loads(out)["model_response"]

    first = sample("7")
    assert sample("7") == first
    assert sample("8") != first  # near-uniform random model: another seed, another answer


def test_bad_options_fail_without_traceback(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, *_gen_args(model_dir, "Hi", "--temperature", "-1"))
    assert code == 2
    assert "--temperature" in err
    code, _, err = _run(capsys, *_gen_args(model_dir, "Hi", "--top-p", "abc"))
    assert code == 2
    assert "not a valid float" in err
    code, _, err = _run(capsys, *_gen_args(model_dir, "Hi", "--max-new-tokens", "64"))
    assert code == 1
    assert "context length (64)" in err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--temperature", "nan", "temperature must be >= 0, got nan"),
        ("--top-k", "0", "top_k must be >= 1"),
        ("--top-p", "1.5", "top_p must be in (0, 1]"),
        ("--top-p", "0", "top_p must be in (0, 1]"),
        ("--max-new-tokens", "0", "max_new_tokens must be in 1..1023"),
        ("--max-new-tokens", "5000", "max_new_tokens must be in 1..1023"),
        ("--seed", "-1", "seed must be in 0.."),
    ],
)
def test_options_are_checked_by_the_params_rules(
    model_dir: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    """Each sampling option fails, before the model loads, with the generate params' message."""
    code, _, err = _run(capsys, *_gen_args(model_dir, "Hi", option, value))
    assert code == 2
    assert f"argument {option}: {message}" in err
    assert "Traceback" not in err


def test_option_defaults_are_the_generate_params_defaults() -> None:
    defaults = GenerateParams()
    for argv in (["chat", "--model", "m"], ["generate", "--model", "m", "--instruction", "x"]):
        args = cli.build_parser().parse_args(argv)
        for name in (f.name for f in dataclasses.fields(SamplingParams)):
            assert getattr(args, name) == getattr(defaults, name), (argv[0], name)
        assert args.device == defaults.device
        assert args.response_extraction == defaults.response_extraction


def test_module_entry_point_runs(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, expected, _ = _run(capsys, *_gen_args(model_dir, "Name a colour."))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [sys.executable, "-m", "gpt2_instruct", *_gen_args(model_dir, "Name a colour.")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.replace("\r\n", "\n") == expected


# --- chat ----------------------------------------------------------------------------------


def test_chat_answers_piped_instructions_until_eof(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = Entry("Name a colour.", "", "")
    second = Entry("Add the numbers.", "2 and 3", "")
    expected = [_library_answer(model_dir, e)[1] for e in (first, second)]
    stdin = f"{first.instruction}\n\n{second.instruction}\n{second.input}\n"
    code, out, err = _run(capsys, *_chat_args(model_dir), stdin=stdin)
    assert code == 0
    assert err.count("warning: prompt has") == 2  # stderr, so piped answers stay clean
    # Piped input: no banner or prompts, only each answer and a blank line after it.
    assert out == "".join(f"{answer}\n\n" for answer in expected)
    assert "Instruction:" not in out


@pytest.mark.parametrize("stdin", ["", "\nNever answered\n\n", "/quit\nNever answered\n\n"])
def test_chat_stops_on_eof_empty_instruction_or_quit(
    model_dir: Path, capsys: pytest.CaptureFixture[str], stdin: str
) -> None:
    assert _run(capsys, *_chat_args(model_dir), stdin=stdin) == (0, "", "")


class _Terminal(io.StringIO):
    """Piped text that claims to be a terminal, to see the interactive prompts."""

    def isatty(self) -> bool:
        return True


def test_chat_on_a_terminal_shows_prompts(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", _Terminal("Name a colour.\n\n/quit\n"))
    assert cli.main(_chat_args(model_dir)) == 0
    out = capsys.readouterr().out
    assert out.count("Instruction: ") == 2
    assert out.count("Input (optional): ") == 1


FakeGenerate = Callable[..., list[list[int]]]


def _scripted_generate(tokens: list[int], seen: list[str], read: Callable[[], str]) -> FakeGenerate:
    """A stand-in for ``generate`` that emits ``tokens`` and records stdout after each one."""

    def fake(
        model: GPTModel,
        prompts: Sequence[Sequence[int]],
        *,
        eos_id: int,
        sampling: SamplingConfig,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        assert on_token is not None
        for token in tokens:
            on_token(0, token)
            seen.append(read())
        return [list(tokens)]

    return fake


def test_chat_streams_multibyte_characters_split_across_tokens(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = load_tokenizer(model_dir)
    answer = "Café ☕ the end"
    tokens = tokenizer.encode(answer)
    assert len(tokens) > len(answer)  # é and ☕ really are split over byte tokens
    seen: list[str] = []
    fake = _scripted_generate(tokens, seen, lambda: capsys.readouterr().out)
    monkeypatch.setattr(cli, "generate", fake)
    code, out, _ = _run(capsys, *_chat_args(model_dir), stdin="Describe.\n\n")
    assert code == 0
    streamed = "".join(seen)
    assert "\ufffd" not in streamed
    assert streamed + out == answer + "\n\n"
    # Each character appears the moment its last byte arrives, not before and not later.
    cafe = tokenizer.encode("Caf")
    e_acute = tokenizer.encode("é")
    assert len(e_acute) == 2
    assert seen[len(cafe)] == ""  # first byte of é: nothing printable yet
    assert seen[len(cafe) + 1] == "é"


def test_utf8_stream_holds_back_incomplete_characters() -> None:
    stream = cli.Utf8Stream()
    assert stream.feed(b"a\xe2") == "a"
    assert stream.feed(b"\x98") == ""
    assert stream.feed(b"\x95b\xc3") == "☕b"
    assert stream.finish() == "\ufffd"  # cut off for good at the end
    stream = cli.Utf8Stream()
    assert stream.feed(b"\xffz") == "\ufffdz"  # an impossible byte does not stall the stream


@pytest.mark.parametrize(
    ("text", "style"),
    [
        ("Blue.", "alpaca"),
        ("  \n### Response:\n  Blue.\n\n", "alpaca"),
        ("### Resp", "alpaca"),
        ("### Response:", "alpaca"),
        ("### Responses are\n\nmany  ", "alpaca"),
        ("Red\n\n### Response: green \n", "alpaca"),
        (" \n ", "alpaca"),
        ("", "alpaca"),
        ("<|assistant|>\nHi there", "phi3"),
        ("<|assis", "phi3"),
    ],
)
def test_response_stream_equals_extract_response(text: str, style: str) -> None:
    for size in (1, 3, len(text) or 1):
        stream = cli.ResponseStream(style)
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        streamed = "".join(stream.feed(chunk) for chunk in chunks) + stream.finish()
        assert streamed == extract_response(text, style)
