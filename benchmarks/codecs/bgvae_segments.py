"""Where a BG-VAE spends its rate: bpp of each latent segment (top-down) and the PSNR of
progressive decoding from the first k segments, on Kodak, for one or more checkpoints.

    python benchmarks/codecs/bgvae_segments.py CKPT [CKPT ...] --data-root DATA --lmbda 0.02 --limit 8

Prints a markdown table per checkpoint (used by the free-bits pilot in
results/codecs/lic2/pilot-free-bits/).
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data-root", default=None)
    p.add_argument("--kodak", default="kodak")
    p.add_argument("--lmbda", type=float, default=0.02)
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import torch

    from clbench.codecs import get_codec
    from clbench.codecs._io import data_path, find_images
    from clbench.codecs.bgvae import progressive_points
    from clbench.data import load_rgb

    torch.set_num_threads(a.threads)
    files = find_images(data_path(a.kodak, a.data_root), "Kodak folder")
    images = [load_rgb(f) for f in files][: a.limit or None]
    for ckpt in a.checkpoints:
        codec = get_codec(f"bgvae:checkpoint={ckpt},lmbda={a.lmbda:g}")
        points = progressive_points(codec, images, codec.encode(images))
        total = points[-1]["bpp_payload"]
        print(f"\n{ckpt} at lambda {a.lmbda:g}, {len(images)} Kodak images\n")
        print("| segments kept | bpp of segment k | share of rate | PSNR dB (first k) |")
        print("|---:|---:|---:|---:|")
        for p in points:
            print(f"| {p['segments']} | {p['bpp_segment']:.4f} | "
                  f"{100 * p['bpp_segment'] / total:.1f} % | {p['psnr']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
