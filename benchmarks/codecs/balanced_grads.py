"""Why Balanced R-D moves the operating point: the two gradients at a trained model.

For each checkpoint (a `clbench codec train` run at its λ), a few training batches:
D = λ·255²·MSE and R = bpp, the norms of ∇D and ∇R, their cosine, the norms after the
log(ℓ - m) normalisation of both solutions (m = -1 by default), Solution 2's QP weights,
and the effective λ each solution's weighting trains at (Solution 1 at its initial z = ½) (λ·(weight on D)/(weight on R) in
units of the raw losses; standard training is λ itself).

    python benchmarks/codecs/balanced_grads.py --data-root DATA \\
        results/codecs/lic2/runs/standard-s0/lambda-0.0035/best.pth ...

Writes a markdown table to stdout (and --out if given).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="best.pth of `clbench codec train` runs")
    p.add_argument("--data-root", default=None)
    p.add_argument("--train", default="tiny-imagenet-200/train")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--min-losses", type=float, nargs=2, default=[-1.0, -1.0])
    p.add_argument("--out", default=None)
    a = p.parse_args()

    from compressai.losses import RateDistortionLoss

    from clbench.codecs import get_codec
    from clbench.codecs.balanced_rd import gram, qp_weights
    from clbench.codecs.train import CropFolder, to_batch
    from clbench.data import resolve_data_root

    torch.manual_seed(0)
    train = CropFolder(resolve_data_root(a.data_root) / a.train, a.patch, True, None, 0, False)
    m = a.min_losses
    rows = [
        "| checkpoint | λ | D | R | ‖∇D‖ | ‖∇R‖ | cos | ‖∇D‖/(D-m) | ‖∇R‖/(R-m) | λ_eff Sol. 1 (z=½) | QP z_R | λ_eff Sol. 2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ck in a.checkpoints:
        meta = torch.load(ck, map_location="cpu", weights_only=True)["clbench"]
        lmbda = float(meta["lmbda"])
        model = get_codec(f"{meta['arch']}:checkpoint={ck}").model.train()
        crit = RateDistortionLoss(lmbda=lmbda)
        params = [
            p
            for n, p in model.named_parameters()
            if p.requires_grad and not n.endswith("quantiles")
        ]
        rng = np.random.default_rng(0)
        for b in range(a.batches):
            x = to_batch([train[(int(i), b)] for i in rng.integers(0, len(train), a.batch_size)])
            out = crit(model(x), x)
            d_loss, r_loss = out["loss"] - out["bpp_loss"], out["bpp_loss"]
            g_d = torch.autograd.grad(d_loss, params, retain_graph=True, allow_unused=True)
            g_r = torch.autograd.grad(r_loss, params, allow_unused=True)
            qdd, qdr, qrr = gram(g_d, g_r)
            d_val, r_val = float(d_loss.detach()), float(r_loss.detach())
            dd, dr = d_val - m[0], r_val - m[1]
            z_d, z_r = qp_weights(qdd / dd**2, qdr / (dd * dr), qrr / dr**2, 1e-6)
            lam_eff = lmbda * (z_d / dd) / (z_r / dr)
            lam_eff1 = lmbda * dr / dd  # Solution 1 at z = (½, ½)
            rows.append(
                f"| {Path(ck).parent.parent.name}/{Path(ck).parent.name} #{b} | {lmbda:g} | "
                f"{d_val:.2f} | {r_val:.3f} | {qdd**0.5:.2f} | {qrr**0.5:.2f} | "
                f"{qdr / (qdd * qrr) ** 0.5:+.2f} | {qdd**0.5 / dd:.2f} | {qrr**0.5 / dr:.2f} | "
                f"{lam_eff1:.2g} | {z_r:.2f} | {lam_eff:.2g} |"
            )
    text = "\n".join(rows) + "\n"
    print(text, end="")
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
