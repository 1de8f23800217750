"""The backends behind the router: each one's address, load tracker and health.

A health check asks ``GET /health`` (200 = healthy: rankserve and vLLM both answer it) and reads the
backend's KV cache from ``GET /metrics``: ``vllm:kv_cache_usage_perc`` (rankserve and vLLM), with the
capacity from vLLM's ``vllm:cache_config_info`` (``num_gpu_blocks`` x ``block_size``) or, for a
backend that does not report it, the ``kv_capacity_tokens`` the router was given.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

import httpx

from rankserve.route.load import ReplicaLoad

_LABELS = re.compile(r'(\w+)="([^"]*)"')
SLOW_CHECKS_TO_DOWN = 3


def normalize_url(url: str) -> str:
    """``http://host:port`` from a backend address given with or without ``/v1`` or a slash."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not re.match(r"^https?://[^/\s]+$", url):
        raise ValueError(f"not a backend address (http://HOST:PORT[/v1]): {url!r}")
    return url


def kv_from_metrics(text: str) -> tuple[float | None, int | None]:
    """(usage fraction, capacity in tokens) from a Prometheus exposition, each None if absent."""
    usage = capacity = None
    for line in text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc"):
            usage = float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:cache_config_info{"):
            labels = dict(_LABELS.findall(line))
            if labels.get("num_gpu_blocks", "").isdigit() and labels.get("block_size", "").isdigit():
                capacity = int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    return usage, capacity


class Backend:
    """One upstream server: its base URL (without /v1), the load it carries, its counters."""

    def __init__(self, url: str, load: ReplicaLoad) -> None:
        self.url = normalize_url(url)
        self.load = load
        self.load.name = self.url
        self.load.healthy = False  # until the first health check answers
        self.last_error: str | None = None
        self.slow_checks = 0  # health checks in a row that timed out

    @property
    def name(self) -> str:
        return self.url

    def mark_down(self, why: str) -> None:
        """Take the backend out until a health check sees it answer again."""
        self.load.healthy = False
        self.last_error = why

    async def check(self, client: httpx.AsyncClient, timeout_s: float, kv_capacity_tokens: int | None) -> bool:
        """One health check; updates ``load.healthy`` and the reported KV cache. A refused
        connection or an answer other than 200 takes the backend out at once; a slow answer only
        after ``SLOW_CHECKS_TO_DOWN`` in a row (a busy engine can be late and still serve)."""
        try:
            answer = await client.get(self.url + "/health", timeout=timeout_s)
        except httpx.TimeoutException:
            self.slow_checks += 1
            if self.slow_checks >= SLOW_CHECKS_TO_DOWN:
                self.mark_down(f"/health timed out {self.slow_checks} times in a row")
            return self.load.healthy
        except httpx.HTTPError as exc:
            self.mark_down(f"health check failed: {type(exc).__name__}")
            return False
        self.slow_checks = 0
        if answer.status_code != 200:
            self.mark_down(f"/health answered {answer.status_code}")
            return False
        self.load.healthy = True
        try:
            metrics = await client.get(self.url + "/metrics", timeout=timeout_s)
        except httpx.HTTPError:
            return True  # the KV reading waits for the next check
        if metrics.status_code == 200:
            usage, capacity = kv_from_metrics(metrics.text)
            capacity = capacity or kv_capacity_tokens
            if usage is not None and capacity is not None:
                self.load.set_kv(usage * capacity, capacity)
        return True


async def check_all(backends: Sequence[Backend], client: httpx.AsyncClient, timeout_s: float,
                    kv_capacity_tokens: int | None) -> None:
    await asyncio.gather(*(b.check(client, timeout_s, kv_capacity_tokens) for b in backends))
