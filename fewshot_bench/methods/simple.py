"""Baselines on frozen features: nearest prototype and logistic regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot_bench.methods.base import Method, TaskContext
from fewshot_bench.methods.registry import register_method
from fewshot_bench.tasks.task import Task


def prepare_features(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = x.float()
    return F.normalize(x, dim=-1) if normalize else x


def class_means(x: torch.Tensor, y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Per-class means; ``x`` is ``[..., n, D]`` and ``y`` ``[..., n]`` (a leading batch dim allowed)."""
    onehot = F.one_hot(y, n_way).to(x.dtype)  # [..., n, C]
    counts = onehot.sum(dim=-2).clamp_min(1)  # [..., C]
    return (onehot.transpose(-1, -2) @ x) / counts.unsqueeze(-1)


@register_method("nearest-prototype")
class NearestPrototype(Method):
    """Each class is the mean of its support features; queries score by negative squared distance."""

    consumes = "features"
    setting = "inductive"
    defaults = {"normalize": True}

    def predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        return self.predict_batch([task], [ctx])[0]

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        if len({(t.support.shape, t.query.shape, t.n_way) for t in tasks}) != 1:
            return [self.predict_batch([t], [c])[0] for t, c in zip(tasks, ctxs, strict=True)]
        device = ctxs[0].device
        norm = self.params["normalize"]
        sup = prepare_features(torch.stack([t.support for t in tasks]).to(device), norm)
        qry = prepare_features(torch.stack([t.query for t in tasks]).to(device), norm)
        y = torch.stack([t.support_labels for t in tasks]).to(device)
        protos = class_means(sup, y, tasks[0].n_way)
        scores = -torch.cdist(qry, protos).pow(2)
        return list(scores.cpu().unbind(0))


@register_method("logistic-regression")
class LogisticRegression(Method):
    """Multinomial logistic regression on the support features with L2 penalty ``l2`` on the weights.

    Solved in the span of the support features (representer theorem: the L2-optimal weights are
    ``W = S^T a``), so each task is an ``n_support x n_way`` problem and a batch of tasks is fitted
    by one L-BFGS run on the sum of their (independent) objectives. Same optimum as the primal.
    """

    consumes = "features"
    setting = "inductive"
    defaults = {"normalize": True, "l2": 1e-3, "max_iter": 100}

    def predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        return self.predict_batch([task], [ctx])[0]

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        if len({(t.support.shape, t.query.shape, t.n_way) for t in tasks}) != 1:
            return [self.predict_batch([t], [c])[0] for t, c in zip(tasks, ctxs, strict=True)]
        device, norm = ctxs[0].device, self.params["normalize"]
        sup = prepare_features(torch.stack([t.support for t in tasks]).to(device), norm)
        qry = prepare_features(torch.stack([t.query for t in tasks]).to(device), norm)
        y = torch.stack([t.support_labels for t in tasks]).to(device)
        gram = sup @ sup.transpose(1, 2)  # [B, n, n]
        alpha, bias = fit_kernel_logistic(
            gram, y, tasks[0].n_way, self.params["l2"], self.params["max_iter"]
        )
        logits = qry @ sup.transpose(1, 2) @ alpha + bias[:, None, :]
        return list(logits.log_softmax(-1).cpu().unbind(0))


def fit_kernel_logistic(
    gram: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched L2 logistic regression in dual-coefficient form: logits = K a + b, penalty tr(a^T K a)."""
    b, n, _ = gram.shape
    alpha = torch.zeros(b, n, n_classes, device=gram.device, requires_grad=True)
    bias = torch.zeros(b, n_classes, device=gram.device, requires_grad=True)
    opt = torch.optim.LBFGS([alpha, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = gram @ alpha + bias[:, None, :]
        ce = F.cross_entropy(logits.reshape(b * n, n_classes), y.reshape(-1), reduction="sum") / n
        penalty = l2 * (alpha * (gram @ alpha)).sum()
        loss = ce + penalty
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return alpha.detach(), bias.detach()


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    l2: float = 1e-3,
    max_iter: int = 100,
    sample_weight: torch.Tensor | None = None,
) -> torch.nn.Linear:
    """Weighted multinomial logistic regression fitted by L-BFGS; deterministic (no random init)."""
    model = torch.nn.Linear(x.shape[1], n_classes).to(x.device)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    w = torch.ones(len(y), device=x.device) if sample_weight is None else sample_weight.to(x.device)
    w = w / w.sum().clamp_min(1e-12)
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.cross_entropy(model(x), y, reduction="none") * w).sum() + l2 * model.weight.pow(
            2
        ).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return model.requires_grad_(False)
