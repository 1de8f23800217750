"""A Ray Serve ``RequestRouter`` that runs rankserve's router policies (``sal`` by default) over the
same per-replica load trackers as ``rankserve route`` (needs ``rankserve[ray]``).

The router tells each replica's tracker about the requests it routes (``on_request_routed``) and
the ones that end (``on_request_completed``); replicas report progress in their routing stats
(``record_routing_stats``, every ``request_routing_stats_period_s``):

    {"generated": {route id: output tokens streamed so far}, "kv_used_tokens": float,
     "kv_capacity_tokens": int}

A request carries what the policy reads in its first positional argument, a dict with a ``route``
entry (``route_fields``): the id the replica reports it under, prompt tokens, predicted output
tokens and max_tokens. Other calls (``models``) are routed as one-token requests.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from rankserve.route.load import ReplicaLoad
from rankserve.route.policies import RouteRequest, make_router


def route_fields(route_id: str, request: RouteRequest) -> dict:
    """The ``route`` entry a caller puts in the request dict for this router."""
    return {"id": route_id, "prompt_tokens": request.prompt_tokens,
            "predicted_output_tokens": request.predicted_output_tokens, "max_tokens": request.max_tokens}


def _route_of(pending: PendingRequest | None) -> dict | None:
    if pending is None or not pending.args or not isinstance(pending.args[0], dict):
        return None
    route = pending.args[0].get("route")
    return route if isinstance(route, dict) else None


class PolicyRequestRouter(RequestRouter):
    """``request_router_kwargs``: ``policy`` (a name from ROUTER_NAMES, default sal),
    ``prefill_weight``, ``seed``."""

    def initialize_state(self, policy: str = "sal", prefill_weight: float = 0.5, seed: int = 0, **_: Any) -> None:
        self.policy = make_router(policy, seed=seed)
        self.prefill_weight = prefill_weight
        self.loads: dict[ReplicaID, ReplicaLoad] = {}
        self._reported: dict[str, int] = {}  # route id -> output tokens already told to its tracker
        self._route_ids: dict[str, tuple[ReplicaID, str]] = {}  # Serve's request id -> (replica, route id)

    def _load(self, replica_id: ReplicaID) -> ReplicaLoad:
        if replica_id not in self.loads:
            self.loads[replica_id] = ReplicaLoad(str(replica_id), prefill_weight=self.prefill_weight)
        return self.loads[replica_id]

    def _refresh(self, replica: RunningReplica) -> ReplicaLoad:
        """The replica's tracker, brought up to date with its latest routing stats."""
        load = self._load(replica.replica_id)
        stats = replica.routing_stats or {}
        now = time.monotonic()
        for route_id, generated in (stats.get("generated") or {}).items():
            seen = self._reported.get(route_id)
            if seen is not None and generated > seen:  # seen is None: not routed by us, or already done
                load.on_tokens(route_id, generated - seen, now)
                self._reported[route_id] = generated
        if stats.get("kv_capacity_tokens"):
            load.set_kv(stats.get("kv_used_tokens", 0.0), int(stats["kv_capacity_tokens"]))
        return load

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        route = _route_of(pending_request) or {}
        request = RouteRequest(int(route.get("prompt_tokens") or 1), route.get("predicted_output_tokens"),
                               route.get("max_tokens"))
        loads = [self._refresh(r) for r in candidate_replicas]
        best = self.policy.choose(request, loads)
        if route:  # counted at once: requests routed concurrently must see each other
            self._place(pending_request, route, candidate_replicas[best].replica_id)
        # the others after it, in case the best one turns the request away (max_ongoing_requests)
        return [[candidate_replicas[best]], [r for i, r in enumerate(candidate_replicas) if i != best]]

    def _place(self, pending: PendingRequest, route: dict, replica_id: ReplicaID) -> None:
        """Tell ``replica_id``'s tracker about the request (moving it off the one it was placed on)."""
        internal = pending.metadata.internal_request_id
        route_id = str(route["id"])
        placed = self._route_ids.get(internal)
        if placed is not None and placed[0] == replica_id:
            return
        if placed is not None:
            self._load(placed[0]).on_finish(route_id, time.monotonic())
        self._load(replica_id).on_send(route_id, max(int(route.get("prompt_tokens") or 1), 1),
                                       route.get("predicted_output_tokens"), route.get("max_tokens"),
                                       time.monotonic())
        self._reported[route_id] = 0
        self._route_ids[internal] = (replica_id, route_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        route = _route_of(pending_request)
        if route is not None:  # where it went, if not where the policy placed it
            self._place(pending_request, route, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        entry = self._route_ids.pop(internal_request_id, None)
        if entry is not None:
            self._load(entry[0]).on_finish(entry[1], time.monotonic())
            self._reported.pop(entry[1], None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.loads.pop(replica_id, None)
