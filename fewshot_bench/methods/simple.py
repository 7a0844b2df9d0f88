"""Baselines on frozen features: nearest prototype and logistic regression (inductive).

Both fit every task on its own, so a task's scores do not depend on the other tasks of the
batch ``fit_tasks`` receives: logistic regression fits a batch with a solver whose every
decision (step length, line search, stopping) is per task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fewshot_bench.methods.base import Method, Scorer, TaskContext
from fewshot_bench.methods.batching import same_shape_groups
from fewshot_bench.methods.param_groups import NORMALIZE
from fewshot_bench.methods.params import Param
from fewshot_bench.methods.registry import register_method
from fewshot_bench.tasks.task import Task

#: Tasks with at most this many logistic-regression parameters ``(r + 1) * n_way`` (``r`` =
#: ``min(n_support, dim)``) are fitted by batched Newton; larger ones by one L-BFGS run each.
NEWTON_MAX_PARAMS = 256
#: Float64 entries of the batched Newton Hessians held at once on CPU (bounds a fitting chunk;
#: small chunks stay in cache), 64x that on an accelerator.
HESSIAN_BUDGET = 1 << 18


def feature_transform(
    task: Task, mode: str, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``normalize`` mode (``l2``, ``center-l2``, ``none``) as a function of feature rows.

    ``center-l2`` subtracts the mean of the items the method was given before its queries
    (support and, if any, unlabeled pool), so a query's features never depend on other queries.
    """
    if mode == "none":
        return lambda x: x.to(device, torch.float32)
    if mode == "l2":
        return lambda x: F.normalize(x.to(device, torch.float32), dim=-1)
    if mode != "center-l2":
        raise ValueError(f"normalize must be l2, center-l2 or none, not {mode!r}")
    given = torch.cat([task.support, task.unlabeled.reshape(-1, *task.support.shape[1:])])
    mean = given.to(device, torch.float32).mean(0, keepdim=True)
    return lambda x: F.normalize(x.to(device, torch.float32) - mean, dim=-1)


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
    rowwise_scorer = True
    schema = {"normalize": NORMALIZE}

    def fit_tasks(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[Scorer]:
        """Prototypes of same-shaped tasks in one batched product (each task's own means)."""
        out: list[Scorer | None] = [None] * len(tasks)
        for idx in same_shape_groups(tasks, ctxs):
            device, n_way = ctxs[idx[0]].device, tasks[idx[0]].n_way
            fs = [feature_transform(tasks[i], self.params["normalize"], device) for i in idx]
            sup = torch.stack([f(tasks[i].support) for f, i in zip(fs, idx, strict=True)])
            y = torch.stack([tasks[i].support_labels for i in idx]).to(device).long()
            protos = class_means(sup, y, n_way)
            for f, i, p in zip(fs, idx, protos, strict=True):
                out[i] = _prototype_scorer(f, p)
        return out  # type: ignore[return-value]


def _prototype_scorer(f: Callable[[torch.Tensor], torch.Tensor], protos: torch.Tensor) -> Scorer:
    # the direct (not matrix-product) distance: each row's score is then the same whether
    # queries come one at a time or together (see Method.rowwise_scorer)
    return lambda query: (
        -torch.cdist(f(query), protos, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    )


@register_method("logistic-regression")
class LogisticRegression(Method):
    """Multinomial logistic regression on the support features with L2 penalty ``l2`` on the weights.

    Each task minimises ``(1/n) Σ_i CE(W x_i + b, y_i) + l2 ||W||²`` on its own. The optimal ``W``
    lies in the span of the support features (representer theorem), so the problem is solved in
    an orthonormal basis of that span (``r = min(n_support, dim)`` coordinates, same optimum as
    the full primal). Tasks with at most :data:`NEWTON_MAX_PARAMS` parameters are fitted in float64
    by :func:`fit_logistic_newton` -- batched, with per-task line search and stopping, converged
    to machine precision -- larger ones by one L-BFGS run each (:func:`fit_logistic_lbfgs`).
    Either way a task's scores do not depend on its batch mates.
    """

    consumes = "features"
    setting = "inductive"
    rowwise_scorer = True
    schema = {
        "normalize": NORMALIZE,
        "l2": Param(1e-3, "L2 penalty on the weights", low=0),
        "max_iter": Param(100, "Newton (or L-BFGS) iterations", low=1),
    }

    def fit_tasks(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[Scorer]:
        out: list[Scorer | None] = [None] * len(tasks)
        groups: dict[tuple, list[int]] = {}
        for i, (t, c) in enumerate(zip(tasks, ctxs, strict=True)):
            groups.setdefault((tuple(t.support.shape), t.n_way, c.device), []).append(i)
        for ((n, dim), n_way, device), idx in groups.items():
            n_params = (min(n, dim) + 1) * n_way
            budget = HESSIAN_BUDGET * (1 if device.type == "cpu" else 64)
            chunk = max(1, budget // n_params**2) if n_params <= NEWTON_MAX_PARAMS else 1
            for s in range(0, len(idx), chunk):
                part = idx[s : s + chunk]
                scorers = self._fit([tasks[i] for i in part], device)
                for i, scorer in zip(part, scorers, strict=True):
                    out[i] = scorer
        return out  # type: ignore[return-value]

    def _fit(self, tasks: list[Task], device: torch.device) -> list[Scorer]:
        """Scorers of same-shaped ``tasks``, each fitted independently."""
        n_way = tasks[0].n_way
        l2, max_iter = float(self.params["l2"]), int(self.params["max_iter"])
        transforms = [feature_transform(t, self.params["normalize"], device) for t in tasks]
        sup = torch.stack([f(t.support) for f, t in zip(transforms, tasks, strict=True)])
        y = torch.stack([t.support_labels for t in tasks]).to(device).long()
        z, basis = span_coordinates(sup.double())
        if (z.shape[2] + 1) * n_way <= NEWTON_MAX_PARAMS:
            theta = fit_logistic_newton(z, y, n_way, l2, max_iter)
        else:
            theta = torch.stack(
                [fit_logistic_lbfgs(z[i], y[i], n_way, l2, max_iter) for i in range(len(tasks))]
            )

        def scorer(i: int) -> Scorer:
            f, th, q = transforms[i], theta[i], None if basis is None else basis[i]

            def score(query: torch.Tensor) -> torch.Tensor:
                zq = f(query).double()
                zq = zq if q is None else zq @ q
                return (zq @ th[:-1] + th[-1:]).log_softmax(-1).float()

            return score

        return [scorer(i) for i in range(len(tasks))]


def span_coordinates(support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Support features ``[B, n, D]`` in an orthonormal basis of each task's support span
    (``r = n < D`` coordinates) and that basis ``[B, D, r]`` (``None``: unchanged, ``n >= D``).

    Inner products with vectors of the span, and so the logistic regression and its L2 penalty,
    are unchanged: ``z zᵀ = S Sᵀ``; a query ``x`` has coordinates ``x @ basis``.
    """
    n, dim = support.shape[-2:]
    if n >= dim:
        return support, None
    q, r = torch.linalg.qr(support.transpose(-1, -2))  # S^T = Q R, Q [B, D, n]
    return r.transpose(-1, -2), q


def fit_logistic_newton(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    l2: float,
    max_iter: int = 100,
    *,
    tol: float = 1e-20,
    max_backtrack: int = 40,
) -> torch.Tensor:
    """Multinomial L2 logistic regression of a batch of independent tasks by Newton's method.

    ``x`` ``[B, n, k]``, ``y`` ``[B, n]``; returns ``θ`` ``[B, k + 1, C]`` (last row: the bias)
    minimising ``(1/n) Σ_i CE(x_i W + b, y_i) + l2 ||W||²`` for every task, in float64 from zero.
    Exact Hessian; the step length of each task comes from its own backtracking (Armijo) line
    search, and each task stops on its own -- Newton decrement ``gᵀH⁻¹g <= tol``, a negligible
    step, a failed line search or ``max_iter`` steps -- after which it is frozen. So a task's
    iterates are those it would have alone (up to the rounding of batched float64 products).
    The softmax's shift invariance leaves the bias undetermined along ``(1, .., 1)``; the Hessian
    gets curvature 1 there (the gradient never points there), so the steps keep ``Σ b = 0``.
    """
    dt, dev = torch.float64, x.device
    b, n, k = x.shape
    k1, c = k + 1, n_classes
    n_params = k1 * c
    x = torch.cat([x.to(dt), torch.ones(b, n, 1, dtype=dt, device=dev)], 2)  # [B, n, k + 1]
    onehot = F.one_hot(y.long(), c).to(dt)
    pen = torch.full((k1, c), 2.0 * l2, dtype=dt, device=dev)
    pen[k] = 0.0  # the bias is not penalised
    # constant part of the Hessian: penalty, plus curvature along the bias gauge (1, .., 1)
    base = torch.diag(pen.reshape(-1))
    base[k * c :, k * c :] += 1.0 / c

    def loss(th: torch.Tensor) -> torch.Tensor:
        logits = x @ th
        ce = (torch.logsumexp(logits, 2) - (logits * onehot).sum(2)).mean(1)
        return ce + l2 * th[:, :k].pow(2).sum((1, 2))

    theta = torch.zeros(b, k1, c, dtype=dt, device=dev)
    f = loss(theta)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    for _ in range(max_iter):
        p = torch.softmax(x @ theta, 2)  # [B, n, C]
        g = x.transpose(1, 2) @ (p - onehot) / n + pen * theta  # [B, k + 1, C]
        # H[(j,c),(l,d)] = (1/n) Σ_i x_ij x_il (p_ic δ_cd - p_ic p_id) + base
        xp = (x.unsqueeze(3) * p.unsqueeze(2)).reshape(b, n, n_params)  # x_ij p_ic at (j, c)
        xpt = xp.transpose(1, 2)
        h = torch.baddbmm(base, xpt, xp, alpha=-1.0 / n)
        blocks = torch.bmm(xpt, x).view(b, k1, c, k1).mul_(1.0 / n)  # Σ_i x_ij p_ic x_il
        h.view(b, k1, c, k1, c).diagonal(dim1=2, dim2=4).add_(blocks.transpose(2, 3))
        diag = h.diagonal(dim1=1, dim2=2)
        diag += 1e-12 * (1.0 + diag.amax(1, keepdim=True))  # keeps Cholesky safe if l2 = 0
        chol, _ = torch.linalg.cholesky_ex(h)
        step = -torch.cholesky_solve(g.reshape(b, n_params, 1), chol).reshape(b, k1, c)
        dec = -(g * step).sum((1, 2))  # Newton decrement², predicted gain x 2
        small = step.abs().amax((1, 2)) <= 1e-13 * (1.0 + theta.abs().amax((1, 2)))
        active &= ~((dec <= tol) | small)
        if not bool(active.any()):
            break
        # per-task backtracking; near the optimum (dec tiny) the full step is taken as is,
        # since rounding in f would make the sufficient-decrease test fail
        t = torch.ones(b, dtype=dt, device=dev)
        searching = active.clone()
        accepted = torch.zeros_like(active)
        for _ in range(max_backtrack):
            cand = theta + t[:, None, None] * step
            f_new = loss(cand)
            ok = searching & ((f_new <= f - 1e-4 * t * dec) | (dec < 1e-12))
            theta = torch.where(ok[:, None, None], cand, theta)
            f = torch.where(ok, f_new, f)
            accepted |= ok
            searching &= ~ok
            if not bool(searching.any()):
                break
            t = torch.where(searching, t / 2, t)
        active &= accepted
        if not bool(active.any()):
            break
    return theta


def fit_logistic_lbfgs(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int = 100
) -> torch.Tensor:
    """One task's ``θ`` ``[k + 1, C]`` (last row: the bias) for the objective of
    :func:`fit_logistic_newton`, by full-batch L-BFGS (strong Wolfe) from zero; deterministic."""
    k = x.shape[1]
    theta = torch.zeros(k + 1, n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    y = y.long()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ theta[:k] + theta[k], y) + l2 * theta[:k].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return theta.detach()


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
