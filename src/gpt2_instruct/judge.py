"""Optional LLM judge: score the model's answers 0-100 with a local or remote chat model.

This mirrors the reference (LLMs-from-scratch ch07), which asks Llama 3 through Ollama to
grade each test answer against the expected output. It is optional because it needs a
running server: with ``backend="none"`` nothing is contacted. Server trouble never raises
inside :func:`judge_entries`: every entry that could not be scored keeps its reason (see
:data:`REASONS`), and the summary counts them, so the judge stage
(``gpt2_instruct.stages.judge``) can write what it has and then decide whether the run
failed (too few entries scored) with :class:`JudgeError`.

Its settings are :class:`gpt2_instruct.params.JudgeParams` (params.yaml's ``judge``),
checked when they are built, before any stage work.

The transport is this module's own client on ``requests``, not the ``openai`` SDK: its
deadline on each whole request (a trickling server), the 1 MiB cap on a reply, the
retry policy and the reasons per entry are what the tests pin, and the SDK's httpx
client would need each of them rebuilt around it.

Nothing waits forever: ``timeout`` bounds each whole HTTP request (connecting, a server
that never answers, one that trickles its reply a byte at a time: each request runs under
a :class:`gpt2_instruct.deadline.Watchdog`), and ``deadline_s`` bounds the whole run;
entries left when it passes are marked ``deadline``. URLs in messages never show their
credentials (:func:`gpt2_instruct.deadline.redact`).

Everything that comes from entries or from the server is treated as untrusted data: entry
text is substituted into the prompt template exactly once (never re-formatted), and the
server's reply is only accepted as a score when it is exactly an integer 0-100; otherwise
it is kept, truncated, as data. It never becomes a path, is never evaluated and never
reaches another entry's prompt.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from gpt2_instruct.data import Entry, format_prompt
from gpt2_instruct.deadline import Watchdog, redact, watched_session
from gpt2_instruct.params import (
    JudgeParams,
    JudgeRubric,
    parse_judge_template,
    render_judge_template,
)
from gpt2_instruct.progress import progress_bar

__all__ = [
    "DEFAULT_TEMPLATE",
    "DEFAULT_URLS",
    "HISTOGRAM_BUCKETS",
    "POLITENESS_TEMPLATE",
    "REASONS",
    "RUBRICS",
    "JudgeError",
    "base_url",
    "build_prompt",
    "check_entries",
    "check_environment",
    "format_input",
    "judge_entries",
    "parse_score",
]

log = logging.getLogger(__name__)

#: Where each backend listens by default: Ollama's own port, and the base URL (ending in
#: ``/v1``) of a local OpenAI-compatible server such as vLLM or llama.cpp's server.
DEFAULT_URLS: dict[str, str] = {
    "ollama": "http://localhost:11434",
    "openai": "http://localhost:8000/v1",
}

#: The reference's judge prompt, byte for byte, with ``{prompt}`` standing for
#: ``format_input(entry)`` (the Alpaca prompt without the response header).
DEFAULT_TEMPLATE = (
    "Given the input `{prompt}` and correct output `{output}`, "
    "score the model response `{response}` on a scale from 0 to 100, "
    "where 100 is the best score. Respond with the integer number only."
)
#: Ours, not the reference's: how polite an answer is, whatever its content, for a DPO run
#: on the preference data (its ``chosen`` answers are the polite ones): ``judge.rubric``.
POLITENESS_TEMPLATE = (
    "Given the input `{prompt}`, score how polite and respectful the model response "
    "`{response}` is on a scale from 0 to 100, where 0 is rude, 50 neutral and 100 very "
    "polite. Judge the tone only, not whether the answer is correct. "
    "Respond with the integer number only."
)
#: ``judge.rubric`` -> the template used when ``judge.template`` is null.
RUBRICS: dict[JudgeRubric, str] = {"reference": DEFAULT_TEMPLATE, "politeness": POLITENESS_TEMPLATE}

#: Score buckets of the summary histogram; the last one includes 100.
HISTOGRAM_BUCKETS: tuple[str, ...] = (*(f"{lo}-{lo + 9}" for lo in range(0, 90, 10)), "90-100")

_RESPONSE_SUFFIX = "\n\n### Response:\n"
_MAX_REPLY_CHARS = 2_000
_MAX_BODY_BYTES = 1 << 20  # a judge reply is a few bytes; refuse to buffer a flood
_MAX_BACKOFF_S = 60.0
_MAX_CONSECUTIVE_UNREACHABLE = 3  # after the first success: the server went away
_FIRST_CALL_FATAL_STATUSES = (401, 403, 404)  # wrong key, URL or model: would repeat for all
_SNIPPET_CHARS = 200

#: Why an entry has no score; each failed row's ``error`` starts with one of these, and
#: the summary's ``judge_failed`` counts them.
REASONS: dict[str, str] = {
    "unreachable": "no connection to the server, or it closed one without replying",
    "timeout": "no complete reply within `timeout` seconds (after all retries)",
    "http_status": "the server answered with an HTTP error status",
    "bad_reply": "the reply was not the backend's JSON with a text answer",
    "unparseable": "the answer was not an integer 0-100 (the raw reply is kept)",
    "deadline": "the run's `deadline_s` passed before the entry was judged",
}


class JudgeError(ValueError):
    """The judge could not score any entry (or an API key is unusable); one clear line."""


# --- configuration ----------------------------------------------------------------------


def base_url(config: JudgeParams) -> str:
    """The server's base URL: ``config.url``, or the backend's default (:data:`DEFAULT_URLS`)."""
    return config.url or DEFAULT_URLS.get(config.backend, "")


# --- prompts and scores -----------------------------------------------------------------


def format_input(entry: Mapping[str, Any]) -> str:
    """The reference's ``format_input``: the Alpaca prompt without the response header."""
    prompt = format_prompt(
        Entry(instruction=entry["instruction"], input=entry.get("input") or "", output=""),
        "alpaca",
    )
    if not prompt.endswith(_RESPONSE_SUFFIX):  # guards against a change in data.py
        raise RuntimeError("the alpaca prompt no longer ends with its response header")
    return prompt[: -len(_RESPONSE_SUFFIX)]


