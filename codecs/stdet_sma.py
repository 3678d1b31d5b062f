"""STDET + SMA: faster codec training by modelling the training dynamics (Zhang, Duan,
Huang, Zhu, "Accelerating Learned Image Compression Through Modeling Neural Training
Dynamics", TMLR 2025, arXiv 2505.18107), on correlation mode decomposition (CMD; Brokman
et al., ICLR 2024).

``--method stdet-sma`` takes standard R-D steps (as ``standard``) and around them:

1. **Trajectories** (steps 1..``warmup``): every ``record_every`` steps the values of
   ``samples`` scalar parameters, drawn per tensor as CMD does (half spread evenly over the
   tensors, half in proportion to their size), are recorded.
2. **Modes**: the sampled trajectories are clustered by correlation (CMD: complete-linkage
   hierarchical clustering of the rows of the |Pearson| matrix, SciPy, at most ``modes``
   clusters); each mode's *reference* is the member with the highest mean |correlation| to
   its mode.
3. **Affine maps** (the next ``fit_steps`` steps): every parameter's trajectory is compared
   with every reference's (running sums, not stored trajectories: memory stays at
   parameters x modes), assigned to the reference it correlates with most, and fitted by
   least squares as ``w ≈ a·w_ref + b``. The sums keep running afterwards, so the fits
   follow the training (CMD's online update).
4. **Sensitivity-aware gradual embedding** (then every ``embed_every`` steps): of the
   parameters that are not yet embedded, not references and correlate with their reference
   by at least ``min_corr``, the ``embed_rate`` fraction with the lowest sensitivity
   (a running mean, decay ``sens_decay``, of |gradient x value| sampled every
   ``record_every`` steps: the first-order loss change of removing the parameter) is embedded, up to ``max_embed`` of all parameters. An
   embedded parameter is no longer trained: after every optimizer step it is set to
   ``a·w_ref + b`` with the reference's new value, exactly. A tensor whose entries are all
   embedded stops requiring gradients, which is where the backward pass gets cheaper.
5. **SMA** (Sampling-then-Moving-Average): from step ``sma_start`` (default: when embedding
   starts) the weights are sampled every ``sma_every`` steps and their running mean is what
   is validated and exported (``best.pth``/``last.pth``'s ``state_dict``); training itself
   continues from the live weights.

Choices where the paper is not specific (documented in docs/lic-training.md, all options):
the sensitivity measure, the embedding schedule, the least-squares fit over a window
after the clustering, and an equal-weight mean for SMA. The trainable-parameter count is
logged at every validation (``trainable_params``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clbench.codecs.train_methods import TrainMethod, register_train_method
from clbench.errors import ClbenchError

if TYPE_CHECKING:
    from clbench.codecs.train import TrainRun


def sample_indices(sizes: list[int], k: int, seed: int) -> np.ndarray:
    """``k`` flat indices over tensors of ``sizes``: half spread evenly over the tensors,
    half in proportion to their size (CMD's balanced sampling), without repetition."""
    rng = np.random.default_rng(seed)
    total = sum(sizes)
    k = min(k, total)
    per = [min(s, k // (2 * len(sizes)) + int(k / 2 * s / total)) for s in sizes]
    while sum(per) < k:  # top up the largest tensors with room
        i = max(range(len(sizes)), key=lambda j: sizes[j] - per[j])
        per[i] += min(k - sum(per), sizes[i] - per[i])
    out, off = [], 0
    for s, n in zip(sizes, per, strict=True):
        out.append(off + np.sort(rng.choice(s, size=n, replace=False)))
        off += s
    return np.concatenate(out)


def cluster_modes(traj: np.ndarray, modes: int) -> tuple[np.ndarray, list[int]]:
    """CMD's clustering of sampled trajectories ``traj`` (time x samples): labels 0..M-1
    per sample and each mode's reference (the sample with the highest mean |corr| to its
    mode), largest mode first."""
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import pdist

    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.abs(np.corrcoef(traj.T))
    corr[~np.isfinite(corr)] = 0.0  # constant trajectories correlate with nothing
    if traj.shape[1] < 2:
        return np.zeros(traj.shape[1], int), [0]
    link = hierarchy.linkage(pdist(corr), method="complete")
    raw = hierarchy.fcluster(link, t=modes, criterion="maxclust")
    order = sorted(set(raw.tolist()), key=lambda c: -int((raw == c).sum()))
    labels = np.array([order.index(c) for c in raw])
    refs = []
    for m in range(len(order)):
        members = np.flatnonzero(labels == m)
        inner = corr[np.ix_(members, members)].mean(1)
        refs.append(int(members[int(np.argmax(inner))]))
    return labels, refs


@register_train_method("stdet-sma")
class StdetSMA(TrainMethod):
    """Standard steps + CMD modes, sensitivity-aware gradual embedding and SMA weights."""

    def __init__(
        self,
        *,
        warmup: int,
        record_every: int,
        samples: int,
        modes: int,
        fit_steps: int,
        embed_every: int,
        embed_rate: float,
        max_embed: float,
        min_corr: float,
        sens_decay: float,
        sma_start: int | None,
        sma_every: int,
        seed: int,
    ):
        def bad(key: str, val: Any, why: str) -> ClbenchError:
            return ClbenchError(f"codec train: stdet-sma: {key}={val!r} {why}")

        if not isinstance(modes, int) or isinstance(modes, bool) or modes < 1:
            raise bad("modes", modes, "must be an integer >= 1 (the number of CMD modes)")
        for key, val, lo in (
            ("record_every", record_every, 1),
            ("embed_every", embed_every, 1),
            ("sma_every", sma_every, 1),
            ("samples", samples, max(2, modes)),
        ):
            if not isinstance(val, int) or val < lo:
                raise bad(key, val, f"must be an integer >= {lo}")
        for key, val in (("warmup", warmup), ("fit_steps", fit_steps)):
            if not isinstance(val, int) or val < 3 * record_every:
                raise bad(
                    key, val, f"must be an integer >= 3 x record_every ({3 * record_every}) steps"
                )
        for key, val, lo, hi in (
            ("embed_rate", embed_rate, 0.0, 1.0),
            ("max_embed", max_embed, 0.0, 1.0),
            ("min_corr", min_corr, 0.0, 1.0),
        ):
            if not (isinstance(val, (int, float)) and lo <= val <= hi):
                raise bad(key, val, f"must be between {lo} and {hi}")
        if not (isinstance(sens_decay, (int, float)) and 0 <= sens_decay < 1):
            raise bad("sens_decay", sens_decay, "must be in [0, 1)")
        if sma_start is not None and (not isinstance(sma_start, int) or sma_start < 0):
            raise bad("sma_start", sma_start, "must be an integer >= 0 or null")
        self.warmup, self.record_every, self.samples = warmup, record_every, samples
        self.modes, self.fit_steps, self.embed_every = modes, fit_steps, embed_every
        self.embed_rate, self.max_embed = float(embed_rate), float(max_embed)
        self.min_corr, self.sens_decay = float(min_corr), float(sens_decay)
        self.sma_start = warmup + fit_steps if sma_start is None else sma_start
        self.sma_every, self.seed = sma_every, int(seed)
        self.s: dict[str, Any] = {}  # the method's state (tensors and plain values)

    # -- the parameters as one flat vector -------------------------------------------------
    def setup(self, run: TrainRun) -> None:
        self.run = run
        self.params = [p for g in run.optimizers["net"].param_groups for p in g["params"]]
        names = {id(p): n for n, p in run.model.named_parameters()}
        self.names = [names[id(p)] for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.P = int(self.offsets[-1])
        idx = sample_indices(self.sizes, self.samples, self.seed)
        self.s = {
            "sample_idx": torch.from_numpy(idx),
            "traj": torch.zeros(self.warmup // self.record_every, len(idx)),
            "t_rec": 0,
            "embedded": torch.zeros(self.P, dtype=torch.bool),
            "sma_count": 0,
        }
        self._plan: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def flat(self) -> torch.Tensor:
        """All trained parameters as one detached fp32 vector (a copy)."""
        return torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])

    def _gather(self, flat_idx: torch.Tensor) -> torch.Tensor:
        """Current values of the parameters at flat indices (without copying them all)."""
        out = torch.empty(len(flat_idx))
        pos = np.searchsorted(self.offsets, flat_idx.numpy(), side="right") - 1
        for t in np.unique(pos):
            sel = torch.from_numpy(np.flatnonzero(pos == t))
            local = flat_idx[sel] - self.offsets[t]
            out[sel] = self.params[t].detach().reshape(-1)[local].float().cpu()
        return out

    # -- one step -------------------------------------------------------------------------
    def step(self, run: TrainRun, x: torch.Tensor) -> dict[str, torch.Tensor]:
        run.zero_grad()
        out = run.loss(x)
        out["loss"].backward()
        t = run.step + 1  # steps done after this one
        if "sens" in self.s and t % self.record_every == 0:
            self._sensitivity()
        self._mask_grads()
        run.optimizer_step()
        self.follow()
        if t % self.record_every == 0:
            self._record(t)
        if t == self.warmup:
            self._find_modes()
        elif t == self.warmup + self.fit_steps:
            self._fit_maps()
        if (
            t > self.warmup + self.fit_steps
            and (t - self.warmup - self.fit_steps) % self.embed_every == 0
        ):
            self._embed()
        if t >= self.sma_start and (t - self.sma_start) % self.sma_every == 0:
            self._sample_sma()
        return out

    def _sensitivity(self) -> None:
        """Running mean of |gradient x value|, sampled every ``record_every`` steps (every
        step would cost a pass over all parameters per step for little change)."""
        sens, b = self.s["sens"], self.sens_decay
        for i, p in enumerate(self.params):
            if p.grad is not None:
                lo, hi = self.offsets[i], self.offsets[i + 1]
                g = (p.grad.reshape(-1) * p.detach().reshape(-1)).abs().float().cpu()
                sens[lo:hi].mul_(b).add_(g, alpha=1 - b)

    def _mask_grads(self) -> None:
        """Embedded entries are not trained: the optimizer sees no gradient for them."""
        for i, local, *_ in self._plan:
            g = self.params[i].grad
            if g is not None:
                g.view(-1).index_fill_(0, local, 0.0)

    def _record(self, t: int) -> None:
        s = self.s
        if t <= self.warmup:
            row = t // self.record_every - 1
            if row < len(s["traj"]):
                s["traj"][row] = self._gather(s["sample_idx"])
                s["t_rec"] = row + 1
            return
        if "refs" not in s:
            return
        w = self.flat().double() - s["w0"]
        r = self._gather(s["refs"]).double() - s["r0"]
        s["n"] += 1
        s["sum_r"] += r
        s["sum_rr"] += r * r
        s["sum_w"] += w
        s["sum_ww"] += w * w
        if "sum_wr_all" in s:  # before the fit: against every reference
            s["sum_wr_all"] += w[:, None] * r[None, :]
        else:  # afterwards: against each parameter's own reference (online refit)
            s["sum_wr"] += w * r[s["mode"].long()]

    def _find_modes(self) -> None:
        s = self.s
        traj = s["traj"][: s["t_rec"]].numpy().astype(np.float64)
        _, refs = cluster_modes(traj, self.modes)
        s["refs"] = s["sample_idx"][refs].clone()
        M = len(refs)
        s["w0"], s["r0"] = self.flat().double(), self._gather(s["refs"]).double()
        s["n"] = 0
        s["sum_r"], s["sum_rr"] = (
            torch.zeros(M, dtype=torch.float64),
            torch.zeros(M, dtype=torch.float64),
        )
        s["sum_w"] = torch.zeros(self.P, dtype=torch.float64)
        s["sum_ww"] = torch.zeros(self.P, dtype=torch.float64)
        s["sum_wr_all"] = torch.zeros(self.P, M, dtype=torch.float64)
        s["sens"] = torch.zeros(self.P)
        is_ref = torch.zeros(self.P, dtype=torch.bool)
        is_ref[s["refs"]] = True
        s["is_ref"] = is_ref
        del s["traj"]

    def _stats(self, sum_wr: torch.Tensor, mode: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) in original coordinates and |corr| of each parameter with reference ``mode``."""
        s = self.s
        n = max(1, s["n"])
        mr, mw = s["sum_r"][mode] / n, s["sum_w"] / n
        cov = sum_wr / n - mw * mr
        var_r = (s["sum_rr"][mode] / n - mr * mr).clamp_min(0)
        var_w = (s["sum_ww"] / n - mw * mw).clamp_min(0)
        a = torch.where(var_r > 0, cov / var_r.clamp_min(1e-300), torch.zeros_like(cov))
        corr = torch.where(
            (var_r > 0) & (var_w > 0),
            (cov / (var_r * var_w).sqrt().clamp_min(1e-300)).abs(),
            torch.zeros_like(cov),
        )
        # back from the centred coordinates: w = w_c + w0, r = r_c + r0
        b = (mw + s["w0"]) - a * (mr + s["r0"][mode])
        return torch.stack([a, b]), corr

    def _fit_maps(self) -> None:
        s = self.s
        n = max(1, s["n"])
        mr = s["sum_r"] / n
        mw = s["sum_w"] / n
        cov = s["sum_wr_all"] / n - mw[:, None] * mr[None, :]
        var_r = (s["sum_rr"] / n - mr * mr).clamp_min(1e-300)
        var_w = (s["sum_ww"] / n - mw * mw).clamp_min(1e-300)
        corr = (cov / (var_w[:, None] * var_r[None, :]).sqrt()).abs().nan_to_num(0.0)
        mode = corr.argmax(1)
        s["mode"] = mode.to(torch.int16)
        s["sum_wr"] = s["sum_wr_all"].gather(1, mode[:, None])[:, 0].clone()
        del s["sum_wr_all"]
        s["a"] = torch.zeros(self.P)
        s["b"] = torch.zeros(self.P)

    def _embed(self) -> None:
        s = self.s
        emb = s["embedded"]
        mode = s["mode"].long()
        ab, corr = self._stats(s["sum_wr"], mode)
        cand = (~emb) & (~s["is_ref"]) & (corr >= self.min_corr)
        room = int(self.max_embed * self.P) - int(emb.sum())
        k = min(room, int(self.embed_rate * int(cand.sum())))
        if k <= 0:
            return
        score = torch.where(cand, s["sens"], torch.full_like(s["sens"], math.inf))
        pick = torch.topk(score, k, largest=False).indices
        s["a"][pick] = ab[0][pick].float()
        s["b"][pick] = ab[1][pick].float()
        emb[pick] = True
        self._rebuild()
        self.follow()

    def _rebuild(self) -> None:
        """Per-tensor lists of the embedded entries, sorted by mode (so that following
        the references is a multiply by one scalar per mode segment); tensors fully
        embedded stop requiring gradients."""
        s = self.s
        self._plan = []
        if "a" not in s:
            return
        emb, mode = s["embedded"], s["mode"].long()
        n_modes = len(s["refs"])
        for i, p in enumerate(self.params):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            local = torch.nonzero(emb[lo:hi]).flatten()
            if len(local):
                m = mode[lo:hi][local]
                order = torch.argsort(m, stable=True)
                local, m = local[order], m[order]
                ends = torch.bincount(m, minlength=n_modes).cumsum(0).tolist()
                segments = [
                    (k, b, e)
                    for k, (b, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True))
                    if e > b
                ]
                dev = p.device
                self._plan.append(
                    (
                        i,
                        local.to(dev),
                        s["a"][lo:hi][local].to(dev, p.dtype),
                        s["b"][lo:hi][local].to(dev, p.dtype),
                        segments,
                    )
                )
            full = len(local) == p.numel()
            p.requires_grad_(not full)
            if full:
                p.grad = None

    def follow(self) -> None:
        """Set every embedded parameter to ``a·w_ref + b`` with its reference's value now."""
        if not self._plan:
            return
        refs = self._gather(self.s["refs"]).tolist()
        with torch.no_grad():
            for i, local, a, b, segments in self._plan:
                vals = torch.empty_like(a)
                for k, lo, hi in segments:
                    torch.mul(a[lo:hi], refs[k], out=vals[lo:hi])
                self.params[i].data.view(-1).index_copy_(0, local, vals.add_(b))

    def _sample_sma(self) -> None:
        s = self.s
        w = self.flat().double()
        s["sma_count"] += 1
        if "sma" not in s:
            s["sma"] = w
        else:
            s["sma"] += (w - s["sma"]) / s["sma_count"]

    # -- what the engine asks ----------------------------------------------------------
    def trainable(self) -> int:
        """Parameters still trained (all, minus the embedded ones)."""
        return self.P - int(self.s["embedded"].sum()) if self.s else 0

    def eval_state(self, run: TrainRun) -> dict[str, torch.Tensor] | None:
        if not self.s.get("sma_count"):
            return None
        state = run.model.state_dict()
        avg = self.s["sma"]
        for i, name in enumerate(self.names):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            ref = state[name]
            state[name] = avg[lo:hi].reshape(ref.shape).to(ref.dtype).to(ref.device)
        return state

    def log(self, run: TrainRun) -> dict[str, float]:
        return {"trainable_params": self.trainable(), "sma_samples": self.s.get("sma_count", 0)}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.s)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.s = dict(state)
            self._rebuild()


__all__ = ["StdetSMA", "cluster_modes", "sample_indices"]
