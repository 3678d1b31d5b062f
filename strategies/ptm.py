"""Rehearsal-free pre-trained-model (PTM) baselines of CL-LoRA's Table 1, on timm ViTs.

* ``simplecil``: prototype (class-mean) cosine classifier on the frozen PTM.
* ``seq-lora``: peft LoRA on the fused qkv projections + a growing linear head, fine-tuned
  sequentially (the lower bound).
* ``ranpac``: AdaptFormer adapters tuned on the first task, then a frozen random projection
  (ReLU) and a ridge-regression head accumulated over tasks.
* ``aper``: APER/ADAM with AdaptFormer adapters tuned on the first task, then a prototype
  classifier on the concatenated [pre-trained, adapted] features.

InfLoRA is in ``inflora.py``, the prompt methods in ``prompts.py``; both build on
:class:`PTMStrategy`.

Facts (not code) from LAMDA-CL/LAMDA-PILOT (``models/simplecil.py``, ``aper_adapter.py``,
``ranpac.py``, ``backbone/vit_adapter.py``, ``exps/*.json``); published defaults are in
``ptm.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.errors import ConfigError
from clbench.optim import Optim, Schedule, check_optim
from clbench.strategies.base import (
    TRAIN_KEY_TYPES,
    Experience,
    Strategy,
    StrategyContext,
    autocast,
    backbone_fingerprint,
    check_fingerprint,
    extend_class_means,
    fill_train_keys,
    register_strategy,
)
from clbench.strategies.heads import CosineHead, IncrementalHead, local_labels

DEFAULTS_FILE = Path(__file__).with_name("ptm.yaml")


# -- shared pieces -------------------------------------------------------------------------


class Prototypes:
    """Class-mean features, [n_seen, d], and cosine logits against them."""

    def __init__(self, device: torch.device):
        self.means = torch.zeros(0, 0, device=device)

    def add(self, feats: Tensor, labels: Tensor, classes: Iterable[int]) -> None:
        self.means = extend_class_means(self.means, feats, labels, classes, "prototypes")

    def logits(self, feats: Tensor) -> Tensor:
        return F.normalize(feats.float(), dim=1) @ F.normalize(self.means, dim=1).T


class Adapter(nn.Module):
    """AdaptFormer bottleneck (PILOT ``vit_adapter.Adapter`` as configured there: no layer
    norm, ``lora`` init = kaiming-uniform down / zero up and biases, ReLU, dropout 0.1,
    fixed scale 0.1)."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale, self.dropout = scale, dropout
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.down(x)), self.dropout, self.training)
        return self.up(h) * self.scale


class AdaptedBlock(nn.Module):
    """A timm ViT ``Block`` with a parallel AdaptFormer adapter on its MLP branch: the
    adapter reads the block's post-attention residual stream (PILOT's ``ffn_option:
    parallel``) and its output is added beside the MLP's. ``enabled`` off gives the
    pre-trained block (APER's first branch) without a second copy of the ViT."""

    def __init__(self, block: nn.Module, adapter: Adapter):
        super().__init__()
        self.block, self.adapter, self.enabled = block, adapter, True

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        out = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        return out + self.adapter(x) if self.enabled else out


