"""Argparse ``type`` converters shared by the subcommands: a bad value becomes a one-line error
naming its flag."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def checked(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that turns a ValueError from ``check`` into a flag error."""

    def convert(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be an integer >= 0, got {text}")
    return value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {text}")
    return value


def rate(text: str) -> float:
    """Requests per second; inf sends every request at once."""
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0 (or inf for a burst), got {text}")
    return value


def rates(text: str) -> list[float]:
    """Comma-separated request rates."""
    values = [rate(part) for part in text.split(",") if part]
    if not values:
        raise ValueError("give at least one rate")
    return values


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {text}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a port number in 1..65535, got {text}")
    return value
