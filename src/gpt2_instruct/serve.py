"""``gpt2-instruct serve``: an OpenAI-compatible HTTP server for a fine-tuned model directory.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (both with ``stream: true`` as server-sent events ending in
``data: [DONE]``) and ``GET /health``. The model id is the directory's name unless
``--model-name`` gives one.

A chat renders like ``gpt2-instruct chat`` and the Hugging Face folder's chat template
(``hf_folder.chat_template``): the model learned one instruction per prompt, so a chat is one
``user`` message, the instruction, and optionally a second ``user`` message, its input,
formatted with the directory's prompt style (``data.format_prompt``). System and assistant
messages and further turns are refused (400), not silently dropped: the model never saw them.
The reply is the answer ``generate`` would extract (``generate.response_extraction``).
``/v1/completions`` continues a raw prompt as it is, no template, no extraction.

A field left out takes the server's default (``--temperature`` etc., greedy by default, like
``chat``); a request without ``seed`` gets a fresh random one. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 404 for an unknown
model, 413 for a body over ``--max-body-bytes``, 503 when ``--max-queue`` requests wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gpt2_instruct.data import Entry, format_prompt
from gpt2_instruct.params import MAX_SEED, SamplingParams
from gpt2_instruct.serve_engine import Engine, EngineBusy, Job, TextPipeline, answer_deltas
from gpt2_instruct.serve_schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    error_body,
    sse,
    validation_message,
)

__all__ = ["ServeOptions", "create_app", "is_loopback", "run_server"]

PROG = "gpt2-instruct serve"
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ServeOptions:
    """What the server answers with: the model id, the defaults for fields a request leaves
    out (``max_new_tokens`` is the default ``max_tokens``) and the limits."""

    model_id: str
    defaults: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_limit: int | None = None  # None: only the context bounds max_tokens
    max_body_bytes: int = 1 << 20


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413) before they are buffered: by their
    Content-Length, and while reading a body sent without one."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body over the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            body = error_body(str(self._too_large().detail), code=HTTP_CODES[413])
            return await JSONResponse(body, status_code=413)(scope, receive, send)
        received = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()
            return message

        return await self.app(scope, limited, send)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (a name counts as not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def chat_entry(request: ChatRequest) -> Entry:
    """The instruction entry of a chat, by ``hf_folder.chat_template``'s convention: a user
    message is the instruction, an optional second user message its input."""
    roles = [message.role for message in request.messages]
    if "system" in roles or "developer" in roles:
        message = "system messages are refused: the model was trained without one"
        raise APIError(400, message, param="messages")
    if roles not in (["user"], ["user", "user"]):
        raise APIError(
            400,
            "this model answers one instruction: send a user message (the instruction) and "
            f"optionally a second user message (its input), nothing else; got roles {roles}",
            param="messages",
        )
    texts = [message.content for message in request.messages]
    for index, text in enumerate(texts):
        if text is None:
            message = "a user message needs a content"
            raise APIError(400, message, param=f"messages[{index}].content")
    return Entry(texts[0] or "", texts[1] if len(texts) > 1 else "", "")


def create_app(engine: Engine, options: ServeOptions) -> FastAPI:
    """The FastAPI application; its lifespan starts and stops the engine's worker."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="gpt2-instruct", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    context = engine.context_length
    max_tokens_limit = min(options.max_tokens_limit or context - 1, context - 1)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(dict(err.errors()[0]))
        content_type = request.headers.get("content-type", "")
        if param is None and not content_type.startswith("application/json"):
            message = f"send the body as JSON with Content-Type: application/json ({message})"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        code = HTTP_CODES.get(err.status_code)
        body = error_body(str(err.detail), kind=kind, code=code)
        return JSONResponse(body, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(str(err), kind="server_error"), status_code=500)

    def model_card() -> dict[str, Any]:
        return {"id": options.model_id, "object": "model", "created": created, "owned_by": "local"}

    def check_model(name: str) -> None:
        if name != options.model_id:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {options.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def sampling(request: ChatRequest | CompletionRequest, prompt_tokens: int) -> SamplingParams:
        """The request's decoding, checked against the context and the server's limits."""
        if request.n != 1:
            raise APIError(400, f"only n=1 is supported, got n={request.n}", param="n")
        if (name := request.unsupported()) is not None:
            raise APIError(400, f"{name!r} is not supported by this server", param=name)
        room = context - prompt_tokens
        param = "messages" if isinstance(request, ChatRequest) else "prompt"
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; the model's context of {context} "
                "tokens must also hold at least one answer token",
                param=param,
                code="context_length_exceeded",
            )
        wanted = request.requested_tokens
        limit_param = (
            "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
        )
        if wanted is None:
            max_new = min(options.defaults.max_new_tokens, room, max_tokens_limit)
        elif wanted > max_tokens_limit:
            message = f"{limit_param} is {wanted}; this server allows at most {max_tokens_limit}"
            raise APIError(400, message, param=limit_param)
        elif wanted > room:
            raise APIError(
                400,
                f"the model's context is {context} tokens and the prompt has {prompt_tokens}, "
                f"so {limit_param} can be at most {room}, got {wanted}",
                param=limit_param,
                code="context_length_exceeded",
            )
        else:
            max_new = wanted
        given = {
            name: getattr(request, name)
            for name in ("temperature", "top_k", "top_p", "seed")
            if getattr(request, name) is not None
        }
        seed = secrets.randbelow(MAX_SEED + 1)  # OpenAI's: without a seed, a fresh sample
        return dataclasses.replace(
            options.defaults, **{"max_new_tokens": max_new, "seed": seed, **given}
        )

    async def respond(
        request: ChatRequest | CompletionRequest, prompt: list[int], chat: bool
    ) -> Response:
        decoding = sampling(request, len(prompt))
        try:
            job = engine.submit(prompt, decoding)
        except EngineBusy as err:
            message = f"server busy ({err}); retry later"
            raise APIError(503, message, kind="server_error", code="server_busy") from None
        style = engine.style if chat else None
        pipe = TextPipeline(engine.tokenizer, request.stop or [], style, engine.response_extraction)
        reply = Reply(chat, options.model_id, len(prompt))
        if request.stream:
            events = _events(job, pipe, reply, request.include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        text = "".join([piece async for piece in answer_deltas(job, pipe)])
        return JSONResponse(reply.whole(text, pipe.finish_reason, pipe.tokens))

    async def _events(
        job: Job, pipe: TextPipeline, reply: Reply, include_usage: bool
    ) -> AsyncIterator[str]:
        if reply.chat:
            yield reply.chunk("", first=True)
        try:
            async for piece in answer_deltas(job, pipe):
                yield reply.chunk(piece)
        except Exception as err:  # the status line is sent: the error becomes an event
            yield sse(error_body(str(err), kind="server_error"))
            return
        yield reply.chunk(None, pipe.finish_reason)
        if include_usage:
            yield reply.usage_chunk(pipe.tokens)
        yield "data: [DONE]\n\n"

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": options.model_id}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> Response:
        check_model(request.model)
        entry = chat_entry(request)
        prompt = engine.tokenizer.encode(format_prompt(entry, engine.style))
        return await respond(request, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Response:
        check_model(request.model)
        # An empty prompt starts from <|endoftext|>, GPT-2's start of a document.
        prompt = engine.tokenizer.encode(request.text()) or [engine.tokenizer.eot_id]
        return await respond(request, prompt, chat=False)

    return app


def run_server(
    model_dir: Path,
    *,
    host: str,
    port: int,
    device: torch.device,
    options: ServeOptions,
    max_batch: int = 8,
    max_queue: int = 64,
    response_extraction: str = "reference",
) -> None:
    """Load the model and serve it until interrupted (uvicorn handles SIGINT/SIGTERM)."""
    import uvicorn

    from gpt2_instruct.model_dir import load_instruct_model

    model, tokenizer, style = load_instruct_model(model_dir, device=device)
    engine = Engine(
        model,
        tokenizer,
        style,
        max_batch=max_batch,
        max_queue=max_queue,
        response_extraction=response_extraction,
    )
    if not is_loopback(host):
        print(
            f"{PROG}: warning: listening on {host}, reachable from other machines; the server "
            "has no authentication (use 127.0.0.1 or put it behind a proxy that checks keys)",
            file=sys.stderr,
        )
    where = f"http://{host}:{port}/v1"
    print(
        f"{PROG}: model {options.model_id!r} ({model_dir}, prompt style {style}, "
        f"{model.tok_emb.weight.device}) at {where}",
        file=sys.stderr,
    )
    app = create_app(engine, options)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
