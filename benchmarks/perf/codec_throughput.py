"""Encode/decode throughput (images/s) of codecs on small exemplar-sized images.

Batch (one ``encode`` call for all images) vs one-by-one (one call per image), for 32x32
and 64x64 images: the replay buffer's access pattern. Not a test: numbers depend on the
machine and its load, which are recorded with them.

    python benchmarks/perf/codec_throughput.py --out results/perf/codec_throughput
    python benchmarks/perf/codec_throughput.py --codec "bmshj2018-factorized:checkpoint=best.pth"
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from clbench.codecs import get_codec
from clbench.codecs._io import write_json, write_text

DEFAULT_CODECS = ["jpeg:q=50", "webp:q=50", "bmshj2018-factorized:q=1,pretrained=false"]


def images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (noise would make every codec's job unrepresentatively hard)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, side // 4, side // 4, 3)).astype(np.float32)
    up = low.repeat(4, 1).repeat(4, 2)
    return np.clip(up + rng.normal(0, 6, up.shape), 0, 255).astype(np.uint8)


def timed(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(spec: str, side: int, n: int, repeats: int) -> dict:
    codec = get_codec(spec)
    x = images(n, side)
    data = codec.encode(x)
    singles = list(x)
    rows = {
        "codec": codec.spec,
        "side": side,
        "images": n,
        "bytes_per_image": float(np.mean([len(b) for b in data])),
        "enc_batch_img_s": n / timed(lambda: codec.encode(x), repeats),
        "enc_single_img_s": n / timed(lambda: [codec.encode([im]) for im in singles], repeats),
        "dec_batch_img_s": n / timed(lambda: codec.decode(data), repeats),
        "dec_single_img_s": n / timed(lambda: [codec.decode([b]) for b in data], repeats),
    }
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--codec",
        action="append",
        help="codec spec (repeatable); default: JPEG q=50, WebP q=50, factorized q=1",
    )
    ap.add_argument("--sides", default="32,64")
    ap.add_argument("--images", type=int, default=256, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/perf/codec_throughput")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.codec or DEFAULT_CODECS:
        for side in (int(s) for s in args.sides.split(",")):
            r = measure(spec, side, args.images, args.repeats)
            rows.append(r)
            print(
                f"{r['codec']:48s} {side:3d}px  enc {r['enc_batch_img_s']:8.1f} img/s batch, {r['enc_single_img_s']:8.1f} one-by-one"
                f" | dec {r['dec_batch_img_s']:8.1f} batch, {r['dec_single_img_s']:8.1f} one-by-one | {r['bytes_per_image']:.0f} B/img",
                flush=True,
            )
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {**meta, "rows": rows})
    lines = [
        "# Codec throughput (images/s)",
        "",
        f"`{meta['command']}`  ",
        f"torch threads {args.threads}, {meta['cpu_count']} CPUs, load average at the end {meta['loadavg_at_end'][0]:.1f} "
        "(shared machine: absolute numbers are noisy, ratios less so), median of "
        f"{args.repeats} runs over {args.images} smooth random images.",
        "",
        "| codec | side | enc batch | enc one-by-one | dec batch | dec one-by-one | bytes/img |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['codec']}` | {r['side']} | {r['enc_batch_img_s']:.1f} | {r['enc_single_img_s']:.1f} | "
            f"{r['dec_batch_img_s']:.1f} | {r['dec_single_img_s']:.1f} | {r['bytes_per_image']:.0f} |"
        )
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
