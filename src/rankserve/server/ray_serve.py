"""K rankserve engine replicas as a Ray Serve application behind one OpenAI-compatible API
(needs ``rankserve[ray]``):

    serve run rankserve.server.ray_serve:app_builder replicas=2 router=sal policy=ltr max_num_seqs=16

- ``OpenAIIngress`` (one replica, FastAPI): parses each request and scores its prompt once
  (``route.proxy.prepare_request``, the same code as ``rankserve route``), then calls the engine
  deployment with the routing facts attached;
- ``EngineReplica`` (``replicas`` of them): rankserve's engine and its own app, called in-process
  and streamed back chunk by chunk; each reports its requests' progress and KV cache as Serve
  routing stats;
- Serve picks the replica with ``route.ray_router.PolicyRequestRouter``: the same router policies
  (``sal`` by default) over the same load trackers as ``rankserve route``.

A client that disconnects cancels the ingress's call; the cancel reaches the replica, whose app
sees the disconnect and aborts the request in the engine.
"""

# No ``from __future__ import annotations``: Serve's class-based FastAPI ingress needs real
# annotations to see that ``http`` is the request.
import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import fields

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig

import rankserve.learn  # noqa: F401 - registers the learned predictors by name
from rankserve.engine.build import EngineSettings, load_engine
from rankserve.predict import make_predictor
from rankserve.route.body import SCORE_MODES
from rankserve.route.load import ScoreLengths
from rankserve.route.policies import ROUTER_NAMES
from rankserve.route.proxy import learn_length, prepare_request
from rankserve.route.ray_router import PolicyRequestRouter, route_fields
from rankserve.route.scoring import PromptScorer, choose_predictor
from rankserve.route.sse import completion_tokens, output_tokens
from rankserve.server.serve import rank_by_work

MAX_ONGOING = 1024  # Serve's default (5) would queue at the handle what the engine should schedule


async def asgi_call(app, path: str, body: bytes, method: str = "POST") -> AsyncIterator[dict]:
    """Run one request through an ASGI app in-process; yields the messages it sends as they come.
    Closing the iterator early tells the app its client disconnected."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.create_task(app(scope, receive, sent.put))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body"):
                break
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
    finally:
        gone.set()
        await asyncio.wait({task}, timeout=10)
        task.cancel()


class EngineReplica:
    """One rankserve engine behind rankserve's own app (``server/app.py``)."""

    def __init__(self, settings: EngineSettings, served_model_name: str | None = None) -> None:
        from rankserve.server.app import ServerConfig, build_app

        self.loaded = load_engine(rank_by_work(settings))
        name = served_model_name or self.loaded.model_name
        config = ServerConfig(name, self.loaded.max_model_len, vocab_size=self.loaded.vocab_size)
        self.app = build_app(config, self.loaded.tokenizer, self.loaded.engine, self.loaded.kernels)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.generated: dict[str, int] = {}  # route id -> output tokens streamed so far

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """``request``: path, payload (the JSON body) and route (its routing facts). Yields the
        response's head (status, content type, replica) then its body chunks."""
        route_id = str((request.get("route") or {}).get("id", ""))
        self.generated[route_id] = 0
        try:
            async for message in asgi_call(self.app, request["path"], request["payload"]):
                if message["type"] == "http.response.start":
                    headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
                    yield {"status": message["status"], "content_type": headers.get("content-type"),
                           "replica": self.replica}
                elif message.get("body"):
                    self.generated[route_id] += output_tokens(message["body"])
                    yield {"body": message["body"]}
        finally:
            self.generated.pop(route_id, None)

    async def models(self) -> dict:
        chunks = [m.get("body", b"") async for m in asgi_call(self.app, "/v1/models", b"", method="GET")]
        return json.loads(b"".join(chunks))

    def record_routing_stats(self) -> dict:
        blocks = self.loaded.engine.loop.core.scheduler.blocks
        capacity = blocks.device.num_blocks * blocks.block_size
        return {"generated": dict(self.generated), "kv_used_tokens": blocks.device_usage * capacity,
                "kv_capacity_tokens": capacity}

    def __del__(self) -> None:
        loaded = getattr(self, "loaded", None)
        if loaded is not None:
            loaded.engine.shutdown()


api = FastAPI(title="rankserve on Ray Serve")


