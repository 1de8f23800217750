"""Which CPU this is, for presets fitted on one machine: a CPU cost model holds only on the CPU it
was fitted on (docs/ENGINE.md), so a preset records the CPU and ``rankserve simulate`` warns
when it runs elsewhere."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The instruction sets that pick the engine's kernels: two CPUs under one model name (KVM often
# reports a bare "Intel(R) Xeon(R) Processor") differ here, and so do their step times.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (what ``lscpu`` prints as Model name)."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The CPU's feature flags, sorted (empty where the OS does not list them)."""
    return sorted(set((_cpuinfo_field("flags") or "").split()))


def cpu_mismatch(fitted_on: Mapping[str, Any] | None) -> str | None:
    """Why a preset fitted on ``fitted_on`` may not describe this CPU, or None when it does
    (or when it was not fitted on a CPU at all)."""
    if not fitted_on or "cpu_model" not in fitted_on:
        return None
    here = cpu_model()
    if fitted_on["cpu_model"] != here:
        return f"fitted on {fitted_on['cpu_model']!r}, this CPU is {here!r}"
    flags = cpu_flags()
    theirs = set(fitted_on.get("cpu_flags", ())) & set(KERNEL_FLAGS)
    ours = set(flags) & set(KERNEL_FLAGS)
    if flags and "cpu_flags" in fitted_on and theirs != ours:
        return (f"fitted on a {here!r} with kernel flags {sorted(theirs) or 'none'}, this one has "
                f"{sorted(ours) or 'none'}")
    return None
