"""Re-encoding already-JPEG images: why JPEG q=75 is almost lossless on Tiny-ImageNet.

Tiny-ImageNet-200 ships its images as JPEG files. Re-encoding a decoded JPEG with the SAME
quantisation tables lands on the same quantisation grid, so the error nearly vanishes. This
script measures, on a sample of the training images, each candidate quality's mean size, bpp
and PSNR against the decoded source, and which quality's luminance table equals the source
files' (PIL exposes both), to explain the codec-selection tables of the compressed-replay
evidence (feature MSE not monotonic in quality). Two more columns explain why q=50 is less
useful to a classifier than q=30 (docs/icm.md, "JPEG on JPEG"): the ratio of each quality's
luminance steps to the source's (above 2, a coefficient of one source step rounds to 0; at 2
or below, from q=50 up, it is kept and comes back amplified by the ratio), and the
high-frequency energy of the decoded luma (a Laplacian's mean square) relative to the source.
The ratio is taken against the first file's table; the table column shows they all match.

    python benchmarks/analysis/jpeg_requantization.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import laplace

from clbench.codecs import get_codec
from clbench.records import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]


def luma_table(quality: int) -> list[int]:
    """The luminance quantisation table PIL (libjpeg) writes at ``quality``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG", quality=quality)
    return list(Image.open(buf).quantization[0])


def hf_energy(rgb: np.ndarray) -> float:
    """Mean square of the Laplacian of the luma (ITU-R BT.601, as JPEG's Y)."""
    y = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(np.mean(laplace(y) ** 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument(
        "--qualities", type=int, nargs="+", default=[10, 30, 40, 45, 50, 55, 60, 75, 90]
    )
    ap.add_argument("--every", type=int, default=10, help="take every n-th training file")
    ap.add_argument("--limit", type=int, default=2500, help="from the first n files (sorted)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "analysis")
    args = ap.parse_args(argv)
    train = args.data_root / "tiny-imagenet-200" / "train"
    if not train.is_dir():
        print(
            f"error: {train} not found: pass --data-root with tiny-imagenet-200/", file=sys.stderr
        )
        return 2
    files = sorted(train.glob("*/images/*.JPEG"))[: args.limit : args.every]
    sources = [Image.open(f) for f in files]
    tables = {q: luma_table(q) for q in args.qualities}
    source_q = [
        next((q for q, t in tables.items() if list(s.quantization[0]) == t), None) for s in sources
    ]
    images = [np.asarray(s.convert("RGB")) for s in sources]
    hf_source = [hf_energy(im) for im in images]
    source_table = np.asarray(sources[0].quantization[0], dtype=float)
    rows = []
    for q in args.qualities:
        storage = get_codec(f"jpeg:q={q}")
        payloads = storage.encode(images)
        decoded = storage.decode(payloads)
        mse = np.mean(
            [np.mean((a.astype(np.float64) - b) ** 2) for a, b in zip(images, decoded, strict=True)]
        )
        nbytes = float(np.mean([storage.charged_bytes(p) for p in payloads]))
        h, w = images[0].shape[:2]
        rows.append(
            {
                "codec": f"jpeg:q={q}",
                "mean_bytes": nbytes,
                "bpp": 8 * nbytes / (h * w),
                "psnr_db": float(10 * np.log10(255**2 / mse)),
                "source_files_with_this_luma_table": sum(sq == q for sq in source_q),
                "luma_step_ratio_to_source": float(np.mean(np.asarray(tables[q]) / source_table)),
                "hf_energy_ratio": float(
                    np.mean([hf_energy(d) / e for d, e in zip(decoded, hf_source, strict=True)])
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    res = {
        "command": " ".join(["python", *sys.argv]),
        "images": len(images),
        "sample": f"every {args.every}th of the first {args.limit} sorted training files",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "jpeg_requantization_tinyimagenet.json"
    write_json_atomic(out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
