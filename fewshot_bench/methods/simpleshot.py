"""SimpleShot (inductive) and BD-CSPN (transductive prototype rectification), on CL2N features.

Both prepare features as SimpleShot's "CL2N" (:class:`~.feature_prep.BaseCentred`): subtract the
mean feature of the *base* classes (computed in ``fit``; ``centre`` = ``task`` or ``none`` change
that), then L2-normalise.

``simpleshot`` -- Wang, Chao, Weinberger & van der Maaten (2019), "SimpleShot: Revisiting
Nearest-Neighbor Classification for Few-Shot Learning", Sec. 3: nearest class mean under the
Euclidean distance, ``score_c(x) = -||x̂ - m_c||²`` with ``m_c`` the mean of the CL2N support
features of class ``c`` (one shot: the support item itself, i.e. the paper's nearest neighbour).

``bd-cspn`` -- Liu, Song & Qin (ECCV 2020), "Prototype Rectification for Few-Shot Learning":
a cosine-similarity nearest-prototype classifier whose prototypes are rectified with the query
set ("bias diminishing"):

- cross-class bias (Sec. 3.2): every query is shifted by ``ξ = mean(support) - mean(queries)``,
  so the shifted queries have the support's mean;
- intra-class bias (Sec. 3.1): the (shifted) queries are pseudo-labelled by the basic prototypes
  ``P_n`` (support class means); for every class the ``Z`` most confident queries predicted as
  that class join its support items, and the rectified prototype is their weighted mean
  ``P'_n = Σ_i w_i x_i`` with ``w_i = softmax_i(cos(x_i, P_n) / T)`` over those items
  (the paper's ``exp(ε cos)``, ``ε = 10``, i.e. ``T = 0.1``). A convex combination of support
  and query features; a class no query is predicted as keeps a weighted mean of its support.

Queries are then scored by ``cos(x_q, P'_n) / T`` (logits of the cosine classifier).

What the cross-class shift assumes: that the query set has the support's class proportions
(balanced queries, as in the paper's episodes), so that the only difference between the two
means is a class-independent shift. With imbalanced queries -- and always with one query, which
the shift maps onto the support mean, so every query gets the same scores -- it moves queries
across classes; ``cross_class=false`` turns it off.

Defaults: ``top_z = 8`` and ``ε = 10`` are, to our knowledge, the paper's Sec. 4 implementation
details (not re-checked against the paper here). The unlabeled pool of a semi-supervised task
is not used (the paper has none); only the ``centre="task"`` mean includes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fewshot_bench.methods.base import Scorer, TaskContext
from fewshot_bench.methods.batching import predict_by_shape
from fewshot_bench.methods.feature_prep import CENTRE, BaseCentred, centred_l2
from fewshot_bench.methods.params import Param
from fewshot_bench.methods.registry import register_method
from fewshot_bench.methods.simple import class_means
from fewshot_bench.tasks.task import Task

#: parameters of the BD-CSPN rectification, shared with LaplacianShot (which rectifies the same way)
RECTIFY_SCHEMA = {
    "cross_class": Param(
        True,
        "diminish the cross-class bias: shift the queries by mean(support) - mean(queries) "
        "(assumes queries with the support's class proportions)",
    ),
    "intra_class": Param(
        True,
        "diminish the intra-class bias: rectified prototypes from the support and the top_z "
        "most confident pseudo-labelled queries of each class",
    ),
    "top_z": Param(
        8,
        "most confident pseudo-labelled queries per class added to its support (none: all)",
        kind=int,
        low=0,
        optional=True,
    ),
    "rectify_temperature": Param(
        0.1,
        "weights of the rectified prototype: softmax(cos(x, P) / rectify_temperature)",
        low=0,
        open_low=True,
    ),
}


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[..., n, m]`` of the rows of ``x`` ``[..., n, D]`` and ``y``."""
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-1, -2)


