"""ModelExecutor: the engine's Executor over a real model (swaps, one mixed-batch forward, sampling)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rankserve.core.request import Request, SamplingParams
from rankserve.core.scheduler import SchedulerOutput
from rankserve.model.llama import LlamaModel, SeqInput, swap_blocks


@dataclass
class HiddenStates:
    """Hidden states tapped at ``layers`` for the requests of the last step, in batch order."""

    layers: tuple[int, ...]
    request_ids: list[str]
    mean: torch.Tensor  # [num_layers, num_requests, hidden] float32: mean over the step's new tokens
    last: torch.Tensor  # [num_layers, num_requests, hidden] float32: the step's last new token


def _new_tokens(req: Request, n: int) -> list[int]:
    start, plen = req.num_computed_tokens, req.prompt_len
    end = start + n
    if start >= plen:
        return req.output_token_ids[start - plen : end - plen]
    toks = list(req.prompt_token_ids[start:end])
    if end > plen:
        toks.extend(req.output_token_ids[: end - plen])
    return toks


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token from ``probs`` by inverting its CDF: one uniform draw and a binary search, ~70 us
    on a 49k vocabulary where ``torch.multinomial`` takes ~1.2 ms. A token of probability 0 is
    never drawn (the search finds the first CDF value above the draw)."""
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, dtype=torch.float64, generator=gen) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[0] - 1)


class Sampler:
    """Greedy at temperature 0; otherwise repetition penalty, temperature, top-k, top-p (HF order)."""

    def __init__(self, seed: int = 0) -> None:
        self._default = torch.Generator().manual_seed(seed)
        # Weak keys: a request's generator goes with the request, however it ended.
        self._per_request: weakref.WeakKeyDictionary[Request, torch.Generator] = weakref.WeakKeyDictionary()

    @staticmethod
    def _too_early_to_stop(req: Request) -> bool:
        """Below ``min_tokens``, stop tokens (EOS among them) must not be sampled."""
        return len(req.output_token_ids) < req.sampling.min_tokens and bool(req.sampling.stop_token_ids)

    @classmethod
    def _plain_greedy(cls, req: Request) -> bool:
        sp = req.sampling
        return (sp.temperature == 0 and sp.repetition_penalty == 1.0 and not sp.logit_bias
                and not cls._too_early_to_stop(req))

    def sample_rows(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """One token per row of ``logits`` [num_requests, vocab]; the plain greedy rows share one
        batched argmax (a per-row argmax costs ~90 us each on a 49k vocabulary)."""
        plain = [self._plain_greedy(r) for r in requests]
        greedy = logits.argmax(-1).tolist() if any(plain) else None
        return [greedy[i] if plain[i] else self.sample(logits[i], r) for i, r in enumerate(requests)]

    def sample(self, logits: torch.Tensor, req: Request) -> int:
        sp: SamplingParams = req.sampling
        logits = logits.float()
        if sp.logit_bias:  # ids were checked against the vocabulary at admission
            ids, biases = zip(*sp.logit_bias)
            logits = logits.index_add(0, torch.tensor(ids), torch.tensor(biases, dtype=logits.dtype))
        if self._too_early_to_stop(req):
            logits = logits.clone()
            logits[[t for t in sp.stop_token_ids if t < logits.shape[-1]]] = float("-inf")
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), dtype=torch.long)
            seen = seen[seen < logits.shape[-1]]
            vals = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
        if sp.temperature == 0:
            return int(logits.argmax())
        logits = logits / sp.temperature
        if sp.top_k > 0 and sp.top_k < logits.shape[-1]:
            kth = torch.topk(logits, sp.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sp.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= sp.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = logits.softmax(-1)
        if sp.seed is not None:
            gen = self._per_request.get(req)
            if gen is None:
                gen = self._per_request[req] = torch.Generator().manual_seed(sp.seed)
        else:
            gen = self._default
        return _draw(probs, gen)


class ModelExecutor:
    """Runs SchedulerOutputs on a LlamaModel with a device KV pool and a host (swap) pool whose
    block counts and block size match the core BlockManager's."""

    def __init__(
        self,
        model: LlamaModel,
        num_device_blocks: int,
        num_host_blocks: int = 0,
        block_size: int = 16,
        hidden_layers: Sequence[int] = (),
        seed: int = 0,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.kv_cache = model.allocate_kv_cache(num_device_blocks, block_size)
        self.host_cache = (model.allocate_kv_cache(num_host_blocks, block_size, device="cpu", zeroed=False)
                           if num_host_blocks else None)
        self.hidden_layers = tuple(hidden_layers)
        self.sampler = Sampler(seed)
        self._hidden: HiddenStates | None = None

    def execute(self, out: SchedulerOutput) -> list[int] | None:
        if out.swap_out or out.swap_in:
            if self.host_cache is None:
                raise RuntimeError("swap requested but the executor has no host pool")
            swap_blocks(out.swap_out, out.swap_in, self.kv_cache, self.host_cache)
        self._hidden = None
        if not out.requests:
            return []
        seqs = [
            SeqInput(_new_tokens(req, n), req.num_computed_tokens, req.block_table)
            for req, n in zip(out.requests, out.num_tokens)
        ]
        fwd = self.model.forward(seqs, self.kv_cache, hidden_layers=self.hidden_layers)
        if fwd.hidden_mean is not None:
            self._hidden = HiddenStates(
                self.hidden_layers, [r.request_id for r in out.requests],
                fwd.hidden_mean.cpu(), fwd.hidden_last.cpu(),  # the predictors run on the CPU
            )
        # Mid-prefill requests sample nothing (-1; the scheduler ignores it). Sampling runs on the
        # CPU: one device-to-host copy per step, and seeded generators give the same tokens on
        # every device.
        rows = [i for i, (req, n) in enumerate(zip(out.requests, out.num_tokens))
                if req.num_computed_tokens + n >= req.num_tokens]
        sampled = [-1] * len(out.requests)
        if rows:
            logits = fwd.logits[rows].cpu() if len(rows) < len(out.requests) else fwd.logits.cpu()
            for i, tok in zip(rows, self.sampler.sample_rows(logits, [out.requests[i] for i in rows])):
                sampled[i] = tok
        return sampled

    def hidden_states(self) -> HiddenStates | None:
        return self._hidden
