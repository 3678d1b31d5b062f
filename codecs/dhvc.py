"""A hierarchical predictive video codec in the style of DHVC 2.0 (Lu et al., arXiv 2410.02598).

No motion estimation or compensation. Each frame goes through a hierarchical VAE:

- a bottom-up encoder gives features at S scales (1/4 of the frame, then halving);
- a top-down decoder runs from the coarsest scale to the finest. At scale s it predicts the
  entropy model's parameters (mean, scale of a Gaussian) from the current frame's lower
  scale (the top-down feature) and the same scale's features of the ``refs`` previous
  frames (the temporal context); the encoder's posterior mean is coded as the residual
  ``round(q - mean)`` with CompressAI's ``GaussianConditional`` (rANS), and the quantised
  latent is merged back into the feature that goes up to the next scale;
- the first frame of a group (and every frame with ``gop=1``) sees a learned "no reference"
  feature instead of previous frames: intra coding by the same model.

Facts taken from DHVC 1.0 (NJUVISION/DHVC) and QARV (duanzhiihao/lossy-vae): ConvNeXt
blocks, 4x patch down/up-sampling at the ends, prior log-scale bounded below by -2.3, residual
quantisation around the prior mean, the previous frames' same-scale latent features as the
temporal reference, the prior mean standing in for undecoded scales (progressive decoding),
and variable rate from one model by a lambda embedding that modulates every block's
LayerNorm (AdaLN), lambda drawn log-uniformly during training.

Bitstream: one packet per frame (``encode_video``), layout in :func:`pack_frame`; the
decoder reproduces the encoder's reconstruction exactly on the same kind of device because
both run the same top-down function on the same quantised latents.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clbench.codecs.base import CorruptDataError
from clbench.codecs.container import _join_strings, _read_strings
from clbench.codecs.video import VideoCodec, as_clip, register_video_codec
from clbench.config import yaml_beside
from clbench.errors import ClbenchError

CHECKPOINT_FORMAT = "clbench-dhvc-checkpoint/1"
ARCH = "dhvc"


@cache
def dhvc_config() -> dict[str, Any]:
    """The parsed ``dhvc.yaml`` beside this module."""
    return yaml_beside(__file__, "dhvc.yaml")


# ---------------------------------------------------------------------------------------
# layers


def sinusoidal(u: torch.Tensor, dim: int, max_period: float = 64.0) -> torch.Tensor:
    """QARV's sinusoidal embedding of a (B,) tensor of values."""
    freqs = max_period ** -torch.linspace(0, 1, dim // 2, device=u.device)
    args = u.view(-1, 1) * freqs.view(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AdaLNBlock(nn.Module):
    """ConvNeXt block (depth-wise conv, LayerNorm, MLP, layer scale, residual) whose
    LayerNorm shift and scale come from the lambda embedding (QARV's AdaLN block)."""

    def __init__(self, dim: int, emb_dim: int, kernel: int, mlp_ratio: float, ls_init: float):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.GELU(), nn.Linear(emb_dim, 2 * dim))
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init)))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        shift, scale = self.ada(emb)[:, None, None, :].chunk(2, dim=-1)
        y = self.mlp(self.norm(y) * (1 + scale) + shift) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Blocks(nn.ModuleList):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for b in self:
            x = b(x, emb)
        return x


def patch_up(cin: int, cout: int, rate: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout * rate * rate, 1), nn.PixelShuffle(rate))


class LatentBlock(nn.Module):
    """One scale of the top-down path: prior from (lower scale, temporal references),
    posterior from the encoder feature, latent merged back into the feature."""

    def __init__(
        self, width: int, zdim: int, refs: int, blk: Callable[[int], AdaLNBlock], tcp: int
    ):
        from compressai.entropy_models import GaussianConditional

        super().__init__()
        self.front = blk(width)
        self.tcp_in = nn.Conv2d((1 + refs) * width, width, 1)
        self.tcp = Blocks([blk(width) for _ in range(tcp)])
        self.prior = nn.Conv2d(width, 2 * zdim, 1)
        self.post_in = nn.Conv2d(2 * width, width, 1)
        self.post = blk(width)
        self.post_out = nn.Conv2d(width, zdim, 3, padding=1)
        self.z_proj = nn.Conv2d(zdim, width, 1)
        self.merge = nn.Conv2d(2 * width, width, 1)
        self.end = blk(width)
        self.gc = GaussianConditional(None)

    def prior_params(self, f, refs, emb):
        f = self.front(f, emb)
        ctx = self.tcp(self.tcp_in(torch.cat([f, *refs], dim=1)), emb)
        pm, plogs = self.prior(ctx).chunk(2, dim=1)
        # DHVC: log-scale > -2.3 (scale > 0.1), bounded above at 10 for the scale table
        ps = torch.exp(F.softplus(plogs + 2.3) - 2.3).clamp(max=10.0)
        return f, ctx, pm, ps

    def posterior(self, f, enc, emb):
        return self.post_out(self.post(self.post_in(torch.cat([f, enc], dim=1)), emb))

    def fuse(self, f, ctx, z, emb):
        return self.end(self.merge(torch.cat([f + self.z_proj(z), ctx], dim=1)), emb)


