"""A continually learned neural codec for compressed-exemplar replay.

From "Learning to Classify New Foods Incrementally via Compressed Exemplars" (Yang et al.,
CVPRW 2024): a learned codec (any CompressAI architecture in the zoo) is trained on the
first task's images, then fine-tuned on each new task's images with the DECODER SIDE
frozen, so that bitstreams stored in the buffer earlier still decode to the same pixels.

What is frozen after the first task: every module except the encoder side (``g_a``, and
``h_a`` for hyperprior models), i.e. the synthesis transform, the hyper-synthesis, any
context model and the entropy models with their CDF tables. Only ``g_a``/``h_a`` move, and
the entropy model's quantiles are not touched (no aux step, no ``update()``), so an old
bitstream meets exactly the tables and decoder it was written for. The test suite checks
that pixels decoded from old bitstreams are bit-identical after fine-tuning.

CAM guidance (option ``cam``): the distortion term is weighted per pixel by the
classifier's class-activation map of the image's label, so the foreground the classifier
uses keeps its quality. We compute Grad-CAM on the last 4-D activation of the model, which
equals the original CAM for a global-average-pooled linear head (ResNets) and works for any
CNN backbone without knowing its layer names. Weights are ``floor + (1 - floor) * cam``
normalised to mean 1 per image, so the rate-distortion trade-off (lambda) keeps its scale.

Codec parameters are memory too: :meth:`ContinualCodecStorage.param_bytes` counts the
fp32 state (decoder and encoder: both are needed to keep adding exemplars), reported
separately in the run record and optionally charged against the replay budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.codecs.base import format_spec
from clbench.errors import ConfigError
from clbench.memory import CodecStorage

ENCODER_MODULES = ("g_a", "h_a")


def rd_loss(out: dict[str, Any], x: Tensor, lmbda: float, weight: Tensor | None = None) -> dict:
    """lambda * 255^2 * (weighted) MSE + bpp, CompressAI's RateDistortionLoss with an optional
    per-pixel weight (which CompressAI's loss does not take, hence ours)."""
    n, _, h, w = x.shape
    bpp = sum(torch.log(lk).sum() for lk in out["likelihoods"].values()) / (
        -math.log(2) * n * h * w
    )
    err = (out["x_hat"] - x).pow(2)
    mse = (err * weight).mean() if weight is not None else err.mean()
    return {"loss": lmbda * 255**2 * mse + bpp, "bpp": bpp, "mse": err.mean()}


def grad_cam(model: nn.Module, x: Tensor, y: Tensor, logits: Callable[[Tensor], Tensor]) -> Tensor:
    """Grad-CAM maps in [0, 1], shape (N, 1, H, W), of class ``y`` on the last spatial 4-D
    activation of ``model``'s leaf modules."""
    acts: list[Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1:
            acts.append(out)  # a spatial map (pooled N,C,1,1 outputs are skipped)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            score = logits(x).gather(1, y[:, None]).sum()
            if not acts:
                raise ConfigError(
                    "codec cam: the backbone has no 4-D activation to take a CAM from"
                )
            a = acts[-1]
            (g,) = torch.autograd.grad(score, a)
    finally:
        for h in handles:
            h.remove()
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
    return cam / peak


class ContinualCodecStorage(CodecStorage):
    """Replay storage whose codec is trained on task 0 and encoder-fine-tuned afterwards."""

    def __init__(
        self,
        arch: str = "bmshj2018-factorized",
        arch_kwargs: dict[str, Any] | None = None,
        lmbda: float = 0.0067,
        first_steps: int = 2000,
        task_steps: int = 300,
        batch_size: int = 16,
        lr: float = 1e-4,
        aux_lr: float = 1e-3,
        clip: float = 1.0,
        cam_floor: float = 0.2,
        seed: int = 0,
    ):
        super().__init__(format_spec(arch, {"pretrained": False, **(arch_kwargs or {})}))
        self.model: nn.Module = self.codec.model
        if not hasattr(self.model, "aux_loss"):
            raise ConfigError(f"learned_codec: {arch} is not a trainable CompressAI-style codec")
        self.codec.lmbda = lmbda
        self.arch, self.lmbda = arch, float(lmbda)
        self.first_steps, self.task_steps, self.batch_size = first_steps, task_steps, batch_size
        self.lr, self.aux_lr, self.clip, self.cam_floor = lr, aux_lr, clip, cam_floor
        self.seed = seed
        self.version = 0  # bumped on every fit, so views keyed by name see a new codec
        self.history: list[dict[str, Any]] = []

    # -- the Storage contract: CodecStorage's, with a versioned name ----------------------
    @property
    def name(self) -> str:
        return f"continual:{self.arch}@v{self.version}"

    # -- training -------------------------------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if n.split(".")[0] in ENCODER_MODULES]

    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def fit(self, images: Tensor, weights: Tensor | None = None) -> dict[str, Any]:
        """Train on uint8 NCHW ``images`` (optionally with per-pixel distortion ``weights``,
        N1HW): the whole model the first time, the encoder side only afterwards."""
        from compressai.optimizers import net_aux_optimizer

        first = self.version == 0
        model = self.model.train()
        steps = self.first_steps if first else self.task_steps
        gen = torch.Generator().manual_seed(self.seed + self.version)
        if first:
            optims = net_aux_optimizer(
                model,
                {
                    "net": {"type": "Adam", "lr": self.lr},
                    "aux": {"type": "Adam", "lr": self.aux_lr},
                },
            )
            net, aux = optims["net"], optims["aux"]
            params = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
        else:
            params = self.encoder_parameters()
            net, aux = torch.optim.Adam(params, lr=self.lr), None
        frozen = {n: p.requires_grad for n, p in model.named_parameters()}
        if not first:
            trainable = {id(p) for p in params}
            for p in model.parameters():
                p.requires_grad_(id(p) in trainable)
        t0, stats = time.perf_counter(), []
        try:
            for _ in range(steps):
                idx = torch.randint(
                    0, len(images), (min(self.batch_size, len(images)),), generator=gen
                )
                x = images[idx].float().div_(255.0)
                w = None
                if weights is not None:
                    w = weights[idx]
                    w = self.cam_floor + (1 - self.cam_floor) * w
                    w = w / w.mean((1, 2, 3), keepdim=True)
                flip = torch.rand((), generator=gen) < 0.5
                if flip:
                    x = x.flip(-1)
                    w = w.flip(-1) if w is not None else None
                res = rd_loss(model(x), x, self.lmbda, w)
                net.zero_grad(set_to_none=True)
                res["loss"].backward()
                if self.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.clip)
                net.step()
                if aux is not None:  # entropy-bottleneck quantiles: only while it may change
                    aux.zero_grad(set_to_none=True)
                    model.aux_loss().backward()
                    aux.step()
                stats.append((float(res["bpp"].detach()), float(res["mse"].detach())))
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(frozen[n])
            model.eval()
        if first:  # CDF tables for the trained entropy model, fixed from now on
            model.update(force=True, update_quantiles=True)
        self.version += 1
        tail = np.asarray(stats[-max(1, len(stats) // 10) :])
        rec = {
            "version": self.version,
            "trained": "all" if first else "encoder",
            "steps": steps,
            "images": len(images),
            "seconds": round(time.perf_counter() - t0, 1),
            "train_bpp": float(tail[:, 0].mean()),
            "train_psnr": float(10 * np.log10(1 / max(tail[:, 1].mean(), 1e-12))),
            "cam": weights is not None,
        }
        self.history.append(rec)
        return rec

    # -- checkpointing (the runner's weights-only checkpoints) ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "version": self.version, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, buf in self.model.named_buffers():  # CDF tables: the state's sizes
            if name in state["model"] and buf.shape != state["model"][name].shape:
                buf.resize_(state["model"][name].shape)
        self.model.load_state_dict(state["model"])
        self.version = int(state["version"])
        self.history = list(state["history"])
