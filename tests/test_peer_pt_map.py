"""PT-MAP (Hu, Gripon and Pateux 2021) on real data: scikit-learn's digits (64-d features)."""

from __future__ import annotations

import numpy as np
import torch
from digits_episodes import digits_episode

import fewshot_bench.methods.pt_map as pt_map
from fewshot_bench.methods import available_methods
from fewshot_bench.methods.base import TaskContext
from fewshot_bench.methods.pt_map import PTMap, sinkhorn


def dirichlet_counts(seed: int, way: int, total: int) -> list[int]:
    """Imbalanced queries per class as the shape board draws them (Dirichlet(2) proportions)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(total, rng.dirichlet([2.0] * way)).tolist()


def accuracy(scores: list[torch.Tensor], labels: list[np.ndarray]) -> float:
    pairs = zip(scores, labels, strict=True)
    return float(np.mean([(s.argmax(1).numpy() == y).mean() for s, y in pairs]))


def test_registered():
    cls = available_methods()["pt-map"]
    assert cls is PTMap and cls.setting == "transductive" and cls.consumes == "features"
    p = PTMap().params
    assert (p["beta"], p["lam"], p["centre_lr"], p["n_steps"]) == (0.5, 10.0, 0.2, 20)


def test_every_sinkhorn_mapping_has_the_uniform_marginals(digits, monkeypatch):
    """Defining property: every Sinkhorn mapping PT-MAP computes (20 steps + the final one, on
    balanced, imbalanced and Q < n_way episodes) has rows summing to 1 and every class
    receiving Q / n_way of the mass (within 1e-5)."""
    x, y = digits
    calls = []

    def recording(cost, lam, col_mass=None, **kw):
        out = sinkhorn(cost, lam, col_mass, **kw)
        calls.append(out[0].exp())
        return out

    monkeypatch.setattr(pt_map, "sinkhorn", recording)
    tasks = [
        digits_episode(x, y, 1)[0],
        digits_episode(x, y, 2, shot=5, queries=dirichlet_counts(2, 5, 75))[0],
        digits_episode(x, y, 3, way=10, queries=dirichlet_counts(3, 10, 10))[0],
        digits_episode(x, y, 4, way=10, queries=[0, 0, 2, 0, 1, 0, 0, 0, 0, 1])[0],  # Q = 4 < n_way
        digits_episode(x, y, 5, queries=[0, 9, 0, 0, 0])[0],  # all queries from one class
    ]
    PTMap().predict_batch(tasks, [TaskContext.create(i) for i in range(len(tasks))])
    assert len(calls) == 21 * len(tasks)  # each shape is a group of its own
    for m in calls:
        q, way = m.shape[1:]
        assert torch.isfinite(m).all()
        torch.testing.assert_close(m.sum(2), torch.ones_like(m.sum(2)), rtol=0, atol=1e-5)
        cols = torch.full_like(m.sum(1), q / way)
        torch.testing.assert_close(m.sum(1), cols, rtol=0, atol=1e-5)


def sinkhorn_knopp(cost: torch.Tensor, lam: float, iters: int = 20_000) -> torch.Tensor:
    """Reference: Sinkhorn's alternating scalings of exp(−λ cost), rows to 1, columns to n/m."""
    n, m = cost.shape[1:]
    k = torch.exp(-lam * cost)
    v = torch.ones(cost.shape[0], m, dtype=cost.dtype)
    for _ in range(iters):
        u = 1 / (k @ v.unsqueeze(2)).squeeze(2)
        v = (n / m) / (k.transpose(1, 2) @ u.unsqueeze(2)).squeeze(2)
    return u.unsqueeze(2) * k * v.unsqueeze(1)


def test_sinkhorn_is_the_entropic_transport_plan():
    """The mapping is the fixed point of Sinkhorn's scalings, to 1e-10; a warm start reaches the
    same plan; any column masses adding up to n are honoured."""
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(4, 12, 5, generator=gen, dtype=torch.float64) * 4
    log_m, g = sinkhorn(cost, 10.0, tol=1e-12)
    torch.testing.assert_close(log_m.exp(), sinkhorn_knopp(cost, 10.0), rtol=0, atol=1e-10)
    warm = sinkhorn(cost * 1.01, 10.0, tol=1e-12, init=g)[0]
    torch.testing.assert_close(warm, sinkhorn(cost * 1.01, 10.0, tol=1e-12)[0])
    mass = torch.tensor([[4.0, 2.0, 5.0, 0.5, 0.5]] * 4, dtype=torch.float64)
    m = sinkhorn(cost, 10.0, mass, tol=1e-10)[0].exp()
    torch.testing.assert_close(m.sum(1), mass, rtol=0, atol=1e-9)
    torch.testing.assert_close(m.sum(2), torch.ones(4, 12, dtype=torch.float64))


