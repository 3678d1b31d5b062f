"""Balanced rate-distortion training (Zhang, Duan, Huang, Zhu, CVPR 2025, arXiv 2502.20161).

R-D training seen as a two-objective problem: distortion ``D = loss - bpp`` (λ·255²·MSE,
or λ·(1 - MS-SSIM): whatever the engine's criterion weighs) and rate ``R = bpp``. Instead
of descending ``D + R`` with fixed weights, each step descends a weighting that keeps the
*relative* progress of the two objectives balanced.

``--method balanced-rd`` (Solution 1, for training from scratch; coarse-to-fine along the
standard trajectory). Per step, with z = softmax(w) and d_i = ℓ_i - m_i + ε:

1. backward on  Σ z_i·log d_i / c,  c = stopgrad(Σ z_i / d_i)  (so the effective gradient
   is a convex combination of ∇D and ∇R);
2. the model step (clipping, Adam, and CompressAI's aux step, as ``standard``);
3. a second forward pass on the same batch (no gradient): the losses ℓ' after the step;
4. w <- optimizer step on  ∇_w z·δ  with  δ = log d - log d',  and L2 decay ``gamma`` on w
   (objectives that improved most lose weight).

The offsets ``m`` default to ``[-1, -1]``, i.e. log(1 + ℓ), as the public training script
with the ``Balanced`` optimizer sets them (``set_min_losses([-1, -1])``). The offset is what
keeps λ: ∇log(λD') = ∇D'/D' is λ-free, so with m = 0 the weighting forgets λ and every λ
trains to the same operating point; ∇log(1 + λD') = λ∇D'/(1 + λD') keeps λ's trade-off
while λD' ≲ 1 (the regime of a converged model: λ·255²·MSE ≈ 0.1-0.8 at 30-38 dB) and
fades as λD' grows past 1 (undertrained models, high λ).

This is FAMO (Liu et al. 2023), which the paper builds on; the public third-party copy
(HPCM's ``Balanced`` optimizer) additionally applies a "cautious" mask to Adam (update only
where momentum and gradient agree in sign): ``cautious=true`` uses timm's Cautious AdamW
(``AdamWLegacy(caution=True)``, weight decay 0) for the network instead of Adam.

``--method balanced-rd-qp`` (Solution 2, for fine-tuning). The weights solve a small
quadratic program with an equality constraint on the two log-loss gradients
ĝ_i = ∇ℓ_i / d_i::

    min_z ½ ||z_D ĝ_D + z_R ĝ_R||²  s.t.  z_D + z_R = 1

whose closed form for two objectives is z_D = (Q_RR - Q_DR) / (Q_DD + Q_RR - 2 Q_DR) with
Q the Gram matrix of the ĝ_i (a relative ridge keeps it defined when the gradients are
parallel). The minimiser d = Σ z_i ĝ_i satisfies d·ĝ_D = d·ĝ_R = ||d||²: both log-losses
fall at the same first-order rate, which is the balance the method asks for, and neither
rises (z may leave [0, 1]; ``clamp=true`` restricts it, giving MGDA's two-task rule). The
paper does not say how long the step is: we keep the length of the standard gradient
∇(D + R), so the learning rate and clipping mean what they mean for ``standard``. The two
gradients cost one extra backward pass per step (the paper reports +50% training time).
The min-norm point leans to the objective with the smaller (normalised) gradient, so the
weights stay near λ's trade-off only where the two gradients conflict at similar norms (a
converged model); from a model whose distortion gradient is several times the rate's, it
weights rate and the fine-tuning slides down the R-D curve (docs/lic-training.md).

Options and their defaults are in ``train_methods.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from clbench.codecs.train_methods import TrainMethod, register_train_method
from clbench.errors import ClbenchError
from clbench.optim import OPTIMIZERS

if TYPE_CHECKING:
    from clbench.codecs.train import TrainRun


def _check_min_losses(method: str, min_losses: Any) -> list[float]:
    try:
        m = [float(v) for v in min_losses]
    except (TypeError, ValueError):
        m = []
    if len(m) != 2 or not all(math.isfinite(v) for v in m):
        raise ClbenchError(
            f"codec train: {method}: min_losses={min_losses!r} must be two finite numbers "
            "(the offsets m of distortion and rate in log(loss - m)), e.g. [-1,-1]"
        )
    return m


def rd_losses(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """[D, R] of the engine's criterion output: D = loss - bpp (λ-weighted distortion), R = bpp."""
    return torch.stack([out["loss"] - out["bpp_loss"], out["bpp_loss"]])


