#!/usr/bin/env bash
# The committed, seeded recipe of the bundled default model (`make weights`).
# Trains from scratch on `vit data shapes` on the CPU; under an hour on 2 idle cores (2 min data,
# ~52 min training). Every size below can be overridden from the environment (the defaults are
# the recipe; tests/test_recipe.py runs it tiny, into a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
VIT=${VIT:-.venv/bin/vit}
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/default-model}
MODEL_OUT=${MODEL_OUT:-weights/vit-shapes-p16.safetensors}
RESULTS=${RESULTS:-weights/results.json}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-2000}
VAL_PER_CLASS=${VAL_PER_CLASS:-40}
TEST_PER_CLASS=${TEST_PER_CLASS:-200}
IMAGE_SIZE=${IMAGE_SIZE:-224}
EPOCHS=${EPOCHS:-11}
BATCH_SIZE=${BATCH_SIZE:-32}
WORKERS=${WORKERS:-}
workers=()
[ -n "$WORKERS" ] && workers=(--workers "$WORKERS")

mkdir -p "$RUN"
# Three disjoint splits: each image depends only on (seed, class, index).
[ -f "$RUN/train/shapes.json" ] || $VIT data shapes "$RUN/train" --per-class "$TRAIN_PER_CLASS" \
  --image-size "$IMAGE_SIZE" --seed 0 "${workers[@]}" --quiet
[ -f "$RUN/val/shapes.json" ] || $VIT data shapes "$RUN/val" --per-class "$VAL_PER_CLASS" \
  --image-size "$IMAGE_SIZE" --seed 1 "${workers[@]}" --quiet
[ -f "$RUN/test/shapes.json" ] || $VIT data shapes "$RUN/test" --per-class "$TEST_PER_CLASS" \
  --image-size "$IMAGE_SIZE" --seed 2 "${workers[@]}" --quiet

# A small ViT with 16x16 patches (14x14 grid at 224): width 128, 6 blocks, 4 heads.
resume=()
[ -f "$RUN/out/state.pt" ] && resume=(--resume "$RUN/out")
$VIT train "$RUN/train" --val "$RUN/val" --out "$RUN/out" "${resume[@]}" \
  --model Ti/16 --width 128 --depth 6 --heads 4 --mlp-dim 384 --pos-embed sincos2d \
  --image-size "$IMAGE_SIZE" --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" --lr 5e-4 \
  --warmup-epochs 1 --crop-scale 0.8 --seed 0 "${workers[@]}" --quiet

# fp16 storage halves the file; predictions are checked against the fp32 weights below.
$VIT convert "$RUN/out/best.safetensors" "$MODEL_OUT" --fp16
$PYTHON weights/recipe/evaluate.py --model "$MODEL_OUT" --reference "$RUN/out/best.safetensors" \
  --data "$RUN/test" --output "$RESULTS" "${workers[@]}"
