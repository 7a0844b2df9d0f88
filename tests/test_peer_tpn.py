"""TPN's label propagation without meta-learning (``tpn``): the closed form is the limit of the
iteration, the graph is what the paper builds, awkward shapes, determinism, real-data accuracy.

Real data: episodes of scikit-learn's digits (64-dim features)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from digits_episodes import digits_episode, prototype_scores

from fewshot_bench.graph.build import Graph
from fewshot_bench.graph.spreading import label_spreading
from fewshot_bench.methods import TaskContext, available_methods
from fewshot_bench.methods.tpn import (
    TPN,
    gaussian_knn_graph,
    label_propagation,
    normalized_graph,
    tpn_propagate,
)
from fewshot_bench.tasks.task import Task


def items(task: Task) -> torch.Tensor:
    """The task's items in graph order, L2-normalised (TPN's default ``normalize``)."""
    unl = task.unlabeled.reshape(-1, task.support.shape[1])
    return F.normalize(torch.cat([task.support, unl, task.query]), dim=1)


def test_registered_with_the_paper_defaults():
    cls = available_methods()["tpn"]
    assert cls is TPN and cls.consumes == "features" and cls.setting == "transductive"
    assert cls.defaults["k"] == 20 and cls.defaults["alpha"] == 0.99


def test_closed_form_is_the_limit_of_the_iteration(digits):
    """F* = (I - αS)^-1 Y equals F_{t+1} = αSF_t + Y after many steps, and the sparse label
    spreading of fewshot_bench.graph (scipy LU, (1 - α) scaled) on the same graph."""
    x, y = digits
    task, _ = digits_episode(x, y, 3, shot=2, queries=6, n_unl=3, distractors=1)
    xs = items(task)[None]
    w = gaussian_knn_graph(xs, 20, sigma_scale=0.5)
    s = normalized_graph(w)
    n = xs.shape[1]
    yy = torch.zeros(1, n, 5, dtype=torch.float64)
    yy[0, torch.arange(10), task.support_labels] = 1.0
    for alpha in (0.5, 0.99):
        closed = label_propagation(s, yy, alpha)
        iterated = label_propagation(s, yy, alpha, n_iter=6000)
        torch.testing.assert_close(closed, iterated, rtol=1e-9, atol=1e-9)
        graph = Graph(sp.csr_matrix(w[0].numpy()), n)
        sparse = label_spreading(graph, np.arange(10), task.support_labels.numpy(), 5, alpha)
        torch.testing.assert_close((1 - alpha) * closed[0].float(), sparse, rtol=1e-4, atol=1e-6)
    # the method's query scores are those rows of F*, row-normalised, as log-probabilities
    method = TPN(sigma_scale=0.5)
    scores = method.predict(task, TaskContext.create(0))
    expected = tpn_propagate(xs, task.support_labels[None], 5, sigma_scale=0.5)[0, -30:]
    torch.testing.assert_close(scores, (expected / expected.sum(1, keepdim=True)).log().float())


def test_every_support_item_is_classified_as_its_label(digits):
    """With all queries in the graph, each support item's own row of F* peaks at its label."""
    x, y = digits
    for seed in range(10):
        task, _ = digits_episode(x, y, seed, shot=5, queries=15)
        fstar = tpn_propagate(items(task)[None], task.support_labels[None], 5)[0]
        assert torch.equal(fstar[:25].argmax(1), task.support_labels), seed


def test_graph_is_the_symmetrised_knn_gaussian_graph(digits):
    x, y = digits
    task, _ = digits_episode(x, y, 1, queries=8)
    xs = items(task)[None].double()
    n = xs.shape[1]
    w = gaussian_knn_graph(xs, 5, sigma_scale=1.0)[0]
    assert torch.equal(w, w.T) and bool((w.diagonal() == 0).all())
    d = torch.cdist(xs[0], xs[0])
    d = (0.5 * (d.pow(2) + d.pow(2).T)).sqrt()
    iu = torch.triu_indices(n, n, 1)
    sigma = d[iu[0], iu[1]].median()
    kernel = torch.exp(-d.pow(2) / (2 * sigma**2))
    nearest = d.fill_diagonal_(float("inf")).topk(5, largest=False).indices
    keep = torch.zeros(n, n, dtype=torch.bool)
    keep[torch.arange(n)[:, None], nearest] = True
    keep |= keep.T.clone()
    torch.testing.assert_close(w, torch.where(keep, kernel, torch.zeros_like(kernel)))
    # S = D^-1/2 W D^-1/2 is symmetric with spectral radius 1
    s = normalized_graph(w[None])[0]
    assert abs(float(torch.linalg.eigvalsh(s).abs().max()) - 1.0) < 1e-9
    # k is capped at n - 1: 20 neighbours on 7 items is the complete graph
    small = gaussian_knn_graph(xs[:, :7], 20, sigma_scale=1.0)[0]
    assert int((small > 0).sum()) == 7 * 6