def build_prompt(entry: Mapping[str, Any], template: str | None = None) -> str:
    """The judge prompt for one entry (``template`` None: the reference prompt, verbatim)."""
    parts = parse_judge_template(DEFAULT_TEMPLATE if template is None else template)
    values = {
        "prompt": format_input(entry),
        "output": entry["output"],
        "response": entry["model_response"],
        "instruction": entry["instruction"],
        "input": entry.get("input") or "",
    }
    return render_judge_template(parts, values)


def parse_score(reply: str) -> int | None:
    """The score if ``reply`` is exactly an integer 0..100, else None (unparseable).

    Judges are told to "respond with the integer number only", so only that is accepted:
    ASCII digits (leading zeros allowed), optionally followed by one period, with any
    whitespace around them ("85", " 85.\n"). Anything else is unparseable, however close:
    words ("Score: 85", "On a scale from 0 to 100, I give it 85."), a second number
    ("85/100"), a sign, a fraction ("85.0"), an exponent ("1e309"), other scripts' digits
    or a value above 100. The caller keeps such a reply raw, so a sloppy judge shows up as
    ``unparseable`` instead of as a made-up score.
    """
    if not isinstance(reply, str):
        return None
    text = reply.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text or not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > 3:  # also keeps int() away from huge strings
        return None
    score = int(digits)
    return score if score <= 100 else None


# --- transport ----------------------------------------------------------------------------


class _Failure(Exception):
    """Internal: one failed call; its reason (:data:`REASONS`), whether to retry it, and
    whether the server looks unreachable."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        retryable: bool,
        unreachable: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retryable = retryable
        self.unreachable = unreachable
        self.status = status


def _snippet(data: bytes | str) -> str:
    """A short, quoted excerpt of a server body for error messages (it is untrusted data)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = " ".join(text.split())
    if len(text) > _SNIPPET_CHARS:
        text = text[:_SNIPPET_CHARS] + "..."
    return repr(text)


