"""CUDA check: one AMP training step of CL-LoRA and of learned codecs, and throughput figures.

Run on a GPU machine (no data or weights needed: random-init backbones, synthetic images):

    python benchmarks/perf/cuda_check.py --out results/perf/cuda_check

What it checks, each part independent (a failure is recorded, the others still run):

* CL-LoRA (ViT-B/16 at 224 px, the paper's backbone shape) trained through the strategy and
  the one training engine with ``amp: auto`` (bf16 autocast on CUDA): two tasks, loss finite,
  training and inference images/s, and bf16 vs fp32 logits agreement.
* Learned codecs (CompressAI's bmshj2018-hyperprior and the efficient-LIC family) through
  the codec training engine's step with bf16 autocast (entropy models kept fp32): steps/s
  and crops/s at 256x256, then a CUDA ``compress``/``decompress`` round trip that must
  reproduce ``forward``'s quantised reconstruction (same device encodes and decodes).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int) -> float:
    fn()  # warm-up (cudnn autotune, allocator)
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps


class _Groups:
    """Stands in for an Avalanche dataset: the same tensors for every transform group."""

    def __init__(self, ds):
        self.ds = ds

    def with_transforms(self, group: str):
        return self.ds


def check_cl_lora(device: torch.device, n_img: int, batch: int) -> dict[str, Any]:
    from timm.models.vision_transformer import VisionTransformer
    from torch.utils.data import TensorDataset

    from clbench.config import load_config
    from clbench.strategies.base import STRATEGIES, Experience, StrategyContext

    size, classes_per_task = 224, 10

    def backbone():
        torch.manual_seed(0)
        return VisionTransformer(
            img_size=size, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0
        )

    cfg = load_config(
        {
            "backbone": {"name": "vit_base_patch16_224"},
            "train": {
                "epochs": 1,
                "batch_size": batch,
                "lr": 0.01,
                "amp": "auto",
                "num_workers": 0,
            },
            "strategies": ["cl-lora"],
        }
    )
    ctx = StrategyContext(
        config=cfg,
        num_classes=2 * classes_per_task,
        experience_classes=[list(range(0, 10)), list(range(10, 20))],
        image_size=size,
        make_backbone=backbone,
        device=device,
    )
    s = STRATEGIES.get("cl-lora")(ctx)
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {
        "backbone": "ViT-B/16 (random init), 224 px",
        "batch": batch,
        "images_per_task": n_img,
    }
    for t in range(2):
        cls = ctx.experience_classes[t]
        x = torch.rand(n_img, 3, size, size, generator=g)
        y = torch.tensor([cls[i % len(cls)] for i in range(n_img)])
        ds = TensorDataset(x, y, torch.zeros_like(y))
        exp = Experience(index=t, classes=cls, dataset=_Groups(ds))
        _sync()
        t0 = time.perf_counter()
        s.train_experience(exp)
        _sync()
        dt = time.perf_counter() - t0
        out[f"task{t}_train_s"] = dt
        out[f"task{t}_train_img_per_s"] = n_img / dt  # includes prototypes' feature pass
    xb = torch.rand(batch, 3, size, size, generator=g).to(device)
    with torch.no_grad():
        logits = s.predict(xb)
        out["infer_img_per_s"] = batch / _timed(lambda: s.predict(xb), 5)
        amp = s.amp if hasattr(s, "amp") else None
        out["amp_dtype"] = str(amp)
        s.amp = None  # same weights, fp32
        ref = s.predict(xb)
        s.amp = amp
    out["logits_finite"] = bool(torch.isfinite(logits).all())
    out["bf16_vs_fp32_max_logit_diff"] = float((logits.float() - ref.float()).abs().max())
    out["bf16_vs_fp32_top1_agreement"] = float((logits.argmax(1) == ref.argmax(1)).float().mean())
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def check_codec(spec: str, device: torch.device, batch: int, steps: int) -> dict[str, Any]:
    from clbench.codecs import get_codec
    from clbench.codecs.train import keep_entropy_models_fp32

    codec = get_codec(spec)
    model = codec.model if hasattr(codec, "model") else codec.net
    model = model.to(device).train()
    keep_entropy_models_fp32(model)
    opt = torch.optim.Adam(
        [p for n, p in model.named_parameters() if not n.endswith(".quantiles")], 1e-4
    )
    aux = torch.optim.Adam(
        [p for n, p in model.named_parameters() if n.endswith(".quantiles")], 1e-3
    )
    x = torch.rand(batch, 3, 256, 256, device=device)
    lmbda = 0.0130

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        bpp = sum(torch.log(lk.float()).sum() for lk in out["likelihoods"].values()) / (-0.6931 * n)
        mse = torch.mean((out["x_hat"].float() - x) ** 2)
        loss = lmbda * 255**2 * mse + bpp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        aux.zero_grad(set_to_none=True)
        model.aux_loss().backward()
        aux.step()
        return loss

    loss = step()
    dt = _timed(step, steps)
    res: dict[str, Any] = {
        "spec": spec,
        "batch": batch,
        "crop": 256,
        "params": sum(p.numel() for p in model.parameters()),
        "loss_finite": bool(torch.isfinite(loss)),
        "step_s": dt,
        "crops_per_s": batch / dt,
    }
    model.eval()
    model.update(force=True)
    xi = torch.rand(1, 3, 256, 384, device=device)
    with torch.no_grad():
        ref = model(xi)["x_hat"].clamp(0, 1)
        _sync()
        t0 = time.perf_counter()
        enc = model.compress(xi)
        _sync()
        t1 = time.perf_counter()
        dec = model.decompress(enc["strings"], enc["shape"])
        _sync()
        t2 = time.perf_counter()
    nbits = 8 * sum(
        len(s[0]) for s in enc["strings"] if isinstance(s, list) and s and isinstance(s[0], bytes)
    )
    res.update(
        {
            "cuda_encode_s": t1 - t0,
            "cuda_decode_s": t2 - t1,
            "roundtrip_max_abs_diff_vs_forward": float(
                (dec["x_hat"].clamp(0, 1) - ref).abs().max()
            ),
            "bits_first_level_strings": nbits,
        }
    )
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/perf/cuda_check")
    ap.add_argument("--clora-images", type=int, default=512)
    ap.add_argument("--clora-batch", type=int, default=64)
    ap.add_argument("--codec", action="append", default=None)
    ap.add_argument("--codec-batch", type=int, default=16)
    ap.add_argument("--codec-steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu only to check this script itself")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    report: dict[str, Any] = {
        "command": "python benchmarks/perf/cuda_check.py " + " ".join(f"--out {args.out}".split()),
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "none (cpu)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "parts": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))

    parts = [("cl-lora", lambda: check_cl_lora(dev, args.clora_images, args.clora_batch))]
    for spec in args.codec or [
        "bmshj2018-hyperprior:pretrained=false,N=128,M=192",
        "eff-lic:pretrained=false,transform=resnet,context=hyperprior,N=96,M=192",
        "eff-lic:pretrained=false,transform=convnext,context=channel,N=96,M=192",
        "eff-lic:pretrained=false,transform=swin,context=space-channel,N=96,M=192",
    ]:
        parts.append((spec, lambda s=spec: check_codec(s, dev, args.codec_batch, args.codec_steps)))
    for name, fn in parts:
        t0 = time.perf_counter()
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            report["parts"][name] = fn()
        except Exception as e:  # one part failing must not hide the others' figures
            report["parts"][name] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:],
            }
        report["parts"][name]["wall_s"] = time.perf_counter() - t0
        print(name, json.dumps(report["parts"][name])[:600], flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
