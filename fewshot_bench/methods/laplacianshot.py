"""LaplacianShot -- Ziko, Dolz, Granger & Ben Ayed (ICML 2020), "Laplacian Regularized Few-Shot
Learning": transductive inference by bound optimisation of a Laplacian-regularised assignment.

Features are CL2N (:class:`~.feature_prep.BaseCentred`: minus the base-class mean, then L2). The
prototypes ``m_c`` are the support class means, rectified as the paper does following BD-CSPN
(Liu et al.; :func:`~.simpleshot.rectify`: cross-class shift of the queries, then a weighted
mean of the support and the pseudo-labelled queries of each class). The queries' assignments
``Y = [y_q]`` (rows on the simplex) minimise the relaxed objective with an entropy barrier::

    E(Y) = Σ_q y_qᵀ a_q  −  (λ/2) Σ_{q,p} w_qp y_qᵀ y_p  +  Σ_q y_qᵀ log y_q

with the unary term ``a_q,c = ||x_q − m_c||²`` and the binary kNN affinity ``w_qp`` among the
queries (``knn`` nearest neighbours by Euclidean distance, self excluded, symmetrised as
``(W + Wᵀ)/2`` -- the Laplacian ``Σ w_qp ||y_q − y_p||²`` only sees that part). Linearising the
concave pairwise term at the current ``Yⁱ`` gives the paper's bound, minimised in closed form
independently for every query (its eq. of the bound updates)::

    y_qⁱ⁺¹ ∝ exp(−a_q + λ Σ_p w_qp y_pⁱ),      starting from y_q⁰ = softmax(−a_q).

Why ``λ/2``: the update's gradient term ``λ W Y`` is the derivative of ``(λ/2) tr(Yᵀ W Y)``, so
``E`` above is the function this update majorises (from the paper's ``(λ/2) L(Y)`` with
``L = ½ Σ w ||y_q − y_p||²``). ``−λ Σ w y_qᵀ y_p`` (as the authors' released energy code
writes it) is not what this update majorises: no descent guarantee holds for it, and the update's
fixed points are not its stationary points.

Monotonicity: with ``Δ = Yⁱ⁺¹ − Yⁱ`` one has ``E(Yⁱ⁺¹) ≤ E(Yⁱ) − (1 − λ|μ_min(W)|/2) ||Δ||²``
(Pinsker on the entropy), so ``E`` cannot increase when ``W`` is positive semi-definite (the
paper's assumption) or ``λ |μ_min(W)| ≤ 2``. A kNN affinity is indefinite; in the rare case a
full step would increase ``E`` the step is halved until it does not (``Δ`` is always a descent
direction of ``E``), so the objective never increases; :func:`bound_optimise` returns the trace.
Each task stops on its own at ``|ΔE| ≤ tol · max(|E|, 1)`` or after ``max_iter`` updates.

Defaults: ``knn = 3`` (the paper's neighbourhood size); ``λ`` is validated per data set and
backbone in the paper; ``lam = 0.5`` is the authors' released default, in the middle of their
validation grid 0.1..1.0 (not re-checked against the paper's text here). ``max_iter = 20`` and
``tol = 1e-6`` (relative change of ``E``). Edge cases: one query has no neighbour (``W = 0``,
``Y = softmax(−a)``); ``knn`` is capped at ``Q − 1``. The cross-class shift of the
rectification assumes balanced queries (see :mod:`.simpleshot`); ``cross_class=false`` or
``intra_class=false`` turn the two halves off. The unlabeled pool is not used.
"""

from __future__ import annotations

import torch

from fewshot_bench.methods.base import TaskContext
from fewshot_bench.methods.batching import same_shape_groups
from fewshot_bench.methods.feature_prep import CENTRE, BaseCentred
from fewshot_bench.methods.params import Param
from fewshot_bench.methods.registry import register_method
from fewshot_bench.methods.simpleshot import RECTIFY_SCHEMA, prepared_batch, rectify
from fewshot_bench.tasks.task import Task

#: step halvings tried when a full bound update would increase the objective
MAX_HALVINGS = 30


