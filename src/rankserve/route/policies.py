"""Router policies: which replica gets a request. As small as the engine's scheduling policies.

Interface::

    router = make_router("sal", seed=0)             # a name from ROUTER_NAMES
    info = RouteRequest(prompt_tokens=812, predicted_output_tokens=140.0, max_tokens=None)
    i = router.choose(info, replicas)               # replicas: Sequence[ReplicaLoad] (route/load.py)
    replicas[i].on_send(request_id, info.prompt_tokens, info.predicted_output_tokens, info.max_tokens, now)

``choose`` returns the index of a healthy replica and raises :class:`NoHealthyReplica` when there
is none. A policy only reads the trackers; the caller tells the chosen one about the request.
Ties go to the replica after the one chosen last, so equal replicas take turns.

- ``round-robin``: each healthy replica in turn;
- ``random``: uniformly among the healthy ones (seeded);
- ``least-requests``: fewest requests in flight;
- ``pow2``: two distinct healthy replicas drawn at random, the one with fewer in flight (power of
  two choices, Ray Serve's default router);
- ``least-kv``: lowest KV-cache usage (reported by the backend, or estimated from what it was sent);
- ``sal``: least predicted outstanding work after adding this request, in seconds at the
  replica's speed (``(outstanding_work + request_work) / speed``); memory-aware: replicas whose KV
  cache cannot take the request's predicted footprint are skipped while another can. With
  ``estimate="latency"`` it picks the least expected latency of the request itself, from each
  replica's step-time curve (``ReplicaLoad.expected_latency``; work / speed where it is unknown).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rankserve.route.load import ReplicaLoad


class NoHealthyReplica(RuntimeError):
    """Every replica is marked unhealthy."""


@dataclass(frozen=True)
class RouteRequest:
    """What a router knows of a request when it picks a replica."""

    prompt_tokens: int
    predicted_output_tokens: float | None = None  # None: no length prediction
    max_tokens: int | None = None  # None: the client set no limit the router can see

    @property
    def kv_footprint(self) -> float:
        """Predicted KV tokens at the end (prompt + predicted output, capped by max_tokens)."""
        out = self.predicted_output_tokens or 0.0
        if self.max_tokens is not None:
            out = min(out, self.max_tokens)
        return self.prompt_tokens + out


class Router:
    name: ClassVar[str] = ""
    # Whether the router reads predicted lengths (the caller then scores prompts before routing).
    needs_prediction: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self._last = -1

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaLoad]) -> int:
        healthy = [i for i, r in enumerate(replicas) if r.healthy]
        if not healthy:
            raise NoHealthyReplica(f"none of the {len(replicas)} replicas is healthy")
        self._last = self._pick(request, replicas, healthy)
        return self._last

    def _pick(self, request: RouteRequest, replicas: Sequence[ReplicaLoad], healthy: list[int]) -> int:
        raise NotImplementedError

    def _least(self, candidates: list[int], value: Callable[[int], float]) -> int:
        """The candidate of least ``value``; ties go to the first after the last choice."""
        start = self._last + 1
        best, best_value = -1, float("inf")
        for i in sorted(candidates, key=lambda i: (i < start, i)):  # rotate: start first
            v = value(i)
            if v < best_value:
                best, best_value = i, v
        return best


class RoundRobin(Router):
    name = "round-robin"

    def _pick(self, request, replicas, healthy):
        return next((i for i in healthy if i > self._last), healthy[0])


class Random(Router):
    name = "random"

    def _pick(self, request, replicas, healthy):
        return healthy[int(self._rng.integers(len(healthy)))]


class LeastRequests(Router):
    name = "least-requests"

    def _pick(self, request, replicas, healthy):
        return self._least(healthy, lambda i: replicas[i].num_in_flight)


class PowerOfTwo(Router):
    name = "pow2"

    def _pick(self, request, replicas, healthy):
        if len(healthy) == 1:
            return healthy[0]
        a, b = self._rng.choice(len(healthy), size=2, replace=False)
        a, b = healthy[int(a)], healthy[int(b)]
        return b if replicas[b].num_in_flight < replicas[a].num_in_flight else a


class LeastKV(Router):
    name = "least-kv"

    def _pick(self, request, replicas, healthy):
        def usage(i: int) -> float:
            u = replicas[i].kv_usage
            return replicas[i].kv_held_tokens if u is None else u

        return self._least(healthy, usage)


class SAL(Router):
    """Least predicted outstanding work, memory-aware (see the module docstring; docs/RESULTS.md section 6
    says how it reads Kossmann et al. and what is ours)."""

    name = "sal"
    needs_prediction = True

    ESTIMATES = ("work", "latency")

    def __init__(self, seed: int = 0, memory_aware: bool = True, speed_aware: bool = True,
                 estimate: str = "work") -> None:
        super().__init__(seed)
        if estimate not in self.ESTIMATES:
            raise ValueError(f"estimate must be one of {', '.join(self.ESTIMATES)}, got {estimate!r}")
        self.memory_aware = memory_aware
        self.speed_aware = speed_aware
        self.estimate = estimate

    def _pick(self, request, replicas, healthy):
        candidates = healthy
        if self.memory_aware:
            fits = [i for i in healthy if replicas[i].can_fit(request.kv_footprint)]
            candidates = fits or healthy

        def finish_time(i: int) -> float:
            r = replicas[i]
            if self.estimate == "latency":
                latency = r.expected_latency(request.prompt_tokens, request.predicted_output_tokens)
                if latency is not None:
                    return latency
            work = r.outstanding_work + r.request_work(request.prompt_tokens, request.predicted_output_tokens)
            return work / r.speed if self.speed_aware else work

        return self._least(candidates, finish_time)


ROUTERS: dict[str, type[Router]] = {cls.name: cls for cls in (RoundRobin, Random, LeastRequests, PowerOfTwo, LeastKV, SAL)}
ROUTER_NAMES: tuple[str, ...] = tuple(ROUTERS)


def make_router(name: str, seed: int = 0, **params) -> Router:
    """A router by name; ``params`` go to its constructor (e.g. ``memory_aware=False`` for sal)."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r} (choose from {', '.join(ROUTER_NAMES)})") from None
    try:
        return cls(seed=seed, **params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for router {name!r}: {exc}") from None
