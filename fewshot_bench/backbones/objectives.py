"""Pretraining objectives: supervised cross-entropy, supervised NCA and instance discrimination.

Each objective is an ``nn.Module`` called as ``objective(features, labels, indices, gen)`` with
the backbone's features of a batch, their class labels and their indices in the training set;
it returns the scalar loss. The two memory-bank objectives (metric transfer, eqs. 2 and 4):

- a linear projection to ``embed_dim`` (128) followed by L2 normalisation gives ``f_i``;
- a memory bank ``V`` ``[N, embed_dim]`` holds one L2-normalised vector per training image,
  updated after each step with ``v_i ← normalise(m · v_i + (1 − m) · f_i)`` (m = 0.5);
- **NCA** (eq. 4, Wu et al. ECCV 2018): ``p_i = Σ_{j: y_j = y_i, j ≠ i} exp(v_j·f_i/τ) /
  Σ_{k ≠ i} exp(v_k·f_i/τ)``, loss ``−mean log p_i`` (τ = 0.05);
- **instance discrimination** (eq. 2, Wu et al. CVPR 2018): every image is its own class,
  ``P(i | f) = exp(v_i·f/τ) / Σ_k exp(v_k·f/τ)`` (τ = 0.07): the full softmax over the bank
  when ``nce_k == 0``, else noise-contrastive estimation with ``nce_k`` uniform noise samples
  and the normaliser Z estimated once from the first batch and then kept fixed.

The bank is filled before training with the (untrained) network's own features, computed
with batch statistics as in training (``init_memory``), rather than random vectors: with
random vectors (or eval-mode features) the first updated entries are far closer to every
feature than the rest of the bank, the loss jumps, and short CPU budgets, which visit every
image only a few times, spend their steps recovering.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_bench.choices import OBJECTIVES


class Objective(nn.Module):
    """Base class. ``uses_memory``: whether ``init_memory`` must be called before training.

    The training loop calls ``after_step()`` after each optimiser step: memory-bank objectives
    write the batch's features into the bank then (not during ``forward``, whose graph still
    reads the bank).
    """

    name: str = "abstract"
    uses_memory: bool = False

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def init_memory(self, features: torch.Tensor) -> None:  # noqa: B027
        """Fill the memory bank from backbone features of every training item (in order)."""

    def after_step(self) -> None:  # noqa: B027
        """Apply the deferred memory update of the last ``forward`` (no-op without a bank)."""


class CrossEntropy(Objective):
    """Linear classifier on the backbone features, softmax cross-entropy."""

    name = "ce"

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, n_classes)

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        return F.cross_entropy(self.head(features), labels)


class _MemoryObjective(Objective):
    uses_memory = True

    def __init__(
        self, in_dim: int, n_items: int, embed_dim: int, tau: float, momentum: float
    ) -> None:
        super().__init__()
        self.head = nn.Linear(in_dim, embed_dim)
        self.tau = tau
        self.momentum = momentum
        self.register_buffer("memory", F.normalize(torch.randn(n_items, embed_dim), dim=1))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection ``f`` of backbone features (float32)."""
        return F.normalize(self.head(features.float()), dim=1)

    @torch.no_grad()
    def init_memory(self, features: torch.Tensor) -> None:
        for start in range(0, len(features), 4096):
            chunk = features[start : start + 4096].to(self.memory.device)
            self.memory[start : start + len(chunk)] = self.embed(chunk)

    @torch.no_grad()
    def update_memory(self, f: torch.Tensor, indices: torch.Tensor) -> None:
        """``v_i ← normalise(m · v_i + (1 − m) · f_i)`` for the batch's items."""
        mixed = self.memory[indices] * self.momentum + f.detach() * (1 - self.momentum)
        self.memory[indices] = F.normalize(mixed, dim=1)

    def after_step(self) -> None:
        if self._pending is not None:
            self.update_memory(*self._pending)
            self._pending = None


