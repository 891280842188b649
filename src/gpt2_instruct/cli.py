"""Command line for talking to a fine-tuned model: ``chat`` (interactive) and ``generate``;
``serve`` puts it behind an OpenAI-compatible HTTP API (``gpt2_instruct.serve``).

Both commands build the prompt exactly as training did (``format_prompt`` with the style
saved in ``config.json``), so the model sees the template it learned, and both show the
answer that the evaluation would score (``extract_response``). ``chat`` streams the answer
while it is generated; ``generate`` prints it once, as text or JSON, for scripts.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from gpt2_instruct.data import RESPONSE_EXTRACTIONS, Entry, extract_response, format_prompt
from gpt2_instruct.devices import configure
from gpt2_instruct.generation import generate
from gpt2_instruct.model import GPTModel
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import GenerateParams, SamplingParams
from gpt2_instruct.tokenizer import Tokenizer

__all__ = [
    "ResponseStream",
    "Utf8Stream",
    "build_parser",
    "main",
]

PROG = "gpt2-instruct"
QUIT_COMMANDS = frozenset({"/quit"})
DEFAULTS = GenerateParams()  # the options' defaults are the generate stage's params'


# --- streaming output ----------------------------------------------------------------------


class Utf8Stream:
    """Turn token bytes into text as they arrive, holding back an incomplete character.

    GPT-2's byte-level BPE can split one multi-byte UTF-8 character over several tokens;
    decoding each token alone would print replacement characters. The incremental decoder
    keeps the bytes of an unfinished character and emits the longest valid prefix; bytes that
    can never become valid UTF-8 are replaced, so one bad byte cannot stall the stream.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """Text completed by ``data`` (possibly empty)."""
        return self._decoder.decode(data)

    def finish(self) -> str:
        """Whatever is left; a character cut off at the end becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


def _response_header(style: str) -> str:
    """The header that ends the prompt of ``style``, which a model sometimes repeats."""
    return format_prompt(Entry("", "", ""), style).rstrip("\n").rsplit("\n", 1)[-1]


class ResponseStream:
    """Streamed text, cleaned up on the fly exactly as :func:`extract_response` would.

    Text that may still turn out to be (part of) a response header to drop is held back
    until that is decided, leading whitespace is dropped and trailing whitespace held back
    until more text follows, so for any split of ``full_text`` into fed chunks the streamed
    answer (``feed``s then ``finish``) equals ``extract_response(full_text, style, mode)``
    and chat shows what ``generate`` prints.

    ``mode="reference"`` removes every header, wherever it is and however the tokens cut
    it, as ``str.replace`` would (scanning left to right, no rescan after a removal);
    ``mode="leading"`` only one header before the answer proper.
    """

    def __init__(self, style: str, mode: str = "reference") -> None:
        extract_response("", style, mode)  # rejects an unknown style or mode up front
        self._mode = mode
        self._header = _response_header(style)
        self._tail = ""  # reference: the undecided end, a proper prefix of the header
        self._pending = ""  # leading: everything seen before the header question is decided
        self._decided = False  # leading: whether that question is settled
        self._started = False  # whether the answer proper (after leading whitespace) began
        self._held_space = ""  # whitespace that may turn out to be trailing

    def _undecided_from(self, text: str) -> int:
        """Where the suffix of ``text`` that may still grow into a header starts."""
        for start in range(max(0, len(text) - len(self._header) + 1), len(text)):
            if self._header.startswith(text[start:]):
                return start
        return len(text)

    def _without_headers(self, text: str) -> str:
        """Reference mode: ``text`` (after the held tail) with whole headers removed, less
        a new undecided tail, which is kept for the next call."""
        text = self._tail + text
        kept = []
        while (at := text.find(self._header)) >= 0:
            kept.append(text[:at])
            text = text[at + len(self._header) :]
        cut = self._undecided_from(text)
        kept.append(text[:cut])
        self._tail = text[cut:]
        return "".join(kept)

    def _stripped(self, text: str) -> str:
        """``text`` less leading whitespace of the answer and whitespace that may trail it."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body) :]
        return body

    def feed(self, text: str) -> str:
        """The part of ``text`` that is certainly part of the answer."""
        if self._mode == "reference":
            return self._stripped(self._without_headers(text))
        if not self._decided:
            self._pending += text
            rest = self._pending.lstrip()
            if self._header.startswith(rest):  # empty, or maybe (all of) a header
                return ""
            self._decided = True
            text = rest.removeprefix(self._header)
        return self._stripped(text)

    def finish(self) -> str:
        """What was held back but belongs to the answer; trailing whitespace is dropped."""
        if self._mode == "reference":
            text, self._tail = self._tail, ""  # never completed: not a header
        elif not self._decided:
            self._decided = True
            text = self._pending.lstrip().removeprefix(self._header)
        else:
            text = ""
        return self._stripped(text)


