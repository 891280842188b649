"""Tests for gpt2_instruct.judge against fake Ollama / OpenAI servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt2_instruct.judge import (
    DEFAULT_TEMPLATE,
    HISTOGRAM_BUCKETS,
    JudgeConfig,
    build_prompt,
    format_input,
    judge_entries,
    parse_score,
)

# --- fake server ----------------------------------------------------------------------------

#: What the fake server does for one request: ("reply", text) wraps text in the backend's
#: JSON shape; ("status", code, body) sends a raw body; ("sleep", seconds, text) replies late;
#: ("close",) drops the connection without a reply.
Action = tuple[Any, ...]


@dataclass
class FakeServer:
    """Records every request and answers from ``script`` (then from ``default``)."""

    url: str
    script: list[Action] = field(default_factory=list)
    default: Callable[[dict[str, Any]], Action] = lambda body: ("reply", "50")
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_action(self, body: dict[str, Any]) -> Action:
        with self.lock:
            return self.script.pop(0) if self.script else self.default(body)

    def prompts(self) -> list[str]:
        return [r["body"]["messages"][0]["content"] for r in self.requests]


def _handler(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            with server.lock:
                server.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
            action = server.next_action(body)
            kind = action[0]
            if kind == "close":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if kind == "sleep":
                server.release.wait(action[1])
                action = ("reply", action[2])
            if action[0] == "reply":
                text = action[1]
                if self.path == "/api/chat":
                    obj: Any = {
                        "model": body["model"],
                        "message": {"role": "assistant", "content": text},
                    }
                else:
                    obj = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                self._send(200, json.dumps(obj).encode())
            else:
                status, raw = action[1], action[2]
                self._send(status, raw if isinstance(raw, bytes) else json.dumps(raw).encode())

        def _send(self, status: int, data: bytes) -> None:
            with contextlib.suppress(OSError):  # the client may have timed out and gone
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """A fake judge server on an ephemeral 127.0.0.1 port, shut down after the test."""
    fake = FakeServer(url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    httpd.daemon_threads = True
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep requests from routing 127.0.0.1 through a proxy configured in the environment."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def free_port() -> int:
    """A port with nothing listening on it (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_entries(n: int) -> list[dict[str, Any]]:
    return [
        {
            "instruction": f"Say {i}.",
            "input": "",
            "output": str(i),
            "model_response": f"answer {i}",
        }
        for i in range(n)
    ]


def ollama(fake: FakeServer, **kwargs: Any) -> JudgeConfig:
    kwargs.setdefault("backoff", 0.0)
    return JudgeConfig(backend="ollama", url=fake.url, **kwargs)


def openai(fake: FakeServer, **kwargs: Any) -> JudgeConfig:
    kwargs.setdefault("backoff", 0.0)
    return JudgeConfig(backend="openai", url=f"{fake.url}/v1", **kwargs)


# --- prompts ----------------------------------------------------------------------------------

WITH_INPUT = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "The car is as fast as lightning.",
    "model_response": "The car is as fast as a bullet.",
}
WITHOUT_INPUT = {
    "instruction": "What type of cloud is typically associated with thunderstorms?",
    "input": "",
    "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
    "model_response": "The type of cloud associated with thunderstorms is a cumulus cloud.",
}


def test_reference_prompt_with_input_is_byte_exact() -> None:
    expected = (
        "Given the input `Below is an instruction that describes a task. Write a response "
        "that appropriately completes the request.\n\n### Instruction:\nRewrite the sentence "
        "using a simile.\n\n### Input:\nThe car is very fast.` and correct output `The car is "
        "as fast as lightning.`, score the model response `The car is as fast as a bullet.` "
        "on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )
    assert build_prompt(WITH_INPUT) == expected


def test_reference_prompt_without_input_is_byte_exact() -> None:
    expected = (
        "Given the input `Below is an instruction that describes a task. Write a response "
        "that appropriately completes the request.\n\n### Instruction:\nWhat type of cloud is "
        "typically associated with thunderstorms?` and correct output `The type of cloud "
        "typically associated with thunderstorms is cumulonimbus.`, score the model response "
        "`The type of cloud associated with thunderstorms is a cumulus cloud.` on a scale "
        "from 0 to 100, where 100 is the best score. Respond with the integer number only."
    )
    assert build_prompt(WITHOUT_INPUT) == expected
    # Missing and null input mean "" as in data.py.
    no_key = {k: v for k, v in WITHOUT_INPUT.items() if k != "input"}
    assert build_prompt(no_key) == expected
    assert build_prompt({**WITHOUT_INPUT, "input": None}) == expected
    assert format_input(WITHOUT_INPUT).endswith("thunderstorms?")


def test_entry_text_with_braces_is_inserted_literally() -> None:
    nasty = "{output} {0} {} {prompt.__class__} {{x}} }{"
    entry = {
        "instruction": "Do {response}.",
        "input": "{input}",
        "output": "SECRET {1}",
        "model_response": nasty,
    }
    prompt = build_prompt(entry)
    assert f"score the model response `{nasty}` on a scale" in prompt
    assert prompt.count("SECRET {1}") == 1  # {output} in the response was not expanded
    assert "### Instruction:\nDo {response}.\n\n### Input:\n{input}`" in prompt
    custom = "R={response!r}|O={output}|I={instruction}|N={input}|{{literal}}"
    assert build_prompt(entry, custom) == (
        f"R={nasty!r}|O=SECRET {{1}}|I=Do {{response}}.|N={{input}}|{{literal}}"
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{response} {foo}", "unknown field {foo}"),
        ("{response} {0}", "unknown field {0}"),
        ("{response} {}", "positional"),
        ("{response.upper}", "unknown field {response.upper}"),
        ("{output[0]} {response}", "unknown field {output[0]}"),
        ("{response", "not a valid format string"),
        ("{response} }", "not a valid format string"),
        ("{output}", "must contain {response}"),
        ("{response:{output}}", "nested"),
        ("{response:d}", "cannot be formatted"),
        ("{response!x}", "cannot be formatted"),
    ],
)
def test_bad_templates_are_rejected(template: str, message: str) -> None:
    with pytest.raises(ValueError, match="judge template") as info:
        JudgeConfig(backend="ollama", template=template)
    assert message in str(info.value)


