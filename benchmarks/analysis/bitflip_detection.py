"""Which codecs notice a flipped bit? Single-bit flips in stored exemplars, by codec.

A replay buffer's exemplars are bytes in RAM and in checkpoints. This script encodes a crop
of a Kodak image with each codec, flips one random bit (``--flips`` times, seeded), decodes,
and counts: refused (``CorruptDataError``), decoded to the same pixels (the bit did not
matter), or decoded to different pixels without complaint. It backs the corruption sentence
of docs/codecs.md and the reason the replay buffer stores a CRC32 per exemplar in its
checkpoints.

    python benchmarks/analysis/bitflip_detection.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from clbench.codecs import CorruptDataError, get_codec
from clbench.data import load_rgb, resolve_data_root
from clbench.records import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
CODECS = ["jpeg:q=50", "webp:q=50", "avif:q=50", "jpegxl:q=75", "jpeg2000:q=35", "png", "raw"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--image", default="kodak/kodim23.png")
    ap.add_argument("--size", type=int, default=64, help="centre crop (an exemplar's size)")
    ap.add_argument("--flips", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codecs", nargs="+", default=CODECS)
    ap.add_argument("--out", type=Path, default=ROOT / "results/analysis/bitflip_detection.json")
    args = ap.parse_args(argv)
    path = resolve_data_root(args.data_root) / args.image
    im = load_rgb(path)
    h, w, s = im.shape[0], im.shape[1], args.size
    crop = np.ascontiguousarray(im[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2])
    rows = []
    for spec in args.codecs:
        codec = get_codec(spec)
        (data,) = codec.encode([crop])
        ref = codec.decode([data])[0]
        rng = random.Random(args.seed)
        counts = {"refused": 0, "same_pixels": 0, "wrong_pixels": 0}
        for _ in range(args.flips):
            bad = bytearray(data)
            bit = rng.randrange(8 * len(bad))
            bad[bit // 8] ^= 1 << (bit % 8)
            try:
                out = codec.decode([bytes(bad)])[0]
            except CorruptDataError:
                counts["refused"] += 1
                continue
            same = out.shape == ref.shape and np.array_equal(out, ref)
            counts["same_pixels" if same else "wrong_pixels"] += 1
        rows.append({"codec": spec, "bytes": len(data), **counts})
        print(rows[-1], flush=True)
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "image": f"{args.image}, centre {s}x{s}",
        "flips": args.flips,
        "seed": args.seed,
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
