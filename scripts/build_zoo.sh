#!/usr/bin/env bash
# Regenerate the model zoo (src/oodforge/zoo/): the plain, SSOD, OE and recipe classifiers of every embedded suite.
# Each checkpoint is made by one recorded `oodforge train` command (also kept in its meta.json), then
# `python -m oodforge.zoo manifest` writes zoo/manifest.json (command, seed, time, accuracies, sha256).
# Two lanes run in parallel with one thread each (2-core machine); measured times are in docs/results.md.
# Usage: scripts/build_zoo.sh [lane]   (lane a, b, c, d, e; 'oe' for c + d; 'recipes' for f + g; nothing for all)
set -euo pipefail
cd "$(dirname "$0")/.."
OF=${OODFORGE:-.venv/bin/oodforge}
Z=src/oodforge/zoo
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

lane_a() {
  $OF train --suite fashion --method plain --epochs 8 --seed 0 --out $Z/fashion-plain
  $OF train --suite fashion --method ssod --init-from $Z/fashion-plain --epochs 2 --seed 0 --out $Z/fashion-ssod
}
lane_b() {
  $OF train --suite scenes --method plain --epochs 12 --seed 0 --out $Z/scenes-plain
  $OF train --suite fashion6 --method plain --epochs 6 --seed 0 --out $Z/fashion6-plain
  $OF train --suite scenes --method ssod --init-from $Z/scenes-plain --epochs 2 --seed 0 --out $Z/scenes-ssod
  $OF train --suite fashion6 --method ssod --init-from $Z/fashion6-plain --epochs 2 --seed 0 --out $Z/fashion6-ssod
}

# Outlier exposure (after the plain models): SHIFT outliers (Layer-CAM + Telea, K=1) forged from the first
# 10,000 training images by the zoo's plain classifier, then one epoch of the recipe the protocol picked
# (docs/protocol.md, benchmarks/bench_forged.py): energy-bounded loss, SGD lr 0.01 cosine.
oe() {
  $OF synth shift --data $1 --checkpoint $Z/$1-plain --masker layercam --inpainter telea --limit 10000 \
      --seed 0 --no-progress --out runs/zoo-outliers/$1
  $OF train --suite $1 --method oe --init-from $Z/$1-plain --outliers runs/zoo-outliers/$1 --oe-loss energy \
      --lr 0.01 --epochs 1 --seed 0 --out $Z/$1-oe
}
lane_c() { oe fashion; }
# clipart: EfficientNet-Lite0 (ImageNet weights, offline) fine-tuned, batch 32 and 10 epochs at the default
# fine-tune lr 0.01, the setting benchmarks/bench_clipart.py chose on ID validation (docs/results.md); SSOD and
# OE fine-tuned from it with the same batch size (1,499 training images: 47 steps per epoch).
LITE0="--backbone efficientnet_lite0 --mode finetune --batch-size 32"
lane_e() {
  $OF train --suite clipart $LITE0 --epochs 10 --seed 0 --out $Z/clipart-plain
  $OF train --suite clipart $LITE0 --method ssod --init-from $Z/clipart-plain --epochs 2 --seed 0 --out $Z/clipart-ssod
  $OF synth shift --data clipart --checkpoint $Z/clipart-plain --masker layercam --inpainter telea --limit 10000 \
      --seed 0 --no-progress --out runs/zoo-outliers/clipart
  $OF train --suite clipart $LITE0 --method oe --init-from $Z/clipart-plain --outliers runs/zoo-outliers/clipart \
      --oe-loss energy --lr 0.01 --epochs 1 --seed 0 --out $Z/clipart-oe
}
lane_d() { oe scenes; oe fashion6; }
# The no-outlier recipe backbone the demo runs per suite (oodforge.demo.DEMO_RECIPES): the backbone of the detector
# benchmarks/bench_forged.py's protocol picks on validation data, on seed 0.
# fashion and fashion6: T2FNorm fine-tuned from the plain classifier for ten epochs at the recipe fine-tune's SGD lr
# 0.01 cosine (oodforge.workflows.RECIPE_FINETUNE), tau 0.1 (label t2fnorm-e10).
# scenes: T2FNorm from scratch on the plain classifier's own plan, 12 epochs (label t2fnorm-scratch).
# clipart: ASCOOD from the ImageNet weights on the plain Lite0's own plan, 10 epochs (label ascood-scratch).
t2f() { $OF train --suite $1 ${@:2} --method t2fnorm --init-from $Z/$1-plain --epochs 10 --seed 0 --out $Z/$1-t2fnorm; }
lane_f() { t2f fashion; }
lane_g() {
  t2f fashion6
  $OF train --suite scenes --method t2fnorm --epochs 12 --seed 0 --out $Z/scenes-t2fnorm
  $OF train --suite clipart $LITE0 --method ascood --epochs 10 --seed 0 --out $Z/clipart-ascood
}

case "${1:-both}" in
  a) lane_a ;;
  b) lane_b ;;
  c) lane_c ;;
  d) lane_d ;;
  e) lane_e ;;
  recipes) lane_f > runs/zoo-lane-f.log 2>&1 & lane_g > runs/zoo-lane-g.log 2>&1 & wait ;;
  oe) lane_c > runs/zoo-lane-c.log 2>&1 & lane_d > runs/zoo-lane-d.log 2>&1 & wait ;;
  *) lane_a > runs/zoo-lane-a.log 2>&1 & lane_b > runs/zoo-lane-b.log 2>&1 & wait
     lane_c > runs/zoo-lane-c.log 2>&1 & lane_d > runs/zoo-lane-d.log 2>&1 & wait
     lane_e > runs/zoo-lane-e.log 2>&1
     lane_f > runs/zoo-lane-f.log 2>&1 & lane_g > runs/zoo-lane-g.log 2>&1 & wait ;;
esac
.venv/bin/python -m oodforge.zoo check
.venv/bin/python -m oodforge.zoo manifest