def test_sinkhorn_without_underflow():
    """Kernel entries far below float64's range (a large λ, or a class far from every query)
    neither underflow to 0/0 nor keep the marginals from being met."""
    gen = torch.Generator().manual_seed(1)
    cost = torch.rand(3, 7, 4, generator=gen, dtype=torch.float64) * 4
    far = cost.clone()
    far[:, :, 0] += 100.0  # exp(−10 · 100) underflows float64
    for c, lam in ((cost, 1e3), (far, 10.0)):
        log_m, g = sinkhorn(c, lam, tol=1e-9)
        m = log_m.exp()
        assert torch.isfinite(log_m).all() and torch.isfinite(g).all()
        torch.testing.assert_close(m.sum(2), torch.ones(3, 7, dtype=torch.float64))
        torch.testing.assert_close(m.sum(1), torch.full((3, 4), 7 / 4, dtype=torch.float64))
    # near-unregularised transport is not solved within the step budget, but stays finite
    log_m, _ = sinkhorn(cost, 1e5)
    assert torch.isfinite(log_m).all()
    torch.testing.assert_close(log_m.exp().sum(2), torch.ones(3, 7, dtype=torch.float64))


def test_awkward_shapes_give_finite_scores(digits):
    x, y = digits
    cases = [
        digits_episode(x, y, 1, way=10, shot=1, queries=1)[0],  # 10-way 1-shot, 1 query per class
        digits_episode(x, y, 2, way=5, shot=1, queries=[0, 0, 1, 0, 0])[0],  # one query in all
        digits_episode(x, y, 3, way=5, shot=5, queries=[0, 12, 0, 0, 0])[0],  # all from one class
        digits_episode(x, y, 4, way=5, shot=1, queries=[3, 0, 7, 1, 0], n_unl=5, distractors=3)[0],
        digits_episode(x, y, 5, way=5, shot=1, queries=0)[0],  # no query at all
    ]
    for method in (PTMap(), PTMap(centring="joint"), PTMap(lam=1e4), PTMap(qr_reduction=False)):
        scores = method.predict_batch(cases, [TaskContext.create(i) for i in range(len(cases))])
        for task, s in zip(cases, scores, strict=True):
            assert s.shape == (task.query.shape[0], task.n_way)
            assert torch.isfinite(s).all()
            if len(s):  # log-probabilities of the mapping: each row sums to 1
                torch.testing.assert_close(s.exp().sum(1), torch.ones(len(s)), atol=1e-5, rtol=0)


def test_qr_reduction_is_exact(digits):
    """With fewer items than dimensions (30 < 64) the QR reduction only changes the basis."""
    x, y = digits
    tasks = [digits_episode(x, y, 20 + i, queries=5)[0] for i in range(5)]
    ctxs = [TaskContext.create(i) for i in range(5)]
    reduced = PTMap(qr_reduction=True).predict_batch(tasks, ctxs)
    full = PTMap(qr_reduction=False).predict_batch(tasks, ctxs)
    for a, b in zip(reduced, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        assert torch.equal(a.argmax(1), b.argmax(1))


def test_deterministic_and_independent_of_batch(digits):
    x, y = digits
    tasks = [
        digits_episode(x, y, 60 + i, queries=dirichlet_counts(60 + i, 5, 40))[0] for i in range(4)
    ]
    tasks += [digits_episode(x, y, 70 + i)[0] for i in range(4)]
    method = PTMap()
    a = method.predict_batch(tasks, [TaskContext.create(i) for i in range(8)])
    b = method.predict_batch(tasks, [TaskContext.create(i) for i in range(8)])
    for s, t, task in zip(a, b, tasks, strict=True):
        assert torch.equal(s, t)
        torch.testing.assert_close(s, method.predict(task, TaskContext.create(0)))


def test_beats_nearest_prototype_on_digits(digits):
    """100 5-way 1-shot episodes, 15 queries per class: PT-MAP is clearly above nearest-prototype
    on the same features (the paper reports large transductive gains in 1-shot)."""
    x, y = digits
    eps = [digits_episode(x, y, 1000 + i) for i in range(100)]
    tasks, labels = [e[0] for e in eps], [e[1] for e in eps]
    ctxs = [TaskContext.create(i) for i in range(100)]
    proto = available_methods()["nearest-prototype"]().predict_batch(tasks, ctxs)
    ptmap = PTMap().predict_batch(tasks, ctxs)
    acc_p, acc_m = accuracy(proto, labels), accuracy(ptmap, labels)
    assert acc_m > acc_p + 0.05, (acc_p, acc_m)