class _AnswerPrinter:
    """Token callback that writes the cleaned answer to ``out`` as tokens arrive."""

    def __init__(
        self, tokenizer: Tokenizer, style: str, out: TextIO, mode: str = "reference"
    ) -> None:
        self._tokenizer = tokenizer
        self._bytes = Utf8Stream()
        self._text = ResponseStream(style, mode)
        self._out = out
        self.printed = ""

    def _write(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._out.flush()
            self.printed += text

    def __call__(self, row: int, token: int) -> None:
        """Print the new token's text; ``row`` is always 0 (one prompt at a time)."""
        self._write(self._text.feed(self._bytes.feed(_token_bytes(self._tokenizer, [token]))))

    def finish(self) -> None:
        """Flush held-back text, then end the answer's line and add a blank one (always both,
        so piped output has the same shape for an empty answer)."""
        self._write(self._text.feed(self._bytes.finish()))
        self._write(self._text.finish())
        self._out.write("\n\n")
        self._out.flush()


# --- generation ----------------------------------------------------------------------------


def _token_bytes(tokenizer: Tokenizer, ids: list[int]) -> bytes:
    """Bytes of ``ids``; ids past the tokenizer (a padded embedding) carry no text."""
    return tokenizer.decode_bytes([i for i in ids if i < tokenizer.vocab_size])


def _prompt_ids(
    model: GPTModel, tokenizer: Tokenizer, style: str, entry: Entry, max_new_tokens: int
) -> list[int]:
    """Token ids of the training-format prompt; warns when the context forces a cut."""
    ids = tokenizer.encode(format_prompt(entry, style))
    room = model.config.context_length - max_new_tokens
    if len(ids) > room > 0:
        print(
            f"{PROG}: warning: prompt has {len(ids)} tokens; only the last {room} fit the "
            f"context of {model.config.context_length} with --max-new-tokens {max_new_tokens}",
            file=sys.stderr,
        )
    return ids


def _answer(
    model: GPTModel,
    tokenizer: Tokenizer,
    style: str,
    entry: Entry,
    sampling: SamplingParams,
    printer: _AnswerPrinter | None = None,
    mode: str = "reference",
) -> str:
    """The model's answer to one entry, optionally streamed through ``printer``; ``mode``
    is :func:`extract_response`'s (the printer must have been made with the same)."""
    ids = _prompt_ids(model, tokenizer, style, entry, sampling.max_new_tokens)
    [new] = generate(model, [ids], eos_id=tokenizer.eot_id, sampling=sampling, on_token=printer)
    text = _token_bytes(tokenizer, new).decode("utf-8", errors="replace")
    return extract_response(text, style, mode)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    """The sampling options (each already checked by its ``--option``'s type)."""
    return SamplingParams(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams)}
    )


def _device(name: str) -> torch.device:
    """The device seam for this command (``devices.configure``); ``auto`` picks CUDA when
    present: chat latency matters more than bit-exactness."""
    try:
        return configure(name).device
    except ValueError as err:
        raise ValueError(f"--{err}") from None


