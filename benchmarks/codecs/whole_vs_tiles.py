"""Does a learned codec generalise from its training crops to whole images?

For each checkpoint: the estimated rate (-log2 of the likelihoods, per latent) and the PSNR
of ``forward`` in eval mode on a whole image, and on the same image cut into ``--tile``
squares coded as a batch. A model whose entropy model generalises codes the whole image at
no more rate than the tiles (it has more context); a hyperprior trained on crops whose z is
1x1 does not.

    python benchmarks/codecs/whole_vs_tiles.py --image kodak/kodim01.png --data-root /path/to/data \
        eff-lic:checkpoint=runs/a/best.pth eff-lic:checkpoint=runs/b/best.pth
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

from clbench.codecs._io import data_path
from clbench.codecs.registry import get_codec
from clbench.data import load_rgb


def estimate(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict[str, float], float]:
    """Bits per pixel of the image(s) ``x`` per latent, and the PSNR (dB)."""
    with torch.inference_mode():
        out = model(x)
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = {k: -torch.log2(v).sum().item() / pixels for k, v in out["likelihoods"].items()}
    mse = ((out["x_hat"].clamp(0, 1) - x) ** 2).mean().item()
    return bpp, 10 * math.log10(1 / mse)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+", help="codec specs (checkpoints) to compare")
    p.add_argument("--image", default="kodak/kodim01.png")
    p.add_argument("--data-root")
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    img = load_rgb(data_path(a.image, a.data_root))
    h, w = (s // a.tile * a.tile for s in img.shape[:2])
    x = torch.from_numpy(np.ascontiguousarray(img[:h, :w])).permute(2, 0, 1)[None].float() / 255
    t = a.tile
    tiles = x.unfold(2, t, t).unfold(3, t, t).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, t, t)
    print(f"{a.image} cropped to {h}x{w}; tiles of {t}x{t}: estimated bpp per latent, PSNR")
    for spec in a.specs:
        model = get_codec(spec).model
        for what, inp in (("whole", x), (f"{t}x{t} tiles", tiles)):
            bpp, psnr = estimate(model, inp)
            parts = ", ".join(f"{k} {v:.4f}" for k, v in bpp.items())
            print(f"{spec}  {what}: {parts} bpp, {psnr:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
