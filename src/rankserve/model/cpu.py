"""The CPU at hand, as kernel choices and builds key on it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_identity() -> dict[str, str]:
    """The CPU's model name and feature flags (Linux /proc/cpuinfo; elsewhere what platform says)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags") or fields.get("Features") or ""
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "flags": " ".join(sorted(flags.split()))}
