"""The engine: the step loop shared by every executor, and its wall-clock, threaded front."""

from rankserve.engine.core import EngineCore, Executor
from rankserve.engine.loop import AsyncEngine, EngineLoop, RequestOutput, WallClock

__all__ = ["AsyncEngine", "EngineCore", "EngineLoop", "Executor", "RequestOutput", "WallClock"]