def knn_affinity(x: torch.Tensor, knn: int) -> torch.Tensor:
    """Symmetrised binary kNN affinity ``(W + Wᵀ)/2`` ``[B, Q, Q]`` of the rows of ``x``
    ``[B, Q, D]`` (Euclidean, self excluded, ``k = min(knn, Q - 1)``; all zero when Q = 1)."""
    n = x.shape[-2]
    w = torch.zeros(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    k = min(int(knn), n - 1)
    if k <= 0:
        return w
    d = torch.cdist(x, x)
    d.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    idx = d.topk(k, dim=-1, largest=False).indices
    w.scatter_(-1, idx, 1.0)
    return (w + w.transpose(-1, -2)) / 2


def laplacian_energy(
    y: torch.Tensor, unary: torch.Tensor, w: torch.Tensor, lam: float
) -> torch.Tensor:
    """``E(Y)`` of the module docstring per task: ``[B]`` from ``y``/``unary`` ``[B, Q, C]``
    and the symmetric affinity ``w`` ``[B, Q, Q]``."""
    pairwise = (y * (w @ y)).sum((-2, -1))
    return (y * unary).sum((-2, -1)) - 0.5 * lam * pairwise + torch.xlogy(y, y).sum((-2, -1))


def bound_optimise(
    unary: torch.Tensor, w: torch.Tensor, lam: float, max_iter: int = 20, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """LaplacianShot's bound updates for a batch of tasks (each stops on its own).

    Returns the assignments ``Y`` ``[B, Q, C]`` and the trace of ``E`` ``[B, max_iter + 1]``
    (``E(Y⁰)`` first; NaN after a task stopped), which never increases along a task's row.
    """
    b = unary.shape[0]
    y = torch.softmax(-unary, dim=-1)
    energy = laplacian_energy(y, unary, w, lam)
    trace = torch.full((b, max_iter + 1), float("nan"), dtype=unary.dtype, device=unary.device)
    trace[:, 0] = energy
    active = torch.ones(b, dtype=torch.bool, device=unary.device)
    for it in range(1, max_iter + 1):
        target = torch.softmax(-unary + lam * (w @ y), dim=-1)
        step = target - y
        t = torch.ones(b, dtype=unary.dtype, device=unary.device)
        new_y, new_e = target, laplacian_energy(target, unary, w, lam)
        slack = 1e-12 * energy.abs().clamp_min(1.0)
        worse = active & (new_e > energy + slack)
        for _ in range(MAX_HALVINGS):  # only where the kNN affinity's indefiniteness bites
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
            cand = y + t[:, None, None] * step
            cand_e = laplacian_energy(cand, unary, w, lam)
            new_y = torch.where(worse[:, None, None], cand, new_y)
            new_e = torch.where(worse, cand_e, new_e)
            worse = worse & (cand_e > energy + slack)
        moved = active & ~worse
        y = torch.where(moved[:, None, None], new_y, y)
        done = (energy - new_e).abs() <= tol * energy.abs().clamp_min(1.0)
        energy = torch.where(moved, new_e, energy)
        trace[:, it] = torch.where(active, energy, trace[:, it])
        active = active & moved & ~done
        if not bool(active.any()):
            break
    return y, trace


@register_method("laplacianshot")
class LaplacianShot(BaseCentred):
    """LaplacianShot (Ziko et al. 2020): unary distances to rectified CL2N prototypes plus a kNN
    Laplacian over the queries, minimised by closed-form bound updates; scores are ``log Y``."""

    setting = "transductive"
    schema = {
        "centre": CENTRE,
        "knn": Param(3, "neighbours per query in the kNN affinity (capped at Q - 1)", low=1),
        "lam": Param(0.5, "weight λ of the Laplacian term", low=0),
        "max_iter": Param(20, "bound updates at most", low=1),
        "tol": Param(1e-6, "stop when |ΔE| <= tol * max(|E|, 1)", low=0),
        **RECTIFY_SCHEMA,
        "top_z": Param(
            None,
            "most confident pseudo-labelled queries per class in the rectified prototype "
            "(none: every query predicted as that class)",
            kind=int,
            low=0,
        ),
    }

    def solve(
        self, tasks: list[Task], ctxs: list[TaskContext]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Scores ``log Y`` ``[Q, n_way]`` and the objective trace (finite entries only) per task."""
        scores: list[torch.Tensor | None] = [None] * len(tasks)
        traces: list[torch.Tensor | None] = [None] * len(tasks)
        p = self.params
        lam = float(p["lam"])
        for idx in same_shape_groups(tasks, ctxs):
            group = [tasks[i] for i in idx]
            sup, lab, qry = prepared_batch(self, group, with_queries=True, dtype=torch.float64)
            qry, protos = rectify(sup, lab, qry, group[0].n_way, p)
            unary = torch.cdist(qry, protos).pow(2)  # [B, Q, C]
            w = knn_affinity(qry, int(p["knn"]))
            y, trace = bound_optimise(unary, w, lam, int(p["max_iter"]), float(p["tol"]))
            logy = y.clamp_min(torch.finfo(y.dtype).tiny).log().float()
            for j, i in enumerate(idx):
                scores[i] = logy[j]
                traces[i] = trace[j][~trace[j].isnan()]
        return scores, traces  # type: ignore[return-value]

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        return self.solve(tasks, ctxs)[0]
