"""The ``rankserve`` command: simulate, sweep, serve, calibrate, label, train, eval, bench, bench-report, gateway,
route.

A bad flag value ends in one line naming the flag (argparse's usual ``error: argument --flag:``),
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from rankserve.bench.experiment import PAPER_SYSTEMS, SimSpec, parse_params, parse_system, run_grid, run_spec, sweep_specs
from rankserve.bench.report import markdown_table, plot_latency_vs_rate, summary_line
from rankserve.bench.workloads import ARRIVAL_FORMS, LENGTH_FORMS, arrival_times, sample_lengths
from rankserve.cli.bench import add_bench_commands
from rankserve.cli.calibrate import add_calibrate_command
from rankserve.cli.flags import checked, non_negative, port, positive, positive_int, rate, rates
from rankserve.cli.learn import add_label_command, add_train_commands
from rankserve.cli.route import add_route_commands
from rankserve.core.policies import POLICY_NAMES
from rankserve.engine.build import EngineSettings
from rankserve.learn import LEARNED_NAMES
from rankserve.predict import predictor_names
from rankserve.route.load import ReplicaLoad
from rankserve.route.policies import ROUTER_NAMES, make_router
from rankserve.server import DEFAULT_MAX_QUEUED, DEFAULT_SHUTDOWN_TIMEOUT_S
from rankserve.sim.cluster import TRACKER_PARAMS, parse_hardware_list
from rankserve.sim.cost_model import LOCAL_PRESET, PRESET_NAMES, get_cost_model
from rankserve.sim.machine import cpu_mismatch

class _Parser(argparse.ArgumentParser):
    """Errors in one line (no usage dump): ``rankserve simulate: error: argument --flag: why``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _tau(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"must be in (0, 1), got {text}")
    return value


def _workload(text: str) -> str:
    sample_lengths(text, 1, np.random.default_rng(0))
    return text


def _arrival(text: str) -> str:
    arrival_times(text, 1.0, 1, np.random.default_rng(0))
    return text


