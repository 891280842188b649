"""``gpt2-instruct serve`` against the official ``openai`` client, over real HTTP on 127.0.0.1.

The models are built here: a random one whose greedy answers differ by prompt (so a mixed-up
batch row would show) and one whose weights are set by hand so that it answers "85" and
stops (an answer that ends at ``<|endoftext|>``). Every expected answer comes from the
library itself (``generation.generate`` and ``data.extract_response``), never from the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch
import uvicorn
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from gpt2_instruct import cli
from gpt2_instruct.data import Entry, extract_response, format_prompt
from gpt2_instruct.generation import generate
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.model_dir import load_instruct_model
from gpt2_instruct.params import SamplingParams
from gpt2_instruct.serve import ServeOptions, create_app, is_loopback
from gpt2_instruct.serve_engine import Engine, Job, StopScanner, TextPipeline, answer_deltas
from gpt2_instruct.tokenizer import load_tokenizer
from gpt2_instruct.weights import save_model

MERGES = [("t", "h"), ("th", "e")]
VOCAB = 256 + len(MERGES) + 1  # bytes, merges, <|endoftext|>
MODEL_ID = "tiny-instruct"
INSTRUCTIONS = [
    "Name a color.",
    "Translate 'cat' into French.",
    "Write a haiku about the sea.",
    "What is 2+2?",
    "List three fruits.",
    "Summarize the plot of Hamlet.",
]


# --- model folders ----------------------------------------------------------------------------


def random_model_dir(directory: Path, write_bpe: Callable[..., Path]) -> Path:
    """A random model with weights large enough that its answers depend on the prompt."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=VOCAB, context_length=1024, n_embd=32, n_layer=2, n_head=2,
        tie_embeddings=False,
    )  # fmt: skip
    model = GPTModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:  # unit-scale embeddings, fan-in-scaled projections
                std = 1.0 if "emb" in name else 1.0 / math.sqrt(param.shape[1])
                nn.init.normal_(param, std=std)
    save_model(model, directory, extra_config={"gpt2_instruct": {"prompt_style": "alpaca"}})
    return write_bpe(directory, MERGES)


def digit_model_dir(directory: Path, write_bpe: Callable[..., Path], reply: str = "85") -> Path:
    """A model whose greedy answer to any alpaca prompt is ``reply`` then <|endoftext|>.

    The blocks add nothing (zero output projections) and positions are zero, so the next
    token depends on the last token alone; a separate head maps "\\n" (the end of every
    prompt) to the reply's first character, each character to the next, the last to EOS.
    The characters get orthogonal zero-mean embeddings, so each row's logit is positive
    only for its successor.
    """
    write_bpe(directory, MERGES)
    tokenizer = load_tokenizer(directory)
    chain = [tokenizer.encode(ch)[0] for ch in "\n" + reply] + [tokenizer.eot_id]
    width = 2 * len(chain)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=VOCAB, context_length=1024, n_embd=width, n_layer=1, n_head=1,
        tie_embeddings=False,
    )  # fmt: skip
    model = GPTModel(config)
    with torch.no_grad():
        for block in model.blocks:
            for linear in (block.attn.out_proj, block.ff.proj):
                linear.weight.zero_()
                linear.bias.zero_()
        model.pos_emb.weight.zero_()
        head = model.out_head_weight
        head.zero_()
        for k, (token, successor) in enumerate(itertools.pairwise(chain)):
            pattern = torch.zeros(width)
            pattern[2 * k], pattern[2 * k + 1] = 1.0, -1.0
            model.tok_emb.weight[token] = pattern
            head[successor] = 10.0 * pattern
    save_model(model, directory, extra_config={"gpt2_instruct": {"prompt_style": "alpaca"}})
    return directory


# --- a real server in a thread ------------------------------------------------------------------


@contextlib.contextmanager
def running_server(
    model_dir: Path, *, model_id: str = MODEL_ID, max_batch: int = 8, **options: object
) -> Iterator[tuple[str, Engine]]:
    """Serve ``model_dir`` with uvicorn on a free 127.0.0.1 port; yields (base URL, engine).

    The socket is bound here (port 0), so the port is known before the server starts; on
    exit the server is told to stop and the thread must end within seconds.
    """
    model, tokenizer, style = load_instruct_model(model_dir)
    engine = Engine(model, tokenizer, style, max_batch=max_batch)
    app = create_app(engine, ServeOptions(model_id=model_id, **options))  # type: ignore[arg-type]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the server thread died while starting"
        assert time.monotonic() < deadline, "the server did not start within 30 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, write_bpe: Callable[..., Path]) -> Path:
    return random_model_dir(tmp_path_factory.mktemp("serve") / "model", write_bpe)


