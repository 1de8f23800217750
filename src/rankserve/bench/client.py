"""``rankserve bench``: an async load generator for any OpenAI-compatible server (rankserve, vLLM).

Requests are sent at their arrival times (Poisson, gamma or a burst), streamed over SSE, and timed
per chunk. Each finished request becomes a core ``Request`` carrying those timestamps, so the
simulator's metrics code (``rankserve.core.metrics``) computes TTFT, TPOT, latency per token, max
wait and throughput for HTTP runs too; ITL and goodput are added here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from rankserve.core.metrics import e2e, summarize, tpot, ttft
from rankserve.core.request import Request, RequestStatus, SamplingParams


@dataclass(frozen=True)
class BenchItem:
    """One request to send: chat prompt text, its output budget, and when to send it."""

    prompt: str
    max_tokens: int
    arrival_s: float
    ignore_eos: bool = False  # True when replaying a recorded length
    prompt_len: int = 0  # tokens, if known (for the record only)
    extra: dict | None = None  # more body fields for this request alone (e.g. an oracle's vllm_xargs)


@dataclass(frozen=True)
class SLO:
    """Goodput counts requests that meet every given bound (seconds)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None


# Requests sent at the same instant reach the server in whatever order their connections race to
# (a burst of 100 on 2 vCPUs: a quarter to a half of the pairs swapped, and FCFS's mean latency per
# token moved 409-586 ms between identical runs). Spaced this far apart, at most 0.7% of the pairs
# arrived out of trace order in three such runs (docs/ENGINE.md).
SEND_GAP_S = 0.002


def build_items(prompts: Sequence[str], max_tokens: Sequence[int], arrivals: Sequence[float],
                ignore_eos: bool, prompt_lens: Sequence[int] | None = None,
                min_gap_s: float = SEND_GAP_S) -> list[BenchItem]:
    """One item per prompt, in the given order, sent at its arrival time but never within
    ``min_gap_s`` of the one before (a burst goes out ``min_gap_s`` apart, in order)."""
    if not len(prompts) == len(max_tokens) == len(arrivals):
        raise ValueError("need one max_tokens and one arrival time per prompt")
    lens = prompt_lens if prompt_lens is not None else [0] * len(prompts)
    send = list(map(float, arrivals))
    for i in range(1, len(send)):
        send[i] = max(send[i], send[i - 1] + min_gap_s)
    return [BenchItem(p, int(m), a, ignore_eos, int(n)) for p, m, a, n in zip(prompts, max_tokens, send, lens)]


