"""Prompt-based rehearsal-free PTM baselines on a frozen timm ViT: L2P, DualPrompt, CODA-Prompt.

All three learn prompts that are chosen, or weighted, per image by a *query*: the frozen ViT's
own pre-logits feature (a second, gradient-free forward pass). A linear head over all classes
reads the prompted ViT; training masks the earlier tasks' logits (the official train mask).

* ``l2p`` (Wang et al. 2022): a pool of prompts with learnable keys; the top-k keys by cosine
  pick prompts prepended to the patch tokens (prompt tuning); the head reads the mean of the
  prompt tokens' outputs; loss = CE - ``pull_coeff`` * query-key similarity.
* ``dualprompt`` (Wang et al. 2022): a G-prompt shared by all tasks (blocks 0-1) and one
  E-prompt per task (blocks 2-4), both as key/value *prefixes* of self-attention. Task t
  trains E-prompt t (the official prompt mask); at test time the E-prompt whose key best
  matches the query is used. The head reads the CLS token.
* ``coda-prompt`` (Smith et al. 2023): every prefixed block's prompt is a weighted sum of
  prompt components, the weight of component k being cos(query * A_k, K_k). Each task adds
  ``pool_size / T`` components, initialised orthonormal to the earlier ones (Gram-Schmidt);
  the earlier ones are frozen. The first half of the prompt prefixes the keys, the second
  the values.

Facts (not code) from LAMDA-CL/LAMDA-PILOT (``models/{l2p,dualprompt,coda_prompt}.py``,
``backbone/prompt.py``, ``backbone/vit_{dualprompt,coda_promtpt}.py``, ``utils/inc_net.py``,
``exps/{l2p,dualprompt,coda_prompt}.json``); published defaults are in ``prompts.yaml``.

Our own rather than Avalanche 0.6's ``LearningToPrompt`` (the only prompt method it ships):
its ViT (``avalanche.models.timm_vit``) indexes ``pretrained_cfg["url"]``, which timm >= 0.9's
``PretrainedCfg`` dataclass does not support, so it cannot be built with timm 1.x.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.errors import ConfigError
from clbench.strategies.base import Experience, StrategyContext, autocast, register_strategy
from clbench.strategies.heads import IncrementalHead
from clbench.strategies.ptm import PTMStrategy

DEFAULTS_FILE = Path(__file__).with_name("prompts.yaml")

BATCHWISE: dict[str, Callable[[bool], bool]] = {
    "always": lambda training: True,  # official L2P / DualPrompt (eval depends on the batch)
    "train": lambda training: training,
    "off": lambda training: False,
}


# -- shared pieces -----------------------------------------------------------------------------


def select_prompts(query: Tensor, keys: Tensor, top_k: int, batchwise: bool) -> Tensor:
    """Indices [B, top_k] of the keys most cosine-similar to each query; ``batchwise``: the
    batch's most frequently chosen ones, for every image (the official ``batchwise_prompt``)."""
    sim = F.normalize(query.float(), dim=1) @ F.normalize(keys, dim=1).T
    idx = torch.topk(sim, top_k, dim=1).indices
    if batchwise:
        counts = torch.bincount(idx.flatten(), minlength=keys.shape[0])
        idx = torch.topk(counts, top_k).indices.expand(idx.shape[0], -1)
    return idx


def pull_similarity(query: Tensor, keys: Tensor, idx: Tensor) -> Tensor:
    """Sum of cos(query, selected key) over the selected keys, averaged over the batch."""
    q, k = F.normalize(query.float(), dim=1), F.normalize(keys, dim=1)
    return (k[idx] * q[:, None]).sum() / q.shape[0]


def prefix_attention(attn: nn.Module, x: Tensor, pk: Tensor, pv: Tensor) -> Tensor:
    """A timm ``Attention`` whose keys and values get ``pk`` / ``pv`` [B, P, C] prepended
    (prefix tuning: the prefixes live in key/value space and are not projected)."""
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)

    def heads(t: Tensor) -> Tensor:
        return t.reshape(b, -1, h, c // h).transpose(1, 2).to(k.dtype)

    k, v = torch.cat((heads(pk), k), dim=2), torch.cat((heads(pv), v), dim=2)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop).transpose(1, 2)
    return attn.proj_drop(attn.proj(attn.norm(out.reshape(b, n, c))))


