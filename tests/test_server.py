"""The HTTP server on a fake executor and a character tokenizer: protocol, streaming, errors."""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import serve_on_loopback, wait_until
from test_engine_loop import make_engine

from rankserve.core import FinishReason, RequestStatus
from rankserve.server.app import ServerConfig, build_app


class CharTokenizer:
    """Token i <-> letter 'a' + i % 26; the counting executor samples 1, 2, 3, ... -> "bcd..."."""

    eos_token_id = 49

    def encode(self, text: str) -> list[int]:
        return [(ord(c) - ord("a")) % 26 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def apply_chat_template(self, messages) -> list[int]:
        return self.encode("".join(m["role"] + m["content"] for m in messages))


@pytest.fixture
def served():
    engine, executor, pool = make_engine(blocks=256)
    app = build_app(ServerConfig("tiny", max_model_len=200, vocab_size=50), CharTokenizer(), engine)
    with TestClient(app) as client:
        yield client, engine, pool
    engine.shutdown()


def sse(response) -> list:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion(served):
    client, _, pool = served
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "bcdef" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert pool.num_free_device_blocks == 256


def test_streamed_completion_matches_and_reports_usage(served):
    client, _, _ = served
    with client.stream("POST", "/v1/completions", json={
        "prompt": "hi", "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "bcdefghijklm"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_chat_completion_streaming_and_not(served):
    client, _, _ = served
    msgs = [{"role": "user", "content": "hey"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "bcd"}
    with client.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "stream": True}) as r:
        chunks = sse(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "bcd"


def engine_requests(engine) -> list:
    """Record the core Request of every request the app hands to ``engine``."""
    seen = []
    generate = engine.generate

    def recording(req, **kwargs):
        seen.append(req)
        return generate(req, **kwargs)

    engine.generate = recording
    return seen


def test_stop_string_cuts_the_text_and_ends_the_request_as_stopped():
    """The engine's request ends finished with reason stop a few tokens after the stop string
    (10 ms a step: 100 tokens would take a second), not aborted and not at max_tokens."""
    engine, _, pool = make_engine(delay_s=0.01, blocks=256)
    seen = engine_requests(engine)
    app = build_app(ServerConfig("tiny", max_model_len=200, vocab_size=50), CharTokenizer(), engine)
    try:
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 100, "stop": ["fg"]})
        choice = r.json()["choices"][0]
        assert choice["text"] == "bcde" and choice["finish_reason"] == "stop"
        assert r.json()["usage"]["completion_tokens"] == 6  # "bcdefg": the tokens up to the stop string
        (req,) = seen
        assert wait_until(lambda: req.status.is_done)
        assert req.status is RequestStatus.FINISHED and req.finish_reason is FinishReason.STOP
        assert req.num_output_tokens < 50
        assert wait_until(lambda: pool.num_free_device_blocks == 256)
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 500}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404, "model"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        # Everything the engine could choke on is refused before admission (the vocabulary is 50).
        ("/v1/completions", {"prompt": [1, 50]}, 400, "prompt"),
        ("/v1/completions", {"prompt": [-1, 2]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "a", "seed": 2**64}, 400, "seed"),
        ("/v1/completions", {"prompt": "a", "seed": -(2**63) - 1}, 400, "seed"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"50": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"3": 101}}, 400, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "stop_token_ids": [50]}, 400, "stop_token_ids"),
        ("/v1/completions", {"prompt": "a", "stop_token_ids": [-5]}, 400, "stop_token_ids"),
        ("/v1/completions", {"prompt": "a", "top_k": -2}, 400, "top_k"),
        ("/v1/completions", {"prompt": "a", "priority": 2**70}, 400, "priority"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [99]},
         400, "stop_token_ids"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"77": -1}},
         400, "logit_bias"),
    ],
)
def test_bad_requests_get_openai_errors(served, path, body, status, param):
    client, _, pool = served
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert pool.num_free_device_blocks == 256


def test_ignore_eos_ignores_only_eos(served):
    client, _, _ = served
    body = {"prompt": "a", "max_tokens": 60, "ignore_eos": True}
    r = client.post("/v1/completions", json={**body, "stop_token_ids": [3]})
    assert r.json()["choices"][0] == {"index": 0, "text": "bcd", "logprobs": None, "finish_reason": "stop"}
    r = client.post("/v1/completions", json=body)  # runs past EOS (token 49)
    assert r.json()["usage"]["completion_tokens"] == 60 and r.json()["choices"][0]["finish_reason"] == "length"


