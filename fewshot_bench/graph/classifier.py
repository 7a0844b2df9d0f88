"""Confidence-weighted linear classifier on pseudo-labels (metric transfer, eq. 10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot_bench.graph.threads import few_threads


def fit_weighted_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    weights: torch.Tensor | None = None,
    *,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> torch.nn.Linear:
    """Multinomial logistic regression minimising eq. 10 plus an L2 penalty:

    ``-(1/N) Σ_i α_i log p(ŷ_i | x_i) + l2 * ||W||²`` (``α_i = 1`` without ``weights``), by full-batch
    L-BFGS from a zero start -- deterministic, no randomness.
    """
    x = x.float()
    y = y.to(x.device).long()
    model = torch.nn.Linear(x.shape[1], n_classes).to(x.device)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    w = torch.ones(len(y), device=x.device) if weights is None else weights.to(x.device).float()
    n = max(len(y), 1)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        nll = F.cross_entropy(model(x), y, reduction="none")
        loss = (nll * w).sum() / n + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    small = x.device.type == "cpu" and x.numel() <= 1_000_000
    with torch.enable_grad(), few_threads(small):
        opt.step(closure)
    return model.requires_grad_(False)
