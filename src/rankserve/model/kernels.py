"""Which kernel paths the forward runs, chosen by timing them on the machine at hand.

Two choices depend on the CPU (docs/ENGINE.md): from how many input rows a bf16 model's linears
switch to fp32 copies of their weights (faster on AVX-512 CPUs whose bf16 dot product runs at the
fp32 FMA rate, slower where AMX multiplies bf16 tiles), and which kernel decode attention runs over
the gathered KV blocks. ``choose_kernels`` times the candidates once, on the model's own shapes,
and caches the choice in a JSON file keyed by CPU model, CPU flags, torch version, thread count,
dtype and model shape; later starts on the same machine read it back.

Decode attention's candidates: the gathered blocks through torch's flash kernel or two matmuls;
``paged``, which reads the blocks in place (``torch.compile``d); and ``cpp``, a small C++
extension that reads them in place to each sequence's own length (``rankserve.model.cpp_kernels``).
The last two run only where a C++ compiler builds them; each is checked, and built or loaded from
its cache, before it is timed or run.

``RANKSERVE_KERNELS`` forces paths: ``gemm=native|fp32|fp32>=N`` and/or
``attention=flash|matmul|paged|cpp``, comma-separated (e.g. ``gemm=native,attention=flash``); a forced key is
not timed. ``RANKSERVE_KERNEL_CACHE`` moves the cache file (default
``~/.cache/rankserve/kernels.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from rankserve.model.cpu import cpu_identity
from rankserve.model.llama import BUILT_KERNELS, DECODE_ATTENTION, DecodeGroup, KernelChoice, LlamaModel, attention_works

log = logging.getLogger(__name__)

ENV_FORCE = "RANKSERVE_KERNELS"
ENV_CACHE = "RANKSERVE_KERNEL_CACHE"
# Row counts the GEMM paths are timed at: a decode batch's sizes up to a prefill chunk's. The small
# ones matter where bf16 is emulated (AVX2-only CPUs): its cost grows with every row, and the fp32
# copies win from 2-4 rows (SmolLM2, AMD EPYC: 8 rows 17.1 ms bf16 against 6.1 ms fp32).
GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GEMM_LAYERS = 3  # layers cycled through per timing, so weights stream from memory as in a forward
# Decode batches the attention kernels are timed at: (sequences, context tokens).
ATTENTION_SHAPES = ((16, 256), (64, 256))
REPEATS = 5  # the fastest of these interleaved runs counts: a busy machine only adds time


def cache_path() -> Path:
    override = os.environ.get(ENV_CACHE)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "rankserve" / "kernels.json"


def machine_key(model: LlamaModel) -> dict[str, str | int | bool]:
    """What a cached choice holds for: the machine, the torch build, threads, dtype, model shape,
    whether fp32 GEMM copies were a candidate (a model built without them was never timed on them),
    the row counts timed and the attention kernels that existed. Call it before ``use_kernels``,
    which may drop the copies."""
    c = model.cfg
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    return {
        **cpu_identity(), "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."), "fp32_copies": model.lm_head.has_fp32_copy,
        "gemm_rows": ",".join(map(str, GEMM_ROWS)),  # a choice timed at other row counts is timed again
        "attention_kernels": ",".join(DECODE_ATTENTION),  # and one made before a kernel existed
        "shape": f"{c.num_layers}x{c.hidden_size}x{c.intermediate_size}/{c.num_heads}q{c.num_kv_heads}kv{c.head_dim}d/{c.vocab_size}v",
    }


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def parse_forced(text: str) -> dict[str, int | None | str]:
    """``RANKSERVE_KERNELS``'s text as {"fp32_gemm_min_rows": ..., "decode_attention": ...} (the
    keys given only). Raises ValueError naming the bad part."""
    forced: dict[str, int | None | str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key == "gemm":
            if value == "native":
                forced["fp32_gemm_min_rows"] = None
            elif value == "fp32":
                forced["fp32_gemm_min_rows"] = 1
            elif value.startswith("fp32>=") and value[6:].isdigit() and int(value[6:]) >= 1:
                forced["fp32_gemm_min_rows"] = int(value[6:])
            else:
                raise ValueError(f"{ENV_FORCE}: gemm must be native, fp32 or fp32>=N, got '{value}'")
        elif key == "attention":
            if value not in DECODE_ATTENTION:
                raise ValueError(f"{ENV_FORCE}: attention must be one of {', '.join(DECODE_ATTENTION)}, got '{value}'")
            forced["decode_attention"] = value
        else:
            raise ValueError(f"{ENV_FORCE}: unknown key '{key}' (gemm, attention)")
    return forced


def _fastest_of(runs: dict[str, Callable[[], object]], sync: Callable[[], None]) -> dict[str, float]:
    """Seconds of each run's fastest call, the runs interleaved (after one warm-up call each)."""
    best = dict.fromkeys(runs, float("inf"))
    for name, run in runs.items():
        run()
    for _ in range(REPEATS):
        for name, run in runs.items():
            sync()
            started = time.perf_counter()
            run()
            sync()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _sync(model: LlamaModel) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(model.device)) if model.device.type == "cuda" else (lambda: None)


