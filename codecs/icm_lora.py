"""LoRA for image coding for machines ("Low-Rank Adaptation of Pre-trained Vision Backbones
for Energy-Efficient Image Coding for Machines", arXiv 2505.17366).

The pre-trained backbone stays frozen and becomes the encoder: low-rank adapters (peft
LoRA on its Conv2d and Linear layers up to the split) make its feature at the split
compressible and task-specific; an entropy model codes that feature; the rest of the
backbone and a task head read the decoded feature. Loss: task cross-entropy + λ·bpp (bits
over the original image's pixels, as :mod:`.feature_vr`).

Per task, on ONE shared frozen backbone: a peft adapter (named after the task and its
checkpoint), a per-channel quantisation step (ours: split features have no unit scale, so
it starts at each channel's standard deviation on training data and is learned, letting
the adapters trade precision per channel), a factorized
entropy bottleneck, and a head: the pretrained classifier restricted to the classes for
``fine``, or a new linear layer on its pooled features for a coarser task
(``task_model.yaml`` ``tasks``). Codecs of several tasks and rates load their adapters
into one backbone instance (:func:`shared_backbone`) and switch by name.

Which layers get adapters: exact ``nn.Conv2d`` with ``groups == 1`` and ``nn.Linear`` on
the sender's side of the split. Depthwise convolutions hold few weights, and subclasses
with their own forward (timm's ``Conv2dSame`` pads at run time) would not match the
padding of LoRA's own convolution.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.codecs import container
from clbench.codecs.base import CorruptDataError
from clbench.codecs.icm_train import ICMMethod, register_icm_method
from clbench.codecs.learned import batch_default
from clbench.codecs.registry import register_codec
from clbench.codecs.task_model import (
    FeatureCodec,
    TaskModel,
    fit_entropy_buffers,
    read_icm_checkpoint,
    task_label_map,
    task_model_for,
)
from clbench.errors import ClbenchError

NAME = "icm-lora"


def lora_targets(tm: TaskModel, split: str) -> list[str]:
    """Names (in ``tm.net``) of the layers that get adapters: see the module docstring."""
    names = []
    for stage, module in tm.atoms[: tm.split_index(split)]:
        for sub, m in [("", module), *module.named_modules()]:
            if type(m) is nn.Conv2d and m.groups == 1 or type(m) is nn.Linear:
                names.append(f"{stage}.{sub}" if sub else stage)
    if not names:
        raise ClbenchError(
            f"{NAME}: task model {tm.spec.name} has no Conv2d/Linear layer before split {split!r}"
        )
    return sorted(set(names))


class LoRAICM(nn.Module):
    """A frozen task model with per-task adapters, quantisation steps, entropy models, heads."""

    def __init__(self, tm: TaskModel, split: str):
        super().__init__()
        self.tm, self.split = tm, split
        self.channels = tm.feature_shape(split)[0]
        self.targets = lora_targets(tm, split)  # before any injection wraps the layers
        self.log_steps = nn.ParameterDict()
        self.entropy = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.tasks: dict[str, str] = {}  # adapter name -> task
        self.active: str | None = None

    def add_adapter(
        self, name: str, task: str, rank: int, alpha: float, init_scale: float = 10.0
    ) -> None:
        import peft
        from compressai.entropy_models import EntropyBottleneck

        if name in self.tasks:
            raise ClbenchError(f"{NAME}: adapter {name!r} is already loaded")
        cfg = peft.LoraConfig(
            r=int(rank), lora_alpha=float(alpha), target_modules=self.targets, lora_dropout=0.0
        )
        with warnings.catch_warnings():  # several adapters on one model is the design here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            peft.inject_adapter_in_model(cfg, self.tm.net, adapter_name=name)
        self.log_steps[name] = nn.Parameter(torch.zeros(self.channels))
        self.entropy[name] = EntropyBottleneck(self.channels, init_scale=float(init_scale))
        groups = task_label_map(task, self.tm.spec.classes or [])
        if groups is not None:
            self.heads[name] = nn.Linear(self.tm.net.num_features, int(groups.max()) + 1)
        self.tasks[name] = task
        self.set_adapter(name)

    def set_adapter(self, name: str) -> None:
        from peft.tuners.lora import LoraLayer

        if self.active == name:
            return
        for m in self.tm.net.modules():
            if isinstance(m, LoraLayer):
                m.set_adapter(name)
        self.tm.net.requires_grad_(False)  # peft's set_adapter marks the adapter trainable
        self.active = name

    def trainable(self, name: str) -> list[nn.Parameter]:
        """The adapter's own parameters (LoRA A/B, step, entropy model, head)."""
        ps = [p for n, p in self.tm.net.named_parameters() if f".{name}." in n and "lora_" in n]
        ps += [self.log_steps[name], *self.entropy[name].parameters()]
        if name in self.heads:
            ps += list(self.heads[name].parameters())
        return ps

    def step(self) -> Tensor:
        return self.log_steps[self.active].exp().view(1, -1, 1, 1)

    def sender(self, x: Tensor) -> Tensor:
        """Normalised input -> the scaled feature that is quantised and coded."""
        return self.tm.front(x, self.split) / self.step()

    def receiver(self, y_hat: Tensor) -> Tensor:
        """Quantised latent -> logits of the active task."""
        f_hat = y_hat * self.step()
        if self.active in self.heads:
            return self.heads[self.active](self.tm.back_features(f_hat, self.split))
        return self.tm.back(f_hat, self.split)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        from compressai.ops import quantize_ste

        eb = self.entropy[self.active]
        y = self.sender(x)
        _, likelihoods = eb(y)
        m = eb.quantiles[:, 0, 1].detach().view(1, -1, 1, 1)
        y_hat = quantize_ste(y - m) + m  # exactly what decompress returns
        return {"logits": self.receiver(y_hat), "likelihoods": likelihoods}

    # peft's {get,set}_peft_model_state_dict remap keys for PeftModel wrappers; on a bare
    # module holding several adapters whose names share a prefix ("fine", "fine-3a..") its
    # remapping left weights unloaded, so the adapter name is taken out and put back here.
    def _lora_params(self, name: str) -> dict[str, Tensor]:
        tag = f".{name}."
        return {
            k.replace(tag, "."): p
            for k, p in self.tm.net.named_parameters()
            if ".lora_" in k and tag in k
        }

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        state = {f"lora.{k}": v.detach().clone() for k, v in self._lora_params(name).items()}
        state["log_step"] = self.log_steps[name].detach().clone()
        state.update({f"entropy.{k}": v for k, v in self.entropy[name].state_dict().items()})
        if name in self.heads:
            state.update({f"head.{k}": v for k, v in self.heads[name].state_dict().items()})
        return state

    def load_adapter_state(self, name: str, state: dict[str, Tensor]) -> None:
        params = self._lora_params(name)
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        if set(lora) != set(params) or any(params[k].shape != v.shape for k, v in lora.items()):
            odd = sorted(set(lora) ^ set(params)) or [
                k for k, v in lora.items() if params[k].shape != v.shape
            ]
            raise ClbenchError(
                f"{NAME}: adapter weights do not fit this backbone (e.g. {odd[0]}); was it trained at another split or rank?"
            )
        with torch.no_grad():
            for k, v in lora.items():
                params[k].copy_(v)
            self.log_steps[name].copy_(state["log_step"])
        ent = {k[8:]: v for k, v in state.items() if k.startswith("entropy.")}
        fit_entropy_buffers(self.entropy[name], ent)
        self.entropy[name].load_state_dict(ent)
        if name in self.heads:
            self.heads[name].load_state_dict(
                {k[5:]: v for k, v in state.items() if k.startswith("head.")}
            )


