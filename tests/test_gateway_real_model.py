"""``rankserve gateway`` in front of a real ``rankserve serve`` (embedded SmolLM2, scheduling by the
client's priority), with the shipped ranker scoring prompts at the gateway: the gateway's priorities
decide the engine's order, answers are the server's, and a client that leaves frees the engine."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import serve_on_loopback, wait_until

openai = pytest.importorskip("openai")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import rankserve.learn  # noqa: E402, F401 - registers the ranker by name
from rankserve.route.proxy import RouterConfig, RoutingProxy, build_proxy_app  # noqa: E402
from rankserve.route.scoring import PromptScorer  # noqa: E402

SHORT, LONG = "hi", "Explain quantum computing in detail with examples and code."


@pytest.fixture(scope="module")
def stack():
    from rankserve.engine.build import EngineSettings, load_engine
    from rankserve.model.loader import ModelNotFoundError
    from rankserve.predict import make_predictor
    from rankserve.server.app import ServerConfig, build_app

    try:
        loaded = load_engine(EngineSettings(dtype="float32", kv_cache_gb=0.25, swap_space_gb=0.25, max_num_seqs=1,
                                            policy="priority"))
        ranker = make_predictor("ranker")
    except (ModelNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    server = build_app(ServerConfig(loaded.model_name, loaded.max_model_len), loaded.tokenizer, loaded.engine)

    def count(texts):
        return [len(loaded.tokenizer.encode(t)) for t in texts]

    try:
        with serve_on_loopback(server) as backend:
            proxy = RoutingProxy(RouterConfig([backend], mode="priority"), PromptScorer(ranker, count))
            with serve_on_loopback(build_proxy_app(proxy)) as url:
                yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120), backend, loaded, ranker
    finally:
        loaded.engine.shutdown()


def _ranker_priority(ranker, text: str) -> int:
    from rankserve.core.request import Request
    from rankserve.route.body import score_to_priority

    req = Request([0], prompt_text=text)
    ranker.score([req])
    return score_to_priority(req.score)


def test_answers_through_the_gateway_are_the_servers(stack):
    client, backend, loaded, _ = stack
    direct = openai.OpenAI(base_url=backend, api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    args = dict(model=loaded.model_name, messages=messages, max_tokens=20, temperature=0)
    want = direct.chat.completions.create(**args).choices[0].message.content
    assert client.chat.completions.create(**args).choices[0].message.content == want
    streamed = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in streamed:
        parts.extend(c.delta.content or "" for c in chunk.choices)
        usage = chunk.usage or usage
    assert "".join(parts) == want and usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=loaded.model_name, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_the_gateways_priorities_order_the_engine(stack):
    client, _, loaded, ranker = stack
    assert _ranker_priority(ranker, SHORT) < _ranker_priority(ranker, LONG)  # the ranker calls SHORT shorter
    done: dict[str, float] = {}

    def ask(prompt: str, n: int) -> None:
        client.completions.create(model=loaded.model_name, prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"ignore_eos": True})
        done[prompt] = time.monotonic()

    scheduler = loaded.engine.loop.core.scheduler
    with ThreadPoolExecutor(3) as pool:
        pool.submit(ask, "Count to one hundred.", 40)  # holds the one sequence slot
        assert wait_until(lambda: scheduler.running, 30)
        pool.submit(ask, LONG, 8)  # arrives first ...
        assert wait_until(lambda: scheduler.num_queued == 1, 30)
        pool.submit(ask, SHORT, 8)  # ... but the ranker scores it shorter
        assert wait_until(lambda: scheduler.num_queued == 2, 30)
    assert done[SHORT] < done[LONG]


def test_a_client_leaving_through_the_gateway_frees_the_engine(stack):
    client, _, loaded, _ = stack
    scheduler = loaded.engine.loop.core.scheduler
    stream = client.completions.create(model=loaded.model_name, prompt="Tell me a long story.", max_tokens=400,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert wait_until(lambda: not scheduler.has_work, 10)
    scheduler.blocks.check_invariants(scheduler.live_requests())
    assert scheduler.blocks.num_free_device_blocks == scheduler.blocks.device.num_blocks
    metrics = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics").text
    assert "rankserve:router_prompts_scored_total" in metrics