@pytest.fixture(scope="module")
def served(tiny_dir: Path) -> Iterator[tuple[str, Engine]]:
    with running_server(tiny_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(served: tuple[str, Engine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0], api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def library(tiny_dir: Path):
    return load_instruct_model(tiny_dir)


def raw_answer(library, prompt: str, sampling: SamplingParams) -> tuple[list[int], str]:
    """The library's new tokens and their text for a raw prompt."""
    model, tokenizer, _ = library
    [new] = generate(model, [tokenizer.encode(prompt)], eos_id=tokenizer.eot_id, sampling=sampling)
    return new, tokenizer.decode(new)


def chat_answer(library, instruction: str, max_new: int, **sampling: object) -> tuple[int, str]:
    """(tokens, answer) that ``gpt2-instruct generate`` would give."""
    _, _, style = library
    prompt = format_prompt(Entry(instruction, "", ""), style)
    new, text = raw_answer(library, prompt, SamplingParams(max_new_tokens=max_new, **sampling))  # type: ignore[arg-type]
    return len(new), extract_response(text, style)


def chat(client: openai.OpenAI, instruction: str, **kwargs: object):
    messages = [{"role": "user", "content": instruction}]
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)  # type: ignore[arg-type]


# --- the happy paths ----------------------------------------------------------------------------


def test_models_list_names_the_served_model(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_greedy_chat_is_our_generate_answer(client: openai.OpenAI, library) -> None:
    for instruction in INSTRUCTIONS[:3]:
        tokens, expected = chat_answer(library, instruction, 24)
        reply = chat(client, instruction, temperature=0, max_tokens=24)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason == "length"  # this model never says EOS here
        prompt = library[1].encode(format_prompt(Entry(instruction, "", ""), library[2]))
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.usage.completion_tokens == tokens == 24
        assert reply.usage.total_tokens == len(prompt) + 24
    assert len({chat_answer(library, i, 24)[1] for i in INSTRUCTIONS}) == len(INSTRUCTIONS)
    newer = chat(client, INSTRUCTIONS[0], max_completion_tokens=5)  # max_tokens' newer name
    assert newer.usage.completion_tokens == 5 and newer.choices[0].finish_reason == "length"


def test_a_second_user_message_is_the_input(client: openai.OpenAI, library) -> None:
    style = library[2]
    prompt = format_prompt(Entry("Rewrite the sentence.", "The car is fast.", ""), style)
    _, text = raw_answer(library, prompt, SamplingParams(max_new_tokens=16))
    messages = [
        {"role": "user", "content": "Rewrite the sentence."},
        {"role": "user", "content": "The car is fast."},
    ]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == extract_response(text, style)


def test_streamed_chunks_concatenate_to_the_answer(client: openai.OpenAI, library) -> None:
    _, expected = chat_answer(library, INSTRUCTIONS[1], 30)
    stream = chat(
        client, INSTRUCTIONS[1], max_tokens=30, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected
    assert sum(1 for piece in pieces if piece) > 1  # really streamed, not one piece at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_ends_with_done(served: tuple[str, Engine]) -> None:
    body = {"model": MODEL_ID, "prompt": "the cat", "max_tokens": 5, "stream": True}
    with requests.post(f"{served[0]}/completions", json=body, stream=True, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


def test_completions_continue_a_raw_prompt(client: openai.OpenAI, library) -> None:
    prompt = "Once upon a time, the"
    _, text = raw_answer(library, prompt, SamplingParams(max_new_tokens=20))
    reply = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0)
    assert reply.choices[0].text == text  # no template, no stripping
    assert reply.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text


def test_stop_cuts_before_the_stop_string(client: openai.OpenAI, library) -> None:
    style = library[2]
    prompt = format_prompt(Entry(INSTRUCTIONS[2], "", ""), style)
    _, text = raw_answer(library, prompt, SamplingParams(max_new_tokens=40))
    stop = text[10:13]
    assert stop.strip() and text.find(stop) < 30  # the test needs a stop inside the answer
    expected = extract_response(text[: text.find(stop)], style)
    for stops in (stop, ["never-said", stop]):
        reply = chat(client, INSTRUCTIONS[2], max_tokens=40, stop=stops)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens < 40
        streamed = chat(client, INSTRUCTIONS[2], max_tokens=40, stop=stops, stream=True)
        chunks = list(streamed)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_is_our_sampler(client: openai.OpenAI, library) -> None:
    kwargs = {"temperature": 0.9, "top_p": 0.95, "max_tokens": 20}
    first = chat(client, INSTRUCTIONS[0], seed=7, **kwargs).choices[0].message.content
    assert chat(client, INSTRUCTIONS[0], seed=7, **kwargs).choices[0].message.content == first
    _, expected = chat_answer(library, INSTRUCTIONS[0], 20, temperature=0.9, top_p=0.95, seed=7)
    assert first == expected
    others = {
        chat(client, INSTRUCTIONS[0], seed=s, **kwargs).choices[0].message.content for s in (8, 9)
    }
    assert others != {first}  # the seed matters


def test_eos_ends_with_finish_reason_stop(tmp_path: Path, write_bpe: Callable[..., Path]) -> None:
    with running_server(digit_model_dir(tmp_path / "digits", write_bpe)) as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = chat(client, "Score this.", max_tokens=10)
        streamed = list(chat(client, "Score this.", max_tokens=10, stream=True))
    assert reply.choices[0].message.content == "85"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 2
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "85"
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_are_all_answered_right(
    client: openai.OpenAI,
    library,
    served: tuple[str, Engine],
) -> None:
    cases = [(instruction, 8 + 3 * i) for i, instruction in enumerate(INSTRUCTIONS * 2)]
    expected = [chat_answer(library, instruction, n)[1] for instruction, n in cases]
    sampled = chat_answer(library, INSTRUCTIONS[3], 12, temperature=1.0, seed=3)[1]
    before = sum(served[1].batch_sizes.values())

    def ask(case: tuple[str, int]) -> str | None:
        return chat(client, case[0], max_tokens=case[1], temperature=0).choices[0].message.content

    def ask_sampled() -> str | None:
        reply = chat(client, INSTRUCTIONS[3], max_tokens=12, temperature=1.0, seed=3)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(cases) + 1) as pool:
        sampled_future = pool.submit(ask_sampled)
        answers = list(pool.map(ask, cases))
    assert answers == expected
    assert sampled_future.result() == sampled
    assert sum(served[1].batch_sizes.values()) - before <= len(cases) + 1


def test_queued_greedy_requests_share_one_batch(tiny_dir: Path, library) -> None:
    """Deterministic batching: jobs queued before the worker starts form one batch."""
    model, tokenizer, style = library
    engine = Engine(model, tokenizer, style, max_batch=4)

    async def run() -> list[str]:
        jobs = []
        for instruction in INSTRUCTIONS[:5]:
            prompt = tokenizer.encode(format_prompt(Entry(instruction, "", ""), style))
            pipe = TextPipeline(tokenizer, [], style, "reference")
            jobs.append((engine.submit(prompt, SamplingParams(max_new_tokens=10)), pipe))
        engine.start()
        answers = []
        try:
            for job, pipe in jobs:
                answers.append("".join([piece async for piece in answer_deltas(job, pipe)]))
            return answers
        finally:
            engine.stop()

    answers = asyncio.run(run())
    assert answers == [chat_answer(library, i, 10)[1] for i in INSTRUCTIONS[:5]]
    assert engine.batch_sizes == {4: 1, 1: 1}


def test_a_batch_nobody_reads_stops_decoding(library, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once every row is finished (here: cancelled after 3 tokens, as a stop string or a
    gone client does), the worker ends the batch instead of decoding to max_tokens."""
    model, tokenizer, style = library
    engine = Engine(model, tokenizer, style)
    steps = 0
    head = model.head

    def counting_head(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal steps
        steps += 1
        return head(hidden)

    monkeypatch.setattr(model, "head", counting_head)
    original = Job.deliver

    def deliver(job: Job, item: object) -> None:
        original(job, item)  # type: ignore[arg-type]
        if job.sent == 3:
            job.cancel()

    monkeypatch.setattr(Job, "deliver", deliver)

    async def run() -> Job:
        prompt = tokenizer.encode(format_prompt(Entry(INSTRUCTIONS[0], "", ""), style))
        job = engine.submit(prompt, SamplingParams(max_new_tokens=500))
        engine.start()
        while not isinstance(await job.results.get(), str):  # until the batch ends
            pass
        engine.stop()
        return job

    job = asyncio.run(run())
    assert job.sent == 3
    assert steps <= 5  # 3 tokens, one step to notice; not 500


# --- bad requests -------------------------------------------------------------------------------


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' does not exist") as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"messages": []}, "messages", "at least 1 item"),
        ({"max_tokens": 5000}, "max_tokens", "at most 1023"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens", "at most 1023"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"max_tokens": True}, "max_tokens", "valid integer"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"n": 2}, "n", "only n=1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"logprobs": True}, "logprobs", "not supported"),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            },
            "messages",
            "system messages are refused",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Yo"},
                    {"role": "user", "content": "?"},
                ]
            },
            "messages",
            "one instruction",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
            "text content",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "needs a content"),
    ],
)
def test_bad_requests_are_400_with_clear_messages(
    client: openai.OpenAI, kwargs: dict[str, object], param: str, words: str
) -> None:
    body: dict[str, object] = {"messages": [{"role": "user", "content": "Hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError, match=words) as err:
        client.chat.completions.create(model=MODEL_ID, **body)  # type: ignore[arg-type]
    assert err.value.status_code == 400
    assert err.value.param == param
    assert err.value.type == "invalid_request_error"


def test_answer_beyond_the_context_is_refused(client: openai.OpenAI, library) -> None:
    prompt = library[1].encode(format_prompt(Entry("Hi", "", ""), library[2]))
    room = 1024 - len(prompt)
    chat(client, "Hi", max_tokens=1)  # fits
    with pytest.raises(openai.BadRequestError, match=f"at most {room}, got {room + 1}") as err:
        chat(client, "Hi", max_tokens=room + 1)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context of 1024") as err:
        client.completions.create(model=MODEL_ID, prompt="x" * 1024)
    assert err.value.param == "prompt"


JSON_HEADERS = {"Content-Type": "application/json"}


def _post(url: str, data: bytes, content_type: str = "application/json") -> requests.Response:
    headers = {"Content-Type": content_type}
    return requests.post(f"{url}/chat/completions", data=data, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b'{"model": "tiny-instruct", "messages": [', 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (
            b'{"messages": [{"role": "user", "content": "Hi"}]}',
            400,
            "missing required field 'model'",
        ),
        (b'{"model": "tiny-instruct", "messages": "Hi"}', 400, "'messages'"),
        (
            b'{"model": "tiny-instruct", "messages": [{"role": "user", "content": "Hi"}], '
            b'"temperature": NaN}',
            400,
            "finite",
        ),
        (b'{"model": "tiny-instruct", "messages": [{"content": "Hi"}]}', 400, "'messages[0].role'"),
        (b"x" * 5000, 413, "over the limit of 4096 bytes"),
    ],
)
def test_malformed_bodies_get_openai_shaped_errors(
    data: bytes, status: int, words: str, small_body_server: str
) -> None:
    reply = _post(small_body_server, data)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]


@pytest.fixture(scope="module")
def small_body_server(tiny_dir: Path) -> Iterator[str]:
    with running_server(tiny_dir, max_body_bytes=4096, max_tokens_limit=64) as (url, _):
        yield url


def test_server_limits(small_body_server: str) -> None:
    good = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]})
    assert _post(small_body_server, good.encode()).status_code == 200
    reply = _post(small_body_server, good.encode(), content_type="text/plain")
    assert reply.status_code == 400 and "Content-Type: application/json" in reply.text
    too_many = json.dumps({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 65}).encode()
    reply = requests.post(
        f"{small_body_server}/completions", data=too_many, headers=JSON_HEADERS, timeout=60
    )
    assert reply.status_code == 400 and "at most 64" in reply.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield from [b" " * 3000, b" " * 3000]

    reply = requests.post(f"{small_body_server}/chat/completions", data=chunks(), timeout=60)
    assert reply.status_code == 413
    assert requests.get(f"{small_body_server}/nowhere", timeout=60).json()["error"]["code"] == (
        "not_found"
    )


# --- pieces ---------------------------------------------------------------------------------------


@given(
    text=st.text(alphabet="abc\n", max_size=30),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
@example(text="xabcx", stops=["abc", "b"], cuts=[3])  # "b" is seen first, "abc" starts first
def test_stop_scanner_cuts_like_the_whole_text(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    found = [at for stop in stops if (at := text.find(stop)) >= 0]
    expected = text[: min(found)] if found else text
    scanner = StopScanner(stops)
    bounds = [0, *sorted(cuts), len(text)]
    out = "".join(scanner.feed(text[a:b]) for a, b in itertools.pairwise(bounds))
    assert out + scanner.finish() == expected
    assert scanner.stopped == bool(found)


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        assert not is_loopback(host)


def test_cli_serve_warns_off_loopback(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append({"app": app, **kw}))
    args = ["serve", "--model", str(tiny_dir), "--device", "cpu"]
    assert cli.main(args) == 0
    assert "warning" not in capsys.readouterr().err
    assert started[-1]["host"] == "127.0.0.1" and started[-1]["port"] == 8000
    assert cli.main([*args, "--host", "0.0.0.0", "--port", "9001"]) == 0
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    assert started[-1]["port"] == 9001
    assert cli.main([*args, "--seed", "1"]) == 2  # no --seed: requests bring their own
    assert cli.main([*args, "--max-batch", "0"]) == 2