async def _one(client, url: str, model: str, item: BenchItem, start: float, headers: dict,
               extra: dict, result: Request) -> None:
    body = {
        "model": model, "messages": [{"role": "user", "content": item.prompt}], "max_tokens": item.max_tokens,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": item.ignore_eos, **extra, **(item.extra or {}),
    }
    delay = start + item.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.perf_counter() - start
    result.arrival_time = sent
    chunks: list[float] = []
    completion_tokens = prompt_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                raise RuntimeError(f"HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                now = time.perf_counter() - start
                if event.get("usage"):
                    completion_tokens = event["usage"].get("completion_tokens")
                    prompt_tokens = event["usage"].get("prompt_tokens")
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        chunks.append(now)
        end = time.perf_counter() - start
    except Exception as exc:  # any failure is recorded, never dropped
        result.status = RequestStatus.ABORTED
        result.abort_reason = f"{type(exc).__name__}: {exc}"
        return
    n = completion_tokens if completion_tokens is not None else len(chunks)
    if n == 0 or not chunks:
        result.status = RequestStatus.ABORTED
        result.abort_reason = "no tokens"
        return
    if prompt_tokens:  # the server's count, after its chat template
        result.prompt_token_ids = range(prompt_tokens)
    result.output_token_ids = [0] * n
    result.first_token_time = chunks[0]
    result.token_times = chunks
    result.max_token_gap = float(np.max(np.diff(chunks))) if len(chunks) > 1 else 0.0
    result.finished_time = end
    result.status = RequestStatus.FINISHED


async def run_bench_async(base_url: str, model: str, items: Sequence[BenchItem], api_key: str | None = None,
                          extra_body: dict | None = None, timeout_s: float = 3600.0, progress: bool = True) -> list[Request]:
    """Send every item at its arrival time; returns one Request per item, finished or aborted."""
    import httpx
    from tqdm import tqdm

    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = [
        Request(range(max(it.prompt_len, 1)), SamplingParams(max_tokens=it.max_tokens, ignore_eos=it.ignore_eos),
                request_id=f"bench-{i}", record_token_times=True)
        for i, it in enumerate(items)
    ]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        start = time.perf_counter()
        bar = tqdm(total=len(items), desc="requests", unit="req", disable=not progress)

        async def tracked(item: BenchItem, result: Request) -> None:
            await _one(client, url, model, item, start, headers, extra_body or {}, result)
            bar.update(1)

        await asyncio.gather(*(tracked(it, r) for it, r in zip(items, results)))
        bar.close()
    return results


def run_bench(base_url: str, model: str, items: Sequence[BenchItem], **kwargs) -> list[Request]:
    return asyncio.run(run_bench_async(base_url, model, items, **kwargs))


def bench_summary(results: Sequence[Request], slo: SLO | None = None) -> dict[str, float]:
    """The simulator's summary plus inter-token latency and goodput."""
    out = summarize(results)
    gaps = np.concatenate([np.diff(r.token_times) for r in results
                           if r.status is RequestStatus.FINISHED and len(r.token_times) > 1] or [np.zeros(0)])
    for stat, value in (("mean", gaps.mean() if len(gaps) else float("nan")),
                        ("p50", np.percentile(gaps, 50) if len(gaps) else float("nan")),
                        ("p99", np.percentile(gaps, 99) if len(gaps) else float("nan"))):
        out[f"{stat}_itl_s"] = float(value)
    if slo is not None:
        good = 0
        for r in results:
            if r.status is not RequestStatus.FINISHED:
                continue
            if ((slo.ttft_s is None or ttft(r) <= slo.ttft_s) and (slo.tpot_s is None or tpot(r) <= slo.tpot_s)
                    and (slo.e2e_s is None or e2e(r) <= slo.e2e_s)):
                good += 1
        out["goodput_rps"] = good / out["duration_s"] if out["duration_s"] > 0 else 0.0
    return out


def _metric_families(base_url: str, api_key: str | None) -> list | None:
    """The server's /metrics, parsed; None if it cannot be reached or serves none."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(root + "/metrics", headers=headers, timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None  # no /metrics there (e.g. Ray Serve's ingress): a 404's JSON body is no exposition
    try:
        return list(text_string_to_metric_families(response.text))
    except ValueError:
        return None


def server_counter(base_url: str, name: str, api_key: str | None = None) -> float | None:
    """The server's counter ``name`` (its ``_total`` samples summed over labels); None if the server
    cannot be reached or has no such metric."""
    families = _metric_families(base_url, api_key)
    # The family drops "_total"; an untyped family keeps it.
    families = [f for f in families or () if f.name in (name, name + "_total")]
    if not families:
        return None
    # A labelled counter has no sample until its first increment: then it is 0.
    return float(sum(s.value for f in families for s in f.samples if s.name == name + "_total"))


def server_samples(base_url: str, names: Iterable[str], api_key: str | None = None) -> dict[str, float]:
    """The named samples of the server's /metrics, each summed over labels (a histogram's
    ``NAME_count`` and ``NAME_sum`` too); samples the server does not have are left out."""
    wanted, found = set(names), {}
    for family in _metric_families(base_url, api_key) or ():
        for sample in family.samples:
            if sample.name in wanted:
                found[sample.name] = found.get(sample.name, 0.0) + float(sample.value)
    return found


def server_preemptions(base_url: str, api_key: str | None = None) -> int | None:
    """The server's ``vllm:num_preemptions_total`` (rankserve and vLLM both export it); None if the
    server has no such metric. A client cannot see preemptions any other way."""
    value = server_counter(base_url, "vllm:num_preemptions", api_key)
    return None if value is None else int(value)


def per_request_rows(results: Sequence[Request]) -> list[dict]:
    rows = []
    for r in results:
        row = {"id": r.request_id, "arrival_s": r.arrival_time, "max_tokens": r.sampling.max_tokens,
               "prompt_tokens": r.prompt_len, "status": r.status.value}
        if r.status is RequestStatus.FINISHED:
            row.update(ttft_s=ttft(r), e2e_s=e2e(r),
                       output_tokens=r.num_output_tokens, max_gap_s=r.max_token_gap)
        else:
            row["error"] = r.abort_reason
        rows.append(row)
    return rows
