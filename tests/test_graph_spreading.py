"""Label spreading with persistence (Zhou et al. 2004) on a real kNN graph (sklearn digits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fewshot_bench.graph.build import build_block_graph
from fewshot_bench.graph.spreading import label_spreading, normalized_affinity


@pytest.fixture(scope="module")
def graph_and_labels():
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))[:600]
    x, y = x[order].astype(np.float32), y[order]
    seeds = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)])
    rest = np.setdiff1d(np.arange(500), seeds)
    queries = np.arange(500, 600)
    graph = build_block_graph(
        torch.from_numpy(x[seeds]), torch.from_numpy(x[rest]), torch.from_numpy(x[queries]), k=10
    )
    labels = y[seeds]
    truth = np.concatenate([labels, y[rest], y[queries]])
    return graph, labels, truth


def test_closed_form_is_the_fixed_point_of_the_iteration(graph_and_labels):
    graph, labels, _ = graph_and_labels
    seeds = np.arange(len(labels))
    closed = label_spreading(graph, seeds, labels, 10, 0.5)
    iterated = label_spreading(graph, seeds, labels, 10, 0.5, n_iter=200)
    torch.testing.assert_close(closed, iterated, atol=1e-6, rtol=1e-5)
    # F* = (1 - α) Y + α S F*: the defining equation holds on the core nodes
    s = normalized_affinity(graph.core_adjacency())
    y = np.zeros((graph.n_core, 10))
    y[seeds, labels] = 1
    f = closed[: graph.n_core].double().numpy()
    np.testing.assert_allclose(f, 0.5 * (s @ f) + 0.5 * y, atol=1e-6)


def test_persistence_keeps_the_seeds_and_labels_the_rest(graph_and_labels):
    graph, labels, truth = graph_and_labels
    seeds = np.arange(len(labels))
    f = label_spreading(graph, seeds, labels, 10, 0.9)
    assert f.shape == (graph.n_nodes, 10)
    pred = f.argmax(1).numpy()
    assert (pred[seeds] == labels).all()  # the persistence term keeps every seed's own label
    acc_core = (pred[len(seeds) : graph.n_core] == truth[len(seeds) : graph.n_core]).mean()
    acc_out = (pred[graph.n_core :] == truth[graph.n_core :]).mean()
    assert acc_core > 0.8 and acc_out > 0.8, (acc_core, acc_out)
    with pytest.raises(ValueError, match="alpha"):
        label_spreading(graph, seeds, labels, 10, 1.0)
