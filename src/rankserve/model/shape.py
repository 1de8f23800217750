"""The shape of a Llama-family decoder (GQA attention, gated MLP, RMSNorm) and the arithmetic that
follows from it: parameter counts and KV-cache bytes. One home for both the model (sizing the KV
pool, ``LlamaConfig`` extends it) and the simulator (its cost models' ``ModelSpec``). No torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matrix multiplies: q, k, v, o projections and gate, up, down."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * self.intermediate_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_linear_params(self) -> int:
        """Parameters of the linear layers (the LM head included, even when tied)."""
        return self.num_layers * self.layer_matmul_params + self.lm_head_params

    @property
    def num_params(self) -> int:
        """All parameters, as Hugging Face counts them (8,030,261,248 for Llama-3-8B)."""
        norms = (2 * self.num_layers + 1) * self.hidden_size
        embeddings = self.lm_head_params * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_matmul_params + norms + embeddings

    def weight_bytes_read_per_step(self, dtype_bytes: int) -> int:
        """Bytes of weights a forward pass streams from memory: everything but the embedding table,
        of which only the looked-up rows are read (with tied embeddings the table is read as lm_head)."""
        unread = 0 if self.tie_word_embeddings else self.lm_head_params
        return (self.num_params - unread) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in every layer: 2 x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes
