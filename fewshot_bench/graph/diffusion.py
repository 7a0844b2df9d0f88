"""Label diffusion on a kNN graph (Douze et al.): ``L_{t+1} = η(W L_t)``, seeds not reset.

``W = D⁻¹ A`` is row-stochastic (see :class:`~fewshot_bench.graph.build.Graph`), ``L_0`` is the
one-hot seed matrix. The normalisation ``η`` is one of

- ``"col"``: each class column scaled to unit L1 mass (best in the paper), or to mass
  ``prior[c]`` (mean 1) when a class prior is given;
- ``"row"``: each node's row scaled to unit L1 mass (all-zero rows stay zero);
- ``"sinkhorn"``: Sinkhorn-Knopp, alternating column and row scaling so that rows sum to 1 and
  columns to ``prior * (#reached nodes)``; it ends on the column step so column sums match the
  prior exactly;
- ``"none"``.

``gamma=r`` applies the power non-linearity ``Γ_r(x) = x**r`` element-wise before ``η``.
Classes are processed in column batches when ``η`` acts column by column (``col``/``none``), so
memory stays at a few ``N x C'`` float32 buffers whatever the number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fewshot_bench.graph.spmm import sparse_matmul
from fewshot_bench.graph.threads import SMALL_PROBLEM_NODES, few_threads

NORMS = ("col", "row", "sinkhorn", "none")
_EPS = 1e-30


def column_normalize(
    L: torch.Tensor, n_core: int | None = None, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Scale each column to unit L1 mass over the first ``n_core`` rows (in place); with
    ``prior`` (``[C]``, mean 1; tiled over column groups) column ``c`` gets mass ``prior[c]``."""
    L.div_(L[:n_core].sum(0, keepdim=True).clamp_min(_EPS))
    if prior is not None:
        L.mul_(prior.to(L.device, L.dtype).repeat(L.shape[1] // prior.numel()))
    return L


def row_normalize(L: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Scale each row (within each of ``groups`` column groups) to unit L1 mass, in place."""
    L3 = L.view(L.shape[0], groups, -1)
    L3.div_(L3.sum(2, keepdim=True).clamp_min(_EPS))
    return L


def sinkhorn(
    L: torch.Tensor,
    prior: torch.Tensor | None = None,
    n_iter: int = 5,
    n_core: int | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Sinkhorn-Knopp: rows -> 1, columns -> ``prior * R`` (``R`` = #non-zero rows), ending on columns.

    Column sums and ``R`` are taken over the first ``n_core`` rows (all by default); later rows
    (out-only nodes) are scaled alongside without influencing the scaling. With ``groups > 1``
    the columns are ``groups`` independent problems of ``C`` classes each, sharing ``prior``.
    """
    L3 = L.view(L.shape[0], groups, -1)
    n_classes = L3.shape[2]
    if prior is None:
        prior = torch.full((n_classes,), 1.0 / n_classes, device=L.device, dtype=L.dtype)
    prior = prior.to(L.device, L.dtype) / prior.sum()
    reached = (L3[:n_core].sum(2) > 0).sum(0).to(L.dtype).clamp_min(1)  # [G]
    target = reached[:, None] * prior[None, :]  # [G, C]
    for _ in range(n_iter):
        L3.mul_(target / L3[:n_core].sum(0).clamp_min(_EPS))
        L3.div_(L3.sum(2, keepdim=True).clamp_min(_EPS))
    L3.mul_(target / L3[:n_core].sum(0).clamp_min(_EPS))
    return L


def normalize(
    L: torch.Tensor,
    norm: str,
    *,
    prior: torch.Tensor | None = None,
    sinkhorn_iters: int = 5,
    gamma: float | None = None,
    n_core: int | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Apply ``Γ_r`` (if ``gamma``) then the normalisation ``η`` named by ``norm``, in place.

    Column statistics use only the first ``n_core`` rows, so out-only rows cannot change them;
    ``groups``: the columns hold that many independent diffusions (row/Sinkhorn steps per group).
    """
    if gamma is not None and gamma != 1:
        L.pow_(gamma)
    if norm == "col":
        return column_normalize(L, n_core, prior)
    if norm == "row":
        return row_normalize(L, groups)
    if norm == "sinkhorn":
        return sinkhorn(L, prior, sinkhorn_iters, n_core, groups)
    if norm == "none":
        return L
    raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")


def auto_class_batch(n_nodes: int, n_classes: int, norm: str, budget_bytes: int = 1 << 30) -> int:
    """Classes per batch: all when ``η`` couples columns, else what fits ~3 float32 buffers in budget."""
    if norm in ("row", "sinkhorn"):
        return n_classes
    per_class = 3 * 4 * max(n_nodes, 1)
    return int(max(1, min(n_classes, budget_bytes // per_class)))


def _one_hot(
    n: int, seeds: torch.Tensor, labels: torch.Tensor, c0: int, c1: int, device: torch.device
) -> torch.Tensor:
    L = torch.zeros((n, c1 - c0), device=device, dtype=torch.float32)
    sel = (labels >= c0) & (labels < c1)
    L[seeds[sel], labels[sel] - c0] = 1.0
    return L


def _small(W: torch.Tensor) -> bool:
    return W.device.type == "cpu" and W.shape[0] <= SMALL_PROBLEM_NODES


def diffuse(
    W: torch.Tensor,
    seeds: torch.Tensor,
    seed_labels: torch.Tensor,
    n_classes: int,
    n_iter: int,
    *,
    norm: str = "col",
    prior: torch.Tensor | None = None,
    sinkhorn_iters: int = 5,
    gamma: float | None = None,
    class_batch: int | None = None,
    rows: torch.Tensor | None = None,
    record_all: bool = False,
    n_core: int | None = None,
) -> torch.Tensor:
    """Run ``n_iter`` steps of ``L <- η(W L)`` from one-hot seeds; return the rows asked for.

    ``W``: ``[N, N]`` sparse (CSR) or dense transition matrix. ``rows``: node ids to return
    (default all). ``record_all``: return every iterate ``[n_iter, len(rows), C]`` (for choosing
    the iteration count) instead of the last one ``[len(rows), C]``. ``n_core``: rows
    ``>= n_core`` are out-only nodes (queries): they receive mass but are left out of the
    column statistics of ``η``, so they cannot influence any other node.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
    device = W.device
    n = W.shape[0]
    seeds, seed_labels = seeds.to(device), seed_labels.to(device)
    rows_t = None if rows is None else rows.to(device)
    n_out = n if rows_t is None else int(rows_t.numel())
    if class_batch is None:
        class_batch = auto_class_batch(n, n_classes, norm)
    if class_batch < n_classes and norm in ("row", "sinkhorn"):
        raise ValueError(f"norm={norm!r} couples classes; it cannot run in column batches")
    shape = (n_iter, n_out, n_classes) if record_all else (n_out, n_classes)
    result = torch.zeros(shape, device=device, dtype=torch.float32)
    with few_threads(_small(W)):
        for c0 in range(0, n_classes, class_batch):
            c1 = min(c0 + class_batch, n_classes)
            L = _one_hot(n, seeds, seed_labels, c0, c1, device)
            for t in range(n_iter):
                L = sparse_matmul(W, L)
                normalize(
                    L,
                    norm,
                    prior=None if prior is None else prior[c0:c1],
                    sinkhorn_iters=sinkhorn_iters,
                    gamma=gamma,
                    n_core=n_core,
                )
                if record_all:
                    result[t, :, c0:c1] = L if rows_t is None else L[rows_t]
            if not record_all:
                result[:, c0:c1] = L if rows_t is None else L[rows_t]
    return result


def scores_to_log_probs(L: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-normalised diffusion mass as log-probabilities; unreached rows become uniform."""
    mass = L.sum(1, keepdim=True)
    p = torch.where(mass > 0, L / mass.clamp_min(_EPS), torch.full_like(L, 1.0 / L.shape[1]))
    return (p + eps).log() - np.log1p(eps * L.shape[1])


@dataclass(frozen=True)
class ValidationFold:
    """One leave-some-out split of the seeds: diffuse from ``train`` and score ``held_out``."""

    train: torch.Tensor
    held_out: torch.Tensor


def leave_some_out_folds(
    labels: torch.Tensor, n_folds: int, generator: torch.Generator, holdout_per_class: int = 1
) -> list[ValidationFold]:
    """Folds that hold out ``holdout_per_class`` seeds of each class; empty if some class has < 2.

    Returned indices index into the seed list. Every class keeps at least one training seed.
    """
    labels = labels.cpu()
    n_classes = int(labels.max()) + 1 if labels.numel() else 0
    counts = torch.bincount(labels, minlength=n_classes)
    if n_classes == 0 or int(counts.min()) < 2:
        return []
    folds = []
    for _ in range(n_folds):
        perm = torch.randperm(labels.numel(), generator=generator)
        lab = labels[perm]
        order = torch.argsort(lab, stable=True)
        perm, lab = perm[order], lab[order]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(labels.numel()) - starts[lab]
        h = torch.minimum(torch.full_like(counts, holdout_per_class), counts - 1)
        held = rank < h[lab]
        folds.append(ValidationFold(train=perm[~held], held_out=perm[held]))
    return folds


def select_n_iter(
    W: torch.Tensor,
    seeds: torch.Tensor,
    seed_labels: torch.Tensor,
    n_classes: int,
    folds: list[ValidationFold],
    *,
    max_iter: int = 10,
    prefer: int = 3,
    **diffuse_kw: object,
) -> tuple[int, torch.Tensor]:
    """Iteration count maximising held-out seed accuracy; ties go to the count closest to ``prefer``.

    (Held-out accuracy is flat over a range of counts on most tasks; the paper's optimum is 2-5.)
    Returns ``(best_t, accuracy_per_t)`` with ``t`` in ``1..max_iter``.
    """
    correct = torch.zeros(max_iter)
    total = 0
    for fold in folds:
        tr, ho = fold.train.to(seeds.device), fold.held_out.to(seeds.device)
        rec = diffuse(
            W,
            seeds[tr],
            seed_labels[tr],
            n_classes,
            max_iter,
            rows=seeds[ho],
            record_all=True,
            **diffuse_kw,
        )
        y = seed_labels[ho]
        reached = rec.sum(2) > 0
        pred = rec.argmax(2)
        correct += ((pred == y) & reached).sum(1).float().cpu()
        total += int(ho.numel())
    acc = correct / max(total, 1)
    distance = (torch.arange(1, max_iter + 1) - prefer).abs().float()
    key = correct - 1e-3 * distance
    return int(key.argmax()) + 1, acc


def diffuse_select(
    W: torch.Tensor,
    seeds: torch.Tensor,
    seed_labels: torch.Tensor,
    n_classes: int,
    folds: list[ValidationFold],
    *,
    max_iter: int = 10,
    prefer: int = 3,
    rows: torch.Tensor | None = None,
    norm: str = "col",
    prior: torch.Tensor | None = None,
    sinkhorn_iters: int = 5,
    gamma: float | None = None,
    n_core: int | None = None,
    budget_bytes: int = 1 << 30,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Choose the iteration count on held-out seeds *and* diffuse from all seeds, in one pass.

    The columns hold ``len(folds) + 1`` groups of ``C`` classes: group ``f`` diffuses from fold
    ``f``'s training seeds, the last group from all seeds; one sparse product per step serves
    them all (one pass per step; on CPU the product runs in column chunks, see
    :mod:`~fewshot_bench.graph.spmm`). After each step every
    fold's held-out accuracy is read off and the last group's ``rows`` are kept while the step is
    the best so far (same rule as :func:`select_n_iter`). Falls back to separate passes when
    the widened ``L`` would not fit ``budget_bytes``.

    Returns ``(best_t, held-out accuracy per t, L[rows] at best_t)``.
    """
    if not folds:
        raise ValueError("diffuse_select needs at least one validation fold")
    device = W.device
    n = W.shape[0]
    g = len(folds) + 1
    kw = {
        "norm": norm,
        "prior": prior,
        "sinkhorn_iters": sinkhorn_iters,
        "gamma": gamma,
        "n_core": n_core,
    }
    if 3 * 4 * n * g * n_classes > budget_bytes:
        best, acc = select_n_iter(
            W, seeds, seed_labels, n_classes, folds, max_iter=max_iter, prefer=prefer, **kw
        )
        return best, acc, diffuse(W, seeds, seed_labels, n_classes, best, rows=rows, **kw)
    seeds, seed_labels = seeds.to(device), seed_labels.to(device)
    parts = [
        (seeds[f.train.to(device)], seed_labels[f.train.to(device)] + i * n_classes)
        for i, f in enumerate(folds)
    ]
    parts.append((seeds, seed_labels + (g - 1) * n_classes))
    all_seeds = torch.cat([p[0] for p in parts])
    all_labels = torch.cat([p[1] for p in parts])
    held = [(seeds[f.held_out.to(device)], seed_labels[f.held_out.to(device)]) for f in folds]
    total = sum(int(h[0].numel()) for h in held)
    rows_t = None if rows is None else rows.to(device)
    correct = torch.zeros(max_iter)
    best_key, best_t, kept = -float("inf"), 0, torch.zeros(0)
    with few_threads(_small(W)):
        L = _one_hot(n, all_seeds, all_labels, 0, g * n_classes, device)
        for t in range(1, max_iter + 1):
            L = sparse_matmul(W, L)
            normalize(
                L,
                norm,
                prior=prior,
                sinkhorn_iters=sinkhorn_iters,
                gamma=gamma,
                n_core=n_core,
                groups=g,
            )
            hits = 0
            for i, (h_nodes, h_y) in enumerate(held):
                block = L[h_nodes, i * n_classes : (i + 1) * n_classes]
                hits += int(((block.argmax(1) == h_y) & (block.sum(1) > 0)).sum())
            correct[t - 1] = hits
            key = hits - 1e-3 * abs(t - prefer)
            if key > best_key:
                final = L[:, (g - 1) * n_classes :]
                best_key, best_t = key, t
                kept = (final if rows_t is None else final[rows_t]).clone()
    return best_t, correct / max(total, 1), kept
