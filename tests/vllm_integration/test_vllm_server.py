"""End to end: vLLM's OpenAI server started with RankScheduler on the embedded SmolLM2, requests
through the official ``openai`` client, directly and through ``rankserve gateway``."""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import time

import pytest

pytest.importorskip("vllm")

import httpx  # noqa: E402
import openai  # noqa: E402

from rankserve.integrations.vllm_server import (  # noqa: E402
    SERVED_MODEL_NAME,
    free_port,
    running_server,
    vllm_server_command,
    vllm_server_env,
)


def stats(path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M))


def poll(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


def start_vllm(tmp_path_factory, name: str, rank_env: dict[str, str]):
    out = tmp_path_factory.mktemp(name)
    port = free_port()
    from rankserve.model.loader import load_model_dir

    cmd = vllm_server_command(sys.executable, port, load_model_dir(None).path, max_num_seqs=2,
                              max_num_batched_tokens=256, max_model_len=1024, rank_scheduler=True)
    # One OpenMP thread: spinning threads crawl when other jobs share the cores (CI, a busy machine).
    env = vllm_server_env({**rank_env, "RANKSERVE_STATS_FILE": str(out / "stats.json")}, kv_cache_gib=1, threads=1)
    return out, running_server(cmd, port, out / "vllm.log", env)


@pytest.fixture(scope="module")
def vllm_xargs_only(tmp_path_factory):
    """The class with no in-process predictor: scores must come with the request."""
    out, server = start_vllm(tmp_path_factory, "xargs", {"RANKSERVE_PREDICTOR": "none"})
    with server as url:
        yield url, out / "stats.json"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def chat(c: openai.OpenAI, text: str, max_tokens: int, score: float | None = None,
         predicted_len: int | None = None, **kw):
    xargs = {"rankserve_score": score} if score is not None else {}
    if predicted_len is not None:
        xargs["rankserve_predicted_len"] = predicted_len
    extra = {"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
    return c.chat.completions.create(model=SERVED_MODEL_NAME, messages=[{"role": "user", "content": text}],
                                     max_tokens=max_tokens, extra_body=extra, **kw)


def test_chat_and_completions_through_the_openai_client(vllm_xargs_only):
    url, _ = vllm_xargs_only
    c = client(url)
    reply = chat(c, "Say hello.", 8, score=1.0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
    chunks = list(chat(c, "Count to five.", 6, score=2.0, stream=True))
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 1
    done = c.completions.create(model=SERVED_MODEL_NAME, prompt="The capital of France is", max_tokens=4,
                                extra_body={"vllm_xargs": {"rankserve_score": 0.5}})
    assert done.usage.completion_tokens == 4


def test_a_better_ranked_request_preempts_and_finishes_first(vllm_xargs_only):
    url, _ = vllm_xargs_only
    c = client(url)
    before = metric(url, "vllm:num_preemptions_total")
    finished: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        # Lengths as well as scores: ltr preempts by predicted work, and a rank score alone is
        # not turned into a length until enough requests have finished to calibrate it.
        def run(name: str, n: int, score: float) -> None:
            chat(c, f"Tell me a story about {name}.", n, score=score, predicted_len=n)
            finished.append(name)

        longs = [pool.submit(run, name, 48, 9.0) for name in ("whales", "mountains")]
        assert poll(lambda: metric(url, "vllm:num_requests_running") >= 2, 60)
        short = pool.submit(run, "ants", 4, 0.0)
        for f in (short, *longs):
            f.result()
    assert finished[0] == "ants"  # both slots were taken: it displaced one long request
    assert poll(lambda: metric(url, "vllm:num_preemptions_total") >= before + 1, 15)


def test_a_missing_or_bad_score_is_served_and_counted(vllm_xargs_only):
    url, stats_file = vllm_xargs_only
    c = client(url)
    failures = stats(stats_file).get("score_failures", 0)
    assert chat(c, "Hi!", 4).usage.completion_tokens == 4  # no score, no predictor
    assert chat(c, "Hi again!", 4, score="soon").usage.completion_tokens == 4  # not a number
    # The engine writes its counters at most every 2 s: small requests keep it stepping.
    assert poll(lambda: chat(c, "ok", 1, score=1) and stats(stats_file).get("score_failures", 0) >= failures + 2)


def test_a_client_that_goes_away_is_aborted(vllm_xargs_only):
    url, _ = vllm_xargs_only
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
            "model": SERVED_MODEL_NAME, "messages": [{"role": "user", "content": "Write a long poem."}],
            "max_tokens": 900, "ignore_eos": True, "stream": True, "vllm_xargs": {"rankserve_score": 1}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # one token arrived; leave
    assert poll(lambda: metric(url, "vllm:num_requests_running") == 0, 30)


def test_through_rankserve_gateway_the_score_travels_in_vllm_xargs(vllm_xargs_only, tmp_path):
    url, stats_file = vllm_xargs_only
    port = free_port()
    cmd = [sys.executable, "-m", "rankserve.cli.main", "gateway", "--backend", url, "--port", str(port),
           "--mode", "xargs", "--predictor", "ranker", "--tokenizer", "approx"]
    before = stats(stats_file)
    with running_server(cmd, port, tmp_path / "gateway.log", timeout_s=120) as gateway:
        c = client(gateway)
        assert chat(c, "Name three colours.", 6).usage.completion_tokens == 6
        stream = list(chat(c, "Name three animals.", 5, stream=True))
        assert any(ch.choices and ch.choices[0].delta.content for ch in stream)
    # This server has no predictor: without the gateway's score both would have counted as failures.
    assert poll(lambda: chat(client(url), "ok", 1, score=1) and
                stats(stats_file).get("scored", 0) >= before.get("scored", 0) + 3)
    assert stats(stats_file)["score_failures"] == before.get("score_failures", 0)


def test_the_in_process_ranker_scores_requests(tmp_path_factory):
    out, server = start_vllm(tmp_path_factory, "ranker", {})
    with server as url:
        c = client(url)
        assert chat(c, "What is 2 + 2?", 3).usage.completion_tokens == 3
        assert chat(c, "Write an essay about the sea.", 3).usage.completion_tokens == 3
        assert poll(lambda: chat(c, "ok", 1) and stats(out / "stats.json").get("scored", 0) >= 2)
        got = stats(out / "stats.json")
        assert got["score_failures"] == 0 and got["score_seconds"] > 0 and got["policy"].startswith("ltr")
