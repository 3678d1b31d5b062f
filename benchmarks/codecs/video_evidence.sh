#!/usr/bin/env bash
# Issue 17 evidence as one resumable command: trains the DHVC-style codec (MINUTES, default
# 110, on 2 threads), publishes its best weights as results/codecs/trained/NAME.pth (what
# the video benchmarks load), then evaluates the clip benchmarks and measures throughput.
# Rerun the same command after a kill: the training resumes from last.pth, and a published
# model or a finished report is skipped.
#   CLBENCH_DATA_ROOT=/path/to/data bash benchmarks/codecs/video_evidence.sh [MINUTES]
# With PROGRESSIVE=W the same training adds `--progressive W` (a loss on truncated decodes)
# and publishes dhvc-video-progressive.pth; then only video-progressive-trained.yaml is
# evaluated (its truncated decodes beside the published model's).
set -euo pipefail
: "${CLBENCH_DATA_ROOT:?set CLBENCH_DATA_ROOT to the data root}"
MINUTES=${1:-110}
CB=${CLBENCH:-clbench}
PY=${PYTHON:-python}
PROG=${PROGRESSIVE:-}
NAME=dhvc-video${PROG:+-progressive}
RUN=runs/$NAME
W=results/codecs/trained/$NAME.pth
mkdir -p results/codecs/trained results/perf
if [ ! -f "$W" ]; then
  resume=""; [ -f "$RUN/last.pth" ] && resume="--resume"
  $CB codec train-video --out "$RUN" --clips video/bigbuckbunny.mp4 \
      --stills tiny-imagenet-200/train --val-stills tiny-imagenet-200/val \
      --minutes "$MINUTES" --threads 2 --no-progress ${PROG:+--progressive "$PROG"} $resume
  cp "$RUN/train_log.json" "results/codecs/trained/$NAME.train_log.json"
  cp "$RUN/best.pth" "$W.tmp" && mv "$W.tmp" "$W"   # atomic: a half copy is never "published"
fi
benches="carphone bikes progressive"
[ -n "$PROG" ] && benches="progressive-trained"
for b in $benches; do
  [ -f "results/codecs/video-$b/results.json" ] && continue
  $CB codec eval "benchmarks/codecs/video-$b.yaml" --threads 2 --no-progress \
      --out "results/codecs/video-$b"
done
[ -n "$PROG" ] || [ -f results/perf/video_codecs.md ] || $PY benchmarks/perf/video_codecs.py \
    --data-root "$CLBENCH_DATA_ROOT" --clip video/bikes.mp4 --frames 32 --threads 2 \
    --codec "dhvc:checkpoint=$W,q=3" --codec "x264:crf=31,preset=medium,gop=32" \
    --codec "x265:crf=31,preset=medium,gop=32" --codec "svtav1:crf=42,preset=8,gop=32" \
    --codec "vp9:crf=42,preset=2,gop=32" --out results/perf/video_codecs