class DHVCModel(nn.Module):
    """The network. ``widths``/``zdims`` list the scales from coarse to fine."""

    def __init__(
        self,
        widths: list[int],
        zdims: list[int],
        enc_blocks: int = 1,
        tcp_blocks: int = 1,
        head_blocks: int = 2,
        kernel: int = 5,
        mlp_ratio: float = 2,
        refs: int = 2,
        emb_dim: int = 64,
        ls_init: float = 0.1,
        lmbda_min: float = 64,
        lmbda_max: float = 4096,
    ):
        super().__init__()
        if len(widths) != len(zdims) or not widths:
            raise ClbenchError("codec dhvc: widths and zdims must list one value per scale")
        if not (0 < lmbda_min < lmbda_max):
            raise ClbenchError("codec dhvc: needs 0 < lmbda_min < lmbda_max")
        self.widths, self.zdims, self.refs = list(widths), list(zdims), int(refs)
        self.lmbda_range = (float(lmbda_min), float(lmbda_max))
        self.emb_dim = int(emb_dim)
        S = len(widths)

        def blk(w: int) -> AdaLNBlock:
            return AdaLNBlock(w, emb_dim, kernel, mlp_ratio, ls_init)

        self.lmb_mlp = nn.Sequential(
            nn.Linear(emb_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim)
        )
        # bottom-up: index 0 is the coarsest scale, as in the top-down path
        self.stem = nn.Conv2d(3, widths[-1], 4, stride=4)
        self.enc = nn.ModuleList(Blocks([blk(w) for _ in range(enc_blocks)]) for w in widths)
        self.down = nn.ModuleList(
            nn.Conv2d(widths[s + 1], widths[s], 3, stride=2, padding=1) for s in range(S - 1)
        )
        # top-down
        self.top = nn.Parameter(torch.zeros(1, widths[0], 1, 1))
        self.no_ref = nn.ParameterList(nn.Parameter(torch.zeros(1, w, 1, 1)) for w in widths)
        self.latents = nn.ModuleList(
            LatentBlock(w, z, refs, blk, tcp_blocks) for w, z in zip(widths, zdims, strict=True)
        )
        self.up = nn.ModuleList(patch_up(widths[s], widths[s + 1], 2) for s in range(S - 1))
        self.head = Blocks([blk(widths[-1]) for _ in range(head_blocks)])
        self.out = patch_up(widths[-1], 3, 4)

    @property
    def num_scales(self) -> int:
        return len(self.widths)

    @property
    def multiple(self) -> int:
        """Frames are padded to a multiple of this (the coarsest scale's stride)."""
        return 4 * 2 ** (self.num_scales - 1)

    # -- pieces ---------------------------------------------------------------------------
    def embed(self, lmbda: torch.Tensor) -> torch.Tensor:
        lo, hi = (math.log(v) for v in self.lmbda_range)
        u = (torch.log(lmbda) - lo) / (hi - lo)  # 0..1 over the rate range
        # spread over the embedding's period (QARV scales lambda the same way): with u in
        # 0..1 alone most sinusoids stay flat and the rate conditioning is too weak
        return self.lmb_mlp(sinusoidal(u * 64.0, self.emb_dim))

    def sample_lmbda(self, n: int) -> torch.Tensor:
        lo, hi = (math.log(v) for v in self.lmbda_range)
        return torch.exp(lo + (hi - lo) * torch.rand(n))

    def encode_features(self, x: torch.Tensor, emb: torch.Tensor) -> list[torch.Tensor]:
        f = self.stem(x * 2 - 1)
        feats = [None] * self.num_scales
        for s in reversed(range(self.num_scales)):
            f = self.enc[s](f, emb)
            feats[s] = f
            if s > 0:
                f = self.down[s - 1](f)
        return feats

    def initial_refs(self, n: int) -> list[list[torch.Tensor]]:
        """Per scale, the ``refs`` "no previous frame" features (intra coding)."""
        return [[self.no_ref[s].expand(n, -1, -1, -1)] * self.refs for s in range(self.num_scales)]

    def next_refs(self, refs, feats) -> list[list[torch.Tensor]]:
        """Shift the reference lists: the frame just coded becomes the newest reference."""
        return [[feats[s], *refs[s][:-1]] for s in range(self.num_scales)]

    def topdown(self, n: int, hw: tuple[int, int], refs, emb, get_z) -> tuple[torch.Tensor, list]:
        """The decoder: ``get_z(s, f, pm, ps)`` supplies each scale's quantised latent.

        Encoder and decoder both call this, so their reconstructions are identical.
        """
        h, w = hw[0] // self.multiple, hw[1] // self.multiple
        f = self.top.expand(n, -1, h, w)
        feats = []
        for s, blk in enumerate(self.latents):
            ref = [r.expand(-1, -1, f.shape[2], f.shape[3]) for r in refs[s]]
            f, ctx, pm, ps = blk.prior_params(f, ref, emb)
            z = get_z(s, f, pm, ps)
            f = blk.fuse(f, ctx, z, emb)
            feats.append(f)
            if s < self.num_scales - 1:
                f = self.up[s](f)
        x = self.out(self.head(f, emb))
        return (x + 1) / 2, feats

    # -- training ---------------------------------------------------------------------------
    def forward_frame(
        self, x: torch.Tensor, refs, lmbda: torch.Tensor, keep: int | None = None
    ) -> dict[str, Any]:
        """One frame with the training relaxation (uniform noise for the rate, straight-
        through rounding for the decoder) or, in eval mode, real rounding. Returns the
        reconstruction, bits per image and the features that become references; with
        ``keep`` < S also ``x_hat_coarse``, the decode of the ``keep`` coarsest scales
        with the prior means above them (what a progressive receiver sees)."""
        emb = self.embed(lmbda)
        enc = self.encode_features(x, emb)
        bits, zs = [], []

        def get_z(s, f, pm, ps):
            blk = self.latents[s]
            qm = blk.posterior(f, enc[s], emb)
            _, lik = blk.gc(qm, ps, means=pm, training=self.training)
            bits.append(-torch.log2(lik).sum(dim=(1, 2, 3)))
            zs.append(pm + (torch.round(qm - pm) - (qm - pm)).detach() + (qm - pm))
            return zs[-1]

        x_hat, feats = self.topdown(x.shape[0], x.shape[2:], refs, emb, get_z)
        out = {"x_hat": x_hat, "bits": torch.stack(bits, 1), "feats": feats}
        if keep is not None and keep < self.num_scales:
            # The coarse scales' latents do not depend on the finer ones: reuse them.
            out["x_hat_coarse"], _ = self.topdown(
                x.shape[0], x.shape[2:], refs, emb, lambda s, f, pm, ps: zs[s] if s < keep else pm
            )
        return out

    def forward_clip(
        self,
        clip: torch.Tensor,
        lmbda: torch.Tensor,
        gop: int | None = None,
        keep: int | None = None,
    ):
        """A (B, T, 3, H, W) clip coded frame after frame; frame 0 (and every ``gop``-th)
        intra. ``keep``: see :meth:`forward_frame` (references stay the full decode's)."""
        refs = self.initial_refs(clip.shape[0])
        out = []
        for t in range(clip.shape[1]):
            if gop and t % gop == 0:
                refs = self.initial_refs(clip.shape[0])
            r = self.forward_frame(clip[:, t], refs, lmbda, keep)
            refs = self.next_refs(refs, r["feats"])
            out.append(r)
        return out

    def update_tables(self) -> None:
        from compressai.entropy_models.entropy_models import GaussianConditional

        scale_table = torch.exp(torch.linspace(math.log(0.1), math.log(10.0), 64))
        for m in self.modules():
            if isinstance(m, GaussianConditional):
                m.update_scale_table(scale_table, force=True)


