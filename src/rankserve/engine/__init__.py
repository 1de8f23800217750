"""The engine: the step loop and the Executor protocol (the model-backed executor comes later)."""

from rankserve.engine.core import EngineCore, Executor

__all__ = ["EngineCore", "Executor"]