def _hardware(text: str) -> str:
    parse_hardware_list(text)
    return text


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", type=checked(_workload), default="sharegpt", help=f"output lengths: {LENGTH_FORMS}")
    p.add_argument("--prompt-len", type=checked(positive_int), default=32, help="prompt tokens (synthetic workloads)")
    p.add_argument("--arrival", type=checked(_arrival), default="poisson", help=f"arrival process: {ARRIVAL_FORMS}")
    p.add_argument("--num-requests", type=checked(positive_int), default=1000)
    p.add_argument("--hardware", type=checked(_hardware), default="a100-llama3-8b",
                   help=f"cost model: {', '.join(PRESET_NAMES)}, {LOCAL_PRESET} (this machine's, from rankserve "
                   "calibrate), a preset file PATH.json, constant:STEP_MS[:PREFILL_MS_PER_TOKEN]; "
                   "per replica: 'NAME xN,NAME xM' (e.g. 'a100-llama3-8b x2,constant:30 x2')")
    p.add_argument("--replicas", type=checked(positive_int), default=None,
                   help="simulate a cluster of this many engines behind a router (default: as many as "
                   "--hardware lists, else 1)")
    p.add_argument("--router-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a router or load-tracker parameter, e.g. memory_aware=false or prefill_weight=0.2 "
                   "for sal (repeatable)")
    p.add_argument("--max-num-seqs", type=checked(positive_int), default=256)
    p.add_argument("--max-num-batched-tokens", type=checked(positive_int), default=2048)
    p.add_argument("--preemption-mode", choices=("swap", "recompute"), default="swap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-k", type=checked(positive_int), default=None,
                   help="synthetic data generation: report the time until any K requests finished")
    p.add_argument("--time-limit", type=checked(positive), default=None,
                   help="synthetic data generation: report how many finished within this many seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rankserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="simulate one policy on a cost model and print its metrics")
    sim.add_argument("--policy", choices=POLICY_NAMES, default="ltr")
    sim.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="a policy parameter, e.g. c=0.8 for trail (repeatable)")
    sim.add_argument("--predictor", choices=predictor_names(), default="oracle")
    sim.add_argument("--target-tau", type=checked(_tau), default=None, help="Kendall's tau for --predictor noisy")
    sim.add_argument("--rate", type=checked(rate), default=10.0, help="requests per second (inf = burst)")
    sim.add_argument("--router", choices=ROUTER_NAMES, default="sal",
                     help="with --replicas > 1: the router (default: sal, least predicted outstanding work)")
    _add_run_options(sim)
    sim.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
    sim.add_argument("--progress", action="store_true", help="show a progress bar")
    sim.set_defaults(run=cmd_simulate, parser=sim)

    sw = sub.add_parser("sweep", help="simulate systems x rates; write a table, JSON and a latency-vs-rate plot")
    sw.add_argument("--systems", nargs="+", default=list(PAPER_SYSTEMS),
                    help="POLICY[:k=v,...][+PREDICTOR[@TAU]] each, e.g. fcfs ltr+oracle ltr+noisy@0.62")
    sw.add_argument("--rates", type=checked(rates), default=[10.0, 16.0, 20.0, 24.0],
                    help="comma-separated request rates")
    sw.add_argument("--routers", nargs="+", choices=ROUTER_NAMES, default=["sal"],
                    help="with --replicas > 1: every system behind each of these routers")
    _add_run_options(sw)
    sw.add_argument("--baseline", default="fcfs", help="system the table compares against")
    sw.add_argument("--out", type=Path, default=Path("out/sweep"), help="directory for sweep.md/.json/.png")
    sw.add_argument("--workers", type=checked(positive_int), default=2, help="parallel processes")
    sw.set_defaults(run=cmd_sweep, parser=sw)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    engine = EngineSettings()  # the defaults live there, shared with Ray Serve and the tests
    sv.add_argument("--model", default=engine.model,
                    help="a local Hugging Face directory (Llama, Qwen2); default: the embedded SmolLM2-135M-Instruct")
    sv.add_argument("--served-model-name", default=None, help="the model name clients use (default: the model's)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=checked(port), default=8000)
    sv.add_argument("--dtype", choices=("bfloat16", "float32"), default=engine.dtype)
    sv.add_argument("--policy", choices=POLICY_NAMES, default=engine.policy,
                    help="scheduling policy (default: learning to rank with starvation prevention)")
    sv.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="a policy parameter, e.g. starvation_prevention=false for ltr (repeatable)")
    # Oracle predictors need known output lengths, which live requests do not have.
    sv.add_argument("--predictor", choices=(*LEARNED_NAMES, "prompt-len", "oracle"), default=engine.predictor, help="length predictor for sjf/srpt/ltr/trail (default: the trained ranker; "
                    "oracle: only for replayed traces, where ignore_eos requests' max_tokens is the length)")
    sv.add_argument("--predictor-weights", default=None,
                    help="trained weights (.safetensors) for --predictor; default: the shipped ones")
    sv.add_argument("--record-lengths", type=Path, default=None, metavar="PATH",
                    help="record every finished request (token counts, finish reason, the ranker's prompt "
                    "features) in this SQLite file, for `rankserve train ranker --from-records PATH`")
    sv.add_argument("--step-log", type=Path, default=None, metavar="PATH",
                    help="append one JSON line per engine step (its shape and seconds) to this file, for "
                    "`rankserve calibrate --from-steps PATH`: fit the simulator on served traffic")
    sv.add_argument("--record-prompts", action="store_true",
                    help="with --record-lengths: also keep each prompt's text (off: only its features and digest)")
    sv.add_argument("--max-num-seqs", type=checked(positive_int), default=engine.max_num_seqs)
    sv.add_argument("--max-num-batched-tokens", type=checked(positive_int), default=engine.max_num_batched_tokens)
    sv.add_argument("--kv-cache-gb", type=checked(positive), default=engine.kv_cache_gb,
                    help="device KV cache size (GiB)")
    sv.add_argument("--swap-space-gb", type=checked(non_negative), default=engine.swap_space_gb,
                    help="host swap space (GiB)")
    sv.add_argument("--preemption-mode", choices=("swap", "recompute"), default=engine.preemption_mode)
    sv.add_argument("--max-model-len", type=checked(positive_int), default=engine.max_model_len)
    sv.add_argument("--scoring-thread", action=argparse.BooleanOptionalAction, default=engine.scoring_thread,
                    help="score arrivals on a thread beside the steps instead of between them (default: "
                         "between; on a Xeon with AMX the thread slowed a burst's later steps 1.4x)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    sv.add_argument("--max-queued", type=checked(positive_int), default=DEFAULT_MAX_QUEUED,
                    help="answer 429 beyond this many waiting requests")
    sv.add_argument("--seed", type=int, default=engine.seed)
    sv.add_argument("--shutdown-timeout", type=checked(non_negative), default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                    help="on SIGTERM/SIGINT, seconds to let requests in flight finish before aborting them")
    sv.set_defaults(run=cmd_serve, parser=sv)

    add_calibrate_command(sub)
    add_label_command(sub)
    add_train_commands(sub)
    add_bench_commands(sub)
    add_route_commands(sub)
    return parser


