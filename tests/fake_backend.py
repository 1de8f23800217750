"""A small OpenAI-compatible fake for the router's tests: streams ``max_tokens`` tokens ("tok0 tok1
..."), fails on request, and records what it received and which clients went away.

Behaviour is asked for in the request body (the router forwards unknown fields unchanged):
``fake_delay`` (seconds between tokens), ``fake_first_delay`` (before the first; or a dict: backend
name -> seconds), ``fake_status`` +
``fake_error`` (answer that error). ``GET /fake/log`` returns the log; ``POST /fake/health`` sets
the /health status and ``POST /fake/kv`` the reported KV usage.

Run alone (``python tests/fake_backend.py PORT NAME``) it is a process the tests can kill.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

KV_BLOCKS, BLOCK_SIZE = 100, 16


def build_fake_app(name: str = "fake") -> FastAPI:
    app = FastAPI()
    log = {"name": name, "received": [], "disconnected": [], "completed": [], "sent": {}}
    state = {"health": 200, "kv": 0.0}
    app.state.log, app.state.fake = log, state

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=state["health"])

    @app.post("/fake/health")
    async def set_health(http: Request) -> dict:
        state["health"] = (await http.json())["status"]
        return {}

    @app.post("/fake/kv")
    async def set_kv(http: Request) -> dict:
        state["kv"] = (await http.json())["usage"]
        return {}

    @app.get("/fake/log")
    async def get_log() -> dict:
        return log

    @app.get("/metrics")
    async def metrics() -> Response:
        text = (f'vllm:kv_cache_usage_perc{{model_name="{name}"}} {state["kv"]}\n'
                f'vllm:cache_config_info{{block_size="{BLOCK_SIZE}",num_gpu_blocks="{KV_BLOCKS}"}} 1.0\n')
        return Response(text, media_type="text/plain")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    async def generate(http: Request, chat: bool) -> Response:
        body = await http.json()
        rid = body.get("fake_id", str(len(log["received"])))
        log["received"].append(body)
        if "fake_status" in body:
            return JSONResponse({"error": {"message": body.get("fake_error", "fake failure"), "type": "fake",
                                           "param": None, "code": body["fake_status"]}},
                                status_code=body["fake_status"])
        n = body.get("max_tokens") or 4
        delay, first_delay = body.get("fake_delay", 0.0), body.get("fake_first_delay", 0.0)
        if isinstance(first_delay, dict):  # {backend name: delay}
            first_delay = first_delay.get(name, 0.0)
        head = {"id": rid, "created": int(time.time()), "model": name}

        def chunk(i: int) -> dict:
            text = f"tok{i} "
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": None} if chat
                      else {"index": 0, "text": text, "finish_reason": None})
            return {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}

        if not body.get("stream"):
            await asyncio.sleep(first_delay)
            for _ in range(n):
                if await http.is_disconnected():
                    log["disconnected"].append(rid)
                    return Response(status_code=499)
                await asyncio.sleep(delay)
            text = "".join(f"tok{i} " for i in range(n))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})
            log["completed"].append(rid)
            return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": n,
                                                                "total_tokens": 3 + n}})

        async def events():
            sent = log["sent"].setdefault(rid, [])
            try:
                await asyncio.sleep(first_delay)
                for i in range(n):
                    event = f"data: {json.dumps(chunk(i))}\n\n"
                    sent.append(event)
                    yield event
                    await asyncio.sleep(delay)
                sent.append("data: [DONE]\n\n")
                yield "data: [DONE]\n\n"
                log["completed"].append(rid)
            except asyncio.CancelledError:
                log["disconnected"].append(rid)
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: Request) -> Response:
        return await generate(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Response:
        return await generate(http, chat=True)

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build_fake_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
