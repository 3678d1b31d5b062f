"""CL-LoRA (He, Duan, Zhu, CVPR 2025): continual low-rank adaptation, rehearsal-free.

Facts taken from the official code (github JiangpengHe/CL-LoRA, ``backbone/vit_cllora.py``,
``models/cllora.py``, ``utils/inc_net.py``, ``exps/*.json``); the code is not copied.

* LoRA on the query and value projections of every block, added to the frozen projection:
  ``out = W x + A (B x)`` with ``B`` the down-projection (r x d, orthonormal rows: QR of a
  uniform d x r matrix) and ``A`` the up-projection (d x r, zero), no alpha/r scaling.
* Blocks ``0..l-1`` carry task-SHARED adapters: ``B_s`` frozen from the start, ``A_s`` trained
  through all tasks. Blocks ``l..L-1`` carry task-SPECIFIC adapters: a new (B, A) pair per
  task, both trained, scaled by learnable block weights (code: a 3 x (L-l) tensor, one per
  block per q/k/v, init U(0.5, 1.5); the k row exists but k has no adapter). After its task
  an adapter and its weights are frozen.
* Training head: a cosine classifier over the current task's classes (sigma init 1).
* From the second task on, each batch takes two optimiser steps: (1) distillation on the
  shared blocks only (student: current A_s; teacher: A_s at the end of the previous task;
  both through the final norm and the current head; ``5 * soft-CE`` at T=2), then gradient
  reassignment: each shared A's gradient rows (its d output dimensions) are multiplied by
  ``w = d * n / sum(n)``, ``n`` the row L2 norms of that A at the end of the previous task;
  step. (2) cross-entropy + ``1e-4 * orthogonality`` loss; step.
* SGD (momentum 0.9), cosine annealing stepped per EPOCH to ``min_lr`` (0).
* After a task: a prototype per new class (mean final-norm CLS feature of its training images
  under eval transforms, with that task's adapters). Inference: for every task i, the
  feature under the current shared adapters + task i's specific adapters; the logit of a
  class of task i is the cosine to its prototype.

Code vs paper, behind options (code is the default):
* ``shared_init``: ``qr-uniform`` (code) | ``svd-gaussian`` (paper).
* ``block_weights``: ``per-qkv`` (code: 3 per block) | ``per-block`` (paper: one positive
  scalar per block, kept positive by a softplus).
* ``orth_loss``: ``block-weights`` (code: ``compute_orthogonality_loss`` is applied to the
  block-weight tensors, mean over earlier tasks of |cosine| of the flattened tensors) |
  ``lora-down`` (paper: sum of |U_t^T U_i| entries between the task-specific down
  projections of task t and each earlier task).

Differences from the official code that are not options (see docs/cl-lora.md):
* The official loop builds the CE forward pass BEFORE the distillation step and calls
  ``backward`` on it after ``optimizer.step()`` has modified the shared A's in place;
  current PyTorch rejects that (in-place version check), so the CE forward is run after
  the distillation step, i.e. on the updated shared adapters.
* Efficient inference (which the paper claims, the code does not do): blocks ``0..l-1`` run
  once per batch, and the per-task suffixes ``l..L-1`` run batched over tasks (the batch is
  repeated per task and every LoRA update is a per-task batched matmul). ``inference:
  reference`` reruns the whole network per task, as the official code does.

Why our own LoRA rather than peft: the per-task batched suffix needs one qkv call to apply a
DIFFERENT low-rank update to each group of the batch, and the shared/teacher switch and the
gradient reassignment act on raw A/B tensors; peft's adapters apply one active adapter per
call. timm fuses q, k, v into one ``attn.qkv`` Linear; :class:`LoRAQKV` wraps it and adds
the updates to the q and v slices of its output, so timm's attention code is reused as is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.engine import Fit
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
    load_defaults,
    register_strategy,
)
from clbench.strategies.heads import CosineHead, local_labels, soft_cross_entropy

__all__ = ["CosineHead", "soft_cross_entropy"]  # re-exported: they lived here before heads.py

DEFAULTS_FILE = Path(__file__).with_name("cl_lora.yaml")


# -- options (code vs paper) -------------------------------------------------------------


def _orthonormal_rows_qr_uniform(rank: int, dim: int, gen: torch.Generator) -> Tensor:
    """Official code: Q of the QR decomposition of a U(0, 1) dim x rank matrix, transposed."""
    q, _ = torch.linalg.qr(torch.rand(dim, rank, generator=gen))
    return q.T.contiguous()


def _orthonormal_rows_svd_gaussian(rank: int, dim: int, gen: torch.Generator) -> Tensor:
    """Paper: left singular vectors of a Gaussian dim x rank matrix, transposed."""
    u, _, _ = torch.linalg.svd(torch.randn(dim, rank, generator=gen), full_matrices=False)
    return u.T.contiguous()


DOWN_INITS: dict[str, Callable[[int, int, torch.Generator], Tensor]] = {
    "qr-uniform": _orthonormal_rows_qr_uniform,
    "svd-gaussian": _orthonormal_rows_svd_gaussian,
}


def fp32_head(head: nn.Module, feats: Tensor) -> Tensor:
    """The cosine head outside autocast: under bf16 a cosine's ~2^-9 resolution would zero
    the distillation gradient of small student-teacher drifts (the official code is fp32)."""
    with torch.autocast(feats.device.type, enabled=False):
        return head(feats.float())


class _PerQKV:
    """Official code: one weight per block per q/k/v, init U(0.5, 1.5), used as is."""

    width = 3

    @staticmethod
    def init(n_blocks: int, gen: torch.Generator) -> Tensor:
        return torch.rand(n_blocks, 3, generator=gen) + 0.5

    @staticmethod
    def qv_scales(raw: Tensor) -> Tensor:  # [n_blocks, 3] -> [n_blocks, 2] (q, v)
        return raw[:, (0, 2)]


class _PerBlock:
    """Paper: one positive scalar per block (softplus of a raw value; init in [0.5, 1.5])."""

    width = 1

    @staticmethod
    def init(n_blocks: int, gen: torch.Generator) -> Tensor:
        w = torch.rand(n_blocks, 1, generator=gen) + 0.5
        return torch.log(torch.expm1(w))  # inverse softplus

    @staticmethod
    def qv_scales(raw: Tensor) -> Tensor:
        return F.softplus(raw).expand(-1, 2)


BLOCK_WEIGHTS: dict[str, type] = {"per-qkv": _PerQKV, "per-block": _PerBlock}


def _abs_cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a, b = a.flatten(), b.flatten()
    return (a / (a.norm() + eps) * (b / (b.norm() + eps))).sum().abs()


def orth_block_weights(net: CLLoRAViT) -> Tensor:
    """Official code: mean over earlier tasks of |cos| between flattened block weights."""
    cur = net.block_weights(net.n_tasks - 1)
    prev = [net.block_weights(i) for i in range(net.n_tasks - 1)]
    return torch.stack([_abs_cosine(cur, p) for p in prev]).mean()


def orth_lora_down(net: CLLoRAViT) -> Tensor:
    """Paper: sum over earlier tasks, blocks and q/v of the |entries| of U_t^T U_i
    (U = B^T, the d x r down-projection of a task-specific adapter)."""
    cur = net.task_down[-1]  # [S, 2, r, C]
    prev = torch.stack(list(net.task_down[:-1]))  # [t, S, 2, r, C]
    return torch.einsum("sprc,tspqc->tsprq", cur, prev.detach()).abs().sum()


ORTH_LOSSES: dict[str, Callable[[CLLoRAViT], Tensor]] = {
    "block-weights": orth_block_weights,
    "lora-down": orth_lora_down,
}


# -- the network ---------------------------------------------------------------------------


class LoRAQKV(nn.Module):
    """timm's fused ``attn.qkv`` Linear plus low-rank updates of its q and v slices.

    ``lora`` is set by :class:`CLLoRAViT` around each block call (and cleared after) to
    ``(down [G, 2, r, C], up [G, 2, D, r], scale [G, 2] | None)``: the input batch is G
    groups stacked along dim 0, group g gets ``scale[g, j] * up[g, j] @ down[g, j] @ x`` on
    q (j=0) and v (j=1). G=1 in training; G=tasks in the batched inference suffix.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        if base.out_features % 3:
            raise ConfigError("CL-LoRA needs a fused qkv projection (out_features = 3 x dim)")
        self.base = base
        self.lora: tuple[Tensor, Tensor, Tensor | None] | None = None
        # set on the first task-specific block during all-task inference, where every group
        # of every call holds the same rows (the shared prefix's output): the frozen
        # 768x2304 projection, a quarter of the block's FLOPs, then runs once per batch
        # instead of once per task (cached across the calls of one batch)
        self.shared_input = False
        self._base_cache: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.lora is None:
            return self.base(x)
        down, up, scale = self.lora
        g = down.shape[0]
        h = x.reshape(g, -1, x.shape[-1])  # [G, M, C]
        if self.shared_input:
            if self._base_cache is None:
                self._base_cache = self.base(h[:1])
            out = self._base_cache.expand(g, -1, -1)
        else:
            out = self.base(h)
        z = torch.einsum("gmc,gprc->gpmr", h, down.to(h.dtype))
        d = torch.einsum("gpmr,gpdr->gpmd", z, up.to(z.dtype))  # [G, 2, M, D]
        if scale is not None:
            d = d * scale.to(d.dtype)[:, :, None, None]
        q, k, v = out.chunk(3, dim=-1)
        out = torch.cat((q + d[:, 0].to(q.dtype), k, v + d[:, 1].to(v.dtype)), dim=-1)
        return out.reshape(*x.shape[:-1], -1)


