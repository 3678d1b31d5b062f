"""The efficient-LIC family: transforms x context models, for R-D against complexity.

After Zhang, Duan and Zhu, "On Efficient Neural Network Architectures for Image
Compression" (arXiv 2406.10361), whose code and tables are not available here: the study
is rebuilt as a configurable family from CompressAI's latent codecs and timm's blocks.

    eff-lic:transform=convnext,context=space-channel,N=96,M=192

**Skeleton.** Ballé's GDN CNN (four 5x5 stride-2 convolutions with GDN, mirrored with
IGDN in the synthesis). A *transform* adds ``depth`` blocks after each of the first three
resolutions (strides 2, 4, 8; mirrored in g_s):

- ``conv``: no blocks (the mean-scale hyperprior baseline of Minnen 2018 with 5x5 convs);
- ``resnet``: CompressAI's residual bottleneck block (1x1-3x3-1x1, as in ELIC);
- ``convnext``: timm's ``ConvNeXtBlock`` (7x7 depth-wise conv, LayerNorm, MLP x4);
- ``swin``: timm's ``SwinTransformerBlock`` (window attention, alternately shifted).

**Context models** (entropy models of y; z always has a factorized entropy bottleneck):

- ``hyperprior``: mean-scale Gaussian from the hyper-synthesis (Minnen 2018, no AR);
- ``channel``: K equal channel slices coded in turn, each conditioned on the hyper
  parameters and the decoded slices (Minnen and Singh 2020);
- ``space-channel``: ELIC's uneven channel groups, each with a two-pass checkerboard
  spatial context (He et al. 2022).

Each is built from CompressAI's ``HyperpriorLatentCodec``, ``ChannelGroupsLatentCodec``,
``CheckerboardLatentCodec`` and ``GaussianConditionalLatentCodec``, so ``compress`` and
``decompress`` are CompressAI's, with real entropy coding. Transforms and contexts are
registries; a new one is a decorated function here or in a plug-in module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from typing import Any

from clbench.codecs.base import format_spec
from clbench.codecs.learned import CompressAICodec, import_compressai, read_checkpoint
from clbench.codecs.registry import register_codec
from clbench.config import yaml_beside
from clbench.errors import ClbenchError
from clbench.registry import Registry

# name -> (channels, depth, first_block_index) -> nn.Module on NCHW tensors
TRANSFORMS: Registry[Callable[..., Any]] = Registry("eff-lic transform")
# name -> (N, M, options) -> CompressAI LatentCodec for y (given the hyper side parameters)
CONTEXTS: Registry[Callable[..., Any]] = Registry("eff-lic context")


@cache
def eff_lic_config() -> dict[str, Any]:
    """The parsed ``eff_lic.yaml``."""
    return yaml_beside(__file__, "eff_lic.yaml")


# -- transforms ------------------------------------------------------------------------------


@TRANSFORMS.register("conv")
def _no_blocks(channels: int, depth: int, first: int) -> Any:
    import torch.nn as nn

    return nn.Identity()


@TRANSFORMS.register("resnet")
def _resnet(channels: int, depth: int, first: int) -> Any:
    import torch.nn as nn
    from compressai.models.sensetime import ResidualBottleneckBlock

    if depth == 0:
        return nn.Identity()
    return nn.Sequential(*(ResidualBottleneckBlock(channels, channels) for _ in range(depth)))


def _contiguous() -> Any:
    import torch.nn as nn

    class Contiguous(nn.Module):
        """Back to the standard memory layout. Blocks that permute to NHWC hand on
        channels-last strides, which the following convolutions keep; y would then be
        computed with other kernels (other rounding) than the decoder's contiguous
        tensors, and decoding would differ from the forward pass in the last bit."""

        def forward(self, x: Any) -> Any:
            return x.contiguous()

    return Contiguous()


@TRANSFORMS.register("convnext")
def _convnext(channels: int, depth: int, first: int) -> Any:
    import torch.nn as nn
    from timm.models.convnext import ConvNeXtBlock

    if depth == 0:
        return nn.Identity()
    c = eff_lic_config()["convnext"]
    return nn.Sequential(
        *(
            ConvNeXtBlock(channels, kernel_size=c["kernel"], mlp_ratio=c["mlp_ratio"])
            for _ in range(depth)
        ),
        _contiguous(),
    )


def _swin_stage(channels: int, depth: int, first: int, window: int) -> Any:
    import torch.nn as nn
    from timm.models.swin_transformer import SwinTransformerBlock

    class ChannelsLast(nn.Sequential):
        """timm's Swin blocks take NHWC; the skeleton is NCHW (contiguous: see
        ``_contiguous``)."""

        def forward(self, x: Any) -> Any:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    if depth == 0:
        return nn.Identity()
    c = eff_lic_config()["swin"]
    return ChannelsLast(
        *(
            SwinTransformerBlock(
                channels,
                input_resolution=(window, window),
                num_heads=max(1, channels // c["head_dim"]),
                window_size=window,
                # Alternate plain and shifted windows over the whole transform, so that even
                # with one block per scale neighbouring windows exchange information.
                shift_size=window // 2 if (first + i) % 2 else 0,
                mlp_ratio=c["mlp_ratio"],
                # Any input size: pad to whole windows, masks computed per input.
                always_partition=True,
                dynamic_mask=True,
            )
            for i in range(depth)
        )
    )


TRANSFORMS.register("swin")(_swin_stage)


# -- context models ----------------------------------------------------------------------------


def _conv(cin: int, cout: int, k: int) -> Any:
    import torch.nn as nn

    return nn.Conv2d(cin, cout, k, padding=k // 2)


def _param_net(cin: int, cout: int, hidden_min: int) -> Any:
    """Three 1x1 convs ramping from ``cin`` to ``cout`` channels (ELIC's "parameter
    aggregation"); pointwise, as the checkerboard codec requires."""
    import torch.nn as nn
    from compressai.layers import sequential_channel_ramp

    return sequential_channel_ramp(
        cin,
        cout,
        min_ch=hidden_min,
        num_layers=3,
        interp="linear",
        make_layer=nn.Conv2d,
        make_act=lambda: nn.ReLU(inplace=True),
        kernel_size=1,
    )


def _channel_context(prev: int, out: int, N: int) -> Any:
    """5x5 convs from the decoded groups to ``out`` parameters (ELIC's g_ch, hidden N)."""
    import torch.nn as nn

    k = eff_lic_config()["context_kernel"]
    return nn.Sequential(
        _conv(prev, N, k),
        nn.ReLU(inplace=True),
        _conv(N, N, k),
        nn.ReLU(inplace=True),
        _conv(N, out, k),
    )


@CONTEXTS.register("hyperprior")
def _hyperprior(N: int, M: int, opts: dict[str, Any]) -> Any:
    from compressai.latent_codecs import GaussianConditionalLatentCodec

    # The hyper-synthesis already outputs (scales, means) for every channel of y.
    return GaussianConditionalLatentCodec(quantizer="ste")


@cache
def _slice_codec_class() -> type:
    from compressai.latent_codecs import GaussianConditionalLatentCodec

    class SliceCodec(GaussianConditionalLatentCodec):
        """``ChannelGroupsLatentCodec.decompress`` rebuilds y from each group's (C, H, W);
        CompressAI 1.2.8's Gaussian conditional codec reports only (H, W), so plain
        channel slices (no checkerboard around them) could not be decoded."""

        def compress(self, y: Any, ctx_params: Any) -> dict[str, Any]:
            out = super().compress(y, ctx_params)
            out["shape"] = tuple(y.shape[1:])
            return out

        def decompress(self, strings: Any, shape: Any, ctx_params: Any, **kw: Any) -> Any:
            return super().decompress(strings, tuple(shape[-2:]), ctx_params, **kw)

    return SliceCodec


@CONTEXTS.register("channel")
def _channel(N: int, M: int, opts: dict[str, Any]) -> Any:
    from compressai.latent_codecs import ChannelGroupsLatentCodec

    GaussianConditionalLatentCodec = _slice_codec_class()

    k = int(opts["slices"])
    if not 1 <= k <= M:
        raise ClbenchError(f"codec eff-lic: slices={k} must be between 1 and M={M}")
    groups = [M // k + (i < M % k) for i in range(k)]
    return ChannelGroupsLatentCodec(
        groups=groups,
        channel_context={
            f"y{i}": _channel_context(sum(groups[:i]), 2 * groups[i], N) for i in range(1, k)
        },
        latent_codec={
            f"y{i}": GaussianConditionalLatentCodec(
                quantizer="ste",
                entropy_parameters=_param_net(
                    2 * M + 2 * groups[i] * (i > 0), 2 * groups[i], 2 * N
                ),
            )
            for i in range(k)
        },
    )


def parse_groups(text: Any, M: int) -> list[int]:
    """``"16/16/32/64"`` -> ``[16, 16, 32, 64, M - 128]`` (the rest of M is the last group)."""
    try:
        head = [int(g) for g in str(text).split("/") if g.strip()]
    except ValueError:
        head = []
    if not head or min(head) < 1:
        raise ClbenchError(
            f"codec eff-lic: groups={text!r} is invalid; write channel counts like 16/16/32/64"
        )
    if sum(head) >= M:
        raise ClbenchError(
            f"codec eff-lic: groups={text} use {sum(head)} channels, leaving none of M={M} for "
            "the last group; raise M or pass smaller groups (e.g. groups=2/2/4 for M=16)"
        )
    return [*head, M - sum(head)]


def _exact_checkerboard() -> type:
    """CompressAI's ``CheckerboardLatentCodec`` whose eval-mode forward runs the coder's own
    computation: the entropy parameters on the two unembedded half grids, as ``compress``
    and ``decompress`` do. CompressAI's forward runs them on the full grid, where the 1x1
    convolutions' GEMMs are blocked differently on some CPUs (AVX2), so the means, and then
    a few reconstructed values, differed from the decoded ones in the last bit. Training
    keeps CompressAI's two-pass forward."""
    from compressai.latent_codecs import CheckerboardLatentCodec
    from compressai.ops import quantize_ste

    class ExactCheckerboardLatentCodec(CheckerboardLatentCodec):
        def forward(self, y: Any, side_params: Any) -> dict[str, Any]:
            if self.training:
                return super().forward(y, side_params)
            n, c, h, w = y.shape
            y_hat_ = y.new_zeros((2, n, c, h, w // 2))
            params_ = y.new_zeros((2, n, 2 * c, h, w // 2))
            y_, side_ = self.unembed(y), self.unembed(side_params)
            for i in range(2):  # anchors, then non-anchors in their context (as compress)
                ctx = self.unembed(self.context_prediction(self.embed(y_hat_)))[i]
                if i == 0:
                    ctx = self._mask_all(ctx)
                params_[i] = self.entropy_parameters(self.merge(ctx, side_[i]))
                _, means = self.latent_codec["y"]._chunk(params_[i])
                y_hat_[i] = quantize_ste(y_[i] - means) + means
            out = self.latent_codec["y"](y, self.embed(params_))
            return {"likelihoods": {"y": out["likelihoods"]["y"]}, "y_hat": self.embed(y_hat_)}

    return ExactCheckerboardLatentCodec


@CONTEXTS.register("space-channel")
def _space_channel(N: int, M: int, opts: dict[str, Any]) -> Any:
    from compressai.latent_codecs import ChannelGroupsLatentCodec, GaussianConditionalLatentCodec
    from compressai.layers import CheckerboardMaskedConv2d

    CheckerboardLatentCodec = _exact_checkerboard()

    groups = parse_groups(opts["groups"], M)
    k = eff_lic_config()["context_kernel"]
    return ChannelGroupsLatentCodec(
        groups=groups,
        channel_context={
            f"y{i}": _channel_context(sum(groups[:i]), 2 * g, N)
            for i, g in enumerate(groups)
            if i > 0
        },
        latent_codec={
            f"y{i}": CheckerboardLatentCodec(
                latent_codec={"y": GaussianConditionalLatentCodec(quantizer="ste")},
                context_prediction=CheckerboardMaskedConv2d(
                    g, 2 * g, kernel_size=k, padding=k // 2
                ),
                # spatial context + channel context (after the first group) + hyper side
                entropy_parameters=_param_net(2 * g + 2 * g * (i > 0) + 2 * M, 2 * g, 2 * N),
            )
            for i, g in enumerate(groups)
        },
    )


# -- the model -------------------------------------------------------------------------------


def _build_model_class() -> type:
    import torch.nn as nn

    import_compressai()
    from compressai.entropy_models import EntropyBottleneck
    from compressai.latent_codecs import HyperLatentCodec, HyperpriorLatentCodec
    from compressai.layers import GDN
    from compressai.models.base import SimpleVAECompressionModel, get_scale_table
    from compressai.models.utils import conv, deconv

    class EffLIC(SimpleVAECompressionModel):
        """GDN skeleton + ``transform`` blocks at strides 2, 4, 8 + ``context`` for y,
        with a mean-scale hyperprior side branch (z at stride 64)."""

        def __init__(
            self,
            transform: str,
            context: str,
            N: int,
            M: int,
            depth: int,
            slices: int = 5,
            groups: str = "16/16/32/64",
            window: int = 8,
        ):
            super().__init__()
            for key, v, lo in (
                ("N", N, 1),
                ("M", M, 1),
                ("depth", depth, 0),
                ("window", window, 1),
            ):
                if not isinstance(v, int) or v < lo:
                    raise ClbenchError(f"codec eff-lic: {key}={v!r} must be an integer >= {lo}")
            make = TRANSFORMS.get(transform)
            make_context = CONTEXTS.get(context)
            extra = {"window": window} if transform == "swin" else {}

            def stage(i: int) -> Any:
                return make(N, depth, i * depth, **extra)

            self.g_a = nn.Sequential(
                conv(3, N), GDN(N), stage(0),
                conv(N, N), GDN(N), stage(1),
                conv(N, N), GDN(N), stage(2),
                conv(N, M),
            )  # fmt: skip
            self.g_s = nn.Sequential(
                deconv(M, N), GDN(N, inverse=True), stage(3),
                deconv(N, N), GDN(N, inverse=True), stage(4),
                deconv(N, N), GDN(N, inverse=True), stage(5),
                deconv(N, 3),
            )  # fmt: skip
            h_a = nn.Sequential(
                conv(M, N, kernel_size=3, stride=1), nn.ReLU(inplace=True),
                conv(N, N), nn.ReLU(inplace=True),
                conv(N, N),
            )  # fmt: skip
            h_s = nn.Sequential(
                deconv(N, N), nn.ReLU(inplace=True),
                deconv(N, N * 3 // 2), nn.ReLU(inplace=True),
                conv(N * 3 // 2, 2 * M, kernel_size=3, stride=1),
            )  # fmt: skip
            y_codec = make_context(N, M, {"slices": slices, "groups": groups})
            self.latent_codec = HyperpriorLatentCodec(
                latent_codec={
                    "y": y_codec,
                    "hyper": HyperLatentCodec(
                        entropy_bottleneck=EntropyBottleneck(N), h_a=h_a, h_s=h_s, quantizer="ste"
                    ),
                }
            )

        def update(
            self, scale_table: Any = None, force: bool = False, update_quantiles: bool = False
        ) -> bool:
            # A finer scale table than CompressAI's 64 levels: the coder rounds each
            # predicted scale up to a table entry, and with 64 levels that cost ~1.5 % over
            # the estimated rate; with 256 it is a few tenths of a percent (tests check < 1 %).
            if scale_table is None:
                scale_table = get_scale_table(levels=eff_lic_config()["scale_table_levels"])
            return super().update(scale_table, force=force, update_quantiles=update_quantiles)

    return EffLIC


_EFF_LIC: list[type] = []


def model_class() -> type:
    """The ``EffLIC`` model class (built on first use: importing this module stays cheap)."""
    if not _EFF_LIC:
        _EFF_LIC.append(_build_model_class())
    return _EFF_LIC[0]


def build_model(**kwargs: Any) -> Any:
    """An ``EffLIC`` model with the YAML defaults overridden by ``kwargs``."""
    return model_class()(**{**eff_lic_config()["defaults"], **kwargs})


@register_codec("eff-lic")
class EffLicCodec(CompressAICodec):
    """efficient-LIC family: GDN skeleton + residual/ConvNeXt/Swin blocks x hyperprior/channel/space-channel context (train it)"""

    family_cfg = {
        "zoo": False,
        "min_pad": eff_lic_config()["min_pad"],
        "defaults": eff_lic_config()["defaults"],
    }

    def _validate(self) -> None:
        # Architecture options next to a checkpoint assert what it must hold (checked when
        # it is read) instead of being refused.
        self._asked: dict[str, Any] = {}
        if self.checkpoint is not None and self.arch_kwargs:
            self._asked, self.arch_kwargs = self.arch_kwargs, {}
        super()._validate()

    def _model_class(self) -> type:
        return model_class()

    def _from_checkpoint(self, path: str | os.PathLike, record: bool = True) -> Any:
        if self._asked:
            _, meta = read_checkpoint(path, self.name)
            have = meta.get("arch_kwargs") or {}
            if meta.get("arch", self.name) == self.name and any(
                have.get(k) != v for k, v in self._asked.items()
            ):
                shown = {k: have.get(k) for k in ("transform", "context", "N", "M", "depth")}
                raise ClbenchError(
                    f"codec eff-lic: checkpoint {path} holds {format_spec(self.name, shown)}, "
                    f"not the requested {format_spec(self.name, self._asked)}; drop the "
                    "architecture options or pass that checkpoint's"
                )
        return super()._from_checkpoint(path, record)


__all__ = [
    "CONTEXTS",
    "TRANSFORMS",
    "EffLicCodec",
    "build_model",
    "eff_lic_config",
    "model_class",
    "parse_groups",
]
