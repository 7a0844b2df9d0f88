"""Batch independence: every built-in feature method gives a task the same scores whatever batch
``predict_batch`` receives it in -- alone, all tasks at once (shapes mixed), or in chunks of 7 of a
shuffled order grouped by shape (the runner hands tasks over in chunks of ``--batch-size``, in
any order).

Real methods on real data: episodes of scikit-learn's digits (64-dim features) in several shapes
(5-way 1-shot with and without unlabeled items, 3-way 2-shot, 4-way 3-shot), mixed in every batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from digits_episodes import digits_episode
from sklearn.linear_model import LogisticRegression as SkLogisticRegression

from fewshot_bench.methods import TaskContext, available_methods
from fewshot_bench.methods.simple import (
    NEWTON_MAX_PARAMS,
    fit_logistic_lbfgs,
    fit_logistic_newton,
    span_coordinates,
)
from fewshot_bench.tasks.task import Task

N_TASKS = 64
#: (n_way, shots, queries per class, unlabeled per class); task ``i`` has shape ``i % 4``
SHAPES = [(5, 1, 3, 0), (5, 1, 3, 4), (3, 2, 4, 5), (4, 3, 2, 0)]
#: parameter overrides, only where a default would make this file slow (same code paths)
OVERRIDES: dict[str, dict] = {
    "diffusion-logreg": {"logreg_iter": 15},
    "propagation-classifier": {"logreg_iter": 15},
    "tim": {"iterations": 100},
}
TOL = {"rtol": 1e-6, "atol": 1e-6}
#: Iterative optimisers (1000 Adam steps, 20 MAP steps): multi-threaded BLAS sums a stacked batch
#: in a batch-size-dependent order, and their iterations carry that rounding to a few 1e-6 (seen
#: with 2 threads); a batch-mate leak would move scores by far more, and the argmax must match.
ITERATIVE_TOL = {"rtol": 2e-5, "atol": 2e-5}
TOLERANCE = {"tim": ITERATIVE_TOL, "pt-map": ITERATIVE_TOL}


def builtin_feature_methods() -> list[str]:
    return sorted(
        name
        for name, cls in available_methods().items()
        if cls.consumes == "features" and cls.__module__.startswith("fewshot_bench.")
    )


@pytest.fixture(scope="module")
def tasks(digits) -> list[Task]:
    x, y = digits
    episodes = []
    for i in range(N_TASKS):
        way, shot, queries, n_unl = SHAPES[i % len(SHAPES)]
        task, _ = digits_episode(x, y, 100 + i, way=way, shot=shot, queries=queries, n_unl=n_unl)
        episodes.append(task)
    return episodes


def run(method, tasks: list[Task], order, batch_size: int) -> list[torch.Tensor]:
    """Scores of every task, ``predict_batch`` on ``order`` in chunks; task ``i`` seeded ``i``."""
    order = [int(i) for i in order]
    scores: list[torch.Tensor | None] = [None] * len(tasks)
    for s in range(0, len(order), batch_size):
        part = order[s : s + batch_size]
        out = method.predict_batch(
            [tasks[i] for i in part], [TaskContext.create(1000 + i) for i in part]
        )
        assert len(out) == len(part)
        for i, score in zip(part, out, strict=True):
            scores[i] = score
    return scores  # type: ignore[return-value]


def test_discovers_the_builtin_feature_methods():
    assert {
        "nearest-prototype",
        "logistic-regression",
        "nn-propagation",
        "spectral-propagation",
        "diffusion",
        "diffusion-logreg",
        "propagation-classifier",
    } <= set(builtin_feature_methods())


@pytest.mark.parametrize("name", builtin_feature_methods())
def test_scores_do_not_depend_on_the_batch(name, tasks):
    method = available_methods()[name](**OVERRIDES.get(name, {}))
    alone = run(method, tasks, range(N_TASKS), 1)
    for task, score in zip(tasks, alone, strict=True):
        assert score.shape == (task.query.shape[0], task.n_way)
        assert not torch.isnan(score).any()
    # shuffled, then grouped by shape: most chunks of 7 hold tasks of one shape (vectorised paths)
    shuffled = np.random.default_rng(0).permutation(N_TASKS)
    grouped = sorted(shuffled, key=lambda i: i % len(SHAPES))
    for how, scores in [
        ("all at once", run(method, tasks, range(N_TASKS), N_TASKS)),
        ("in chunks of 7, shuffled and grouped by shape", run(method, tasks, grouped, 7)),
    ]:
        for i in range(N_TASKS):
            assert torch.equal(scores[i].argmax(1), alone[i].argmax(1)), f"{name} task {i} {how}"
            torch.testing.assert_close(
                scores[i],
                alone[i],
                **TOLERANCE.get(name, TOL),
                msg=lambda m, i=i, how=how: f"task {i} {how}: {m}",
            )


@pytest.mark.parametrize(("way", "shot"), [(5, 1), (5, 5), (10, 30)])
def test_logistic_regression_is_the_l2_optimum(digits, way, shot):
    """Both solvers (Newton below NEWTON_MAX_PARAMS, L-BFGS above) reach the optimum of the
    primal ``mean CE + l2 ||W||²`` in the full feature space, and ``predict`` scores with it."""
    x, y = digits
    l2 = 1e-3
    task, _ = digits_episode(x, y, 7, way=way, shot=shot, queries=5)
    sup = F.normalize(task.support.double(), dim=1)
    labels = task.support_labels
    z, _ = span_coordinates(sup[None])
    newton = (z.shape[2] + 1) * way <= NEWTON_MAX_PARAMS
    assert newton == (shot < 30)  # both paths are covered
    if newton:
        theta = fit_logistic_newton(z, labels[None], way, l2, 100)[0]
    else:
        theta = fit_logistic_lbfgs(z[0], labels, way, l2, 100)
    basis = torch.linalg.qr(sup.T)[0] if z.shape[2] < sup.shape[1] else torch.eye(sup.shape[1])
    w = (basis.double() @ theta[:-1]).requires_grad_()
    b = theta[-1].clone().requires_grad_()
    loss = F.cross_entropy(sup @ w + b, labels) + l2 * w.pow(2).sum()
    loss.backward()
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    assert grad < (1e-9 if newton else 1e-6)

    # the scores are those of this optimum, and of scikit-learn's (C = 1 / (2 l2 n))
    scores = available_methods()["logistic-regression"](l2=l2).predict(task, TaskContext.create(0))
    qry = F.normalize(task.query.double(), dim=1)
    expected = (qry @ w.detach() + b.detach()).log_softmax(1).float()
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    sk = SkLogisticRegression(C=1 / (2 * l2 * len(labels)), tol=1e-10, max_iter=10_000)
    sk.fit(sup.numpy(), labels.numpy())
    sk_scores = torch.from_numpy(sk.predict_log_proba(qry.numpy())).float()
    torch.testing.assert_close(scores, sk_scores, rtol=1e-4, atol=1e-4)
