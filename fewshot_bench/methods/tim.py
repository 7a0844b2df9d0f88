"""TIM-GD: Transductive Information Maximization (Boudiaf, Ziko, Rony, Dolz, Piantanida and
Ben Ayed, "Information Maximization for Few-Shot Learning", NeurIPS 2020), gradient-descent solver.

A softmax classifier with one weight vector ``w_k`` per class on frozen, L2-normalised features
``z`` (the paper's "L2N"; ``normalize = "center-l2"`` or ``"none"`` are offered as well)::

    p_ik = softmax_k(−‖z_i − w_k‖² / (2 T))                   (the paper's τ/2 · ‖·‖², τ = 1/T)

is initialised at the class prototypes (support means) and fitted to the task by minimising

    L(W) = λ · CE(support) − (w_m · H(Ŷ_Q) − α · H(Y_Q | X_Q))

with ``CE`` the support cross-entropy (mean over the support), ``H(Ŷ_Q) = −Σ_k p̄_k log p̄_k``
the entropy of the mean query prediction ``p̄_k = (1/|Q|) Σ_i p_ik`` (marginal entropy) and
``H(Y_Q|X_Q) = −(1/|Q|) Σ_i Σ_k p_ik log p_ik`` (conditional entropy): the paper's loss
``λ·CE − Î_α(X_Q; Y_Q)`` with ``Î_α = H(Ŷ_Q) − α H(Y_Q|X_Q)``. TIM-GD runs ``iterations``
full-batch Adam steps on ``W`` and scores the queries with the final classifier (log-probs).

Defaults (the authors' released configuration, mboudiaf/TIM ``src/tim.py``,
``scripts/evaluate/tim_gd`` and ``src/eval.py``, which the paper's experiments use): ``T = 1/15`` (τ = 15), ``λ = 0.1``, ``w_m = 1``,
``α = 0.1``, Adam with learning rate ``1e-4`` for 1000 iterations, features L2-normalised without
centring (the released evaluation's default ``norms_types = ["L2N"]``). On L2-normalised
features the squared distances lie in [0, 4], so ``τ = 15`` gives logits spanning ≤ 30 nats
whatever the feature dimension (no rescaling needed for 64-d Conv-4 features).

**Assumption**: maximising the marginal entropy ``H(Ŷ_Q)`` pushes the predicted class
proportions of the queries towards uniform, i.e. it assumes *balanced* query sets (as in the
paper's benchmarks). On imbalanced queries (some classes with few or no queries, or ``Q <
n_way``) the term works against the true proportions; it is kept, with the paper's weight, so the
method is the paper's (``marginal_weight = 0`` drops it). The unlabeled pool of a task is not
used (the paper has none).

Cost: 1000 Adam steps per task (about 17 ms for a 5-way 1-shot 15-query task and 100 ms for a
20-way 5-shot 15-query one on one CPU core). The gradient is computed in closed form (below) and every task of
a batch of same-shaped tasks is updated at once (batched ``[B, N, D] × [B, D, C]`` products);
each task has its own parameters, Adam moments and the same fixed number of steps, and Adam acts
element-wise, so a task's result does not depend on its batch mates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fewshot_bench.methods.base import Method, TaskContext
from fewshot_bench.methods.batching import predict_by_shape
from fewshot_bench.methods.param_groups import NORMALIZE
from fewshot_bench.methods.params import Param
from fewshot_bench.methods.registry import register_method
from fewshot_bench.methods.simple import class_means, feature_transform
from fewshot_bench.tasks.task import Task

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def tim_logits(z: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """``−‖z_i − w_k‖² / (2 T)`` up to a per-row constant (``−‖z_i‖²/(2T)``, which no softmax
    sees): ``(z·w_k − ½‖w_k‖²) / T``. ``z`` ``[B, N, D]``, ``w`` ``[B, C, D]`` → ``[B, N, C]``."""
    return (z @ w.transpose(1, 2) - 0.5 * w.pow(2).sum(-1).unsqueeze(1)) / temperature


def tim_loss_and_grad(
    w: torch.Tensor,
    z: torch.Tensor,
    onehot_s: torch.Tensor,
    temperature: float,
    ce_weight: float,
    marginal_weight: float,
    conditional_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task TIM loss ``[B]`` and its gradient with respect to ``w`` ``[B, C, D]``; ``z``
    ``[B, S + Q, D]`` holds the support rows (labels ``onehot_s`` ``[B, S, C]``), then the queries.

    With ``G = ∂L/∂logits`` (support rows: ``λ (p − y) / S``; query rows:
    ``(w_m / Q) p_ij (log p̄_j − Σ_k p_ik log p̄_k) − (α / Q) p_ij (log p_ij + h_i)`` with
    ``h_i = −Σ_k p_ik log p_ik``) the gradient is ``(Gᵀ Z − diag(Σ_i G_ik) W) / T``.
    """
    n_s = onehot_s.shape[1]
    n_q = z.shape[1] - n_s
    logp = tim_logits(z, w, temperature).log_softmax(-1)
    p = logp.exp()
    logp_s, logp_q = logp[:, :n_s], logp[:, n_s:]
    p_s, p_q = p[:, :n_s], p[:, n_s:]
    ce = -(onehot_s * logp_s).sum((1, 2)) / n_s
    cond = -(p_q * logp_q).sum(-1)  # h_i, [B, Q]
    # log p̄ (the clamp only keeps log finite should a class's mean probability underflow)
    log_pbar = (p_q.sum(1) / n_q).clamp_min(torch.finfo(p.dtype).tiny).log()  # [B, C]
    marg = -(log_pbar.exp() * log_pbar).sum(-1)
    loss = ce_weight * ce - (marginal_weight * marg - conditional_weight * cond.mean(1))

    g_s = (ce_weight / n_s) * (p_s - onehot_s)
    lp = log_pbar.unsqueeze(1)  # [B, 1, C]
    g_q = (marginal_weight / n_q) * p_q * (lp - (p_q * lp).sum(-1, keepdim=True))
    g_q = g_q - (conditional_weight / n_q) * p_q * (logp_q + cond.unsqueeze(-1))
    g = torch.cat([g_s, g_q], 1)
    grad = g.transpose(1, 2) @ z - g.sum(1).unsqueeze(-1) * w
    return loss, grad / temperature


