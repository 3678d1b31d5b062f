"""Classifier heads and the soft-target losses strategies share.

* :class:`IncrementalHead`: a linear head over all scenario classes, sliced to the seen ones
  (the baselines, Seq-LoRA, the prompt methods).
* :class:`CosineHead`: CL-LoRA's / PILOT's cosine classifier (CL-LoRA, APER, RanPAC).
* :func:`local_labels`: a lookup from scenario labels to a task's own head (0..n-1).
* :func:`distillation` (Hinton's KD, T^2-scaled, batch mean) and :func:`soft_cross_entropy`
  (the official CL-LoRA ``_KD_loss``: no T^2, sum / batch). They differ in scaling and in
  the order of their reductions, and each reproduces its source's numbers, so both stay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class IncrementalHead(nn.Module):
    """A linear head over all scenario classes whose output is sliced to the seen ones.

    Allocating all units up front (rather than growing the layer) keeps optimiser and
    checkpoint shapes fixed; unseen units never receive a loss.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feats: Tensor, n_seen: int) -> Tensor:
        return self.fc(feats)[:, :n_seen]


class CosineHead(nn.Module):
    """Cosine classifier (official ``CosineLinearFeature``): sigma * cos(f, w), sigma init 1,
    weights U(-1/sqrt(d), 1/sqrt(d))."""

    def __init__(self, dim: int, n: int, gen: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.rand(n, dim, generator=gen) * 2 * bound - bound)
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, f: Tensor) -> Tensor:
        return self.sigma * F.linear(F.normalize(f, dim=1), F.normalize(self.weight, dim=1))


def local_labels(classes: Sequence[int], num_classes: int, device: torch.device) -> Tensor:
    """A lookup table ``lut[y]`` from scenario labels to positions in ``classes`` (the
    task's own head); labels of other tasks map to -1."""
    lut = torch.full((num_classes,), -1, dtype=torch.long, device=device)
    lut[torch.as_tensor(list(classes), device=device)] = torch.arange(len(classes), device=device)
    return lut


def distillation(logits: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's KD: soft cross-entropy between tempered distributions, scaled by T^2."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    q = F.softmax(teacher / temperature, dim=1)
    return -(q * log_p).sum(1).mean() * temperature**2


def soft_cross_entropy(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Official CL-LoRA ``_KD_loss``: -sum softmax(t/T) * log_softmax(s/T) / batch (no T^2)."""
    logp = torch.log_softmax(student.float() / temperature, dim=1)
    q = torch.softmax(teacher.float() / temperature, dim=1)
    return -(q * logp).sum() / student.shape[0]
