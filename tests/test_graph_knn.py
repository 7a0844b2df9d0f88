"""kNN search: exact Flat, list-major IVF (== faiss IndexIVFFlat), HNSW, merging, GPU path."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from fewshot_bench.graph.knn import (
    KnnIndex,
    Neighbors,
    choose_index,
    exclude_self,
    knn_search,
    merge_neighbors,
)


def _data(n: int = 2000, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _brute(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        s = q @ x.T
    else:
        s = -((q[:, None, :] - x[None]) ** 2).sum(-1)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, 1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_search_is_exact(metric: str) -> None:
    x, q = _data(800), _data(50, seed=1)
    nb = knn_search(x, q, 7, metric=metric, index="flat")
    idx, sims = _brute(x, q, 7, metric)
    np.testing.assert_array_equal(nb.indices, idx)
    np.testing.assert_allclose(nb.sims, sims, rtol=1e-4, atol=1e-4)


def test_self_graph_excludes_self_even_with_duplicates() -> None:
    x = _data(300)
    x[10] = x[11]  # exact duplicate pair
    nb = knn_search(x, None, 5, index="flat")
    assert nb.indices.shape == (300, 5)
    assert not (nb.indices == np.arange(300)[:, None]).any()
    assert 11 in nb.indices[10] and 10 in nb.indices[11]


def test_exclude_self_drops_last_when_self_absent() -> None:
    nb = Neighbors(
        np.array([[3, 4, 5], [1, 2, 0]]), np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]], np.float32)
    )
    out = exclude_self(nb, np.array([0, 1]), 2)
    np.testing.assert_array_equal(out.indices, [[3, 4], [2, 0]])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_bulk_matches_faiss_ivfflat(metric: str) -> None:
    x = _data(3000)
    idx = KnnIndex(x, metric=metric, index="ivf", nlist=32, nprobe=3)
    ours = idx.search(x[:400], 10)
    quant = faiss.IndexFlatL2(16) if metric == "l2" else faiss.IndexFlatIP(16)
    quant.add(idx.centroids)
    fm = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    ref = faiss.IndexIVFFlat(quant, 16, idx.nlist, fm)
    ref.add_core(
        idx.n, faiss.swig_ptr(idx.xb), None, faiss.swig_ptr(np.ascontiguousarray(idx.assign))
    )
    ref.nprobe = 3
    d, i = ref.search(idx.xb[:400], 10)
    tie_free = (np.diff(ours.sims, axis=1) != 0).all(1)
    np.testing.assert_array_equal(ours.indices[tie_free], i[tie_free])
    np.testing.assert_allclose(ours.sims, -d if metric == "l2" else d, rtol=1e-4, atol=1e-3)
    # the torch merge (the CUDA code path) gives the same lists (up to the order of exact ties)
    idx._force_torch_merge = True
    other = idx.search(x[:400], 10)
    np.testing.assert_allclose(other.sims, ours.sims, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.sort(other.indices, 1), np.sort(ours.indices, 1))


def test_ivf_state_rebuilds_same_index_and_recall_is_high() -> None:
    x = _data(5000, d=8)
    a = KnnIndex(x, index="ivf", nprobe=8)
    b = KnnIndex(x, index="ivf", nprobe=8, state=a.state())
    ga, gb = a.search_self(10), b.search_self(10)
    np.testing.assert_array_equal(ga.indices, gb.indices)
    exact = knn_search(x, None, 10, index="flat")
    recall = np.mean(
        [len(set(r) & set(e)) / 10 for r, e in zip(ga.indices, exact.indices, strict=True)]
    )
    assert recall > 0.85  # isotropic Gaussian: the hardest case for IVF


def test_hnsw_recall() -> None:
    x = _data(2000, d=8)
    nb = knn_search(x, x[:200], 5, index="hnsw")
    exact = knn_search(x, x[:200], 5, index="flat")
    assert (nb.indices[:, 0] == exact.indices[:, 0]).mean() > 0.95


def test_k_larger_than_base_pads_missing() -> None:
    nb = knn_search(_data(4), _data(2, seed=3), 6, index="flat")
    assert nb.indices.shape == (2, 6)
    assert (nb.indices[:, 4:] == -1).all() and np.isneginf(nb.sims[:, 4:]).all()
    self_nb = knn_search(_data(4), None, 6)
    assert ((self_nb.indices >= 0).sum(1) == 3).all()


def test_merge_neighbors_keeps_global_topk() -> None:
    a = Neighbors(np.array([[0, 1]]), np.array([[0.9, 0.1]], np.float32))
    b = Neighbors(np.array([[5, -1]]), np.array([[0.5, -np.inf]], np.float32))
    m = merge_neighbors([a, b], 3)
    np.testing.assert_array_equal(m.indices, [[0, 5, 1]])


def test_choose_index() -> None:
    assert choose_index(1000, 1000) == "flat"
    assert choose_index(1_000_000, 1_000_000) == "ivf"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_search_matches_cpu() -> None:
    x = _data(3000)
    cpu = knn_search(x, None, 10, index="flat")
    gpu = knn_search(x, None, 10, index="flat", device="cuda")
    assert (cpu.indices == gpu.indices).mean() > 0.99
    ivf_cpu = KnnIndex(x, index="ivf", nlist=32, nprobe=4)
    ivf_gpu = KnnIndex(x, index="ivf", nprobe=4, device="cuda", state=ivf_cpu.state())
    assert (ivf_cpu.search_self(10).indices == ivf_gpu.search_self(10).indices).mean() > 0.99
