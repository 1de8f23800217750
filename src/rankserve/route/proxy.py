"""The router: an OpenAI-compatible proxy in front of one backend (``rankserve gateway``) or several
(``rankserve route``). One mechanism for both; a gateway is a router with one backend.

For each completion or chat request it
1. scores the prompt once with the length predictor (batched with concurrent arrivals, off the event
   loop) and counts its tokens; a scoring failure forwards the request without a score;
2. picks a healthy backend with the router policy over the per-backend load trackers (a score
   without a length counts the output length that finished requests of its score had here);
3. forwards the client's body with the score written in (``route/body.py``: ``priority``,
   ``vllm_xargs`` or nothing) and relays the answer: a stream event by event, unchanged, counting
   output tokens into the tracker as they pass; an upstream error (status and body) unchanged.

Failures: a backend that fails before anything reached the client (refused connection, reset, a
stream that ends before its first event) is taken out and the request goes to another one (at most
``max_retries`` times); a stream that already started ends with an error event and ``[DONE]``. A
client that goes away closes the upstream request, which aborts it there. Health checks bring a
backend back once it answers ``/health`` again. While no backend is marked healthy, requests still
go to the least busy one (health is a hint; only failures answer 502).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rankserve.route.backends import Backend, check_all
from rankserve.route.body import DEFAULT_PRIORITY_SCALE, DEFAULT_XARGS_KEY, SCORE_MODES, mark_score, max_tokens_of, read_prompt
from rankserve.route.load import ReplicaLoad, ScoreLengths
from rankserve.route.metrics import RouterMetrics
from rankserve.route.policies import NoHealthyReplica, RouteRequest, make_router
from rankserve.route.scoring import PromptScorer
from rankserve.route.sse import EventReader, completion_tokens, error_event, output_tokens


@dataclass
class RouterConfig:
    backends: Sequence[str]
    router: str = "round-robin"  # with one backend any router picks it
    mode: str = "none"  # how the score travels: see route/body.py
    xargs_key: str = DEFAULT_XARGS_KEY
    priority_scale: float = DEFAULT_PRIORITY_SCALE
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    max_retries: int = 3
    kv_capacity_tokens: int | None = None  # for backends that do not report their KV capacity
    prefill_weight: float = 0.5  # a prompt token's cost in decode tokens, for sal
    bound_by_max_tokens: bool = True  # False: the trackers do not see max_tokens (replayed traces)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("give at least one backend")
        if self.mode not in SCORE_MODES:
            raise ValueError(f"unknown mode {self.mode!r} (choose from {', '.join(SCORE_MODES)})")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


class UpstreamFailed(Exception):
    """The backend failed before anything was sent to the client: the request can go elsewhere."""


class ClientGone(Exception):
    """The client disconnected while the router waited for the backend."""


def openai_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


@dataclass(frozen=True)
class Prepared:
    """A request ready to forward: the body with the score written in, and what routing reads."""

    payload: bytes
    route: RouteRequest
    stream: bool
    # The score whose finished length should teach ``lengths`` (None: the predictor gave a length,
    # or there is no score): pass it to ``learn_length`` when the request completes.
    length_score: float | None = None


async def prepare_request(raw: bytes, chat: bool, scorer: PromptScorer, mode: str,
                          xargs_key: str = DEFAULT_XARGS_KEY, priority_scale: float = DEFAULT_PRIORITY_SCALE,
                          bound_by_max_tokens: bool = True, lengths: ScoreLengths | None = None
                          ) -> Prepared | JSONResponse:
    """Parse and score a completion (``chat`` False) or chat request body; a 400 answer if it is
    not one. A score without a length (the ranker) gets the length ``lengths`` learned for its
    score, when ``lengths`` is given."""
    try:
        body = json.loads(raw)
    except ValueError:
        return openai_error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return openai_error(400, "the request body must be a JSON object")
    try:
        prompt = read_prompt(chat, body)
    except ValueError as exc:
        return openai_error(400, str(exc), param="messages" if chat else "prompt")
    scored = await scorer.score(prompt)
    payload = json.dumps(mark_score(body, mode, scored.score, scored.predicted_len, xargs_key, priority_scale))
    predicted, length_score = scored.predicted_len, None
    if predicted is None and scored.score is not None and lengths is not None:
        predicted, length_score = lengths.predict(scored.score), scored.score
    route = RouteRequest(scored.prompt_tokens, predicted, max_tokens_of(chat, body) if bound_by_max_tokens else None)
    return Prepared(payload.encode(), route, body.get("stream") is True, length_score)


def learn_length(lengths: ScoreLengths, score: float | None, output_tokens: int | None) -> None:
    """A request prepared with ``length_score`` ``score`` (None: nothing to learn) completed with
    ``output_tokens``: the one rule by which the live router and Ray Serve's ingress learn lengths."""
    if score is not None and output_tokens is not None:
        lengths.observe(score, output_tokens)