def tim_gd(
    z_s: torch.Tensor,
    y_s: torch.Tensor,
    z_q: torch.Tensor,
    n_way: int,
    *,
    temperature: float = 1 / 15,
    ce_weight: float = 0.1,
    marginal_weight: float = 1.0,
    conditional_weight: float = 0.1,
    lr: float = 1e-4,
    iterations: int = 1000,
    record_loss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TIM-GD on a batch of independent tasks: ``z_s`` ``[B, S, D]``, ``y_s`` ``[B, S]``,
    ``z_q`` ``[B, Q, D]`` (``Q >= 1``). Returns the classifier weights ``[B, C, D]`` and, with
    ``record_loss``, the loss of every iterate ``[iterations + 1, B]`` (row 0: at the
    prototypes, row ``t``: after ``t`` Adam steps).

    Adam (``β = (0.9, 0.999)``, ``ε = 1e-8``, bias-corrected, as ``torch.optim.Adam``) is applied
    element-wise to each task's own weights.
    """
    onehot_s = F.one_hot(y_s.long(), n_way).to(z_s.dtype)
    w = class_means(z_s, y_s.long(), n_way)
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    b1, b2 = ADAM_BETAS
    z = torch.cat([z_s, z_q], 1)
    args = (z, onehot_s, temperature, ce_weight, marginal_weight, conditional_weight)
    losses = []
    for t in range(1, iterations + 1):
        loss, grad = tim_loss_and_grad(w, *args)
        if record_loss:
            losses.append(loss)
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(ADAM_EPS)
        w = w.addcdiv(m, denom, value=-lr / (1 - b1**t))
    if record_loss:
        losses.append(tim_loss_and_grad(w, *args)[0])
        return w, torch.stack(losses)
    return w, None


@register_method("tim")
class TIM(Method):
    """TIM-GD (Boudiaf et al. 2020): prototype-initialised softmax classifier fitted to the
    support cross-entropy and the query mutual information; see the module docstring.

    Assumes balanced queries (the marginal-entropy term favours uniform predicted proportions).
    """

    consumes = "features"
    setting = "transductive"
    schema = {
        "normalize": NORMALIZE,
        "temperature": Param(
            1 / 15,
            "classifier temperature T: p ∝ exp(−‖z − w_k‖² / (2T)); the paper's τ = 15 is 1/T",
            low=0,
            open_low=True,
        ),
        "ce_weight": Param(0.1, "λ, weight of the support cross-entropy", low=0),
        "marginal_weight": Param(
            1.0, "weight of the query marginal entropy H(Ŷ_Q) (assumes balanced queries)", low=0
        ),
        "conditional_weight": Param(
            0.1, "α, weight of the query conditional entropy H(Y_Q|X_Q)", low=0
        ),
        "lr": Param(1e-4, "learning rate (Adam)", low=0, open_low=True),
        "iterations": Param(
            1000, "full-batch Adam steps per task (the paper's TIM-GD: 1000)", low=0
        ),
    }

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        return predict_by_shape(tasks, ctxs, self._fit)

    def _fit(self, tasks: list[Task], device: torch.device) -> list[torch.Tensor]:
        """Query log-probabilities of same-shaped ``tasks`` (each fitted on its own)."""
        p = self.params
        fs = [feature_transform(t, p["normalize"], device) for t in tasks]
        z_s = torch.stack([f(t.support) for f, t in zip(fs, tasks, strict=True)])
        z_q = torch.stack([f(t.query) for f, t in zip(fs, tasks, strict=True)])
        y_s = torch.stack([t.support_labels for t in tasks]).to(device).long()
        temperature = float(p["temperature"])
        w, _ = tim_gd(
            z_s,
            y_s,
            z_q,
            tasks[0].n_way,
            temperature=temperature,
            ce_weight=float(p["ce_weight"]),
            marginal_weight=float(p["marginal_weight"]),
            conditional_weight=float(p["conditional_weight"]),
            lr=float(p["lr"]),
            iterations=int(p["iterations"]),
        )
        scores = tim_logits(z_q, w, temperature).log_softmax(-1)
        return list(scores.unbind(0))
