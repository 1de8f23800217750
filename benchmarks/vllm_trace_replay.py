"""Replay a trace measured by `rankserve bench` on vLLM's engine in-process, timing every model step:
what vLLM's engine does with the trace, without its HTTP server. Run it with vLLM's python:

    /work/vllm-venv/bin/python benchmarks/vllm_trace_replay.py out/engine_bench/fcfs.json --rate 3 \
        --model ~/.cache/rankserve/models/smollm2-135m-instruct [--passes 2] [--no-prefix-caching]

The requests arrive at the run's send times, with random token ids of the server's prompt lengths
and the run's output lengths (ignore_eos, temperature 1), under engine_bench's limits (16
sequences, 512 batched tokens). Every pass replays the same prompts on the same engine, so the
second pass shows what vLLM's prefix cache does for a prompt it has seen. Prints, per pass, mean
latency per token, TTFT, requests/s and the model steps by tokens scheduled.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

STEP_BINS = ((1, 16), (17, 64), (65, 200), (201, 400), (401, 512))


def replay(engine, prompts: list[list[int]], rows: list[dict], steps: list[tuple[int, float]]) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    arrivals = [r["arrival_s"] for r in rows]
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    steps.clear()
    start, i = time.perf_counter(), 0
    while i < len(rows) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while i < len(rows) and arrivals[i] <= now:
            params = SamplingParams(max_tokens=rows[i]["output_tokens"], ignore_eos=True, temperature=1.0)
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompts[i]), params)
            i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(arrivals[i] - now, 0.05)))
            continue
        for out in engine.step():
            k, t = int(out.request_id), time.perf_counter() - start
            if out.outputs and out.outputs[0].token_ids:
                first.setdefault(k, t)
            if out.finished:
                done[k] = t
    tokens = np.array([s[0] for s in steps])
    seconds = np.array([s[1] for s in steps])
    bins = {}
    for lo, hi in STEP_BINS:
        m = (tokens >= lo) & (tokens <= hi)
        if m.any():
            bins[f"{lo}-{hi}"] = {"steps": int(m.sum()), "mean_ms": float(seconds[m].mean() * 1e3),
                                  "ms_per_token": float(seconds[m].sum() / tokens[m].sum() * 1e3)}
    return {
        "mean_latency_per_token_ms": float(np.mean([(done[k] - arrivals[k]) / rows[k]["output_tokens"]
                                                    for k in done]) * 1e3),
        "mean_ttft_s": float(np.mean([first[k] - arrivals[k] for k in first])),
        "throughput_rps": len(done) / max(done.values()),
        "model_s": float(seconds.sum()),
        "steps_by_tokens": bins,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a LABEL.json written by rankserve bench")
    ap.add_argument("--rate", type=float, required=True, help="which of the run's rates to replay")
    ap.add_argument("--model", required=True, help="the Hugging Face directory the server served")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from vllm import LLM

    record = next(r for r in json.load(open(args.run)) if r["spec"]["rate"] == args.rate)
    rows = [r for r in record["requests"] if r["status"] == "finished"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 49000, r["prompt_tokens"]).tolist() for r in rows]
    llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=True, max_num_seqs=16, max_num_batched_tokens=512,
              max_model_len=2048, seed=0, enable_prefix_caching=not args.no_prefix_caching)
    engine = llm.llm_engine
    executor = engine.engine_core.engine_core.model_executor
    steps: list[tuple[int, float]] = []
    execute = executor.execute_model

    def timed(scheduled, *a, **k):
        started = time.perf_counter()
        result = execute(scheduled, *a, **k)
        steps.append((scheduled.total_num_scheduled_tokens, time.perf_counter() - started))
        return result

    executor.execute_model = timed
    results = []
    for n in range(args.passes):
        res = replay(engine, prompts, rows, steps)
        results.append(res)
        print(f"pass {n + 1}: {res['mean_latency_per_token_ms']:.0f} ms per token, TTFT {res['mean_ttft_s']:.2f} s, "
              f"{res['throughput_rps']:.2f} req/s, model {res['model_s']:.1f} s")
        for name, b in res["steps_by_tokens"].items():
            print(f"  steps of {name} tokens: {b['steps']}, {b['mean_ms']:.0f} ms each, {b['ms_per_token']:.2f} ms/token")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "rate": args.rate, "prefix_caching": not args.no_prefix_caching,
                       "passes": results}, f, indent=2)


if __name__ == "__main__":
    main()