# ---------------------------------------------------------------------------------------
# the frame packet

MAGIC = b"DV"
VERSION = 1
_HEAD = struct.Struct("<BBIBfHHIB")  # version, flags, fingerprint, q, lambda, h, w, index, S
_DEVICES = {"cpu": 0, "cuda": 1, "mps": 2}


def pack_frame(
    *,
    intra: bool,
    fingerprint: int,
    q: int,
    lmbda: float,
    h: int,
    w: int,
    index: int,
    device: str,
    strings: list[bytes],
) -> bytes:
    """``DV``, header (version, flags: bit0 intra, bits 4-7 device kind; model fingerprint
    crc32; quality index, 255 for a free lambda; lambda float32; height, width; frame index;
    scale count), then per scale a LEB128 length and its rANS string, then a crc32."""
    flags = int(intra) | (_DEVICES.get(device, 15) << 4)
    head = MAGIC + _HEAD.pack(VERSION, flags, fingerprint, q, lmbda, h, w, index, len(strings))
    body = head + _join_strings(strings)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_frame(data: bytes, frame: int) -> dict[str, Any]:
    """Parse and check one packet; errors name the frame."""
    if data[:2] != MAGIC:
        raise CorruptDataError(f"codec dhvc: frame {frame} is not a dhvc packet (bad magic)")
    if len(data) < 2 + _HEAD.size + 4:
        raise CorruptDataError(f"codec dhvc: frame {frame} is truncated ({len(data)} bytes)")
    version, flags, fp, q, lmbda, h, w, index, n = _HEAD.unpack_from(data, 2)
    if version != VERSION:
        raise CorruptDataError(f"codec dhvc: frame {frame} has packet version {version}")
    end = len(data) - 4
    try:
        strings, pos = _read_strings(data, 2 + _HEAD.size, end, n)
    except ValueError:
        raise CorruptDataError(
            f"codec dhvc: frame {frame} is truncated mid-frame ({len(data)} bytes); "
            "the bitstream was cut or damaged"
        ) from None
    if pos != end:
        raise CorruptDataError(f"codec dhvc: frame {frame} has {end - pos} bytes past its data")
    if zlib.crc32(data[:end]) != struct.unpack_from("<I", data, end)[0]:
        raise CorruptDataError(f"codec dhvc: frame {frame} fails its CRC32 check (corrupted)")
    devices = {v: k for k, v in _DEVICES.items()}
    return {
        "intra": bool(flags & 1),
        "device": devices.get(flags >> 4, "other"),
        "fingerprint": fp,
        "q": q,
        "lmbda": lmbda,
        "h": h,
        "w": w,
        "index": index,
        "strings": strings,
    }


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights without the rANS tables (``.gc.`` buffers), which ``update_tables``
    rebuilds: their sizes change when built, so they stay out of checkpoints."""
    return {k: v for k, v in model.state_dict().items() if ".gc." not in k}


def load_model_state(model: DHVCModel, state: dict[str, torch.Tensor], who: str) -> None:
    state = {k: v for k, v in state.items() if ".gc." not in k}
    missing = sorted(set(model_state(model)) - set(state))
    unexpected = sorted(set(state) - set(model_state(model)))
    if missing or unexpected:
        raise ClbenchError(
            f"codec dhvc: {who} does not fit the architecture "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ClbenchError(f"codec dhvc: {who}: {str(e).splitlines()[-1].strip()}") from None


def fingerprint(model: nn.Module) -> int:
    """crc32 of every weight: a bitstream names the exact model that made it."""
    crc = 0
    state = model_state(model)
    for k in sorted(state):
        crc = zlib.crc32(k.encode(), crc)
        crc = zlib.crc32(state[k].detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


# ---------------------------------------------------------------------------------------
# the codec


def _per_scale(v: Any) -> Any:
    """``"96/80/64"`` (the spec syntax: a [...] list would name a sweep) -> [96, 80, 64]."""
    if isinstance(v, str) and "/" in v:
        return [int(x) for x in v.split("/")]
    return [v] if isinstance(v, int) else v


def build_model(**arch: Any) -> DHVCModel:
    """A model from dhvc.yaml's ``arch`` defaults overridden by ``arch``; unknown keys refused.

    In specs, per-scale lists are written with slashes: ``dhvc:widths=32/32,zdims=8/4``.
    """
    d = dict(dhvc_config()["arch"])
    for key in ("widths", "zdims"):
        if key in arch:
            arch[key] = _per_scale(arch[key])
    unknown = sorted(set(arch) - set(d))
    if unknown:
        raise ClbenchError(
            f"codec dhvc: unknown option {unknown[0]!r}; architecture options: {', '.join(d)}"
        )
    d.update(arch)
    return DHVCModel(**d)


def read_dhvc_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ClbenchError(f"codec dhvc: checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClbenchError(f"codec dhvc: cannot load checkpoint {p}: {type(e).__name__}") from None
    meta = ckpt.get("clbench") if isinstance(ckpt, dict) else None
    if not meta or meta.get("format") != CHECKPOINT_FORMAT:
        raise ClbenchError(
            f"codec dhvc: {p} is not a dhvc checkpoint (train one with `clbench codec train-video`)"
        )
    return ckpt


@register_video_codec("dhvc")
class DHVC(VideoCodec):
    """DHVC-style hierarchical predictive video codec (variable rate: q or lmbda)."""

    rate_knob = "q"
    lossless = False

    def __init__(
        self,
        q: int | None = None,
        lmbda: float | None = None,
        checkpoint: str | None = None,
        pretrained: bool | None = None,
        gop: int | None = None,
        scales: int | None = None,
        device: str = "cpu",
        seed: int = 0,
        **arch: Any,
    ):
        cfg = dhvc_config()
        self.checkpoint, self.device, self.seed = checkpoint, str(device), int(seed)
        self.gop = int(gop if gop is not None else cfg["gop"])
        if self.gop < 1:
            raise ClbenchError(f"codec dhvc: gop={gop} must be >= 1")
        if checkpoint is not None:
            if arch:
                raise ClbenchError(
                    "codec dhvc: architecture options come from the checkpoint; drop them"
                )
            ckpt = read_dhvc_checkpoint(checkpoint)
            self.arch = dict(ckpt["clbench"]["arch_kwargs"])
            self.model = build_model(**self.arch)
            load_model_state(self.model, ckpt["state_dict"], str(checkpoint))
        elif pretrained is False:
            self.arch = {
                k: _per_scale(v) if k in ("widths", "zdims") else v for k, v in arch.items()
            }
            torch.manual_seed(self.seed)  # a reproducible random model (tests, training)
            self.model = build_model(**arch)
        else:
            raise ClbenchError(
                "codec dhvc has no published weights; pass checkpoint=PATH (from "
                "`clbench codec train-video`) or pretrained=false for a random model"
            )
        self.model.eval().to(self.device)
        self.model.update_tables()
        self.fingerprint = fingerprint(self.model)
        S = self.model.num_scales
        self.scales = S if scales is None else int(scales)
        if not 1 <= self.scales <= S:
            raise ClbenchError(f"codec dhvc: scales={scales} must be 1..{S}")
        self.q, self.lmbda = self._rate(q, lmbda)

    def _rate(self, q: int | None, lmbda: float | None) -> tuple[int | None, float]:
        n = int(dhvc_config()["qualities"])
        lo, hi = self.model.lmbda_range
        if q is not None and lmbda is not None:
            raise ClbenchError("codec dhvc: give q or lmbda, not both")
        if lmbda is not None:
            if not lo <= lmbda <= hi:
                raise ClbenchError(f"codec dhvc: lmbda={lmbda} outside the model's {lo:g}..{hi:g}")
            return None, float(np.float32(lmbda))
        q = n - 1 if q is None else int(q)
        if not 0 <= q < n:
            raise ClbenchError(f"codec dhvc: q={q} is invalid; use 0..{n - 1}")
        return q, float(np.float32(lo * (hi / lo) ** (q / (n - 1))))

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"q": self.q} if self.q is not None else {"lmbda": self.lmbda}
        if self.checkpoint:
            opts["checkpoint"] = self.checkpoint
        else:
            opts["pretrained"] = False
            opts.update(
                {
                    k: "/".join(map(str, v)) if isinstance(v, list) else v
                    for k, v in self.arch.items()
                }
            )
        opts["gop"] = self.gop
        if self.scales != self.model.num_scales:
            opts["scales"] = self.scales
        return opts

    # -- coding ----------------------------------------------------------------------------
    def _tensor(self, frame: np.ndarray) -> torch.Tensor:
        from clbench.datasets.video import pad_frames

        padded, _ = pad_frames(frame, self.model.multiple)
        # contiguous NCHW like every decoder-side tensor (see learned.py, encode_batch)
        x = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].contiguous()
        return x.float().div_(255.0).to(self.device)

    @staticmethod
    def _image(x: torch.Tensor, h: int, w: int) -> np.ndarray:
        x = x[0, :, :h, :w].clamp(0, 1).mul(255).round().to(torch.uint8)
        return x.permute(1, 2, 0).cpu().numpy()

    @torch.inference_mode()
    def encode_with_reconstruction(self, frames: Any) -> tuple[list[bytes], np.ndarray]:
        """Per-frame packets and the encoder's reconstruction, which the decoder reproduces
        exactly (with ``scales`` below the model's, packets keep only the coarse scales and
        the decoder's frames are coarser than this reconstruction)."""
        frames = as_clip(frames, self.spec)
        m, dev = self.model, self.device
        lm = torch.tensor([self.lmbda], device=dev)
        emb = m.embed(lm)
        h, w = frames.shape[1:3]
        out, recon, refs = [], [], m.initial_refs(1)
        for t, frame in enumerate(frames):
            intra = t % self.gop == 0
            if intra:
                refs = m.initial_refs(1)
            x = self._tensor(frame)
            enc = m.encode_features(x, emb)
            strings = []

            def get_z(s, f, pm, ps, enc=enc, strings=strings):
                gc = m.latents[s].gc
                qm = m.latents[s].posterior(f, enc[s], emb)
                idx = gc.build_indexes(ps)
                strings.append(gc.compress(qm, idx, means=pm)[0])
                return gc.dequantize(gc.quantize(qm, "symbols", pm), pm)

            x_hat, feats = m.topdown(1, x.shape[2:], refs, emb, get_z)
            refs = m.next_refs(refs, feats)
            recon.append(self._image(x_hat, h, w))
            out.append(
                pack_frame(
                    intra=intra,
                    fingerprint=self.fingerprint,
                    q=255 if self.q is None else self.q,
                    lmbda=self.lmbda,
                    h=h,
                    w=w,
                    index=t,
                    device=torch.device(dev).type,
                    # scales < S: only the coarse scales are sent (progressive / lossy
                    # transmission); the receiver's references then drift from ours
                    strings=strings[: self.scales],
                )
            )
        return out, np.stack(recon)

    def _encode(self, frames: np.ndarray) -> list[bytes]:
        return self.encode_with_reconstruction(frames)[0]

    @torch.inference_mode()
    def _decode(self, data: list[bytes]) -> np.ndarray:
        m, dev = self.model, self.device
        emb = m.embed(torch.tensor([self.lmbda], device=dev))
        frames, refs = [], m.initial_refs(1)
        for t, packet in enumerate(data):
            p = unpack_frame(packet, t)
            self._check(p, t)
            if p["intra"]:
                refs = m.initial_refs(1)
            elif t == 0:
                raise CorruptDataError(
                    "codec dhvc: frame 0 is a predicted frame; a sequence starts with an intra frame"
                )
            hw = (-(-p["h"] // m.multiple) * m.multiple, -(-p["w"] // m.multiple) * m.multiple)

            def get_z(s, f, pm, ps, strings=p["strings"][: self.scales]):
                if s >= len(strings):  # progressive decoding: the prior mean stands in
                    return pm
                gc = m.latents[s].gc
                return gc.decompress([strings[s]], gc.build_indexes(ps), means=pm)

            x_hat, feats = m.topdown(1, hw, refs, emb, get_z)
            refs = m.next_refs(refs, feats)
            frames.append(self._image(x_hat, p["h"], p["w"]))
        return np.stack(frames)

    def _check(self, p: dict[str, Any], t: int) -> None:
        if p["fingerprint"] != self.fingerprint:
            raise CorruptDataError(
                f"codec dhvc: frame {t} was coded by another model (fingerprint "
                f"{p['fingerprint']:08x}, this one is {self.fingerprint:08x}); decode it with its checkpoint"
            )
        if not math.isclose(p["lmbda"], self.lmbda, rel_tol=1e-6):
            rate = f"q={p['q']}" if p["q"] != 255 else f"lmbda={p['lmbda']:g}"
            mine = f"q={self.q}" if self.q is not None else f"lmbda={self.lmbda:g}"
            raise CorruptDataError(
                f"codec dhvc: frame {t} was coded at {rate}, this codec decodes {mine}; build it with {rate}"
            )
        if p["index"] != t:
            raise CorruptDataError(
                f"codec dhvc: frame {t} carries frame index {p['index']}: frames are missing or out of order"
            )
        if p["device"] != torch.device(self.device).type:
            raise CorruptDataError(
                f"codec dhvc: frame {t} was coded on {p['device']}; rANS streams decode only on the same kind of device"
            )
        if not 1 <= len(p["strings"]) <= self.model.num_scales:
            raise CorruptDataError(
                f"codec dhvc: frame {t} has {len(p['strings'])} scales, the model {self.model.num_scales}"
            )
