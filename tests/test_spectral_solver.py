"""The sparse spectral solver (chebyshev): residuals, orthonormality, scipy agreement, node order,
and the ``perf propagation --spectral-solvers`` comparison."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import eigsh
from sklearn.datasets import load_digits

from fewshot_bench import perf
from fewshot_bench.graph import spectral
from fewshot_bench.graph.build import build_graph, to_torch_csr
from fewshot_bench.graph.spectral import locality_order, normalized_adjacency, spectral_embedding
from fewshot_bench.graph.spmm import sparse_matmul

ETA = 120


@pytest.fixture(scope="module")
def digits_graph() -> sp.csr_matrix:
    x = load_digits().data.astype(np.float32)
    return build_graph(x, k=10, index="flat").adjacency


def _cheb(adj: sp.csr_matrix, seed: int = 0, **kw: float) -> spectral.SpectralEmbedding:
    gen = torch.Generator().manual_seed(seed)
    return spectral_embedding(adj, ETA, solver="chebyshev", generator=gen, **kw)


def test_residuals_meet_the_eta_aware_tolerance(digits_graph: sp.csr_matrix) -> None:
    tol, relax = 1e-3, 10.0
    emb = _cheb(digits_graph, tol=tol, tail_relax=relax)
    s, sqrt_d = normalized_adjacency(digits_graph)
    v = emb.vectors.double().numpy()
    mu = emb.eigvals.double().numpy()
    res = np.linalg.norm(s.astype(np.float64) @ v - v * mu, axis=0)
    lam = 1.0 - mu
    limit = tol * np.clip(np.sqrt(lam / lam[0]), 1.0, relax)
    assert (res <= 1.05 * limit).all(), (res / limit).max()  # 5%: float32 Ritz vectors
    assert (np.diff(mu) <= 1e-6).all()  # descending
    np.testing.assert_allclose(v.T @ v, np.eye(ETA - 1), atol=1e-4)  # orthonormal
    e1 = sqrt_d / np.linalg.norm(sqrt_d)
    assert np.abs(v.T @ e1).max() < 1e-4  # the trivial pair stays out


def test_agrees_with_scipy_eigsh(digits_graph: sp.csr_matrix) -> None:
    s, sqrt_d = normalized_adjacency(digits_graph)
    mu_ref, vec_ref = eigsh(s.astype(np.float64), k=ETA, which="LA", tol=1e-10)
    order = np.argsort(-mu_ref)[1:]  # drop the trivial μ = 1
    mu_ref, vec_ref = mu_ref[order], vec_ref[:, order]
    emb = _cheb(digits_graph, tail_relax=1.0)
    np.testing.assert_allclose(emb.eigvals.double().numpy(), mu_ref, atol=1e-5)
    # the leading half spans the same subspace (cosines of the principal angles ~ 1)
    h = ETA // 2
    cos = np.linalg.svd(emb.vectors[:, :h].double().numpy().T @ vec_ref[:, :h], compute_uv=False)
    assert cos.min() > 0.999


def test_deterministic_by_seed_and_independent_of_node_order(digits_graph: sp.csr_matrix) -> None:
    a, b = _cheb(digits_graph, seed=3), _cheb(digits_graph, seed=3)
    assert torch.equal(a.eigvals, b.eigvals) and torch.equal(a.vectors, b.vectors)
    # renumbered nodes: the same eigenvalues, and eigenvectors whose rows follow the nodes
    # (the solver's own cache-friendly renumbering is undone on the way out)
    perm = np.random.default_rng(0).permutation(digits_graph.shape[0])
    a = _cheb(digits_graph, seed=3, tail_relax=1.0)  # one tolerance: every pair to 1e-5
    c = _cheb(digits_graph[perm][:, perm].tocsr(), seed=3, tail_relax=1.0)
    torch.testing.assert_close(c.eigvals, a.eigvals, atol=1e-5, rtol=0)
    h = ETA // 4
    pa, pc = a.vectors[perm, :h].double(), c.vectors[:, :h].double()
    cos = torch.linalg.svdvals(pa.T @ pc)
    assert float(cos.min()) > 0.999


def test_locality_order_and_blocked_product(digits_graph: sp.csr_matrix) -> None:
    s, _ = normalized_adjacency(digits_graph)
    order = locality_order(s)
    assert np.array_equal(np.sort(order), np.arange(s.shape[0]))
    sr = s[order][:, order].tocoo()
    sc = s.tocoo()
    assert np.median(np.abs(sr.row - sr.col)) < 0.5 * np.median(np.abs(sc.row - sc.col))
    st = to_torch_csr(s.indptr, s.indices, s.data, s.shape)
    x = torch.randn(s.shape[0], 2 * spectral.SPMM_COLUMNS + 5, generator=torch.Generator())
    torch.testing.assert_close(
        sparse_matmul(st, x, spectral.SPMM_COLUMNS), torch.from_numpy(s @ x.numpy())
    )


def test_iteration_cap_still_returns_every_pair(digits_graph: sp.csr_matrix) -> None:
    emb = _cheb(digits_graph, max_iter=1)
    assert emb.vectors.shape == (digits_graph.shape[0], ETA - 1) and emb.eigvals.shape == (ETA - 1,)
    assert torch.isfinite(emb.vectors).all()
    v = emb.vectors.double()
    torch.testing.assert_close(v.T @ v, torch.eye(ETA - 1, dtype=torch.float64), atol=1e-4, rtol=0)


def test_perf_spectral_solvers_table(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    perf.add_perf_parser(parser.add_subparsers(dest="command"))
    argv = "--spectral-solvers --data synthetic --n 1500 --dim 8 --k 10 --n-eig 20 --no-sklearn"
    args = parser.parse_args(["perf", "propagation", *argv.split()])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    ours = next(line for line in out.splitlines() if line.startswith("ours: solver=auto"))
    exact = next(line for line in out.splitlines() if line.startswith("exact: ARPACK"))
    acc = [float(line.split()[-1]) for line in (ours, exact)]  # accuracy at σ = 40
    assert acc[0] > 50 and abs(acc[0] - acc[1]) < 1.0, out
