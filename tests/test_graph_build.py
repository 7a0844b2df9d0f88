"""Graph assembly: blocked == monolithic, out-only query rows, background cache, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_bench.graph.build import (
    BackgroundGraphCache,
    Graph,
    build_block_graph,
    build_graph,
    graph_from_neighbors,
)
from fewshot_bench.graph.knn import Neighbors


def _data(n: int, d: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _same(a: Graph, b: Graph) -> None:
    assert (a.n_core, a.n_out) == (b.n_core, b.n_out)
    diff = (a.adjacency - b.adjacency).tocoo()
    assert diff.nnz == 0 or np.abs(diff.data).max() < 1e-5


@pytest.mark.parametrize("weight", ["binary", "exp"])
@pytest.mark.parametrize("with_queries", [True, False])
def test_blocked_equals_monolithic(weight: str, with_queries: bool) -> None:
    lab, bg, q = _data(40, seed=1), _data(1500, seed=2), _data(60, seed=3)
    out = q if with_queries else None
    mono = build_graph(np.concatenate([lab, bg]), out, k=8, index="flat", weight=weight)
    block = build_block_graph(lab, bg, out, k=8, index="flat", weight=weight)
    _same(mono, block)


def test_query_rows_are_out_only_and_transition_is_stochastic() -> None:
    core, q = _data(300), _data(20, seed=5)
    g = build_graph(core, q, k=6, index="flat")
    a = g.adjacency.tocsc()
    assert a[:, g.n_core :].nnz == 0  # nothing points at a query
    out_rows = g.out_adjacency()
    np.testing.assert_array_equal(np.diff(out_rows.indptr), 6)
    core_a = g.core_adjacency()
    assert abs(core_a - core_a.T).max() == 0  # symmetric W0 + W0ᵀ
    assert core_a.max() == 2.0  # mutual neighbours counted twice
    W = g.transition()
    rows = (W @ torch.ones(g.n_nodes, 1)).squeeze(1)
    torch.testing.assert_close(rows, torch.ones(g.n_nodes))


def test_graph_from_neighbors_by_hand() -> None:
    # 3 core nodes in a line (0-1, 1-2), one query pointing at node 2
    core = Neighbors(np.array([[1], [0], [1]]), np.ones((3, 1), np.float32))
    out = Neighbors(np.array([[2]]), np.ones((1, 1), np.float32))
    g = graph_from_neighbors(core, out)
    expected = np.array([[0, 2, 0, 0], [2, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32)
    np.testing.assert_array_equal(g.adjacency.toarray(), expected)


def test_memory_near_8nk() -> None:
    n, k = 5000, 10
    g = build_graph(_data(n, d=8), k=k, index="flat")
    assert g.adjacency.indices.dtype == np.int32 and g.adjacency.data.dtype == np.float32
    assert 8 * n * k <= g.nbytes <= 16 * n * k + 4 * (n + 1)


def test_background_cache_roundtrip(tmp_path) -> None:
    """Douze et al.'s offline/online split (``build="block"``): one W_BB per background."""
    lab, bg, q = _data(30, seed=1), _data(2000, seed=2), _data(10, seed=3)
    kw = {"k": 8, "index": "ivf", "nprobe": 4, "build": "block"}
    cache = BackgroundGraphCache(tmp_path)
    g1 = build_block_graph(lab, bg, q, cache=cache, **kw)
    assert cache.misses == 1 and len(list(tmp_path.glob("bg-*.npz"))) == 1
    g2 = build_block_graph(_data(30, seed=9), bg, q, cache=cache, **kw)
    assert cache.hits == 1  # other labeled set, same background: W_BB reused
    fresh = BackgroundGraphCache(tmp_path)  # a new process: read from disk
    g3 = build_block_graph(lab, bg, q, cache=fresh, **kw)
    assert fresh.hits == 1
    _same(g1, g3)
    assert g2.n_nodes == g1.n_nodes
    uncached = build_block_graph(lab, bg, q, **kw)
    _same(g1, uncached)
    # the background in another order is the same background: a hit, and the same graph
    perm = np.random.default_rng(0).permutation(len(bg))
    g4 = build_block_graph(lab, bg[perm], q, cache=fresh, **kw)
    assert fresh.hits == 2
    _same_permuted(g1, g4, np.concatenate([np.arange(30), 30 + perm, 2030 + np.arange(10)]))


def _same_permuted(a, b, nodes: np.ndarray) -> None:
    """``b`` is ``a`` with its nodes listed in the order ``nodes`` (b's node i is a's nodes[i])."""
    np.testing.assert_array_equal(a.adjacency[nodes][:, nodes].toarray(), b.adjacency.toarray())


def test_union_graph_is_shared_by_tasks_labeling_other_items_of_one_pool(tmp_path) -> None:
    """``build="union"`` with an approximate index: one graph over labeled + pool, shared by every
    task that splits the same items differently into labeled and unlabeled, in any order; the
    same graph with or without the cache."""
    pool, q = _data(2030, seed=2), _data(10, seed=3)
    kw = {"k": 8, "index": "ivf", "nprobe": 4}
    cache = BackgroundGraphCache(tmp_path)
    g1 = build_block_graph(pool[:30], pool[30:], q, cache=cache, **kw)
    assert cache.misses == 2  # the core graph and the queries' lists
    perm = np.random.default_rng(1).permutation(len(pool))  # other labeled items, other order
    qperm = np.random.default_rng(2).permutation(len(q))
    g2 = build_block_graph(pool[perm[:30]], pool[perm[30:]], q[qperm], cache=cache, **kw)
    assert cache.hits == 2 and cache.misses == 2
    _same_permuted(g1, g2, np.concatenate([perm, 2030 + qperm]))
    uncached = build_block_graph(pool[perm[:30]], pool[perm[30:]], q[qperm], **kw)
    _same(g2, uncached)
    fresh = BackgroundGraphCache(tmp_path)  # a new process: read from disk
    _same(g1, build_block_graph(pool[:30], pool[30:], q, cache=fresh, **kw))
    assert fresh.hits == 2


def test_union_and_block_agree_when_the_search_is_exact() -> None:
    lab, bg, q = _data(30, seed=1), _data(600, seed=2), _data(10, seed=3)
    union = build_block_graph(lab, bg, q, k=8, index="flat")
    block = build_block_graph(lab, bg, q, k=8, index="flat", build="block")
    _same(union, block)
    whole = build_graph(np.concatenate([lab, bg]), q, k=8, index="flat")
    _same(union, whole)
