"""Spectral embedding: two disconnected cliques, solver agreement, out-node extension, voting."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from fewshot_bench.graph.build import Graph, build_graph
from fewshot_bench.graph.spectral import extend_to_out_nodes, spectral_embedding, vote


def _two_cliques(m: int = 6) -> sp.csr_matrix:
    a = np.zeros((2 * m, 2 * m), np.float32)
    a[:m, :m] = 1
    a[m:, m:] = 1
    np.fill_diagonal(a, 0)
    return sp.csr_matrix(a)


def test_two_disconnected_cliques() -> None:
    m = 6
    emb = spectral_embedding(_two_cliques(m), n_eig=200)
    assert emb.vectors.shape == (2 * m, 2 * m - 1)  # η clipped to n: j = 2..n
    assert abs(float(emb.eigvals[0]) - 1.0) < 1e-5  # λ_2 = 0: the component contrast
    # the trivial eigenvector ∝ sqrt(d) has been deflated, so e_2 is the ±contrast
    e2 = emb.vectors[:, 0]
    assert (torch.sign(e2[:m]) == torch.sign(e2[0])).all() and (
        torch.sign(e2[m:]) != torch.sign(e2[0])
    ).all()
    e = emb.embedding()
    scores = vote(e[[0, m]], torch.tensor([0, 1]), e, 2, sigma=40.0)
    np.testing.assert_array_equal(scores.argmax(1).numpy(), [0] * m + [1] * m)


def test_chebyshev_matches_dense() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((800, 4)).astype(np.float32)
    adj = build_graph(x, k=8, index="flat").adjacency
    gen = torch.Generator().manual_seed(0)
    cheb = spectral_embedding(adj, n_eig=12, solver="chebyshev", tol=1e-4, generator=gen)
    dense = spectral_embedding(adj, n_eig=12, solver="dense")
    torch.testing.assert_close(cheb.eigvals, dense.eigvals, atol=1e-4, rtol=0)
    # same invariant subspace: projections agree up to rotation within near-degenerate groups
    overlap = (cheb.vectors.T @ dense.vectors).abs()
    assert float(overlap.max(1).values.min()) > 0.9
    arpack = spectral_embedding(adj, n_eig=12, solver="arpack", tol=1e-6)
    torch.testing.assert_close(arpack.eigvals, dense.eigvals, atol=1e-4, rtol=0)


def test_out_node_extension_lands_in_its_clique() -> None:
    m = 6
    core = _two_cliques(m)
    out = sp.csr_matrix((np.ones(3, np.float32), [m, m + 1, m + 2], [0, 3]), shape=(1, 2 * m))
    a = sp.vstack(
        [sp.hstack([core, sp.csr_matrix((2 * m, 1))]), sp.hstack([out, sp.csr_matrix((1, 1))])]
    ).tocsr()
    g = Graph(a.astype(np.float32), n_core=2 * m, n_out=1)
    e = spectral_embedding(g.core_adjacency(), n_eig=50).embedding()
    eq = extend_to_out_nodes(e, g)
    scores = vote(e[[0, m]], torch.tensor([0, 1]), eq, 2, sigma=40.0)
    assert int(scores.argmax(1)) == 1


def test_vote_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    t = torch.tensor([[1.0, 0.0]])
    sigma = 2.0
    got = vote(a, labels, t, 3, sigma)
    c0 = math.log((math.exp(sigma * 1.0) + math.exp(0.0)) / 2)
    c1 = sigma / math.sqrt(2)
    torch.testing.assert_close(got[0, :2], torch.tensor([c0, c1]))
    assert got[0, 2] == -math.inf  # a class without labels
    w = vote(a, labels, t, 2, sigma, weights=torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(w[0, 0], torch.tensor(sigma * 1.0))
