"""``rankserve gateway`` / ``rankserve route`` on the command line: a bad flag is one line naming it;
the command serves in front of backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import wait_until
from test_route_failover import fake_process, free_port, healthy

from rankserve.cli.main import main
from rankserve.route.scoring import choose_predictor

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize("argv, flag", [
    (["route", "--backend", "localhost:8000"], "--backend"),
    (["route", "--backend", "http://a:1", "--router", "fastest"], "--router"),
    (["route", "--backend", "http://a:1", "--backend", "http://a:1/v1"], "--backend"),
    (["gateway", "--backend", "http://a:1", "--mode", "header"], "--mode"),
    (["gateway", "--backend", "http://a:1", "--health-interval", "0"], "--health-interval"),
    (["gateway", "--backend", "http://a:1", "--max-retries", "-1"], "--max-retries"),
    (["gateway", "--backend", "http://a:1", "--port", "70000"], "--port"),
    (["gateway", "--backend", "http://a:1", "--tokenizer", "/no/such/model"], "--tokenizer"),
    (["gateway"], "--backend"),
])
def test_a_bad_flag_is_one_line_naming_it(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and flag in err, err


def test_auto_predictor_follows_the_router_and_mode():
    assert choose_predictor("auto", "sal", "none") == "classifier"
    assert choose_predictor("auto", "round-robin", "priority") == "ranker"
    assert choose_predictor("auto", "least-requests", "none") is None
    assert choose_predictor("regressor", "sal", "none") == "regressor" and choose_predictor("none", "sal", "xargs") is None


def test_rankserve_route_serves_in_front_of_two_backends():
    with fake_process("A") as (_, a), fake_process("B") as (_, b):
        port = free_port()
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen([sys.executable, "-m", "rankserve.cli.main", "route", "--backend", a, "--backend",
                                 b + "/v1", "--router", "round-robin", "--port", str(port), "--tokenizer", "approx",
                                 "--predictor", "none"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            assert wait_until(lambda: healthy(url), 60), proc.stderr.read1().decode() if proc.poll() is not None else "no answer"
            models = [httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()["model"]
                      for _ in range(4)]
            assert models == ["A", "B", "A", "B"]
        finally:
            proc.terminate()
            proc.wait(10)
