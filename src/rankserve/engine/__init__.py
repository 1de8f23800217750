"""The engine: the step loop shared by every executor, and its wall-clock, threaded front."""

from rankserve.engine.core import ENGINE_ERROR, EngineCore, Executor
from rankserve.engine.loop import AsyncEngine, EngineLoop, RequestOutput, WallClock

__all__ = ["ENGINE_ERROR", "AsyncEngine", "EngineCore", "EngineLoop", "Executor", "RequestOutput", "WallClock"]
