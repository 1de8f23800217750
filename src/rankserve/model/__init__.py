"""The model layer: weight loading (GGUF -> safetensors cache) and the Llama-family forward with a
paged KV cache. ``llama`` needs torch; importing this package does not."""

from rankserve.model.loader import (
    DEFAULT_MODEL,
    ModelFiles,
    ModelNotFoundError,
    cache_dir,
    load_model,
    load_model_dir,
    load_tokenizer,
)

__all__ = [
    "DEFAULT_MODEL",
    "ModelFiles",
    "ModelNotFoundError",
    "cache_dir",
    "load_model",
    "load_model_dir",
    "load_tokenizer",
]