@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, engine, predictor: str | None, mode: str = "none", tokenizer: str = "smollm2-135m-instruct") -> None:
        from rankserve.server.prompt_tokens import token_counter

        self.engine = engine
        self.mode = mode
        self.scorer = PromptScorer(make_predictor(predictor) if predictor else None, token_counter(tokenizer))
        # A ranker's scores become lengths as in ``rankserve route`` (this process also runs Serve's
        # router for the engine handle, which reads them from each request's route fields).
        self.lengths = ScoreLengths()

    async def _forward(self, http: HTTPRequest, path: str, chat: bool) -> Response:
        prepared = await prepare_request(await http.body(), chat, self.scorer, self.mode, lengths=self.lengths)
        if isinstance(prepared, Response):
            return prepared
        request = {"path": path, "payload": prepared.payload, "route": route_fields(uuid.uuid4().hex, prepared.route)}
        chunks = self.engine.options(stream=True).generate.remote(request)
        head = await anext(chunks)
        headers = {"x-rankserve-replica": head["replica"]}
        if not (prepared.stream and head["status"] == 200):
            body = b"".join([c["body"] async for c in chunks])
            if head["status"] == 200:
                learn_length(self.lengths, prepared.length_score, completion_tokens(body))
            return Response(body, status_code=head["status"], media_type=head["content_type"], headers=headers)

        async def relay() -> AsyncIterator[bytes]:
            tokens = 0
            try:
                async for chunk in chunks:
                    tokens += output_tokens(chunk["body"])
                    yield chunk["body"]
                learn_length(self.lengths, prepared.length_score, tokens)  # only a complete stream's length
            finally:
                chunks.cancel()  # the client left: the replica's app sees the disconnect

        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)

    @api.post("/v1/completions")
    async def completions(self, http: HTTPRequest) -> Response:
        return await self._forward(http, "/v1/completions", chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, http: HTTPRequest) -> Response:
        return await self._forward(http, "/v1/chat/completions", chat=True)

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(await self.engine.models.remote())

    @api.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)


def build_serve_app(replicas: int = 2, router: str = "sal", predictor: str = "auto", mode: str = "none",
                    settings: EngineSettings | None = None, num_cpus: float = 1.0, stats_period_s: float = 0.2,
                    tokenizer: str = "smollm2-135m-instruct"):
    """The Serve application: the ingress bound to ``replicas`` engine replicas routed by ``router``."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if router not in ROUTER_NAMES:
        raise ValueError(f"unknown router {router!r} (choose from {', '.join(ROUTER_NAMES)})")
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(SCORE_MODES)})")
    routing = RequestRouterConfig(request_router_class=PolicyRequestRouter, request_router_kwargs={"policy": router},
                                  request_routing_stats_period_s=stats_period_s)
    engine = serve.deployment(EngineReplica).options(
        num_replicas=replicas, max_ongoing_requests=MAX_ONGOING, request_router_config=routing,
        ray_actor_options={"num_cpus": num_cpus})
    ingress = serve.deployment(OpenAIIngress).options(max_ongoing_requests=MAX_ONGOING,
                                                      ray_actor_options={"num_cpus": 0})
    settings = settings or EngineSettings()  # rankserve serve's defaults
    return ingress.bind(engine.bind(settings), choose_predictor(predictor, router, mode), mode, tokenizer)


def app_builder(args: dict[str, str]):
    """``serve run rankserve.server.ray_serve:app_builder KEY=VALUE ...``: replicas, router, predictor,
    mode, num_cpus, tokenizer, and any EngineSettings field (policy, predictor is ``engine_predictor``,
    max_num_seqs, kv_cache_gb, ...)."""
    args = dict(args)
    top = {"replicas": int, "router": str, "predictor": str, "mode": str, "num_cpus": float, "tokenizer": str}
    kwargs = {key: convert(args.pop(key)) for key, convert in top.items() if key in args}
    if "engine_predictor" in args:
        args["predictor"] = args.pop("engine_predictor")
    types = {f.name: f.type for f in fields(EngineSettings)}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} (see rankserve.server.ray_serve.app_builder)")
    casts = {"int": int, "float": float, "str": str, "str | None": str}
    settings = EngineSettings(**{k: casts.get(str(types[k]), str)(v) for k, v in args.items()})
    return build_serve_app(settings=settings, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """``python -m rankserve.server.ray_serve --port P KEY=VALUE ...``: start a local Ray (or join
    ``--address``), serve the application on 127.0.0.1:P (``--host`` to change) until interrupted."""
    import argparse
    import signal
    import sys

    import ray

    ap = argparse.ArgumentParser(prog="python -m rankserve.server.ray_serve", description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--address", default=None, help="a running Ray cluster (ray start --head ...); default: local")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    ap.add_argument("args", nargs="*", metavar="KEY=VALUE", help="app_builder's arguments, e.g. replicas=2 router=sal")
    ns = ap.parse_args(argv)
    pairs = [a.split("=", 1) for a in ns.args]
    if any(len(p) != 2 for p in pairs):
        ap.error("arguments are KEY=VALUE")
    try:
        app = app_builder(dict(pairs))
    except ValueError as exc:
        ap.error(str(exc))
    # SIGTERM ends like Ctrl-C: through the finally below, so the local Ray goes with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(address=ns.address, num_cpus=ns.num_cpus, include_dashboard=False)
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(app, blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    # Run from the importable module, not __main__: Ray pickles __main__'s classes by value, and
    # the replicas' processes would then never import this module (nor rankserve.learn, which
    # registers the learned predictors: "unknown predictor 'classifier'").
    from rankserve.server.ray_serve import main as module_main

    module_main()