def _describe_connection_error(exc: BaseException) -> str:
    """A short reason ("connection refused", ...) found in requests' nested exceptions."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, socket.gaierror):
            return "host name could not be resolved"
        if isinstance(current, (requests.ConnectTimeout, TimeoutError)):
            return "connection timed out"
        if isinstance(current, (http.client.RemoteDisconnected, ConnectionResetError)):
            return "connection closed by the server without a reply"
        stack.extend([current.__cause__, current.__context__, getattr(current, "reason", None)])
        stack.extend(current.args)
    text = redact(" ".join(str(exc).split()))
    return text[:_SNIPPET_CHARS] or type(exc).__name__


def _read_body(response: requests.Response) -> bytes:
    """The whole body, refusing more than 1 MiB (the reply is data from another process)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=1 << 16):
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            raise _Failure(
                f"reply larger than {_MAX_BODY_BYTES} bytes; not read",
                reason="bad_reply",
                retryable=False,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _exchange(
    session: requests.Session,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    limit: float,
) -> Any:
    """One POST; returns the parsed JSON body or raises _Failure saying what went wrong."""
    try:
        response = session.post(
            url,
            json=payload,
            headers=headers,
            timeout=limit,
            stream=True,
            allow_redirects=False,
        )
    except requests.ConnectTimeout as exc:
        raise _Failure(
            f"connection timed out after {limit:g} s",
            reason="unreachable",
            retryable=True,
            unreachable=True,
        ) from exc
    except requests.Timeout as exc:
        raise _Failure(
            f"no reply within {limit:g} s (timeout)", reason="timeout", retryable=True
        ) from exc
    except requests.exceptions.InvalidHeader as exc:
        # Its message would quote the header value, i.e. the API key: keep that out of logs.
        raise _Failure(
            "invalid request header (check the API key)", reason="bad_reply", retryable=False
        ) from exc
    except requests.ConnectionError as exc:
        raise _Failure(
            _describe_connection_error(exc),
            reason="unreachable",
            retryable=True,
            unreachable=True,
        ) from exc
    except (requests.RequestException, OSError, http.client.HTTPException) as exc:
        raise _Failure(
            f"request failed: {type(exc).__name__}: {redact(' '.join(str(exc).split()))}",
            reason="bad_reply",
            retryable=False,
        ) from exc

    with response:
        try:
            body = _read_body(response)
        except requests.Timeout as exc:
            raise _Failure(
                f"reply not complete within {limit:g} s (timeout)",
                reason="timeout",
                retryable=True,
            ) from exc
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
        ) as exc:
            raise _Failure(
                f"connection broken while reading the reply: {type(exc).__name__}",
                reason="bad_reply",
                retryable=True,
            ) from exc
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Failure(
                f"HTTP {status} {response.reason}: {_snippet(body)}",
                reason="http_status",
                retryable=True,
                status=status,
            )
        if not 200 <= status < 300:
            raise _Failure(
                f"HTTP {status} {response.reason} (not retried): {_snippet(body)}",
                reason="http_status",
                retryable=False,
                status=status,
            )
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise _Failure(
            f"reply is not valid JSON: {_snippet(body)}", reason="bad_reply", retryable=False
        ) from None


def _post_once(
    session: requests.Session,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    limit: float,
) -> Any:
    """One POST that takes at most ``limit`` seconds in all, however the server behaves.

    ``requests``' own timeout is per socket operation: a server that sends one byte every
    few seconds would never trip it, so the watchdog shuts the request's sockets down
    when ``limit`` has passed, which wakes a blocked read at once.
    """
    with Watchdog(limit) as watchdog:
        try:
            return _exchange(session, url, payload, headers, limit)
        except _Failure as failure:
            if not watchdog.expired:
                raise
            raise _Failure(
                f"no complete reply within {limit:g} s (timeout)", reason="timeout", retryable=True
            ) from failure