def test_edge_values_the_engine_takes_are_accepted(served):
    client, _, pool = served
    for extra in ({"seed": -(2**63)}, {"seed": 2**63 - 1}, {"prompt": [0, 49]}, {"logit_bias": {"3": -100}},
                  {"top_k": -1}, {"stop_token_ids": [0, 49], "ignore_eos": True}):
        r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, **extra})
        assert r.status_code == 200, (extra, r.text)
    assert pool.num_free_device_blocks == 256


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "a", "temperature": NaN}', "temperature"),
    (b'{"prompt": "a", "repetition_penalty": Infinity}', "repetition_penalty"),
    (b'{"prompt": "a\\ud800"}', "prompt"),
    (b'{"prompt": "a", "stop": ["\\udfff"]}', "stop"),
])
def test_non_finite_numbers_and_broken_unicode_are_refused(served, raw, param):
    client, _, _ = served
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_route_and_bad_json(served):
    client, _, _ = served
    r = client.get("/v2/everything")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_api_key_loading_and_full_queue():
    engine, _, _ = make_engine()
    try:
        app = build_app(ServerConfig("tiny", 200, api_key="s3cret", max_queued=0), CharTokenizer(), None)
        with TestClient(app) as client:
            assert client.get("/health").status_code == 503
            assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 503
            app.state.engine = engine
            assert client.get("/health").status_code == 200
            assert client.get("/v1/models").status_code == 401
            r = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            assert r.json()["data"][0]["id"] == "tiny"
            r = client.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
    finally:
        engine.shutdown()


def test_a_burst_of_good_and_bad_requests_leaves_no_blocks_behind():
    """30 requests sent at once (a third invalid) to an engine that runs 4 at a time: each good
    one gets its whole answer, each bad one a 400, and the pool ends as it began."""
    engine, executor, pool = make_engine(delay_s=0.002, blocks=256)
    app = build_app(ServerConfig("tiny", max_model_len=200, vocab_size=50), CharTokenizer(), engine)
    sched = engine.loop.core.scheduler
    batch_sizes = []
    execute = executor.execute
    executor.execute = lambda out: batch_sizes.append(len(out.requests)) or execute(out)

    def send(i: int) -> httpx.Response:
        body = {"prompt": "abc" * (i % 4 + 1), "max_tokens": 5 + i, "ignore_eos": True}
        if i % 3 == 0:
            body["temperature"] = 7  # invalid
        start.wait()
        return httpx.post(f"{url}/completions", json=body, timeout=10)

    try:
        with serve_on_loopback(app) as url, ThreadPoolExecutor(30) as pool_of_clients:
            start = threading.Event()
            futures = [pool_of_clients.submit(send, i) for i in range(30)]
            start.set()
            responses = [f.result() for f in futures]
        for i, r in enumerate(responses):
            assert r.status_code == (400 if i % 3 == 0 else 200), r.text
            if i % 3:
                assert r.json()["usage"]["completion_tokens"] == 5 + i
        assert max(batch_sizes) >= 2  # they overlapped in the engine
        assert wait_until(lambda: not sched.has_work)
        pool.check_invariants(sched.live_requests())
        assert pool.num_free_device_blocks == 256
    finally:
        engine.shutdown()


def test_client_that_leaves_mid_stream_frees_its_blocks():
    engine, _, pool = make_engine(delay_s=0.01, blocks=256)
    app = build_app(ServerConfig("tiny", max_model_len=1000), CharTokenizer(), engine)
    try:
        with TestClient(app) as client:
            with client.stream("POST", "/v1/completions",
                               json={"prompt": "a", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # leave after the first chunk
        assert wait_until(lambda: not engine.loop.core.scheduler.has_work)
        assert pool.num_free_device_blocks == 256
    finally:
        engine.shutdown()


def test_prometheus_metrics_use_vllm_names(served):
    client, engine, _ = served
    for _ in range(3):
        client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4, "ignore_eos": True})
    text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_sum", "vllm:request_queue_time_seconds_count",
                 "vllm:num_preemptions_total"):
        assert name in text, name
    assert 'vllm:generation_tokens_total{model_name="tiny"} 12.0' in text
    assert 'vllm:prompt_tokens_total{model_name="tiny"} 6.0' in text
    assert 'vllm:request_success_total{finished_reason="length",model_name="tiny"} 3.0' in text
    assert 'vllm:inter_token_latency_seconds_count{model_name="tiny"} 9.0' in text
    # The engine thread's totals: 3 prompts of 2 tokens, 3 decode steps' tokens each.
    assert 'rankserve:engine_prefill_tokens_total{model_name="tiny"} 6.0' in text
    assert 'rankserve:engine_decode_tokens_total{model_name="tiny"} 9.0' in text
    totals = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("rankserve:")}
    assert 3 <= totals["rankserve:engine_steps_total"] <= 12
    assert totals["rankserve:engine_busy_seconds_total"] > 0
    assert totals["rankserve:predictor_scoring_seconds_total"] >= 0
    assert totals["rankserve:predictor_failures_total"] == 0
    engine.loop.stats.predictor_failures = 2  # what the engine thread counts (test_engine_loop)
    assert 'rankserve:predictor_failures_total{model_name="tiny"} 2.0' in client.get("/metrics").text


