"""Discrete-event simulation: the real scheduler on a virtual clock, with step times from a cost model."""
