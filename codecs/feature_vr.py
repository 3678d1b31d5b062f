"""Flexible variable-rate feature compression (Hossain, Duan, Huang, Zhu, arXiv 2404.00432).

The frozen task model is cut at a split point; a rate-conditioned autoencoder compresses
the feature there, and the rest of the task model classifies the decoded feature. One
model covers the whole rate range: the rate parameter λ is an input. Architecture, after
the official code (github adnan-hossain/var-feat-comp, ``models/ours.py``)::

    encoder  conv k5 s2 (C -> hidden) - [ConvNeXt block with AdaLN(λ)] x3 (GELU between)
             - conv k3 (hidden -> latent) - EntropyBottleneck (factorized)
    decoder  deconv k5 s2 (latent -> hidden) - [ConvNeXt block with AdaLN(λ)] x3
             - conv k3 (hidden -> C)
    λ embedding  Linear(1, 256) - GELU - Linear(256, embed_dim); each block maps it to a
             per-channel shift and scale of its (affine-free) LayerNorm

Training (``clbench codec icm-train feature-vr``): λ log-uniform per sample over the
trained range; loss = mse_weight · MSE(feature, decoded feature) + mean(λ · bpp), with bpp
counted over the input image's pixels; ``loss: entropic-student`` adds 0.5 CE + 0.5 KL
to the frozen model's own prediction (the entropic student of Matsubara et al.).

Differences from the official code, each for a stated reason:

- bpp in the loss is over the ORIGINAL image's pixels (64x64 for Tiny-ImageNet), which is
  also what evaluation reports; the code's input image is the 224 px ImageNet crop itself,
  here the task model's input is an upsampled copy whose pixel count says nothing of rate;
- the feature is standardised per channel (mean/std of 256 training images, stored with
  the weights) before the encoder and the MSE: EfficientNet-Lite0's stage-3 feature has
  variance ~55, so a raw MSE drowned the rate term at every λ of the code's range. The λ
  range (``feature_vr.yaml``) is re-centred accordingly: 0.1..1000 instead of 1e-7..10.24;

- the embedding reads the normalised log λ, not λ: with λ log-uniform over 8 decades,
  a linear layer on raw λ sees almost every sample as 0;
- the decoder reads the rounded latent through a straight-through estimator (the rate
  term keeps the noise proxy), so training sees exactly the feature decoding produces;
- the entropy bottleneck's quantiles have their own optimizer (CompressAI's aux loss)
  and are solved by bisection before every checkpoint: the code leaves them untrained;
- hidden/latent widths follow the code's ratios (C/2, C/8) with floors (YAML), because
  EfficientNet's early stages have 24-40 channels where ResNet-50's have 256;
- Adam with a cosine decay over the time budget, not SGD over 60 ImageNet epochs.

The codec (``feature-vr:checkpoint=PATH,lmbda=0.32``) writes a real CompressAI bitstream
in the zoo's container (CRC, device kind, λ as float32) and decodes it to the feature.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.codecs import container
from clbench.codecs.base import CorruptDataError
from clbench.codecs.learned import batch_default
from clbench.codecs.registry import register_codec
from clbench.codecs.task_model import (
    FeatureCodec,
    TaskModel,
    fit_entropy_buffers,
    read_icm_checkpoint,
    task_model_for,
)
from clbench.config import yaml_beside
from clbench.errors import ClbenchError

NAME = "feature-vr"


@cache
def feature_vr_defaults() -> dict[str, Any]:
    return yaml_beside(__file__, "feature_vr.yaml")


class AdaLNConvNeXtBlock(nn.Module):
    """ConvNeXt block whose LayerNorm takes its shift and scale from the λ embedding."""

    def __init__(
        self,
        dim: int,
        embed_dim: int,
        kernel: int = 7,
        mlp_ratio: float = 4.0,
        ls_init: float = 1e-6,
    ):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ada = nn.Sequential(nn.GELU(), nn.Linear(embed_dim, 2 * dim))
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init)))  # layer scale, as ConvNeXt

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))  # NHWC
        shift, scale = self.ada(emb)[:, None, None, :].chunk(2, dim=-1)
        y = self.mlp(y * (1 + scale) + shift) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class _Coder(nn.Module):
    def __init__(
        self, cin: int, hidden: int, cout: int, embed_dim: int, depth: int, up: bool, ls_init: float
    ):
        super().__init__()
        if up:
            self.inp: nn.Module = nn.ConvTranspose2d(cin, hidden, 5, 2, padding=2, output_padding=1)
        else:
            self.inp = nn.Conv2d(cin, hidden, 5, 2, padding=2)
        self.blocks = nn.ModuleList(
            AdaLNConvNeXtBlock(hidden, embed_dim, ls_init=ls_init) for _ in range(depth)
        )
        self.out = nn.Conv2d(hidden, cout, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.inp(x)
        for i, b in enumerate(self.blocks):
            x = b(F.gelu(x) if i else x, emb)
        return self.out(x)


class FeatureVRNet(nn.Module):
    """The rate-conditioned feature autoencoder with a factorized entropy bottleneck."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        latent: int,
        embed_dim: int = 1024,
        depth: int = 3,
        lmbda_min: float = 1e-7,
        lmbda_max: float = 10.24,
        ls_init: float = 1e-6,
    ):
        from compressai.entropy_models import EntropyBottleneck

        super().__init__()
        if not 0 < lmbda_min < lmbda_max:
            raise ClbenchError(f"feature-vr: lambda range [{lmbda_min}, {lmbda_max}] is invalid")
        self.lmbda_min, self.lmbda_max = float(lmbda_min), float(lmbda_max)
        self.embedding = nn.Sequential(nn.Linear(1, 256), nn.GELU(), nn.Linear(256, embed_dim))
        self.encoder = _Coder(channels, hidden, latent, embed_dim, depth, up=False, ls_init=ls_init)
        self.decoder = _Coder(latent, hidden, channels, embed_dim, depth, up=True, ls_init=ls_init)
        self.entropy_bottleneck = EntropyBottleneck(latent)
        # Per-channel statistics of the split feature (set from training data before the
        # first step): the autoencoder and its MSE work on standardised features.
        self.register_buffer("f_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("f_std", torch.ones(1, channels, 1, 1))

    @torch.no_grad()
    def calibrate(self, f: Tensor) -> None:
        self.f_mean.copy_(f.mean((0, 2, 3), keepdim=True))
        self.f_std.copy_(f.std((0, 2, 3), keepdim=True).clamp_min(1e-6))

    def analysis(self, f: Tensor, emb: Tensor) -> Tensor:
        """Feature -> latent (before quantisation)."""
        return self.encoder(self._pad_even((f - self.f_mean) / self.f_std), emb)

    def synthesis(self, z_hat: Tensor, emb: Tensor, size: tuple[int, int]) -> Tensor:
        """Quantised latent -> feature of spatial ``size``."""
        return self.decoder(z_hat, emb)[..., : size[0], : size[1]] * self.f_std + self.f_mean

    def embed(self, lmbda: Tensor) -> Tensor:
        lo, hi = math.log(self.lmbda_min), math.log(self.lmbda_max)
        t = (lmbda.float().log() - lo) / (hi - lo)
        return self.embedding(t.view(-1, 1))

    def sample_lmbda(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """λ log-uniform over the trained range, one per sample (the code's sampling)."""
        lo, hi = math.log(self.lmbda_min), math.log(self.lmbda_max)
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator))

    @staticmethod
    def _pad_even(f: Tensor) -> Tensor:
        h, w = f.shape[-2:]
        return F.pad(f, (0, w % 2, 0, h % 2), mode="replicate") if h % 2 or w % 2 else f

    def _medians(self) -> Tensor:
        return self.entropy_bottleneck.quantiles[:, 0, 1].detach().view(1, -1, 1, 1)

    def forward(self, f: Tensor, lmbda: Tensor) -> dict[str, Tensor]:
        """Feature -> decoded feature and the latent's likelihoods (training and eval)."""
        from compressai.ops import quantize_ste

        emb = self.embed(lmbda)
        z = self.analysis(f, emb)
        _, likelihoods = self.entropy_bottleneck(z)  # noise in training: the rate proxy
        m = self._medians()
        z_hat = quantize_ste(z - m) + m  # what decompress returns, exactly
        f_hat = self.synthesis(z_hat, emb, f.shape[-2:])
        return {"f_hat": f_hat, "likelihoods": likelihoods, "z_hat": z_hat}

    def normalised_mse(self, f_hat: Tensor, f: Tensor) -> Tensor:
        return (((f_hat - f) / self.f_std) ** 2).mean()

    def aux_loss(self) -> Tensor:
        return self.entropy_bottleneck.loss()