def test_a_request_that_breaks_the_engine_gets_an_error_and_a_victim_stream_completes():
    engine, executor, pool = make_engine(delay_s=0.003, blocks=256)
    real_execute = executor.execute

    def execute(out):  # a bug only one request triggers (validation bypassed)
        if any(r.prompt_text == "poison" for r in out.requests):
            raise IndexError("index out of range in self")
        return real_execute(out)

    executor.execute = execute
    app = build_app(ServerConfig("tiny", max_model_len=1000, vocab_size=50), CharTokenizer(), engine)
    try:
        with TestClient(app) as client:
            with client.stream("POST", "/v1/completions", json={
                    "prompt": "victim", "max_tokens": 300, "ignore_eos": True, "stream": True}) as victim:
                lines = victim.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # it is running
                r = client.post("/v1/completions", json={"prompt": "poison", "max_tokens": 50})
                assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
                assert "IndexError" in r.json()["error"]["message"]
                with client.stream("POST", "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "poison"}], "stream": True}) as bad:
                    events = [json.loads(line[6:]) for line in bad.iter_lines()
                              if line.startswith("data: {")]
                assert bad.status_code == 500 or "error" in events[-1]
                rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert rest[-1]["choices"][0]["finish_reason"] == "length"
        assert wait_until(lambda: pool.num_free_device_blocks == 256)
    finally:
        engine.shutdown()


def test_after_a_step_fails_for_everyone_the_live_requests_get_errors_and_new_ones_are_served():
    """A step that raises outside any one request's computation ends every live request: a plain
    request gets a 500 with the OpenAI error body, a running stream gets an error event and
    [DONE]; the engine serves the next request as usual."""
    engine, _, pool = make_engine(delay_s=0.005, blocks=256)
    core = engine.loop.core
    step = core.step
    armed = threading.Event()

    def failing_step():
        if armed.is_set() and len(core.scheduler.running) == 2:  # both requests are in the engine
            armed.clear()
            raise RuntimeError("scheduler state lost")
        return step()

    core.step = failing_step
    app = build_app(ServerConfig("tiny", max_model_len=1000, vocab_size=50), CharTokenizer(), engine)
    body = {"prompt": "abc", "max_tokens": 500, "ignore_eos": True}
    try:
        with TestClient(app) as client:
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
                lines = streamed.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))  # it is running
                armed.set()
                plain = client.post("/v1/completions", json=body)
                rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
            assert plain.status_code == 500
            error = plain.json()["error"]
            assert error["type"] == "server_error" and "scheduler state lost" in error["message"]
            assert streamed.status_code == 200 and rest[-1] == "[DONE]"
            assert "scheduler state lost" in json.loads(rest[-2])["error"]["message"]
            after = client.post("/v1/completions", json={**body, "max_tokens": 5})
            assert after.status_code == 200 and after.json()["choices"][0]["text"] == "bcdef"
        assert not armed.is_set()  # the failure did happen
        assert wait_until(lambda: pool.num_free_device_blocks == 256)
    finally:
        engine.shutdown()


@pytest.fixture
def slow_server():
    """The app on a real loopback port, over an engine that takes 10 ms a step (4 running at most)."""
    engine, _, pool = make_engine(delay_s=0.01, blocks=256)
    app = build_app(ServerConfig("tiny", max_model_len=1000, vocab_size=50), CharTokenizer(), engine)
    try:
        with serve_on_loopback(app) as url:
            yield url, engine, pool
    finally:
        engine.shutdown()