def use_cautious_adam(run: TrainRun) -> None:
    """Swap the network optimizer for timm's Cautious AdamW (no weight decay: Adam with the
    sign-agreement mask) over the same parameters and learning rate."""
    from timm.optim import AdamWLegacy

    old = run.optimizers["net"]
    run.optimizers["net"] = AdamWLegacy(
        old.param_groups[0]["params"], lr=old.param_groups[0]["lr"], weight_decay=0.0, caution=True
    )


class LogLossWeights:
    """Softmax weights z = softmax(w) over objectives, moved by the log-loss decrease each
    objective made in a step (Solution 1's coarse-to-fine weights)."""

    def __init__(
        self,
        n: int,
        w_lr: float,
        gamma: float,
        optimizer: str = "adam",
        min_losses: list[float] | None = None,
        eps: float = 1e-8,
    ):
        self.w = torch.zeros(n, requires_grad=True)
        # weight_decay of a torch optimizer adds gamma·w to the gradient: FAMO's decay.
        self.opt = OPTIMIZERS.get(optimizer)([self.w], lr=w_lr, weight_decay=gamma)
        self.m = torch.tensor(min_losses if min_losses is not None else [0.0] * n)
        self.eps = eps

    @property
    def z(self) -> torch.Tensor:
        return torch.softmax(self.w.detach(), -1)

    def objective(self, losses: torch.Tensor) -> torch.Tensor:
        """Σ z_i·log(ℓ_i - m_i + ε) / c with c = stopgrad(Σ z_i / (ℓ_i - m_i + ε)): its
        gradient is Σ (z_i / (c·d_i)) ∇ℓ_i, weights that sum to one."""
        z = self.z.to(losses)
        # clamped: a bound m above a loss would otherwise make the log NaN
        d = (losses - self.m.to(losses) + self.eps).clamp_min(self.eps)
        c = (z / d).sum().detach()
        return (z * d.log()).sum() / c

    def update(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """One optimizer step on w with gradient J_softmax(w)ᵀ δ, δ = log d - log d'."""
        m = self.m.to(before)
        d0 = (before.detach() - m + self.eps).clamp_min(self.eps)
        d1 = (after.detach() - m + self.eps).clamp_min(self.eps)
        delta = d0.log() - d1.log()
        self.opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            torch.softmax(self.w, -1).backward(delta.float().cpu())
        self.opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])


@register_train_method("balanced-rd")
class BalancedRD(TrainMethod):
    """Solution 1: FAMO-style adaptive weights of distortion and rate (from scratch)."""

    def __init__(
        self,
        *,
        gamma: float,
        w_lr: float,
        w_optimizer: str,
        min_losses: list[float],
        eps: float,
        cautious: bool,
    ):
        if not (isinstance(gamma, (int, float)) and gamma >= 0 and math.isfinite(gamma)):
            raise ClbenchError(
                f"codec train: balanced-rd: gamma={gamma!r} must be a number >= 0 "
                "(the decay of the objective weights; 0.001 by default)"
            )
        if not (isinstance(w_lr, (int, float)) and w_lr > 0):
            raise ClbenchError(f"codec train: balanced-rd: w_lr={w_lr!r} must be > 0")
        if not eps > 0:
            raise ClbenchError(f"codec train: balanced-rd: eps={eps!r} must be > 0")
        OPTIMIZERS.get(w_optimizer)  # one-line error listing the optimizers
        self.cautious = bool(cautious)
        self.weights = LogLossWeights(
            2,
            float(w_lr),
            float(gamma),
            w_optimizer,
            _check_min_losses("balanced-rd", min_losses),
            float(eps),
        )

    def setup(self, run: TrainRun) -> None:
        if self.cautious:
            use_cautious_adam(run)

    def step(self, run: TrainRun, x: torch.Tensor) -> dict[str, torch.Tensor]:
        run.zero_grad()
        out = run.loss(x)
        before = rd_losses(out)
        self.weights.objective(before).backward()
        run.optimizer_step()
        with torch.no_grad():
            after = rd_losses(run.loss(x))
        self.weights.update(before, after)
        return out

    def log(self, run: TrainRun) -> dict[str, float]:
        z = self.weights.z
        return {"z_distortion": float(z[0]), "z_rate": float(z[1])}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.weights.load_state_dict(state["weights"])