def build_net(channels: int, options: dict[str, Any]) -> FeatureVRNet:
    """A FeatureVRNet for a feature with ``channels`` channels from method options."""
    hidden = options.get("hidden") or max(
        int(channels * options["hidden_ratio"]), options["min_hidden"]
    )
    latent = options.get("latent") or max(
        int(channels * options["latent_ratio"]), options["min_latent"]
    )
    return FeatureVRNet(
        channels,
        int(hidden),
        int(latent),
        embed_dim=int(options["embed_dim"]),
        depth=int(options["depth"]),
        lmbda_min=float(options["lmbda_min"]),
        lmbda_max=float(options["lmbda_max"]),
        ls_init=float(options["ls_init"]),
    )


def bits_per_pixel(likelihoods: Tensor, pixels: int) -> Tensor:
    """Per-sample -log2 likelihood summed over the latent, over ``pixels`` (the original's)."""
    return -torch.log2(likelihoods).flatten(1).sum(1) / pixels


# ---------------------------------------------------------------------------------------
# the codec


@register_codec(NAME, "var-feat-comp")
class FeatureVRCodec(FeatureCodec):
    """var-feat-comp: variable-rate feature codec at a task model's split (checkpoint=, lmbda=)."""

    rate_knob = "lmbda"

    def __init__(
        self,
        checkpoint: str | None = None,
        lmbda: float | None = None,
        weights: str | None = None,
        data_root: str | None = None,
        device: str = "cpu",
        batch: int | None = None,
        cross_device: bool = False,
    ):
        self.checkpoint, self.weights, self.data_root = checkpoint, weights, data_root
        self.device, self.cross_device = str(device), bool(cross_device)
        state, meta = read_icm_checkpoint(checkpoint, NAME)
        self.meta = meta
        lo, hi = meta["arch"]["lmbda_min"], meta["arch"]["lmbda_max"]
        if lmbda is None:
            raise ClbenchError(
                f"codec {NAME}: pass lmbda= (the checkpoint {checkpoint} was trained for {lo:g}..{hi:g})"
            )
        self.lmbda = float(lmbda)
        self._lam32 = float(np.float32(lmbda))  # the container stores float32; both sides use it
        if not (np.float32(lo) <= self._lam32 <= np.float32(hi)):
            raise ClbenchError(
                f"codec {NAME}: lmbda={lmbda} is outside the trained range {lo:g}..{hi:g} of {checkpoint}"
            )
        self.task_model: TaskModel = task_model_for(meta, NAME, checkpoint, weights, data_root).to(
            self.device
        )
        self.split = meta["split"]
        self.net = FeatureVRNet(**meta["arch"])
        try:
            fit_entropy_buffers(self.net, state)
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise ClbenchError(
                f"codec {NAME}: checkpoint {checkpoint} does not fit its recorded architecture: {str(e).splitlines()[0]}"
            ) from None
        self.net.eval().to(self.device)
        self.net.entropy_bottleneck.update(force=True)
        self.batch_default = batch_default(self.net)
        self.batch = self.batch_default if batch is None else int(batch)
        self.model = self.net  # what the evaluation wing's complexity counts as the codec's network
        self.feature_shape = self.task_model.feature_shape(self.split)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"checkpoint": self.checkpoint, "lmbda": self.lmbda}
        if self.weights:
            opts["weights"] = self.weights
        if self.device != "cpu":
            opts["device"] = self.device
        if self.batch != self.batch_default:
            opts["batch"] = self.batch
        return opts

    def _kind(self) -> str:
        return torch.device(self.device).type

    def _lam(self, n: int, value: float) -> Tensor:
        return torch.full((n,), value, dtype=torch.float32, device=self.device)

    def encode_batch(self, images: list[np.ndarray]) -> list[bytes]:
        out: list[bytes | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[im.shape[:2]].append(i)
        with torch.inference_mode():
            for (h, w), idx in groups.items():
                for s in range(0, len(idx), self.batch):
                    chunk = idx[s : s + self.batch]
                    x = self.task_model.preprocess(np.stack([images[i] for i in chunk]))
                    f = self.task_model.front(x, self.split)
                    z = self.net.analysis(f, self.net.embed(self._lam(len(chunk), self._lam32)))
                    strings = self.net.entropy_bottleneck.compress(z)
                    shape = [int(v) for v in z.shape[-2:]]
                    for j, i in enumerate(chunk):
                        out[i] = container.pack(
                            container.Packet(
                                NAME, 0, self._lam32, h, w, self._kind(), shape, [strings[j]]
                            )
                        )
        return out  # type: ignore[return-value]

    def payload_size(self, data: bytes) -> int:
        return container.unpack(data, self.spec).payload_bytes

    def decode_batch(self, data: list[bytes]) -> list[np.ndarray]:
        packets = [container.unpack(b, self.spec, i) for i, b in enumerate(data)]
        groups: dict[tuple[float, str], list[int]] = defaultdict(list)
        for i, p in enumerate(packets):
            if p.model != NAME or len(p.strings) != 1:
                raise CorruptDataError(
                    f"codec {self.spec}: item {i} was encoded by {p.model}; decode it with that codec"
                )
            if p.device != self._kind() and not self.cross_device:
                raise CorruptDataError(
                    f"codec {self.spec}: item {i} was encoded on {p.device}; CompressAI bitstreams only decode "
                    f"reliably on the same kind of device: use device={p.device} (or cross_device=true)"
                )
            groups[(p.lmbda, repr(p.shape))].append(i)
        out: list[np.ndarray | None] = [None] * len(data)
        c, fh, fw = self.feature_shape
        with torch.inference_mode():
            for (lam, _), idx in groups.items():
                shape = tuple(packets[idx[0]].shape)
                for s in range(0, len(idx), self.batch):
                    chunk = idx[s : s + self.batch]
                    try:
                        z_hat = self.net.entropy_bottleneck.decompress(
                            [packets[i].strings[0] for i in chunk], shape
                        )
                        f = self.net.synthesis(
                            z_hat, self.net.embed(self._lam(len(chunk), lam)), (fh, fw)
                        )
                    except Exception as e:
                        raise CorruptDataError(
                            f"codec {self.spec}: cannot decode item {chunk[0]}: {type(e).__name__}: {e}"
                        ) from None
                    f = f.float().cpu().numpy()
                    for j, i in enumerate(chunk):
                        out[i] = f[j]
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# training (the method the ICM loop runs; see codecs/icm_train.py)

from clbench.codecs.icm_train import ICMMethod, register_icm_method  # noqa: E402


@register_icm_method(NAME)
class FeatureVRMethod(ICMMethod):
    """var-feat-comp: feature MSE + λ·bpp with λ log-uniform per sample (or the entropic student)."""

    defaults_file = "feature_vr.yaml"
    LOSSES = ("feature-mse", "entropic-student")

    def build(self, tm: TaskModel, split: str) -> nn.Module:
        o = self.options
        if o["loss"] not in self.LOSSES:
            raise ClbenchError(
                f"feature-vr: loss {o['loss']!r} is invalid; use one of {', '.join(self.LOSSES)}"
            )
        self.split = split
        self.net = build_net(tm.feature_shape(split)[0], o)
        return self.net

    def calibrate(self, model: nn.Module, tm: TaskModel, x: Tensor) -> None:
        model.calibrate(tm.front(x, self.split))

    def arch(self) -> dict[str, Any]:
        n = self.net
        return {
            "channels": n.encoder.inp.in_channels,
            "hidden": n.encoder.inp.out_channels,
            "latent": n.encoder.out.out_channels,
            "embed_dim": n.embedding[-1].out_features,
            "depth": len(n.encoder.blocks),
            "lmbda_min": n.lmbda_min,
            "lmbda_max": n.lmbda_max,
        }

    def _forward(
        self, net: FeatureVRNet, tm: TaskModel, x: Tensor, lmbda: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            f = tm.front(x, self.split)
        return f, net(f, lmbda)

    def loss(
        self, model: nn.Module, tm: TaskModel, x: Tensor, y: Tensor, g: torch.Generator, pixels: int
    ) -> dict[str, Tensor]:
        lmbda = model.sample_lmbda(len(x), g)
        f, out = self._forward(model, tm, x, lmbda)
        bpp = bits_per_pixel(out["likelihoods"], pixels)
        mse = model.normalised_mse(out["f_hat"], f)
        loss = self.options["mse_weight"] * mse + (lmbda * bpp).mean()
        res = {"loss": loss, "bpp": bpp.mean(), "mse": mse}
        if self.options["loss"] == "entropic-student":
            w = self.options["student_weights"]
            logits = tm.back(out["f_hat"], self.split)
            with torch.no_grad():
                teacher = tm.back(f, self.split).softmax(1)
            ce = F.cross_entropy(logits, y)
            kl = F.kl_div(logits.log_softmax(1), teacher, reduction="batchmean")
            res.update(loss=loss + w["ce"] * ce + w["kl"] * kl, ce=ce, kl=kl)
        return res

    def validate(
        self, model: nn.Module, tm: TaskModel, x: Tensor, y: Tensor, pixels: int
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for lam in self.options["eval_lmbdas"]:
            f, res = self._forward(model, tm, x, torch.full((len(x),), float(lam)))
            logits = tm.back(res["f_hat"], self.split)
            out[f"top1@{lam:g}"] = float((logits.argmax(1) == y).float().mean() * 100)
            out[f"bpp@{lam:g}"] = float(bits_per_pixel(res["likelihoods"], pixels).mean())
        return out

    def aux_loss(self, model: nn.Module) -> Tensor:
        return model.aux_loss()

    def before_save(self, model: nn.Module) -> None:
        model.entropy_bottleneck.update(force=True, update_quantiles=True)
