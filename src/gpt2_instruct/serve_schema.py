"""Request and response bodies of ``gpt2-instruct serve`` and its errors, in OpenAI's shapes.

The models are strict (no "0.7" for a number, no ``true`` for an integer, no NaN), so a
client's mistake is a clear 400 instead of a silent guess. Unknown fields are accepted, as
OpenAI clients send many, except those that would change the answer in a way this server
cannot honour (:data:`UNSUPPORTED`): those are refused by name.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpt2_instruct.params import MAX_SEED

__all__ = [
    "UNSUPPORTED",
    "APIError",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "Reply",
    "error_body",
    "sse",
    "validation_message",
]

MAX_STOPS = 4  # OpenAI's limit

#: Fields refused when set to anything but their neutral value (None, false, 0, empty).
UNSUPPORTED: tuple[str, ...] = (
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "tools",
    "functions",
    "frequency_penalty",
    "presence_penalty",
    "echo",
    "suffix",
)


class APIError(Exception):
    """A request the server refuses; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error object, which its clients turn into their exception messages."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _path(loc: Sequence[int | str]) -> str:
    """``("body", "messages", 0, "content")`` as ``messages[0].content``."""
    text = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """A one-line message and the ``param`` for one of pydantic's/FastAPI's errors."""
    kind, loc = error.get("type", ""), tuple(error.get("loc", ()))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "malformed JSON")
        return f"the request body is not valid JSON: {detail}", None
    if loc in ((), ("body",)):
        if kind == "missing":
            return "the request needs a JSON object body", None
        return "the request body must be a JSON object", None
    param = _path(loc)
    if kind == "missing":
        return f"missing required field {param!r}", param
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"invalid {param!r}: {message} (got {shown})", param


def _text_content(value: Any) -> Any:
    """A message's content: a string, or OpenAI's list of text parts joined together."""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ValueError("only text content parts ({'type': 'text', ...}) are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            parts.append(part["text"])
        return "".join(parts)
    return value


class _Request(BaseModel):
    """Fields shared by both endpoints (OpenAI's names and ranges); a sampling field left
    out takes the server's default (``serve``'s options), not OpenAI's."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: the server's default
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's, but vLLM's and ours
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1)
    stop: list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if value is None:
            return value
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(value) > MAX_STOPS:
            raise ValueError(f"stop takes at most {MAX_STOPS} strings")
        return value

    def unsupported(self) -> str | None:
        """The first field set that this server cannot honour, if any."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, 0, "", [], {}):
                return name
        if extra.get("best_of") not in (None, 1):
            return "best_of"
        response_format = extra.get("response_format")
        if response_format not in (None, {"type": "text"}):
            return "response_format"
        return None

    @property
    def include_usage(self) -> bool:
        """``stream_options.include_usage``: a last chunk carrying the token counts."""
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def requested_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        newer = self.max_completion_tokens
        return self.max_tokens if newer is None else newer


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _text_content(value)


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    """``POST /v1/completions``: a raw prompt, continued as it is (no template)."""

    prompt: str | list[str]

    def text(self) -> str:
        """The one prompt (a list must hold exactly one string)."""
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(
                400,
                f"this server takes one prompt per request, got a list of {len(self.prompt)}",
                param="prompt",
            )
        return self.prompt[0]


class Reply:
    """The response objects of one request, in OpenAI's chat or completion shape (a whole
    answer, or the server-sent events of a streamed one)."""

    def __init__(self, chat: bool, model_id: str, prompt_tokens: int) -> None:
        self.chat, self.model_id, self.prompt_tokens = chat, model_id, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}
        return {**head, "system_fingerprint": None, "choices": choices}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        total = self.prompt_tokens + completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total,
        }

    def whole(self, text: str, finish: str | None, tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            kind = "chat.completion"
        else:
            choice["text"] = text
            kind = "text_completion"
        return {**self._object(kind, [choice]), "usage": self.usage(tokens)}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> str:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            delta = {} if text is None else {"content": text}
            choice["delta"] = {"role": "assistant", **delta} if first else delta
        else:
            choice["text"] = text or ""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return sse(self._object(kind, [choice]))

    def usage_chunk(self, tokens: int) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._object(kind, []), "usage": self.usage(tokens)})


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