async def _until_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable[Response]) -> Response:
    """``work``'s result, or ClientGone (``work`` cancelled) if the client disconnects first."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _close(response: httpx.Response) -> None:
    """Close an upstream response even inside a cancelled task (closing aborts it upstream)."""
    with anyio.CancelScope(shield=True):
        await response.aclose()


class RoutingProxy:
    """The proxy's state: backends with their trackers, the policy, the scorer, the HTTP client."""

    def __init__(self, config: RouterConfig, scorer: PromptScorer, clock: Callable[[], float] = time.monotonic,
                 lengths: ScoreLengths | None = None) -> None:
        self.config = config
        self.scorer = scorer
        self.clock = clock
        # A predictor that gives scores but no lengths (the ranker): the trackers' predicted output
        # comes from the lengths requests of each score have had here.
        self.lengths = lengths or ScoreLengths()
        self.backends = [Backend(url, ReplicaLoad(prefill_weight=config.prefill_weight,
                                                  kv_capacity_tokens=config.kv_capacity_tokens))
                         for url in config.backends]
        urls = [b.url for b in self.backends]
        if len(set(urls)) < len(urls):
            raise ValueError(f"a backend is given twice: {', '.join(urls)}")
        self.policy = make_router(config.router, seed=config.seed)
        self.metrics = RouterMetrics(self.backends, scorer)
        self.client: httpx.AsyncClient | None = None
        self._health: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(None, connect=self.config.connect_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        await self.check_health()
        self._health = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        self.scorer.close()

    async def check_health(self) -> None:
        await check_all(self.backends, self.client, self.config.health_timeout_s, self.config.kv_capacity_tokens)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.check_health()

    # ---- routing -------------------------------------------------------------------------
    def pick(self, info: RouteRequest, exclude: Sequence[Backend] = ()) -> Backend | None:
        """The policy's choice among the healthy backends not in ``exclude``. With none healthy, the
        least busy of the others: health is a hint, and trying costs less than refusing (a dead
        backend refuses at once and the request moves on)."""
        candidates = [b for b in self.backends if b not in exclude]
        if not candidates:
            return None
        try:
            return candidates[self.policy.choose(info, [b.load for b in candidates])]
        except NoHealthyReplica:
            return min(candidates, key=lambda b: b.load.num_in_flight)

    async def forward(self, http: HTTPRequest, path: str, chat: bool) -> Response:
        cfg = self.config
        prepared = await prepare_request(await http.body(), chat, self.scorer, cfg.mode, cfg.xargs_key,
                                         cfg.priority_scale, cfg.bound_by_max_tokens, self.lengths)
        if isinstance(prepared, Response):
            return prepared
        payload, info, stream, length_score = prepared.payload, prepared.route, prepared.stream, prepared.length_score
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if "authorization" in http.headers:
            headers["authorization"] = http.headers["authorization"]
        failed: list[Backend] = []
        while True:
            backend = self.pick(info, failed)
            if backend is None:
                self.metrics.unrouted.inc()
                why = "; ".join(f"{b.name}: {b.last_error}" for b in failed)
                return openai_error(502, f"every backend tried failed ({why})", "upstream_error")
            request_id = uuid.uuid4().hex
            backend.load.on_send(request_id, info.prompt_tokens, info.predicted_output_tokens, info.max_tokens,
                                 self.clock())
            self.metrics.requests.labels(backend=backend.name).inc()
            exchange = self._exchange(backend, request_id, path, payload, headers, stream, length_score)
            try:
                return await _until_disconnect(http.receive, exchange)
            except UpstreamFailed as exc:
                self._failed(backend, request_id, str(exc), "connect")
                failed.append(backend)
                if len(failed) > cfg.max_retries:
                    return openai_error(502, f"gave up after {len(failed)} failed backends: {exc}", "upstream_error")
                self.metrics.retries.labels(backend=backend.name).inc()
            except ClientGone:
                backend.load.on_finish(request_id, self.clock())
                self.metrics.client_aborts.labels(backend=backend.name).inc()
                return Response(status_code=499)

    def _failed(self, backend: Backend, request_id: str, why: str, kind: str) -> None:
        backend.load.on_finish(request_id, self.clock())
        backend.mark_down(why)
        self.metrics.errors.labels(backend=backend.name, kind=kind).inc()

    def learn_length(self, score: float | None, output_tokens: int | None) -> None:
        learn_length(self.lengths, score, output_tokens)

    async def _exchange(self, backend: Backend, request_id: str, path: str, payload: bytes, headers: dict,
                        stream: bool, length_score: float | None = None) -> Response:
        """Send to one backend and answer the client: the whole response, or a relayed stream once
        its first event is in. Raises UpstreamFailed while nothing has been answered."""
        assert self.client is not None
        request = self.client.build_request("POST", backend.url + path, content=payload, headers=headers)
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from None
        relayed = False
        try:
            is_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if not (stream and upstream.status_code == 200 and is_stream):
                content = await upstream.aread()
                backend.load.on_finish(request_id, self.clock())
                if upstream.status_code == 200:
                    self.learn_length(length_score, completion_tokens(content))
                return Response(content, status_code=upstream.status_code,
                                media_type=upstream.headers.get("content-type"))
            events = EventReader(upstream.aiter_raw())
            first = await anext(events, None)
            if first is None:
                raise UpstreamFailed("the stream ended before its first event")
            relayed = True
            return _RelayedStream(self, backend, request_id, upstream, events, first, length_score)
        except httpx.TransportError as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}") from None
        finally:
            if not relayed:
                await _close(upstream)

    async def models(self) -> Response:
        """The first healthy backend's /v1/models, as it answers (the others' if none is healthy)."""
        assert self.client is not None
        for backend in sorted(self.backends, key=lambda b: not b.load.healthy):
            try:
                answer = await self.client.get(backend.url + "/v1/models")
            except httpx.TransportError as exc:
                backend.mark_down(f"{type(exc).__name__}: {exc}")
                continue
            return Response(answer.content, status_code=answer.status_code,
                            media_type=answer.headers.get("content-type"))
        return openai_error(502, "no backend answered", "upstream_error")


