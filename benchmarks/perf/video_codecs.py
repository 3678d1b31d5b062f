"""Encode/decode frames per second and peak memory of video codecs on CPU.

Each codec runs in a fresh process (so its peak resident memory is its own): the clip's
first ``--frames`` frames are decoded into memory, then encoded and decoded once; the
result is frames/s of each and the process's peak RSS above what it held before coding.
Codecs run one after another, side by side in one invocation, on the same frames. Not a
test: numbers depend on the machine and its load, recorded with them.

    python benchmarks/perf/video_codecs.py --data-root /path/to/data \\
        --clip video/bikes.mp4 --frames 32 --threads 2 \\
        --codec "x264:crf=31,preset=medium" --codec "x265:crf=31,preset=veryslow" \\
        --codec "dhvc:checkpoint=runs/dhvc-video/best.pth,q=3" --out results/perf/video_codecs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from clbench.codecs._io import data_path, write_json, write_text
from clbench.provenance import cpu_info, provenance

DEFAULT_CODECS = [
    "x264:crf=31,preset=medium,gop=32",
    "x264:crf=31,preset=veryslow,gop=32",
    "x265:crf=31,preset=medium,gop=32",
    "x265:crf=31,preset=veryslow,gop=32",
    "svtav1:crf=42,preset=8,gop=32",
    "vp9:crf=42,preset=2,gop=32",
]

# Runs in the child: it prints one JSON line.
CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from clbench.codecs import get_codec
from clbench.datasets.video import read_video
frames = read_video(sys.argv[1], int(sys.argv[2]))
codec = get_codec(sys.argv[3])
codec.encode(frames[:1]); codec.decode(codec.encode(frames[:1]))  # warm-up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter(); data = codec.encode(frames); t1 = time.perf_counter()
codec.decode(data); t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n, (h, w) = len(frames), frames.shape[1:3]
print(json.dumps({"spec": codec.spec, "frames": n, "height": h, "width": w,
    "bpp": sum(map(len, data)) * 8 / (n * h * w),
    "enc_fps": n / (t1 - t0), "dec_fps": n / (t2 - t1),
    "peak_rss_mb": peak / 1024, "coding_rss_mb": max(peak - base, 0) / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", default="video/bikes.mp4")
    p.add_argument("--data-root")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--codec", action="append", default=[])
    p.add_argument("--out", default="results/perf/video_codecs")
    args = p.parse_args(argv)
    clip = data_path(args.clip, args.data_root)
    rows = []
    for spec in args.codec or DEFAULT_CODECS:
        cmd = [sys.executable, "-c", CHILD, clip, str(args.frames), spec, str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"{spec}: failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 2
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    res = {
        "clip": clip,
        "note": "the clip is H.264-compressed content, not a pristine source",
        "threads": args.threads,
        "cpu": cpu_info(),
        "provenance": provenance("cpu", threads=args.threads),
        "rows": rows,
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), res)
    lines = [
        f"# Video codecs on CPU: {Path(clip).name}, {args.frames} frames, {args.threads} threads",
        "",
        f"CPU: {res['cpu']['model']}. The clip is H.264-compressed content. "
        f"Command: `python benchmarks/perf/video_codecs.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| codec | bpp | encode fps | decode fps | peak RSS MB | RSS growth while coding MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['spec']}` | {r['bpp']:.4f} | {r['enc_fps']:.2f} | {r['dec_fps']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['coding_rss_mb']:.0f} |"
        )
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
