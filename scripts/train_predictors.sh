#!/usr/bin/env bash
# Train every prompt-side predictor of docs/PREDICTORS.md and print the tau tables.
# Shipped weights go to src/rankserve/learn/weights/, the rest to out/predictors/.
# Usage: scripts/train_predictors.sh [served|reference|all]   (about 3 min per model on 2 cores, 16 for the reference ranker)
set -euo pipefail
cd "$(dirname "$0")/.."
RS=${RANKSERVE:-.venv/bin/rankserve}
W=src/rankserve/learn/weights
O=out/predictors
mkdir -p "$W" "$O"
which=${1:-all}
if [[ $which == served || $which == all ]]; then
  # Served-model labels are capped at 384 tokens (see labels_smollm2.json).
  $RS train ranker     --labels served --out $W/ranker-served.safetensors
  $RS train classifier --labels served --buckets 10 --max-output 384 --out $W/classifier-served.safetensors
  $RS train classifier --labels served --buckets 38 --max-output 384 --out $O/classifier38-served.safetensors
  $RS train regressor  --labels served --max-output 384 --out $W/regressor-served.safetensors
  $RS eval --labels served --json $O/eval-served.json \
    $W/ranker-served.safetensors $W/classifier-served.safetensors $O/classifier38-served.safetensors \
    $W/regressor-served.safetensors
fi
if [[ $which == reference || $which == all ]]; then
  # ShareGPT reply lengths reach 1,742 tokens; buckets span 0-1024 (longer ones fall in the last).
  # The shipped reference ranker: all 7,815 prompts, 256 encoder tokens, top 3 layers (16 min).
  $RS train ranker     --labels reference --max-length 256 --trainable-layers 3 --out $W/ranker-reference.safetensors
  $RS train classifier --labels reference --max-train 3000 --buckets 10 --max-output 1024 --out $O/classifier-reference.safetensors
  $RS train classifier --labels reference --max-train 3000 --buckets 100 --max-output 1024 --out $O/classifier100-reference.safetensors
  $RS train regressor  --labels reference --max-train 3000 --max-output 1024 --out $O/regressor-reference.safetensors
  $RS eval --labels reference --json $O/eval-reference.json \
    $W/ranker-reference.safetensors $O/classifier-reference.safetensors $O/classifier100-reference.safetensors \
    $O/regressor-reference.safetensors
fi
