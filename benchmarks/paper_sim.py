"""The learning-to-rank paper's experiments in the simulator, at GPU scale.

    python benchmarks/paper_sim.py [--hardware a100-llama3-8b] [--out out/paper_sim]
        [--workload sharegpt:test --systems fcfs ltr+ranker ... --fairness ... --rates 22,28]

1. chatbot serving: ShareGPT, Poisson arrivals over rates that pass FCFS saturation;
2. a burst of 2,000 requests at t = 0;
3. synthetic data generation: 10,000 prompts at once, time until any 1,000 have finished
   (and how many finish within 300 s), as a ratio to FCFS;
4. fairness: p99 max wait of ltr with and without starvation prevention.
Writes one JSON per experiment, tables (markdown) and a latency-vs-rate plot.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from rankserve.bench.experiment import PAPER_SYSTEMS as SYSTEMS
from rankserve.bench.experiment import SimSpec, parse_system, run_grid, sweep_specs
from rankserve.bench.report import markdown_table, plot_latency_vs_rate

FAIRNESS = ("ltr+oracle", "ltr:starvation_prevention=false+oracle", "ltr+noisy@0.62",
            "ltr:starvation_prevention=false+noisy@0.62")
RATES = {
    "a100-llama3-8b": [8, 12, 16, 18, 20, 22, 24, 28],
    "8xa100-llama3-70b": [4, 8, 10, 12, 14, 16, 18, 20],
}


def ratio_table(records: list[dict], key: str, title: str, higher_is_better: bool) -> str:
    base = next(r["summary"][key] for r in records if r["system"] == "fcfs")
    lines = [f"| system | {title} | x vs fcfs |", "|---|---|---|"]
    for r in records:
        value = r["summary"][key]
        ratio = value / base if higher_is_better else base / value
        lines.append(f"| {r['system']} | {value:.4g} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", default="a100-llama3-8b", choices=sorted(RATES))
    parser.add_argument("--num-requests", type=int, default=2000, help="per chatbot run")
    parser.add_argument("--syn-prompts", type=int, default=10_000)
    parser.add_argument("--workload", default="sharegpt",
                        help="sharegpt:test for learned predictors (they were trained on the train split)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), help="POLICY[:k=v,...][+PREDICTOR[@TAU]]")
    parser.add_argument("--fairness", nargs="+", default=list(FAIRNESS), help="systems of the fairness runs")
    parser.add_argument("--rates", default=None, help="comma-separated chatbot rates (default: per hardware)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/paper_sim"))
    args = parser.parse_args()
    out = args.out / args.hardware
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else RATES[args.hardware]
    base = SimSpec(hardware=args.hardware, num_requests=args.num_requests, workload=args.workload)
    systems = [parse_system(s, base) for s in args.systems]
    sections = []

    chat = run_grid(sweep_specs(systems, rates), args.workers)
    plot_latency_vs_rate(chat, out / "chatbot.png", f"{args.hardware}, ShareGPT, Poisson")
    sections.append(("Chatbot serving (Poisson)", markdown_table(chat, baseline="fcfs"), chat))

    burst = run_grid([replace(s, rate=float("inf")) for s in systems], args.workers)
    sections.append(("Burst of %d requests at t = 0" % args.num_requests, markdown_table(burst, "fcfs"), burst))

    syn_specs = [replace(s, rate=float("inf"), num_requests=args.syn_prompts, first_k=1000, time_limit_s=300.0)
                 for s in systems]
    syn = run_grid(syn_specs, args.workers)
    sections.append((
        f"Synthetic data generation ({args.syn_prompts} prompts at once)",
        ratio_table(syn, "first_k_throughput_rps", "1000 / time to first 1000 (req/s)", True)
        + "\n\n" + ratio_table(syn, "finished_within_limit", "finished within 300 s", True),
        syn,
    ))

    fair_systems = [parse_system(s, base) for s in args.fairness]
    fair_rates = [r for r in rates if r >= rates[len(rates) // 2]]
    fair = run_grid(sweep_specs(fair_systems, fair_rates) + [replace(s, rate=float("inf")) for s in fair_systems],
                    args.workers)
    sections.append(("Fairness: starvation prevention on and off", markdown_table(fair), fair))

    report = [f"# Simulated experiments on {args.hardware}\n"]
    for title, table, records in sections:
        report.append(f"## {title}\n\n{table}\n")
        slug = title.split()[0].lower().strip(":")
        (out / f"{slug}.json").write_text(json.dumps(records, indent=2) + "\n")
    text = "\n".join(report)
    (out / "report.md").write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