def add_adapters(vit: nn.Module, bottleneck: int, scale: float, dropout: float) -> nn.ModuleList:
    """Wrap every block of a timm ViT with an adapter; returns the adapters (trainable)."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise ConfigError(f"adapters need a timm VisionTransformer, got {type(vit).__name__}")
    adapters = nn.ModuleList()
    for i, blk in enumerate(blocks):
        dim = blk.norm1.normalized_shape[0]
        ad = Adapter(dim, bottleneck, scale, dropout).to(next(blk.parameters()).device)
        blocks[i] = AdaptedBlock(blk, ad)
        adapters.append(ad)
    return adapters


def set_adapters(vit: nn.Module, enabled: bool) -> None:
    for blk in vit.blocks:
        if isinstance(blk, AdaptedBlock):
            blk.enabled = enabled


class PTMStrategy(Strategy):
    """A frozen pre-trained timm ViT plus how the PTM baselines train: their own optimizer,
    schedule (stepped per epoch, as PILOT does) and batch size, through the engine."""

    param_types = TRAIN_KEY_TYPES

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        fill_train_keys(self.params, self.train_cfg)
        if "lr" in self.params:  # the strategies that train
            key = f"strategy_params.{self.name}"
            check_optim(self.optim(), self.schedule(), f"{key}.optimizer", f"{key}.scheduler")
        self.backbone = ctx.make_backbone().to(self.device)
        self.backbone.requires_grad_(False)
        # the pre-trained tensors, before adapters wrap any block: the fingerprint's source
        self._pretrained = list(self.backbone.parameters())
        self.dim = int(self.backbone.num_features)
        self._last_trainable = 0

    def optim(self) -> Optim:
        p = self.params
        return Optim(p.get("optimizer", "sgd"), p["lr"], p.get("momentum", 0.9), p["weight_decay"])

    def schedule(self) -> Schedule:
        p = self.params
        return Schedule(p.get("scheduler", "cosine"), every="epoch", min_lr=p.get("min_lr", 0.0))

    def train_loop(
        self,
        params: list[nn.Parameter],
        data: Any,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        exp_index: int,
        modules: Iterable[nn.Module] = (),
    ) -> None:
        """Minimise ``loss_fn(x, y)`` with the strategy's optimiser and per-epoch schedule."""
        p = self.params
        loader = self.loader(data, shuffle=True, batch_size=int(p["batch_size"]))
        result = self.engine.fit(
            loader,
            params,
            optim=self.optim(),
            schedule=self.schedule(),
            epochs=int(p["epochs"]),
            loss=loss_fn,
            modules=modules,
            exp_index=exp_index,
            hint=f"lower strategy_params.{self.name}.lr",
        )
        self._last_trainable = result.trainable
        self.images_trained += result.images

    @torch.no_grad()
    def features(self, data: Any, fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        self.backbone.eval()
        feats, labels = self.extract(fn, data, self.train_cfg.eval_batch_size)
        return feats.to(self.device), labels.to(self.device)

    def trainable_params(self) -> int:
        return self._last_trainable

    def _fingerprint(self) -> list[float]:
        return backbone_fingerprint(self._pretrained)

    def _check_fingerprint(self, state: dict[str, Any]) -> None:
        check_fingerprint(state.get("backbone_fingerprint"), self._fingerprint(), self.name)


# -- SimpleCIL -------------------------------------------------------------------------------


class PrototypeClassifier(PTMStrategy):
    """Cosine classifier over class means of ``embed`` features (training images, eval
    transforms), computed after ``before_experience`` has adapted the model for the task."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.protos = Prototypes(self.device)

    def embed(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def learn(self, exp: Experience) -> None:
        feats, labels = self.features(exp.data("eval"), self.embed)
        self.protos.add(feats, labels, exp.classes)
        self.n_seen = self.protos.means.shape[0]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.backbone.eval()
        with autocast(self.device, self.amp):
            f = self.embed(x.to(self.device))
        return self.protos.logits(f)

    def memory(self) -> dict[str, Any]:
        m = self.protos.means
        return {**super().memory(), "model_copies_bytes": m.numel() * m.element_size()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "prototypes": self.protos.means.cpu(),
            "n_seen": self.n_seen,
            "backbone_fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fingerprint(state)
        self.protos.means = state["prototypes"].to(self.device)
        self.n_seen = int(state["n_seen"])


@register_strategy("simplecil", DEFAULTS_FILE)
class SimpleCIL(PrototypeClassifier):
    """Zhou et al. 2023 (PILOT ``simplecil``, ``tuned_epoch: 0``): class means of the frozen
    PTM's features as a cosine classifier."""


# -- Seq-LoRA --------------------------------------------------------------------------------


@register_strategy("seq-lora", DEFAULTS_FILE)
class SeqLoRA(PTMStrategy):
    """LoRA (peft) on every block's fused qkv projection plus a linear head over the seen
    classes, trained on each task in turn with no protection against forgetting."""

    param_types = {"alpha": "float"}  # lora_alpha: 10 in the YAML, any number is valid

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        from peft import LoraConfig, inject_adapter_in_model

        p = self.params
        cfg = LoraConfig(
            r=int(p["rank"]),
            lora_alpha=float(p["alpha"]),
            lora_dropout=float(p["dropout"]),
            target_modules=list(p["target_modules"]),
        )
        self.backbone = inject_adapter_in_model(cfg, self.backbone)
        for name, q in self.backbone.named_parameters():
            q.requires_grad_("lora_" in name)
        self.head = IncrementalHead(self.dim, ctx.num_classes).to(self.device)

    def _lora_params(self) -> list[nn.Parameter]:
        return [q for n, q in self.backbone.named_parameters() if "lora_" in n]

    def learn(self, exp: Experience) -> None:
        n_seen = max(self.n_seen, max(exp.classes) + 1)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(self.head(self.backbone(x), n_seen).float(), y)

        params = self._lora_params() + list(self.head.parameters())
        self.train_loop(params, exp.data("train"), loss_fn, exp.index, [self.backbone])
        self.n_seen = n_seen

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.backbone.eval()
        with autocast(self.device, self.amp):
            return self.head(self.backbone(x.to(self.device)), self.n_seen).float()

    def state_dict(self) -> dict[str, Any]:
        lora = {n: q.detach().cpu() for n, q in self.backbone.named_parameters() if "lora_" in n}
        return {
            "lora": lora,
            "head": {k: v.cpu() for k, v in self.head.state_dict().items()},
            "n_seen": self.n_seen,
            "backbone_fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fingerprint(state)
        named = dict(self.backbone.named_parameters())
        with torch.no_grad():
            for n, v in state["lora"].items():
                named[n].copy_(v)
        self.head.load_state_dict(state["head"])
        self.n_seen = int(state["n_seen"])


# -- first-session adaptation (APER, RanPAC) --------------------------------------------------


class FirstSessionAdapted(PTMStrategy):
    """Tune AdaptFormer adapters (+ a cosine head, PILOT's ``SimpleVitNet``) on the first
    task only; later tasks reuse the frozen adapted model."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        p = self.params
        self.adapters = add_adapters(
            self.backbone, int(p["ffn_num"]), float(p["adapter_scale"]), float(p["adapter_dropout"])
        )
        self.tuned = False

    def tune_first_session(self, exp: Experience) -> None:
        if self.tuned or int(self.params["epochs"]) == 0:
            self.tuned = True
            return
        lut = local_labels(exp.classes, self.ctx.num_classes, self.device)
        head = CosineHead(self.dim, len(exp.classes)).to(self.device)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(head(self.backbone(x)).float(), lut[y])

        self.adapters.requires_grad_(True)
        params = list(self.adapters.parameters()) + list(head.parameters())
        self.train_loop(params, exp.data("train"), loss_fn, exp.index, [self.backbone])
        self.adapters.requires_grad_(False)
        self.tuned = True

    def adapter_state(self) -> dict[str, Any]:
        return {k: v.cpu() for k, v in self.adapters.state_dict().items()}

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        self.adapters.load_state_dict(state)


@register_strategy("aper", DEFAULTS_FILE)
class APER(FirstSessionAdapted, PrototypeClassifier):
    """APER/ADAM with adapters (Zhou et al. 2023, PILOT ``aper_adapter``): adapters tuned on
    the first task; every class's prototype is the mean of [pre-trained, adapted] features
    (concatenated), classified by cosine."""

    def embed(self, x: Tensor) -> Tensor:
        set_adapters(self.backbone, False)
        try:
            f_ptm = self.backbone(x)
        finally:
            set_adapters(self.backbone, True)
        return torch.cat((f_ptm, self.backbone(x)), dim=1)

    def before_experience(self, exp: Experience) -> None:
        self.tune_first_session(exp)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "adapters": self.adapter_state(), "tuned": self.tuned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.load_adapter_state(state["adapters"])
        self.tuned = bool(state["tuned"])


def ridge_select(
    h: Tensor, y: Tensor, lambdas: Tensor, train_frac: float, gen: torch.Generator
) -> float:
    """PILOT ``optimise_ridge_parameter``: fit on a random ``train_frac`` of the task's
    features, pick the lambda with the lowest MSE on the rest.

    One thin SVD of the fit split gives every lambda's solution exactly,
    ``W = V diag(s / (s^2 + lambda)) U^T Y``, instead of one M x M solve per lambda (PILOT
    solves 17 times; with M = 10,000 that dominates a CPU run)."""
    perm = torch.randperm(h.shape[0], generator=gen).to(h.device)
    n_fit = int(h.shape[0] * train_frac)
    fit, val = perm[:n_fit], perm[n_fit:]
    if n_fit == 0 or len(val) == 0:
        return float(lambdas[len(lambdas) // 2])
    hd, yd = h.double(), y.double()
    u, s, vh = torch.linalg.svd(hd[fit], full_matrices=False)
    uty = u.T @ yd[fit]  # [k, classes]
    hv = hd[val] @ vh.T  # [n_val, k]
    losses = []
    for lam in lambdas.tolist():
        pred = hv @ ((s / (s * s + lam))[:, None] * uty)
        losses.append(float(F.mse_loss(pred, yd[val])))
    return float(lambdas[int(torch.tensor(losses).argmin())])


@register_strategy("ranpac", DEFAULTS_FILE)
class RanPAC(FirstSessionAdapted):
    """RanPAC (McDonnell et al. 2023, PILOT ``ranpac``): first-session adapters, then a
    frozen Gaussian random projection to M dims with ReLU, and a ridge-regression head from
    the accumulated Gram matrix G = sum h^T h and Q = sum h^T Y (one-hot over all classes);
    lambda in 10^-8..10^8, chosen per task on an 80/20 split of that task's features."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        m = int(self.params["M"])
        gen = torch.Generator().manual_seed(ctx.seed + 7919)
        self.w_rand = torch.randn(self.dim, m, generator=gen).to(self.device)
        self.G = torch.zeros(m, m, device=self.device)
        self.Q = torch.zeros(m, ctx.num_classes, device=self.device)
        self.W = torch.zeros(m, ctx.num_classes, device=self.device)
        self.ridge = 0.0

    def project(self, f: Tensor) -> Tensor:
        return F.relu(f.float() @ self.w_rand)

    def before_experience(self, exp: Experience) -> None:
        self.tune_first_session(exp)

    def learn(self, exp: Experience) -> None:
        feats, labels = self.features(exp.data("eval"), self.backbone)
        h = self.project(feats)
        y = F.one_hot(labels.long(), self.ctx.num_classes).float()
        self.G += h.T @ h
        self.Q += h.T @ y
        p = self.params
        lambdas = torch.logspace(
            p["ridge_min_exp"], p["ridge_max_exp"], p["ridge_max_exp"] - p["ridge_min_exp"] + 1
        )
        gen = torch.Generator().manual_seed(self.ctx.seed * 1000 + exp.index)
        self.ridge = ridge_select(h, y, lambdas, float(p["ridge_fit_frac"]), gen)
        eye = torch.eye(self.G.shape[0], device=self.device)
        self.W = torch.linalg.solve(self.G + self.ridge * eye, self.Q)
        self.n_seen = max(self.n_seen, max(exp.classes) + 1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.backbone.eval()
        with autocast(self.device, self.amp):
            f = self.backbone(x.to(self.device))
        return self.project(f) @ self.W[:, : self.n_seen]

    def memory(self) -> dict[str, Any]:
        size = sum(t.numel() * t.element_size() for t in (self.w_rand, self.G, self.Q, self.W))
        return {**super().memory(), "model_copies_bytes": size}

    def state_dict(self) -> dict[str, Any]:
        return {
            "adapters": self.adapter_state(),
            "tuned": self.tuned,
            "w_rand": self.w_rand.cpu(),
            "G": self.G.cpu(),
            "Q": self.Q.cpu(),
            "W": self.W.cpu(),
            "ridge": self.ridge,
            "n_seen": self.n_seen,
            "backbone_fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fingerprint(state)
        self.load_adapter_state(state["adapters"])
        self.tuned = bool(state["tuned"])
        for k in ("w_rand", "G", "Q", "W"):
            setattr(self, k, state[k].to(self.device))
        self.ridge = float(state["ridge"])
        self.n_seen = int(state["n_seen"])
