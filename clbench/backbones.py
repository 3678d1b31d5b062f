"""Backbones: small from-scratch networks registered here, and any timm model by name.

Every backbone is a feature extractor: ``forward(x) -> [B, num_features]`` and a
``num_features`` attribute. Names not registered here go to ``timm.create_model`` with
``num_classes=0``. Pretrained weights never come from the network implicitly: a local file
(``backbone.checkpoint``, passed to timm as ``pretrained_cfg_overlay=dict(file=...)``) or the
local Hugging Face cache (``HF_HUB_OFFLINE=1`` is set while loading so that a miss is an
error instead of a download attempt).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from clbench.config import BackboneConfig
from clbench.errors import ClbenchError, ConfigError
from clbench.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone", group="clbench.backbones")


@BACKBONES.register("mlp")
class MLP(nn.Module):
    """Two hidden layers over flattened pixels (the digits default)."""

    def __init__(self, image_size: int = 8, hidden: int = 256, channels: int = 3):
        super().__init__()
        self.num_features = hidden
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * image_size * image_size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


@BACKBONES.register("small_cnn")
class SmallCNN(nn.Module):
    """Three conv blocks + global pooling: a fast CNN for tiny images."""

    def __init__(self, width: int = 32, image_size: int = 32):
        super().__init__()
        self.num_features = 4 * width
        self.net = nn.Sequential(
            _conv_bn(3, width),
            _conv_bn(width, 2 * width, 2),
            _conv_bn(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1, option_a: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if option_a:  # CIFAR ResNet-32 (He et al.): parameter-free subsample + zero-pad
                pad = cout - cin
                self.shortcut = _PadShortcut(stride, pad)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _PadShortcut(nn.Module):
    def __init__(self, stride: int, pad: int):
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


@BACKBONES.register("resnet18")
class ResNet18(nn.Module):
    """ResNet-18 for small images, trained from scratch.

    ``stem``: ``cifar`` (3x3 conv, stride 1, no max-pool: the CIL papers' 32x32 variant),
    ``small`` (3x3 conv, stride 2, no max-pool: 64x64 inputs at the cost of 32x32 CIFAR
    ones) or ``imagenet`` (7x7 stride 2 + max-pool: 224x224 inputs).
    """

    def __init__(self, stem: str = "cifar", width: int = 64, image_size: int = 32):
        super().__init__()
        stems = {
            "cifar": lambda: _conv_bn(3, width),
            "small": lambda: _conv_bn(3, width, 2),
            "imagenet": lambda: nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            ),
        }
        if stem not in stems:
            raise ConfigError(f"backbone.kwargs.stem {stem!r}: valid values: {', '.join(stems)}")
        self.stem = stems[stem]()
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.num_features = cin

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)


@BACKBONES.register("resnet32")
class ResNet32(nn.Module):
    """The CIFAR ResNet-32 of iCaRL/PyCIL (3 stages x 5 blocks, 16/32/64 channels)."""

    def __init__(self, image_size: int = 32):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        layers, cin = [], 16
        for i, cout in enumerate([16, 32, 64]):
            for b in range(5):
                layers.append(BasicBlock(cin, cout, 2 if (b == 0 and i > 0) else 1, option_a=True))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.num_features = 64

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)


@contextlib.contextmanager
def _hf_offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def create_backbone(cfg: BackboneConfig, image_size: int) -> nn.Module:
    """Build the configured backbone (registered name, else a timm model)."""
    if cfg.name in BACKBONES:
        if cfg.pretrained or cfg.checkpoint:
            model = BACKBONES.get(cfg.name)(image_size=image_size, **cfg.kwargs)
            return _load_local(model, cfg)
        return BACKBONES.get(cfg.name)(image_size=image_size, **cfg.kwargs)
    import timm

    if not timm.is_model(cfg.name.split(".")[0]):
        raise ConfigError(
            f"unknown backbone {cfg.name!r}; use one of {', '.join(BACKBONES.names())} or a timm "
            "model name (timm.list_models())"
        )
    kwargs = dict(cfg.kwargs)
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise ClbenchError(
                f"backbone.checkpoint {path} does not exist; download the weights of {cfg.name} "
                "on a machine with internet and give their local path"
            )
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
    try:
        with _hf_offline():
            model = timm.create_model(
                cfg.name, pretrained=cfg.pretrained or bool(cfg.checkpoint), num_classes=0, **kwargs
            )
    except (OSError, RuntimeError, ValueError) as e:
        if not (cfg.pretrained or cfg.checkpoint):
            raise
        where = f"backbone.checkpoint {cfg.checkpoint}" if cfg.checkpoint else "the HF cache"
        raise ClbenchError(
            f"cannot load pretrained weights of backbone {cfg.name!r} from {where} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); put them in the Hugging Face "
            "cache (huggingface-cli download timm/<model>) or set backbone.checkpoint to a local "
            "weights file"
        ) from None
    return model


def _load_local(model: nn.Module, cfg: BackboneConfig) -> nn.Module:
    if not cfg.checkpoint:
        raise ClbenchError(
            f"backbone {cfg.name!r} has no published weights: set backbone.checkpoint to a file "
            "(e.g. made by `clbench pretrain`) or backbone.pretrained=false"
        )
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise ClbenchError(f"backbone.checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("backbone", state) if isinstance(state, dict) else state
    model.load_state_dict(state)
    return model
