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
    """Multinomial logistic regression on the support features (L-BFGS, L2 penalty ``l2``)."""

    consumes = "features"
    setting = "inductive"
    defaults = {"normalize": True, "l2": 1e-3, "max_iter": 100}

    def predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        norm = self.params["normalize"]
        x = prepare_features(task.support.to(ctx.device), norm)
        y = task.support_labels.to(ctx.device)
        model = fit_logistic(x, y, task.n_way, self.params["l2"], self.params["max_iter"])
        return model(prepare_features(task.query.to(ctx.device), norm)).log_softmax(-1).cpu()


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