LONG = {"max_tokens": 900, "ignore_eos": True}
BODIES = {"/completions": {"prompt": "abc", **LONG},
          "/chat/completions": {"messages": [{"role": "user", "content": "abc"}], **LONG}}


@pytest.mark.parametrize("path", list(BODIES))
def test_a_client_that_times_out_aborts_its_request_within_a_second(slow_server, path, caplog):
    url, engine, pool = slow_server
    scheduler = engine.loop.core.scheduler
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + path, json=BODIES[path], timeout=0.5)
    assert scheduler.has_work or pool.num_free_device_blocks == 256  # it was not done after 0.5 s
    assert wait_until(lambda: not scheduler.has_work, timeout_s=1.0)
    assert pool.num_free_device_blocks == 256
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # the server took it in its stride


@pytest.mark.parametrize("path", list(BODIES))
def test_a_client_that_leaves_while_queued_takes_its_request_out_of_the_queue(slow_server, path):
    url, engine, pool = slow_server
    scheduler = engine.loop.core.scheduler

    def occupy() -> None:  # 4 long requests fill the running batch (9 s each), then leave
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(url + path, json=BODIES[path], timeout=3.0)

    blockers = [threading.Thread(target=occupy) for _ in range(4)]
    for t in blockers:
        t.start()
    assert wait_until(lambda: len(scheduler.running) == 4, timeout_s=10)
    with pytest.raises(httpx.ReadTimeout):  # a stream that never got its first token
        with httpx.stream("POST", url + path, json={**BODIES[path], "stream": True}, timeout=0.5) as r:
            r.read()
    assert wait_until(lambda: scheduler.num_queued == 0, timeout_s=1.0)
    assert len(scheduler.running) == 4  # the blockers still run: the queued one left on its own
    assert scheduler.live_requests() == list(scheduler.running.values())
    for t in blockers:
        t.join()
    assert wait_until(lambda: not scheduler.has_work, timeout_s=1.0)
    assert pool.num_free_device_blocks == 256


def test_requests_ended_by_a_stop_string_or_a_disconnect_are_counted():
    engine, _, _ = make_engine(delay_s=0.005, blocks=256)
    app = build_app(ServerConfig("tiny", max_model_len=1000, vocab_size=50), CharTokenizer(), engine)

    def count(reason: str) -> float:
        line = f'vllm:request_success_total{{finished_reason="{reason}",model_name="tiny"}}'
        found = [x for x in client.get("/metrics").text.splitlines() if x.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    try:
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 100, "stop": ["fg"]})
            assert r.json()["choices"][0]["finish_reason"] == "stop"
            assert wait_until(lambda: count("stop") == 1)
            with client.stream("POST", "/v1/completions",
                               json={"prompt": "a", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))  # then leave
            assert wait_until(lambda: count("abort") == 1)
    finally:
        engine.shutdown()


def test_a_prefill_aware_policy_ranks_by_work_with_this_cpus_prefill_weight(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from rankserve.engine.build import EngineSettings
    from rankserve.server.serve import rank_by_work
    from rankserve.sim.cost_model import get_cost_model

    monkeypatch.setenv("RANKSERVE_PRESETS", str(tmp_path))  # no calibration on this machine yet
    shipped = get_cost_model("cpu-smollm2-135m").prefill_weight(16)
    ltr = rank_by_work(EngineSettings(policy="ltr", max_num_seqs=16, policy_params={"boost_quantum": 5}))
    assert ltr.policy_params == {"boost_quantum": 5, "prefill_weight": pytest.approx(shipped, abs=1e-4)}
    assert 0.1 < shipped < 0.3
    assert rank_by_work(EngineSettings(policy="fcfs")).policy_params == {}  # not prefill-aware
    given = EngineSettings(policy="sjf", policy_params={"prefill_weight": 0.0})
    assert rank_by_work(given).policy_params == {"prefill_weight": 0.0}  # the operator's own wins
    # After `rankserve calibrate` on this machine, its fit decides.
    fitted = Path(__file__).parents[1] / "docs/results/2026-12-06-epyc-avx2/calibration_first.json"
    shutil.copy(fitted, tmp_path / "cpu-local.json")
    local = get_cost_model(str(fitted)).prefill_weight(32)
    assert local != pytest.approx(get_cost_model("cpu-smollm2-135m").prefill_weight(32), abs=1e-3)
    weight = rank_by_work(EngineSettings(policy="ltr", max_num_seqs=32)).policy_params["prefill_weight"]
    assert weight == pytest.approx(local, abs=1e-4)
