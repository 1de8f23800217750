"""Schemathesis over every operation of /openapi.json: valid and invalid bodies, against the app on
the fake engine with a small context. Zero server errors; every 4xx carries the OpenAI error body."""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from test_engine_loop import make_engine  # noqa: E402
from test_server import CharTokenizer  # noqa: E402

from rankserve.server.app import ServerConfig, build_app  # noqa: E402

MAX_MODEL_LEN = 48  # small: most generated max_tokens overflow it (400), the rest finish fast


ENGINE, _, _ = make_engine(blocks=64)
APP = build_app(ServerConfig("tiny", max_model_len=MAX_MODEL_LEN, vocab_size=50), CharTokenizer(), ENGINE)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=60,
                                deterministic=True)


@pytest.fixture(scope="module", autouse=True)
def _stop_the_engine():
    yield
    ENGINE.shutdown()


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_openai_error_bodies(case):
    response = case.call()
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    if response.status_code >= 400:
        error = json.loads(response.text)["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"], response.text
