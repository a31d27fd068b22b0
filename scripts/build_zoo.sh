#!/usr/bin/env bash
# Regenerate the model zoo (src/oodforge/zoo/): the plain and the SSOD classifier of every embedded suite.
# Each checkpoint is made by one recorded `oodforge train` command (also kept in its meta.json), then
# `python -m oodforge.zoo manifest` writes zoo/manifest.json (command, seed, time, accuracies, sha256).
# Two lanes run in parallel with one thread each (2-core machine); measured times are in docs/zoo.md.
# Usage: scripts/build_zoo.sh [lane]   (lane a, b, or nothing for both)
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

case "${1:-both}" in
  a) lane_a ;;
  b) lane_b ;;
  *) lane_a > runs/zoo-lane-a.log 2>&1 & lane_b > runs/zoo-lane-b.log 2>&1 & wait ;;
esac
.venv/bin/python -m oodforge.zoo manifest
