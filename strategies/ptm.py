"""Rehearsal-free pre-trained-model (PTM) baselines of CL-LoRA's Table 1, on timm ViTs.

* ``simplecil``: prototype (class-mean) cosine classifier on the frozen PTM.
* ``seq-lora``: peft LoRA on the fused qkv projections + a growing linear head, fine-tuned
  sequentially (the lower bound).
* ``ranpac``: AdaptFormer adapters tuned on the first task, then a frozen random projection
  (ReLU) and a ridge-regression head accumulated over tasks.
* ``aper``: APER/ADAM with AdaptFormer adapters tuned on the first task, then a prototype
  classifier on the concatenated [pre-trained, adapted] features.
* ``inflora``: InfLoRA (per-task k/v LoRA whose frozen down-projection is designed from the
  task's input covariance outside the DualGPM subspace of earlier tasks).

Facts (not code) from LAMDA-CL/LAMDA-PILOT (``models/simplecil.py``, ``aper_adapter.py``,
``ranpac.py``, ``backbone/vit_adapter.py``,
``exps/*.json``) and liangyanshuo/InfLoRA (``methods/inflora.py``, ``models/vit_inflora.py``,
``utils/schedulers.py``, ``configs/*.json``); published defaults are in ``ptm.yaml``.
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
from clbench.strategies.base import (
    Experience,
    IncrementalHead,
    Strategy,
    StrategyContext,
    autocast,
    extend_class_means,
    register_strategy,
)
from clbench.strategies.cl_lora import CosineHead

DEFAULTS_FILE = Path(__file__).with_name("ptm.yaml")
TRAIN_KEYS = ("epochs", "lr", "batch_size", "weight_decay")


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


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda ps, lr, wd, mom: torch.optim.SGD(ps, lr=lr, momentum=mom, weight_decay=wd),
    "adam": lambda ps, lr, wd, mom: torch.optim.Adam(ps, lr=lr, weight_decay=wd),
}
SCHEDULERS: dict[str, Callable[..., Any]] = {
    # PILOT steps its schedulers once per epoch
    "cosine": lambda opt, epochs, min_lr: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, max(1, epochs), min_lr
    ),
    "constant": lambda opt, epochs, min_lr: None,
    # InfLoRA's utils/schedulers.CosineSchedule: base * cos(99 pi e / (200 (K - 1))), per epoch
    "inflora-cosine": lambda opt, epochs, min_lr: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: math.cos(99 * math.pi * e / (200 * max(1, epochs - 1)))
    ),
}


class PTMStrategy(Strategy):
    """A frozen pre-trained timm ViT plus the training loop the PTM baselines share."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        for key in TRAIN_KEYS:  # null -> the benchmark's train section
            if key in self.params and self.params[key] is None:
                self.params[key] = getattr(self.train_cfg, key)
        self.backbone = ctx.make_backbone().to(self.device)
        self.backbone.requires_grad_(False)
        self.dim = int(self.backbone.num_features)
        self._last_trainable = 0

    def train_loop(
        self,
        params: list[nn.Parameter],
        data: Any,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        exp_index: int,
        modules: Iterable[nn.Module] = (),
    ) -> None:
        """Minimise ``loss_fn(x, y)``: the strategy's optimiser, per-epoch schedule, AMP."""
        p = self.params
        params = [q for q in params if q.requires_grad]
        self._last_trainable = sum(q.numel() for q in params)
        if p.get("optimizer", "sgd") not in OPTIMIZERS:
            raise ConfigError(f"{self.name} optimizer {p['optimizer']!r}: valid: sgd, adam")
        opt = OPTIMIZERS[p.get("optimizer", "sgd")](
            params, p["lr"], p["weight_decay"], p.get("momentum", 0.9)
        )
        epochs = int(p["epochs"])
        sched = SCHEDULERS[p.get("scheduler", "cosine")](opt, epochs, p.get("min_lr", 0.0))
        loader = self.loader(data, shuffle=True, batch_size=int(p["batch_size"]))
        for m in modules:
            m.train()
        step = 0
        for _ in range(epochs):
            for batch in loader:
                x, y = batch[0].to(self.device), torch.as_tensor(batch[1]).to(self.device)
                with autocast(self.device, self.amp):
                    loss = loss_fn(x, y)
                self.check_finite(loss, exp_index, step, f"; lower strategy_params.{self.name}.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.images_trained += len(y)
                step += 1
            if sched is not None:
                sched.step()
        for m in modules:
            m.eval()

    @torch.no_grad()
    def features(self, data: Any, fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        self.backbone.eval()
        feats, labels = self.extract(fn, data, self.train_cfg.eval_batch_size)
        return feats.to(self.device), labels.to(self.device)

    def trainable_params(self) -> int:
        return self._last_trainable

    def _fingerprint(self) -> list[float]:
        # the frozen PTM is not checkpointed (make_backbone() rebuilds it); detect a resume
        # on different weights
        ps = [q for n, q in self.backbone.named_parameters() if "lora_" not in n]
        return [float(ps[0].double().sum()), float(ps[-1].double().sum())]

    def _check_fingerprint(self, state: dict[str, Any]) -> None:
        fp = state.get("backbone_fingerprint")
        if fp is not None and any(
            not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
            for a, b in zip(self._fingerprint(), fp, strict=True)
        ):
            raise ConfigError(
                f"{self.name} checkpoint was made with different backbone weights than "
                "make_backbone() gives now"
            )


def _local_labels(classes: list[int], num_classes: int, device: torch.device) -> Tensor:
    lut = torch.full((num_classes,), -1, dtype=torch.long, device=device)
    lut[torch.as_tensor(classes, device=device)] = torch.arange(len(classes), device=device)
    return lut


# -- SimpleCIL -------------------------------------------------------------------------------


class PrototypeClassifier(PTMStrategy):
    """Cosine classifier over class means of ``embed`` features (training images, eval
    transforms), computed after ``prepare`` has adapted the model for the task."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        self.protos = Prototypes(self.device)

    def embed(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def prepare(self, exp: Experience) -> None:
        """Adapt the model before the task's prototypes are taken (nothing by default)."""

    def train_experience(self, exp: Experience) -> None:
        self.prepare(exp)
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

    def train_experience(self, exp: Experience) -> None:
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
        lut = _local_labels(list(exp.classes), self.ctx.num_classes, self.device)
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

    def prepare(self, exp: Experience) -> None:
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

    def train_experience(self, exp: Experience) -> None:
        self.tune_first_session(exp)
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


# -- InfLoRA -----------------------------------------------------------------------------------


class InfLoRAQKV(nn.Module):
    """timm's fused qkv Linear plus the sum over tasks of the k and v LoRA updates
    ``B_t A_t x`` (official ``Attention_LoRA``: q untouched). ``A_t`` (down, r x d) is designed,
    never trained; ``B_t`` (up, d x r) starts at zero and is trained on task t only.
    ``record`` accumulates the input's uncentred covariance (sum of x^T x over tokens)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.downs: list[Tensor] = []  # per task [2, r, C] (k, v), frozen
        self.ups = nn.ParameterList()  # per task [2, D, r]
        self.record = False
        self.cov = torch.zeros(base.in_features, base.in_features, dtype=torch.float64)
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.record:
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            self.cov = self.cov.to(flat.device) + flat.T @ flat
            self.count += flat.shape[0]
        out = self.base(x)
        if not self.ups:
            return out
        down = torch.cat(self.downs, dim=1).to(x.dtype)  # [2, T*r, C]
        up = torch.cat(list(self.ups), dim=2).to(x.dtype)  # [2, D, T*r]
        z = torch.einsum("...c,prc->p...r", x, down)
        d = torch.einsum("p...r,pdr->p...d", z, up)
        q, k, v = out.chunk(3, dim=-1)
        return torch.cat((q, k + d[0].to(k.dtype), v + d[1].to(v.dtype)), dim=-1)

    def take_covariance(self) -> Tensor:
        """The mean x^T x since the last call (official ``cur_matrix``), then reset."""
        cov = self.cov / max(1, self.count)
        self.cov, self.count = torch.zeros_like(self.cov), 0
        return cov


def _energy_rank_first(s: Tensor, threshold: float) -> int:
    ratio = (s**2) / (s**2).sum()
    return int((torch.cumsum(ratio, 0) < threshold).sum())


@register_strategy("inflora", DEFAULTS_FILE)
class InfLoRA(PTMStrategy):
    """InfLoRA (Liang & Li, CVPR 2024), as the official code does it:

    * before task t, the input covariance of every block's attention is collected on the
      task's data; projected out of (``remove``) or into (``retain``) the DualGPM subspace of
      earlier tasks; its top-r left singular vectors / sqrt(3) become A_t for k and v;
    * only B_t (zero-init) and the task's own linear classifier train (CE over the task's
      classes), Adam, the official per-epoch cosine;
    * after the task, the covariance under the trained model updates DualGPM with the
      energy threshold ``lamb + (lame - lamb) t / T``;
    * inference: the backbone with every task's LoRA, all task classifiers concatenated.
    """

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        blocks = getattr(self.backbone, "blocks", None)
        if blocks is None:
            raise ConfigError("inflora needs a timm VisionTransformer backbone")
        self.qkvs: list[InfLoRAQKV] = []
        for blk in blocks:
            blk.attn.qkv = InfLoRAQKV(blk.attn.qkv)
            self.qkvs.append(blk.attn.qkv)
        self.heads = nn.ModuleList()
        self.task_classes: list[list[int]] = []
        self.bases: list[Tensor | None] = [None] * len(self.qkvs)  # DualGPM, [C, k] each
        self.kinds: list[str] = ["remove"] * len(self.qkvs)
        self.protected: list[list[int]] = []  # per task: DualGPM dims protected, per block

    # -- DualGPM (official update_DualGPM) ----------------------------------------------------
    def _collect(self, data: Any) -> list[Tensor]:
        for m in self.qkvs:
            m.record = True
        try:
            self.features(data, self.backbone)
        finally:
            for m in self.qkvs:
                m.record = False
        return [m.take_covariance() for m in self.qkvs]

    def _design_down(self, covs: list[Tensor]) -> None:
        rank = int(self.params["rank"])
        for i, (m, cov) in enumerate(zip(self.qkvs, covs, strict=True)):
            base = self.bases[i]
            if base is not None:
                proj = base @ (base.T @ cov)
                cov = cov - proj if self.kinds[i] == "remove" else proj
            u = torch.linalg.svd(cov, full_matrices=False)[0][:, :rank]
            down = (u.T / math.sqrt(3)).float().to(self.device)
            m.downs.append(torch.stack((down, down)))
            m.ups.append(
                nn.Parameter(torch.zeros(2, m.base.out_features // 3, rank, device=self.device))
            )

    def _update_dual_gpm(self, covs: list[Tensor], task: int) -> None:
        p = self.params
        total = len(self.ctx.experience_classes)
        threshold = (p["lame"] - p["lamb"]) * task / total + p["lamb"]
        for i, act in enumerate(covs):
            act = act.cpu()
            base = self.bases[i]
            if base is None:  # after the first task
                u, s, _ = torch.linalg.svd(act, full_matrices=False)
                r = _energy_rank_first(s, threshold)
                self.bases[i] = u[:, : max(r, 1)]
                self.kinds[i] = "remove" if r < act.shape[0] / 2 else "retain"
                continue
            s_total = (torch.linalg.svdvals(act) ** 2).sum()
            proj = base @ (base.T @ act)
            if self.kinds[i] == "remove":
                u, s, _ = torch.linalg.svd(act - proj, full_matrices=False)
                ratio = (s**2) / s_total
                acc = float((s_total - (s**2).sum()) / s_total)
                r = 0
                while r < len(ratio) and acc < threshold:
                    acc += float(ratio[r])
                    r += 1
                if r:
                    ui = torch.cat((base, u[:, :r]), dim=1)
                    self.bases[i] = ui[:, : ui.shape[0]]
            else:
                u, s, _ = torch.linalg.svd(proj, full_matrices=False)
                ratio = (s**2) / s_total
                acc = float((s**2).sum() / s_total)
                r = 0
                while r < len(ratio) and acc >= 1 - threshold:
                    acc -= float(ratio[r])
                    r += 1
                if r:
                    feat = base - u[:, :r] @ (u[:, :r].T @ base)
                    ui = torch.linalg.svd(feat)[0]
                    self.bases[i] = ui[:, : base.shape[1] - r]
        for i, base in enumerate(self.bases):
            # a 'remove' basis over half the space flips to the complement, 'retain'
            if self.kinds[i] == "remove" and base.shape[1] > base.shape[0] / 2:
                self.bases[i] = torch.linalg.svd(base)[0][:, base.shape[1] :]
                self.kinds[i] = "retain"

    def _protected_dims(self) -> list[int]:
        """Input dimensions DualGPM protects in each block (a 'retain' basis stores the
        complement): how much room later tasks' A_t have left."""
        return [
            0 if b is None else (b.shape[1] if k == "remove" else b.shape[0] - b.shape[1])
            for b, k in zip(self.bases, self.kinds, strict=True)
        ]

    def report(self) -> dict[str, Any]:
        return {"dual_gpm_protected_dims": self.protected, "input_dim": self.dim}

    # -- training and inference ---------------------------------------------------------------
    def train_experience(self, exp: Experience) -> None:
        task = len(self.task_classes)
        classes = sorted(int(c) for c in exp.classes)
        self.backbone.eval()  # official: the network stays in eval mode while training
        self._design_down(self._collect(exp.data("train")))
        head = nn.Linear(self.dim, len(classes)).to(self.device)
        self.heads.append(head)
        lut = _local_labels(classes, self.ctx.num_classes, self.device)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(head(self.backbone(x)).float(), lut[y])

        ups = [m.ups[task] for m in self.qkvs]
        self.train_loop([*ups, *head.parameters()], exp.data("train"), loss_fn, exp.index)
        for q in (*ups, *head.parameters()):
            q.requires_grad_(False)
        self._update_dual_gpm(self._collect(exp.data("train")), task)
        self.protected.append(self._protected_dims())
        self.task_classes.append(classes)
        self.n_seen = max(self.n_seen, classes[-1] + 1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.backbone.eval()
        with autocast(self.device, self.amp):
            f = self.backbone(x.to(self.device))
        logits = torch.empty(x.shape[0], self.n_seen, device=self.device)
        for head, classes in zip(self.heads, self.task_classes, strict=True):
            logits[:, torch.as_tensor(classes, device=self.device)] = head(f.float())
        return logits

    def memory(self) -> dict[str, Any]:
        tensors = [t for m in self.qkvs for t in (*m.downs, *m.ups)]
        tensors += [b for b in self.bases if b is not None]
        size = sum(t.numel() * t.element_size() for t in tensors)
        return {**super().memory(), "model_copies_bytes": size}

    def state_dict(self) -> dict[str, Any]:
        return {
            "downs": [[d.cpu() for d in m.downs] for m in self.qkvs],
            "ups": [[u.detach().cpu() for u in m.ups] for m in self.qkvs],
            "heads": [{k: v.cpu() for k, v in h.state_dict().items()} for h in self.heads],
            "task_classes": [list(c) for c in self.task_classes],
            "bases": [None if b is None else b.cpu() for b in self.bases],
            "kinds": list(self.kinds),
            "protected": [list(p) for p in self.protected],
            "n_seen": self.n_seen,
            "backbone_fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fingerprint(state)
        for m, downs, ups in zip(self.qkvs, state["downs"], state["ups"], strict=True):
            m.downs = [d.to(self.device) for d in downs]
            m.ups = nn.ParameterList(
                nn.Parameter(u.to(self.device), requires_grad=False) for u in ups
            )
        self.heads = nn.ModuleList()
        for h in state["heads"]:
            head = nn.Linear(self.dim, h["weight"].shape[0]).to(self.device)
            head.load_state_dict(h)
            head.requires_grad_(False)
            self.heads.append(head)
        self.task_classes = [list(c) for c in state["task_classes"]]
        self.bases = list(state["bases"])
        self.kinds = list(state["kinds"])
        self.protected = [list(p) for p in state.get("protected", [])]
        self.n_seen = int(state["n_seen"])
