"""Prometheus metrics under vLLM's names, so gateways and dashboards built for vLLM read them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rankserve.core.metrics import e2e, ttft
from rankserve.core.request import Request, RequestStatus
from rankserve.core.scheduler import Scheduler
from rankserve.engine.loop import EngineStats

if TYPE_CHECKING:  # the recorder needs torch; these metrics do not
    from rankserve.learn.records import RecordStats

# The engine thread's totals (vLLM has no names for these): rate(busy) is the share of its
# capacity in use, scoring / busy the predictor's overhead, tokens / steps the mean batch.
ENGINE_COUNTERS = (
    ("rankserve:engine_steps", "Engine steps run.", "steps"),
    ("rankserve:engine_busy_seconds", "Seconds spent inside engine steps.", "busy_s"),
    ("rankserve:predictor_scoring_seconds", "Seconds spent scoring arrivals at admission (on the scoring thread "
     "when there is one).", "scoring_s"),
    ("rankserve:predictor_wait_seconds", "Seconds the engine loop spent scoring arrivals or waiting for their "
     "scores.", "scoring_wait_s"),
    ("rankserve:engine_prefill_tokens", "Prompt tokens computed (recompute included).", "prefill_tokens"),
    ("rankserve:engine_decode_tokens", "Decode tokens computed.", "decode_tokens"),
    ("rankserve:predictor_failures", "Arrivals the predictor raised on (queued in arrival order).",
     "predictor_failures"),
)

# --record-lengths: records written, and finished requests whose record was lost.
_RECORD_COUNTERS = (
    ("rankserve:length_records_written", "Finished requests recorded for fine-tuning the ranker.", "written"),
    ("rankserve:length_record_failures", "Finished requests whose length record failed (never the request).",
     "failed"),
)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._label = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests queued (new or preempted).")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of device KV blocks in use (0-1).")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", _TOKEN_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduling.", _LATENCY_BUCKETS)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Output tokens of finished requests.")
        self.preemptions = counter("vllm:num_preemptions", "Requests taken out of the running batch.")
        self.success = Counter("vllm:request_success", "Requests ended, by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)
        self._engine_stats: EngineStats | None = None
        self._kernels: dict[str, str] = {}
        self._record_stats: RecordStats | None = None
        self.registry.register(self)  # collect() adds the engine and recorder counters and the kernel paths

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self._kernels:  # info-style: always 1, the paths are in the labels
            info = GaugeMetricFamily("rankserve:kernel_info", "Kernel paths the model runs (1; see the labels).",
                                     labels=["model_name", *self._kernels])
            info.add_metric([self._label["model_name"], *self._kernels.values()], 1)
            yield info
        for stats, counters in ((self._engine_stats, ENGINE_COUNTERS), (self._record_stats, _RECORD_COUNTERS)):
            if stats is None:
                continue
            for name, doc, attr in counters:
                family = CounterMetricFamily(name, doc, labels=["model_name"])
                family.add_metric([self._label["model_name"]], getattr(stats, attr))
                yield family

    def observe_finished(self, req: Request) -> None:
        """Record a request that has ended (finished or aborted)."""
        label = self._label
        reason = req.finish_reason.value if req.finish_reason else "unknown"
        self.success.labels(finished_reason=reason, **label).inc()
        self.prompt_tokens.labels(**label).inc(req.prompt_len)
        self.generation_tokens.labels(**label).inc(req.num_output_tokens)
        self.preemptions.labels(**label).inc(req.num_preemptions)
        if req.status is not RequestStatus.FINISHED or req.first_token_time is None:
            return
        self.ttft.labels(**label).observe(ttft(req))
        self.e2e.labels(**label).observe(e2e(req))
        if req.first_scheduled_time is not None:
            self.queue.labels(**label).observe(req.first_scheduled_time - req.arrival_time)
        itl = self.itl.labels(**label)
        for earlier, later in zip(req.token_times, req.token_times[1:]):
            itl.observe(later - earlier)

    def render(self, scheduler: Scheduler | None, engine_stats: EngineStats | None = None,
               kernels: dict[str, str] | None = None, record_stats: RecordStats | None = None) -> bytes:
        """The exposition text; the scheduler's gauges, the engine's (and the length recorder's) totals
        and the kernel paths (``KernelChoice.labels``) are read at scrape time."""
        self._engine_stats = engine_stats
        self._kernels = kernels or {}
        self._record_stats = record_stats
        if scheduler is not None:
            self.running.labels(**self._label).set(len(scheduler.running))
            self.waiting.labels(**self._label).set(scheduler.num_queued)
            self.kv_usage.labels(**self._label).set(scheduler.blocks.device_usage)
        return generate_latest(self.registry)