def prefixed_features(vit: nn.Module, x: Tensor, prefixes: dict[int, tuple[Tensor, Tensor]]):
    """The ViT's pre-logits feature with ``prefixes[i]`` = (keys, values) in block i."""
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, blk in enumerate(vit.blocks):
        if i in prefixes:
            t = t + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(t), *prefixes[i])))
            t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
        else:
            t = blk(t)
    return vit.forward_head(vit.norm(t), pre_logits=True)


def _check_layers(name: str, layers: list[int], depth: int) -> list[int]:
    bad = [i for i in layers if not 0 <= int(i) < depth]
    if bad:
        raise ConfigError(f"{name}: block indices {bad} outside the ViT's 0..{depth - 1}")
    return [int(i) for i in layers]


class PromptStrategy(PTMStrategy):
    """The loop the prompt methods share: query -> prompted logits (+ an auxiliary loss),
    CE with the earlier tasks' logits masked, a linear head over all classes; the prompt
    parameters live in ``self.prompts`` (saved and restored by name)."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        mode = self.params.get("batchwise_prompt", "off")
        if mode not in BATCHWISE:
            raise ConfigError(
                f"{self.name} batchwise_prompt {mode!r}: valid: {', '.join(BATCHWISE)}"
            )
        self.batchwise = BATCHWISE[mode]
        if not hasattr(self.backbone, "patch_embed") or not hasattr(self.backbone, "blocks"):
            raise ConfigError(f"{self.name} needs a timm VisionTransformer backbone")
        self.gen = torch.Generator().manual_seed(ctx.seed + 4099)
        self.prompts: dict[str, nn.Parameter] = {}
        self.head = IncrementalHead(self.dim, ctx.num_classes).to(self.device)
        self.task = -1  # index of the task being (or last) learned

    def uniform(self, *shape: int, low: float = -1.0) -> nn.Parameter:
        """U(low, 1) initialised parameter on the device, from the strategy's own generator."""
        return nn.Parameter(
            (torch.rand(*shape, generator=self.gen) * (1 - low) + low).to(self.device)
        )

    def query(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.backbone(x)  # the frozen ViT's pre-logits feature

    def prompted(self, x: Tensor, training: bool) -> tuple[Tensor, Tensor | float]:
        """(pre-logits feature of the prompted ViT, auxiliary loss)."""
        raise NotImplementedError

    def before_experience(self, exp: Experience) -> None:
        """Advance ``self.task``; subclasses then prepare its prompts (after ``super()``)."""
        self.task += 1

    def learn(self, exp: Experience) -> None:
        n_seen = max(self.n_seen, max(exp.classes) + 1)
        known = min(exp.classes)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            feats, aux = self.prompted(x, training=True)
            logits = self.head(feats, n_seen).float().clone()
            logits[:, :known] = float("-inf")  # official train mask: earlier tasks out
            return F.cross_entropy(logits, y) + aux

        params = [*self.prompts.values(), *self.head.parameters()]
        self.train_loop(params, exp.data("train"), loss_fn, exp.index)
        self.n_seen = n_seen

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.backbone.eval()
        with autocast(self.device, self.amp):
            return self.head(
                self.prompted(x.to(self.device), training=False)[0], self.n_seen
            ).float()

    def state_dict(self) -> dict[str, Any]:
        return {
            **{k: v.detach().cpu() for k, v in self.prompts.items()},
            "head": {k: v.cpu() for k, v in self.head.state_dict().items()},
            "n_seen": self.n_seen,
            "task": self.task,
            # CODA-Prompt draws each task's components at its start: a resumed run must
            # continue the same random stream
            "generator": self.gen.get_state(),
            "backbone_fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fingerprint(state)
        with torch.no_grad():
            for k, v in self.prompts.items():
                v.copy_(state[k])
        self.head.load_state_dict(state["head"])
        self.n_seen = int(state["n_seen"])
        self.task = int(state.get("task", -1))
        if "generator" in state:  # absent in checkpoints written before it was saved
            self.gen.set_state(state["generator"])


# -- L2P ----------------------------------------------------------------------------------------


@register_strategy("l2p", DEFAULTS_FILE)
class L2P(PromptStrategy):
    """Learning to Prompt (PILOT ``l2p``). One deviation from the official code: there the
    positional embedding is extended to the prompt positions (resized from the pre-trained
    one, frozen); here the prompts are inserted after timm's own positional embedding and
    carry none."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        p = self.params
        size, length = int(p["pool_size"]), int(p["length"])
        self.prompts["prompt"] = self.uniform(size, length, self.dim)
        self.prompts["keys"] = self.uniform(size, self.dim)

    def prompted(self, x: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        query, keys = self.query(x), self.prompts["keys"]
        idx = select_prompts(query, keys, int(self.params["top_k"]), self.batchwise(training))
        v = self.backbone
        t = v._pos_embed(v.patch_embed(x))
        prompts = self.prompts["prompt"][idx].reshape(x.shape[0], -1, t.shape[-1]).to(t.dtype)
        n_pre = v.num_prefix_tokens
        t = torch.cat((t[:, :n_pre], prompts, t[:, n_pre:]), dim=1)
        t = v.norm(v.blocks(v.norm_pre(t)))
        feats = t[:, n_pre : n_pre + prompts.shape[1]].mean(1)
        return feats, -self.params["pull_coeff"] * pull_similarity(query, keys, idx)


# -- DualPrompt ---------------------------------------------------------------------------------


@register_strategy("dualprompt", DEFAULTS_FILE)
class DualPrompt(PromptStrategy):
    """DualPrompt (PILOT ``dualprompt``): G-prompt prefixes in ``g_layers``, task-wise
    E-prompt prefixes (a pool with learnable keys) in ``e_layers``; each prefix has
    ``length`` key and ``length`` value tokens."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        p, depth = self.params, len(self.backbone.blocks)
        self.g_layers = _check_layers("dualprompt g_layers", p["g_layers"], depth)
        self.e_layers = _check_layers("dualprompt e_layers", p["e_layers"], depth)
        self.top_k, self.pool = int(p["top_k"]), int(p["pool_size"])
        self.prompts["g_prompt"] = self.uniform(len(self.g_layers), 2, int(p["g_length"]), self.dim)
        self.prompts["e_prompt"] = self.uniform(
            len(self.e_layers), 2, self.pool, int(p["length"]), self.dim
        )
        self.prompts["e_keys"] = self.uniform(self.pool, self.dim)

    def _task_slice(self) -> slice | None:
        """The E-prompts reserved for the current task (the prompt mask); None once the pool
        is used up (the official code then selects by key during training as well)."""
        start, end = self.task * self.top_k, (self.task + 1) * self.top_k
        return slice(start, end) if end <= self.pool else None

    @torch.no_grad()
    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        cur = self._task_slice()
        if self.task > 0 and cur is not None and self.params["shared_prompt_pool"]:
            # the new task's E-prompt starts from the previous task's (official transfer)
            prev = slice(cur.start - self.top_k, cur.start)
            self.prompts["e_prompt"][:, :, cur] = self.prompts["e_prompt"][:, :, prev]

    def prompted(self, x: Tensor, training: bool) -> tuple[Tensor, Tensor]:
        query, keys = self.query(x), self.prompts["e_keys"]
        cur = self._task_slice() if training else None
        if cur is not None:
            idx = torch.arange(cur.start, cur.stop, device=x.device).expand(x.shape[0], -1)
        else:
            idx = select_prompts(query, keys, self.top_k, self.batchwise(training))
        b = x.shape[0]
        g, e = self.prompts["g_prompt"], self.prompts["e_prompt"]
        prefixes = {
            i: (g[j, 0].expand(b, -1, -1), g[j, 1].expand(b, -1, -1))
            for j, i in enumerate(self.g_layers)
        }
        for j, i in enumerate(self.e_layers):
            chosen = e[j][:, idx].reshape(2, b, -1, self.dim)  # [2, B, top_k * length, C]
            prefixes[i] = (chosen[0], chosen[1])
        feats = prefixed_features(self.backbone, x, prefixes)
        return feats, -self.params["pull_coeff"] * pull_similarity(query, keys, idx)


# -- CODA-Prompt --------------------------------------------------------------------------------


def orthonormal_rows(old: Tensor, n_new: int, generator: torch.Generator) -> Tensor:
    """``n_new`` random unit rows orthogonal to each other and to the span of ``old``'s rows:
    Gram-Schmidt of Gaussian vectors, done as a projection and a QR. The official code
    projects on each earlier (by then trained, no longer orthogonal) component in turn,
    which is orthogonal to their span only while they are orthogonal; this is exact."""
    d = old.shape[1]
    if old.shape[0] + n_new > d:
        raise ConfigError(
            f"coda-prompt: {old.shape[0] + n_new} orthogonal components do not fit in "
            f"{d} dimensions; lower strategy_params.coda-prompt.pool_size"
        )
    v = torch.randn(n_new, d, generator=generator, dtype=torch.float64)
    if old.shape[0]:
        basis = torch.linalg.qr(old.detach().cpu().double().T).Q  # [d, n_old]
        v = v - (v @ basis) @ basis.T
    return torch.linalg.qr(v.T).Q.T.to(old.dtype)  # orthonormal rows of the projected span


@register_strategy("coda-prompt", DEFAULTS_FILE)
class CODAPrompt(PromptStrategy):
    """CODA-Prompt (PILOT ``coda_prompt``): per block in ``layers``, components P [pool,
    length, C], keys K and attention vectors A [pool, C]; prompt = sum_k cos(q * A_k, K_k) P_k."""

    def __init__(self, ctx: StrategyContext, **params: Any):
        super().__init__(ctx, **params)
        p = self.params
        self.layers = _check_layers("coda-prompt layers", p["layers"], len(self.backbone.blocks))
        self.pool, self.length = int(p["pool_size"]), int(p["length"])
        self.per_task = self.pool // len(ctx.experience_classes)
        if self.per_task < 1:
            raise ConfigError(
                f"coda-prompt pool_size {self.pool} is smaller than the number of tasks "
                f"({len(ctx.experience_classes)}): raise strategy_params.coda-prompt.pool_size"
            )
        if self.length < 2 or self.length % 2:
            raise ConfigError(f"coda-prompt length {self.length}: needs an even number >= 2")
        for i in self.layers:  # U(0, 1) as the official init; each task's rows are redrawn
            self.prompts[f"p{i}"] = self.uniform(self.pool, self.length, self.dim, low=0.0)
            self.prompts[f"k{i}"] = self.uniform(self.pool, self.dim, low=0.0)
            self.prompts[f"a{i}"] = self.uniform(self.pool, self.dim, low=0.0)

    def _span(self) -> tuple[int, int]:
        return self.task * self.per_task, (self.task + 1) * self.per_task

    @torch.no_grad()
    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        s, f = self._span()
        for par in self.prompts.values():
            flat = par.view(self.pool, -1)
            flat[s:f] = orthonormal_rows(flat[:s], f - s, self.gen).to(par.device)

    def prompted(self, x: Tensor, training: bool) -> tuple[Tensor, Tensor | float]:
        query = self.query(x).float()
        s, f = self._span()
        prefixes, aux = {}, 0.0
        half = self.length // 2
        for i in self.layers:
            comps = [self.prompts[f"{n}{i}"] for n in "kap"]
            if training:  # earlier tasks' components are frozen
                comps = [torch.cat((c[:s].detach(), c[s:f])) for c in comps]
            else:
                comps = [c[:f] for c in comps]
            k, a, p = comps
            aq = F.normalize(query[:, None] * a[None], dim=2)  # [B, n, C]
            w = torch.einsum("bnc,nc->bn", aq, F.normalize(k, dim=1))
            prompt = torch.einsum("bn,nlc->blc", w, p)
            prefixes[i] = (prompt[:, :half], prompt[:, half:])
            if training and self.params["ortho_mu"] > 0:
                aux = aux + self.params["ortho_mu"] * sum(
                    _ortho_penalty(c.flatten(1)) for c in comps
                )
        return prefixed_features(self.backbone, x, prefixes), aux


def _ortho_penalty(t: Tensor) -> Tensor:
    eye = torch.eye(t.shape[0], device=t.device, dtype=t.dtype)
    return ((t @ t.T - eye) ** 2).mean()