@torch.inference_mode()
def time_gemm(model: LlamaModel, rows: Sequence[int] = GEMM_ROWS) -> dict[int, dict[str, float]]:
    """Seconds of the linears of ``GEMM_LAYERS`` layers at each row count, on the model-dtype
    weights ("native") and on the fp32 copies ("fp32"). The model must hold the copies."""
    linears = model.linears[: 4 * GEMM_LAYERS]  # qkv, o, gate_up, down of the first layers
    out = {}
    for n in rows:
        x16 = {lin.in_features: torch.randn(n, lin.in_features, dtype=model.dtype, device=model.device)
               for lin in linears}
        x32 = {k: x.float() for k, x in x16.items()}
        out[n] = _fastest_of({
            "native": lambda: [lin.run(x16[lin.in_features], False) for lin in linears],
            "fp32": lambda: [lin.run(x32[lin.in_features], True) for lin in linears],
        }, _sync(model))
    return out


def fp32_threshold(timings: dict[int, dict[str, float]]) -> int | None:
    """The smallest row count from which the fp32 copies are faster at every larger count timed;
    None where they are not faster at the largest."""
    threshold = None
    for n in sorted(timings, reverse=True):
        if timings[n]["fp32"] >= timings[n]["native"]:
            break
        threshold = n
    return threshold


def attention_candidates(model: LlamaModel, block_size: int = 16) -> list[str]:
    """The decode attention kernels that run here: those of ``BUILT_KERNELS`` only where they build."""
    return [name for name in DECODE_ATTENTION if attention_works(name, model.cfg, model.dtype, model.device, block_size)]


