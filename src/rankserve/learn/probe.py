"""TRAIL's probe: an MLP over the served model's hidden state that predicts the remaining output
length in bins, refined during decoding by a Bayesian update.

The probe reads one layer's state (the prompt mean at prefill, the current token's state while
decoding) and outputs a distribution over remaining-length bins. Every K decode steps the previous
posterior is moved forward K tokens (a chain that leaves a bin one step shorter with probability
1/bin width per token) and multiplied by the probe's new distribution; between updates the estimate
counts down by one per token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


def bin_edges(kind: str, num_bins: int, max_len: int) -> np.ndarray:
    """Bin edges over [0, max_len]: ``uniform`` (equal width) or ``log`` (geometric from 4 tokens)."""
    if num_bins < 2:
        raise ValueError("a probe needs at least 2 bins")
    if kind == "uniform":
        return np.linspace(0, max_len, num_bins + 1)
    if kind == "log":
        return np.concatenate([[0.0], np.geomspace(4, max_len, num_bins)])
    raise ValueError(f"bin kind must be uniform or log, got {kind!r}")


@dataclass(frozen=True)
class ProbeConfig:
    layer: int = 12
    hidden_size: int = 576
    width: int = 512
    bins: str = "uniform"  # uniform | log
    num_bins: int = 10
    max_len: int = 384
    estimator: str = "mean"  # how the predictor reads a bin distribution: mean or median

    def edges(self) -> np.ndarray:
        return bin_edges(self.bins, self.num_bins, self.max_len)


class Probe(nn.Module):
    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.width), nn.ReLU(),
                                 nn.Linear(config.width, config.num_bins))
        edges = config.edges()
        self.register_buffer("mids", torch.tensor((edges[:-1] + edges[1:]) / 2, dtype=torch.float32))
        self.register_buffer("widths", torch.tensor(np.diff(edges), dtype=torch.float32))
        self.register_buffer("edges", torch.tensor(edges, dtype=torch.float32))
        # Input standardisation, fitted on the training states (hidden states are far from unit scale).
        self.register_buffer("shift", torch.zeros(config.hidden_size))
        self.register_buffer("scale", torch.ones(config.hidden_size))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Bin logits for states [n, hidden]."""
        return self.mlp((states.float() - self.shift) / self.scale)

    @torch.no_grad()
    def probs(self, states: torch.Tensor) -> torch.Tensor:
        return self.forward(states).softmax(-1)

    def targets(self, remaining: torch.Tensor) -> torch.Tensor:
        """Bin index of each remaining length."""
        return (torch.bucketize(remaining.float(), self.edges[1:-1], right=True)).clamp(0, self.config.num_bins - 1)

    def expected(self, probs: torch.Tensor) -> torch.Tensor:
        return probs @ self.mids

    def median(self, probs: torch.Tensor) -> torch.Tensor:
        """The distribution's median, with mass spread evenly inside each bin: the estimate with the
        least expected absolute error (the mean's is least squared error)."""
        cdf = probs.cumsum(-1)
        i = torch.searchsorted(cdf.contiguous(), torch.full_like(cdf[..., :1], 0.5)).clamp(max=probs.shape[-1] - 1)
        below = torch.gather(cdf, -1, i) - torch.gather(probs, -1, i)
        inside = ((0.5 - below) / torch.gather(probs, -1, i).clamp(min=1e-12)).clamp(0.0, 1.0)
        return (self.edges[i] + inside * self.widths[i]).squeeze(-1)

    def estimate(self, probs: torch.Tensor, estimator: str = "mean") -> torch.Tensor:
        """A remaining-length estimate from bin probabilities: ``mean`` or ``median``."""
        if estimator == "mean":
            return self.expected(probs)
        if estimator == "median":
            return self.median(probs)
        raise ValueError(f"estimator must be mean or median, got {estimator!r}")

    def advance(self, posterior: torch.Tensor, tokens: int) -> torch.Tensor:
        """Move a bin distribution ``tokens`` tokens forward: each token, bin i > 0 passes
        1/width_i of its mass to bin i - 1 (the shortest bin keeps its mass)."""
        leave = (1.0 / self.widths).clamp(max=1.0)
        leave = torch.cat([leave.new_zeros(1), leave[1:]])
        p = posterior
        for _ in range(tokens):
            moved = p * leave
            p = p - moved
            p = p + torch.cat([moved[..., 1:], moved.new_zeros(moved.shape[:-1] + (1,))], dim=-1)
        return p

    def update(self, prior: torch.Tensor, probe_probs: torch.Tensor) -> torch.Tensor:
        post = prior * probe_probs
        total = post.sum(-1, keepdim=True)
        # If the two disagree completely, trust the probe (never divide by zero).
        return torch.where(total > 1e-12, post / total.clamp(min=1e-12), probe_probs)

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"mlp.{k}": v.contiguous() for k, v in self.mlp.state_dict().items()}
        tensors.update(shift=self.shift.contiguous(), scale=self.scale.contiguous())
        save_file(tensors, str(path))
        path.with_suffix(".json").write_text(json.dumps({"config": asdict(self.config), **(extra or {})}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        probe = cls(ProbeConfig(**meta["config"]))
        tensors = load_file(str(path))
        probe.mlp.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")})
        probe.shift.copy_(tensors["shift"])
        probe.scale.copy_(tensors["scale"])
        probe.eval()
        return probe


def training_samples(features, layer: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(states [n, hidden], remaining lengths [n], generated counts [n]) of one split: each request's
    prompt mean (0 generated) and its decode states."""
    li = features.layer_index(layer)
    rows = np.flatnonzero(features.split == split)
    dec = np.flatnonzero(np.isin(features.dec_owner, rows))
    states = np.concatenate([features.prompt_mean[rows, li], features.dec_state[dec, li]])
    generated = np.concatenate([np.zeros(len(rows), dtype=np.int64), features.dec_generated[dec]])
    owner = np.concatenate([rows, features.dec_owner[dec]])
    remaining = features.output_len[owner] - generated
    return states.astype(np.float32), remaining.astype(np.float32), generated


def train_probe(config: ProbeConfig, states: np.ndarray, remaining: np.ndarray, epochs: int = 8,
                batch: int = 256, lr: float = 1e-3, seed: int = 0) -> Probe:
    torch.manual_seed(seed)
    probe = Probe(config)
    x = torch.from_numpy(states)
    y = probe.targets(torch.from_numpy(remaining))
    probe.shift.copy_(x.mean(0))
    probe.scale.copy_(x.std(0).clamp(min=1e-4))
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    probe.eval()
    return probe


def refined_estimates(probe: Probe, features, split: str,
                      estimator: str = "mean") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per generated count g: (refined remaining-length estimates, true remaining) over the split's
    requests still running at g. The posterior starts from the prompt-mean probe at g = 0 and is
    updated at every kept state (every K tokens), moved forward by the tokens in between."""
    li = features.layer_index(probe.config.layer)
    rows = np.flatnonzero(features.split == split)
    by_owner: dict[int, list[int]] = {}
    for i in np.flatnonzero(np.isin(features.dec_owner, rows)):
        by_owner.setdefault(int(features.dec_owner[i]), []).append(i)
    result: dict[int, tuple[list[float], list[float]]] = {}
    with torch.no_grad():
        start = probe.probs(torch.from_numpy(features.prompt_mean[rows, li].astype(np.float32)))
        for k, row in enumerate(rows):
            post, last_g = start[k], 0
            length = int(features.output_len[row])
            result.setdefault(0, ([], []))
            result[0][0].append(float(probe.estimate(post, estimator)))
            result[0][1].append(length)
            idx = sorted(by_owner.get(int(row), []), key=lambda i: features.dec_generated[i])
            if idx:
                obs = probe.probs(torch.from_numpy(features.dec_state[idx, li].astype(np.float32)))
            for j, i in enumerate(idx):
                g = int(features.dec_generated[i])
                post = probe.update(probe.advance(post, g - last_g), obs[j])
                last_g = g
                est, true = result.setdefault(g, ([], []))
                est.append(float(probe.estimate(post, estimator)))
                true.append(length - g)
    return {g: (np.array(e), np.array(t)) for g, (e, t) in result.items()}

