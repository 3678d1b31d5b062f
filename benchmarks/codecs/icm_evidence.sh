#!/usr/bin/env bash
# Issue 16 evidence at a CPU budget: trains var-feat-comp at two split points, LoRA-ICM at four
# rates (200-class task) and two rates (the coarse 10-group task, same frozen backbone), then
# evaluates accuracy against bpp on Tiny-ImageNet val. Two lanes of one thread each.
# Resumable: rerun the same command (each training continues with --resume; an exported
# checkpoint or a finished report is skipped).
#   CLBENCH_DATA_ROOT=/path/to/data bash benchmarks/codecs/icm_evidence.sh [LIMIT]
set -euo pipefail
: "${CLBENCH_DATA_ROOT:?set CLBENCH_DATA_ROOT to the data root}"
LIMIT=${1:-500}
CB=${CLBENCH:-clbench}
T="--input-size 160 --threads 1 --no-progress"
train() {  # out method steps args...
  local out=$1; shift
  local resume=""; [ -f "runs/icm/$out/last.pth" ] && resume="--resume"
  $CB codec icm-train "$@" --out "runs/icm/$out" $T $resume
  $CB codec export "runs/icm/$out/last.pth" "results/codecs/trained/icm-$out.pth"
}
lane1() {
  train fvr-b1 feature-vr --split blocks.1 --steps 800 --lr 3e-3
  train fvr-b2 feature-vr --split blocks.2 --steps 1300 --lr 3e-3
  for l in 0.1 0.4; do train lora-coarse-l$l icm-lora --set task=coarse --set lmbda=$l --steps 400; done
}
lane2() {
  for l in 0.1 0.4 0.8 1.6; do train lora-fine-l$l icm-lora --set lmbda=$l --steps 400; done
}
mkdir -p runs/icm results/codecs/trained
lane1 > runs/icm/lane1.log 2>&1 & p1=$!
lane2 > runs/icm/lane2.log 2>&1 & p2=$!
wait $p1; wait $p2
$CB codec eval benchmarks/codecs/icm-tin.yaml --limit "$LIMIT" --threads 1 --no-progress &
$CB codec eval benchmarks/codecs/icm-tin-coarse.yaml --limit "$LIMIT" --threads 1 --no-progress &
wait