class CLLoRAViT(nn.Module):
    """A frozen timm ViT with CL-LoRA's shared and task-specific q/v adapters.

    Parameters are stacked per block group: shared ``[l, 2, ...]`` and per task
    ``[L-l, 2, ...]`` (index 0 = q, 1 = v), so a batched suffix is one einsum per block.
    """

    def __init__(
        self,
        vit: nn.Module,
        rank: int,
        shared_blocks: int,
        shared_init: str = "qr-uniform",
        block_weights: str = "per-qkv",
        seed: int = 0,
    ):
        super().__init__()
        blocks = getattr(vit, "blocks", None)
        if blocks is None or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
            raise ConfigError(
                "CL-LoRA needs a timm VisionTransformer (blocks with attn.qkv); got "
                f"{type(vit).__name__}"
            )
        depth = len(blocks)
        if not 0 <= shared_blocks < depth:
            raise ConfigError(
                f"cl-lora shared_blocks={shared_blocks}: must be in [0, {depth - 1}] for a "
                f"{depth}-block ViT (the last blocks carry the task-specific adapters)"
            )
        if shared_init not in DOWN_INITS:
            raise ConfigError(
                f"cl-lora shared_init {shared_init!r}: valid: {', '.join(DOWN_INITS)}"
            )
        if block_weights not in BLOCK_WEIGHTS:
            raise ConfigError(
                f"cl-lora block_weights {block_weights!r}: valid: {', '.join(BLOCK_WEIGHTS)}"
            )
        vit.requires_grad_(False)
        for blk in blocks:
            if not isinstance(blk.attn.qkv, LoRAQKV):
                blk.attn.qkv = LoRAQKV(blk.attn.qkv)
        self.vit = vit
        self.rank, self.l, self.depth, self.seed = rank, shared_blocks, depth, seed
        qkv = blocks[0].attn.qkv.base
        self.dim_in, self.dim_out = qkv.in_features, qkv.out_features // 3
        self.down_init = DOWN_INITS[shared_init]
        self.bw = BLOCK_WEIGHTS[block_weights]
        dev = qkv.weight.device
        gen = self._gen(-1)
        down = torch.stack([self._down_pair(gen) for _ in range(self.l)]) if self.l else None
        empty = torch.zeros(0, 2, rank, self.dim_in)
        # B_s: frozen from the start -> a buffer, not a parameter
        self.register_buffer("shared_down", (down if down is not None else empty).to(dev))
        self.shared_up = nn.Parameter(torch.zeros(self.l, 2, self.dim_out, rank, device=dev))
        # A_s at the end of the previous task: the distillation teacher and the source of
        # the gradient-reassignment weights; None until the first task ends
        self.register_buffer("teacher_up", None)
        self.task_down = nn.ParameterList()
        self.task_up = nn.ParameterList()
        self.task_weights = nn.ParameterList()

    # -- construction ----------------------------------------------------------------------
    def _gen(self, task: int) -> torch.Generator:
        # a generator per (seed, task): adapters do not depend on the global RNG stream, so
        # a resumed run draws the same ones
        return torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + task + 1)

    def _down_pair(self, gen: torch.Generator) -> Tensor:
        return torch.stack([self.down_init(self.rank, self.dim_in, gen) for _ in range(2)])

    @property
    def n_tasks(self) -> int:
        return len(self.task_up)

    @property
    def n_specific(self) -> int:
        return self.depth - self.l

    def add_task(self) -> None:
        """Freeze the earlier tasks' adapters and add a new trainable (B, A, weights) set."""
        for p in (*self.task_down, *self.task_up, *self.task_weights):
            p.requires_grad_(False)
        dev = self.shared_up.device
        gen = self._gen(self.n_tasks)
        s = self.n_specific
        down = torch.stack([self._down_pair(gen) for _ in range(s)])
        self.task_down.append(nn.Parameter(down.to(dev)))
        self.task_up.append(nn.Parameter(torch.zeros(s, 2, self.dim_out, self.rank, device=dev)))
        self.task_weights.append(nn.Parameter(self.bw.init(s, gen).to(dev)))

    def end_task(self) -> None:
        """Freeze the current task's adapters; snapshot A_s as the next task's teacher."""
        for p in (*self.task_down, *self.task_up, *self.task_weights):
            p.requires_grad_(False)
        for p in self.parameters():
            p.grad = None
        self.teacher_up = self.shared_up.detach().clone()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def block_weights(self, task: int) -> Tensor:
        """Effective block weights of a task, [L-l, width] (the values the model uses)."""
        raw = self.task_weights[task]
        return raw if self.bw is _PerQKV else F.softplus(raw)

    # -- forward pieces --------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        v = self.vit
        x = v._pos_embed(v.patch_embed(x))
        return v.norm_pre(v.patch_drop(x))

    def pool(self, x: Tensor) -> Tensor:
        """Final norm + the ViT's pooling (the CLS token for the standard ViTs)."""
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)

    def _run(self, x: Tensor, idx: Sequence[int], loras: Iterator[tuple]) -> Tensor:
        for i, lora in zip(idx, loras, strict=True):
            qkv = self.vit.blocks[i].attn.qkv
            qkv.lora = lora
            try:
                x = self.vit.blocks[i](x)
            finally:
                qkv.lora = None
        return x

    def shared(self, x: Tensor, teacher: bool = False) -> Tensor:
        """Blocks 0..l-1 with the current (or, ``teacher``, the previous task's) A_s."""
        up = self.teacher_up if teacher else self.shared_up
        loras = ((self.shared_down[i][None], up[i][None], None) for i in range(self.l))
        return self._run(x, range(self.l), loras)

    def specific(self, x: Tensor, tasks: Sequence[int]) -> Tensor:
        """Blocks l..L-1; ``x`` holds ``len(tasks)`` groups stacked along dim 0, group g
        running with task ``tasks[g]``'s adapters and block weights."""
        downs = torch.stack([self.task_down[t] for t in tasks], 1)  # [S, G, 2, r, C]
        ups = torch.stack([self.task_up[t] for t in tasks], 1)
        scales = torch.stack([self.bw.qv_scales(self.task_weights[t]) for t in tasks], 1)
        loras = ((downs[j], ups[j], scales[j]) for j in range(self.n_specific))
        return self._run(x, range(self.l, self.depth), loras)

    def features(self, x: Tensor, task: int, embedded: bool = False) -> Tensor:
        """Pooled feature of images (or of their embedding) under one task's adapters."""
        h = x if embedded else self.embed(x)
        return self.pool(self.specific(self.shared(h), [task]))

    def features_all_tasks(self, x: Tensor, chunk: int = 0) -> Tensor:
        """[T, B, C] features under every task: shared prefix once, suffixes batched
        ``chunk`` tasks at a time (0 = all at once)."""
        h = self.shared(self.embed(x))
        tasks = list(range(self.n_tasks))
        step = chunk or len(tasks)
        out = []
        first = self.vit.blocks[self.l].attn.qkv
        first.shared_input = True
        try:
            for lo in range(0, len(tasks), step):
                group = tasks[lo : lo + step]
                f = self.pool(self.specific(h.repeat(len(group), 1, 1), group))
                out.append(f.reshape(len(group), x.shape[0], -1))
        finally:
            first.shared_input, first._base_cache = False, None
        return torch.cat(out)

    def features_all_tasks_reference(self, x: Tensor) -> Tensor:
        """[T, B, C]: the whole network rerun per task (the official code's inference)."""
        return torch.stack([self.features(x, t) for t in range(self.n_tasks)])

    # -- gradient reassignment -------------------------------------------------------------
    @torch.no_grad()
    def reassign_shared_gradients(self) -> None:
        """Scale row j (output dimension j) of every shared A's gradient by
        ``w_j = d * n_j / sum_k n_k``, n_j = ||row j of that A at the end of the previous
        task||, d = number of rows (official code: ``len(norms) * norms / norms.sum()``)."""
        g = self.shared_up.grad
        if g is None or self.teacher_up is None:
            return
        n = self.teacher_up.float().norm(dim=-1)  # [l, 2, D]
        total = n.sum(-1, keepdim=True)
        # an A that never moved (all-zero rows) has no importance profile: leave it as is
        w = torch.where(total > 0, n.shape[-1] * n / total.clamp_min(1e-30), torch.ones_like(n))
        g.mul_(w.unsqueeze(-1).to(g.dtype))

    # -- state -----------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, Any]:
        return {
            "shared_down": self.shared_down.detach().cpu(),
            "shared_up": self.shared_up.detach().cpu(),
            "teacher_up": None if self.teacher_up is None else self.teacher_up.cpu(),
            "task_down": [p.detach().cpu() for p in self.task_down],
            "task_up": [p.detach().cpu() for p in self.task_up],
            "task_weights": [p.detach().cpu() for p in self.task_weights],
        }

    def load_adapter_state(self, state: dict[str, Any]) -> None:
        dev = self.shared_up.device
        self.shared_down = state["shared_down"].to(dev)
        with torch.no_grad():
            self.shared_up.copy_(state["shared_up"])
        t = state["teacher_up"]
        self.teacher_up = None if t is None else t.to(dev)
        for name in ("task_down", "task_up", "task_weights"):
            lst = nn.ParameterList(
                nn.Parameter(v.to(dev), requires_grad=False) for v in state[name]
            )
            setattr(self, name, lst)


