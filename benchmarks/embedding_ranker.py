"""The second ranker backbone: the served model's own prompt embedding (mean of a layer's hidden
states over the prompt) with a trained ListMLE head, against the MiniLM ranker on the same prompts.

    python benchmarks/embedding_ranker.py --features out/probe/features-1000-500-8-256.npz \
        --minilm src/rankserve/learn/weights/ranker-served.safetensors

Uses the teacher-forced features of benchmarks/probe_sweep.py (run that first). Prints a table,
writes out/probe/embedding_ranker.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rankserve.learn.evaluate import kendall_tau
from rankserve.learn.features import FeatureSet
from rankserve.learn.text_model import listmle_loss


def train_head(x: np.ndarray, y: np.ndarray, epochs: int = 30, list_size: int = 32,
               seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A ListMLE-trained MLP over standardised embeddings; returns the scoring function."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x)
    shift, scale = xt.mean(0), xt.std(0).clamp(min=1e-4)
    head = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 1))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    yt = torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), list_size):
            idx = perm[i : i + list_size]
            loss = listmle_loss(head((xt[idx] - shift) / scale)[:, 0], yt[idx], 10, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    return lambda v: head((torch.from_numpy(v) - shift) / scale)[:, 0].detach().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--minilm", type=Path, default=None, help="MiniLM ranker to compare on the same test prompts")
    ap.add_argument("--out", type=Path, default=Path("out/probe/embedding_ranker.json"))
    args = ap.parse_args()
    f = FeatureSet.load(args.features)
    train, test = f.split == "train", f.split == "test"
    y_train, y_test = f.output_len[train].astype(np.int64), f.output_len[test]
    rows = []
    for layer in f.layers:
        li = f.layer_index(layer)
        score = train_head(f.prompt_mean[train, li].astype(np.float32), y_train)
        rows.append({"backbone": f"SmolLM2 layer {layer} prompt mean + MLP head",
                     "tau": kendall_tau(score(f.prompt_mean[test, li].astype(np.float32)), y_test)})
        print(f"{rows[-1]['backbone']}: tau {rows[-1]['tau']:.3f}", flush=True)
    if args.minilm is not None:
        from rankserve.learn.sharegpt import load_prompts
        from rankserve.learn.text_model import TextLengthModel

        texts = {p.conv_id: p.text for p in load_prompts()}
        scores, _ = TextLengthModel.load(args.minilm).predict_texts([texts[c] for c in f.conv_id[test]])
        rows.append({"backbone": f"MiniLM ranker ({args.minilm.name})", "tau": kendall_tau(scores, y_test)})
    print(f"\n{int(test.sum())} test prompts ({int(train.sum())} train for the heads)")
    print("| backbone | Kendall's tau |\n|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['tau']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
