"""BG-VAE: a variable-rate hierarchical VAE codec trained under the guidance of a model of
the information R-D bound (Zhang, Duan, Huang, Zhu, "Theoretical Bound-Guided Hierarchical
VAE for Neural Image Codecs", arXiv 2403.18535), in the style of QARV
(duanzhiihao/lossy-vae).

**The student** (``bgvae:...``): one model for every λ in ``[lmin, lmax]``.

- Bottom-up encoder: a stride-4 patch stem, then λ-modulated ConvNeXt blocks and stride-2
  patch merging to strides 8, 16, 32 and 64 (features kept at each).
- Top-down decoder: the topmost latent (stride 64, ``top`` channels) has CompressAI's
  factorized ``EntropyBottleneck`` prior; its decoded value, added to a learned bias, starts
  the top-down path. Then ``latents`` latent blocks at strides 32, 16 and 8, each QARV's:
  a block predicts the prior (mean, scale) of its latent from the top-down feature, the
  posterior mean from that feature and the encoder's feature of the same stride, the latent
  is coded as a discretized Gaussian (CompressAI's ``GaussianConditional``: uniform noise
  in training, ``round(q - μ) + μ`` in coding, real range coding of ``round(q - μ)``) and
  added back into the feature. Then blocks and x2 upsampling to stride 4, and a pixel
  shuffle to the image.
- λ: the log of λ, normalised over the range, goes through sinusoidal features and an
  MLP to an embedding that modulates *every* block (AdaLN: shift and scale of the
  normalised features), in both paths. λ is in CompressAI's units (loss =
  λ·255²·MSE + bpp), so it means the same as for every other codec here. With
  ``gain=true`` (default; our addition) every latent is also coded in units of 1/g,
  g = exp(½·log(λ/λ_mid) + a per-channel correction from the embedding, zero at init):
  the step starts at the high-rate optimum (∝ λ^-½), so the rate follows λ from the
  first step instead of after the long training QARV's modulation alone needs.
- Bitstream: one segment per latent, top-down; the λ it was coded at travels in the
  latent "shape" (its float32 bits), so a decoder needs nothing but the bytes. Decoding a
  prefix of the segments is *progressive decoding*: the latents whose segments are
  missing take their prior mean (:func:`decode_progressive`).

**The teacher** (``bgvae:bound=true``): the same family, wider, trained without
quantisation or entropy coding to estimate the information R-D function: each latent has
a Gaussian posterior N(μ_q, σ_q²) sampled by reparameterisation and its rate is
KL(q || p) (the top latent keeps additive uniform noise through its factorized density).
R + λ·D of such a model is achievable by the information R-D function (Yang and Mandt's
upper bound), so its curve is the bound the student is guided toward; it has no
bitstream.

**Guidance** (``--method bgvae --method-opt teacher=PATH``): per batch, λ is drawn
log-uniformly per image over the model's range; the loss is the student's own rate and
λ-weighted distortion plus ``w_feat`` x the mean squared difference of the spatial
affinity matrices (cosine similarity between positions) of the student's and teacher's
top-down features after every latent, plus ``w_rec`` x the λ-weighted squared distance
between the two reconstructions. The teacher runs on its posterior means (no sampling)
at the same λ. Affinities, not features, are matched because the two differ in width;
the paper's exact normalisation is not public, so both weights are options.

Two options against unused top latents (our addition; both off by default):
``free_bits=B`` floors each latent's rate term at B bpp (a latent coded below the floor is
not pushed further towards zero), ``rate_warmup=N`` ramps the rate term's weight from 0
to 1 over the first N steps (KL annealing).
"""

from __future__ import annotations

import math
import statistics
import struct
from functools import cache
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from clbench.codecs import container
from clbench.codecs.base import CorruptDataError
from clbench.codecs.learned import CompressAICodec, import_compressai
from clbench.codecs.registry import get_codec, register_codec
from clbench.codecs.train_methods import TrainMethod, register_train_method
from clbench.config import yaml_beside
from clbench.errors import ClbenchError

if TYPE_CHECKING:
    import torch

    from clbench.codecs.train import TrainConfig, TrainRun

