"""Tests for gpt2_instruct.judge against fake Ollama / OpenAI servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import socket
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt2_instruct.judge import (
    DEFAULT_TEMPLATE,
    HISTOGRAM_BUCKETS,
    REASONS,
    JudgeError,
    base_url,
    build_prompt,
    format_input,
    judge_entries,
    parse_score,
)
from gpt2_instruct.params import JudgeParams, ParamsError, load_params
from gpt2_instruct.stages import EXPECTED_ERRORS, run_stage

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


def ollama(fake: FakeServer, **kwargs: Any) -> JudgeParams:
    kwargs.setdefault("backoff", 0.0)
    return JudgeParams(backend="ollama", url=fake.url, **kwargs)


def openai(fake: FakeServer, **kwargs: Any) -> JudgeParams:
    kwargs.setdefault("backoff", 0.0)
    return JudgeParams(backend="openai", url=f"{fake.url}/v1", **kwargs)


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
    with pytest.raises(ValueError, match=r"^template") as info:
        JudgeParams(backend="ollama", template=template)
    assert message in str(info.value)


# --- configuration ----------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    assert JudgeParams().backend == "none"
    assert not JudgeParams().enabled
    assert base_url(JudgeParams(backend="ollama")) == "http://localhost:11434"
    assert base_url(JudgeParams(backend="openai")) == "http://localhost:8000/v1"
    assert JudgeParams(backend="openai").url is None  # the params say what was written
    config = JudgeParams(backend="ollama", timeout=5, backoff=0)
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
        ({"url": "http://:11434"}, "must name a host"),
        ({"url": "http://localhost:99999"}, "not a valid URL"),
        ({"url": "http://[::1"}, "not a valid URL"),
        ({"url": "http://localhost:11434/?x=1"}, "query or fragment"),
        ({"url": "http://local host"}, "blanks"),
        ({"url": 11434}, "must be a string"),
        ({"deadline_s": 0}, "deadline_s must be > 0"),
        ({"deadline_s": float("inf")}, "finite"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            JudgeParams(**{"backend": "ollama", **kwargs})


def test_url_password_never_appears_in_messages() -> None:
    with pytest.raises(ValueError, match=r"ftp://\*\*\*@host") as info:
        JudgeParams(backend="ollama", url="ftp://user:s3cret@host")
    assert "s3cret" not in str(info.value) and "user" not in str(info.value)
    url = f"http://user:s3cret@127.0.0.1:{free_port()}"
    config = JudgeParams(backend="ollama", url=url, retries=0)
    rows, summary = judge_entries(make_entries(1), config)
    assert "s3cret" not in summary["judge_error"] and "//***@127.0.0.1" in summary["judge_error"]
    assert "s3cret" not in rows[0]["error"]


def test_the_judge_takes_the_params_themselves(tmp_path: Path) -> None:
    """One definition of the judge's settings: params.JudgeParams, no copy in judge.py."""
    from gpt2_instruct import judge

    own_settings = [
        name
        for name, value in vars(judge).items()
        if isinstance(value, type)
        and dataclasses.is_dataclass(value)
        and value.__module__ == judge.__name__
        and "timeout" in {f.name for f in dataclasses.fields(value)}
    ]
    assert own_settings == [] and not hasattr(judge, "JudgeConfig")
    path = tmp_path / "params.yaml"
    path.write_text(
        "judge:\n  backend: openai\n  model: m\n  timeout: 3\n"
        "  backoff: 0\n  temperature: 0.5\n  seed: 7\n  num_ctx: 4096\n"
    )
    params = load_params(path).judge
    assert isinstance(params, JudgeParams)
    assert (params.backend, params.model, params.timeout, params.backoff) == (
        "openai",
        "m",
        3.0,
        0.0,
    )
    assert (params.temperature, params.seed, params.num_ctx) == (0.5, 7, 4096)
    assert params.deadline_s == JudgeParams().deadline_s == 1800.0


