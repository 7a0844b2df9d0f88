"""Diffusion: chain graph by hand, two clusters, normalisations, column batching, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_bench.graph.build import build_graph, to_torch_csr
from fewshot_bench.graph.diffusion import (
    diffuse,
    diffuse_select,
    leave_some_out_folds,
    normalize,
    scores_to_log_probs,
    select_n_iter,
    sinkhorn,
)


def _chain(n: int = 5) -> tuple[np.ndarray, torch.Tensor]:
    a = np.zeros((n, n), np.float32)
    for i in range(n - 1):
        a[i, i + 1] = a[i + 1, i] = 1
    w = a / a.sum(1, keepdims=True)
    import scipy.sparse as sp

    s = sp.csr_matrix(w)
    return w, to_torch_csr(s.indptr, s.indices, s.data, s.shape)


def test_chain_matches_matrix_power() -> None:
    w, W = _chain()
    L0 = np.zeros((5, 2), np.float32)
    L0[0, 0] = L0[4, 1] = 1
    for t in range(5):
        got = diffuse(W, torch.tensor([0, 4]), torch.tensor([0, 1]), 2, t, norm="none")
        np.testing.assert_allclose(got.numpy(), np.linalg.matrix_power(w, t) @ L0, atol=1e-6)
    # column normalisation by hand: after one step from node 0 mass sits on node 1 only
    got = diffuse(W, torch.tensor([0, 4]), torch.tensor([0, 1]), 2, 2, norm="col")
    ref = L0.copy()
    for _ in range(2):
        ref = w @ ref
        ref /= ref.sum(0, keepdims=True)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    # seeds are not reset: node 0 loses its own label at step 1 (no self-loop)
    assert float(diffuse(W, torch.tensor([0]), torch.tensor([0]), 1, 1, norm="none")[0, 0]) == 0.0


def _two_clusters(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    x = rng.standard_normal((n, 5)).astype(np.float32) * 0.3
    x[:, 0] += np.where(y == 0, -3.0, 3.0)
    return x, y


@pytest.mark.parametrize("norm", ["col", "row", "sinkhorn", "none"])
def test_two_clusters_propagate_perfectly(norm: str) -> None:
    x, y = _two_clusters()
    g = build_graph(x, k=8, metric="l2", index="flat")
    W = g.transition()
    seeds = torch.tensor([0, 150])
    L = diffuse(W, seeds, torch.from_numpy(y[[0, 150]]), 2, 20, norm=norm)
    assert (L.argmax(1).numpy() == y).all()


def test_column_batches_equal_full() -> None:
    x, _ = _two_clusters(300)
    W = build_graph(x, k=6, index="flat").transition()
    seeds = torch.arange(0, 300, 10)
    labels = torch.arange(30) % 7
    full = diffuse(W, seeds, labels, 7, 4, norm="col")
    batched = diffuse(W, seeds, labels, 7, 4, norm="col", class_batch=2)
    torch.testing.assert_close(full, batched)
    rec = diffuse(
        W,
        seeds,
        labels,
        7,
        4,
        norm="col",
        class_batch=3,
        rows=torch.tensor([1, 2]),
        record_all=True,
    )
    torch.testing.assert_close(rec[-1], full[[1, 2]])
    with pytest.raises(ValueError):
        diffuse(W, seeds, labels, 7, 2, norm="row", class_batch=2)


def test_sinkhorn_columns_match_prior() -> None:
    L = torch.rand(50, 3) + 0.01
    L[7] = 0  # an unreached node stays unreached
    prior = torch.tensor([0.5, 0.3, 0.2])
    out = sinkhorn(L.clone(), prior, n_iter=5)
    torch.testing.assert_close(out.sum(0) / out.sum(), prior)
    assert float(out[7].sum()) == 0
    torch.testing.assert_close(out.sum(0), prior * 49)
    rows = out.sum(1)[torch.arange(50) != 7]
    assert float((rows - 1).abs().max()) < 0.05  # rows close to 1 after 5 iterations


def test_row_and_gamma_normalisation() -> None:
    L = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    torch.testing.assert_close(normalize(L.clone(), "row"), torch.tensor([[0.25, 0.75], [0, 0]]))
    torch.testing.assert_close(
        normalize(L.clone(), "none", gamma=2.0), torch.tensor([[1.0, 9.0], [0, 0]])
    )
    lp = scores_to_log_probs(torch.tensor([[0.0, 0.0], [1.0, 3.0]]))
    torch.testing.assert_close(
        lp.exp(), torch.tensor([[0.5, 0.5], [0.25, 0.75]]), atol=1e-6, rtol=0
    )


def test_leave_some_out_folds() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    folds = leave_some_out_folds(labels, 3, gen)
    assert len(folds) == 3
    for f in folds:
        assert sorted(labels[f.held_out].tolist()) == [0, 1, 2]
        assert set(labels[f.train].tolist()) == {0, 1, 2}
        assert len(set(f.train.tolist()) | set(f.held_out.tolist())) == 9
    assert leave_some_out_folds(torch.tensor([0, 1, 1]), 3, gen) == []


def test_select_n_iter_in_range() -> None:
    x, y = _two_clusters()
    W = build_graph(x, k=8, metric="l2", index="flat").transition()
    seeds = torch.tensor([0, 1, 2, 150, 151, 152])
    labels = torch.from_numpy(y[seeds.numpy()])
    folds = leave_some_out_folds(labels, 2, torch.Generator().manual_seed(0))
    best, acc = select_n_iter(W, seeds, labels, 2, folds, max_iter=6, norm="col")
    assert 1 <= best <= 6 and acc.shape == (6,)
    assert float(acc.max()) == 1.0


@pytest.mark.parametrize("norm", ["col", "row", "sinkhorn"])
def test_one_pass_selection_equals_separate_passes(norm: str) -> None:
    x, y = _two_clusters(300, seed=3)
    x[:, 0] *= 0.25  # overlapping clusters: accuracy varies with t
    g = build_graph(x, k=6, metric="l2", index="flat")
    W = g.transition()
    seeds = torch.tensor([0, 1, 2, 3, 150, 151, 152, 153])
    labels = torch.from_numpy(y[seeds.numpy()])
    folds = leave_some_out_folds(labels, 3, torch.Generator().manual_seed(1))
    rows = torch.arange(0, 300, 7)
    best, acc = select_n_iter(W, seeds, labels, 2, folds, max_iter=8, norm=norm)
    ref = diffuse(W, seeds, labels, 2, best, rows=rows, norm=norm)
    best1, acc1, got = diffuse_select(W, seeds, labels, 2, folds, max_iter=8, rows=rows, norm=norm)
    assert best1 == best
    torch.testing.assert_close(acc1, acc)
    torch.testing.assert_close(got, ref)
    # the fallback (budget too small for the widened L) gives the same answer
    best2, _, got2 = diffuse_select(
        W, seeds, labels, 2, folds, max_iter=8, rows=rows, norm=norm, budget_bytes=1
    )
    assert best2 == best
    torch.testing.assert_close(got2, ref)


@pytest.mark.parametrize("cols", [1, 12, 13, 40, 57])
def test_chunked_sparse_product_has_the_bits_of_one_product(
    digits: tuple[np.ndarray, np.ndarray], cols: int
) -> None:
    """The CPU products run in column chunks: every width gives exactly ``W @ L``."""
    from fewshot_bench.graph.spmm import sparse_matmul

    x, _ = digits
    W = build_graph(x, k=10).transition()
    L = torch.rand((W.shape[0], cols), generator=torch.Generator().manual_seed(cols))
    assert torch.equal(sparse_matmul(W, L), W @ L)


def test_chunks_only_while_a_chunk_fits_in_cache() -> None:
    from fewshot_bench.graph.spmm import SPMM_MAX_COLUMNS, chunk_width

    assert chunk_width(1797, 40) == SPMM_MAX_COLUMNS
    assert chunk_width(1797, SPMM_MAX_COLUMNS) == SPMM_MAX_COLUMNS  # narrow: one product
    assert chunk_width(150_000, 40) == 10
    assert chunk_width(1_000_000, 40) == 40  # every gather misses cache anyway: one product


def test_reordered_matrix_has_the_bits_of_the_original(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """Stored in the IVF lists' order, a transition matrix still returns exactly ``W @ L``."""
    from fewshot_bench.errors import InputDataError
    from fewshot_bench.graph.build import graph_from_neighbors
    from fewshot_bench.graph.knn import KnnIndex
    from fewshot_bench.graph.spmm import ReorderedCsr

    x, y = digits
    idx = KnnIndex(x, index="ivf", nprobe=4)
    W = graph_from_neighbors(idx.search_self(10)).transition()
    order = idx.list_order
    assert order is not None and not np.array_equal(order, np.arange(len(x)))
    L = torch.rand((len(x), 40), generator=torch.Generator().manual_seed(0))
    R = ReorderedCsr(W, order)
    assert torch.equal(R @ L, W @ L)
    seeds = torch.arange(0, len(x), 20)
    labels = torch.from_numpy(y[seeds.numpy()]).long()
    folds = leave_some_out_folds(labels, 3, torch.Generator().manual_seed(0))
    a = diffuse_select(W, seeds, labels, 10, folds)
    b = diffuse_select(R, seeds, labels, 10, folds)  # type: ignore[arg-type]
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert KnnIndex(x, index="flat").list_order is None
    with pytest.raises(InputDataError, match="each of the"):
        ReorderedCsr(W, np.arange(len(x) - 1))
