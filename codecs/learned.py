"""Learned codecs through CompressAI: every zoo family at every quality, plus
architectures without zoo weights (ELIC, ...) for training.

Spec options (all families)::

    q=3               zoo quality (1..8, cheng2020: 1..6); picks weights and channel counts
    metric=mse        zoo weights trained for mse or ms-ssim
    checkpoint=PATH   a local checkpoint (ours from `clbench codec train`, a zoo .pth.tar,
                      or any CompressAI state dict)
    download=true     let CompressAI download zoo weights (needs internet)
    pretrained=false  an explicitly random-init model (tests, training from scratch)
    device=cpu        where to run; bitstreams only decode on the same kind of device
    pad=64            pad inputs to a multiple of this (>= the family's min_pad)
    batch=N           images per network call when encoding/decoding many (default: 16
                      when every entropy model has static CDFs, else 1; see batch_default)
    N=128,M=192       architecture sizes for a random-init model

Weights come from, in order: ``checkpoint=``, the torch hub cache
(``torch.hub.get_dir()/checkpoints/<zoo file name>``), CompressAI's download when
``download=true``. Without any of them and without ``pretrained=false`` the codec refuses
to build: a silently random model would produce plausible-looking garbage.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from clbench.codecs import container
from clbench.codecs._io import load_weights_file
from clbench.codecs.base import Codec, CorruptDataError
from clbench.codecs.registry import register_codec
from clbench.config import yaml_beside
from clbench.errors import ClbenchError

CHECKPOINT_FORMAT = "clbench-codec-checkpoint/1"


@cache
def learned_config() -> dict[str, Any]:
    """The parsed ``learned.yaml``."""
    return yaml_beside(__file__, "learned.yaml")


@cache
def import_compressai() -> Any:
    """Import CompressAI once, without the torch.jit FutureWarning it triggers.

    CompressAI 1.2.8 imports torch_geometric (for its point-cloud transforms registry),
    whose module level calls ``torch.jit.script``, deprecated in torch 2.10+. The warning
    is about torch_geometric's code, not ours or the image codecs', and fires only at that
    first import, so exactly that message is silenced around exactly that import.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        import compressai

    return compressai


def zoo_filename(family: str, quality: int, metric: str = "mse") -> str:
    """File name of a CompressAI zoo checkpoint, as torch.hub caches it."""
    import_compressai()
    from compressai.zoo.image import model_urls

    return os.path.basename(urlparse(model_urls[family][metric][quality]).path)


