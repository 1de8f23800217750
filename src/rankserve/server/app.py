"""The FastAPI app: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, /health.

Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) with the right
status; a bad request is refused before it reaches the engine and never disturbs the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rankserve.core.request import FinishReason, Request
from rankserve.engine import ENGINE_ERROR, AsyncEngine
from rankserve.server import DEFAULT_MAX_QUEUED
from rankserve.server.metrics import ServerMetrics
from rankserve.server.protocol import ChatCompletionRequest, CompletionRequest, InvalidField, _SamplingFields, check_token_ids
from rankserve.server.text import TextStream, TextTokenizer


RETRY_AFTER_S = 1  # what a 429 asks the client to wait


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    @property
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    max_queued: int = DEFAULT_MAX_QUEUED
    vocab_size: int = 1 << 31  # token ids at or past it are refused; serve sets the model's


class _CountInFlight:
    """ASGI middleware keeping ``state.in_flight``: the app's call returns only once the response
    is sent in full or the client has gone, however the handler ended."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


async def _until_disconnected(http: HTTPRequest) -> None:
    """Return when the client disconnects (the body is read: ASGI's receive only reports that)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(http: HTTPRequest, work: Awaitable):
    """``await work``, but cancel it and raise ClientGone if the client leaves first. Cancelling
    the wait for an engine output closes the generation, which aborts the request in the engine."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # it closes the generation on its way out
    raise ClientGone


def _finish_reason(reason: FinishReason | None, stopped_by_text: bool) -> str | None:
    if stopped_by_text or reason is FinishReason.STOP:
        return "stop"
    if reason is FinishReason.LENGTH:
        return "length"
    return "abort" if reason is FinishReason.ABORT else None


