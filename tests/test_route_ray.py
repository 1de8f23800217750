"""rankserve on Ray Serve (server/ray_serve.py, route/ray_router.py) on a local Ray instance: two
small engine replicas behind the OpenAI API, routed by sal from the replicas' routing stats.
Skipped where ray[serve] is not installed (``pip install "rankserve[ray]"``)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import wait_until
from test_route_failover import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("torch")

from rankserve.engine.build import EngineSettings  # noqa: E402
from rankserve.route.load import ScoreLengths  # noqa: E402
from rankserve.route.scoring import PromptScorer, approximate_tokens  # noqa: E402
from rankserve.server.ray_serve import OpenAIIngress, build_serve_app  # noqa: E402
from test_route_proxy import ScoreOnly  # noqa: E402

MODEL = "smollm2-135m-instruct"


def _needs_the_model() -> None:
    from rankserve.model.loader import ModelNotFoundError, load_model_dir

    try:
        load_model_dir(None)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def url():
    _needs_the_model()
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = EngineSettings(policy="fcfs", kv_cache_gb=0.1, swap_space_gb=0.1, max_num_seqs=4)
        serve.run(build_serve_app(replicas=2, router="sal", predictor="none", settings=settings, num_cpus=1,
                                  tokenizer="approx"), blocking=False)
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _up(base), 180), "the Serve application did not come up"
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/v1/models", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# First in the file: it starts its own local Ray, which must not meet the `url` fixture's.
def test_the_module_command_deploys_with_a_learned_predictor(tmp_path):
    """The README's ``python -m rankserve.server.ray_serve``: the replicas must import rankserve's
    learned predictors (they did not while the app was built in __main__)."""
    import sys

    from rankserve.integrations.vllm_server import running_server

    _needs_the_model()
    port = free_port()
    cmd = [sys.executable, "-m", "rankserve.server.ray_serve", "--port", str(port), "--num-cpus", "2",
           "replicas=1", "predictor=classifier", "tokenizer=approx", "policy=fcfs", "max_num_seqs=2",
           "kv_cache_gb=0.1", "swap_space_gb=0.1"]
    with running_server(cmd, port, tmp_path / "ray.log", timeout_s=240) as base:
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3


def test_completions_stream_and_errors_through_serve(url):
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == MODEL
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    full = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    assert full["usage"]["completion_tokens"] == 6
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) == full["choices"][0]["text"]
    bad = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 10**6}, timeout=120)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "context_length_exceeded"


def test_sal_spreads_concurrent_long_requests_over_both_replicas(url):
    def ask(i: int) -> str:
        time.sleep(0.2 * i)
        body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 40, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=300)
        assert answer.status_code == 200
        return answer.headers["x-rankserve-replica"]

    with ThreadPoolExecutor(4) as pool:
        replicas = list(pool.map(ask, range(4)))
    assert len(set(replicas)) == 2 and replicas.count(replicas[0]) == 2  # two long requests on each


def test_a_client_leaving_a_stream_frees_the_replica(url):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        replica = r.headers["x-rankserve-replica"]
        next(r.iter_lines())

    def idle() -> bool:  # the replica's routing stats no longer list the request
        handle = serve.get_deployment_handle("EngineReplica", app_name="default")
        stats = [handle.record_routing_stats.remote().result() for _ in range(6)]
        return all(not s["generated"] for s in stats)

    assert replica and wait_until(idle, 30)


class _FakeStream:
    """What ``handle.options(stream=True).generate.remote(...)`` returns: an async iterator of chunks."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self):
        pass


class _FakeEngine:
    """An engine deployment handle that answers every request with ``tokens`` tokens (streamed or
    whole) and keeps the route fields each request carried."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.routes = []

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request):
        self.routes.append(request["route"])
        n = self.tokens(json.loads(request["payload"])["prompt"])
        if json.loads(request["payload"]).get("stream"):
            head = {"status": 200, "content_type": "text/event-stream", "replica": "r0"}
            events = [{"body": b'data: {"choices": [{"text": "x"}]}\n\n'} for _ in range(n)]
            return _FakeStream([head, *events, {"body": b"data: [DONE]\n\n"}])
        head = {"status": 200, "content_type": "application/json", "replica": "r0"}
        return _FakeStream([head, {"body": json.dumps({"usage": {"completion_tokens": n}}).encode()}])


class _Body:
    def __init__(self, body):
        self._body = json.dumps(body).encode()

    async def body(self):
        return self._body


def test_the_ingress_gives_serve_s_router_the_lengths_learned_per_score():
    # the ingress class itself (Serve's ingress wrapper subclasses it); no Ray instance needed
    plain = next(c for c in OpenAIIngress.__mro__[1:] if c.__name__ == "OpenAIIngress")
    engine = _FakeEngine(lambda prompt: 7 if prompt.startswith("a") else 40)
    ingress = plain(engine, None, tokenizer="approx")
    ingress.scorer.close()
    ingress.scorer = PromptScorer(ScoreOnly(), approximate_tokens)  # a ranker's kind of answer
    ingress.lengths = ScoreLengths(bins=2, refit_every=1, min_samples=4)

    async def ask(prompt, stream):
        response = await ingress._forward(_Body({"prompt": prompt, "stream": stream}), "/v1/completions", False)
        if stream:
            assert b"".join([c async for c in response.body_iterator]).endswith(b"[DONE]\n\n")

    async def scenario():
        for _ in range(2):  # whole answers and complete streams both teach
            await ask("a question", False)
            await ask("a question", True)
            await ask("b question", False)
            await ask("b question", True)
        await ask("a question", False)
        await ask("b question", False)

    try:
        asyncio.run(scenario())
    finally:
        ingress.scorer.close()
    assert engine.routes[0]["predicted_output_tokens"] is None  # nothing learned yet
    assert [r["predicted_output_tokens"] for r in engine.routes[-2:]] == [7, 40]
