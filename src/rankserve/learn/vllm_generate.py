"""Generate with vLLM offline; run as a script by the python of a venv that has ``vllm`` installed.

It imports nothing from rankserve (that venv need not have it). Input: a JSON file with the model
path, engine settings and jobs ``{"id", "prompt_token_ids"}``; output: a JSON file mapping
each id to its generated token ids and finish reason. ``rankserve label --backend vllm`` drives it.

    python vllm_generate.py IN.json OUT.json
"""

import json
import sys
import time


def main(in_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.load(open(in_path))
    s = spec["sampling"]
    llm = LLM(model=spec["model_path"], dtype=spec["dtype"], enforce_eager=True, max_num_seqs=spec["max_num_seqs"],
              max_model_len=spec["max_model_len"], seed=spec["seed"])
    jobs = spec["jobs"]
    params = [
        SamplingParams(max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                       top_k=s["top_k"] or -1, repetition_penalty=s["repetition_penalty"],
                       stop_token_ids=s["stop_token_ids"], detokenize=False)
        for _ in jobs
    ]
    # vLLM-CPU has no per-request seeds ("CPU Generator does not use offset"): one engine seed per run.
    started = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=j["prompt_token_ids"]) for j in jobs], params, use_tqdm=True)
    wall = time.perf_counter() - started
    results = {
        job["id"]: {"token_ids": list(o.outputs[0].token_ids), "finish": o.outputs[0].finish_reason}
        for job, o in zip(jobs, outs)
    }
    import vllm

    json.dump({"vllm_version": vllm.__version__, "wall_s": wall, "results": results}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
