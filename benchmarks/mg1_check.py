"""The simulator against M/G/1 queueing theory (the table behind tests/test_queueing.py).

    python benchmarks/mg1_check.py [--json out/mg1_check.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rankserve.sim.queueing import THEORY, simulate_mg1

LOADS = {0.5: 30_000, 0.65: 50_000, 0.8: 120_000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("out/mg1_check.json"))
    args = parser.parse_args()
    rows = []
    print("| policy | load | requests | simulated mean (ms) | closed form (ms) | error |")
    print("|---|---|---|---|---|---|")
    for policy in THEORY:
        for rho, n in LOADS.items():
            sim, theory = simulate_mg1(policy, rho, n)
            rows.append({"policy": policy, "load": rho, "requests": n, "simulated_s": sim, "theory_s": theory,
                         "error": sim / theory - 1})
            print(f"| {policy} | {rho} | {n} | {sim * 1e3:.2f} | {theory * 1e3:.2f} | {sim / theory - 1:+.1%} |",
                  flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