def zoo_cache_path(family: str, quality: int, metric: str = "mse") -> Path:
    """Where the torch hub cache keeps that checkpoint (it may not exist)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / zoo_filename(family, quality, metric)


def read_checkpoint(path: str | os.PathLike, who: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint safely (weights_only) and return (state_dict, clbench metadata).

    Accepts our training checkpoints, CompressAI zoo files and the usual wrappers
    ("state_dict", "network", "model_state_dict").
    """

    import_compressai()
    from compressai.zoo import load_state_dict

    p = Path(path).expanduser()
    ckpt = load_weights_file(p, who, "pass checkpoint=PATH to a .pth file")
    if not isinstance(ckpt, dict):
        raise ClbenchError(
            f"codec {who}: checkpoint {p} holds a {type(ckpt).__name__}, not a state dict"
        )
    meta = ckpt.get("clbench", {}) if isinstance(ckpt.get("clbench"), dict) else {}
    state = ckpt
    for key in ("state_dict", "network", "model_state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            state = ckpt[key]
            break
    return load_state_dict(state), meta


def batch_default(model: Any) -> int:
    """Images per network call unless ``batch=`` says otherwise.

    A batch is not computed exactly as its images alone would be: CPU kernels pick their
    blocking from the batch size, so outputs differ in the last bits. Where the decoder
    derives CDFs from network outputs (hyperprior scales, contexts, a VAE's priors) a
    one-ulp difference can pick another CDF, and the range decoder loses sync: bytes
    encoded in one batch would decode to garbage in another (measured on a BG-VAE and the
    eff-lic hyperprior models trained here). Such models code one image per call, so
    decoding depends on the bytes alone. With static CDFs only (factorized priors) a
    batch moves a decoded pixel by at most one level, and batching stays (1.5-2.7x the
    throughput, results/perf/codec_throughput.md)."""
    from compressai.entropy_models import EntropyBottleneck, EntropyModel

    static = all(
        isinstance(m, EntropyBottleneck) for m in model.modules() if isinstance(m, EntropyModel)
    )
    return 16 if static else 1


class CompressAICodec(Codec):
    """A CompressAI ``CompressionModel`` as a codec; one subclass per family."""

    family_cfg: dict[str, Any] = {}
    rate_knob = "q"

    def __init__(
        self,
        q: int | None = None,
        metric: str = "mse",
        checkpoint: str | None = None,
        download: bool = False,
        pretrained: bool | None = None,
        device: str = "cpu",
        pad: int = 64,
        batch: int | None = None,
        cross_device: bool = False,
        **arch: Any,
    ):
        import torch

        import_compressai()
        self._torch = torch
        self.q, self.metric, self.checkpoint = q, metric, checkpoint
        self.download, self.pretrained, self.device = bool(download), pretrained, str(device)
        self.pad, self.cross_device = int(pad), bool(cross_device)
        self.batch = None if batch is None else int(batch)  # None: batch_default(model)
        self.lmbda: float | None = None
        self.arch_kwargs: dict[str, Any] = dict(arch)
        self._validate()
        self.model = self._build()
        self.model.eval().to(self.device)
        self.model.update(force=True)  # CDF tables must match the weights before compress
        self.batch_default = batch_default(self.model)
        self.batch = self.batch_default if self.batch is None else self.batch

    # -- construction -------------------------------------------------------------------
    def _validate(self) -> None:
        from compressai.zoo.image import cfgs

        name, cfg = self.name, self.family_cfg
        if self.metric not in ("mse", "ms-ssim"):
            raise ClbenchError(
                f"codec {name}: metric={self.metric!r} is invalid; use mse or ms-ssim"
            )
        if self.q is not None:
            valid = sorted(cfgs[name]) if cfg.get("zoo") else None
            if valid is None:
                raise ClbenchError(
                    f"codec {name}: has no zoo qualities; drop q= and pass checkpoint=PATH or pretrained=false"
                )
            if self.q not in valid:
                raise ClbenchError(f"codec {name}: q={self.q!r} is invalid; use one of {valid}")
            self.lmbda = learned_config()["lambdas"][self.metric][self.q - 1]
        if self.pad < cfg["min_pad"] or self.pad % cfg["min_pad"]:
            raise ClbenchError(
                f"codec {name}: pad={self.pad} must be a multiple of {cfg['min_pad']}"
            )
        if self.batch is not None and self.batch < 1:
            raise ClbenchError(f"codec {name}: batch={self.batch} must be >= 1")
        if self.device.startswith("cuda") and not self._torch.cuda.is_available():
            raise ClbenchError(
                f"codec {name}: device={self.device} but CUDA is not available; use device=cpu"
            )
        if self.checkpoint is not None and self.pretrained is False:
            raise ClbenchError(
                f"codec {name}: checkpoint= and pretrained=false contradict each other; pass one"
            )
        if self.arch_kwargs and self.pretrained is not False:
            raise ClbenchError(
                f"codec {name}: architecture options {', '.join(self.arch_kwargs)} only apply to a random-init "
                "model (pretrained=false); weights define the architecture otherwise"
            )

    def _model_class(self) -> type:
        from compressai.registry import MODELS

        return MODELS[self.name]

    def _build(self) -> Any:
        name = self.name
        if self.checkpoint is not None:
            return self._from_checkpoint(self.checkpoint)
        if self.pretrained is False:
            return self._random_init()
        if not self.family_cfg.get("zoo"):
            raise ClbenchError(
                f"codec {name}: has no zoo weights; pass checkpoint=PATH (train one with `clbench codec train {name}`) "
                "or pretrained=false for a random-init model"
            )
        if self.q is None:
            raise ClbenchError(
                f"codec {name}: pass q=QUALITY to pick zoo weights (or checkpoint=PATH)"
            )
        cached = zoo_cache_path(name, self.q, self.metric)
        if cached.is_file():
            return self._from_checkpoint(cached, record=False)
        if self.download:
            return self._download()
        raise ClbenchError(
            f"codec {name}:q={self.q}: no weights; put {cached.name} in {cached.parent} (torch hub cache), "
            "or pass checkpoint=PATH, or download=true (needs internet), or pretrained=false for a random model"
        )

    def _random_init(self) -> Any:
        from compressai.zoo.image import cfgs

        cls = self._model_class()
        kwargs = dict(self.family_cfg.get("defaults", {}))
        if self.q is not None:
            kwargs.update(zip(("N", "M"), cfgs[self.name][self.q], strict=False))
        kwargs.update(self.arch_kwargs)
        try:
            model = cls(**kwargs)
        except TypeError as e:
            raise ClbenchError(
                f"codec {self.name}: bad architecture options {kwargs}: {e}"
            ) from None
        self.arch_kwargs = kwargs
        return model

    def _from_checkpoint(self, path: str | os.PathLike, record: bool = True) -> Any:
        state, meta = read_checkpoint(path, self.name)
        if meta.get("arch", self.name) != self.name:
            raise ClbenchError(
                f"codec {self.name}: checkpoint {path} is a {meta['arch']} model; use {meta['arch']}:checkpoint={path}"
            )
        cls = self._model_class()
        try:
            if meta.get("arch_kwargs") is not None or not hasattr(cls, "from_state_dict"):
                model = cls(**meta.get("arch_kwargs", self.family_cfg.get("defaults", {})))
                model.load_state_dict(state)
            else:
                model = cls.from_state_dict(state)
        except (RuntimeError, KeyError, TypeError) as e:
            raise ClbenchError(
                f"codec {self.name}: checkpoint {path} does not fit this architecture: {str(e).splitlines()[0]}"
            ) from None
        self.arch_kwargs = dict(meta.get("arch_kwargs") or {})
        if meta.get("lmbda") is not None:
            self.lmbda = float(meta["lmbda"])
        if meta.get("metric"):
            self.metric = meta["metric"]
        return model

    def _download(self) -> Any:
        from compressai.zoo import image_models

        try:
            return image_models[self.name](
                quality=self.q, metric=self.metric, pretrained=True, progress=True
            )
        except Exception as e:
            raise ClbenchError(
                f"codec {self.name}:q={self.q}: downloading zoo weights failed ({type(e).__name__}: {e}); "
                "fetch them elsewhere and pass checkpoint=PATH"
            ) from None

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"q": self.q}
        if self.metric != "mse" and self.checkpoint is None:
            opts["metric"] = self.metric
        opts["checkpoint"] = self.checkpoint
        if self.download:
            opts["download"] = True
        if self.pretrained is False:
            opts["pretrained"] = False
            opts.update(self.arch_kwargs)
        if self.device != "cpu":
            opts["device"] = self.device
        if self.pad != 64:
            opts["pad"] = self.pad
        if self.batch != self.batch_default:
            opts["batch"] = self.batch
        if self.cross_device:
            opts["cross_device"] = True
        return opts

    # -- coding -------------------------------------------------------------------------
    def _device_kind(self) -> str:
        return self._torch.device(self.device).type

    def encode_batch(self, images: list[np.ndarray]) -> list[bytes]:
        torch = self._torch
        import torch.nn.functional as F
        from compressai.ops import compute_padding

        out: list[bytes | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            if im.shape[0] > 0xFFFF or im.shape[1] > 0xFFFF:
                raise ClbenchError(
                    f"codec {self.spec}: item {i} is larger than 65535 pixels on a side"
                )
            by_size[im.shape[:2]].append(i)
        quality = self.q or 0
        lmbda = container.nan_if_none(self.lmbda)
        with torch.inference_mode():
            for (h, w), idx in by_size.items():
                pad, _ = compute_padding(h, w, min_div=self.pad)
                for s in range(0, len(idx), self.batch):
                    chunk = idx[s : s + self.batch]
                    x = torch.from_numpy(np.stack([images[i] for i in chunk])).to(self.device)
                    # contiguous NCHW, as the decoder's tensors are: the permuted HWC array
                    # is channels_last, and convolutions in another memory layout round
                    # differently; a context model's scale index can then differ between
                    # encoder and decoder, and the arithmetic decoder loses sync.
                    x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
                    x = F.pad(x, pad, mode="constant", value=0)
                    enc = self.model.compress(x)
                    shape = container.shape_to_json(enc["shape"])
                    for j, i in enumerate(chunk):
                        out[i] = container.pack(
                            container.Packet(
                                self.name,
                                quality,
                                lmbda,
                                h,
                                w,
                                self._device_kind(),
                                shape,
                                [bytes(seg[j]) for seg in enc["strings"]],
                            )
                        )
        return out  # type: ignore[return-value]

    def payload_size(self, data: bytes) -> int:
        return container.unpack(data, self.spec).payload_bytes

    def decode_batch(self, data: list[bytes]) -> list[np.ndarray]:
        torch = self._torch
        import torch.nn.functional as F
        from compressai.ops import compute_padding

        packets = [container.unpack(b, self.spec, i) for i, b in enumerate(data)]
        groups: dict[tuple[int, int, str, int], list[int]] = defaultdict(list)
        for i, p in enumerate(packets):
            if p.model != self.name:
                raise CorruptDataError(
                    f"codec {self.spec}: item {i} was encoded by {p.model}; decode it with that codec"
                )
            if p.device != self._device_kind() and not self.cross_device:
                raise CorruptDataError(
                    f"codec {self.spec}: item {i} was encoded on {p.device}; CompressAI bitstreams only decode "
                    f"reliably on the same kind of device: use device={p.device} (or cross_device=true to try anyway)"
                )
            groups[(p.height, p.width, repr(p.shape), len(p.strings))].append(i)
        out: list[np.ndarray | None] = [None] * len(data)
        with torch.inference_mode():
            for (h, w, _, nseg), idx in groups.items():
                shape = container.shape_from_json(packets[idx[0]].shape)
                for s in range(0, len(idx), self.batch):
                    chunk = idx[s : s + self.batch]
                    strings = [[packets[i].strings[k] for i in chunk] for k in range(nseg)]
                    try:
                        x_hat = self.model.decompress(strings, shape)["x_hat"]
                    except (
                        Exception
                    ) as e:  # a header that passed the CRC but does not fit this model
                        raise CorruptDataError(
                            f"codec {self.spec}: cannot decode item {chunk[0]}: {type(e).__name__}: {e}; "
                            "was it encoded with other weights or another pad=?"
                        ) from None
                    # Unpad from the decoded size, so bytes made with any pad= decode here.
                    hp, wp = x_hat.shape[-2:]
                    if hp < h or wp < w:
                        raise CorruptDataError(
                            f"codec {self.spec}: item {chunk[0]} decoded to {hp}x{wp}, smaller than its {h}x{w}"
                        )
                    _, unpad = compute_padding(h, w, out_h=hp, out_w=wp)
                    x_hat = F.pad(x_hat, unpad)
                    pix = (
                        x_hat.clamp_(0, 1)
                        .mul_(255)
                        .round_()
                        .to(torch.uint8)
                        .permute(0, 2, 3, 1)
                        .cpu()
                        .numpy()
                    )
                    for j, i in enumerate(chunk):
                        out[i] = pix[j]
        return out  # type: ignore[return-value]


def _register_all() -> None:
    for name, cfg in learned_config()["families"].items():
        cls = type(
            "".join(p.capitalize() for p in name.replace("-", " ").split()) + "Codec",
            (CompressAICodec,),
            {
                "name": name,
                "family_cfg": cfg,
                "__doc__": cfg.get("doc", ""),
                "__module__": __name__,
            },
        )
        register_codec(name)(cls)


_register_all()

__all__ = [
    "CHECKPOINT_FORMAT",
    "CompressAICodec",
    "read_checkpoint",
    "zoo_cache_path",
    "zoo_filename",
]