@torch.inference_mode()
def time_decode_attention(model: LlamaModel, shapes: Sequence[tuple[int, int]] = ATTENTION_SHAPES,
                          block_size: int = 16) -> dict[str, float]:
    """Seconds of one layer's decode attention for each kernel of ``DECODE_ATTENTION`` that runs
    here, summed over ``shapes``, on blocks scattered through a pool as a running engine leaves them."""
    c, dev = model.cfg, model.device
    kv, g, d = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    kernels = {name: DECODE_ATTENTION[name] for name in attention_candidates(model, block_size)}
    total = dict.fromkeys(kernels, 0.0)
    gen = torch.Generator().manual_seed(0)
    for batch, context in shapes:
        per_seq = -(-context // block_size)
        num_blocks = batch * per_seq + 8
        with torch.inference_mode(False):  # a normal tensor, as the engine's pool (a compiled kernel is guarded on it)
            pool = torch.randn(2, kv, num_blocks, block_size, d, generator=gen).to(dev, model.dtype)
        tables = torch.randperm(num_blocks, generator=gen)[: batch * per_seq]
        group = DecodeGroup(
            rows=torch.arange(batch, device=dev),
            blocks=(torch.arange(2 * kv)[:, None] * num_blocks + tables[None, :]).flatten().to(dev),
            mask=(torch.arange(per_seq * block_size) < context).expand(batch, -1)[:, None, None, :].to(dev),
            tables=tables.view(batch, per_seq).to(dev),
            lengths=torch.full((batch,), context, device=dev),
        )
        q = torch.randn(batch, kv, g, d, generator=gen).to(dev, model.dtype)
        runs = {name: (lambda f=f: f(q, pool, group)) for name, f in kernels.items()}
        for name, seconds in _fastest_of(runs, _sync(model)).items():
            total[name] += seconds
    return total


def _measure(model: LlamaModel, forced: dict) -> tuple[KernelChoice, dict]:
    timings: dict = {}
    if "fp32_gemm_min_rows" in forced:
        min_rows = forced["fp32_gemm_min_rows"]
    elif model.lm_head.has_fp32_copy:
        timings["gemm_s"] = time_gemm(model)
        min_rows = fp32_threshold(timings["gemm_s"])
    else:
        min_rows = None
    if "decode_attention" in forced:
        attention = forced["decode_attention"]
    else:
        timings["decode_attention_s"] = time_decode_attention(model)
        attention = min(timings["decode_attention_s"], key=timings["decode_attention_s"].get)
    return KernelChoice(min_rows, attention, "forced" if len(forced) == 2 else "measured"), timings


def choose_kernels(model: LlamaModel, use_cache: bool = True) -> KernelChoice:
    """The kernel paths for ``model`` on this machine: forced by ``RANKSERVE_KERNELS``, else read
    from the cache, else timed now (a few seconds) and cached. Applies the choice to the model and
    returns it. On a GPU nothing is timed: the defaults run (the CUDA path is untested)."""
    forced = parse_forced(os.environ.get(ENV_FORCE, ""))
    attention = forced.get("decode_attention")
    if attention in BUILT_KERNELS and not attention_works(attention, model.cfg, model.dtype, model.device):
        raise ValueError(f"{ENV_FORCE}: attention={attention} cannot run here (it needs {BUILT_KERNELS[attention]}; "
                         "see the warning above)")
    if model.device.type != "cpu":
        choice = KernelChoice(forced.get("fp32_gemm_min_rows"),
                              forced.get("decode_attention", model.kernels.decode_attention),
                              "forced" if forced else "default")
        model.use_kernels(choice)  # fp32 copies are CPU-only: forcing them here raises
        return choice
    key = machine_key(model)
    path, digest = cache_path(), _key_hash(key)
    choice = _cached_choice(_read(path).get(digest), model) if use_cache and not forced else None
    if choice is None:
        started = time.perf_counter()
        choice, timings = _measure(model, forced)
        log.info("kernel timing took %.1f s", time.perf_counter() - started)
        if use_cache and not forced:
            _write(path, digest, key, choice, timings)
    model.use_kernels(choice)
    log.info("kernels on %s (%s threads): gemm %s, decode attention %s (%s); add + norm and SiLU-and-multiply %s",
             key["cpu"], key["threads"], choice.gemm, choice.decode_attention, choice.source,
             "fused (C++)" if model.fused_elementwise else "in torch")
    return choice


def _cached_choice(entry: object, model: LlamaModel) -> KernelChoice | None:
    """A cache entry's choice, if it is well formed and ``model`` can run it."""
    try:
        min_rows, attention = entry["choice"]["fp32_gemm_min_rows"], entry["choice"]["decode_attention"]
    except (KeyError, TypeError):
        return None
    if attention not in DECODE_ATTENTION or not (min_rows is None or (isinstance(min_rows, int) and min_rows >= 1)):
        return None
    if min_rows is not None and not model.lm_head.has_fp32_copy:
        return None
    if attention in BUILT_KERNELS and not attention_works(attention, model.cfg, model.dtype, model.device):
        return None
    return KernelChoice(min_rows, attention, "cached")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, digest: str, key: dict, choice: KernelChoice, timings: dict) -> None:
    """Add one entry; a cache that cannot be written only costs a re-timing next start."""
    data = _read(path)
    data[digest] = {
        "machine": key,
        "choice": {"fp32_gemm_min_rows": choice.fp32_gemm_min_rows, "decode_attention": choice.decode_attention},
        "timings": json.loads(json.dumps(timings)),  # int row keys become strings
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot write the kernel cache %s: %s", path, e)
