"""InfLoRA (Liang & Li, CVPR 2024): interference-free low-rank adaptation on a frozen timm ViT.

Per task, a k/v LoRA whose frozen down-projection is designed from the task's input
covariance outside (or inside) the DualGPM subspace of earlier tasks; only the up-projection
and the task's own linear head train. Facts (not code) from liangyanshuo/InfLoRA
(``methods/inflora.py``, ``models/vit_inflora.py``, ``utils/schedulers.py``,
``configs/*.json``); published defaults are in ``inflora.yaml``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.errors import ConfigError
from clbench.strategies.base import Experience, StrategyContext, autocast, register_strategy
from clbench.strategies.heads import local_labels
from clbench.strategies.ptm import PTMStrategy

DEFAULTS_FILE = Path(__file__).with_suffix(".yaml")


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
    def before_experience(self, exp: Experience) -> None:
        self.backbone.eval()  # official: the network stays in eval mode while training
        self._design_down(self._collect(exp.data("train")))
        self.heads.append(nn.Linear(self.dim, len(exp.classes)).to(self.device))

    def learn(self, exp: Experience) -> None:
        task, head = len(self.task_classes), self.heads[-1]
        lut = local_labels(sorted(int(c) for c in exp.classes), self.ctx.num_classes, self.device)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(head(self.backbone(x)).float(), lut[y])

        ups = [m.ups[task] for m in self.qkvs]
        self.train_loop([*ups, *head.parameters()], exp.data("train"), loss_fn, exp.index)

    def after_experience(self, exp: Experience) -> None:
        task, head = len(self.task_classes), self.heads[-1]
        for q in (*(m.ups[task] for m in self.qkvs), *head.parameters()):
            q.requires_grad_(False)
        self._update_dual_gpm(self._collect(exp.data("train")), task)
        self.protected.append(self._protected_dims())
        classes = sorted(int(c) for c in exp.classes)
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
