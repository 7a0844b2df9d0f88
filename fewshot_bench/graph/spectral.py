"""Spectral propagation (metric transfer, eq. 6) without ever forming an ``N x N`` matrix.

With ``S = D^-1/2 A D^-1/2`` and ``L_sym = I - S``, the η smallest eigenpairs ``(λ_j, e_j)`` of
``L_sym`` are the η largest ``(μ_j = 1 - λ_j)`` of ``S``, which is what we compute. The new
metric ``W' = Σ_{j=2..η} e_j e_jᵀ / λ_j`` is used through the embedding ``E_j = e_j / sqrt(λ_j)``
(``W'[u, v] = <E_u, E_v>``); on a graph of ``n ≤ η`` nodes it is ``Σ_{j=2..n}``.

The trivial pair ``(λ_1 = 0, e_1 ∝ D^{1/2} 1)`` is *excluded*, not merely deflated to another
eigenvalue: every solver works on the restriction of ``S`` to the orthogonal complement of
``e_1``, whose eigenpairs are exactly ``j = 2..n``. (Forming ``S - e_1 e_1ᵀ`` alone is not
enough: it moves ``e_1`` to ``μ = 0``, i.e. ``λ = 1``, which is then among the kept pairs
whenever ``λ_η ≥ 1`` -- always when ``n ≤ η``, so on every few-shot episode graph -- and pushes
out the last useful pair ``j = η``.)

- ``dense``: ``eigh`` of ``S - 3 e_1 e_1ᵀ``: ``e_1`` moves to ``μ = -2``, strictly below the
  spectrum ``[-1, 1]`` of ``S`` (no tie even on a bipartite component, whose ``μ = -1``), so the
  top ``min(η, n) - 1`` pairs are exactly ``j = 2..min(η, n)`` for any ``n``.
- ``chebyshev``: Chebyshev-filtered subspace iteration (block size η + buffer, polynomial
  filter damping ``[-1, cut]``, Rayleigh-Ritz) on ``P S P`` with ``P = I - e_1 e_1ᵀ``; the block
  is re-projected onto ``e_1^⊥`` after every filter, so ``e_1`` can never enter the Ritz basis
  (a shift would not do here: the filter *amplifies* anything below ``-1``). Converged leading
  pairs are locked (no longer filtered), the tolerance is η-aware (looser for the pairs eq. 6
  weighs least, see :func:`_chebyshev_subspace`), and the graph is renumbered in reverse
  Cuthill-McKee order so that the sparse products, which dominate, run from cache. All in
  torch, so it runs on CUDA too. About 4-5 CPU s at 50k nodes x 30 neighbours, η = 200.
- ``arpack``: ``scipy.sparse.linalg.eigsh`` (``which="LA"``) on ``S - 3 e_1 e_1ᵀ``, for reference.

Disconnected graphs: ``λ = 0`` then has multiplicity ``c`` (the number of components). Only
the single direction ``e_1 = D^{1/2} 1 / ||.||`` of that eigenspace is excluded; the other
``c - 1`` zero-``λ`` directions (the ``D^{1/2}``-weighted contrasts between components, any
orthonormal basis of them: ``W'`` only depends on their span) are kept as ``j = 2..c``, as in
eq. 6 and the reference code. Their ``1/λ`` weight is capped by flooring ``λ`` at
``lambda_floor`` (1e-6, i.e. a factor ``1/sqrt(1e-6) = 1000`` on those embedding columns), so
they dominate ``W'``: under the cosine of :func:`vote` nodes of different components get a
negative similarity (about -1 with two components) and nodes of one component a cosine near
1, their within-component differences being a small perturbation that still orders the votes.
The same floor keeps ``1/λ`` finite for a connected graph whose ``λ_2`` rounds to 0 in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import reverse_cuthill_mckee

from fewshot_bench.graph.build import Graph, to_torch_csr
from fewshot_bench.graph.spmm import sparse_matmul
from fewshot_bench.graph.threads import (
    SMALL_PROBLEM_NODES,
    few_threads,
    n_workers,
    parallel_map,
    split_ranges,
)

SOLVERS = ("auto", "dense", "chebyshev", "arpack")


@dataclass
class SpectralEmbedding:
    """``eigvals``: ``μ_j`` of ``S`` (descending, j = 2..min(η, n)); ``vectors``: ``e_j``.

    ``vectors`` is ``[n, min(η, n) - 1]``, orthonormal columns orthogonal to the trivial
    ``e_1 ∝ D^{1/2} 1``.
    """

    eigvals: torch.Tensor
    vectors: torch.Tensor
    lambda_floor: float = 1e-6

    @property
    def laplacian_eigvals(self) -> torch.Tensor:
        """``λ_j = 1 - μ_j`` of ``L_sym``, floored at ``lambda_floor`` (keeps ``1/λ_j`` finite).

        ``λ_j ≈ 0`` for ``j ≥ 2`` only on a graph with several components (see the module
        docstring); the floor then caps those directions' weight at ``1/lambda_floor``.
        """
        return (1.0 - self.eigvals).clamp_min(self.lambda_floor)

    def embedding(self) -> torch.Tensor:
        """``E = [e_j / sqrt(λ_j)]``: ``<E_u, E_v> = W'[u, v]`` of eq. 6."""
        return self.vectors / self.laplacian_eigvals.sqrt()


