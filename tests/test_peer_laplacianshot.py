"""LaplacianShot (fewshot_bench/methods/laplacianshot.py) on real data: scikit-learn's digits.

600 digits are the "base" data (their mean centres the CL2N features); the rest hold the
episodes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits_episodes import digits_episode, load_digits_features

from fewshot_bench.methods import FitSource, TaskContext, get_method
from fewshot_bench.methods.feature_prep import centred_l2
from fewshot_bench.methods.laplacianshot import bound_optimise, knn_affinity, laplacian_energy
from fewshot_bench.methods.simpleshot import rectify


@pytest.fixture(scope="module")
def digits() -> dict:
    """The digits split once (overrides conftest's ``digits``): ``x``, ``y`` the episode pool,
    ``base`` the 600 base items."""
    x, y = load_digits_features()
    perm = np.random.default_rng(0).permutation(len(y))
    base, pool = perm[:600], perm[600:]
    source = FitSource(torch.from_numpy(x[base]), y[base], "features", [str(c) for c in range(10)])
    return {"x": x[pool], "y": y[pool], "base": source}


def fitted(d: dict, name: str = "laplacianshot", **params):
    method = get_method(name)(**params)
    method.fit(d["base"], None, TaskContext.create(0))
    return method


def accuracy(method, tasks) -> float:
    ctxs = [TaskContext.create(i) for i in range(len(tasks))]
    scores = method.predict_batch([t for t, _ in tasks], ctxs)
    hits = [(s.argmax(1).numpy() == y).mean() for s, (_, y) in zip(scores, tasks, strict=True)]
    return float(np.mean(hits))


def brute_energy(y: torch.Tensor, a: torch.Tensor, w: torch.Tensor, lam: float) -> float:
    """``Σ_q y_q·a_q − (λ/2) Σ_{q,p} w_qp y_qᵀy_p + Σ_q y_q·log y_q`` with explicit loops."""
    n = y.shape[0]
    e = sum(float(y[q] @ a[q] + (y[q] * y[q].log()).sum()) for q in range(n))
    e -= lam / 2 * sum(float(w[q, p] * (y[q] @ y[p])) for q in range(n) for p in range(n))
    return e


def test_objective_never_increases_along_the_bound_updates(digits):
    """Defining property: E(Y) (relaxed objective with entropy barrier) does not increase across
    the bound iterations, on real episodes with the default λ and with a λ large enough that a
    plain step would overshoot on the indefinite kNN affinity."""
    x, y = digits["x"], digits["y"]
    tasks = [digits_episode(x, y, i, shot=1 + i % 2)[0] for i in range(12)]
    tasks += [digits_episode(x, y, 50, way=10, queries=3)[0]]
    ctxs = [TaskContext.create(i) for i in range(len(tasks))]
    for lam in (0.5, 1.0, 4.0):
        method = fitted(digits, lam=lam, max_iter=60, tol=1e-9)
        _, traces = method.solve(tasks, ctxs)
        for trace in traces:
            assert len(trace) >= 2 and torch.isfinite(trace).all()
            steps = trace[1:] - trace[:-1]
            assert (steps <= 1e-9 * trace.abs().max()).all(), (lam, steps.max())
            assert trace[-1] < trace[0]  # it actually optimises


def test_energy_trace_matches_the_definition_and_the_fixed_point(digits):
    method = fitted(digits)
    task, _ = digits_episode(digits["x"], digits["y"], 7, queries=[4, 6, 0, 2, 3])
    sup = centred_l2(task.support, method.base_mean).double()[None]
    qry = centred_l2(task.query, method.base_mean).double()[None]
    qry, protos = rectify(sup, task.support_labels[None], qry, 5, method.params)
    a = torch.cdist(qry, protos).pow(2)
    w = knn_affinity(qry, 3)
    lam = method.params["lam"]
    y, trace = bound_optimise(a, w, lam, max_iter=200, tol=1e-14)
    y0 = torch.softmax(-a, -1)
    assert trace[0, 0].item() == pytest.approx(brute_energy(y0[0], a[0], w[0], lam), rel=1e-10)
    last = trace[0][~trace[0].isnan()][-1].item()
    assert last == pytest.approx(brute_energy(y[0], a[0], w[0], lam), rel=1e-10)
    assert laplacian_energy(y, a, w, lam).item() == pytest.approx(last, rel=1e-12)
    # converged: Y is a fixed point of y_q ∝ exp(-a_q + λ Σ_p w_qp y_p)
    torch.testing.assert_close(y, torch.softmax(-a + lam * (w @ y), -1), rtol=0, atol=1e-6)
    # the method returns log Y of the same solve
    scores, _ = method.solve([task], [TaskContext.create(0)])
    default_y, _ = bound_optimise(a, w, lam)
    torch.testing.assert_close(scores[0].exp().double(), default_y[0], rtol=1e-5, atol=1e-6)


def test_knn_affinity_edge_cases():
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = knn_affinity(x, 3)
    assert torch.equal(w, w.transpose(1, 2))
    assert (w.diagonal(dim1=1, dim2=2) == 0).all()
    assert torch.equal((w > 0).sum(2) >= 3, torch.ones(2, 6, dtype=torch.bool))  # ≥ own kNN
    assert torch.equal(knn_affinity(x[:, :1], 3), torch.zeros(2, 1, 1, dtype=torch.float64))
    full = knn_affinity(x[:, :3], 10)  # knn > Q - 1: everyone else
    assert torch.equal(full, 1 - torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    assert knn_affinity(x[:, :0], 3).shape == (2, 0, 0)


def test_awkward_shapes_give_finite_scores(digits):
    x, y = digits["x"], digits["y"]
    method = fitted(digits)
    tasks = [
        digits_episode(x, y, 1, way=10, queries=1)[0],  # 10-way, one query per class
        digits_episode(x, y, 2, queries=[1, 0, 0, 0, 0])[0],  # one query in all: no neighbours
        digits_episode(x, y, 3, queries=[0, 0, 12, 0, 0])[0],  # all queries of one class
        digits_episode(x, y, 4, queries=[2, 0, 0, 1, 0])[0],  # Q = 3 < knn + 1 and < n_way
        digits_episode(x, y, 5, way=3, queries=2, n_unl=4)[0],  # with an unlabeled pool
        digits_episode(x, y, 6, shot=5, queries=[2, 1, 0, 9, 4])[0],
    ]
    ctxs = [TaskContext.create(i) for i in range(len(tasks))]
    for params in ({}, {"knn": 50}, {"cross_class": False, "intra_class": False}, {"lam": 0.0}):
        scores, traces = fitted(digits, **params).solve(tasks, ctxs)
        for task, s, trace in zip(tasks, scores, traces, strict=True):
            assert s.shape == (task.query.shape[0], task.n_way)
            assert torch.isfinite(s).all() and torch.isfinite(trace).all(), params
    # one query: no neighbours, one update leaves softmax(-a) as it is
    _, traces = method.solve(tasks[1:2], ctxs[1:2])
    assert len(traces[0]) == 2 and traces[0][1] == traces[0][0]


def test_deterministic_and_batch_independent(digits):
    x, y = digits["x"], digits["y"]
    tasks = [digits_episode(x, y, i)[0] for i in range(6)]
    ctxs = [TaskContext.create(i) for i in range(6)]
    a = fitted(digits).predict_batch(tasks, ctxs)
    b = fitted(digits).predict_batch(tasks, ctxs)
    for first, second in zip(a, b, strict=True):
        assert torch.equal(first, second)
    torch.testing.assert_close(fitted(digits).predict(tasks[4], ctxs[4]), a[4])


def test_accuracy_on_digits_episodes(digits):
    """100 5-way 1-shot episodes, 15 queries per class: LaplacianShot beats SimpleShot, and the
    Laplacian term adds to the rectified prototypes alone (λ = 0), as the paper reports."""
    x, y = digits["x"], digits["y"]
    tasks = [digits_episode(x, y, 1000 + i) for i in range(100)]
    simple = accuracy(fitted(digits, "simpleshot"), tasks)
    proto = accuracy(get_method("nearest-prototype")(), tasks)
    lshot = accuracy(fitted(digits), tasks)
    no_laplacian = accuracy(fitted(digits, lam=0.0), tasks)
    assert lshot >= max(simple, proto) + 0.03, (lshot, simple, proto)
    assert lshot >= no_laplacian + 0.01, (lshot, no_laplacian)
