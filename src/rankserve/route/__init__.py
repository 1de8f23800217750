"""Routing among replicas: per-replica load trackers (``load``) and router policies (``policies``).

The same code runs in the cluster simulator and in the live router; see each module's docstring."""

from rankserve.route.load import LoadSnapshot, ReplicaLoad, ScoreLengths, remaining_output
from rankserve.route.policies import ROUTER_NAMES, ROUTERS, NoHealthyReplica, RouteRequest, Router, make_router

__all__ = ["LoadSnapshot", "NoHealthyReplica", "ROUTERS", "ROUTER_NAMES", "ReplicaLoad", "RouteRequest", "Router",
           "ScoreLengths", "make_router", "remaining_output"]
