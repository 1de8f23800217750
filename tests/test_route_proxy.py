"""The router/gateway proxy (route/proxy.py) in front of fake OpenAI backends on loopback: streaming
and errors pass through unchanged, the score travels in the chosen field, a client that goes away
aborts the upstream request, every router policy decides, and metrics are exported."""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from fake_backend import build_fake_app
from helpers import serve_on_loopback, wait_until

from rankserve.predict.base import Predictor
from rankserve.route.load import ScoreLengths
from rankserve.route.body import mark_score, read_prompt, score_to_priority
from rankserve.route.proxy import RouterConfig, RoutingProxy, build_proxy_app, learn_length, prepare_request
from rankserve.route.scoring import PromptScorer, approximate_tokens
from rankserve.route.sse import EventReader, output_tokens


class TextLength(Predictor):
    """Score and length from the prompt's length: tests choose predictions by writing prompts."""

    name = "text-length"

    def score(self, requests):
        for r in requests:
            r.set_prediction(len(r.prompt_text) / 1000, float(len(r.prompt_text)))


class Broken(Predictor):
    name = "broken"

    def score(self, requests):
        raise RuntimeError("the predictor fell over")


@contextmanager
def fakes(n: int):
    """``n`` fake backends in threads: yields [(base URL without /v1, app)]."""
    with ExitStack() as stack:
        out = []
        for i in range(n):
            app = build_fake_app(f"fake{i}")
            out.append((stack.enter_context(serve_on_loopback(app)).removesuffix("/v1"), app))
        yield out


class ScoreOnly(Predictor):
    """A ranker's kind of answer: a score (0 for prompts starting with "a", else 1), no length."""

    name = "score-only"

    def score(self, requests):
        for r in requests:
            r.set_prediction(0.0 if r.prompt_text.startswith("a") else 1.0)


@contextmanager
def proxy_on(urls, predictor=None, lengths=None, **config):
    proxy = RoutingProxy(RouterConfig(urls, **config), PromptScorer(predictor, approximate_tokens), lengths=lengths)
    with serve_on_loopback(build_proxy_app(proxy)) as url:
        yield proxy, url


def _post(url: str, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout)


# ---- pieces ------------------------------------------------------------------------------------


def test_read_prompt_and_mark_score():
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi there"}]}]}
    p = read_prompt(True, chat)
    assert p.text == "hi there" and p.all_text == "be brief\nhi there" and p.num_tokens is None
    assert read_prompt(False, {"prompt": [1, 2, 3]}).num_tokens == 3
    with pytest.raises(ValueError):
        read_prompt(True, {"messages": []})
    with pytest.raises(ValueError):
        read_prompt(False, {"prompt": ""})
    body = {"prompt": "x", "vllm_xargs": {"other": 1}}
    assert mark_score(body, "xargs", -0.25)["vllm_xargs"] == {"other": 1, "rankserve_score": -0.25}
    assert mark_score(body, "xargs", 9.0, 120.0)["vllm_xargs"]["rankserve_predicted_len"] == 120.0
    assert mark_score(body, "priority", -0.6514)["priority"] == score_to_priority(-0.6514) == -651
    assert mark_score({**body, "priority": 7}, "priority", -0.6)["priority"] == 7  # the client's wins
    assert mark_score(body, "xargs", None) is body and mark_score(body, "none", 1.0) is body


async def _chunks(parts):
    for p in parts:
        yield p


def test_event_reader_never_splits_an_event_and_counts_tokens():
    stream = [b'data: {"choices": [{"text": "a"}]}\n', b'\ndata: {"choices": [{"delta": {"content": ""}}]}\r\n\r\n',
              b'data: {"choices": [], "usage": {}}\n\ndata: [DO', b"NE]\n\n"]

    async def read():
        return [e async for e in EventReader(_chunks(stream))]

    events = asyncio.run(read())
    assert len(events) == 4 and b"".join(events) == b"".join(stream)
    assert [output_tokens(e) for e in events] == [1, 0, 0, 0]


# ---- pass-through ------------------------------------------------------------------------------


