"""Complexity of a codec: parameters, encoder and decoder kMACs per pixel, CPU latency.

>>> from clbench.codecs.evaluation.complexity import complexity
>>> complexity(get_codec("bmshj2018-hyperprior:q=3"))     # or a CompressionModel
{'params': ..., 'enc_kmacs_px': ..., 'dec_kmacs_px': ..., 'enc_latency_ms': ..., ...}

MACs are counted with ``torch.utils.flop_counter`` while the codec really encodes and
decodes a ``size`` image (default 256x256), and reported as FLOPs / 2 (a multiply-add is
two FLOPs in its count). The encoder is everything ``encode`` runs (analysis transform,
hyper-analysis and, for a hyperprior, the hyper-synthesis that predicts the scales; the
context model of an autoregressive model); the decoder is everything ``decode`` runs.
Counted: convolutions (also transposed), matrix products and attention, the ops in the
counter's registry; element-wise work and the entropy coder itself are not, as in papers.

Latency is wall time on the CPU of ``encode`` and ``decode`` of one ``latency_size``
image (default 512x768, Kodak's size), the median of ``repeats`` runs after one warm-up,
with torch's current thread count (reported). A classic codec gets latency only: it has no
network to count.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from clbench.codecs.base import Codec
from clbench.errors import ClbenchError

MAC_SIZE = (256, 256)
LATENCY_SIZE = (512, 768)


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB test image (gradients, sinusoids, an edge, mild noise).

    Latency of a learned codec depends on the content through the entropy coder, and white
    noise would cost far more bits than a photograph; this costs about as many.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 6.28)
        v = 128 + 60 * np.sin(fx * xx + fy * yy + ph) + 40 * (xx / w - 0.5) * (c - 1)
        chans.append(v + np.where(xx > w * 0.6, 25.0, -25.0))
    img = np.stack(chans, -1) + rng.normal(0, 2.0, (h, w, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def _frozen(modules: Sequence[Any]) -> Iterator[None]:
    # The counter's module tracker hooks every tensor that requires grad; a parameter used
    # as an input inside torch.inference_mode (GDN's beta) has no grad_fn and breaks it.
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            # CompressAI's MaskedConv2d rewrites its weight.data in forward: coded inside
            # inference_mode, that weight became an inference tensor, which cannot
            # require grad again (and is no use for training any more).
            if not p.is_inference():
                p.requires_grad_(f)


def count_macs(
    fn: Callable[..., Any], *args: Any, modules: Sequence[Any] = (), **kwargs: Any
) -> tuple[int, Any]:
    """``(MACs, result)`` of ``fn(*args, **kwargs)``: FLOPs / 2 from torch.utils.flop_counter.

    ``fn`` may be a module; ``modules`` are the networks it runs (their parameters are
    frozen while counting).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mods = [*modules, *([fn] if isinstance(fn, torch.nn.Module) else [])]
    with _frozen(mods), FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops() // 2, out


def torch_modules(target: Any) -> list[Any]:
    """The networks of a codec: itself if a module, else its ``model`` attribute if that is
    one (every learned codec in the zoo); [] for a classic codec."""
    import torch

    if isinstance(target, torch.nn.Module):
        return [target]
    model = getattr(target, "model", None)
    return [model] if isinstance(model, torch.nn.Module) else []


def _coder(target: Any) -> tuple[Callable[[np.ndarray], Any], Callable[[Any], Any]]:
    """encode(uint8 HWC image) -> payload and decode(payload) for a Codec or a CompressionModel."""
    if isinstance(target, Codec):
        return (lambda img: target.encode([img])), target.decode
    if callable(getattr(target, "compress", None)) and callable(
        getattr(target, "decompress", None)
    ):
        import torch
        import torch.nn.functional as F
        from compressai.ops import compute_padding

        target.eval()
        target.update()  # CDF tables, if the model has not built them yet

        def encode(img: np.ndarray) -> Any:
            h, w = img.shape[:2]
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255.0)
            with torch.inference_mode():
                return target.compress(F.pad(x, compute_padding(h, w, min_div=64)[0]))

        def decode(enc: Any) -> Any:
            with torch.inference_mode():
                return target.decompress(enc["strings"], enc["shape"])

        return encode, decode
    raise ClbenchError(
        f"complexity: a {type(target).__name__} is neither a clbench Codec nor a CompressAI "
        "CompressionModel (compress/decompress); count another module with count_macs(module, x)"
    )


def _median_s(fn: Callable[[Any], Any], arg: Any, repeats: int) -> tuple[float, Any]:
    out = fn(arg)  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(arg)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def complexity(
    target: Any,
    size: Sequence[int] = MAC_SIZE,
    *,
    latency: bool = True,
    latency_size: Sequence[int] = LATENCY_SIZE,
    latency_image: np.ndarray | None = None,
    latency_input: str = "",
    repeats: int = 5,
) -> dict[str, Any]:
    """Parameters, kMACs/pixel (encoder, decoder) and CPU latency of a codec or model.

    Args:
        target: a :class:`~clbench.codecs.Codec` (learned or classic) or a CompressAI
            ``CompressionModel``.
        size: (height, width) of the image the MACs are counted on.
        latency: also time encode and decode (median of ``repeats`` after a warm-up).
        latency_size: (height, width) of the timed image when none is given.
        latency_image: a uint8 HWC image to time on (e.g. a Kodak image), else synthetic.
        latency_input: how the report names that image.

    Returns:
        ``params``, ``enc_kmacs_px``, ``dec_kmacs_px`` (None for a codec without a
        network), ``macs_size``; with latency also ``enc_latency_ms``, ``dec_latency_ms``,
        ``latency_size``, ``latency_input``, ``latency_repeats`` and ``threads``.
    """
    import torch

    encode, decode = _coder(target)
    modules = torch_modules(target)
    h, w = (int(s) for s in size)
    out: dict[str, Any] = {"params": None, "enc_kmacs_px": None, "dec_kmacs_px": None}
    if modules:
        out["params"] = sum(
            p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values()
        )
        enc_macs, payload = count_macs(encode, synthetic_image(h, w), modules=modules)
        dec_macs, _ = count_macs(decode, payload, modules=modules)
        out["enc_kmacs_px"] = enc_macs / (h * w) / 1e3
        out["dec_kmacs_px"] = dec_macs / (h * w) / 1e3
    out["macs_size"] = [h, w]
    if latency:
        if latency_image is None:
            latency_image = synthetic_image(*(int(s) for s in latency_size))
            latency_input = latency_input or "synthetic"
        enc_s, payload = _median_s(encode, latency_image, repeats)
        dec_s, _ = _median_s(decode, payload, repeats)
        out.update(
            enc_latency_ms=enc_s * 1e3,
            dec_latency_ms=dec_s * 1e3,
            latency_size=list(latency_image.shape[:2]),
            latency_input=latency_input or "given",
            latency_repeats=repeats,
            threads=torch.get_num_threads(),
        )
    return out
