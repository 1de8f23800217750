"""A backend killed mid-run (a fake backend process, SIGKILL): the requests it had not started go to
the other backend and finish; the stream it had started ends with a clean error event; nothing is
lost and nothing hangs."""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from helpers import wait_until
from test_route_proxy import proxy_on

from rankserve.integrations.vllm_server import free_port, started_server, wait_ready

FAKE = Path(__file__).with_name("fake_backend.py")


def healthy(url: str) -> bool:
    """Whether ``url``/health answers 200 (False while nothing listens)."""
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def fake_process(name: str):
    """A fake backend in its own process on a free port, answering /health; stopped on exit whatever happens."""
    port = free_port()
    with started_server([sys.executable, str(FAKE), str(port), name], Path(os.devnull)) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, 30)
        yield proc, url


def _stream_events(url: str, body: dict) -> list[dict | str]:
    """Every event of a streamed completion: parsed JSON, or '[DONE]'."""
    events = []
    with httpx.stream("POST", url + "/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _tokens(events) -> int:
    return sum(1 for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("text"))


def test_a_killed_backend_loses_no_request():
    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(4))
        (a_proc, a), (_, b) = pool.map(lambda n: stack.enter_context(fake_process(n)), ["A", "B"])
        # health checks far apart: the router learns of the death from the failing requests themselves
        proxy, url = stack.enter_context(proxy_on([a, b], router="round-robin", health_interval_s=60))
        started_on_a = pool.submit(_stream_events, url, {"prompt": "p", "max_tokens": 1000, "fake_delay": 0.02})
        assert wait_until(lambda: proxy.backends[0].load.num_in_flight == 1)
        on_b = pool.submit(_stream_events, url, {"prompt": "p", "max_tokens": 30, "fake_delay": 0.02})
        assert wait_until(lambda: proxy.backends[1].load.num_in_flight == 1)
        # round-robin's next pick is A again: a request A has accepted but not started (no token yet)
        queued_on_a = pool.submit(_stream_events, url, {"prompt": "q", "max_tokens": 20, "fake_first_delay": {"A": 30}})
        assert wait_until(lambda: proxy.backends[0].load.num_in_flight == 2)
        time.sleep(0.3)  # the started stream has tokens out
        a_proc.kill()

        started = started_on_a.result(timeout=30)
        assert 0 < _tokens(started) < 1000
        assert "error" in started[-2] and started[-1] == "[DONE]"  # a clean end, not a cut connection
        assert "mid-stream" in started[-2]["error"]["message"]
        queued = queued_on_a.result(timeout=30)
        assert _tokens(queued) == 20 and queued[-1] == "[DONE]"  # retried on B, whole
        assert _tokens(on_b.result(timeout=30)) == 30
        # later requests go to the live backend only, none is refused
        for _ in range(4):
            answer = httpx.post(url + "/completions", json={"prompt": "n", "max_tokens": 2}, timeout=30)
            assert answer.status_code == 200 and answer.json()["model"] == "B"
        assert not proxy.backends[0].load.healthy and proxy.backends[1].load.healthy
        assert proxy.backends[0].load.num_in_flight == 0
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert f'rankserve:router_retries_total{{backend="{a}"}} 1.0' in metrics
        assert f'rankserve:router_backend_errors_total{{backend="{a}",kind="midstream"}} 1.0' in metrics
        assert f'rankserve:router_backend_healthy{{backend="{a}"}} 0.0' in metrics


def test_a_dead_backend_is_retried_elsewhere_and_all_dead_is_a_502():
    with ExitStack() as stack:
        (a_proc, a), = [stack.enter_context(fake_process("A"))]
        (b_proc, b), = [stack.enter_context(fake_process("B"))]
        proxy, url = stack.enter_context(proxy_on([a, b], router="round-robin", health_interval_s=60))
        a_proc.kill()
        a_proc.wait(10)
        answers = [httpx.post(url + "/completions", json={"prompt": "n", "max_tokens": 2}, timeout=30) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 200] and {r.json()["model"] for r in answers} == {"B"}
        b_proc.kill()
        b_proc.wait(10)
        answer = httpx.post(url + "/completions", json={"prompt": "n", "max_tokens": 2}, timeout=30)
        assert answer.status_code == 502 and answer.json()["error"]["type"] == "upstream_error"
        assert all(b.load.num_in_flight == 0 for b in proxy.backends)