class _RelayedStream(StreamingResponse):
    """An upstream SSE stream relayed event by event. However it ends (done, client gone, backend
    failed) the upstream response is closed and the tracker told, exactly once."""

    def __init__(self, router: RoutingProxy, backend: Backend, request_id: str, upstream: httpx.Response,
                 events: EventReader, first: bytes, length_score: float | None = None) -> None:
        self.router, self.backend, self.request_id = router, backend, request_id
        self.upstream, self.events, self.first = upstream, events, first
        self.length_score = length_score
        self.num_tokens = 0
        self.ended = False  # the stream reached its end (normally or with an error event)
        super().__init__(self._relay(), media_type="text/event-stream",
                         headers={"cache-control": "no-cache"})

    def _observe(self, event: bytes) -> None:
        n = output_tokens(event)
        if n:
            self.num_tokens += n
            self.backend.load.on_tokens(self.request_id, n, self.router.clock())

    async def _relay(self):
        self._observe(self.first)
        yield self.first
        try:
            async for event in self.events:
                self._observe(event)
                yield event
        except httpx.TransportError as exc:
            why = f"{type(exc).__name__}: {exc}"
            self.router._failed(self.backend, self.request_id, why, "midstream")
            yield error_event(f"backend {self.backend.name} failed mid-stream ({why})")
            self.ended = True
            return
        self.ended = True
        self.router.learn_length(self.length_score, self.num_tokens)  # only a complete stream's length

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self.upstream)
            self.backend.load.on_finish(self.request_id, self.router.clock())
            if not self.ended:
                self.router.metrics.client_aborts.labels(backend=self.backend.name).inc()


def build_proxy_app(router: RoutingProxy) -> FastAPI:
    """The OpenAI-compatible front: /v1/completions, /v1/chat/completions, /v1/models, /health,
    /metrics."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="rankserve router", version="0.1.0", lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        return openai_error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                            "invalid_request_error")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Response:
        return await router.forward(http, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Response:
        return await router.forward(http, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        return await router.models()

    @app.get("/health")
    async def health() -> Response:
        if any(b.load.healthy for b in router.backends):
            return Response(status_code=200)
        return openai_error(503, "no healthy backend", "service_unavailable")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