@pytest.mark.parametrize(
    ("setting", "key", "problem"),
    [
        ("url: ftp://localhost:11434", "url", "http(s) URL"),
        ("url: 'http://:11434'", "url", "must name a host"),
        ("url: 'http://localhost:99999'", "url", "not a valid URL"),
        ("timeout: 0", "timeout", "must be > 0"),
        ("timeout: .inf", "timeout", "finite"),
        ("deadline_s: 0", "deadline_s", "must be > 0"),
        ("deadline_s: .nan", "deadline_s", "finite"),
        ("retries: -1", "retries", ">= 0"),
        ("template: '{response} {foo}'", "template", "unknown field {foo}"),
        ("template: 'no field at all'", "template", "must contain {response}"),
        ("template: '{response:d}'", "template", "cannot be formatted"),
        ("api_key_env: 'MY KEY'", "api_key_env", "environment variable"),
        ("model: ' '", "model", "non-empty"),
    ],
)
@pytest.mark.parametrize("backend", ["ollama", "none"])
def test_bad_judge_params_fail_in_params_validation(
    tmp_path: Path, backend: str, setting: str, key: str, problem: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(f"judge:\n  backend: {backend}\n  {setting}\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    # The key is named either by the judge's own check or by the generic type/range check.
    assert message.startswith((f"{path}: judge: {key} ", f"{path}: judge.{key}: ")), message
    assert problem in message
    assert "\n" not in message


def test_bad_judge_params_stop_the_stage_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("judge:\n  backend: ollama\n  timeout: 0\n")
    called = []
    with pytest.raises(SystemExit) as info:
        run_stage("test", {}, lambda params, paths: called.append(1), ["--params", str(path)])
    assert info.value.code == 1
    assert called == []
    assert (
        capsys.readouterr().err == f"error: {path}: judge: timeout must be > 0 seconds, got 0.0\n"
    )


def test_unknown_judge_keys_fail_and_an_api_key_is_sent_to_the_environment(
    tmp_path: Path,
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("judge:\n  modle: x\n")
    with pytest.raises(ParamsError, match=r"judge: unknown key\(s\) \['modle'\]"):
        load_params(path)
    path.write_text("judge:\n  backend: openai\n  api_key: sk-123\n")
    with pytest.raises(ParamsError, match=r"unknown key\(s\) \['api_key'\] \(api_key: ") as info:
        load_params(path)
    assert "environment variable" in str(info.value) and "api_key_env" in str(info.value)
    assert "sk-123" not in str(info.value)


def test_backend_none_contacts_nothing() -> None:
    rows, summary = judge_entries(make_entries(3), JudgeParams())
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
    server.script = [("reply", "85"), ("reply", " 40.\n"), ("reply", "100")]
    rows, summary = judge_entries(make_entries(3), ollama(server, model="llama3:8b"))
    assert [row["score"] for row in rows] == [85, 40, 100]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert rows[1]["reply"] == " 40.\n"
    assert all(row["error"] is None and row["reason"] is None for row in rows)
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
    assert summary["judge_unparseable"] == 0
    assert summary["judge_failed"] == {}
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
    server.script = [
        ("reply", "I think it is good."),
        ("reply", "150"),
        ("reply", "On a scale from 0 to 100, I give it 85."),
        ("reply", "90"),
    ]
    rows, summary = judge_entries(make_entries(4), ollama(server))
    assert [row["score"] for row in rows] == [None, None, None, 90]
    assert rows[0]["reply"] == "I think it is good."  # kept raw
    assert rows[2]["reply"] == "On a scale from 0 to 100, I give it 85."
    assert [row["reason"] for row in rows] == ["unparseable"] * 3 + [None]
    assert rows[0]["error"].startswith("unparseable: ")
    assert "I think it is good." in rows[0]["error"]
    assert summary["judge_unparseable"] == 3
    assert summary["judge_failed"] == {"unparseable": 3}
    assert summary["judge_count"] == 1
    assert summary["judge_mean"] == 90
    assert summary["judge_error"] is None  # partly scored: not a judge error


def test_long_reply_is_truncated_and_lone_surrogates_dropped(server: FakeServer) -> None:
    server.script = [("reply", "42" + " " * 5000), ("reply", "7 \ud800"), ("reply", "x" * 5000)]
    rows, _ = judge_entries(make_entries(3), ollama(server))
    assert rows[0]["score"] == 42
    assert len(rows[0]["reply"]) == 2000
    assert rows[1]["score"] is None and rows[1]["reason"] == "unparseable"
    rows[1]["reply"].encode("utf-8")  # writable as UTF-8 JSON
    rows[1]["error"].encode("utf-8")
    assert len(rows[2]["reply"]) == 2000
    assert len(rows[2]["error"]) < 300  # the reason quotes only a snippet


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
    assert all(row["reason"] == "bad_reply" for row in rows[:3])
    assert summary["judge_failed"] == {"bad_reply": 3}
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
    assert summary["judge_failed"] == {}


def test_5xx_exhausting_retries_counts_as_failed(server: FakeServer) -> None:
    server.script = [("status", 503, b"down")] * 2
    rows, summary = judge_entries(make_entries(2), ollama(server, retries=1))
    assert "HTTP 503" in rows[0]["error"]
    assert ", after 2 attempts" in rows[0]["error"]
    assert rows[0]["error"].startswith("http_status: ")
    assert rows[1]["score"] == 50
    assert len(server.requests) == 3
    assert summary["judge_failed"] == {"http_status": 1}
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
    assert summary["judge_failed"] == {"http_status": 2}
    assert summary["judge_error"] is None


def test_404_on_first_entry_stops_with_judge_error(server: FakeServer) -> None:
    server.script = [("status", 404, {"error": 'model "llama3" not found, try pulling it'})]
    rows, summary = judge_entries(make_entries(5), ollama(server, retries=3))
    assert len(server.requests) == 1
    assert [row["reason"] for row in rows] == ["http_status"] * 5  # every entry says why
    assert "HTTP 404" in rows[0]["error"]
    assert all("not sent" in row["error"] for row in rows[1:])
    assert summary["judge_failed"] == {"http_status": 5}
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
    assert rows[0]["reason"] == "timeout"
    assert summary["judge_failed"] == {"timeout": 1}
    assert summary["judge_count"] == 1
    assert summary["judge_error"] is None


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_connection_refused_gives_judge_error(backend: str) -> None:
    url = f"http://127.0.0.1:{free_port()}" + ("/v1" if backend == "openai" else "")
    config = JudgeParams(backend=backend, url=url, retries=1, backoff=0.0)
    rows, summary = judge_entries(make_entries(3), config)
    assert [row["reason"] for row in rows] == ["unreachable"] * 3
    assert "connection refused" in rows[0]["error"]
    error = summary["judge_error"]
    assert "could not reach" in error
    assert url in error
    assert "connection refused" in error
    if backend == "ollama":
        assert "ollama serve" in error and "ollama pull llama3" in error
    else:
        assert "OPENAI_API_KEY" in error
    assert summary["judge_count"] == 0
    assert summary["judge_failed"] == {"unreachable": 3}
    assert summary["judge_mean"] is None


def test_server_going_away_stops_after_consecutive_failures(server: FakeServer) -> None:
    server.script = [("reply", "80")]
    server.default = lambda body: ("close",)
    rows, summary = judge_entries(make_entries(10), ollama(server, retries=0))
    assert [row["score"] for row in rows] == [80] + [None] * 9
    assert len(server.requests) == 4  # the last six were not sent
    assert all(row["error"].startswith("unreachable: ") for row in rows[1:])
    assert all("not sent" in row["error"] for row in rows[4:])
    assert summary["judge_failed"] == {"unreachable": 9}
    assert summary["judge_count"] == 1
    assert "6 of 10 entries not judged" in summary["judge_error"]


def test_all_unparseable_sets_judge_error_with_the_first_reason(server: FakeServer) -> None:
    server.default = lambda body: ("reply", "Score: 85")
    _, summary = judge_entries(make_entries(3), ollama(server))
    assert summary["judge_count"] == 0
    assert summary["judge_failed"] == {"unparseable": 3}
    error = summary["judge_error"]
    assert error.startswith(f"Ollama at {server.url} scored none of the 3 entries")
    assert "(entry 0): unparseable: " in error and "'Score: 85'" in error


# --- servers that hang or trickle; deadlines ---------------------------------------------------


@contextlib.contextmanager
def raw_server(handle: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that runs ``handle(conn, stop)`` per connection, in threads."""
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    workers: list[threading.Thread] = []

    def work(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(0.2)
            with contextlib.suppress(OSError):
                conn.recv(1 << 16)  # the request (its start is enough)
            handle(conn, stop)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            worker = threading.Thread(target=work, args=(conn,), daemon=True)
            worker.start()
            workers.append(worker)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join(timeout=5)
        listener.close()
        for worker in workers:
            worker.join(timeout=5)


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Accept, and never answer."""
    stop.wait()


def trickle(prefix: bytes, interval: float) -> Callable[[socket.socket, threading.Event], None]:
    """Send ``prefix``, then one more byte every ``interval`` seconds, forever."""

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(prefix)
        while not stop.wait(interval):
            conn.sendall(b"a")

    return handle


TRICKLE_HEADERS = b"HTTP/1.1 200 OK\r\nX-Slow: "
TRICKLE_BODY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99999\r\n\r\n"


def bounded(seconds: float, call: Callable[[], Any]) -> tuple[Any, float]:
    """``call()`` and its duration; fails (instead of hanging the suite) past ``seconds``."""
    result: list[Any] = []
    start = time.monotonic()
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return result[0], time.monotonic() - start


def test_a_server_that_never_answers_is_given_up_on_per_request() -> None:
    with raw_server(silent) as url:
        config = JudgeParams(backend="ollama", url=url, timeout=0.3, retries=2, backoff=0.0)
        (rows, summary), elapsed = bounded(5, lambda: judge_entries(make_entries(1), config))
    assert 0.8 < elapsed < 2.5  # three attempts of 0.3 s each
    assert rows[0]["reason"] == "timeout"
    assert "after 3 attempts" in rows[0]["error"]
    assert summary["judge_failed"] == {"timeout": 1}
    assert url in summary["judge_error"]


@pytest.mark.parametrize("prefix", [TRICKLE_HEADERS, TRICKLE_BODY], ids=["headers", "body"])
@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_trickling_server_is_given_up_on_within_the_timeout(prefix: bytes, backend: str) -> None:
    # A byte every 0.1 s never trips a per-read timeout of 0.6 s: only an overall limit helps.
    with raw_server(trickle(prefix, 0.1)) as url:
        config = JudgeParams(
            backend=backend,
            url=url + ("/v1" if backend == "openai" else ""),
            timeout=0.6,
            retries=0,
        )
        (rows, summary), elapsed = bounded(5, lambda: judge_entries(make_entries(1), config))
    assert 0.5 < elapsed < 2.0
    assert rows[0]["reason"] == "timeout"
    assert rows[0]["error"] == "timeout: no complete reply within 0.6 s (timeout)"
    assert summary["judge_count"] == 0


def test_the_run_deadline_marks_the_entries_left() -> None:
    with raw_server(silent) as url:
        config = JudgeParams(
            backend="ollama", url=url, timeout=0.3, retries=0, backoff=0.0, deadline_s=1.0
        )
        (rows, summary), elapsed = bounded(5, lambda: judge_entries(make_entries(20), config))
    assert elapsed < 2.0
    assert len(rows) == 20
    reasons = [row["reason"] for row in rows]
    assert reasons[0] == "timeout"
    assert reasons[-10:] == ["deadline"] * 10
    assert set(reasons) == {"timeout", "deadline"}
    assert reasons == sorted(reasons, key=lambda r: r == "deadline")  # timeouts, then deadline
    assert summary["judge_failed"]["deadline"] + summary["judge_failed"]["timeout"] == 20
    assert "run deadline of 1 s" in summary["judge_error"] and url in summary["judge_error"]
    assert "not judged" in summary["judge_error"]


def test_retries_never_wait_past_the_run_deadline(server: FakeServer) -> None:
    server.default = lambda body: ("status", 503, b"busy")
    config = ollama(server, retries=5, backoff=30.0, deadline_s=0.5)
    (rows, summary), elapsed = bounded(5, lambda: judge_entries(make_entries(3), config))
    assert elapsed < 2.0
    assert rows[0]["reason"] == "http_status"
    assert "no time left to retry before the run deadline" in rows[0]["error"]
    # A 30 s back-off would pass the deadline: one attempt per entry, no retry, no wait.
    assert len(server.requests) == 3
    assert summary["judge_failed"] == {"http_status": 3}


def test_a_partial_run_within_the_deadline_keeps_its_scores(server: FakeServer) -> None:
    server.script = [("reply", "70"), ("sleep", 3.0, "99")]
    config = ollama(server, timeout=2.0, retries=0, deadline_s=0.5)
    (rows, summary), elapsed = bounded(5, lambda: judge_entries(make_entries(4), config))
    assert elapsed < 2.0
    assert [row["score"] for row in rows] == [70, None, None, None]
    assert rows[1]["reason"] == "deadline"  # cut short by the run deadline, not the timeout
    assert summary["judge_count"] == 1 and summary["judge_failed"] == {"deadline": 3}
    assert "3 of 4 entries not judged" in summary["judge_error"]


def test_every_reason_is_documented() -> None:
    assert set(REASONS) == {
        "unreachable",
        "timeout",
        "http_status",
        "bad_reply",
        "unparseable",
        "deadline",
    }


# --- the judge stage -------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def judge_stage(tmp_path: Path) -> SimpleNamespace:
    """The judge stage on three answers, its outputs in tmp_path."""
    from gpt2_instruct.stages import judge as stage

    responses = tmp_path / "data/responses/test.json"
    responses.parent.mkdir(parents=True)
    responses.write_text(json.dumps(make_entries(3)), encoding="utf-8")
    out = SimpleNamespace(
        responses=responses,
        metrics=tmp_path / "metrics/judge.json",
        per_entry=tmp_path / "metrics/judge_per_entry.csv",
        scores=tmp_path / "metrics/judge_scores.csv",
    )

    def run(params: JudgeParams) -> dict[str, Any]:
        return stage.judge(params, out.responses, out.metrics, out.per_entry, out.scores)

    out.run = run
    return out


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as handle:
        return next(csv.reader(handle))


def test_backend_none_writes_not_run_without_reading_the_answers(
    judge_stage: SimpleNamespace,
) -> None:
    judge_stage.responses.unlink()  # not even read: `dvc repro` stays offline and quick
    report = judge_stage.run(JudgeParams())
    saved = json.loads(judge_stage.metrics.read_text(encoding="utf-8"))
    assert saved == report == {"judge_status": "not run", "judge_backend": "none"}
    assert _csv_rows(judge_stage.per_entry) == [] and _csv_rows(judge_stage.scores) == []
    assert _header(judge_stage.per_entry) == ["index", "score", "reason", "error", "reply"]
    assert _header(judge_stage.scores) == ["index", "score", "reason"]


def test_a_complete_run_writes_metrics_and_both_tables(
    judge_stage: SimpleNamespace, server: FakeServer
) -> None:
    server.script = [("reply", "80"), ("reply", "60"), ("reply", "71.")]
    report = judge_stage.run(ollama(server))
    assert report["judge_status"] == "complete"
    assert (report["judge_entries"], report["judge_count"]) == (3, 3)
    assert report["judge_scored_fraction"] == 1.0 and report["judge_mean"] == 70.33333333333333
    assert json.loads(judge_stage.metrics.read_text(encoding="utf-8")) == report
    rows = _csv_rows(judge_stage.per_entry)
    assert [(r["index"], r["score"], r["reply"]) for r in rows] == [
        ("0", "80", "80"),
        ("1", "60", "60"),
        ("2", "71", "71."),
    ]
    assert _csv_rows(judge_stage.scores) == [
        {"index": str(i), "score": score, "reason": ""}
        for i, score in enumerate(["80", "60", "71"])
    ]


def test_the_plotted_table_holds_no_server_text(
    judge_stage: SimpleNamespace, server: FakeServer
) -> None:
    """dvc plots puts every column of a plotted file into a <script> of its HTML."""
    attack = "</script><script>alert(1)</script>"
    server.script = [("reply", "90"), ("reply", attack), ("status", 400, attack.encode())]
    judge_stage.run(dataclasses.replace(ollama(server), min_scored_fraction=0.3))
    assert "</script>" in judge_stage.per_entry.read_text(encoding="utf-8")  # kept, to read
    assert "script" not in judge_stage.scores.read_text(encoding="utf-8")
    assert [r["reason"] for r in _csv_rows(judge_stage.scores)] == [
        "",
        "unparseable",
        "http_status",
    ]


def test_fewer_scored_than_min_scored_fraction_fails_after_writing_everything(
    judge_stage: SimpleNamespace, server: FakeServer
) -> None:
    server.script = [("reply", "80"), ("reply", "good"), ("reply", "90")]  # 2 of 3: 0.67
    with pytest.raises(JudgeError) as info:
        judge_stage.run(ollama(server))  # the default: 0.9
    assert isinstance(info.value, EXPECTED_ERRORS)  # one line, exit 1, no traceback
    message = str(info.value)
    assert "scored 2 of 3 entries (66.7%), fewer than judge.min_scored_fraction (0.9)" in message
    assert "{'unparseable': 1}" in message and "\n" not in message
    saved = json.loads(judge_stage.metrics.read_text(encoding="utf-8"))
    assert saved["judge_status"] == "failed" and saved["judge_count"] == 2
    assert [r["score"] for r in _csv_rows(judge_stage.per_entry)] == ["80", "", "90"]


def test_at_min_scored_fraction_a_partial_run_succeeds(
    judge_stage: SimpleNamespace, server: FakeServer
) -> None:
    server.script = [("reply", "80"), ("status", 400, b"too long"), ("reply", "90")]
    report = judge_stage.run(dataclasses.replace(ollama(server), min_scored_fraction=2 / 3))
    assert report["judge_status"] == "partial" and report["judge_failed"] == {"http_status": 1}
    rows = _csv_rows(judge_stage.per_entry)
    assert rows[1]["reason"] == "http_status" and rows[1]["error"].startswith("http_status: ")


def test_nothing_scored_fails_whatever_min_scored_fraction(judge_stage: SimpleNamespace) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = JudgeParams(backend="ollama", url=url, retries=0, min_scored_fraction=1e-9)
    with pytest.raises(JudgeError) as info:
        judge_stage.run(config)
    message = str(info.value)
    assert message.startswith("the judge scored none of the 3 entries: could not reach ")
    assert f"Ollama at {url} (connection refused)" in message
    saved = json.loads(judge_stage.metrics.read_text(encoding="utf-8"))
    assert saved["judge_status"] == "failed" and saved["judge_failed"] == {"unreachable": 3}
    assert [r["reason"] for r in _csv_rows(judge_stage.scores)] == ["unreachable"] * 3


def test_an_unusable_api_key_fails_before_the_answers_are_read(
    judge_stage: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-sec ret")
    judge_stage.responses.unlink()
    with pytest.raises(JudgeError, match="JUDGE_TEST_KEY") as info:
        judge_stage.run(JudgeParams(backend="openai", api_key_env="JUDGE_TEST_KEY"))
    assert "sec" not in str(info.value)
    assert not judge_stage.metrics.exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[", "invalid JSON at line 1"),
        ("[]", "contains no entries"),
        ('[{"instruction": "x", "output": "y"}]', "entry 0: field 'model_response'"),
    ],
)
def test_bad_answers_are_a_data_error_naming_the_file(
    judge_stage: SimpleNamespace, server: FakeServer, content: str, problem: str
) -> None:
    from gpt2_instruct.data import DataError

    judge_stage.responses.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=problem) as info:
        judge_stage.run(ollama(server))
    assert str(judge_stage.responses) in str(info.value)
    assert server.requests == [] and not judge_stage.metrics.exists()


def _stage_script(tmp_path: Path, params: str, judge_stage: SimpleNamespace) -> Any:
    """Run stages/judge.py as DVC does, in a subprocess, on the fixture's files."""
    import subprocess
    import sys

    path = tmp_path / "params.yaml"
    path.write_text(params, encoding="utf-8")
    command = [
        sys.executable,
        str(REPO_ROOT / "stages/judge.py"),
        *("--params", str(path), "--responses", str(judge_stage.responses)),
        *("--metrics", str(judge_stage.metrics), "--per-entry", str(judge_stage.per_entry)),
        *("--scores", str(judge_stage.scores)),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_stage_script_exits_0_when_not_run_and_1_when_the_judge_failed(
    judge_stage: SimpleNamespace, tmp_path: Path
) -> None:
    done = _stage_script(tmp_path, "judge:\n  backend: none\n", judge_stage)
    assert done.returncode == 0, done.stderr
    assert json.loads(judge_stage.metrics.read_text(encoding="utf-8"))["judge_status"] == "not run"
    url = f"http://127.0.0.1:{free_port()}"
    params = f"judge:\n  backend: ollama\n  url: {url}\n  retries: 0\n"
    failed = _stage_script(tmp_path, params, judge_stage)
    assert failed.returncode == 1  # DVC records nothing: the next `dvc repro` judges again
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: the judge scored none of the 3")
    assert url in errors[0] and "Traceback" not in failed.stderr
    assert json.loads(judge_stage.metrics.read_text(encoding="utf-8"))["judge_status"] == "failed"


def test_progress_in_a_log_is_whole_lines(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    rows, _ = judge_entries(make_entries(2), ollama(server), progress=True)
    assert [row["score"] for row in rows] == [50, 50]
    err = capsys.readouterr().err  # not a terminal: lines, not a redrawn bar
    assert "\r" not in err
    assert "judge: 2/2 (100%)" in err.splitlines()[-1] and "ETA" in err


def test_progress_in_a_log_is_timed_and_on_a_terminal_a_live_bar() -> None:
    import io

    from gpt2_instruct import progress

    log = io.StringIO()
    with progress.progress_bar(100, "x", "item", file=log) as bar:
        for _ in range(100):  # all within LOG_EVERY_S: only the first and the last line
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("x: 0/100 (0%)") and lines[1].startswith("x: 100/100 (100%)")
    stopped = io.StringIO()
    with progress.progress_bar(5, "x", "item", file=stopped):
        pass  # closed where it started (a run stopped at once): its line is not repeated
    [line] = stopped.getvalue().splitlines()
    assert line.startswith("x: 0/5 (0%)")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    with progress.progress_bar(3, "x", "item", file=terminal) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    silent = io.StringIO()
    with progress.progress_bar(3, "x", "item", file=silent, enabled=False) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def test_the_settings_must_be_judge_params(server: FakeServer) -> None:
    rows, _ = judge_entries(make_entries(2), ollama(server))
    assert [row["score"] for row in rows] == [50, 50]
    with pytest.raises(TypeError, match="JudgeParams"):
        judge_entries(make_entries(1), make_entries(1))  # type: ignore[arg-type]


# --- parse_score ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("85", 85),
        (" 85.\n", 85),
        ("85.", 85),
        ("0", 0),
        ("100", 100),
        ("100.", 100),
        ("007", 7),
        ("\n\n 42\n", 42),
        ("\t42 \r\n", 42),
        ("\u00a042\u2003", 42),  # Unicode blanks around it are still only whitespace
    ],
)
def test_parse_score_accepts_only_a_bare_integer(reply: str, expected: int) -> None:
    assert parse_score(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "On a scale from 0 to 100, I give it 85.",  # the first number is the scale, not 85
        "1e309",  # not 1, not infinity
        "1e2",
        "Score: 85",
        "85/100",
        "85 out of 100",
        "I'd give it 90 out of 100.",
        "85\n\nThe answer is mostly right.",
        "85 90",
        "85.0",
        "85.5",
        "85..",
        "85 .",
        ".85",
        "+85",
        "-5",
        "score:-5",
        "-0",
        "101",
        "1000",
        "9" * 10_000,
        "0x55",
        "85%",
        "**85**",
        "`85`",
        '"85"',
        "",
        "   ",
        ".",
        "excellent",
        "٨٥",  # Arabic-Indic digits are not a score
        "\uff18\uff15",  # nor are full-width ones
        "8\u200b5",  # a zero-width space inside
    ],
)
def test_parse_score_rejects_anything_else(reply: str) -> None:
    assert parse_score(reply) is None


def test_parse_score_rejects_non_strings() -> None:
    assert parse_score(85) is None  # type: ignore[arg-type]
    assert parse_score(None) is None  # type: ignore[arg-type]


_BLANKS = st.text(alphabet=" \t\n\r\f\v\u00a0\u2003\u3000", max_size=5)


@given(st.integers(min_value=0, max_value=100), _BLANKS, _BLANKS, st.booleans())
def test_parse_score_accepts_every_score_with_blanks_and_a_period(
    n: int, before: str, after: str, period: bool
) -> None:
    assert parse_score(before + str(n) + ("." if period else "") + after) == n


@given(
    st.text(max_size=20),
    st.characters(categories=["Lu", "Ll", "Lt", "Lm", "Lo"]),
    st.text(max_size=20),
)
def test_parse_score_rejects_any_text_with_a_letter(before: str, letter: str, after: str) -> None:
    assert parse_score(before + letter + after) is None


@given(
    st.integers(min_value=0, max_value=100),
    st.integers(min_value=0, max_value=10**6),
    st.text(alphabet=" \t\n,;:/-.|", min_size=1, max_size=4),
    _BLANKS,
    _BLANKS,
)
def test_parse_score_rejects_a_second_number(
    first: int, second: int, separator: str, before: str, after: str
) -> None:
    assert parse_score(f"{before}{first}{separator}{second}{after}") is None


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


def test_the_politeness_rubric_asks_about_tone_and_a_template_still_wins(
    server: FakeServer,
) -> None:
    """``rubric: politeness`` sends ours (tone only, for a DPO run); the reference's stays the
    default; a ``template`` of the user's overrides either."""
    from gpt2_instruct.judge import POLITENESS_TEMPLATE, RUBRICS
    from gpt2_instruct.params import JudgeRubric

    assert set(RUBRICS) == set(typing.get_args(JudgeRubric))
    entries = make_entries(1)
    judge_entries(entries, ollama(server, rubric="politeness"))
    judge_entries(entries, ollama(server))
    judge_entries(entries, ollama(server, rubric="politeness", template="Rate {response}."))
    polite, reference, own = server.prompts()
    assert polite == build_prompt(entries[0], POLITENESS_TEMPLATE) != reference
    assert "polite" in polite and entries[0]["model_response"] in polite
    assert reference == build_prompt(entries[0])
    assert own == f"Rate {entries[0]['model_response']}."