def build_app(config: ServerConfig, tokenizer: TextTokenizer | None, engine: AsyncEngine | None = None,
              kernels: dict[str, str] | None = None) -> FastAPI:
    """The app; ``app.state.tokenizer`` and then ``app.state.engine`` may be set later (503 until
    the engine is there, e.g. while the model loads). ``kernels``: the kernel paths the engine's
    model runs (``app.state.kernels``), shown in /metrics."""
    app = FastAPI(title="rankserve", version="0.1.0")
    app.state.tokenizer = tokenizer
    app.state.engine = engine
    app.state.kernels = kernels or {}
    app.state.recorder = None  # a LengthRecorder with --record-lengths (its counters go to /metrics)
    app.state.draining = False  # set on shutdown: refuse new requests, let the others finish
    app.state.in_flight = 0  # HTTP requests not answered in full (a stream: until its last event)
    app.add_middleware(_CountInFlight, state=app.state)
    metrics = ServerMetrics(config.model_name)

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ClientGone)
    async def _gone(_: HTTPRequest, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it (nginx's code for a closed request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return APIError(400, f"{param}: {first.get('msg', 'invalid request')}" if param else str(exc),
                        param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    def _ready(http: HTTPRequest) -> AsyncEngine:
        if config.api_key is not None:
            given = http.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {config.api_key}"):
                raise APIError(401, "invalid or missing API key", "authentication_error")
        _check_serving()
        return app.state.engine

    def _check_serving() -> None:
        if app.state.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        if app.state.engine is None:
            raise APIError(503, "the model is loading", "service_unavailable")

    def _check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"model '{name}' not found (serving '{config.model_name}')",
                           "not_found_error", "model", "model_not_found")

    def _make_request(body: _SamplingFields, prompt_ids: list[int], max_tokens: int | None,
                      prompt_text: str | None) -> Request:
        try:  # given as ids, or a tokenizer larger than the model's vocabulary
            check_token_ids(prompt_ids, config.vocab_size, "prompt")
        except InvalidField as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        room = config.max_model_len - len(prompt_ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" + max_tokens {max_tokens}" if max_tokens is not None else ""
            raise APIError(400, f"prompt of {len(prompt_ids)} tokens{asked} exceeds the context length "
                           f"of {config.max_model_len}", param="max_tokens", code="context_length_exceeded")
        try:
            sampling = body.sampling(max_tokens or room, app.state.tokenizer.eos_token_id, config.vocab_size)
        except ValueError as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", None)) from None
        # A request that ignores EOS runs exactly max_tokens tokens (a replayed trace): its length is
        # known, which is what the oracle predictor reads.
        known = sampling.max_tokens if sampling.ignore_eos else None
        return Request(prompt_ids, sampling, priority=body.priority, request_id=f"cmpl-{uuid.uuid4().hex}",
                       prompt_text=prompt_text, oracle_output_len=known)

    async def _run(engine: AsyncEngine, req: Request, stream: TextStream) -> AsyncIterator[tuple[str, str | None]]:
        """Yield (text delta, finish reason or None) as tokens come, ending the request early on
        a stop string. Raises APIError (500) if the engine failed on this request."""
        if engine.loop.num_waiting >= config.max_queued:
            raise APIError(429, "too many requests waiting; try again later", "rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            outputs = engine.generate(req, on_end=metrics.observe_finished)
            async for out in outputs:
                if out.finished and (req.abort_reason or "").startswith(ENGINE_ERROR):
                    raise APIError(500, f"the engine failed on this request: {req.abort_reason}", "server_error")
                delta = stream.push(out.new_token_ids, final=out.finished)
                if stream.stopped and not out.finished:
                    engine.loop.finish(req.request_id, FinishReason.STOP)
                    await outputs.aclose()
                    yield delta, "stop"
                    return
                yield delta, _finish_reason(out.finish_reason, stream.stopped) if out.finished else None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def _usage(req: Request, stream: TextStream) -> dict:
        n = len(stream.token_ids)
        return {"prompt_tokens": req.prompt_len, "completion_tokens": n, "total_tokens": req.prompt_len + n}

    def _sse(data: dict | str) -> str:
        return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

    async def _respond(engine: AsyncEngine, body: _SamplingFields, req: Request, chat: bool,
                       http: HTTPRequest) -> Response:
        stream = TextStream(app.state.tokenizer, body.stop or ())
        created = int(time.time())
        head = {"id": req.request_id, "created": created, "model": config.model_name}
        gen = _run(engine, req, stream)
        if not body.stream:
            async def whole() -> tuple[str, str | None]:
                text, reason = "", None
                async for delta, finish in gen:
                    text += delta
                    reason = finish or reason
                return text, reason

            text, reason = await _unless_disconnected(http, whole())
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
            obj = "chat.completion" if chat else "text_completion"
            return JSONResponse({**head, "object": obj, "choices": [choice], "usage": _usage(req, stream)})

        # Wait for the first output before answering, so that errors (429, 400) still get a status
        # code; a client that leaves while its request waits in the queue aborts it.
        first = await _unless_disconnected(http, anext(gen, None))
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str, finish: str | None, role: bool = False) -> dict:
            if chat:
                content = {"role": "assistant", "content": delta} if role else {"content": delta}
                choice = {"index": 0, "delta": content, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            return {**head, "object": obj, "choices": [choice]}

        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield _sse(chunk(first[0], first[1], role=True))
                async for delta, finish in gen:
                    yield _sse(chunk(delta, finish))
                if body.include_usage:
                    yield _sse({**head, "object": obj, "choices": [], "usage": _usage(req, stream)})
            except APIError as exc:  # the status line is gone: report it in the stream
                yield _sse(exc.body)
            finally:
                await gen.aclose()  # a client that went away aborts the request
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Response:
        _check_serving()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        engine = app.state.engine
        records = app.state.recorder.stats if app.state.recorder is not None else None
        body = (metrics.render(engine.loop.core.scheduler, engine.loop.stats, app.state.kernels, records)
                if engine is not None else metrics.render(None))
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(http: HTTPRequest) -> dict:
        _ready(http)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "owned_by": "rankserve",
                                            "max_model_len": config.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Response:
        engine = _ready(http)
        _check_model(body.model)
        if isinstance(body.prompt, str):
            ids, text = app.state.tokenizer.encode(body.prompt), body.prompt
        else:
            ids, text = list(body.prompt), None
        if not ids:
            raise APIError(400, "prompt has no tokens", param="prompt")
        return await _respond(engine, body, _make_request(body, ids, body.max_tokens, text), False, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest) -> Response:
        engine = _ready(http)
        _check_model(body.model)
        ids = app.state.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        # Length predictors are trained on first-turn user prompts: hand them the user turns.
        text = "\n".join(m.content for m in body.messages if m.role == "user")
        return await _respond(engine, body, _make_request(body, ids, body.requested_max_tokens, text), True, http)

    return app
