"""Is `ltr` never worse than FCFS? A simulated grid of length spread x predictor quality x load.

    python benchmarks/robust_ltr_grid.py [--hardware cpu-smollm2-135m a100-llama3-8b]
        [--sigmas 0.3,0.6,0.9,1.5] [--taus 0.2,0.45,0.7,0.9] [--loads burst,0.8,1.2]
        [--system ltr] [--out out/robust_ltr_grid] [--plot docs/img/robust-ltr-grid.png]
        [--from-json out/robust_ltr_grid/grid.json]

For each hardware preset and log-normal sigma, FCFS first serves a burst; its completion rate
while the batch is full is the capacity, and the Poisson loads are fractions of it. Then
``--system`` with the noisy oracle at each Kendall's tau serves the same requests (same seed).
Prints, per cell, ``--system``'s mean latency and mean latency per token as ratios to FCFS's
(above 1 = worse than FCFS), writes every record as JSON and, with ``--plot``, a heatmap of the
worse of the two ratios.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from rankserve.bench.experiment import SimSpec, parse_system, run_grid
from rankserve.sim.machine import cpu_model

# Per hardware: the regime of the issue (CPU: SmolLM2 serving ShareGPT-like lengths scaled by a
# quarter, 16 sequences) and the paper's (A100: Llama-3-8B, 256 sequences).
SETUPS = {
    "cpu-smollm2-135m": {"mean": 68, "prompt_len": 100, "max_num_seqs": 16, "max_num_batched_tokens": 512,
                         "burst": 120, "poisson": 400},
    "a100-llama3-8b": {"mean": 250, "prompt_len": 200, "max_num_seqs": 256, "max_num_batched_tokens": 2048,
                       "burst": 2000, "poisson": 2000},
}
METRICS = ("mean_latency_s", "mean_latency_per_token_s")


def base_spec(hardware: str, sigma: float, seed: int) -> SimSpec:
    setup = SETUPS[hardware]
    return SimSpec(policy="fcfs", predictor=None, workload=f"lognormal:{setup['mean']}:{sigma:g}",
                   prompt_len=setup["prompt_len"], hardware=hardware, max_num_seqs=setup["max_num_seqs"],
                   max_num_batched_tokens=setup["max_num_batched_tokens"], seed=seed)


def at_load(spec: SimSpec, load: str, capacity: float, hardware: str) -> SimSpec:
    """``spec`` as a burst, or as Poisson arrivals at ``load`` x ``capacity`` req/s."""
    setup = SETUPS[hardware]
    if load == "burst":
        return replace(spec, arrival="burst", rate=float("inf"), num_requests=setup["burst"])
    return replace(spec, arrival="poisson", rate=float(load) * capacity, num_requests=setup["poisson"])


def grid_specs(args: argparse.Namespace, capacities: dict) -> list[tuple[dict, SimSpec]]:
    """(cell, spec) for FCFS and every tau in every cell."""
    specs = []
    for hardware in args.hardware:
        for sigma in args.sigmas:
            base = base_spec(hardware, sigma, args.seed)
            for load in args.loads:
                cell = {"hardware": hardware, "sigma": sigma, "load": load}
                spec = at_load(base, load, capacities[(hardware, sigma)], hardware)
                specs.append(({**cell, "tau": None}, spec))
                for tau in args.taus:
                    system = parse_system(f"{args.system}+noisy@{tau:g}", spec)
                    specs.append(({**cell, "tau": tau}, system))
    return specs


def ratios(records: list[dict]) -> list[dict]:
    """Each non-FCFS record's metrics as ratios to the FCFS record of its cell."""
    fcfs = {(r["cell"]["hardware"], r["cell"]["sigma"], r["cell"]["load"]): r for r in records
            if r["cell"]["tau"] is None}
    rows = []
    for r in records:
        cell = r["cell"]
        if cell["tau"] is None:
            continue
        base = fcfs[(cell["hardware"], cell["sigma"], cell["load"])]["summary"]
        row = {**cell, "achieved_tau": r["predictor"].get("achieved_tau"),
               "preemptions": r["summary"]["preemptions"]}
        for m in METRICS:
            row[m] = r["summary"][m] / base[m]
        row["worst"] = max(row[m] for m in METRICS)
        rows.append(row)
    return rows