class NCA(_MemoryObjective):
    """Supervised neighbourhood component analysis with a memory bank (metric transfer eq. 4)."""

    name = "nca"

    def __init__(
        self,
        in_dim: int,
        labels: torch.Tensor,
        embed_dim: int = 128,
        tau: float = 0.05,
        momentum: float = 0.5,
    ) -> None:
        super().__init__(in_dim, len(labels), embed_dim, tau, momentum)
        self.register_buffer("memory_labels", labels.clone().long())

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        f = self.embed(features)
        logits = f @ self.memory.t() / self.tau  # [B, N]
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[torch.arange(len(indices), device=logits.device), indices] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        same = (labels.view(-1, 1) == self.memory_labels.view(1, -1)) & ~self_mask
        log_den = torch.logsumexp(logits, dim=1)
        log_num = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
        has_pos = same.any(dim=1)  # items alone in their class carry no NCA signal
        loss = (log_den - log_num)[has_pos].mean() if has_pos.any() else logits.sum() * 0.0
        self._pending = (f.detach(), indices)
        return loss


class InstanceDiscrimination(_MemoryObjective):
    """Non-parametric instance discrimination with a memory bank (metric transfer eq. 2)."""

    name = "instance"

    def __init__(
        self,
        in_dim: int,
        n_items: int,
        embed_dim: int = 128,
        tau: float = 0.07,
        momentum: float = 0.5,
        nce_k: int = 0,
    ) -> None:
        super().__init__(in_dim, n_items, embed_dim, tau, momentum)
        self.nce_k = nce_k
        # NCE normaliser Z (0 = not yet estimated); a buffer so checkpoints keep it
        self.register_buffer("nce_z", torch.zeros(()))

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        f = self.embed(features)
        if self.nce_k <= 0:
            loss = F.cross_entropy(f @ self.memory.t() / self.tau, indices)
        else:
            loss = self._nce(f, indices, gen)
        self._pending = (f.detach(), indices)
        return loss

    def _nce(
        self, f: torch.Tensor, indices: torch.Tensor, gen: torch.Generator | None
    ) -> torch.Tensor:
        n, b, k = self.memory.shape[0], f.shape[0], self.nce_k
        noise = torch.randint(0, n, (b, k), generator=gen).to(self.memory.device)
        idx = torch.cat([indices.view(-1, 1), noise], dim=1)  # [B, 1 + K], positive first
        v = self.memory[idx]  # [B, 1 + K, D]
        p = torch.exp(torch.einsum("bkd,bd->bk", v, f) / self.tau)
        if float(self.nce_z) == 0.0:
            with torch.no_grad():
                self.nce_z.fill_(float(p.mean()) * n)
        p = p / self.nce_z
        pn = k / n  # K · P_noise(i), uniform noise
        eps = 1e-7
        log_pos = torch.log(p[:, 0] / (p[:, 0] + pn) + eps)
        log_neg = torch.log(pn / (p[:, 1:] + pn) + eps).sum(dim=1)
        return -(log_pos + log_neg).mean()


def build_objective(
    name: str,
    in_dim: int,
    labels: torch.Tensor,
    n_classes: int,
    *,
    embed_dim: int = 128,
    tau: float | None = None,
    memory_momentum: float = 0.5,
    nce_k: int = 0,
) -> Objective:
    """The objective ``ce``, ``nca`` or ``instance`` for a training set with ``labels``."""
    if name == "ce":
        return CrossEntropy(in_dim, n_classes)
    if name == "nca":
        return NCA(in_dim, labels, embed_dim, 0.05 if tau is None else tau, memory_momentum)
    if name == "instance":
        return InstanceDiscrimination(
            in_dim, len(labels), embed_dim, 0.07 if tau is None else tau, memory_momentum, nce_k
        )
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")


def weighted_knn_predict(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    n_classes: int,
    k: int = 200,
    tau: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine neighbours vote with weight ``exp(s/τ)``; k = 1 is
    plain 1-NN. Returns predicted labels of ``test``."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test), chunk):
        sims, idx = (test[start : start + chunk] @ train.t()).topk(k, dim=1)
        votes = torch.zeros(len(sims), n_classes, dtype=sims.dtype)
        votes.scatter_add_(1, train_labels[idx], torch.exp(sims / tau))
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