# ---------------------------------------------------------------------------------------
# training


@register_icm_method(NAME)
class LoRAICMMethod(ICMMethod):
    """LoRA-ICM: task cross-entropy + λ·bpp, one adapter set and entropy model per task."""

    defaults_file = "icm_lora.yaml"

    def build(self, tm: TaskModel, split: str) -> nn.Module:
        o = self.options
        if not (o["lmbda"] > 0 and math.isfinite(o["lmbda"])):
            raise ClbenchError(f"{NAME}: lmbda {o['lmbda']} must be a positive number")
        self.task = str(o["task"])
        self.groups = task_label_map(self.task, tm.spec.classes or [])
        self.model = LoRAICM(tm, split)
        self.model.add_adapter(self.task, self.task, o["rank"], o["alpha"], o["entropy_init_scale"])
        return self.model

    def arch(self) -> dict[str, Any]:
        return {
            "rank": int(self.options["rank"]),
            "alpha": float(self.options["alpha"]),
            "lmbda": float(self.options["lmbda"]),
        }

    def meta(self, model: nn.Module) -> dict[str, Any]:
        return {"task": self.task, "lmbda": float(self.options["lmbda"])}

    def parameters(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        ps = self.model.trainable(self.task)
        aux = [p for p in ps if p is self.model.entropy[self.task].quantiles]
        return [p for p in ps if p is not self.model.entropy[self.task].quantiles], aux

    def calibrate(self, model: nn.Module, tm: TaskModel, x: Tensor) -> None:
        # Start each channel's quantisation step at its standard deviation (~2 bits a
        # value) instead of 1: split features of a stage with residual sums have std ~7.
        f = tm.front(x, self.model.split)
        self.model.log_steps[self.task].copy_(f.std((0, 2, 3)).clamp_min(1e-3).log())

    def lr_scales(self, model: nn.Module) -> dict[int, float]:
        # The quantisation steps and the entropy model's density must move by orders of
        # magnitude between rates; at the adapters' learning rate they would barely move in
        # a CPU budget (the density lagging behind kept every rate near 13 bpp).
        scales = {id(self.model.log_steps[self.task]): float(self.options["step_lr_scale"])}
        for p in self.model.entropy[self.task].parameters():
            if p is not self.model.entropy[self.task].quantiles:
                scales[id(p)] = float(self.options["entropy_lr_scale"])
        return scales

    def _labels(self, y: Tensor) -> Tensor:
        return y if self.groups is None else torch.from_numpy(self.groups)[y]

    def loss(
        self, model: nn.Module, tm: TaskModel, x: Tensor, y: Tensor, g: torch.Generator, pixels: int
    ) -> dict[str, Tensor]:
        out = model(x)
        bpp = -torch.log2(out["likelihoods"]).flatten(1).sum(1).mean() / pixels
        ce = F.cross_entropy(out["logits"], self._labels(y))
        return {"loss": ce + self.options["lmbda"] * bpp, "bpp": bpp, "ce": ce}

    def validate(
        self, model: nn.Module, tm: TaskModel, x: Tensor, y: Tensor, pixels: int
    ) -> dict[str, float]:
        out = model(x)
        bpp = -torch.log2(out["likelihoods"]).flatten(1).sum(1).mean() / pixels
        return {
            "top1": float((out["logits"].argmax(1) == self._labels(y)).float().mean() * 100),
            "bpp": float(bpp),
        }

    def aux_loss(self, model: nn.Module) -> Tensor:
        return self.model.entropy[self.task].loss()

    def before_save(self, model: nn.Module) -> None:
        self.model.entropy[self.task].update(force=True, update_quantiles=True)

    def trainable_state(self, model: nn.Module) -> dict[str, Tensor]:
        return self.model.adapter_state(self.task)

    def load_trainable_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        self.model.load_adapter_state(self.task, state)


# ---------------------------------------------------------------------------------------
# the codec

_SHARED: dict[tuple[str, int, str], LoRAICM] = {}


def shared_backbone(
    tm_meta: dict[str, Any], path: str, weights: str | None, data_root: str | None
) -> LoRAICM:
    """One adapted backbone per (fingerprint, input size, split) in a process: the tasks'
    adapters load into it side by side (peft adapters by name)."""
    key = (tm_meta["fingerprint"], int(tm_meta["task_model"]["input_size"]), tm_meta["split"])
    if key not in _SHARED:
        tm = task_model_for(tm_meta, NAME, path, weights, data_root, shared=False)
        _SHARED[key] = LoRAICM(tm, tm_meta["split"]).eval()
    return _SHARED[key]


@register_codec(NAME)
class LoRAICMCodec(FeatureCodec):
    """LoRA-ICM: an adapted frozen backbone's split feature, entropy coded (checkpoint=)."""

    rate_knob = "lmbda"

    def __init__(
        self,
        checkpoint: str | None = None,
        weights: str | None = None,
        data_root: str | None = None,
        batch: int | None = None,
        cross_device: bool = False,
    ):
        self.checkpoint, self.weights, self.data_root = checkpoint, weights, data_root
        self.cross_device, self.device = bool(cross_device), "cpu"
        state, meta = read_icm_checkpoint(checkpoint, NAME)
        self.meta, self.task, self.lmbda = meta, meta["task"], float(meta["lmbda"])
        self.shared = shared_backbone(meta, checkpoint, weights, data_root)
        self.task_model, self.split = self.shared.tm, meta["split"]
        digest = hashlib.sha256(
            b"".join(v.numpy().tobytes() for _, v in sorted(state.items()))
        ).hexdigest()[:10]
        self.adapter = f"{self.task}-{digest}"
        if self.adapter not in self.shared.tasks:
            self.shared.add_adapter(
                self.adapter, self.task, meta["arch"]["rank"], meta["arch"]["alpha"]
            )
            self.shared.load_adapter_state(self.adapter, state)
            self.shared.eval()
            self.shared.entropy[self.adapter].update(force=True)
        self.feature_shape = self.task_model.feature_shape(self.split)
        self.model = self.shared  # the evaluation wing's complexity counts this network
        self.batch_default = batch_default(self.shared.entropy)
        self.batch = self.batch_default if batch is None else int(batch)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"checkpoint": self.checkpoint}
        if self.weights:
            opts["weights"] = self.weights
        if self.batch != self.batch_default:
            opts["batch"] = self.batch
        return opts

    def head(self, features: Tensor) -> Tensor:
        self.shared.set_adapter(self.adapter)
        with torch.inference_mode():
            return self.shared.receiver(features / self.shared.step())

    def encode_batch(self, images: list[np.ndarray]) -> list[bytes]:
        self.shared.set_adapter(self.adapter)
        eb = self.shared.entropy[self.adapter]
        out: list[bytes] = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch):
                chunk = images[s : s + self.batch]
                sizes = {im.shape for im in chunk}
                parts = [chunk] if len(sizes) == 1 else [[im] for im in chunk]
                for part in parts:
                    y = self.shared.sender(self.task_model.preprocess(np.stack(part)))
                    strings = eb.compress(y)
                    shape = [int(v) for v in y.shape[-2:]]
                    for im, st in zip(part, strings, strict=True):
                        h, w = im.shape[:2]
                        out.append(
                            container.pack(
                                container.Packet(NAME, 0, self.lmbda, h, w, "cpu", shape, [st])
                            )
                        )
        return out

    def payload_size(self, data: bytes) -> int:
        return container.unpack(data, self.spec).payload_bytes

    def decode_batch(self, data: list[bytes]) -> list[np.ndarray]:
        self.shared.set_adapter(self.adapter)
        eb = self.shared.entropy[self.adapter]
        packets = [container.unpack(b, self.spec, i) for i, b in enumerate(data)]
        for i, p in enumerate(packets):
            if p.model != NAME or len(p.strings) != 1:
                raise CorruptDataError(
                    f"codec {self.spec}: item {i} was encoded by {p.model}; decode it with that codec"
                )
            if p.device != "cpu" and not self.cross_device:
                raise CorruptDataError(
                    f"codec {self.spec}: item {i} was encoded on {p.device}; pass cross_device=true to try"
                )
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for s in range(0, len(packets), self.batch):
                chunk = packets[s : s + self.batch]
                try:
                    y_hat = eb.decompress([p.strings[0] for p in chunk], tuple(chunk[0].shape))
                except Exception as e:
                    raise CorruptDataError(
                        f"codec {self.spec}: cannot decode item {s}: {type(e).__name__}: {e}"
                    ) from None
                out += list((y_hat * self.shared.step()).float().numpy())
        return out