# -- the strategy --------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = load_defaults(DEFAULTS_FILE).get("cl-lora-presets") or {}


@register_strategy("cl-lora", DEFAULTS_FILE)
class CLLoRA(Strategy):
    """CL-LoRA on a timm ViT; see the module docstring and docs/cl-lora.md."""

    # precedence for the null ones: explicit value > the preset > the benchmark's train
    # section (rank: 10)
    param_types = {**TRAIN_KEY_TYPES, "preset": "str | None", "rank": "int | None"}

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        p = self.params
        preset = p["preset"]
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"cl-lora preset {preset!r}: valid: {', '.join(PRESETS)}")
        fill = PRESETS.get(preset, {}) if preset else {}
        for key, value in fill.items():
            if p.get(key) is None:
                p[key] = value
        fill_train_keys(p, self.train_cfg)
        if p["rank"] is None:
            p["rank"] = 10
        for key, table in (("inference", INFERENCE), ("orth_loss", ORTH_LOSSES)):
            if p[key] not in table:
                raise ConfigError(f"cl-lora {key} {p[key]!r}: valid: {', '.join(table)}")
        where = "strategy_params.cl-lora"
        check_optim(self.optim(), self.schedule(), where, where)
        self.net = CLLoRAViT(
            ctx.make_backbone(),
            rank=int(p["rank"]),
            shared_blocks=int(p["shared_blocks"]),
            shared_init=p["shared_init"],
            block_weights=p["block_weights"],
            seed=ctx.seed,
        ).to(self.device)
        self.prototypes = torch.zeros(0, self.net.vit.num_features, device=self.device)
        self.task_classes: list[list[int]] = []
        self.step_counts = {"kd": 0, "ce": 0}  # optimiser steps on the last experience
        self._last_trainable = 0
        self._head: CosineHead | None = None  # the training head of the current task
        self._local: Tensor | None = None  # scenario label -> that head's output index

    def optim(self) -> Optim:
        p = self.params  # official get_optimizer: SGD with momentum
        return Optim("sgd", p["lr"], p["momentum"], p["weight_decay"])

    def schedule(self) -> Schedule:
        # official: CosineAnnealingLR(T_max=epochs, eta_min=min_lr) stepped once per epoch
        return Schedule("cosine", every="epoch", min_lr=self.params["min_lr"])

    # -- training --------------------------------------------------------------------------
    def before_experience(self, exp: Experience) -> None:
        net = self.net
        net.add_task()
        gen = net._gen(10_000 + net.n_tasks - 1)
        self._head = CosineHead(net.vit.num_features, len(exp.classes), gen).to(self.device)
        self._local = local_labels(exp.classes, self.ctx.num_classes, self.device)

    def learn(self, exp: Experience) -> None:
        p, net, head, local = self.params, self.net, self._head, self._local
        task = net.n_tasks - 1
        loader = self.loader(exp.data("train"), shuffle=True, batch_size=int(p["batch_size"]))
        distill = task > 0 and net.l > 0 and p["kd_weight"] > 0
        orth = ORTH_LOSSES[p["orth_loss"]] if task > 0 and p["orth_weight"] > 0 else None

        def step(fit: Fit, x: Tensor, y: Tensor) -> None:
            """From the second task on, two optimiser updates per batch."""
            y = local[y]
            with fit.autocast(), torch.no_grad():
                emb = net.embed(x)  # frozen: shared by the two updates
            if distill:
                with fit.autocast():
                    loss_kd = self.distill_loss(emb, head)
                fit.update(loss_kd, "distillation", before_step=net.reassign_shared_gradients)
            with fit.autocast():
                loss = self.ce_loss(emb, y, head, task, orth)
            fit.update(loss, "cross-entropy")

        result = self.engine.fit(
            loader,
            net.trainable() + list(head.parameters()),
            optim=self.optim(),
            schedule=self.schedule(),
            epochs=int(p["epochs"]),
            step=step,
            modules=[net],
            exp_index=exp.index,
            hint="lower strategy_params.cl-lora.lr",
        )
        self._last_trainable = result.trainable
        self.images_trained += result.images
        self.step_counts = {
            "kd": result.updates["distillation"],
            "ce": result.updates["cross-entropy"],
        }

    def after_experience(self, exp: Experience) -> None:
        self.net.end_task()
        self._add_prototypes(exp, self.net.n_tasks - 1)
        self._head = self._local = None

    def distill_loss(self, emb: Tensor, head: CosineHead) -> Tensor:
        """Step 1: student (current A_s) vs teacher (previous task's A_s), shared blocks
        only, both through the final norm and the current head."""
        p, net = self.params, self.net
        with torch.no_grad():
            f_t = net.pool(net.shared(emb, teacher=True))
        t_logits = fp32_head(head, f_t)
        if not p["kd_head_grad"]:
            t_logits = t_logits.detach()
        s_logits = fp32_head(head, net.pool(net.shared(emb)))
        return p["kd_weight"] * soft_cross_entropy(s_logits, t_logits, p["kd_temperature"])

    def ce_loss(
        self,
        emb: Tensor,
        y: Tensor,
        head: CosineHead,
        task: int,
        orth: Callable[[CLLoRAViT], Tensor] | None,
    ) -> Tensor:
        """Step 2: cross-entropy over the task's classes (+ the orthogonality loss)."""
        logits = fp32_head(head, self.net.features(emb, task, embedded=True))
        loss = F.cross_entropy(logits, y)
        if orth is not None:
            loss = loss + self.params["orth_weight"] * orth(self.net)
        return loss

    @torch.no_grad()
    def _add_prototypes(self, exp: Experience, task: int) -> None:
        self.net.eval()
        feats, labels = self.extract(
            lambda x: self.net.features(x, task), exp.data("eval"), self.train_cfg.eval_batch_size
        )
        labels = labels.to(self.device)
        feats = feats.to(self.device)
        classes = sorted(int(c) for c in exp.classes)
        self.prototypes = extend_class_means(
            self.prototypes, feats, labels, classes, f"cl-lora, experience {exp.index}"
        )
        self.task_classes.append(classes)
        self.n_seen = max(self.n_seen, self.prototypes.shape[0])

    # -- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.net.eval()
        x = x.to(self.device)
        with autocast(self.device, self.amp):
            feats = INFERENCE[self.params["inference"]](self, x)  # [T, B, C]
        feats = F.normalize(feats.float(), dim=-1)
        protos = F.normalize(self.prototypes, dim=-1)
        logits = torch.empty(x.shape[0], self.n_seen, device=self.device)
        for t, classes in enumerate(self.task_classes):
            idx = torch.as_tensor(classes, device=self.device)
            logits[:, idx] = feats[t] @ protos[idx].T
        return logits

    # -- bookkeeping -----------------------------------------------------------------------
    def trainable_params(self) -> int:
        """Adapters + block weights + the task's cosine head trained on the last experience."""
        return self._last_trainable

    def memory(self) -> dict[str, Any]:
        # beyond the frozen ViT and the live A_s: the teacher copy, every task's frozen
        # adapters and weights, and the prototypes
        net = self.net
        tensors = [self.prototypes]
        tensors += [] if net.teacher_up is None else [net.teacher_up]
        tensors += [*net.task_down, *net.task_up, *net.task_weights]
        size = sum(t.numel() * t.element_size() for t in tensors)
        return {"buffer_bytes": 0, "model_copies_bytes": size, "exemplars": None, "mean_bpp": None}

    def _backbone_fingerprint(self) -> list[float]:
        # the frozen ViT is not checkpointed (it comes back from make_backbone())
        return backbone_fingerprint(list(self.net.vit.parameters()))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "adapters": self.net.adapter_state(),
            "prototypes": self.prototypes.cpu(),
            "task_classes": [list(c) for c in self.task_classes],
            "n_seen": self.n_seen,
            "images_trained": self.images_trained,
            "backbone_fingerprint": self._backbone_fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_fingerprint(state["backbone_fingerprint"], self._backbone_fingerprint(), "cl-lora")
        self.net.load_adapter_state(state["adapters"])
        self.prototypes = state["prototypes"].to(self.device)
        self.task_classes = [list(c) for c in state["task_classes"]]
        self.n_seen = int(state["n_seen"])
        self.images_trained = int(state["images_trained"])


def _infer_efficient(s: CLLoRA, x: Tensor) -> Tensor:
    return s.net.features_all_tasks(x, chunk=int(s.params["infer_chunk"]))


def _infer_reference(s: CLLoRA, x: Tensor) -> Tensor:
    return s.net.features_all_tasks_reference(x)


INFERENCE: dict[str, Callable[[CLLoRA, Tensor], Tensor]] = {
    "efficient": _infer_efficient,
    "reference": _infer_reference,
}


@contextlib.contextmanager
def inference_mode(strategy: CLLoRA, mode: str) -> Iterator[None]:
    """Temporarily switch a CL-LoRA strategy's inference path (tests, benchmarks)."""
    old = strategy.params["inference"]
    strategy.params["inference"] = mode
    try:
        yield
    finally:
        strategy.params["inference"] = old