def _post(
    session: requests.Session,
    request: _Request,
    payload: dict[str, Any],
    config: JudgeParams,
    run_deadline: float,
) -> Any:
    """POST with retries for connection errors, timeouts, 429 and 5xx (never other 4xx).

    Each attempt takes at most ``config.timeout`` seconds, and none runs (or waits to
    retry) past ``run_deadline`` (a ``time.monotonic()`` value).
    """
    for attempt in range(config.retries + 1):
        remaining = run_deadline - time.monotonic()
        if remaining <= 0:
            raise _Failure(_deadline_message(config), reason="deadline", retryable=False)
        limit = min(config.timeout, remaining)
        try:
            return _post_once(session, request.url, payload, request.headers, limit)
        except _Failure as failure:
            if failure.reason == "timeout" and limit < config.timeout:
                failure.reason = "deadline"  # cut short by the run's deadline
                failure.message = f"{_deadline_message(config)} during the request"
                failure.retryable = False
            delay = min(config.backoff * 2**attempt, _MAX_BACKOFF_S)
            no_time = time.monotonic() + delay >= run_deadline
            if not failure.retryable or attempt == config.retries or no_time:
                if attempt:
                    failure.message += f", after {attempt + 1} attempts"
                if failure.retryable and attempt < config.retries:
                    failure.message += "; no time left to retry before the run deadline"
                raise
            log.warning(
                "judge: attempt %d/%d failed (%s); retrying in %.2f s",
                attempt + 1,
                config.retries + 1,
                failure.message,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _deadline_message(config: JudgeParams) -> str:
    return f"run deadline of {config.deadline_s:g} s (judge deadline_s) reached"


def _content(body: Any, path: Sequence[str | int]) -> str:
    """The reply text at ``path`` in the JSON body, or _Failure if the shape is wrong."""
    node = body
    for key in path:
        if isinstance(key, int):
            ok = isinstance(node, list) and len(node) > key
        else:
            ok = isinstance(node, dict) and key in node
        if not ok:
            break
        node = node[key]
    else:
        if isinstance(node, str):
            return node
    where = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path)
    raise _Failure(f"reply has no text at {where.lstrip('.')}", reason="bad_reply", retryable=False)


def _api_key(config: JudgeParams) -> str | None:
    """The bearer token from the environment (stripped), or None when unset or empty."""
    key = os.environ.get(config.api_key_env, "").strip()
    if not key:
        return None
    if not key.isascii() or not key.isprintable() or any(ch.isspace() for ch in key):
        raise JudgeError(
            f"environment variable {config.api_key_env} holds an API key with characters "
            "not allowed in an HTTP header"
        )
    return key


def check_environment(config: JudgeParams) -> None:
    """Raise :class:`JudgeError` now if the API key variable holds an unusable value.

    :func:`judge_entries` would find it too, but only when it starts; a stage calls this
    before its other work. Never contacts the server, and never shows the key.
    """
    if config.backend == "openai":
        _api_key(config)


@dataclass(frozen=True)
class _Request:
    """Endpoint, headers and payload builder for one backend."""

    url: str
    headers: dict[str, str]
    reply_path: tuple[str | int, ...]
    server: str  # for messages, e.g. "Ollama at http://localhost:11434"
    hint: str

    @staticmethod
    def for_config(config: JudgeParams) -> _Request:
        base = base_url(config).rstrip("/")
        shown = redact(base_url(config))
        if config.backend == "ollama":
            return _Request(
                url=f"{base}/api/chat",
                headers={},
                reply_path=("message", "content"),
                server=f"Ollama at {shown}",
                hint=f"start it with `ollama serve` and `ollama pull {config.model}`",
            )
        key = _api_key(config)
        return _Request(
            url=f"{base}/chat/completions",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            reply_path=("choices", 0, "message", "content"),
            server=f"the OpenAI-compatible server at {shown}",
            hint=(
                "start the server or point the judge url at one (base URL including /v1), "
                f"and set {config.api_key_env} if it needs a key"
            ),
        )


