"""TPN without meta-learning: closed-form label propagation on a Gaussian kNN graph.

Liu, Lee, Park, Kim, Yang, Hwang & Yang, "Learning to Propagate Labels: Transductive
Propagation Network for Few-shot Learning", ICLR 2019, Section 3 (graph construction and label
propagation; formulas as we know them from the paper, whose text was not available here;
``k = 20`` and ``α = 0.99`` are checked against the authors' released training commands):

- graph over every item of the task (support, unlabeled pool, queries):
  ``W_ij = exp(-d(x_i, x_j)² / (2σ²))`` with ``d`` the Euclidean distance, no self-loops;
- each row keeps its ``k`` largest weights (``k = 20`` in the paper and its released commands),
  and the graph is symmetrised: an edge stays when either end has the other among its ``k``
  nearest neighbours (the kernel itself is symmetric, so the kept weights are too);
- ``S = D^{-1/2} W D^{-1/2}`` with ``D`` the degrees;
- label propagation ``F_{t+1} = α S F_t + Y`` (``Y`` one-hot on the support, zero elsewhere)
  whose limit is the closed form ``F* = (I - α S)^{-1} Y`` (``α = 0.99`` as in the paper;
  ``I - α S`` is symmetric positive definite for ``α < 1``, so it is solved by Cholesky);
- scores: the log of the queries' rows of ``F*``, row-normalised (``F*`` is a non-negative
  label mass; its argmax is the paper's prediction. The paper's training loss takes
  ``softmax(F*)``; the row-normalised mass is used here because with a sharp kernel ``F*`` can
  be far below float32's range while its ratios are not).

**Non-meta-learned variant.** TPN meta-learns the feature embedding *and* a graph construction
network that outputs a per-example scale ``σ_i`` (the kernel uses ``d(x_i/σ_i, x_j/σ_j)``).
Here the embedding is the benchmark's frozen backbone and ``σ`` is one number per task:
``σ = sigma_scale x median pairwise distance`` between the task's items (support, pool and
queries), which makes the kernel invariant to the scale of the features. ``sigma_scale``
defaults to 0.05, a sharp kernel. Why: with ``α = 0.99`` the inverse ``(I - αS)^{-1}`` is
dominated by the leading eigenvector of ``S`` (``∝ sqrt(degree)``), so unless the graph is
nearly block-diagonal over the classes every query goes to the class whose support has the
largest degree. With ``k = 20`` on an 80-item 5-way 1-shot task (16 items per class) a
``σ`` of one median distance did exactly that (58% on Conv-4 Omniglot features against 96% for
nearest-prototype, 200 tasks; 34% vs 73% on digits). TPN's learned ``σ_i`` has to avoid this
too; the fixed rule does it by making cross-class edges negligible. 0.05 was chosen on
scikit-learn digits episodes (the grid 0.02-1 over six episode shapes: 0.035-0.1 is the good
range, below ~0.03 the kernel underflows and the graph falls apart) and then checked on
Omniglot (see ``baselines/tpn.toml``).

Edge cases: ``k`` is capped at ``n - 1`` (``n`` items); a 2-item task is one edge. A query in a
graph component without any support item gets ``F* = 0``; such a query is scored by the
nearest-class-mean softmax ``softmax(-||x - μ_c||²)`` instead of a uniform row, so its argmax is
the nearest prototype rather than class 0.

Tasks of one shape are processed as a batch of dense ``[n, n]`` matrices (float64), every
quantity (``σ``, neighbours, factorisation) per task, so a task's scores do not depend on its
batch mates. The sparse graph code of :mod:`fewshot_bench.graph` (faiss kNN, scipy LU per task)
computes the same propagation (see the tests) but one task at a time on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fewshot_bench.errors import ProtocolError
from fewshot_bench.graph.threads import SMALL_PROBLEM_NODES, few_threads
from fewshot_bench.methods.base import Method, TaskContext
from fewshot_bench.methods.batching import predict_by_shape
from fewshot_bench.methods.param_groups import NORMALIZE
from fewshot_bench.methods.params import Param
from fewshot_bench.methods.registry import register_method
from fewshot_bench.methods.simple import class_means, feature_transform
from fewshot_bench.tasks.task import Task

#: Dense float64 ``[n, n]`` entries per propagation chunk (bounds memory of a batch).
CHUNK_ENTRIES = 1 << 23
#: Default ``σ`` in units of the task's median pairwise distance (see the module docstring).
SIGMA_SCALE = 0.05
_TINY = 1e-300


def gaussian_knn_graph(x: torch.Tensor, k: int, sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """Symmetric kNN Gaussian affinities ``W`` ``[B, n, n]`` (float64) of items ``x`` ``[B, n, D]``.

    ``σ = sigma_scale * median pairwise distance`` per task; each row keeps its ``min(k, n-1)``
    nearest other items; an edge stays if either end keeps it; no self-loops."""
    x = x.to(torch.float64)
    b, n, _ = x.shape
    d2 = torch.cdist(x, x).pow(2)
    d2 = 0.5 * (d2 + d2.transpose(1, 2))  # exactly symmetric (cdist's GEMM path is not)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    if n > 1:
        iu = torch.triu_indices(n, n, 1, device=x.device)
        med = d2[:, iu[0], iu[1]].sqrt().median(dim=1).values  # [B]
        # identical items (median 0): fall back to the mean distance, then to 1
        mean = d2[:, iu[0], iu[1]].sqrt().mean(dim=1)
        sigma = torch.where(med > 0, med, torch.where(mean > 0, mean, torch.ones_like(mean)))
    else:
        sigma = torch.ones(b, dtype=torch.float64, device=x.device)
    sigma = sigma * float(sigma_scale)
    w = torch.exp(-d2 / (2.0 * sigma[:, None, None] ** 2))
    w = w.masked_fill(eye, 0.0)
    kk = min(int(k), n - 1)
    if kk <= 0:
        return torch.zeros_like(w)
    if kk < n - 1:
        nearest = d2.masked_fill(eye, float("inf")).topk(kk, dim=2, largest=False).indices
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(2, nearest, True)
        keep = keep | keep.transpose(1, 2)
        w = w * keep
    return w


def normalized_graph(w: torch.Tensor) -> torch.Tensor:
    """``S = D^{-1/2} W D^{-1/2}`` per task (isolated items get zero rows and columns)."""
    deg = w.sum(-1)
    inv = torch.where(deg > 0, deg.clamp_min(_TINY).rsqrt(), torch.zeros_like(deg))
    return inv[:, :, None] * w * inv[:, None, :]


def label_propagation(
    s: torch.Tensor, y: torch.Tensor, alpha: float, n_iter: int | None = None
) -> torch.Tensor:
    """``F`` ``[B, n, C]``: closed form ``(I - α S)^{-1} Y`` (``n_iter=None``) or ``n_iter`` steps
    of ``F <- α S F + Y`` from ``F_0 = Y`` (TPN's closed form and the iteration it solves)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    s = s.to(torch.float64)
    y = y.to(torch.float64)
    if n_iter is not None:
        f = y.clone()
        for _ in range(n_iter):
            f = alpha * (s @ f) + y
        return f
    n = s.shape[-1]
    system = torch.eye(n, dtype=s.dtype, device=s.device) - alpha * s
    chol, info = torch.linalg.cholesky_ex(system)
    if bool((info != 0).any()):  # not expected (SPD for alpha < 1); a general solve is safe
        return torch.linalg.solve(system, y)
    return torch.cholesky_solve(y, chol)


def tpn_propagate(
    x: torch.Tensor,
    support_labels: torch.Tensor,
    n_way: int,
    *,
    k: int = 20,
    alpha: float = 0.99,
    sigma_scale: float = SIGMA_SCALE,
) -> torch.Tensor:
    """``F*`` ``[B, n, n_way]`` for items ``x`` ``[B, n, D]`` whose first ``S`` rows are the
    support, labelled ``support_labels`` ``[B, S]``."""
    b, n, _ = x.shape
    w = gaussian_knn_graph(x, k, sigma_scale)
    y = torch.zeros(b, n, n_way, dtype=torch.float64, device=x.device)
    n_s = support_labels.shape[1]
    y[:, :n_s] = F.one_hot(support_labels.long(), n_way).to(torch.float64)
    return label_propagation(normalized_graph(w), y, alpha)


def predict_grouped(
    tasks: list[Task],
    ctxs: list[TaskContext],
    predict: Callable[[list[Task], torch.device], list[torch.Tensor]],
) -> list[torch.Tensor]:
    """``predict`` on chunks of same-shaped tasks (bounded by :data:`CHUNK_ENTRIES` dense
    ``[n, n]`` entries), single-threaded for small CPU graphs; refuses graphs beyond
    :data:`DENSE_MAX_NODES` items; scores in task order."""

    def solve(group: list[Task], device: torch.device) -> list[torch.Tensor]:
        n = group[0].n_items
        if n > DENSE_MAX_NODES:
            raise ProtocolError(
                f"this method builds a dense {n} x {n} graph per task (support + unlabeled pool "
                f"+ queries), beyond its limit of {DENSE_MAX_NODES} items: use a protocol with a "
                "smaller pool, or a sparse graph method (diffusion, nn-propagation) for pools "
                "this large"
            )
        with few_threads(device.type == "cpu" and n <= SMALL_PROBLEM_NODES):
            return predict(group, device)

    return predict_by_shape(tasks, ctxs, solve, chunk=lambda t: CHUNK_ENTRIES // t.n_items**2)


#: Largest task (support + pool + queries) the dense-graph methods take: a dense float64 graph
#: of 5000 items is 200 MB and its solve O(n³); a pool of every class's unlabeled items (20k)
#: would take gigabytes and hours per task.
DENSE_MAX_NODES = 5000


@register_method("tpn")
class TPN(Method):
    """TPN's label propagation (Liu et al. 2019) with a fixed-rule ``σ`` (no meta-learning).

    Graph over support ∪ unlabeled pool ∪ queries, Gaussian kernel with ``σ`` =
    ``sigma_scale`` (0.05) x the task's median pairwise distance, ``k`` nearest neighbours
    (symmetrised), label propagation in closed form; query scores are the log of the
    row-normalised rows of ``F*``. Defaults ``k = 20``, ``α = 0.99``: the paper's, as in the
    authors' released commands.
    Distractor items in the pool are ordinary unlabeled nodes (they pass on label mass).
    """

    consumes = "features"
    setting = "transductive"
    schema = {
        "normalize": NORMALIZE,
        "k": Param(20, "neighbours kept per item (capped at n - 1), then symmetrised", low=1),
        "alpha": Param(
            0.99,
            "propagation weight: F* = (I - alpha S)^-1 Y",
            low=0,
            high=1,
            open_low=True,
            open_high=True,
        ),
        "sigma_scale": Param(
            SIGMA_SCALE,
            "Gaussian bandwidth sigma = sigma_scale x median pairwise distance of the task "
            "(stands in for TPN's meta-learned per-example sigma; small = sharp kernel)",
            low=0,
            open_low=True,
        ),
    }

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        return predict_grouped(tasks, ctxs, self._predict)

    def _predict(self, tasks: list[Task], device: torch.device) -> list[torch.Tensor]:
        p = self.params
        feats, labels = [], []
        for t in tasks:
            f = feature_transform(t, p["normalize"], device)
            unl = t.unlabeled.reshape(-1, t.support.shape[1])
            feats.append(torch.cat([f(t.support), f(unl), f(t.query)]))
            labels.append(t.support_labels.to(device).long())
        x = torch.stack(feats)
        y = torch.stack(labels)
        n_way, n_q = tasks[0].n_way, tasks[0].query.shape[0]
        fstar = tpn_propagate(
            x,
            y,
            n_way,
            k=int(p["k"]),
            alpha=float(p["alpha"]),
            sigma_scale=float(p["sigma_scale"]),
        )
        mass = fstar[:, x.shape[1] - n_q :]
        total = mass.sum(-1, keepdim=True)
        probs = mass / total.clamp_min(_TINY)
        unreached = total <= 0
        if bool(unreached.any()):
            protos = class_means(x[:, : y.shape[1]].double(), y, n_way)
            d2 = torch.cdist(x[:, x.shape[1] - n_q :].double(), protos).pow(2)
            probs = torch.where(unreached, torch.softmax(-d2, -1), probs)
        scores = probs.clamp_min(_TINY).log()
        return list(scores.to(torch.float32).unbind(0))
