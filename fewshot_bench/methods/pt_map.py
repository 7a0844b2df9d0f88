"""PT-MAP (Hu, Gripon and Pateux, "Leveraging the Feature Distribution in Transfer-based Few-Shot
Learning", ICANN 2021; arXiv 2006.03806): power transform, then MAP estimation of the class
centres with Sinkhorn-mapped query assignments.

1. **Power transform** (PT): ``f(v) = (v + ε)^β / ‖(v + ε)^β‖₂`` with ``β = 0.5``, ``ε = 1e-6``
   (:func:`~fewshot_bench.methods.feature_prep.power_transform`; features with negative entries
   are shifted by their row minimum first). The authors' released evaluation then expresses the
   task's ``N = S + Q`` vectors in an orthonormal basis of their span when ``N < D`` (QR
   reduction: an isometry, distances unchanged, only faster; ``qr_reduction``) and centres the
   support and the queries each on its own mean before a second L2 normalisation
   (``centring = "split"``; ``"joint"``: one mean over support and queries; ``"none"``).
2. **MAP estimation**: class centres ``μ_k`` start at the support means; ``n_steps`` times, the
   queries' soft assignments come from the entropy-regularised optimal transport (the
   Sinkhorn mapping) between the queries (mass 1 each) and the classes (mass ``Q / n_way`` each)::

       M* = argmax_{M ∈ U(1_Q, (Q/n_way) 1_n_way)} −Σ_ij M_ij ‖x_i − μ_j‖² + (1/λ) H(M)

   i.e. ``M*_ij = exp(f_i + g_j − λ ‖x_i − μ_j‖²)`` (:func:`sinkhorn`); each centre moves by
   ``μ_k ← μ_k + α (μ̂_k − μ_k)`` towards ``μ̂_k``, the mean of the support items of class ``k``
   (weight 1) and of all queries (weight ``M*_ik``). The queries are scored by the final
   mapping: ``log M*`` (rows sum to 1).

Defaults (the authors' released evaluation ``test_standard.py`` of yhu01/PT-MAP, which the
paper's Sec. 3 describes): ``β = 0.5``, ``λ = 10``, ``α = 0.2``, 20 steps, the mapping solved to a
marginal error of ``1e-6``. On L2-normalised features all squared distances lie in [0, 4], so
``λ = 10`` means the same for 64-d Conv-4 features as for 640-d WRN features.

The mapping is the fixed point of Sinkhorn's alternating row/column scalings, which the authors
iterate (at most 1000 times). Here it is computed by Newton's method on the same problem
(:func:`sinkhorn`): on real episodes the scalings often need more than 1000 iterations to bring
the marginals within 1e-5 (PT-MAP's later steps, where the uniform class masses disagree with
the query clusters), Newton a few steps, so the result is the exact mapping, ~10x faster.

**Assumption**: the Sinkhorn mapping gives every class the same query mass ``Q / n_way``, i.e. it
assumes *balanced* queries (the paper's setting). With imbalanced queries (a class with no
query, ``Q < n_way``) the mapping still exists (the marginals are feasible for any ``Q >= 1``) and
is computed without underflow (log domain, float64), but it forces mass onto classes that have
no query; with a single query the mapping is uniform (no information: every class gets 1 /
n_way of it). The unlabeled pool of a task is not used (the paper has none).

Every step works on a batch of same-shaped tasks at once; each task has its own stopping and
line search in the mapping (a finished task leaves the working batch), so a task's scores do
not depend on its batch mates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot_bench.methods.base import Method, TaskContext
from fewshot_bench.methods.batching import predict_by_shape
from fewshot_bench.methods.feature_prep import power_transform
from fewshot_bench.methods.params import Param
from fewshot_bench.methods.registry import register_method
from fewshot_bench.methods.simple import class_means
from fewshot_bench.tasks.task import Task

#: Sinkhorn sweeps (column scalings) before the Newton steps of :func:`sinkhorn`.
SWEEPS = 3
#: Largest change of a column potential in one Newton step (nats).
MAX_STEP = 20.0


def sinkhorn(
    cost: torch.Tensor,
    lam: float,
    col_mass: torch.Tensor | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Sinkhorn mapping of a batch of cost matrices ``[B, n, m]``: the entropic optimal
    transport plan ``M_ij = exp(f_i + g_j − λ cost_ij)`` whose rows sum to 1 and whose columns
    sum to ``col_mass`` ``[B, m]`` (default ``n / m`` each: uniform class marginals; the masses
    must add up to ``n``). Returns ``(log M, g)`` in float64; ``g`` ``[B, m]`` (the column
    potential) may be given back as ``init`` to warm-start a call on a nearby cost.

    Solved by Newton's method on the semi-dual, the same fixed point Sinkhorn's alternating
    row/column scalings converge to. With ``f`` eliminated (each row a softmax over the
    classes, so the rows sum to 1 exactly), ``g`` minimises the convex
    ``ψ(g) = Σ_i logsumexp_j(g_j − λ cost_ij) − Σ_j c_j g_j``, whose gradient is the column-sum
    error ``s − c`` and whose Hessian ``diag(s) − Mᵀ M`` is only ``m × m``. Sinkhorn's scalings
    are coordinate steps on this problem and need hundreds to thousands of iterations (more
    than the authors' cap of 1000) when the uniform class masses disagree with the clusters of
    the queries (the usual case in PT-MAP's later steps); Newton needs a few. Each task stops on
    its own once every column sum is within ``tol`` of its mass (at most ``max_iter`` steps,
    after :data:`SWEEPS` Sinkhorn sweeps; each step with its own backtracking line search and
    at most :data:`MAX_STEP` nats per coordinate) and leaves the working batch. Everything is
    in the log domain: no entry underflows to 0 and nothing divides 0 by 0, whatever ``λ`` or
    the costs (a nearly unregularised ``λ`` of 1e4 or more on costs spread over [0, 4] may not
    reach ``tol`` within ``max_iter`` steps; the rows still sum to 1 and all is finite).
    """
    a = -lam * cost.to(torch.float64)
    b, n, m = a.shape
    dev = a.device
    if col_mass is None:
        c = torch.full((b, m), n / m, dtype=torch.float64, device=dev)
    else:
        c = col_mass.to(torch.float64)
    g = torch.zeros(b, m, dtype=torch.float64, device=dev) if init is None else init.double()
    g_out = torch.empty_like(g)
    full = a
    idx = torch.arange(b, device=dev)
    eye = torch.eye(m, dtype=torch.float64, device=dev)

    def psi(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(a + g.unsqueeze(1), 2).sum(1) - (c * g).sum(1)

    # a few Sinkhorn sweeps first (each sets every column's mass exactly, given the rows): they
    # bring a class far from every query to the right scale at once
    log_c = c.clamp_min(torch.finfo(torch.float64).tiny).log()
    for _ in range(SWEEPS):
        log_s = (a + g.unsqueeze(1)).log_softmax(2).logsumexp(1)  # log column sums
        g = g + log_c - log_s
    val = psi(a, g, c)
    for it in range(max_iter + 1):
        mass = (a + g.unsqueeze(1)).softmax(2)  # [B, n, m], rows sum to 1
        s = mass.sum(1)
        grad = s - c
        done = grad.abs().amax(1) <= tol
        if it == max_iter:
            done[:] = True
        if not bool(done.all()):
            hess = torch.diag_embed(s) - mass.transpose(1, 2) @ mass
            hess = hess + (1e-12 * (1.0 + s.amax(1))).view(-1, 1, 1) * eye
            chol, info = torch.linalg.cholesky_ex(hess)
            step = -torch.cholesky_solve(grad.unsqueeze(2), chol).squeeze(2)
            bad = info > 0  # not positive definite after rounding: a scaled gradient step
            step = torch.where(bad.unsqueeze(1), -grad / hess.diagonal(dim1=1, dim2=2), step)
            step = step / (step.abs().amax(1) / MAX_STEP).clamp_min(1.0).unsqueeze(1)
            dec = (grad * step).sum(1)  # < 0: predicted change of ψ per unit step
            t = torch.ones_like(val)
            searching = ~done
            moved = torch.zeros_like(done)
            for _ in range(30):
                cand = g + t.unsqueeze(1) * step
                new = psi(a, cand, c)
                ok = searching & ((new <= val + 1e-4 * t * dec) | (dec.abs() < 1e-13))
                g = torch.where(ok.unsqueeze(1), cand, g)
                val = torch.where(ok, new, val)
                moved |= ok
                searching &= ~ok
                if not bool(searching.any()):
                    break
                t = torch.where(searching, t / 2, t)
            done |= ~moved  # no progress possible (rounding): keep the last iterate
        if bool(done.any()):  # finished tasks leave the working batch
            g_out[idx[done]] = g[done]
            keep = ~done
            idx, a, c, g, val = idx[keep], a[keep], c[keep], g[keep], val[keep]
            if not idx.numel():
                break
    return (full + g_out.unsqueeze(1)).log_softmax(2), g_out


def sq_dist(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[B, n, C]`` of rows ``x`` ``[B, n, D]`` to ``mu`` ``[B, C, D]``."""
    d = x.pow(2).sum(-1, keepdim=True) - 2 * x @ mu.transpose(1, 2) + mu.pow(2).sum(-1).unsqueeze(1)
    return d.clamp_min(0)


@register_method("pt-map")
class PTMap(Method):
    """PT-MAP (Hu, Gripon and Pateux 2021): power transform, then class centres estimated with
    Sinkhorn-mapped queries; see the module docstring. Assumes balanced queries (uniform class
    marginals of the Sinkhorn mapping)."""

    consumes = "features"
    setting = "transductive"
    schema = {
        "beta": Param(0.5, "power of the power transform (v + 1e-6)^beta", low=0, open_low=True),
        "qr_reduction": Param(
            True, "express the task in an orthonormal basis of its span when n_items < dim (exact)"
        ),
        "centring": Param(
            "split",
            "after the power transform: split (support and queries each centred on its own mean, "
            "then L2, as the authors' evaluation), joint (one mean over both) or none",
            choices=("split", "joint", "none"),
        ),
        "lam": Param(
            10.0,
            "λ of the Sinkhorn mapping M ∝ exp(−λ ‖x − μ‖²) (larger: sharper assignments)",
            low=0,
            open_low=True,
        ),
        "centre_lr": Param(
            0.2, "α, step of the centre update μ ← μ + α (μ̂ − μ)", low=0, high=1, open_low=True
        ),
        "n_steps": Param(20, "MAP steps (Sinkhorn mapping + centre update)", low=0),
        "sinkhorn_tol": Param(
            1e-6,
            "the mapping is solved until every class's mass is within this of Q / n_way",
            low=0,
            open_low=True,
        ),
        "sinkhorn_max_iter": Param(100, "Newton steps of the mapping at most", low=1),
    }

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        return predict_by_shape(tasks, ctxs, self._map)

    def transform(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The preprocessed items ``[B, S + Q, D']`` of a batch (support rows first)."""
        n_s = support.shape[1]
        x = power_transform(torch.cat([support, query], 1), float(self.params["beta"]))
        n, dim = x.shape[1:]
        if self.params["qr_reduction"] and n < dim:
            # x = Rᵀ Qᵀ with Q orthonormal: Rᵀ keeps every inner product of the rows
            x = torch.linalg.qr(x.transpose(1, 2)).R.transpose(1, 2)
        mode = self.params["centring"]
        if mode == "split":
            s, q = x[:, :n_s], x[:, n_s:]
            x = torch.cat([s - s.mean(1, keepdim=True), q - q.mean(1, keepdim=True)], 1)
        elif mode == "joint":
            x = x - x.mean(1, keepdim=True)
        return F.normalize(x, dim=-1)

    def _map(self, tasks: list[Task], device: torch.device) -> list[torch.Tensor]:
        """Query scores ``log M*`` of same-shaped ``tasks``."""
        p = self.params
        n_way = tasks[0].n_way
        support = torch.stack([t.support for t in tasks]).to(device, torch.float32)
        query = torch.stack([t.query for t in tasks]).to(device, torch.float32)
        y_s = torch.stack([t.support_labels for t in tasks]).to(device).long()
        x = self.transform(support, query)
        n_s = support.shape[1]
        x_s, x_q = x[:, :n_s], x[:, n_s:]
        onehot = F.one_hot(y_s, n_way).to(x.dtype)
        mu = class_means(x_s, y_s, n_way)
        lam, alpha = float(p["lam"]), float(p["centre_lr"])
        opts = {"tol": float(p["sinkhorn_tol"]), "max_iter": int(p["sinkhorn_max_iter"])}
        g = None  # column potentials, carried from one mapping to the next (warm start)
        for _ in range(int(p["n_steps"])):
            log_m, g = sinkhorn(sq_dist(x_q, mu), lam, **opts, init=g)
            mask = torch.cat([onehot, log_m.exp().to(x.dtype)], 1)  # [B, S + Q, C]
            est = mask.transpose(1, 2) @ x / mask.sum(1).clamp_min(1e-12).unsqueeze(-1)
            mu = mu + alpha * (est - mu)
        log_m, _ = sinkhorn(sq_dist(x_q, mu), lam, **opts, init=g)
        return list(log_m.to(torch.float32).unbind(0))