# --- configuration ----------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    assert JudgeConfig().backend == "none"
    assert not JudgeConfig().enabled
    assert JudgeConfig(backend="ollama").url == "http://localhost:11434"
    assert JudgeConfig(backend="openai").url == "http://localhost:8000/v1"
    config = JudgeConfig(backend="ollama", timeout=5, backoff=0)
    assert isinstance(config.timeout, float)
    assert (config.model, config.retries, config.seed, config.num_ctx) == ("llama3", 2, 123, 2048)
    assert config.temperature == 0.0
    bad: list[tuple[dict[str, Any], str]] = [
        ({"backend": "vllm"}, "backend must be one of"),
        ({"model": " "}, "model"),
        ({"url": "localhost:11434"}, "http"),
        ({"url": "ftp://x"}, "http"),
        ({"timeout": -1}, "timeout must be > 0"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"timeout": float("nan")}, "finite"),
        ({"timeout": True}, "finite"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"backoff": -0.1}, "backoff"),
        ({"temperature": -1}, "temperature"),
        ({"seed": "123"}, "seed"),
        ({"num_ctx": 0}, "num_ctx"),
        ({"api_key_env": "MY KEY"}, "api_key_env"),
        ({"template": 3}, "template"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            JudgeConfig(**{"backend": "ollama", **kwargs})


def test_config_from_dict() -> None:
    config = JudgeConfig.from_dict({"backend": "openai", "model": "m", "timeout": 3})
    assert (config.backend, config.model, config.timeout) == ("openai", "m", 3.0)
    with pytest.raises(ValueError, match=r"unknown judge params \['modle'\]"):
        JudgeConfig.from_dict({"modle": "x"})
    with pytest.raises(ValueError, match="api_key_env"):
        JudgeConfig.from_dict({"backend": "openai", "api_key": "sk-123"})


def test_backend_none_contacts_nothing() -> None:
    rows, summary = judge_entries(make_entries(3), JudgeConfig())
    assert rows == []
    assert summary["judge_backend"] == "none"
    assert summary["judge_count"] == 0
    assert summary["judge_mean"] is None
    assert summary["judge_error"] is None


def test_bad_entries_raise_before_any_request(server: FakeServer) -> None:
    with pytest.raises(ValueError, match="entry 1: field 'model_response'"):
        judge_entries([*make_entries(1), {"instruction": "x", "output": "y"}], ollama(server))
    assert server.requests == []


# --- backends ---------------------------------------------------------------------------------


def test_ollama_request_and_scores(server: FakeServer) -> None:
    server.script = [("reply", "85"), ("reply", "Score: 40."), ("reply", "100")]
    rows, summary = judge_entries(make_entries(3), ollama(server, model="llama3:8b"))
    assert [row["score"] for row in rows] == [85, 40, 100]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert rows[1]["reply"] == "Score: 40."
    assert all(row["error"] is None for row in rows)
    request = server.requests[0]
    assert request["path"] == "/api/chat"
    assert "Authorization" not in request["headers"]
    body = request["body"]
    assert body["model"] == "llama3:8b"
    assert body["stream"] is False
    assert body["options"] == {"seed": 123, "temperature": 0.0, "num_ctx": 2048}
    assert body["messages"] == [{"role": "user", "content": build_prompt(make_entries(1)[0])}]
    assert summary["judge_backend"] == "ollama"
    assert summary["judge_model"] == "llama3:8b"
    assert summary["judge_count"] == 3
    assert summary["judge_mean"] == pytest.approx(75.0)
    assert summary["judge_unparseable"] == summary["judge_failed"] == 0
    assert summary["judge_error"] is None
    assert list(summary["judge_histogram"]) == list(HISTOGRAM_BUCKETS)
    assert summary["judge_histogram"]["80-89"] == 1
    assert summary["judge_histogram"]["40-49"] == 1
    assert summary["judge_histogram"]["90-100"] == 1
    assert sum(summary["judge_histogram"].values()) == 3
    json.dumps(summary)  # metrics must be JSON-serialisable


def test_openai_request_without_key(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    server.script = [("reply", "70")]
    rows, summary = judge_entries(
        make_entries(1), openai(server, model="gpt", api_key_env="JUDGE_TEST_KEY", seed=7)
    )
    assert rows[0]["score"] == 70
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert "Authorization" not in request["headers"]
    assert request["body"]["model"] == "gpt"
    assert request["body"]["temperature"] == 0.0
    assert request["body"]["seed"] == 7
    assert request["body"]["messages"][0]["role"] == "user"
    assert "stream" not in request["body"]
    assert summary["judge_mean"] == 70


def test_openai_request_with_key(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-123\n")
    rows, _ = judge_entries(make_entries(1), openai(server, api_key_env="JUDGE_TEST_KEY"))
    assert rows[0]["score"] == 50
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-test-123"


def test_api_key_with_bad_characters_raises_without_echoing_it(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-sec ret")
    with pytest.raises(ValueError, match="JUDGE_TEST_KEY") as info:
        judge_entries(make_entries(1), openai(server, api_key_env="JUDGE_TEST_KEY"))
    assert "sec" not in str(info.value)
    assert server.requests == []


def test_garbage_replies_are_unparseable(server: FakeServer) -> None:
    server.script = [("reply", "I think it is good."), ("reply", "150"), ("reply", "90")]
    rows, summary = judge_entries(make_entries(3), ollama(server))
    assert [row["score"] for row in rows] == [None, None, 90]
    assert rows[0]["reply"] == "I think it is good."
    assert rows[0]["error"] is None
    assert summary["judge_unparseable"] == 2
    assert summary["judge_failed"] == 0
    assert summary["judge_count"] == 1
    assert summary["judge_mean"] == 90


def test_long_reply_is_truncated_and_lone_surrogates_dropped(server: FakeServer) -> None:
    server.script = [("reply", "42 " + "x" * 5000), ("reply", "7 \ud800")]
    rows, _ = judge_entries(make_entries(2), ollama(server))
    assert rows[0]["score"] == 42
    assert len(rows[0]["reply"]) == 2000
    assert rows[1]["score"] == 7
    rows[1]["reply"].encode("utf-8")  # writable as UTF-8 JSON


def test_malformed_bodies_count_as_failed(server: FakeServer) -> None:
    server.script = [
        ("status", 200, b"not json"),
        ("status", 200, {"message": {"content": None}}),
        ("status", 200, b"[" * 100_000),
        ("reply", "60"),
    ]
    rows, summary = judge_entries(make_entries(4), ollama(server))
    assert "not valid JSON" in rows[0]["error"]
    assert "message.content" in rows[1]["error"]
    assert rows[2]["error"] is not None
    assert rows[3]["score"] == 60
    assert summary["judge_failed"] == 3
    assert len(server.requests) == 4  # malformed replies are not retried


def test_server_reply_does_not_reach_other_prompts(server: FakeServer) -> None:
    marker = "{output} INJECTED ../../etc/passwd"
    server.script = [("reply", marker)]
    entries = make_entries(2)
    judge_entries(entries, ollama(server))
    assert server.prompts() == [build_prompt(entries[0]), build_prompt(entries[1])]
    assert marker not in server.prompts()[1]


# --- retries and failures ---------------------------------------------------------------------


def test_500_then_success_is_retried(server: FakeServer) -> None:
    server.script = [
        ("status", 500, {"error": "busy"}),
        ("status", 429, b"slow down"),
        ("reply", "77"),
    ]
    rows, summary = judge_entries(make_entries(1), ollama(server, retries=2))
    assert rows[0]["score"] == 77
    assert rows[0]["error"] is None
    assert len(server.requests) == 3
    assert summary["judge_failed"] == 0


def test_5xx_exhausting_retries_counts_as_failed(server: FakeServer) -> None:
    server.script = [("status", 503, b"down")] * 2
    rows, summary = judge_entries(make_entries(2), ollama(server, retries=1))
    assert "HTTP 503" in rows[0]["error"]
    assert ", after 2 attempts" in rows[0]["error"]
    assert rows[1]["score"] == 50
    assert len(server.requests) == 3
    assert summary["judge_failed"] == 1
    assert summary["judge_error"] is None


def test_4xx_is_not_retried(server: FakeServer) -> None:
    server.script = [
        ("reply", "10"),
        ("status", 400, {"error": "prompt too long"}),
        ("status", 404, b"gone"),
    ]
    rows, summary = judge_entries(make_entries(3), ollama(server, retries=3))
    assert len(server.requests) == 3
    assert rows[0]["score"] == 10
    assert "HTTP 400" in rows[1]["error"] and "prompt too long" in rows[1]["error"]
    assert "HTTP 404" in rows[2]["error"]
    assert summary["judge_failed"] == 2
    assert summary["judge_error"] is None


def test_404_on_first_entry_stops_with_judge_error(server: FakeServer) -> None:
    server.script = [("status", 404, {"error": 'model "llama3" not found, try pulling it'})]
    rows, summary = judge_entries(make_entries(5), ollama(server, retries=3))
    assert len(server.requests) == 1
    assert rows == []
    assert "HTTP 404" in summary["judge_error"]
    assert "ollama pull llama3" in summary["judge_error"]
    assert summary["judge_count"] == 0


def test_slow_reply_times_out_and_counts_as_failed(server: FakeServer) -> None:
    server.script = [("sleep", 3.0, "99"), ("sleep", 3.0, "99"), ("reply", "20")]
    start = time.monotonic()
    rows, summary = judge_entries(make_entries(2), ollama(server, timeout=0.2, retries=1))
    assert time.monotonic() - start < 2.5
    assert rows[0]["score"] is None
    assert "timeout" in rows[0]["error"]
    assert rows[1]["score"] == 20
    assert len(server.requests) == 3  # the timeout was retried once
    assert summary["judge_failed"] == 1
    assert summary["judge_count"] == 1
    assert summary["judge_error"] is None


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_connection_refused_gives_judge_error(backend: str) -> None:
    url = f"http://127.0.0.1:{free_port()}" + ("/v1" if backend == "openai" else "")
    config = JudgeConfig(backend=backend, url=url, retries=1, backoff=0.0)
    rows, summary = judge_entries(make_entries(3), config)
    assert rows == []
    error = summary["judge_error"]
    assert "could not reach" in error
    assert url in error
    assert "connection refused" in error
    if backend == "ollama":
        assert "ollama serve" in error and "ollama pull llama3" in error
    else:
        assert "OPENAI_API_KEY" in error
    assert summary["judge_count"] == summary["judge_failed"] == 0
    assert summary["judge_mean"] is None


def test_server_going_away_stops_after_consecutive_failures(server: FakeServer) -> None:
    server.script = [("reply", "80")]
    server.default = lambda body: ("close",)
    rows, summary = judge_entries(make_entries(10), ollama(server, retries=0))
    assert [row["score"] for row in rows] == [80, None, None, None]
    assert all(row["error"] for row in rows[1:])
    assert summary["judge_failed"] == 3
    assert summary["judge_count"] == 1
    assert "6 of 10 entries not judged" in summary["judge_error"]


def test_progress_bar_runs(server: FakeServer) -> None:
    rows, _ = judge_entries(make_entries(2), ollama(server), progress=True)
    assert [row["score"] for row in rows] == [50, 50]


# --- parse_score ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("85", 85),
        (" 85.", 85),
        ("85.0", 85),
        ("Score: 85", 85),
        ("85/100", 85),
        ("0", 0),
        ("100", 100),
        ("007", 7),
        ("\n\n 42\n", 42),
        ("I'd give it 90 out of 100.", 90),
        ("score:-5", None),
        ("-5", None),
        ("101", None),
        ("1000", None),
        ("9" * 10_000, None),
        ("85.5", None),
        ("", None),
        ("   ", None),
        ("excellent", None),
        ("٨٥", None),  # non-ASCII digits are not a score
    ],
)
def test_parse_score_cases(reply: str, expected: int | None) -> None:
    assert parse_score(reply) == expected


@given(st.integers(min_value=0, max_value=100))
def test_parse_score_roundtrips_every_valid_score(n: int) -> None:
    assert parse_score(str(n)) == n
    assert parse_score(f"Score: {n}/100") == n


@given(st.integers().filter(lambda n: not 0 <= n <= 100))
def test_parse_score_rejects_out_of_range(n: int) -> None:
    assert parse_score(str(n)) is None


@given(st.text(max_size=200))
def test_parse_score_never_raises(text: str) -> None:
    score = parse_score(text)
    assert score is None or 0 <= score <= 100


def test_default_template_is_the_reference_prompt() -> None:
    assert DEFAULT_TEMPLATE.startswith("Given the input `{prompt}` and correct output `{output}`")
    assert DEFAULT_TEMPLATE.endswith("Respond with the integer number only.")
