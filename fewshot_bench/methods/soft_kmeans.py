"""Semi-supervised Prototypical Networks of Ren et al. (2018), "Meta-learning for
semi-supervised few-shot classification": prototypes refined with the task's unlabeled items.

All three start from support class means ``p_c`` of a ProtoNet embedding ``h`` and refine them
with soft assignments ``z̃_jc`` of the unlabeled items ``x̃_j``::

    p̃_c = (Σ_i h(x_i) z_ic + Σ_j h(x̃_j) z̃_jc m_jc) / (Σ_i z_ic + Σ_j z̃_jc m_jc)

- ``soft-kmeans``: ``z̃_jc = softmax_c(−‖h(x̃_j) − p_c‖²)``, ``m = 1``;
- ``soft-kmeans-cluster``: one more cluster for distractors, its prototype at the origin with a
  learned radius ``r`` (the others have ``r = 1``): logits ``−‖h − p_c‖²/r_c² − log r_c``;
- ``masked-soft-kmeans``: ``m_jc = σ(−γ_c (d̃_jc − β_c))`` with ``d̃_jc`` the squared distance
  normalised by its mean over the unlabeled items, and ``(β_c, γ_c)`` given by a small MLP
  (20 hidden units) of the min, max, variance, skewness and kurtosis of ``d̃_{·c}``.

Training: ``fit`` is ProtoNet's episodic training; with ``train_unlabeled > 0`` the training
episodes carry that many unlabeled items per class plus ``train_distractors`` distractor classes
and the loss is computed with the refined prototypes, so the backbone, the radius and the mask
MLP are learned end to end as in the paper. With ``train_unlabeled = 0`` (or ``init`` = a
ProtoNet state and ``steps = 0``) the refinement is applied at test time only; the radius then
stays at ``radius_init`` and the MLP outputs the fixed ``(mask_threshold, mask_slope)``
everywhere (its last layer starts at zero weights with that bias) — a documented simplification
of the learned masking. ``refine_steps`` refinement iterations (the paper uses one).

The fixed defaults were read off a trained Conv-4 ProtoNet on 5-way episodes of Omniglot's
Vinyals *validation* classes (5 unlabeled per class, 5 distractor classes): squared distances
of unlabeled items to their own prototype ≈ 6, to the nearest prototype for distractors ≈ 15,
‖h‖² ≈ 78, so ``radius_init = 3`` puts the distractor logit (≈ −9.8) between the two; the
normalised distances d̃ are ≈ 0.3 (own class) and ≈ 1.05 (distractors), so
``mask_threshold = 0.6``, ``mask_slope = 10`` keeps ≈ 96% of the former and ≈ 1% of the latter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fewshot_bench.methods.episodic import prototypes, sq_distances
from fewshot_bench.methods.params import Param, Schema, grouped
from fewshot_bench.methods.protonet import ProtoNet
from fewshot_bench.methods.registry import register_method

SEMI_SCHEMA: Schema = {
    **ProtoNet.schema,
    **grouped(
        "semi-supervised",
        {
            "refine_steps": Param(1, "soft k-means refinements of the prototypes", low=0),
            "train_unlabeled": Param(5, "unlabeled items per class in training episodes", low=0),
            "train_distractors": Param(5, "distractor classes in training episodes", low=0),
        },
    ),
}


def refine_prototypes(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    unlabeled: torch.Tensor,
    protos: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``p̃_c`` above: ``weights`` ``[B, U, C]`` = ``z̃ · m`` of the unlabeled items."""
    n_way = protos.shape[-2]
    onehot = nn.functional.one_hot(support_labels, n_way).to(support.dtype)  # [B, S, C]
    num = onehot.transpose(-1, -2) @ support + weights.transpose(-1, -2) @ unlabeled
    den = onehot.sum(-2) + weights.sum(-2)  # [B, C]
    return num / den.clamp_min(1e-8).unsqueeze(-1)