def warn_other_cpu(hardware: str, prog: str) -> None:
    """On stderr, for each CPU preset in ``hardware`` fitted on another CPU than this one: its step
    times describe that CPU's engine, not this one's."""
    for name in dict.fromkeys(parse_hardware_list(hardware)):
        why = cpu_mismatch(get_cost_model(name).fitted_on)
        if why:
            print(f"{prog}: warning: --hardware {name} was {why}; run `rankserve calibrate` and use "
                  f"--hardware {LOCAL_PRESET} to simulate this machine", file=sys.stderr)


def _base_spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SimSpec:
    try:
        replicas = len(parse_hardware_list(args.hardware, args.replicas))
    except ValueError as exc:
        parser.error(f"argument --replicas: {exc}")
    warn_other_cpu(args.hardware, parser.prog)
    try:
        router_params = parse_params(",".join(args.router_arg))
    except ValueError as exc:
        parser.error(f"argument --router-arg: {exc}")
    return SimSpec(
        workload=args.workload,
        prompt_len=args.prompt_len,
        arrival=args.arrival,
        num_requests=args.num_requests,
        hardware=args.hardware,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        preemption_mode=args.preemption_mode,
        seed=args.seed,
        first_k=args.first_k,
        time_limit_s=args.time_limit,
        replicas=replicas,
        router_params=router_params,
    )


def _validate(spec: SimSpec, parser: argparse.ArgumentParser, flag: str) -> None:
    """Build the spec's policy and predictor once so a bad combination fails before running."""
    from rankserve.core.policies import make_policy

    try:
        policy = make_policy(spec.policy, **spec.policy_params)
    except ValueError as exc:
        parser.error(f"argument {flag}: {exc}")
    if policy.needs_prediction and spec.predictor == "noisy" and spec.target_tau is None:
        parser.error(f"argument {flag}: predictor 'noisy' needs a target tau (--target-tau, or noisy@TAU)")
    if spec.predictor not in predictor_names():
        parser.error(f"argument {flag}: unknown predictor {spec.predictor!r} (choose from {', '.join(predictor_names())})")
    if spec.predictor in LEARNED_NAMES and policy.needs_prediction:
        from rankserve.learn.predictors import default_weights

        if not spec.workload.startswith("sharegpt"):
            parser.error(f"argument {flag}: predictor {spec.predictor!r} reads prompt text: use --workload sharegpt[:test]")
        if spec.predictor == "probe":
            parser.error(f"argument {flag}: the probe reads the served model's hidden states; simulation has none")
        if not default_weights(spec.predictor, "reference").is_file():
            parser.error(f"argument {flag}: no trained weights for {spec.predictor!r} (see docs/PREDICTORS.md)")
    if spec.is_cluster:
        try:
            make_router(spec.router, **{k: v for k, v in spec.router_params.items() if k not in TRACKER_PARAMS})
            ReplicaLoad(**{k: v for k, v in spec.router_params.items() if k in TRACKER_PARAMS})
        except ValueError as exc:
            parser.error(f"argument --router-arg: {exc}")
    if spec.first_k is not None and spec.first_k > spec.num_requests:
        parser.error(f"argument --first-k: {spec.first_k} is more than --num-requests {spec.num_requests}")


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")


def replica_lines(cluster: dict) -> str:
    """One line per replica: its share of the requests and of the work, and its latency."""
    lines = [f"router {cluster['router']}: imbalance (max/mean busy time) "
             f"{cluster['imbalance']['busy_max_over_mean']:.3f}"]
    for r in cluster["replicas"]:
        lines.append(f"  {r['name']}: {r['requests']} requests, {r['output_tokens']} output tokens, "
                     f"utilization {r['utilization']:.2f}, mean latency {r['mean_latency_s']:.2f} s, "
                     f"p99 {r['p99_latency_s']:.2f} s")
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        params = parse_params(",".join(args.policy_arg))
    except ValueError as exc:
        parser.error(f"argument --policy-arg: {exc}")
    spec = replace(
        _base_spec(args, parser),
        router=args.router,
        policy=args.policy,
        policy_params=params,
        predictor=args.predictor,
        target_tau=args.target_tau,
        rate=args.rate,
    )
    _validate(spec, parser, "--policy-arg" if params else "--predictor")
    record, _ = run_spec(spec, progress=args.progress)
    print(summary_line(record))
    if record["predictor"].get("achieved_tau") is not None:
        print(f"noisy predictor: target tau {spec.target_tau:g}, achieved {record['predictor']['achieved_tau']:.3f}")
    flat = dict(record["summary"], system=record["system"], spec=record["spec"], predictor=record["predictor"],
                sim=record["sim"])
    if "cluster" in record:
        print(replica_lines(record["cluster"]))
        flat["cluster"] = record["cluster"]
    if args.json is not None:
        _write_json(args.json, flat)
    return 0


