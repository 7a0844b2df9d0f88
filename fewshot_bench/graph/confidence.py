"""Pseudo-label confidence (metric transfer, eqs. 8-9) and top-k export for other methods.

Scores are log-scores (``log z`` from voting, log-probabilities from diffusion). The class
posterior is ``p = softmax(scores / τ)`` -- with ``τ = 1`` and log-scores this is simply the
normalised vote ``z / Σ_c z`` -- and the confidence is ``α = p_top1 - p_top2`` (``α = 1`` for
a single class). Pseudo-labels with ``α < min_alpha`` (0.01 in the paper) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PseudoLabels:
    """Selected items: ``indices`` into the scored set, predicted ``labels`` and confidence ``alpha``.

    Sorted by decreasing ``alpha``.
    """

    indices: torch.Tensor
    labels: torch.Tensor
    alpha: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


def confidence(scores: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, α)``: ``p = softmax(scores / τ)`` ``[n, C]`` and ``α = top1(p) - top2(p)`` ``[n]``."""
    p = torch.softmax(scores.float() / tau, dim=1)
    p = torch.nan_to_num(p, nan=1.0 / max(p.shape[1], 1))
    if p.shape[1] == 1:
        return p, torch.ones(p.shape[0], device=p.device)
    top = p.topk(2, dim=1).values
    return p, top[:, 0] - top[:, 1]


def confident_pseudo_labels(
    scores: torch.Tensor,
    *,
    k: int | None = None,
    k_per_class: int | None = None,
    min_alpha: float = 0.01,
    tau: float = 1.0,
) -> PseudoLabels:
    """The most confident pseudo-labels: ``α >= min_alpha``, then the top ``k`` overall and/or
    the top ``k_per_class`` of each predicted class (``None``: no limit)."""
    p, alpha = confidence(scores, tau)
    labels = p.argmax(1)
    keep = alpha >= min_alpha
    idx = torch.nonzero(keep).squeeze(1)
    a, y = alpha[idx], labels[idx]
    order = torch.argsort(a, descending=True, stable=True)
    idx, a, y = idx[order], a[order], y[order]
    if k_per_class is not None:
        # rank within predicted class, by decreasing α (stable sort keeps the α order)
        by_class = torch.argsort(y, stable=True)
        ys = y[by_class]
        counts = torch.bincount(ys, minlength=p.shape[1])
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(ys)
        rank[by_class] = torch.arange(ys.numel(), device=ys.device) - starts[ys]
        sel = rank < k_per_class
        idx, a, y = idx[sel], a[sel], y[sel]
    if k is not None:
        idx, a, y = idx[:k], a[:k], y[:k]
    return PseudoLabels(indices=idx, labels=y, alpha=a)