def gram(
    g_d: Sequence[torch.Tensor | None], g_r: Sequence[torch.Tensor | None]
) -> tuple[float, float, float]:
    """(‖g_D‖², g_D·g_R, ‖g_R‖²) of two per-parameter gradient lists (None: unused)."""
    q_dd = q_dr = q_rr = 0.0
    for a, b in zip(g_d, g_r, strict=True):
        if a is not None:
            q_dd += float((a * a).sum())
        if b is not None:
            q_rr += float((b * b).sum())
        if a is not None and b is not None:
            q_dr += float((a * b).sum())
    return q_dd, q_dr, q_rr


def qp_weights(
    q_dd: float, q_dr: float, q_rr: float, ridge: float = 0.0, clamp: bool = False
) -> tuple[float, float]:
    """(z_D, z_R) minimising ½||z_D ĝ_D + z_R ĝ_R||² subject to z_D + z_R = 1, from the
    Gram entries of the two gradients; ``ridge`` (relative to their mean squared norm) keeps
    the solution defined when they are parallel; ``clamp`` keeps z in [0, 1]."""
    rho = ridge * 0.5 * (q_dd + q_rr)
    den = q_dd + q_rr - 2 * q_dr + 2 * rho
    z_d = 0.5 if den <= 0 else (q_rr + rho - q_dr) / den
    if clamp:
        z_d = min(1.0, max(0.0, z_d))
    return z_d, 1.0 - z_d


@register_train_method("balanced-rd-qp")
class BalancedRDQP(TrainMethod):
    """Solution 2: per-step weights from the equality-constrained QP (fine-tuning)."""

    def __init__(
        self, *, min_losses: list[float], eps: float, ridge: float, clamp: bool, cautious: bool
    ):
        if not eps > 0:
            raise ClbenchError(f"codec train: balanced-rd-qp: eps={eps!r} must be > 0")
        if not (isinstance(ridge, (int, float)) and ridge >= 0):
            raise ClbenchError(f"codec train: balanced-rd-qp: ridge={ridge!r} must be >= 0")
        self.m = _check_min_losses("balanced-rd-qp", min_losses)
        self.eps, self.ridge, self.clamp = float(eps), float(ridge), bool(clamp)
        self.cautious = bool(cautious)
        self.z = (0.5, 0.5)

    def setup(self, run: TrainRun) -> None:
        if self.cautious:
            use_cautious_adam(run)

    def step(self, run: TrainRun, x: torch.Tensor) -> dict[str, torch.Tensor]:
        run.zero_grad()
        out = run.loss(x)
        losses = rd_losses(out)
        params = [
            p for g in run.optimizers["net"].param_groups for p in g["params"] if p.requires_grad
        ]
        g_d = torch.autograd.grad(losses[0], params, retain_graph=True, allow_unused=True)
        g_r = torch.autograd.grad(losses[1], params, allow_unused=True)
        d = [float(v) - m + self.eps for v, m in zip(losses.detach(), self.m, strict=True)]
        q_dd, q_dr, q_rr = gram(g_d, g_r)
        # Gram matrix of the log-loss gradients ĝ_i = g_i / d_i
        z_d, z_r = qp_weights(
            q_dd / d[0] ** 2, q_dr / (d[0] * d[1]), q_rr / d[1] ** 2, self.ridge, self.clamp
        )
        c_d, c_r = z_d / d[0], z_r / d[1]
        norm_dir = math.sqrt(max(0.0, c_d**2 * q_dd + 2 * c_d * c_r * q_dr + c_r**2 * q_rr))
        norm_std = math.sqrt(max(0.0, q_dd + 2 * q_dr + q_rr))
        scale = norm_std / norm_dir if norm_dir > 0 else 0.0
        for p, a, b in zip(params, g_d, g_r, strict=True):
            g = torch.zeros_like(p)
            if a is not None:
                g.add_(a, alpha=c_d * scale)
            if b is not None:
                g.add_(b, alpha=c_r * scale)
            p.grad = g
        run.optimizer_step()
        self.z = (z_d, z_r)
        return out

    def log(self, run: TrainRun) -> dict[str, float]:
        return {"z_distortion": self.z[0], "z_rate": self.z[1]}


__all__ = ["BalancedRD", "BalancedRDQP", "LogLossWeights", "gram", "qp_weights", "rd_losses"]
