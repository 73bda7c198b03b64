#!/usr/bin/env bash
# The committed, seeded recipe of the bundled default model (`make weights`).
# Two stages on `vit data shapes`, on the CPU:
#   1. from scratch on one-object images (2 min data, ~52 min training on 2 idle cores);
#   2. fine-tuned on a mix of one- and two-object images (`--pairs`: each two-object image's
#      target is 1/2 on each of its classes), so the model knows both objects of an image and
#      class-specific explanations have two classes to tell apart (docs/explain.md).
# Every size below can be overridden from the environment (the defaults are the recipe;
# tests/test_recipe.py runs it tiny, into a temporary folder). A stage whose output exists is
# not run again; a killed training run resumes.
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
# Stage 2: one-object images per class (the first of stage 1's), two-object images per pair of
# classes (15 pairs), epochs.
MIX_PER_CLASS=${MIX_PER_CLASS:-1000}
MIX_PER_PAIR=${MIX_PER_PAIR:-400}
MIX_VAL_PER_PAIR=${MIX_VAL_PER_PAIR:-8}
PAIRS_TEST_PER_PAIR=${PAIRS_TEST_PER_PAIR:-40}
MIX_EPOCHS=${MIX_EPOCHS:-8}
WORKERS=${WORKERS:-}
workers=()
[ -n "$WORKERS" ] && workers=(--workers "$WORKERS")
shapes() { $VIT data shapes "$@" --image-size "$IMAGE_SIZE" "${workers[@]}" --quiet; }

mkdir -p "$RUN"
# Disjoint splits by seed: each image depends only on (seed, class or pair, index).
[ -f "$RUN/test/shapes.json" ] || shapes "$RUN/test" --per-class "$TEST_PER_CLASS" --seed 2

# -- stage 1 ----------------------------------------------------------------------------------
if [ ! -f "$RUN/stage1.safetensors" ]; then
  [ -f "$RUN/train/shapes.json" ] || shapes "$RUN/train" --per-class "$TRAIN_PER_CLASS" --seed 0
  [ -f "$RUN/val/shapes.json" ] || shapes "$RUN/val" --per-class "$VAL_PER_CLASS" --seed 1
  # A small ViT with 16x16 patches (14x14 grid at 224): width 128, 6 blocks, 4 heads.
  resume=()
  [ -f "$RUN/out/state.pt" ] && resume=(--resume "$RUN/out")
  $VIT train "$RUN/train" --val "$RUN/val" --out "$RUN/out" "${resume[@]}" \
    --model Ti/16 --width 128 --depth 6 --heads 4 --mlp-dim 384 --pos-embed sincos2d \
    --image-size "$IMAGE_SIZE" --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" --lr 5e-4 \
    --warmup-epochs 1 --crop-scale 0.8 --seed 0 "${workers[@]}" --quiet
  # Stage 2 starts from the fp16-stored stage-1 model (what was bundled before stage 2 existed).
  $VIT convert "$RUN/out/best.safetensors" "$RUN/stage1.safetensors" --fp16
fi

# -- stage 2 ----------------------------------------------------------------------------------
[ -f "$RUN/mixed/shapes.json" ] || shapes "$RUN/mixed" --per-class "$MIX_PER_CLASS" \
  --pairs "$MIX_PER_PAIR" --seed 0
[ -f "$RUN/mixed-val/shapes.json" ] || shapes "$RUN/mixed-val" --per-class "$VAL_PER_CLASS" \
  --pairs "$MIX_VAL_PER_PAIR" --seed 1
[ -f "$RUN/pairs-test/shapes.json" ] || shapes "$RUN/pairs-test" --objects 2 \
  --per-class "$PAIRS_TEST_PER_PAIR" --seed 2
resume=()
[ -f "$RUN/mixed-out/state.pt" ] && resume=(--resume "$RUN/mixed-out")
$VIT train "$RUN/mixed" --val "$RUN/mixed-val" --out "$RUN/mixed-out" "${resume[@]}" \
  --model "$RUN/stage1.safetensors" --epochs "$MIX_EPOCHS" --batch-size "$BATCH_SIZE" \
  --lr 3e-4 --crop-scale 0.8 --seed 0 "${workers[@]}" --quiet

# fp16 storage halves the file; predictions are checked against the fp32 weights below.
$VIT convert "$RUN/mixed-out/best.safetensors" "$MODEL_OUT" --fp16
$PYTHON weights/recipe/evaluate.py --model "$MODEL_OUT" --reference "$RUN/mixed-out/best.safetensors" \
  --data "$RUN/test" --pairs "$RUN/pairs-test" --output "$RESULTS" "${workers[@]}"
