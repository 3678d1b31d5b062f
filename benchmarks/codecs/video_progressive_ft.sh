#!/usr/bin/env bash
# Issue 17, progressive decoding: fine-tune the published DHVC (results/codecs/trained/
# dhvc-video.pth) for STEPS steps with the progressive term (--progressive 1) and, as its
# control, the same steps without it; publish both (dhvc-video-pft.pth, dhvc-video-ft.pth
# with their train logs) and evaluate benchmarks/codecs/video-progressive-ft.yaml.
# Step budgets, not minutes, so the result does not depend on the CPU. Resumable: rerun the
# same command after a kill; what is published or evaluated is skipped.
#   CLBENCH_DATA_ROOT=/path/to/data bash benchmarks/codecs/video_progressive_ft.sh [STEPS] [JOBS]
# JOBS=2 trains both at once with one thread each; JOBS=1 one after the other on 2 threads.
set -euo pipefail
: "${CLBENCH_DATA_ROOT:?set CLBENCH_DATA_ROOT to the data root}"
STEPS=${1:-1200}
JOBS=${2:-2}
CB=${CLBENCH:-clbench}
THREADS=$(( JOBS == 1 ? 2 : 1 ))
mkdir -p results/codecs/trained

train() {  # NAME EXTRA...: fine-tune into runs/NAME, publish results/codecs/trained/NAME.pth
  local name=$1; shift
  local run=runs/$name w=results/codecs/trained/$name.pth resume=""
  [ -f "$w" ] && return 0
  [ -f "$run/last.pth" ] && resume="--resume"
  $CB codec train-video --out "$run" --init results/codecs/trained/dhvc-video.pth \
      --clips video/bigbuckbunny.mp4 --stills tiny-imagenet-200/train \
      --val-stills tiny-imagenet-200/val --steps "$STEPS" --lr 1e-4 --val-every 400 \
      --threads "$THREADS" --no-progress "$@" $resume > "$run.log" 2>&1
  cp "$run/train_log.json" "results/codecs/trained/$name.train_log.json"
  cp "$run/best.pth" "$w.tmp" && mv "$w.tmp" "$w"   # atomic: a half copy is never "published"
}

mkdir -p runs
if [ "$JOBS" = 1 ]; then
  train dhvc-video-pft --progressive 1
  train dhvc-video-ft
else
  train dhvc-video-pft --progressive 1 & a=$!
  train dhvc-video-ft & b=$!
  wait $a; wait $b
fi
[ -f results/codecs/video-progressive-ft/results.json ] ||
  $CB codec eval benchmarks/codecs/video-progressive-ft.yaml --threads 2 --no-progress \
      --out results/codecs/video-progressive-ft