def test_stream_passes_through_byte_for_byte_with_the_score_in_xargs():
    with fakes(1) as [(backend, app)], proxy_on([backend], TextLength(), mode="xargs") as (proxy, url):
        body = {"model": "fake0", "prompt": "say something", "max_tokens": 5, "stream": True, "fake_id": "s1",
                "extra_field": [1, 2]}
        with httpx.stream("POST", url + "/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            got = b"".join(r.iter_raw())
        assert got.decode() == "".join(app.state.log["sent"]["s1"])
        forwarded = app.state.log["received"][0]
        n = len("say something")
        assert forwarded["vllm_xargs"] == {"rankserve_score": n / 1000, "rankserve_predicted_len": n}
        assert forwarded["extra_field"] == [1, 2] and "priority" not in forwarded
        assert wait_until(lambda: proxy.backends[0].load.num_in_flight == 0)
        assert proxy.backends[0].load.num_finished == 1


def test_chat_without_stream_and_priority_mode():
    with fakes(1) as [(backend, app)], proxy_on([backend], TextLength(), mode="priority") as (_, url):
        body = {"messages": [{"role": "user", "content": "a question"}], "max_tokens": 3}
        direct = _post(backend + "/v1", "/chat/completions", body).json()
        answer = _post(url, "/chat/completions", body)
        assert answer.status_code == 200
        assert answer.json()["choices"] == direct["choices"] and answer.json()["usage"] == direct["usage"]
        assert app.state.log["received"][-1]["priority"] == score_to_priority(len("a question") / 1000)
        assert httpx.get(url + "/models").json()["data"][0]["id"] == "fake0"


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_pass_through_unchanged(stream):
    with fakes(1) as [(backend, _)], proxy_on([backend]) as (_, url):
        body = {"prompt": "x", "stream": stream, "fake_status": 429, "fake_error": "slow down, said the fake"}
        direct = _post(backend + "/v1", "/completions", body)
        through = _post(url, "/completions", body)
        assert (through.status_code, through.content) == (direct.status_code, direct.content) == (429, direct.content)
        assert through.json()["error"]["message"] == "slow down, said the fake"


def test_bad_requests_are_refused_without_forwarding():
    with fakes(1) as [(backend, app)], proxy_on([backend]) as (_, url):
        bad = httpx.post(url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
        missing = _post(url, "/chat/completions", {"model": "x"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
        assert httpx.get(url.removesuffix("/v1") + "/nowhere").json()["error"]["type"] == "not_found_error"
        assert app.state.log["received"] == []


def test_a_scoring_failure_forwards_the_request_without_a_score_and_counts_it():
    with fakes(1) as [(backend, app)], proxy_on([backend], Broken(), mode="xargs") as (proxy, url):
        assert _post(url, "/completions", {"prompt": "hello", "max_tokens": 2}).status_code == 200
        assert _post(url, "/completions", {"prompt": [5, 6, 7], "max_tokens": 2}).status_code == 200
        assert all("vllm_xargs" not in b for b in app.state.log["received"])
        text = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert 'rankserve:router_scoring_failures_total{reason="error"} 1.0' in text
        assert 'rankserve:router_scoring_failures_total{reason="no_text"} 1.0' in text


# ---- disconnects -------------------------------------------------------------------------------


def test_a_client_that_leaves_a_stream_aborts_it_upstream():
    with fakes(1) as [(backend, app)], proxy_on([backend]) as (proxy, url):
        body = {"prompt": "go on", "max_tokens": 1000, "stream": True, "fake_delay": 0.05, "fake_id": "long"}
        with httpx.stream("POST", url + "/completions", json=body, timeout=30) as r:
            first = next(r.iter_raw())
            assert b"tok0" in first
        assert wait_until(lambda: "long" in app.state.log["disconnected"], 5)
        assert "long" not in app.state.log["completed"]
        assert wait_until(lambda: proxy.backends[0].load.num_in_flight == 0)
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert f'rankserve:router_client_disconnects_total{{backend="{backend}"}} 1.0' in metrics


def test_a_client_that_leaves_before_the_answer_aborts_it_upstream():
    with fakes(1) as [(backend, app)], proxy_on([backend]) as (proxy, url):
        body = {"prompt": "wait", "max_tokens": 1000, "fake_delay": 0.02, "fake_id": "slow"}
        with pytest.raises(httpx.ReadTimeout):
            _post(url, "/completions", body, timeout=0.5)
        assert wait_until(lambda: "slow" in app.state.log["disconnected"], 5)
        assert wait_until(lambda: proxy.backends[0].load.num_in_flight == 0)


# ---- routing -----------------------------------------------------------------------------------


def _backend_of(apps, fake_id: str) -> int:
    return next(i for i, app in enumerate(apps) if any(b.get("fake_id") == fake_id for b in app.state.log["received"]))


@contextmanager
def _long_streams(url: str, bodies: list[dict]):
    """Hold streams open (first event read) while the test routes more requests."""
    with ExitStack() as stack:
        readers = []  # referenced: a dropped iterator closes its stream
        for body in bodies:
            r = stack.enter_context(httpx.stream("POST", url + "/completions", json={**body, "stream": True},
                                                 timeout=30))
            readers.append(r.iter_raw())
            next(readers[-1])
        yield


def test_sal_balances_predicted_work_where_least_requests_counts_requests():
    long_prompt, short = "x" * 400, "y"
    first = [{"prompt": long_prompt, "max_tokens": 400, "fake_delay": 0.05, "fake_id": "long"},
             {"prompt": short, "max_tokens": 400, "fake_delay": 0.05, "fake_id": "short"}]
    chosen = {}
    for router in ("sal", "least-requests"):
        with fakes(2) as pairs, proxy_on([u for u, _ in pairs], TextLength(), router=router) as (_, url):
            apps = [a for _, a in pairs]
            with _long_streams(url, first):
                _post(url, "/completions", {"prompt": short, "max_tokens": 2, "fake_id": "third"})
                chosen[router] = [_backend_of(apps, f) for f in ("long", "short", "third")]
    # the long request went to one backend, the short one to the other; then sal sends the third to the
    # backend with less predicted work, least-requests to the next in turn among equals
    assert chosen["sal"] == [0, 1, 1]
    assert chosen["least-requests"] == [0, 1, 0]


@pytest.mark.parametrize("a_len, b_len", [(300, 2), (2, 300)])
def test_sal_with_a_score_only_predictor_follows_the_lengths_learned_per_score(a_len, b_len):
    a, b = "a" * 40, "b" * 40  # same prompt tokens: only the scores differ
    lengths = ScoreLengths(bins=2, refit_every=1, min_samples=4)
    with fakes(2) as pairs, proxy_on([u for u, _ in pairs], ScoreOnly(), lengths, router="sal",
                                     bound_by_max_tokens=False) as (proxy, url):
        apps = [x for _, x in pairs]
        for prompt, n in ((a, a_len), (b, b_len)):  # finished requests teach score -> length
            _post(url, "/completions", {"prompt": prompt, "max_tokens": n})
            _post(url, "/completions", {"prompt": prompt, "max_tokens": n, "stream": True})
        assert wait_until(lambda: (lengths.predict(0.0), lengths.predict(1.0)) == (a_len, b_len))
        held = [{"prompt": p, "max_tokens": 1000, "fake_delay": 0.05, "fake_id": f} for p, f in ((a, "A"), (b, "B"))]
        with _long_streams(url, held):
            assert proxy.backends[_backend_of(apps, "A")].load.outstanding_work > 0
            _post(url, "/completions", {"prompt": b, "max_tokens": 1, "fake_id": "probe"})
            where = {f: _backend_of(apps, f) for f in ("A", "B", "probe")}
    assert where["A"] != where["B"]
    # the probe joins the held request whose score has learned the shorter length
    assert where["probe"] == (where["B"] if b_len < a_len else where["A"])


def test_prepare_request_gives_a_score_the_length_learned_for_it():
    # the one rule shared by rankserve route and Ray Serve's ingress (server/ray_serve.py)
    lengths = ScoreLengths(bins=2, refit_every=1, min_samples=4)
    scorer = PromptScorer(ScoreOnly(), approximate_tokens)
    body = json.dumps({"prompt": "a short one", "max_tokens": 999}).encode()

    def prepare(with_lengths):
        return asyncio.run(prepare_request(body, False, scorer, "none", lengths=lengths if with_lengths else None))

    try:
        before = prepare(True)
        assert before.route.predicted_output_tokens is None and before.length_score == 0.0  # nothing learned yet
        for _ in range(4):
            learn_length(lengths, before.length_score, 12)
            learn_length(lengths, 1.0, 300)
        learn_length(lengths, None, 5000)  # no score: teaches nothing
        after = prepare(True)
        assert after.route.predicted_output_tokens == 12 and after.route.max_tokens == 999
        assert prepare(False).route.predicted_output_tokens is None and prepare(False).length_score is None
    finally:
        scorer.close()


def test_pow2_and_least_requests_avoid_the_busy_backend():
    for router in ("pow2", "least-requests"):
        with fakes(2) as pairs, proxy_on([u for u, _ in pairs], router=router) as (_, url):
            apps = [a for _, a in pairs]
            busy = {"prompt": "a", "max_tokens": 400, "fake_delay": 0.05, "fake_id": "busy"}
            with _long_streams(url, [busy]):
                for i in range(4):
                    _post(url, "/completions", {"prompt": "b", "max_tokens": 1, "fake_id": f"q{i}"})
                where = [_backend_of(apps, f"q{i}") for i in range(4)]
            assert set(where) == {1 - _backend_of(apps, "busy")}, router


def test_round_robin_alternates_and_random_uses_only_healthy_backends():
    with fakes(2) as pairs, proxy_on([u for u, _ in pairs], router="round-robin") as (_, url):
        apps = [a for _, a in pairs]
        for i in range(4):
            _post(url, "/completions", {"prompt": "r", "max_tokens": 1, "fake_id": f"r{i}"})
        assert [_backend_of(apps, f"r{i}") for i in range(4)] == [0, 1, 0, 1]
    with fakes(3) as pairs, proxy_on([u for u, _ in pairs], router="random", health_interval_s=0.05) as (proxy, url):
        apps = [a for _, a in pairs]
        httpx.post(pairs[2][0] + "/fake/health", json={"status": 503})
        assert wait_until(lambda: not proxy.backends[2].load.healthy)
        for i in range(16):
            _post(url, "/completions", {"prompt": "r", "max_tokens": 1, "fake_id": f"x{i}"})
        assert {_backend_of(apps, f"x{i}") for i in range(16)} == {0, 1}
        httpx.post(pairs[2][0] + "/fake/health", json={"status": 200})
        assert wait_until(lambda: proxy.backends[2].load.healthy)


def test_least_kv_reads_the_backends_reported_kv_cache():
    with fakes(2) as pairs, proxy_on([u for u, _ in pairs], router="least-kv", health_interval_s=0.05) as (proxy, url):
        apps = [a for _, a in pairs]
        httpx.post(pairs[0][0] + "/fake/kv", json={"usage": 0.9})
        httpx.post(pairs[1][0] + "/fake/kv", json={"usage": 0.2})
        assert wait_until(lambda: proxy.backends[0].load.kv_usage == pytest.approx(0.9))
        assert proxy.backends[0].load.kv_capacity_tokens == 100 * 16
        for i in range(3):
            _post(url, "/completions", {"prompt": "k", "max_tokens": 1, "fake_id": f"k{i}"})
        assert [_backend_of(apps, f"k{i}") for i in range(3)] == [1, 1, 1]


def test_metrics_name_every_backend_and_unhealthy_backends_are_a_last_resort():
    with fakes(2) as pairs, proxy_on([u for u, _ in pairs], health_interval_s=0.05) as (proxy, url):
        root = url.removesuffix("/v1")
        _post(url, "/completions", {"prompt": "m", "max_tokens": 3, "stream": True})
        text = httpx.get(root + "/metrics").text
        for u, _ in pairs:
            for name in ("router_requests_total", "router_in_flight", "router_predicted_work_tokens",
                         "router_backend_healthy", "router_retries_total", "router_kv_held_tokens"):
                assert f'rankserve:{name}{{backend="{u}"}}' in text, name
        assert f'rankserve:router_requests_total{{backend="{pairs[0][0]}"}} 1.0' in text
        for u, _ in pairs:
            httpx.post(u + "/fake/health", json={"status": 503})
        assert wait_until(lambda: not any(b.load.healthy for b in proxy.backends))
        assert httpx.get(root + "/health").status_code == 503
        # marked down but still answering: the request is served rather than refused
        answer = _post(url, "/completions", {"prompt": "m", "max_tokens": 2})
        assert answer.status_code == 200 and "tok1" in answer.json()["choices"][0]["text"]
        assert httpx.get(url + "/models").status_code == 200
        assert "rankserve:router_unrouted_requests_total 0.0" in httpx.get(root + "/metrics").text


def test_slow_health_checks_take_a_backend_out_only_when_they_persist():
    async def scenario():
        from rankserve.route.backends import SLOW_CHECKS_TO_DOWN, Backend
        from rankserve.route.load import ReplicaLoad

        def slow(request):
            raise httpx.ReadTimeout("slow", request=request)

        backend = Backend("http://127.0.0.1:9", ReplicaLoad())
        backend.load.healthy = True
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as client:
            for _ in range(SLOW_CHECKS_TO_DOWN - 1):
                assert await backend.check(client, 0.1, None)
            assert not await backend.check(client, 0.1, None)
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200))) as client:
            assert await backend.check(client, 0.1, None) and backend.slow_checks == 0

    asyncio.run(scenario())


def test_the_predicted_work_shows_in_the_tracker_and_falls_as_tokens_stream():
    with fakes(1) as [(backend, _)], proxy_on([backend], TextLength(), router="sal") as (proxy, url):
        load = proxy.backends[0].load
        body = {"prompt": "z" * 200, "max_tokens": 1000, "fake_delay": 0.02, "stream": True}
        with httpx.stream("POST", url + "/completions", json=body, timeout=30) as r:
            lines = r.iter_raw()
            next(lines)
            early = load.outstanding_work
            assert 0 < early <= 200  # predicted 200 tokens, prefill done once a token came back
            for _ in range(10):
                next(lines)
            assert load.outstanding_work < early
        assert wait_until(lambda: load.num_in_flight == 0 and load.outstanding_work == 0)


def test_json_bodies_round_trip_through_the_router():
    with fakes(1) as [(backend, app)], proxy_on([backend]) as (_, url):
        body = {"prompt": "ünïcödé ✓", "max_tokens": 1, "stop": ["\n"], "logit_bias": {"5": 1.5}}
        _post(url, "/completions", body)
        assert app.state.log["received"][0] == json.loads(json.dumps(body))
