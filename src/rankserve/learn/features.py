"""The served model's hidden states for labelled requests, recomputed by teacher forcing.

``rankserve label`` keeps every generated token; feeding prompt + output back through our forward
pass gives exactly the states the engine's taps would have handed the probe while generating: the
mean over the prompt's tokens, and the state of the current token after ``g`` generated tokens
(the input of the step that samples token ``g + 1``). Each request is fed in chunks that end at
those positions, so one forward pass per position yields them as the chunk's last-token tap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankserve.learn.labels import read_labels, read_tokens
from rankserve.learn.sharegpt import load_prompts
from rankserve.model.loader import load_model, load_tokenizer
from rankserve.model.tokenizer import HFTextTokenizer

#: Layers tapped for the probe's layer sweep (SmolLM2 has 30).
SWEEP_LAYERS = (4, 8, 12, 16, 20, 24, 30)


def decode_points(every: int, max_generated: int) -> tuple[int, ...]:
    """Generated-token counts at which states are kept: 1, then every ``every`` tokens."""
    return tuple(sorted({1, *range(every, max_generated + 1, every)}))


@dataclass
class FeatureSet:
    layers: tuple[int, ...]
    conv_id: np.ndarray  # [R] str
    seed: np.ndarray  # [R]
    split: np.ndarray  # [R] "train" / "test"
    output_len: np.ndarray  # [R]
    prompt_mean: np.ndarray  # [R, L, H] float16
    dec_owner: np.ndarray  # [S] row of the request
    dec_generated: np.ndarray  # [S] tokens generated when the state was taken
    dec_state: np.ndarray  # [S, L, H] float16

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, layers=np.array(self.layers), **{k: getattr(self, k) for k in _ARRAYS})

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        with np.load(path) as f:
            return cls(tuple(int(x) for x in f["layers"]), *(f[k] for k in _ARRAYS))

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not tapped (have {list(self.layers)})")
        return self.layers.index(layer)


_ARRAYS = ("conv_id", "seed", "split", "output_len", "prompt_mean", "dec_owner", "dec_generated", "dec_state")


def extract_features(
    label_csv: str | Path,
    layers: Sequence[int] = SWEEP_LAYERS,
    every: int = 8,
    max_generated: int = 256,
    splits: dict[str, int] | None = None,
    batch: int = 32,
    model: str | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Teacher-forced states for the first seed's requests of ``label_csv``; ``splits`` caps how
    many requests of each split are used (e.g. ``{"train": 2000, "test": 1000}``)."""
    import torch
    from tqdm import tqdm

    from rankserve.model.llama import SeqInput  # imports torch

    labels = read_labels(label_csv)
    tokens = read_tokens(label_csv)
    seed0 = min(r.seed for r in labels.rows)
    rows = []
    for split, cap in (splits or {"train": None, "test": None}).items():
        rows.extend([r for r in labels.rows if r.seed == seed0 and r.split == split][:cap])
    files, net = load_model(model, dtype=torch.bfloat16)
    tok = HFTextTokenizer(load_tokenizer(files))
    texts = {p.conv_id: p.text for p in load_prompts()}
    points = decode_points(every, max_generated)
    bs = 16
    max_ctx = max(r.prompt_len for r in rows) + max_generated + bs
    blocks_per_seq = -(-max_ctx // bs)
    cache = net.allocate_kv_cache(batch * blocks_per_seq, bs)

    prompt_mean, dec_owner, dec_generated, dec_state = [], [], [], []
    for start in tqdm(range(0, len(rows), batch), desc="features", unit="batch", disable=not progress):
        part = rows[start : start + batch]
        seqs = []
        for j, r in enumerate(part):
            prompt = tok.apply_chat_template([{"role": "user", "content": texts[r.conv_id]}])
            if len(prompt) != r.prompt_len:
                raise RuntimeError(f"{r.conv_id}: prompt has {len(prompt)} tokens, the labels say {r.prompt_len}")
            out_ids = tokens[(r.conv_id, r.seed)]
            # Chunk ends (exclusive) in the full sequence: the prompt, then each decode point.
            ends = [r.prompt_len] + [r.prompt_len + g for g in points if g < len(out_ids)]
            seqs.append((j, prompt + out_ids, ends, list(range(j * blocks_per_seq, (j + 1) * blocks_per_seq))))
        means = {}
        for step in range(max(len(s[2]) for s in seqs)):
            live = [s for s in seqs if step < len(s[2])]
            inputs = []
            for _, ids, ends, table in live:
                begin = 0 if step == 0 else ends[step - 1]
                inputs.append(SeqInput(ids[begin : ends[step]], begin, table))
            fwd = net.forward(inputs, cache, hidden_layers=layers)
            for k, (j, _, ends, _) in enumerate(live):
                if step == 0:
                    means[j] = fwd.hidden_mean[:, k].numpy().astype(np.float16)
                else:
                    dec_owner.append(start + j)
                    dec_generated.append(ends[step] - part[j].prompt_len)
                    dec_state.append(fwd.hidden_last[:, k].numpy().astype(np.float16))
        prompt_mean.extend(means[j] for j in range(len(part)))
    hidden = net.cfg.hidden_size
    return FeatureSet(
        tuple(layers),
        np.array([r.conv_id for r in rows]), np.array([r.seed for r in rows]), np.array([r.split for r in rows]),
        np.array([r.output_len for r in rows]), np.stack(prompt_mean),
        np.array(dec_owner, dtype=np.int32), np.array(dec_generated, dtype=np.int32),
        np.stack(dec_state) if dec_state else np.zeros((0, len(layers), hidden), np.float16),
    )