def _load(args: argparse.Namespace, sampling: SamplingParams) -> tuple[GPTModel, Tokenizer, str]:
    """Load the model and reject an answer length its context cannot hold before any prompt."""
    model, tokenizer, style = load_instruct_model(args.model, device=_device(args.device))
    context = model.config.context_length
    if sampling.max_new_tokens >= context:
        raise ValueError(
            f"--max-new-tokens {sampling.max_new_tokens} must be below the model's context "
            f"length ({context}), which also has to hold the prompt"
        )
    return model, tokenizer, style


def _read_line(prompt: str, interactive: bool) -> str | None:
    """One line from stdin without its newline, or None at end of input.

    A terminal gets the prompt (and ``input``'s line editing); piped input gets neither,
    so a script's output holds only the answers.
    """
    if interactive:
        try:
            return input(prompt)
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def cmd_chat(args: argparse.Namespace) -> int:
    """Answer instructions from stdin until end of input, an empty instruction or /quit."""
    sampling = _sampling(args)
    model, tokenizer, style = _load(args, sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"Model {args.model} (prompt style {style}). "
            "Enter an empty instruction or /quit to leave.\n"
        )
    while True:
        instruction = _read_line("Instruction: ", interactive)
        if instruction is None or not instruction.strip() or instruction.strip() in QUIT_COMMANDS:
            return 0
        input_text = _read_line("Input (optional): ", interactive) or ""
        mode = args.response_extraction
        printer = _AnswerPrinter(tokenizer, style, sys.stdout, mode)
        if interactive:
            sys.stdout.write("\n")
        try:
            entry = Entry(instruction, input_text, "")
            _answer(model, tokenizer, style, entry, sampling, printer, mode)
        except KeyboardInterrupt:
            if not interactive:
                raise
            sys.stdout.write(" [interrupted]")
        printer.finish()


def cmd_generate(args: argparse.Namespace) -> int:
    """Print one answer, as plain text or as the JSON record the generate stage writes."""
    sampling = _sampling(args)
    model, tokenizer, style = _load(args, sampling)
    entry = Entry(args.instruction, args.input, "")
    response = _answer(model, tokenizer, style, entry, sampling, mode=args.response_extraction)
    if args.json:
        record = {"instruction": entry.instruction, "input": entry.input}
        print(json.dumps({**record, "model_response": response}, ensure_ascii=False))
    else:
        print(response)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model over an OpenAI-compatible HTTP API until interrupted."""
    try:  # the server's libraries are the optional extra "serve"; the pipeline needs none
        from gpt2_instruct.serve import ServeOptions, run_server
    except ImportError as err:
        raise ValueError(
            f"serve needs FastAPI and uvicorn ({err}); install them with "
            "pip install 'gpt2-instruct[serve]'"
        ) from None
    defaults = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    options = ServeOptions(
        model_id=args.model_name or args.model.resolve().name,
        defaults=defaults,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
    )
    run_server(
        args.model,
        host=args.host,
        port=args.port,
        device=_device(args.device),
        options=options,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        response_extraction=args.response_extraction,
    )
    return 0


# --- argument parsing ----------------------------------------------------------------------


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    """Parse an option value; argparse would otherwise name our helper in its message."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """The argparse type of an integer option in ``low..high``."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    return parse


def _param(name: str) -> Callable[[str], Any]:
    """The argparse type of the option for ``GenerateParams.name``: the text parsed as the
    field's type, then checked by the params' own rule, before the (slow) model load."""
    hint = typing.get_type_hints(GenerateParams)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: an X here
        [hint] = [arg for arg in typing.get_args(hint) if arg is not type(None)]

    def parse(text: str) -> Any:
        value = _number(text, hint)
        try:
            dataclasses.replace(DEFAULTS, **{name: value})
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    return parse


def _add_common(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """Options shared by the commands, so they decode identically (``serve`` has no --seed)."""
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="fine-tuned model directory (model.safetensors, config.json, encoder.json, vocab.bpe)",
    )
    parser.add_argument(
        "--temperature",
        type=_param("temperature"),
        default=DEFAULTS.temperature,
        help="sampling temperature; 0 is greedy decoding (default %(default)s)",
    )
    parser.add_argument(
        "--top-k", type=_param("top_k"), default=DEFAULTS.top_k, help="keep the k best tokens"
    )
    parser.add_argument(
        "--top-p",
        type=_param("top_p"),
        default=DEFAULTS.top_p,
        help="nucleus sampling probability mass",
    )
    if seed:
        parser.add_argument(
            "--seed",
            type=_param("seed"),
            default=DEFAULTS.seed,
            help="sampling seed (default %(default)s)",
        )
    parser.add_argument(
        "--max-new-tokens",
        type=_param("max_new_tokens"),
        default=DEFAULTS.max_new_tokens,
        help="most tokens per answer (default %(default)s)",
    )
    parser.add_argument(
        "--device",
        default=DEFAULTS.device,
        help="torch device, e.g. cpu or cuda (default %(default)s: cuda if present)",
    )
    parser.add_argument(
        "--response-extraction",
        choices=RESPONSE_EXTRACTIONS,
        default=DEFAULTS.response_extraction,
        help="how the answer is cut from the generated text: reference removes every "
        "response header, as the reference does; leading only one before the answer "
        "(default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``gpt2-instruct`` argument parser with its ``chat``, ``generate`` and ``serve``
    commands."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Talk to an instruction-fine-tuned GPT-2 model."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chat = commands.add_parser(
        "chat",
        help="interactive instruction loop on stdin",
        description="Read an instruction and an optional input per turn from stdin and stream "
        "the answer; stop at end of input, an empty instruction or /quit. Piped input gives "
        "each turn as two lines: the instruction, then its input or an empty line.",
    )
    _add_common(chat)
    chat.set_defaults(func=cmd_chat)
    gen = commands.add_parser(
        "generate", help="answer one instruction", description="Print one answer to stdout."
    )
    _add_common(gen)
    gen.add_argument("--instruction", required=True, help="the instruction to answer")
    gen.add_argument("--input", default="", help="optional input for the instruction")
    gen.add_argument(
        "--json",
        action="store_true",
        help='print {"instruction", "input", "model_response"} as one JSON line',
    )
    gen.set_defaults(func=cmd_generate)
    _add_serve(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction) -> None:
    """The ``serve`` command; the sampling options are the defaults of requests that give none
    (a request without ``seed`` gets a random one, so there is no --seed)."""
    serve = commands.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve the model at http://HOST:PORT/v1 (/models, /chat/completions, "
        "/completions; stream: true for server-sent events). A chat is one user message, the "
        "instruction, and optionally a second, its input. --temperature, --top-k, --top-p and "
        "--max-new-tokens are the defaults of requests that leave them out. Unauthenticated: "
        "keep the default host 127.0.0.1 unless a proxy in front checks access.",
    )
    _add_common(serve, seed=False)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    serve.add_argument(
        "--port", type=_bounded(1, 65535), default=8000, help="TCP port (default %(default)s)"
    )
    serve.add_argument(
        "--model-name", help="the model id clients ask for (default: the directory's name)"
    )
    serve.add_argument(
        "--max-batch",
        type=_bounded(1, 256),
        default=8,
        help="most greedy requests decoded together (default %(default)s)",
    )
    serve.add_argument(
        "--max-queue",
        type=_bounded(1, 100_000),
        default=64,
        help="most requests waiting; more get HTTP 503 (default %(default)s)",
    )
    serve.add_argument(
        "--max-tokens-limit",
        type=_bounded(1, 1 << 20),
        default=None,
        help="largest max_tokens a request may ask for (default: what the context holds)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_bounded(1, 1 << 30),
        default=1 << 20,
        help="largest request body; larger ones get HTTP 413 (default %(default)s)",
    )
    serve.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting, for tests."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; argparse already printed
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    try:
        return args.func(args)
    except ValueError as err:  # ModelDirError, bad sampling options, too long an answer
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
