"""Per-request and aggregate serving metrics, shared by the simulator, the engine and the benchmarks.

Definitions (vLLM's benchmark conventions, plus the learning-to-rank paper's):
- TTFT: first token time - arrival; E2E latency: finish - arrival;
- TPOT: (E2E - TTFT) / (output tokens - 1);
- latency per token: E2E / output tokens (the paper's main metric);
- max wait: max(TTFT, largest gap between two consecutive tokens) (the paper's fairness metric).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rankserve.core.request import Request, RequestStatus


def ttft(req: Request) -> float:
    """Seconds from arrival to the first token."""
    return req.first_token_time - req.arrival_time


def e2e(req: Request) -> float:
    """Seconds from arrival to the end."""
    return req.finished_time - req.arrival_time


def tpot(req: Request) -> float:
    """Seconds per output token after the first (0 for a single-token output)."""
    n_out = len(req.output_token_ids)
    return (e2e(req) - ttft(req)) / (n_out - 1) if n_out > 1 else 0.0


def request_table(requests: Sequence[Request]) -> dict[str, np.ndarray]:
    """Per-request metrics of the finished requests, as arrays (one entry per request)."""
    done = [r for r in requests if r.status is RequestStatus.FINISHED and r.output_token_ids]

    def column(metric) -> np.ndarray:
        return np.fromiter((metric(r) for r in done), float, len(done))

    first_wait = column(ttft)
    latency = column(e2e)
    n_out = column(lambda r: len(r.output_token_ids))
    return {
        "ttft": first_wait,
        "e2e": latency,
        "tpot": column(tpot),
        "latency_per_token": latency / n_out,
        "max_wait": np.maximum(first_wait, column(lambda r: r.max_token_gap)),
        "output_len": n_out,
        "arrival": column(lambda r: r.arrival_time),
        "finish": column(lambda r: r.finished_time),
        "preemptions": column(lambda r: r.num_preemptions),
    }


def _stats(prefix: str, values: np.ndarray, out: dict) -> None:
    if len(values) == 0:
        for stat in ("mean", "p50", "p90", "p99"):
            out[f"{stat}_{prefix}"] = float("nan")
        return
    out[f"mean_{prefix}"] = float(values.mean())
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    out[f"p50_{prefix}"] = float(p50)
    out[f"p90_{prefix}"] = float(p90)
    out[f"p99_{prefix}"] = float(p99)


def summarize(requests: Sequence[Request]) -> dict[str, float]:
    """Aggregate metrics: mean / p50 / p90 / p99 of each per-request metric, throughput."""
    table = request_table(requests)
    n = len(table["e2e"])
    out: dict[str, float] = {"num_requests": n}
    out["num_aborted"] = sum(r.status is RequestStatus.ABORTED for r in requests)
    if n:
        duration = float(table["finish"].max() - table["arrival"].min())
    else:
        duration = 0.0
    out["duration_s"] = duration
    out["throughput_rps"] = n / duration if duration > 0 else 0.0
    out["output_tokens_per_s"] = float(table["output_len"].sum()) / duration if duration > 0 else 0.0
    _stats("latency_s", table["e2e"], out)
    _stats("ttft_s", table["ttft"], out)
    _stats("tpot_s", table["tpot"], out)
    _stats("latency_per_token_s", table["latency_per_token"], out)
    _stats("max_wait_s", table["max_wait"], out)
    out["preemptions"] = int(table["preemptions"].sum())
    return out


def time_to_k_finished(requests: Sequence[Request], k: int, start: float = 0.0) -> float:
    """Synthetic data generation: seconds from ``start`` until any ``k`` requests have finished."""
    ends = sorted(r.finished_time for r in requests if r.status is RequestStatus.FINISHED)
    if len(ends) < k:
        raise ValueError(f"only {len(ends)} requests finished, fewer than k={k}")
    return ends[k - 1] - start


def finished_within(requests: Sequence[Request], limit_s: float, start: float = 0.0) -> int:
    """Synthetic data generation: how many requests finished within ``limit_s`` of ``start``."""
    return sum(
        1 for r in requests if r.status is RequestStatus.FINISHED and r.finished_time - start <= limit_s
    )


def data_generation_summary(requests: Sequence[Request], start: float, first_k: int | None = None,
                            time_limit_s: float | None = None) -> dict[str, float]:
    """The synthetic-data-generation metrics that were asked for: time until any ``first_k``
    finished (and ``first_k`` / that time), and how many finished within ``time_limit_s``.
    Raises ValueError if fewer than ``first_k`` finished."""
    out: dict[str, float] = {}
    if first_k is not None:
        out["time_to_first_k_s"] = time_to_k_finished(requests, first_k, start)
        out["first_k_throughput_rps"] = first_k / out["time_to_first_k_s"]
    if time_limit_s is not None:
        out["finished_within_limit"] = finished_within(requests, time_limit_s, start)
    return out