def cmd_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    base = _base_spec(args, parser)
    systems = []
    for text in args.systems:
        try:
            system = parse_system(text, base)
        except ValueError as exc:
            parser.error(f"argument --systems: {exc}")
        _validate(system, parser, "--systems")
        systems.append(system)
    routers = args.routers if base.is_cluster else []
    specs = sweep_specs(systems, args.rates, routers)
    cluster = f" x {len(routers)} routers" if routers else ""
    print(f"simulating {len(systems)} systems{cluster} x {len(args.rates)} rates on {args.hardware} "
          f"({args.num_requests} {args.workload} requests each, {args.workers} workers)", flush=True)
    records = run_grid(specs, args.workers)
    table = markdown_table(records, baseline=args.baseline if any(r["system"] == args.baseline for r in records) else None)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.md").write_text(table + "\n")
    _write_json(args.out / "sweep.json", records)
    rates_finite = all(math.isfinite(r) for r in args.rates)
    if rates_finite and len(args.rates) > 1:
        plot_latency_vs_rate(records, args.out / "sweep.png", f"{args.hardware}, {args.workload}, {args.arrival}")
        print(f"wrote {args.out / 'sweep.md'}, {args.out / 'sweep.json'}, {args.out / 'sweep.png'}")
    else:
        print(f"wrote {args.out / 'sweep.md'}, {args.out / 'sweep.json'}")
    return 0


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rankserve.core.policies import POLICIES, make_policy
    from rankserve.model.loader import ModelNotFoundError
    from rankserve.server.serve import ModelLoadError, serve

    policy = POLICIES[args.policy]
    try:
        policy_params = parse_params(",".join(args.policy_arg))
        make_policy(args.policy, **policy_params)
    except ValueError as exc:
        parser.error(f"argument --policy-arg: {exc}")
    if policy.needs_lengths and args.predictor == "ranker":
        parser.error(f"argument --predictor: policy '{args.policy}' needs predicted lengths; the ranker only "
                     "ranks (use classifier, regressor or probe)")
    if policy.needs_prediction and args.predictor in LEARNED_NAMES:
        from rankserve.learn.predictors import default_weights

        weights = Path(args.predictor_weights) if args.predictor_weights else default_weights(args.predictor)
        if not weights.is_file():
            parser.error(f"argument --predictor-weights: {weights} does not exist (see docs/PREDICTORS.md)")
    if args.record_prompts and args.record_lengths is None:
        parser.error("argument --record-prompts: only with --record-lengths PATH")
    if args.record_lengths is not None and not args.record_lengths.parent.is_dir():
        parser.error(f"argument --record-lengths: {args.record_lengths.parent} is not a directory")
    if args.step_log is not None:
        try:
            args.step_log.open("a").close()  # can be written: fails here, not once the model has loaded
        except OSError as exc:
            parser.error(f"argument --step-log: {exc}")
    settings = EngineSettings(
        model=args.model, dtype=args.dtype, policy=args.policy, policy_params=policy_params,
        predictor=args.predictor,
        predictor_weights=args.predictor_weights,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gb=args.kv_cache_gb, swap_space_gb=args.swap_space_gb,
        preemption_mode=args.preemption_mode, max_model_len=args.max_model_len, seed=args.seed,
        scoring_thread=args.scoring_thread, step_log=args.step_log,
    )
    try:
        serve(settings, args.host, args.port, args.api_key, args.max_queued, args.served_model_name,
              args.shutdown_timeout, args.record_lengths, args.record_prompts)
    except (ModelNotFoundError, ValueError) as exc:
        parser.error(f"argument --model: {exc}")
    except ModelLoadError as exc:
        print(f"rankserve serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