def print_table(rows: list[dict], system: str) -> None:
    print(f"\n{system} / fcfs (mean latency, mean latency per token; > 1 = worse than FCFS); CPU: {cpu_model()}")
    print("| hardware | sigma | load | tau (achieved) | mean latency | mean lat/tok | preemptions |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hardware']} | {r['sigma']:g} | {r['load']} | {r['tau']:g} ({r['achieved_tau']:.2f}) "
              f"| {r['mean_latency_s']:.3f} | {r['mean_latency_per_token_s']:.3f} | {r['preemptions']:.0f} |")
    worst = max(rows, key=lambda r: r["worst"])
    print(f"\nworst cell: {worst['hardware']} sigma {worst['sigma']:g} load {worst['load']} tau {worst['tau']:g}: "
          f"{worst['worst']:.3f}x FCFS; cells above 1.03: {sum(r['worst'] > 1.03 for r in rows)} of {len(rows)}")


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    panels = [(h, load) for h in args.hardware for load in args.loads]
    fig, axes = plt.subplots(len(args.hardware), len(args.loads), figsize=(3.6 * len(args.loads),
                             3.6 * len(args.hardware)), squeeze=False, constrained_layout=True)
    for ax, (hardware, load) in zip(axes.flat, panels):
        grid = np.full((len(args.sigmas), len(args.taus)), np.nan)
        for r in rows:
            if r["hardware"] == hardware and r["load"] == load:
                grid[args.sigmas.index(r["sigma"]), args.taus.index(r["tau"])] = r["worst"]
        # Parity with FCFS is the neutral colour: green better, red worse.
        image = ax.imshow(grid, cmap="RdYlGn_r", norm=TwoSlopeNorm(1.0, 0.2, 1.3), origin="lower")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(args.taus)), [f"{t:g}" for t in args.taus])
        ax.set_yticks(range(len(args.sigmas)), [f"{s:g}" for s in args.sigmas])
        ax.set_xlabel("predictor tau")
        if ax in axes[:, 0]:
            ax.set_ylabel("length sigma")
        name = "burst" if load == "burst" else f"Poisson {float(load):.0%} of capacity"
        ax.set_title(f"{hardware}\n{name}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label=f"{args.system} / fcfs, the worse of mean latency and per token")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", nargs="+", default=list(SETUPS), choices=sorted(SETUPS))
    parser.add_argument("--sigmas", type=floats, default=[0.3, 0.6, 0.9, 1.5])
    parser.add_argument("--taus", type=floats, default=[0.2, 0.45, 0.7, 0.9])
    parser.add_argument("--loads", type=lambda t: t.split(","), default=["burst", "0.8", "1.2"],
                        help="burst and/or Poisson loads as fractions of FCFS's burst throughput")
    parser.add_argument("--system", default="ltr", help="POLICY[:k=v,...] run with the noisy oracle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/robust_ltr_grid"))
    parser.add_argument("--plot", type=Path, default=None, help="heatmap PNG")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="a grid.json of an earlier run: print and plot it, run nothing")
    args = parser.parse_args()
    if args.from_json is not None:
        rows = json.loads(args.from_json.read_text())["rows"]
        print_table(rows, args.system)
        if args.plot is not None:
            plot(rows, args.plot, args)
        return
    for load in args.loads:
        if load != "burst":
            try:
                float(load)
            except ValueError:
                parser.error(f"argument --loads: {load!r} is neither 'burst' nor a number")
    parse_system(args.system, SimSpec())  # a bad --system fails here, before any run

    # Capacity: FCFS's completion rate on a burst while the batch is full (until all but
    # max_num_seqs have finished); the whole burst's throughput would count the long tail's drain.
    cap_specs = []
    for h in args.hardware:
        for s in args.sigmas:
            burst = at_load(base_spec(h, s, args.seed), "burst", 0.0, h)
            cap_specs.append(((h, s), replace(burst, first_k=burst.num_requests - burst.max_num_seqs)))
    cap_records = run_grid([spec for _, spec in cap_specs], args.workers)
    capacities = {key: rec["summary"]["first_k_throughput_rps"] for (key, _), rec in zip(cap_specs, cap_records)}

    cells = grid_specs(args, capacities)
    records = run_grid([spec for _, spec in cells], args.workers)
    for (cell, _), record in zip(cells, records):
        record["cell"] = cell
        record["capacity_req_s"] = capacities[(cell["hardware"], cell["sigma"])]
    rows = ratios(records)
    print_table(rows, args.system)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grid.json").write_text(json.dumps({"cpu": cpu_model(), "system": args.system,
                                                    "rows": rows, "records": records}, indent=1) + "\n")
    print(f"\nwrote {args.out / 'grid.json'}")
    if args.plot is not None:
        plot(rows, args.plot, args)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