def cross_class_shift(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Queries ``[B, Q, D]`` shifted by ``mean(support) - mean(query)`` (BD-CSPN Sec. 3.2)."""
    if query.shape[-2] == 0:
        return query
    return query + (support.mean(-2, keepdim=True) - query.mean(-2, keepdim=True))


def rectification_weights(
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    protos: torch.Tensor,
    top_z: int | None,
    temperature: float,
) -> torch.Tensor:
    """BD-CSPN Sec. 3.1: weights ``[B, C, S + Q]`` of the rectified prototypes over the items
    ``cat([support, query])``; each row is a convex combination (non-negative, sums to 1).

    Class ``n`` weighs its own support items and the ``top_z`` queries (all with ``None``) that
    the basic prototypes ``protos`` ``[B, C, D]`` predict as ``n`` with the highest confidence
    ``softmax(cos / temperature)``; weight ``∝ exp(cos(x_i, P_n) / temperature)``. A class with
    no support item (never in an episode) would get an all-zero row.
    """
    n_way, n_query = protos.shape[-2], query.shape[-2]
    member_s = F.one_hot(labels.long(), n_way).transpose(-1, -2).bool()  # [B, C, S]
    member_q = torch.zeros(*query.shape[:-2], n_way, n_query, dtype=torch.bool, device=query.device)
    k = n_query if top_z is None else min(int(top_z), n_query)
    if k > 0:
        conf, pred = torch.softmax(cosine(query, protos) / temperature, dim=-1).max(-1)  # [B, Q]
        is_pred = F.one_hot(pred, n_way).bool()  # [B, Q, C]
        score = torch.where(is_pred, conf.unsqueeze(-1), torch.full_like(conf, -1.0)[..., None])
        vals, idx = score.topk(k, dim=-2)  # [B, k, C]: best queries per class
        chosen = torch.zeros_like(is_pred).scatter_(-2, idx, vals >= 0)
        member_q = chosen.transpose(-1, -2)
    member = torch.cat([member_s, member_q], dim=-1)  # [B, C, S + Q]
    items = torch.cat([support, query], dim=-2)
    logits = (cosine(protos, items) / temperature).masked_fill(~member, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.where(member.any(-1, keepdim=True), weights, torch.zeros_like(weights))


def rectify(
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    n_way: int,
    params: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted queries and prototypes ``[B, C, D]`` of BD-CSPN for batched CL2N features
    (``support`` ``[B, S, D]``, ``labels`` ``[B, S]``, ``query`` ``[B, Q, D]``), as the
    ``cross_class`` / ``intra_class`` / ``top_z`` / ``rectify_temperature`` params say."""
    protos = class_means(support, labels.long(), n_way)
    if params["cross_class"]:
        query = cross_class_shift(support, query)
    if params["intra_class"] and query.shape[-2] > 0:
        w = rectification_weights(
            support, labels, query, protos, params["top_z"], float(params["rectify_temperature"])
        )
        protos = w @ torch.cat([support, query], dim=-2)
    return query, protos


def prepared_batch(
    method: BaseCentred, tasks: list[Task], *, with_queries: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CL2N support ``[B, S, D]``, labels ``[B, S]`` and queries ``[B, Q, D]`` of same-shaped
    tasks, each centred on its own centre vector."""
    sup, lab, qry = [], [], []
    for t in tasks:
        c = method.prepare(t, with_queries=with_queries).to(t.support.device)
        sup.append(centred_l2(t.support, c).to(dtype))
        qry.append(centred_l2(t.query.reshape(-1, *t.support.shape[1:]), c).to(dtype))
        lab.append(t.support_labels.to(t.support.device).long())
    return torch.stack(sup), torch.stack(lab), torch.stack(qry)


@register_method("simpleshot")
class SimpleShot(BaseCentred):
    """SimpleShot (Wang et al. 2019): CL2N features, nearest class mean, Euclidean distance.

    Inductive: the scorer depends on the support (and, with ``centre="task"``, the unlabeled
    pool) only; each query is scored alone by ``-||x̂ - m_c||²``.
    """

    setting = "inductive"
    rowwise_scorer = True
    schema = {"centre": CENTRE}

    def fit_task(self, task: Task, ctx: TaskContext) -> Scorer:
        device = task.support.device
        centre = self.prepare(task, with_queries=False).to(device)
        labels = task.support_labels.to(device).long()
        protos = class_means(centred_l2(task.support, centre), labels, task.n_way)

        def score(query: torch.Tensor) -> torch.Tensor:
            q = centred_l2(query.to(device).reshape(-1, protos.shape[-1]), centre)
            return -(q.unsqueeze(-2) - protos).pow(2).sum(-1)

        return score


@register_method("bd-cspn")
class BDCSPN(BaseCentred):
    """BD-CSPN (Liu, Song & Qin 2020): cosine nearest prototype with prototypes rectified on the
    query set (cross-class shift, then weighted support + top-Z pseudo-labelled queries).

    With ``cross_class = intra_class = false`` it is the cosine nearest-prototype classifier on
    CL2N features. See the module docstring for the equations and what the shift assumes.
    """

    setting = "transductive"
    schema = {"centre": CENTRE, **RECTIFY_SCHEMA}

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        return predict_by_shape(tasks, ctxs, self._solve)

    def _solve(self, group: list[Task], device: torch.device) -> list[torch.Tensor]:
        """Scores of same-shaped tasks (each rectified on its own queries)."""
        sup, lab, qry = prepared_batch(self, group, with_queries=True, dtype=torch.float64)
        qry, protos = rectify(sup, lab, qry, group[0].n_way, self.params)
        return list((cosine(qry, protos) / float(self.params["rectify_temperature"])).float())