class _SemiProtoNet(ProtoNet):
    """Shared scoring: ``refine_steps`` refinements, then ProtoNet's distance scores."""

    setting = "semi-supervised"
    schema = SEMI_SCHEMA
    uses_unlabeled = True

    def unlabeled_weights(
        self, unlabeled: torch.Tensor, protos: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def refine(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        unlabeled: torch.Tensor,
        n_way: int,
    ) -> torch.Tensor:
        """Prototypes ``[B, C, D]`` after ``refine_steps`` soft k-means steps."""
        protos = prototypes(support, support_labels, n_way)
        if unlabeled.shape[-2] == 0:
            return protos
        for _ in range(int(self.params["refine_steps"])):
            w = self.unlabeled_weights(unlabeled, protos)
            protos = refine_prototypes(support, support_labels, unlabeled, protos, w)
        return protos

    def class_prototypes(
        self, support: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        return self.refine(support, labels, unlabeled, n_way)


@register_method("soft-kmeans")
class SoftKMeans(_SemiProtoNet):
    """ProtoNet prototypes refined by soft k-means over the unlabeled items (Ren et al. 2018)."""

    def unlabeled_weights(self, unlabeled: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        return torch.softmax(-sq_distances(unlabeled, protos), dim=-1)


class DistractorRadius(nn.Module):
    """The learned log-radius of the distractor cluster (its prototype is the origin)."""

    def __init__(self, radius: float) -> None:
        super().__init__()
        self.log_radius = nn.Parameter(torch.tensor(math.log(radius)))


@register_method("soft-kmeans-cluster")
class SoftKMeansCluster(_SemiProtoNet):
    """Soft k-means with an extra distractor cluster at the origin of learned radius (Ren et al.)."""

    schema = {
        **SEMI_SCHEMA,
        "radius_init": Param(3.0, "initial distractor-cluster radius", low=0, open_low=True),
    }

    def build_extra(self) -> nn.Module:
        return DistractorRadius(float(self.params["radius_init"]))

    def unlabeled_weights(self, unlabeled: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        assert self.extra is not None
        log_r = self.extra.log_radius
        logits = -sq_distances(unlabeled, protos)  # r_c = 1: -d - log 1
        dist0 = unlabeled.pow(2).sum(-1, keepdim=True)  # distance to the origin
        logits0 = -dist0 * torch.exp(-2 * log_r) - log_r
        z = torch.softmax(torch.cat([logits, logits0], dim=-1), dim=-1)
        return z[..., :-1]


def distance_statistics(d: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min, max, variance, skewness and excess kurtosis over the items (dim −2): ``[B, C, 5]``."""
    mean = d.mean(-2, keepdim=True)
    centred = d - mean
    var = centred.pow(2).mean(-2)
    std = var.clamp_min(eps).sqrt()
    skew = centred.pow(3).mean(-2) / std.pow(3)
    kurt = centred.pow(4).mean(-2) / std.pow(4) - 3.0
    return torch.stack([d.amin(-2), d.amax(-2), var, skew, kurt], dim=-1)


class MaskMLP(nn.Module):
    """Distance statistics → (threshold β, slope γ) per cluster; starts at the fixed pair."""

    def __init__(self, threshold: float, slope: float, hidden: int = 20) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[2].weight)
        with torch.no_grad():
            self.net[2].bias.copy_(torch.tensor([threshold, slope]))

    def forward(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(stats)
        return out[..., 0], out[..., 1]


@register_method("masked-soft-kmeans")
class MaskedSoftKMeans(_SemiProtoNet):
    """Soft k-means whose unlabeled contributions are masked by per-cluster thresholds (Ren et al.)."""

    schema = {
        **SEMI_SCHEMA,
        "mask_threshold": Param(0.6, "initial soft-mask threshold on normalised distances"),
        "mask_slope": Param(10.0, "initial soft-mask slope", low=0, open_low=True),
    }

    def build_extra(self) -> nn.Module:
        return MaskMLP(float(self.params["mask_threshold"]), float(self.params["mask_slope"]))

    def unlabeled_weights(self, unlabeled: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        assert self.extra is not None
        d = sq_distances(unlabeled, protos)  # [B, U, C]
        z = torch.softmax(-d, dim=-1)
        d_norm = d / d.mean(-2, keepdim=True).clamp_min(1e-8)
        beta, gamma = self.extra(distance_statistics(d_norm))  # [B, C] each
        mask = torch.sigmoid(-gamma.unsqueeze(-2) * (d_norm - beta.unsqueeze(-2)))
        return z * mask
