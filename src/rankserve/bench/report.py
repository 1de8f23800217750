"""Tables and plots of run records (from the simulator now, from HTTP benchmarks later)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (summary key, column title, scale) for the standard table.
COLUMNS = (
    ("throughput_rps", "req/s", 1.0),
    ("mean_latency_per_token_s", "mean lat/tok ms", 1e3),
    ("p90_latency_per_token_s", "p90 lat/tok ms", 1e3),
    ("mean_latency_s", "mean lat s", 1.0),
    ("p99_latency_s", "p99 lat s", 1.0),
    ("mean_ttft_s", "mean TTFT s", 1.0),
    ("p99_max_wait_s", "p99 max wait s", 1.0),
    ("preemptions", "preempt", 1.0),
)
# Synthetic data generation columns, shown when some record has them.
OPTIONAL_COLUMNS = (
    ("time_to_first_k_s", "time to first K s", 1.0),
    ("finished_within_limit", "done in limit", 1.0),
)


def summary_line(record: dict[str, Any]) -> str:
    s = record["summary"]
    return (
        f"{record['system']}: {s['num_requests']} requests in {s['duration_s']:.1f} s "
        f"({s['throughput_rps']:.2f} req/s, {s['output_tokens_per_s']:.0f} tok/s); latency per token "
        f"mean {s['mean_latency_per_token_s'] * 1e3:.1f} ms p90 {s['p90_latency_per_token_s'] * 1e3:.1f} ms; "
        f"latency mean {s['mean_latency_s']:.2f} s p99 {s['p99_latency_s']:.2f} s; TTFT mean "
        f"{s['mean_ttft_s']:.3f} s; p99 max wait {s['p99_max_wait_s']:.2f} s; {s['preemptions']} preemptions"
    )


def markdown_table(records: Sequence[dict[str, Any]], baseline: str | None = None) -> str:
    """One row per record; with ``baseline`` (a system name), a column of mean latency per token
    relative to that system at the same rate (baseline / this: > 1 means better)."""
    columns = COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if any(c[0] in r["summary"] for r in records))
    head = ["system", "rate"] + [title for _, title, _ in columns]
    base_by_rate = {}
    if baseline is not None:
        head.append(f"x vs {baseline}")
        base_by_rate = {
            r["spec"]["rate"]: r["summary"]["mean_latency_per_token_s"]
            for r in records
            if r["system"] == baseline
        }
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        s = r["summary"]
        rate = r["spec"]["rate"]
        cells = [r["system"], "burst" if rate is None else f"{rate:g}"]
        for key, _, scale in columns:
            if s.get(key) is None:  # not measured (e.g. preemptions of a server without the metric)
                cells.append("")
                continue
            value = s[key] * scale
            cells.append(f"{value:.0f}" if key in ("preemptions", "finished_within_limit") else f"{value:.3g}")
        if baseline is not None:
            base = base_by_rate.get(rate)
            cells.append(f"{base / s['mean_latency_per_token_s']:.2f}" if base else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_latency_vs_rate(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Mean and p90 latency per token and mean TTFT against request rate, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("mean_latency_per_token_s", "mean latency per token (s)"),
        ("p90_latency_per_token_s", "p90 latency per token (s)"),
        ("mean_ttft_s", "mean TTFT (s)"),
    )
    systems: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        systems.setdefault(r["system"], []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, ylabel) in zip(axes, panels):
        for name, runs in systems.items():
            runs = sorted(runs, key=lambda r: r["spec"]["rate"])
            ax.plot([r["spec"]["rate"] for r in runs], [r["summary"][key] for r in runs], marker="o", label=name)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_cdf(records: Sequence[dict[str, Any]], path: Path) -> None:
    """CDF of per-request latency per output token, one line per (system, rate); needs the
    per-request rows that ``rankserve bench`` records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        rows = [q for q in r.get("requests", []) if q.get("status") == "finished"]
        if not rows:
            continue
        values = sorted(q["e2e_s"] / q["output_tokens"] for q in rows)
        rate = r["spec"]["rate"]
        label = f"{r['system']} @ {'burst' if rate is None else f'{rate:g}/s'}"
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency per output token (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