STRIDES = (32, 16, 8)  # strides of the latent blocks, after the top latent at stride 64


@cache
def bgvae_config() -> dict[str, Any]:
    """The parsed ``bgvae.yaml``."""
    return yaml_beside(__file__, "bgvae.yaml")


def parse_latents(text: Any) -> list[int]:
    """``"2/2/1"`` -> latent blocks at strides 32, 16, 8; one-line error otherwise."""
    try:
        counts = [int(v) for v in str(text).replace("/", ",").split(",")]
    except ValueError:
        counts = []
    if len(counts) != len(STRIDES) or min(counts) < 0:
        raise ClbenchError(
            f"codec bgvae: latents={text!r} is invalid; give {len(STRIDES)} counts >= 0 of "
            f"latent blocks at strides {', '.join(map(str, STRIDES))}, e.g. latents=2/2/1"
        )
    return counts


def lmbda_bits(lmbda: float) -> int:
    """The float32 bit pattern of λ (how the bitstream carries it, exactly)."""
    return struct.unpack("<I", struct.pack("<f", lmbda))[0]


def lmbda_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", int(bits)))[0]


# -- the networks (built on first use: importing this module stays cheap) ----------------------


@cache
def _nets() -> SimpleNamespace:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from timm.layers import Mlp

    import_compressai()
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.models.base import CompressionModel, get_scale_table

    cfg = bgvae_config()

    class LambdaEmbedding(nn.Module):
        """log λ, normalised over [lmin, lmax], as sinusoidal features, then an MLP."""

        def __init__(self, dim: int, lmin: float, lmax: float):
            super().__init__()
            self.lo, self.span = math.log(lmin), math.log(lmax) - math.log(lmin)
            freqs = math.pi * 2.0 ** torch.linspace(0, 5, dim // 2)
            self.register_buffer("freqs", freqs, persistent=False)
            self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

        def forward(self, lmbda: torch.Tensor) -> torch.Tensor:
            u = (
                (lmbda.log() - self.lo) / self.span
                if self.span > 0
                else torch.full_like(lmbda, 0.5)
            )
            ang = u[:, None] * self.freqs[None]
            return self.mlp(torch.cat([ang.sin(), ang.cos()], 1))

    class AdaLNBlock(nn.Module):
        """ConvNeXt block (depth-wise conv, LayerNorm, MLP, layer scale) whose normalised
        features are shifted and scaled from the λ embedding (AdaLN, as QARV)."""

        def __init__(self, ch: int, emb: int, kernel: int, mlp_ratio: float):
            super().__init__()
            self.dw = nn.Conv2d(ch, ch, kernel, padding=kernel // 2, groups=ch)
            self.mod = nn.Sequential(nn.GELU(), nn.Linear(emb, 2 * ch))
            self.mlp = Mlp(ch, int(ch * mlp_ratio), ch, act_layer=nn.GELU)
            self.gamma = nn.Parameter(torch.full((ch,), float(cfg["ls_init"])))

        def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            h = self.dw(x).permute(0, 2, 3, 1)
            h = F.layer_norm(h, h.shape[-1:])
            shift, scale = self.mod(e)[:, None, None, :].chunk(2, -1)
            h = self.mlp(h * (1 + scale) + shift) * self.gamma
            # back to the standard layout: the decoder's tensors are contiguous, and other
            # strides would mean other kernels and other rounding than the encoder's
            return x + h.permute(0, 3, 1, 2).contiguous()

    class Stage(nn.ModuleList):
        def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            for blk in self:
                x = blk(x, e)
            return x

    def stage(n: int, ch: int, emb: int, kernel: int, ratio: float) -> Stage:
        return Stage(AdaLNBlock(ch, emb, kernel, ratio) for _ in range(n))

    def upsample(ch: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(ch, 4 * ch, 1), nn.PixelShuffle(2))

    def bounded_scale(raw: torch.Tensor, floor: float) -> torch.Tensor:
        """exp of a log-scale kept above log(floor) smoothly (QARV's prior scale)."""
        lo = math.log(floor)
        return torch.exp(F.softplus(raw.float() - lo) + lo)

    def quantization_gain(emb: int, ch: int) -> nn.Module:
        """Per-channel log-gain correction from the λ embedding, zero at init."""
        lin = nn.Linear(emb, ch)
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
        return lin

    def gain_of(gain: nn.Module | None, e: torch.Tensor, lg: torch.Tensor) -> Any:
        """g = exp(lg + correction(e)) per image and channel (B, C, 1, 1), or 1 without a
        gain. ``lg`` = ½·log(λ/λ_mid) starts every latent at the high-rate optimum: at a
        fixed MSE slope λ, the best uniform step is ∝ λ^-½."""
        if gain is None:
            return 1.0
        return torch.exp(lg[:, None].float() + gain(e).float())[:, :, None, None]

    class LatentBlock(nn.Module):
        """One latent of the top-down path: prior from the feature, posterior from the
        feature and the encoder's feature, the latent coded, then fused into the feature."""

        def __init__(
            self, ch: int, zdim: int, emb: int, kernel: int, ratio: float, bound: bool, gain: bool
        ):
            super().__init__()
            self.bound = bound
            self.gain = quantization_gain(emb, zdim) if gain and not bound else None
            self.front = AdaLNBlock(ch, emb, kernel, ratio)
            self.prior = nn.Conv2d(ch, 2 * zdim, 1)
            self.merge = nn.Conv2d(2 * ch, ch, 1)
            self.post = AdaLNBlock(ch, emb, kernel, ratio)
            self.post_out = nn.Conv2d(ch, zdim * (2 if bound else 1), 3, padding=1)
            self.z_proj = nn.Conv2d(zdim, ch, 1)
            self.end = AdaLNBlock(ch, emb, kernel, ratio)
            self.gc = GaussianConditional(None)

        def _prior(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pm, raw = self.prior(f).chunk(2, 1)
            return pm, bounded_scale(raw, 0.1)

        def _posterior(self, f: torch.Tensor, enc: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            return self.post_out(self.post(self.merge(torch.cat([f, enc], 1)), e))

        def forward(
            self,
            f: torch.Tensor,
            e: torch.Tensor,
            lg: torch.Tensor,
            enc: torch.Tensor | None = None,
            mode: str = "forward",
            strings: list[bytes] | None = None,
            sample: bool = True,
        ) -> tuple[torch.Tensor, dict[str, Any]]:
            f = self.front(f, e)
            pm, pv = self._prior(f)
            out: dict[str, Any] = {}
            # the latent is coded in units of 1/g: (q, μ, σ) -> g·(q, μ, σ), decoded / g
            g = gain_of(self.gain, e, lg)
            if mode == "forward" and self.bound:
                qm, raw = self._posterior(f, enc, e).float().chunk(2, 1)
                qs = bounded_scale(raw, 1e-3)
                z = qm + qs * torch.randn_like(qm) if sample else qm
                pmf = pm.float()
                kl = (pv / qs).log() + (qs**2 + (qm - pmf) ** 2) / (2 * pv**2) - 0.5
                # as a "likelihood" 2^-bits: what CompressAI's rate terms take the log of
                out["likelihoods"] = torch.exp(-kl.clamp(0, 80))
            elif mode == "forward":
                q = self._posterior(f, enc, e)
                z, out["likelihoods"] = self.gc(q * g, pv * g, means=pm * g)
                z = z / g
            elif mode == "compress":
                q, m = self._posterior(f, enc, e) * g, pm * g
                out["strings"] = self.gc.compress(q, self.gc.build_indexes(pv * g), means=m)
                z = self.gc.quantize(q, "dequantize", m) / g
            elif mode == "decompress":
                z = self.gc.decompress(strings, self.gc.build_indexes(pv * g), means=pm * g) / g
            else:  # "prior": progressive decoding of a latent whose segment is missing
                z = pm
            return self.end(f + self.z_proj(z.to(f.dtype)), e), out

    class BGVAE(CompressionModel):
        """The variable-rate hierarchical VAE (student, or with ``bound=True`` the teacher)."""

        def __init__(
            self,
            width: int,
            zdim: int,
            top: int,
            latents: str,
            blocks: int,
            kernel: int,
            mlp_ratio: float,
            embed: int,
            lmin: float,
            lmax: float,
            bound: bool,
            gain: bool = False,
        ):
            super().__init__()
            for key, v, lo in (
                ("width", width, 1), ("zdim", zdim, 1), ("top", top, 1),
                ("blocks", blocks, 0), ("kernel", kernel, 1), ("embed", embed, 2),
            ):  # fmt: skip
                if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                    raise ClbenchError(f"codec bgvae: {key}={v!r} must be an integer >= {lo}")
            if not (isinstance(lmin, (int, float)) and isinstance(lmax, (int, float))) or not (
                0 < lmin <= lmax < math.inf
            ):
                raise ClbenchError(
                    f"codec bgvae: lmin={lmin!r}, lmax={lmax!r} must satisfy 0 < lmin <= lmax"
                )
            counts = parse_latents(latents)
            self.lmin, self.lmax, self.bound = float(lmin), float(lmax), bool(bound)
            self.default_lmbda = self.default_mid = math.sqrt(self.lmin * self.lmax)
            W, E, k, r = width, embed, kernel, float(mlp_ratio)
            self.embedding = LambdaEmbedding(E, self.lmin, self.lmax)
            # bottom-up
            self.stem = nn.Conv2d(3, W, 4, stride=4)
            self.enc = nn.ModuleDict({"4": stage(blocks, W, E, k, r)})
            self.down = nn.ModuleDict()
            for s in (8, 16, 32, 64):
                self.down[str(s)] = nn.Conv2d(W, W, 2, stride=2)
                self.enc[str(s)] = stage(blocks, W, E, k, r)
            # the top latent
            self.top_enc = AdaLNBlock(W, E, k, r)
            self.top_out = nn.Conv2d(W, top, 1)
            self.entropy_bottleneck = EntropyBottleneck(top)
            self.top_gain = quantization_gain(E, top) if gain and not self.bound else None
            self.top_proj = nn.Conv2d(top, W, 1)
            self.bias = nn.Parameter(torch.zeros(1, W, 1, 1))
            self.dec = nn.ModuleDict({"64": stage(blocks, W, E, k, r)})
            # top-down
            self.up = nn.ModuleDict()
            self.latent_blocks = nn.ModuleDict()
            for s, n in zip(STRIDES, counts, strict=True):
                self.up[str(s)] = upsample(W)
                self.latent_blocks[str(s)] = nn.ModuleList(
                    LatentBlock(W, zdim, E, k, r, self.bound, bool(gain)) for _ in range(n)
                )
                self.dec[str(s)] = stage(blocks, W, E, k, r)
            self.up["4"] = upsample(W)
            self.dec["4"] = stage(blocks, W, E, k, r)
            self.out = nn.Sequential(nn.Conv2d(W, 3 * 16, 1), nn.PixelShuffle(4))
            self.num_latents = 1 + sum(counts)

        # -- λ --------------------------------------------------------------------------
        def lmbda_vector(self, lmbda: Any, n: int, device: Any) -> torch.Tensor:
            if lmbda is None:
                lmbda = self.default_lmbda
            if isinstance(lmbda, torch.Tensor) and lmbda.numel() == n and lmbda.dim() == 1:
                return lmbda.to(device, torch.float32)
            return torch.full((n,), float(lmbda), device=device, dtype=torch.float32)

        def cond(self, lm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """The λ embedding and the base log-gain ½·log(λ/λ_mid) of each image."""
            return self.embedding(lm), 0.5 * (lm / self.default_mid).log()

        def in_range(self, lmbda: float) -> bool:
            tol = 1e-6 * self.lmax  # float32 rounding of the range ends
            return self.lmin - tol <= lmbda <= self.lmax + tol

        # -- the passes ------------------------------------------------------------------
        def _encode(self, x: torch.Tensor, e: torch.Tensor) -> dict[int, torch.Tensor]:
            f = self.enc["4"](self.stem(x * 2 - 1), e)
            feats = {}
            for s in (8, 16, 32, 64):
                f = self.enc[str(s)](self.down[str(s)](f), e)
                feats[s] = f
            return feats

        def _top_down(
            self,
            e: torch.Tensor,
            z0: torch.Tensor,
            latent: Any,
        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
            """The decoder from the top latent; ``latent(stride, i, block, f)`` runs the
            i-th latent block (0-based over all strides) and returns the new feature."""
            f = self.bias + self.top_proj(z0)
            f = self.dec["64"](f, e)
            feats, i = [f], 0
            for s in STRIDES:
                f = self.up[str(s)](f)
                for blk in self.latent_blocks[str(s)]:
                    i += 1
                    f = latent(s, i, blk, f)
                    feats.append(f)
                f = self.dec[str(s)](f, e)
            f = self.dec["4"](self.up["4"](f), e)
            return self.out(f) * 0.5 + 0.5, feats

        def forward(
            self, x: torch.Tensor, lmbda: Any = None, features: bool = False, sample: bool = True
        ) -> dict[str, Any]:
            e, lg = self.cond(self.lmbda_vector(lmbda, x.shape[0], x.device))
            enc = self._encode(x, e)
            g0 = gain_of(self.top_gain, e, lg)
            y0 = self.top_out(self.top_enc(enc[64], e)) * g0
            # the teacher keeps uniform noise in evaluation too: it is never quantised
            z0, lik0 = self.entropy_bottleneck(y0, training=True if self.bound else None)
            z0 = z0 / g0
            likelihoods = {"z0": lik0}

            def latent(s: int, i: int, blk: Any, f: torch.Tensor) -> torch.Tensor:
                f, o = blk(f, e, lg, enc[s], "forward", sample=sample)
                likelihoods[f"z{i}"] = o["likelihoods"]
                return f

            x_hat, feats = self._top_down(e, z0, latent)
            out = {"x_hat": x_hat, "likelihoods": likelihoods}
            if features:
                out["features"] = feats
            return out

        def compress(self, x: torch.Tensor, lmbda: Any = None) -> dict[str, Any]:
            if self.bound:
                raise ClbenchError(
                    "codec bgvae: a bound=true model estimates the information R-D bound and "
                    "has no bitstream; code with a student (bound=false)"
                )
            lm = self.lmbda_vector(lmbda, x.shape[0], x.device)
            e, lg = self.cond(lm)
            enc = self._encode(x, e)
            g0 = gain_of(self.top_gain, e, lg)
            y0 = self.top_out(self.top_enc(enc[64], e)) * g0
            strings = [self.entropy_bottleneck.compress(y0)]
            z0 = self.entropy_bottleneck.decompress(strings[0], y0.shape[-2:]) / g0

            def latent(s: int, i: int, blk: Any, f: torch.Tensor) -> torch.Tensor:
                f, o = blk(f, e, lg, enc[s], "compress")
                strings.append(o["strings"])
                return f

            self._top_down(e, z0, latent)
            shape = {"hw": list(y0.shape[-2:]), "lmbda": lmbda_bits(float(lm[0]))}
            return {"strings": strings, "shape": shape}

        def decompress(self, strings: list[list[bytes]], shape: dict[str, Any]) -> dict[str, Any]:
            """Decode all segments, or a prefix of them (progressive: the missing latents
            take their prior mean)."""
            if not 1 <= len(strings) <= self.num_latents:
                raise ValueError(
                    f"{len(strings)} segments for a model with {self.num_latents} latents"
                )
            n = len(strings[0])
            lm = torch.full(
                (n,), lmbda_from_bits(shape["lmbda"]), device=self.bias.device, dtype=torch.float32
            )
            e, lg = self.cond(lm)
            g0 = gain_of(self.top_gain, e, lg)
            z0 = self.entropy_bottleneck.decompress(strings[0], tuple(shape["hw"])) / g0

            def latent(s: int, i: int, blk: Any, f: torch.Tensor) -> torch.Tensor:
                if i < len(strings):
                    return blk(f, e, lg, mode="decompress", strings=strings[i])[0]
                return blk(f, e, lg, mode="prior")[0]

            x_hat, _ = self._top_down(e, z0.to(self.bias.dtype), latent)
            return {"x_hat": x_hat.clamp_(0, 1)}

        def update(
            self, scale_table: Any = None, force: bool = False, update_quantiles: bool = False
        ) -> bool:
            if scale_table is None:  # finer than CompressAI's 64 levels (see eff_lic)
                scale_table = get_scale_table(levels=cfg["scale_table_levels"])
            return super().update(scale_table, force=force, update_quantiles=update_quantiles)

    return SimpleNamespace(BGVAE=BGVAE, LatentBlock=LatentBlock, AdaLNBlock=AdaLNBlock)


def model_class() -> type:
    """The ``BGVAE`` model class."""
    return _nets().BGVAE


def build_model(**kwargs: Any) -> Any:
    """A ``BGVAE`` with the YAML defaults overridden by ``kwargs``."""
    return model_class()(**{**bgvae_config()["defaults"], **kwargs})


# -- the codec ---------------------------------------------------------------------------------


@register_codec("bgvae")
class BGVAECodec(CompressAICodec):
    """BG-VAE: variable-rate hierarchical VAE (QARV-style top-down latents, one model for lambda in [lmin, lmax]; train it, optionally guided by a bound=true teacher)"""

    rate_knob = "lmbda"
    family_cfg = {
        "zoo": False,
        "min_pad": bgvae_config()["min_pad"],
        "defaults": bgvae_config()["defaults"],
    }

    def __init__(self, lmbda: float | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        m = self.model
        if lmbda is None:  # the λ the checkpoint was validated at, else the range's middle
            lmbda = (
                self.lmbda if self.lmbda is not None and m.in_range(self.lmbda) else m.default_lmbda
            )
        if not (
            isinstance(lmbda, (int, float))
            and not isinstance(lmbda, bool)
            and m.in_range(float(lmbda))
        ):
            raise ClbenchError(
                f"codec bgvae: lmbda={lmbda!r} is outside the trained range [{m.lmin:g}, {m.lmax:g}] "
                "of this variable-rate model; pick a value inside it"
            )
        # float32, as the bitstream carries it: encoder and decoder embed the same λ
        self.lmbda = float(np.float32(lmbda))
        m.default_lmbda = self.lmbda

    def _model_class(self) -> type:
        return model_class()

    def options(self) -> dict[str, Any]:
        opts = {k: v for k, v in super().options().items() if k != "q"}
        return {"lmbda": self.lmbda, **opts}

    def encode_batch(self, images: list[np.ndarray]) -> list[bytes]:
        if self.model.bound:
            raise ClbenchError(
                f"codec {self.spec}: a bound=true model estimates the information R-D bound "
                "and has no bitstream; evaluate it with bgvae.bound_point, code with a student"
            )
        return super().encode_batch(images)


def decode_progressive(codec: BGVAECodec, data: list[bytes], keep: int) -> list[np.ndarray]:
    """Decode each item from its first ``keep`` latent segments only (top-down): the
    latents after them take their prior mean. ``keep`` = all segments is plain decoding."""
    import torch
    import torch.nn.functional as F
    from compressai.ops import compute_padding

    out = []
    with torch.inference_mode():
        for i, b in enumerate(data):
            p = container.unpack(b, codec.spec, i)
            if p.model != codec.name:
                raise CorruptDataError(f"codec {codec.spec}: item {i} was encoded by {p.model}")
            shape = container.shape_from_json(p.shape)
            x_hat = codec.model.decompress([[s] for s in p.strings[: max(1, keep)]], shape)["x_hat"]
            _, unpad = compute_padding(
                p.height, p.width, out_h=x_hat.shape[-2], out_w=x_hat.shape[-1]
            )
            x_hat = F.pad(x_hat, unpad)
            out.append((x_hat[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
    return out


def segment_bytes(codec: BGVAECodec, data: bytes) -> list[int]:
    """Bytes of each latent segment of one item (top-down), for progressive rate curves."""
    return [len(s) for s in container.unpack(data, codec.spec).strings]


def progressive_points(
    codec: BGVAECodec, images: list[np.ndarray], data: list[bytes]
) -> list[dict[str, float]]:
    """For k = 1 .. every segment of ``data`` (the bitstreams of ``images``): the bpp of
    segment k, of the first k (the payload a partial bitstream keeps), and the mean PSNR-RGB
    of decoding from the first k."""
    from clbench.codecs.evaluation.metrics import psnr_rgb

    seg = [segment_bytes(codec, b) for b in data]
    pixels = sum(im.shape[0] * im.shape[1] for im in images)
    points = []
    for k in range(1, len(seg[0]) + 1):
        part = decode_progressive(codec, data, k)
        points.append({
            "segments": k,
            "bpp_segment": 8 * sum(s[k - 1] for s in seg) / pixels,
            "bpp_payload": 8 * sum(sum(s[:k]) for s in seg) / pixels,
            "psnr": statistics.fmean(psnr_rgb(i, q) for i, q in zip(images, part, strict=True)),
        })  # fmt: skip
    return points


def bound_point(model: Any, images: list[np.ndarray], lmbda: float) -> dict[str, float]:
    """The teacher's (bound=true) estimate of the information R-D function at ``lmbda`` on
    ``images`` (uint8 HWC, each a multiple of 64 in size): mean KL rate in bits per pixel
    and the distortion of its sampled reconstruction as PSNR (fp32, unclamped)."""
    import torch

    bpp, mse = [], []
    with torch.inference_mode():
        for img in images:
            x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous().float().div(255)
            out = model(x, lmbda=lmbda)
            bits = sum(-torch.log2(v).sum() for v in out["likelihoods"].values())
            bpp.append(float(bits) / (img.shape[0] * img.shape[1]))
            mse.append(float(((out["x_hat"] - x) ** 2).mean()))
    m = float(np.mean(mse))
    return {"lmbda": lmbda, "bpp": float(np.mean(bpp)), "psnr": 10 * math.log10(1 / m)}


# -- the training method ----------------------------------------------------------------------


def affinity(f: torch.Tensor) -> torch.Tensor:
    """Spatial affinity: cosine similarity between every pair of positions (B x HW x HW),
    comparable between models of different widths."""
    v = f.float().flatten(2)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return v.transpose(1, 2) @ v


@register_train_method("bgvae")
class BGVAEMethod(TrainMethod):
    """Variable-rate training of a bgvae model: λ drawn per image, log-uniform over the
    model's range; with ``teacher=PATH`` (a bound=true bgvae checkpoint) the bound guidance."""

    def __init__(
        self,
        *,
        teacher: str | None,
        w_feat: float,
        w_rec: float,
        free_bits: float = 0.0,
        rate_warmup: int = 0,
    ):
        # (true/false for these is refused by build_method, for every method's numbers)
        for key, v in (("w_feat", w_feat), ("w_rec", w_rec), ("free_bits", free_bits)):
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ClbenchError(f"codec train: bgvae: {key}={v!r} must be a number >= 0")
        if not (isinstance(rate_warmup, int) and rate_warmup >= 0):
            raise ClbenchError(
                f"codec train: bgvae: rate_warmup={rate_warmup!r} must be a whole number of steps >= 0"
            )
        self.teacher_path, self.w_feat, self.w_rec = teacher, float(w_feat), float(w_rec)
        self.free_bits, self.rate_warmup = float(free_bits), rate_warmup
        self.teacher: Any = None
        self.last: dict[str, float] = {}

    def check(self, cfg: TrainConfig, codec: Any) -> None:
        m = getattr(codec, "model", None)
        if not isinstance(m, model_class()):
            raise ClbenchError(
                f"codec train: --method bgvae trains bgvae models, not {cfg.codec}; "
                "use --method standard (or another method) for it"
            )
        if not m.in_range(cfg.lmbda):
            raise ClbenchError(
                f"codec train: --lambda {cfg.lmbda:g} (the validation lambda) is outside the "
                f"model's range [{m.lmin:g}, {m.lmax:g}]; pick one inside it"
            )
        if cfg.metric != "mse":
            raise ClbenchError("codec train: --method bgvae trains for --metric mse only")
        m.default_lmbda = float(cfg.lmbda)  # what validation measures
        if self.teacher_path is None:
            return
        if m.bound:
            raise ClbenchError(
                "codec train: a bound=true model is the teacher; it takes no teacher="
            )
        t = get_codec(f"bgvae:checkpoint={self.teacher_path}").model
        if not t.bound:
            raise ClbenchError(
                f"codec train: bgvae teacher {self.teacher_path} is not a bound=true model; "
                "train one with `clbench codec train bgvae:pretrained=false,bound=true ...`"
            )
        if not (t.in_range(m.lmin) and t.in_range(m.lmax)):
            raise ClbenchError(
                f"codec train: bgvae teacher {self.teacher_path} covers lambda [{t.lmin:g}, {t.lmax:g}], "
                f"not the student's [{m.lmin:g}, {m.lmax:g}]"
            )
        shapes = [len(t.latent_blocks[str(s)]) for s in STRIDES]
        if shapes != [len(m.latent_blocks[str(s)]) for s in STRIDES]:
            raise ClbenchError(
                f"codec train: bgvae teacher {self.teacher_path} has latent blocks {shapes} at strides "
                f"{list(STRIDES)}; the student must have the same to be guided by it"
            )
        t.eval().requires_grad_(False)
        self.teacher = t

    def step(self, run: TrainRun, x: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        m = run.model
        run.zero_grad()
        n = x.shape[0]
        lo, hi = math.log(m.lmin), math.log(m.lmax)
        lm = torch.exp(lo + (hi - lo) * torch.rand(n)).to(x.device)
        guided = self.teacher is not None and (self.w_feat > 0 or self.w_rec > 0)
        with run.autocast():
            out = m(x, lmbda=lm, features=guided)
        x_hat = out["x_hat"].float()
        pixels = x.shape[2] * x.shape[3]
        bits = [-torch.log2(v.float()).flatten(1).sum(1) for v in out["likelihoods"].values()]
        bpp = sum(bits) / pixels
        mse = ((x_hat - x) ** 2).flatten(1).mean(1)
        rate = self.rate_term(bits, pixels) if self.free_bits else bpp
        loss = (lm * 255**2 * mse + self.rate_weight(run.step) * rate).mean()
        res = {"bpp_loss": bpp.mean(), "mse_loss": mse.mean(), "rd_loss": loss}
        if guided:
            with torch.no_grad(), run.autocast():
                t = self.teacher(x, lmbda=lm, features=True, sample=False)
            feat = sum(
                ((affinity(a) - affinity(b)) ** 2).mean()
                for a, b in zip(out["features"], t["features"], strict=True)
            ) / len(out["features"])
            rec = (lm * 255**2 * ((x_hat - t["x_hat"].float()) ** 2).flatten(1).mean(1)).mean()
            loss = loss + self.w_feat * feat + self.w_rec * rec
            res["feat_loss"], res["rec_loss"] = feat.detach(), rec.detach()
        loss.backward()
        run.optimizer_step()
        res["loss"] = loss
        self.last = {k: float(v.detach()) for k, v in res.items() if k in ("feat_loss", "rec_loss")}
        return res

    def rate_term(self, bits: list[torch.Tensor], pixels: int) -> torch.Tensor:
        """The rate in the loss (bpp per image) from each latent's bits per image, each
        floored at ``free_bits`` bpp: a latent below its floor gets no gradient to shrink
        further, which keeps the top of the hierarchy in use (the usual free-bits remedy
        for collapsed VAE latents). The logged bpp is the true one."""
        return sum(b.clamp_min(self.free_bits * pixels) for b in bits) / pixels

    def rate_weight(self, step: int) -> float:
        """The rate term's weight after ``step`` steps: linear from 0 to 1 over
        ``rate_warmup`` steps (KL annealing), then 1."""
        return 1.0 if step >= self.rate_warmup else step / self.rate_warmup

    def log(self, run: TrainRun) -> dict[str, float]:
        return {f"train_{k}": v for k, v in self.last.items()}


__all__ = [
    "BGVAECodec",
    "BGVAEMethod",
    "affinity",
    "bgvae_config",
    "bound_point",
    "build_model",
    "decode_progressive",
    "model_class",
    "parse_latents",
    "progressive_points",
    "segment_bytes",
]
