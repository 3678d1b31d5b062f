"""``continual``: a continually learned neural codec for compressed-exemplar replay.

From "Learning to Classify New Foods Incrementally via Compressed Exemplars" (Yang et al.,
CVPRW 2024): a learned codec (any trainable CompressAI architecture in the zoo) is trained
on the first task's images, then fine-tuned on each new task's images with the DECODER SIDE
frozen, so that bitstreams stored in the buffer earlier still decode to the same pixels.

A codec spec like the others::

    continual:arch=bmshj2018-factorized,N=64,M=96,lmbda=0.013,first_steps=2000,cam=true

Options: ``arch`` (the CompressAI family), the training options of :class:`ContinualCodec`,
and every other option goes to the architecture's codec (``N``, ``M``, ``device``, ``pad``).
Until its first :meth:`ContinualCodec.fit` the model is random: the compressed-replay
strategies fit it after each task, before that task's exemplars are encoded.

What is frozen after the first task: every module except the encoder side (``g_a``, and
``h_a`` for hyperprior models), i.e. the synthesis transform, the hyper-synthesis, any
context model and the entropy models with their CDF tables. Only ``g_a``/``h_a`` move, and
the entropy model's quantiles are not touched (no aux step, no ``update()``), so an old
bitstream meets exactly the tables and decoder it was written for. The test suite checks
that pixels decoded from old bitstreams are bit-identical after fine-tuning.

Per-pixel distortion weights (``fit(images, weights)``): the strategy passes the
classifier's class-activation maps when ``cam=true``; they enter the loss as
``cam_floor + (1 - cam_floor) * w`` normalised to mean 1 per image, so the rate-distortion
trade-off (lambda) keeps its scale.

Codec parameters are memory too: :meth:`ContinualCodec.param_bytes` counts the fp32 state
(decoder and encoder: both are needed to keep adding exemplars), reported separately in the
run record and optionally charged against the replay budget. torch and CompressAI are
imported when a codec is built, so registering this family costs nothing.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from clbench.codecs.base import Codec, format_spec
from clbench.codecs.registry import get_codec, register_codec
from clbench.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

ENCODER_MODULES = ("g_a", "h_a")


def rd_loss(out: dict[str, Any], x: Tensor, lmbda: float, weight: Tensor | None = None) -> dict:
    """lambda * 255^2 * (weighted) MSE + bpp, CompressAI's RateDistortionLoss with an optional
    per-pixel weight (which CompressAI's loss does not take, hence ours)."""
    import torch

    n, _, h, w = x.shape
    bpp = sum(torch.log(lk).sum() for lk in out["likelihoods"].values()) / (
        -math.log(2) * n * h * w
    )
    err = (out["x_hat"] - x).pow(2)
    mse = (err * weight).mean() if weight is not None else err.mean()
    return {"loss": lmbda * 255**2 * mse + bpp, "bpp": bpp, "mse": err.mean()}


@register_codec("continual")
class ContinualCodec(Codec):
    """A CompressAI architecture trained on task 0 and encoder-fine-tuned afterwards."""

    rate_knob = "lmbda"

    def __init__(
        self,
        arch: str = "bmshj2018-factorized",
        lmbda: float = 0.0067,
        first_steps: int = 2000,
        task_steps: int = 300,
        batch_size: int = 16,
        lr: float = 1e-4,
        aux_lr: float = 1e-3,
        clip: float = 1.0,
        cam: bool = False,
        cam_floor: float = 0.2,
        seed: int = 0,
        **arch_options: Any,
    ):
        self.inner = get_codec(format_spec(arch, {"pretrained": False, **arch_options}))
        self.model: nn.Module = getattr(self.inner, "model", None)
        if not hasattr(self.model, "aux_loss"):
            raise ConfigError(f"codec continual: {arch} is not a trainable CompressAI-style codec")
        self.inner.lmbda = float(lmbda)  # written into every bitstream's header
        self.arch, self.arch_options, self.lmbda = arch, dict(arch_options), float(lmbda)
        self.first_steps, self.task_steps, self.batch_size = first_steps, task_steps, batch_size
        self.lr, self.aux_lr, self.clip = lr, aux_lr, clip
        self.cam, self.cam_floor, self.seed = bool(cam), cam_floor, seed
        self.version = 0  # bumped on every fit: views of data decoded by it are then stale
        self.history: list[dict[str, Any]] = []

    def options(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            **self.arch_options,
            "lmbda": self.lmbda,
            "first_steps": self.first_steps,
            "task_steps": self.task_steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "aux_lr": self.aux_lr,
            "clip": self.clip,
            "cam": self.cam,
            "cam_floor": self.cam_floor,
            "seed": self.seed,
        }

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        """The architecture's constructor arguments (N, M, ...) after defaults."""
        return dict(self.inner.arch_kwargs)

    # -- the codec contract: the inner CompressAI codec's bitstreams -------------------------
    def encode_batch(self, images: list[np.ndarray]) -> list[bytes]:
        return self.inner.encode_batch(images)

    def decode_batch(self, data: list[bytes]) -> list[np.ndarray]:
        return self.inner.decode_batch(data)

    def payload_size(self, data: bytes) -> int:
        return self.inner.payload_size(data)

    # -- training -------------------------------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if n.split(".")[0] in ENCODER_MODULES]

    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    def fit(self, images: Tensor, weights: Tensor | None = None) -> dict[str, Any]:
        """Train on uint8 NCHW ``images`` (optionally with per-pixel distortion ``weights``,
        N1HW): the whole model the first time, the encoder side only afterwards."""
        import torch
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
