"""The router's Prometheus metrics, one series per backend (label ``backend``).

Counters are counted as things happen; gauges (in flight, predicted work, KV usage, healthy) are read
from the load trackers at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rankserve.route.backends import Backend
from rankserve.route.scoring import PromptScorer


class RouterMetrics:
    def __init__(self, backends: Sequence[Backend], scorer: PromptScorer) -> None:
        self.backends = backends
        self.scorer = scorer
        self.registry = CollectorRegistry()
        self.requests = Counter("rankserve:router_requests", "Requests sent to a backend (retries included).",
                                ["backend"], registry=self.registry)
        self.errors = Counter("rankserve:router_backend_errors",
                              "Backend failures: connect (before an answer, retried), midstream (ended the "
                              "stream with an error event).", ["backend", "kind"], registry=self.registry)
        self.retries = Counter("rankserve:router_retries", "Requests moved off a backend that failed before "
                               "answering.", ["backend"], registry=self.registry)
        self.client_aborts = Counter("rankserve:router_client_disconnects",
                                     "Clients that went away; the upstream request was closed.", ["backend"],
                                     registry=self.registry)
        self.unrouted = Counter("rankserve:router_unrouted_requests",
                                "Requests answered with an error because no backend could take them.",
                                registry=self.registry)
        for b in backends:  # series exist from the start, at zero
            self.requests.labels(backend=b.name)
            self.retries.labels(backend=b.name)
        self.registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = {
            "rankserve:router_in_flight": ("Requests in flight on a backend.", lambda b: b.load.num_in_flight),
            "rankserve:router_predicted_work_tokens": (
                "Predicted outstanding work on a backend, in decode-token equivalents.",
                lambda b: b.load.outstanding_work),
            "rankserve:router_kv_held_tokens": ("KV tokens a backend holds (reported, or estimated).",
                                                lambda b: b.load.kv_held_tokens),
            "rankserve:router_backend_healthy": ("1 while a backend passes its health checks.",
                                                 lambda b: float(b.load.healthy)),
        }
        for name, (doc, read) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["backend"])
            for b in self.backends:
                family.add_metric([b.name], read(b))
            yield family
        scored = CounterMetricFamily("rankserve:router_prompts_scored", "Prompts the length predictor scored.")
        scored.add_metric([], self.scorer.num_scored)
        yield scored
        failed = CounterMetricFamily("rankserve:router_scoring_failures",
                                     "Requests forwarded without a score (no_text: token-id prompt; error: the "
                                     "predictor failed).", labels=["reason"])
        for reason in ("no_text", "error"):
            failed.add_metric([reason], self.scorer.failures.get(reason, 0))
        yield failed

    def render(self) -> bytes:
        return generate_latest(self.registry)
