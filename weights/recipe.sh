#!/usr/bin/env bash
# The committed, seeded recipe of the bundled default model (`make weights`).
# Trains from scratch on `vit data shapes` on the CPU; under an hour on 2 idle cores (2 min data, ~52 min training).
set -euo pipefail
cd "$(dirname "$0")/.."
VIT=${VIT:-.venv/bin/vit}
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/default-model}
NAME=vit-shapes-p16

mkdir -p "$RUN"
# Three disjoint splits: each image depends only on (seed, class, index).
[ -f "$RUN/train/shapes.json" ] || $VIT data shapes "$RUN/train" --per-class 2000 --seed 0 --quiet
[ -f "$RUN/val/shapes.json" ] || $VIT data shapes "$RUN/val" --per-class 40 --seed 1 --quiet
[ -f "$RUN/test/shapes.json" ] || $VIT data shapes "$RUN/test" --per-class 200 --seed 2 --quiet

# A small ViT at 224 with 16x16 patches (14x14 grid): width 128, 6 blocks, 4 heads.
resume=()
[ -f "$RUN/out/state.pt" ] && resume=(--resume "$RUN/out")
$VIT train "$RUN/train" --val "$RUN/val" --out "$RUN/out" "${resume[@]}" \
  --model Ti/16 --width 128 --depth 6 --heads 4 --mlp-dim 384 --pos-embed sincos2d \
  --image-size 224 --epochs 11 --batch-size 32 --lr 5e-4 --warmup-epochs 1 \
  --crop-scale 0.8 --seed 0 --quiet

# fp16 storage halves the file; predictions are checked against the fp32 weights below.
$VIT convert "$RUN/out/best.safetensors" "weights/$NAME.safetensors" --fp16
$PYTHON weights/evaluate.py --model "weights/$NAME.safetensors" --reference "$RUN/out/best.safetensors" \
  --data "$RUN/test" --output weights/results.json