def _payload(config: JudgeParams, prompt: str) -> dict[str, Any]:
    """The request body; temperature 0 and a fixed seed keep scores reproducible."""
    messages = [{"role": "user", "content": prompt}]
    if config.backend == "ollama":
        return {
            "model": config.model,
            "messages": messages,
            "stream": False,
            "options": {
                "seed": config.seed,
                "temperature": config.temperature,
                "num_ctx": config.num_ctx,
            },
        }
    return {
        "model": config.model,
        "messages": messages,
        "temperature": config.temperature,
        "seed": config.seed,
    }


# --- judging ------------------------------------------------------------------------------


def check_entries(entries: Any) -> None:
    """Reject malformed entries (ValueError) before contacting any server: they are a
    caller's bug or bad data, never server trouble."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise ValueError(f"judge entries must be a list of dicts, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"judge entry {index} must be a dict, got {type(entry).__name__}")
        for key in ("instruction", "output", "model_response"):
            if not isinstance(entry.get(key), str):
                raise ValueError(
                    f"judge entry {index}: field {key!r} must be a string, "
                    f"got {type(entry.get(key)).__name__}"
                )
        if not isinstance(entry.get("input") or "", str):
            raise ValueError(f"judge entry {index}: field 'input' must be a string or null")


def _clean_reply(text: str) -> str:
    """Truncate and drop lone surrogates, so rows can always be written as UTF-8 JSON."""
    return text[:_MAX_REPLY_CHARS].encode("utf-8", "replace").decode("utf-8")


def _row(index: int, reason: str | None = None, message: str = "") -> dict[str, Any]:
    """A result row; a failed one says why in ``error`` ("<reason>: <details>")."""
    error = None if reason is None else f"{reason}: {message}"
    return {"index": index, "score": None, "reply": "", "reason": reason, "error": error}


def _summary(config: JudgeParams, rows: list[dict[str, Any]], error: str | None) -> dict[str, Any]:
    """Counts, mean and histogram of the parsed scores, and the failures by reason."""
    scores = [row["score"] for row in rows if row["score"] is not None]
    histogram = dict.fromkeys(HISTOGRAM_BUCKETS, 0)
    for score in scores:
        histogram[HISTOGRAM_BUCKETS[min(score // 10, 9)]] += 1
    failed = Counter(row["reason"] for row in rows if row["reason"] is not None)
    return {
        "judge_backend": config.backend,
        "judge_model": config.model,
        "judge_count": len(scores),
        "judge_unparseable": failed["unparseable"],
        "judge_failed": {reason: failed[reason] for reason in REASONS if failed[reason]},
        "judge_mean": sum(scores) / len(scores) if scores else None,
        "judge_histogram": histogram,
        "judge_error": error,
    }


def judge_entries(
    entries: Sequence[Mapping[str, Any]],
    config: JudgeParams,
    *,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score each entry's ``model_response`` with the judge; return (rows, summary).

    Entries need ``instruction``, ``output`` and ``model_response`` strings (``input`` may be
    missing or null). There is one row per entry, in order: ``{"index", "score", "reply",
    "reason", "error"}``. ``score`` is an int 0-100 or None, ``reply`` the raw judge text (at
    most 2,000 characters). An entry without a score has a ``reason`` (a key of
    :data:`REASONS`: ``unreachable``, ``timeout``, ``http_status``, ``bad_reply``,
    ``unparseable`` or ``deadline``) and an ``error`` "<reason>: <details>"; a scored one
    has both None.

    The summary holds ``judge_backend``, ``judge_model``, ``judge_count`` (scored),
    ``judge_unparseable``, ``judge_failed`` (the unscored entries counted by reason, e.g.
    ``{"timeout": 2, "unparseable": 3}``), ``judge_mean`` (None without scores), a nested
    ``judge_histogram`` of ten buckets ("0-9" ... "90-100"; ``dvc metrics`` flattens nested
    dicts itself) and ``judge_error``: None, unless judging stopped early or nothing was
    scored, when it says why in one line naming the server (and, with nothing scored, the
    first entry's failure). Server trouble never raises: if the first entry cannot reach
    the server, or is refused with HTTP 401/403/404 (wrong key, URL or model, which would
    repeat for every entry), the other entries are not sent and get the same reason; so
    are those left after a few consecutive connection failures, and those left when
    ``config.deadline_s`` has passed (reason ``deadline``). ``backend="none"`` contacts
    nothing and returns no rows. Bad entries raise ValueError, an unusable API key
    variable :class:`JudgeError`. ``progress``: a bar with an ETA on stderr
    (:func:`gpt2_instruct.progress.progress_bar`).
    """
    if not isinstance(config, JudgeParams):
        raise TypeError(f"judge_entries needs a JudgeParams, got {type(config).__name__}")
    check_entries(entries)
    if not config.enabled or not entries:
        return [], _summary(config, [], None)

    run_deadline = time.monotonic() + config.deadline_s
    request = _Request.for_config(config)
    rows: list[dict[str, Any]] = []
    error: str | None = None
    unreachable_streak = 0
    bar = progress_bar(len(entries), "judge", "entry", enabled=progress)
    try:
        with watched_session() as session:
            for index, entry in enumerate(entries):
                if time.monotonic() >= run_deadline:
                    cut_short = sum(1 for row in rows if row["reason"] == "deadline")
                    left = len(entries) - index + cut_short
                    error = (
                        f"{_deadline_message(config)} with {request.server}; {left} of "
                        f"{len(entries)} entries not judged"
                    )
                    rows += [
                        _row(i, "deadline", f"not sent: {_deadline_message(config)}")
                        for i in range(index, len(entries))
                    ]
                    break
                prompt = build_prompt(entry, config.template or RUBRICS[config.rubric])
                try:
                    body = _post(session, request, _payload(config, prompt), config, run_deadline)
                    text = _content(body, request.reply_path)
                except _Failure as failure:
                    rows.append(_row(index, failure.reason, failure.message))
                    first = index == 0
                    if first and failure.unreachable:
                        error = (
                            f"could not reach {request.server} ({failure.message}); {request.hint}"
                        )
                    elif first and failure.status in _FIRST_CALL_FATAL_STATUSES:
                        error = (
                            f"{request.server} refused the first request ({failure.message}); "
                            f"check the judge model {config.model!r}, url and key; {request.hint}"
                        )
                    unreachable_streak = unreachable_streak + 1 if failure.unreachable else 0
                    if error is None and unreachable_streak >= _MAX_CONSECUTIVE_UNREACHABLE:
                        error = (
                            f"lost contact with {request.server} ({failure.message}); stopped "
                            f"after {unreachable_streak} consecutive connection failures, "
                            f"{len(entries) - index - 1} of {len(entries)} entries not judged"
                        )
                    if error is not None:
                        rows += [
                            _row(i, failure.reason, f"not sent: judging stopped at entry {index}")
                            for i in range(index + 1, len(entries))
                        ]
                        break
                else:
                    unreachable_streak = 0
                    row = _row(index)
                    row["reply"] = _clean_reply(text)
                    row["score"] = parse_score(text)
                    if row["score"] is None:
                        row["reason"] = "unparseable"
                        row["error"] = f"unparseable: not an integer 0-100: {_snippet(text)}"
                    rows.append(row)
                bar.update(1)
    finally:
        bar.close()
    scored = any(row["score"] is not None for row in rows)
    if error is None and not scored:
        first_failure = rows[0]  # rows is not empty: every entry has one
        error = (
            f"{request.server} scored none of the {len(entries)} entries; first failure "
            f"(entry {first_failure['index']}): {first_failure['error']}"
        )
    if error is not None:
        log.warning("judge: %s", error)
    return rows, _summary(config, rows, error)