def test_two_item_graph():
    """One support item and one query: a single edge, S = [[0, 1], [1, 0]], so
    F* = [1, α] / (1 - α²) in the class column."""
    xs = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    fstar = tpn_propagate(xs, torch.tensor([[0]]), 1)[0, :, 0]
    alpha = 0.99
    torch.testing.assert_close(
        fstar, torch.tensor([1.0, alpha], dtype=torch.float64) / (1 - alpha**2)
    )
    task = Task(xs[0, :1], torch.tensor([0]), torch.zeros(0, 2), xs[0, 1:], 1, "features")
    scores = TPN().predict(task, TaskContext.create(0))
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()


def test_awkward_shapes_give_finite_scores(digits):
    x, y = digits
    cases = [
        digits_episode(x, y, 0, way=10, shot=1, queries=1),  # 10-way 1-shot, one query per class
        digits_episode(x, y, 1, way=5, shot=1, queries=[1, 0, 0, 0, 0]),  # one query in all
        digits_episode(x, y, 2, way=5, shot=5, queries=[15, 0, 0, 0, 0]),  # one class only
        # pool + distractors
        digits_episode(x, y, 3, way=5, shot=1, queries=5, n_unl=5, distractors=3),
        digits_episode(x, y, 4, way=5, shot=1, queries=[7, 0, 3, 1, 4]),  # imbalanced
    ]
    for task, _ in cases:
        scores = TPN().predict(task, TaskContext.create(0))
        assert scores.shape == (task.query.shape[0], task.n_way)
        assert torch.isfinite(scores).all()
    # all items identical: the median distance is 0 and σ falls back to 1
    same = Task(
        torch.ones(2, 4), torch.tensor([0, 1]), torch.zeros(0, 4), torch.ones(3, 4), 2, "features"
    )
    assert torch.isfinite(TPN().predict(same, TaskContext.create(0))).all()


def test_queries_no_support_reaches_get_the_nearest_prototype():
    """A query cluster far from every support item (all its edges underflow): F* is 0 there, and
    the argmax is the nearest class mean, not class 0."""
    sup = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    qry = torch.tensor([[100.0, 0.0], [100.0, 1.0], [101.0, 0.0]])
    task = Task(sup, torch.tensor([0, 1]), torch.zeros(0, 2), qry, 2, "features")
    scores = TPN(normalize="none", sigma_scale=0.01).predict(task, TaskContext.create(0))
    assert torch.isfinite(scores).all()
    assert torch.equal(scores.argmax(1), torch.ones(3, dtype=torch.long))


def test_deterministic(digits):
    x, y = digits
    task, _ = digits_episode(x, y, 5, n_unl=4, distractors=2)
    a = TPN().predict(task, TaskContext.create(11))
    b = TPN().predict(task, TaskContext.create(11))
    assert torch.equal(a, b)


def test_beats_nearest_prototype_on_digits(digits):
    """100 5-way 1-shot episodes, 15 queries per class: transduction over the query set helps
    (measured: 82% against 73% for nearest-prototype)."""
    x, y = digits
    eps = [digits_episode(x, y, 1000 + i) for i in range(100)]
    scores = TPN().predict_batch([t for t, _ in eps], [TaskContext.create(i) for i in range(100)])
    acc = np.mean(
        [(s.argmax(1).numpy() == ql).mean() for s, (_, ql) in zip(scores, eps, strict=True)]
    )
    proto = np.mean([(prototype_scores(t).argmax(1).numpy() == ql).mean() for t, ql in eps])
    assert acc > proto + 0.04, (acc, proto)


@pytest.mark.parametrize("name", ["tpn", "ilpc"])
def test_pools_too_large_for_a_dense_graph_are_refused(name: str) -> None:
    """A pool of every class's unlabeled items (20k on Omniglot) would need gigabytes and hours
    per task as a dense graph: refused with the limit and the alternatives named."""
    from fewshot_bench.errors import ProtocolError
    from fewshot_bench.methods import available_methods
    from fewshot_bench.methods.tpn import DENSE_MAX_NODES

    g = torch.Generator().manual_seed(0)
    task = Task(
        torch.rand(5, 8, generator=g),
        torch.arange(5),
        torch.rand(DENSE_MAX_NODES, 8, generator=g),
        torch.rand(5, 8, generator=g),
        5,
        "features",
    )
    with pytest.raises(ProtocolError, match="dense .* graph.*diffusion"):
        available_methods()[name]().predict(task, TaskContext.create(0))