def normalized_adjacency(a: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """``S = D^-1/2 A D^-1/2`` and ``sqrt(d)``."""
    deg = np.asarray(a.sum(axis=1), dtype=np.float64).ravel()
    sq = np.sqrt(np.maximum(deg, 1e-300))
    inv = np.where(deg > 0, 1.0 / sq, 0.0)
    coo_scale = inv[np.repeat(np.arange(a.shape[0]), np.diff(a.indptr))] * inv[a.indices]
    s = sp.csr_matrix(((a.data * coo_scale).astype(np.float32), a.indices, a.indptr), shape=a.shape)
    return s, np.where(deg > 0, sq, 0.0)


#: ``S - TRIVIAL_SHIFT e_1 e_1ᵀ`` moves the trivial pair from ``μ = 1`` to ``μ = -2``, strictly
#: below the spectrum ``[-1, 1]`` of ``S`` (dense and ARPACK solvers).
TRIVIAL_SHIFT = 3.0
#: Largest ``|<b, x_i>|`` (``b``: ``e_1`` or a locked eigenvector) tolerated in a Chebyshev
#: block before it is re-projected.
LEAK_TOL = 1e-5
#: Columns per sparse product on CPU (:func:`~fewshot_bench.graph.spmm.sparse_matmul`): in
#: locality order a ``[n, 32]`` float32 block keeps the gathered rows in cache (measured at 50k
#: nodes x 47 edges: 0.4 ms per column by 32-column blocks, 0.7-0.9 ms as one 240-column product).
SPMM_COLUMNS = 32


def spectral_embedding(
    adjacency: sp.csr_matrix,
    n_eig: int = 200,
    *,
    solver: str = "auto",
    tol: float = 1e-3,
    max_iter: int = 60,
    degree: int = 10,
    buffer: int | None = None,
    tail_relax: float = 10.0,
    lambda_floor: float = 1e-6,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> SpectralEmbedding:
    """The non-trivial eigenpairs ``j = 2..min(η, n)`` of the normalised graph of ``adjacency``.

    ``n_eig`` is η of eq. 6 (the trivial ``j = 1`` counts towards it, as in the paper's code,
    which keeps eigenvectors 2..200 of the 200 smallest), so ``min(η, n) - 1`` pairs come back,
    never the trivial ``e_1 ∝ D^{1/2} 1`` (see the module docstring, also for disconnected
    graphs). ``adjacency`` must be symmetric. ``tol`` bounds each returned eigenpair's residual
    ``||S e - μ e||`` (arpack), and for chebyshev that of the leading pairs, loosened for pair
    ``j`` by ``min(tail_relax, sqrt(λ_j / λ_2))`` since eq. 6 weighs ``e_j`` by ``1/sqrt(λ_j)``
    in the embedding (``tail_relax=1``: the same ``tol`` for all); ``dense`` is exact to float64
    rounding of float32 ``S``. ``degree``, ``buffer`` and ``max_iter``: chebyshev's filter
    degree, extra block columns and iteration cap. ``solver="auto"``: dense up to 1000 nodes or
    when the block would exceed a third of them, else chebyshev.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}")
    device = torch.device(device)
    n = adjacency.shape[0]
    m = max(0, min(n_eig - 1, n - 1))
    s, sqrt_d = normalized_adjacency(adjacency)
    e1 = sqrt_d / max(float(np.linalg.norm(sqrt_d)), 1e-300)  # float64, unit (0 if no edges)
    if m == 0:
        return SpectralEmbedding(
            torch.zeros(0, device=device), torch.zeros(n, 0, device=device), lambda_floor
        )
    p = m + (buffer if buffer is not None else max(20, m // 10))
    if solver == "auto":
        solver = "dense" if n <= 1000 or p > n // 3 else "chebyshev"
    if solver == "dense":
        dense = torch.from_numpy(s.toarray()).to(device, torch.float64)
        v = torch.from_numpy(e1).to(device)
        dense -= TRIVIAL_SHIFT * torch.outer(v, v)  # trivial pair -> μ = -2: the very bottom
        with few_threads(device.type == "cpu"):  # threaded LAPACK eigh is slower up to n ~ 2000
            mu, vec = torch.linalg.eigh(dense)
        mu, vec = mu.flip(0)[:m], vec.flip(1)[:, :m]
        return SpectralEmbedding(mu.float(), vec.float(), lambda_floor)
    if solver == "arpack":
        from scipy.sparse.linalg import LinearOperator, eigsh

        op = LinearOperator(
            s.shape, matvec=lambda x: s @ x - TRIVIAL_SHIFT * e1 * (e1 @ x), dtype=np.float64
        )
        mu, vec = eigsh(op, k=m, which="LA", tol=tol)
        order = np.argsort(-mu)
        return SpectralEmbedding(
            torch.from_numpy(mu[order].astype(np.float32)).to(device),
            torch.from_numpy(vec[:, order].astype(np.float32)).to(device),
            lambda_floor,
        )
    order = locality_order(s)  # same eigenpairs, rows permuted: cache-friendly products
    s = s[order][:, order].tocsr()
    st = to_torch_csr(s.indptr, s.indices, s.data, s.shape, device)
    v0 = torch.from_numpy(e1[order].astype(np.float32)).to(device)
    with few_threads(device.type == "cpu" and n <= SMALL_PROBLEM_NODES):
        mu, vec = _chebyshev_subspace(
            st,
            v0,
            m,
            min(p, n - 1),
            degree=degree,
            tol=tol,
            tail_relax=tail_relax,
            max_iter=max_iter,
            lambda_floor=lambda_floor,
            generator=generator,
        )
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n)
    vec = vec[torch.from_numpy(inverse).to(device)]  # back to the caller's node order
    return SpectralEmbedding(mu, vec, lambda_floor)


def locality_order(s: sp.csr_matrix) -> np.ndarray:
    """A node order in which graph neighbours sit close together (reverse Cuthill-McKee).

    In that order the rows a sparse product gathers for one output row lie near each other in
    memory, so they stay in cache: 2-3x faster products on a 50k-node kNN graph.
    """
    return reverse_cuthill_mckee(s, symmetric_mode=True).astype(np.int64)


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Cholesky-QR twice (BLAS-3, stable enough after the first pass); QR if the Gram is singular."""
    for _ in range(2):
        g = (y.T @ y).double()
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) != 0:
            return torch.linalg.qr(y)[0]
        y = torch.linalg.solve_triangular(chol.T.to(y.dtype), y, upper=True, left=False)
    return y


def _chebyshev_filter(
    s: torch.Tensor, x: torch.Tensor, v0: torch.Tensor, lo: float, cut: float, degree: int
) -> torch.Tensor:
    """``T_degree`` of ``P s P`` (``P = I - v0 v0ᵀ``) mapped so that ``[lo, cut]`` is damped to
    ``[-1, 1]`` and the spectrum above ``cut`` amplified, applied to ``x`` (scaled recurrence of
    Zhou & Saad 2007, which keeps the block's norm near 1)."""

    def op(z: torch.Tensor) -> torch.Tensor:  # P s P z, for z already in v0^⊥
        w = sparse_matmul(s, z, SPMM_COLUMNS)
        return w.addr_(v0, v0 @ w, alpha=-1.0)

    e = (cut - lo) / 2
    c = (cut + lo) / 2
    sigma1 = e / (1.0 - c)  # recurrence scaling (not the σ of eq. 5 voting)
    sigma = sigma1
    y = op(x).sub_(x, alpha=c).mul_(sigma1 / e)
    for _ in range(2, degree + 1):
        s_new = 1.0 / (2.0 / sigma1 - sigma)
        y_new = op(y).sub_(y, alpha=c).mul_(2 * s_new / e).sub_(x, alpha=sigma * s_new)
        x, y, sigma = y, y_new, s_new
    return y


def _chebyshev_subspace(
    s: torch.Tensor,
    v0: torch.Tensor,
    m: int,
    p: int,
    *,
    degree: int,
    tol: float,
    tail_relax: float,
    max_iter: int,
    lambda_floor: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``m`` eigenpairs of ``s`` restricted to ``v0^⊥`` (``p ≤ n - 1`` block columns).

    ``s`` has its spectrum in ``[-1, 1]`` and ``v0`` (unit) is its top eigenvector. The filter
    works on ``P s P`` with ``P = I - v0 v0ᵀ``, and the block is projected onto ``v0^⊥``
    before every orthonormalisation, so the Ritz vectors span a subspace of ``v0^⊥`` (up to
    float32 rounding): ``v0`` cannot be returned whatever the spectrum (its ``P s P``
    eigenvalue 0 may well lie above the damped interval on small or strongly clustered graphs).

    Pair ``j`` is accepted once ``||P_L s e_j - μ_j e_j|| < tol · min(tail_relax, sqrt(λ_j /
    λ_2))`` (``λ = 1 - μ``; ``P_L`` also projects out the pairs locked before it, see below):
    eq. 6 scales embedding column ``j`` by ``1/sqrt(λ_j)``, so an error in ``e_j`` weighs
    ``sqrt(λ_2 / λ_j)`` times less than the same error in ``e_2``. Accepted leading pairs are
    locked: kept as they are, projected out of the block, and no longer filtered, so later
    iterations only work on the pairs still missing (plus the buffer).
    """
    n = s.shape[0]
    dev = s.device
    basis = v0[:, None]  # v0, then the locked eigenvectors: the block stays orthogonal to them

    def proj(z: torch.Tensor) -> torch.Tensor:
        return z.sub_(basis @ (basis.T @ z))

    x = _orthonormalize(proj(torch.randn(n, p, generator=generator).to(dev)))
    lo, cut = -1.0, 0.5  # unwanted interval [lo, cut], refined from the Ritz values
    locked: list[torch.Tensor] = []
    lam2: float | None = None
    mu = torch.zeros(p, device=dev)
    for _ in range(max_iter):
        x = _orthonormalize(proj(_chebyshev_filter(s, x, v0, lo, cut, degree)))
        # orthonormalising an ill-conditioned block scales its rounding-level components along
        # `basis` by up to cond(y) (measured 1e-3 with p = n - 1 on 200 nodes): project again
        if float((basis.T @ x).abs().max()) > LEAK_TOL:
            x = _orthonormalize(proj(x))
        # P s P: residuals w.r.t. the deflated operator; against s itself they would include
        # the coupling r_lᵀ x to each locked pair's own residual r_l, which can exceed the
        # tolerance of the pairs left (measured: one pair stuck for 58 iterations at 70k nodes)
        sx = proj(sparse_matmul(s, x, SPMM_COLUMNS))
        h = (x.T @ sx).double()
        h = (h + h.T) / 2
        mu64, rot = torch.linalg.eigh(h)
        mu = mu64.flip(0).to(x.dtype)
        rot = rot.flip(1).to(x.dtype)
        x = x @ rot
        res = (sx @ rot - x * mu).norm(dim=0)
        cut = float(mu[-1])
        need = m - (basis.shape[1] - 1)
        lam = (1.0 - mu[:need].double()).clamp_min(lambda_floor)
        lam2 = float(lam[0]) if lam2 is None else lam2
        limit = tol * (lam / lam2).sqrt().clamp(1.0, max(1.0, tail_relax))
        ok = (res[:need].double() < limit).int()
        k = need if bool(ok.all()) else int(torch.argmin(ok))  # accepted leading pairs
        if k:
            basis = torch.cat([basis, x[:, :k]], 1)
            locked.append(mu[:k])
            x = x[:, k:].contiguous()
            mu = mu[k:]
        if basis.shape[1] - 1 == m:
            break
    need = m - (basis.shape[1] - 1)  # > 0 only if max_iter ran out: the best pairs so far
    vectors = torch.cat([basis[:, 1:], x[:, :need]], 1)
    return torch.cat([*locked, mu[:need]]).contiguous(), vectors.contiguous()


def extend_to_out_nodes(
    emb: torch.Tensor, graph: Graph, device: torch.device | str | None = None
) -> torch.Tensor:
    """Embeddings for the out-only nodes: the degree-weighted average of their neighbours' rows.

    This is the Nyström extension ``φ(q) = (1/μ) Σ_i P(q,i) φ(i)`` of the random-walk eigenvectors
    ``φ = D^-1/2 e`` with ``μ ≈ 1`` (exact for the dominant eigenvectors, damped for the
    high-frequency ones, which would otherwise be amplified by ``1/μ``). Rows are returned in
    the same ``D^-1/2``-free scale as ``emb`` up to a per-row factor, which cosine voting ignores.
    """
    device = emb.device if device is None else torch.device(device)
    if graph.n_out == 0:
        return torch.zeros(0, emb.shape[1], device=device)
    deg = graph.degrees()[: graph.n_core]
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0).astype(np.float32)
    out = graph.out_adjacency()
    w = out.multiply(1.0 / np.maximum(np.asarray(out.sum(axis=1)).ravel(), 1e-30)[:, None]).tocsr()
    wt = to_torch_csr(w.indptr, w.indices, w.data, w.shape, device)
    phi = emb * torch.from_numpy(inv_sqrt).to(device)[:, None]
    return wt @ phi


#: :class:`Voters` scores class by class (on CPU) when the classes average at least this many
#: voters; with fewer, the per-class operations cost more than the scatter path's extra passes
#: (measured on 2 cores, 64-d, 5 to 1000 classes: the scatter path wins at 4 voters per class,
#: the class path from 16 on, 6x at 256).
CLASS_SPAN_MIN = 16
#: Logits per block of the class-by-class vote (4 MiB of float32).
CLASS_BLOCK = 2**20


class Voters:
    """The labeled side of eq. 5, prepared once: scores any number of targets later.

    ``log z[u,c] = log( Σ_{i∈c} w_i exp(σ cos(i,u)) / Σ_{i∈c} w_i )``. Rows of both embeddings
    are L2-normalised, so ``σ`` is an inverse temperature on a cosine in ``[-1, 1]`` (metric
    transfer: σ = 40 on spectral embeddings); the class *mean* (not sum) keeps unbalanced label
    sets unbiased. Classes without labels score ``-inf``.
    """

    def __init__(
        self,
        emb_labeled: torch.Tensor,
        labels: torch.Tensor,
        n_classes: int,
        sigma: float,
        *,
        weights: torch.Tensor | None = None,
        max_block: int = 2**25,
    ) -> None:
        a = torch.nn.functional.normalize(emb_labeled.float(), dim=1)
        labels = labels.to(a.device).long()
        w = (
            torch.ones(a.shape[0], device=a.device)
            if weights is None
            else weights.to(a.device).float()
        )
        keep = w > 0
        a, labels, w = a[keep], labels[keep], w[keep]
        order = torch.argsort(labels, stable=True)
        self.a_t = a[order].T.contiguous()  # [D, n_labeled], class by class
        self.logw = w[order].log()
        self.classes = labels[order][None, :]  # [1, n_labeled]
        self.log_norm = (
            torch.zeros(n_classes, device=a.device).index_add_(0, labels, w).clamp_min(1e-30).log()
        )
        self.sigma, self.n_classes = float(sigma), n_classes
        self.chunk = max(1, max_block // max(1, a.shape[0]))  # [chunk, n_labeled] blocks
        counts = torch.bincount(labels, minlength=n_classes).tolist()
        ends = np.cumsum(counts).tolist()
        #: (class, first voter, end) of each class that has voters, in ``a_t``'s column order
        self.spans = [(c, e - n, e) for c, (n, e) in enumerate(zip(counts, ends, strict=True)) if n]
        self.by_class = a.device.type == "cpu" and a.shape[0] >= CLASS_SPAN_MIN * len(self.spans)

    def __call__(self, emb_targets: torch.Tensor) -> torch.Tensor:
        """Log-scores ``[n_targets, n_classes]``."""
        b = torch.nn.functional.normalize(emb_targets.float().to(self.a_t.device), dim=1)
        out = self._by_class(b) if self.by_class else self._by_scatter(b)
        return out - self.log_norm

    def _by_class(self, b: torch.Tensor) -> torch.Tensor:
        # One class's voters at a time, in blocks of targets small enough to stay in cache: the
        # [targets, voters] logits are written once and read once, where the scatter path makes
        # five passes over them plus two over an int64 index of the same shape. The many small
        # products run single-threaded on one contiguous range of targets per thread: no
        # OpenMP barrier per product, which on a busy machine cost 10-20x.
        out = torch.full((b.shape[0], self.n_classes), -torch.inf, device=b.device)

        def part(targets: tuple[int, int]) -> None:
            for c, lo, hi in self.spans:
                a_t, logw = self.a_t[:, lo:hi], self.logw[lo:hi]
                rows = max(1, CLASS_BLOCK // (hi - lo))
                for s in range(targets[0], targets[1], rows):
                    e = min(s + rows, targets[1])
                    logits = torch.addmm(logw, b[s:e], a_t, alpha=self.sigma)
                    out[s:e, c] = torch.logsumexp(logits, 1)

        parallel_map(part, split_ranges(b.shape[0], n_workers()))
        return out

    def _by_scatter(self, b: torch.Tensor) -> torch.Tensor:
        # All voters at once, then a per-class log-sum-exp (class maxima by one scatter, one exp
        # and one scatter-add): few operations, for many classes of few voters and for CUDA.
        out = torch.empty((b.shape[0], self.n_classes), device=b.device)
        for s in range(0, b.shape[0], self.chunk):
            logits = (self.sigma * (b[s : s + self.chunk] @ self.a_t)).add_(self.logw)
            cls = self.classes.expand(logits.shape[0], -1)
            top = torch.full_like(out[s : s + self.chunk], -torch.inf)
            top.scatter_reduce_(1, cls, logits, "amax")
            mass = torch.zeros_like(top).scatter_add_(1, cls, (logits - top.gather(1, cls)).exp_())
            out[s : s + self.chunk] = top + mass.log()
        return out


def vote(
    emb_labeled: torch.Tensor,
    labels: torch.Tensor,
    emb_targets: torch.Tensor,
    n_classes: int,
    sigma: float,
    *,
    weights: torch.Tensor | None = None,
    max_block: int = 2**25,
) -> torch.Tensor:
    """Eq. 5 voting in log space (see :class:`Voters`): log-scores ``[n_targets, n_classes]``."""
    voters = Voters(emb_labeled, labels, n_classes, sigma, weights=weights, max_block=max_block)
    return voters(emb_targets)
