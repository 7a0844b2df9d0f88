"""kNN graphs of 1M-100M points on one machine: compressed IVF-PQ index, streaming build, diffusion.

Memory plan (per point, ``dim = 64``, ``k = 30``): the features stay on disk in a memory-mapped
``.npy`` (float16: 128 B) and are read block by block; the index holds 4-bit fast-scan PQ codes
(``dim / 2`` B: 32 B) plus an 8 B id, and one float32 squared norm a point is kept for the
re-rank; the graph is ``k`` int32 neighbour ids (120 B) and ``k`` float16 similarities (60 B), preallocated and
memory-mapped when an output folder is given. Diffusion then needs the CSR of the lists and of
their transpose (``k`` int32 ids each, one shared float32 array of ones: 360 B) and a few
``n x C`` float32 label buffers.

Build (:func:`build_large_knn`): the index (optional OPQ rotation, IVF coarse quantiser trained
by k-means, PQ ``x4fs`` codes) is trained on a seeded random sample; pass 1 streams the features
into it; pass 2 streams them again as queries, takes ``rerank x (k + 1)`` PQ candidates and re-scores them exactly from
the mapped features (float16 is exact enough for ranking), drops each point itself and keeps
the top ``k``. Both passes show a tqdm bar unless ``progress=False``.

Diffusion (:func:`knn_operator`, :func:`diffuse_large`): ``W = D⁻¹ (W0 + W0ᵀ)`` with binary
weights, the same matrix as ``graph_from_neighbors(...).transition()`` (mutual edges count
twice), applied as two torch sparse CSR products without ever forming ``W0 + W0ᵀ``; the
existing :mod:`fewshot_bench.graph.diffusion` code runs on it (classes in column batches).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp
import torch

from fewshot_bench.errors import InputDataError
from fewshot_bench.graph.spmm import check_order, renumbered_csr, sparse_matmul

METRICS = ("cosine", "l2")
FEATURE_DTYPES = (np.float16, np.float32, np.float64)
#: Queries re-scored at a time: their candidates' float32 copy (256 x 62 x 64 floats, 4 MiB)
#: stays in cache between the gather and the product. A whole 4096-query block at once wrote
#: and re-read 65 MB: 0.34 s against 0.17 s per 20k queries of the 1M proxy, the same bits.
RERANK_QUERIES = 256


@dataclass(frozen=True)
class LargeKnnParams:
    """Graph and index parameters; ``None`` fields get a size-dependent default.

    ``nlist``: IVF lists (default ~ 1.3 sqrt(n), a power of two); ``pq_m``: PQ sub-quantisers of
    4 bits (default ``dim``, i.e. ``dim / 2`` bytes a point; must divide ``dim``; ``dim / 2``
    halves the codes but, on the proxy at 100k, re-ranking 62 candidates then finds 75% of the
    true 30-NN instead of 99%); ``opq``: learn an OPQ rotation first (slow to train on one core:
    no recall gain on the proxy); ``rerank``: PQ candidates per point, in units of ``k + 1``,
    re-scored exactly from the features (``0`` keeps the PQ scores); ``train_size``: points
    the index is trained on (default ``max(64 nlist, 50000)``); ``block``: points per streamed block.
    """

    k: int = 30
    metric: str = "cosine"
    nlist: int | None = None
    nprobe: int = 8
    pq_m: int | None = None
    opq: bool = False
    rerank: int = 2
    train_size: int | None = None
    block: int = 1 << 12
    seed: int = 0


@dataclass
class LargeKnn:
    """``indices`` int32 ``[n, k]`` (``-1`` = none) and ``sims`` float16 ``[n, k]``, best first.

    ``order``: every node id once, grouped by the IVF list the point fell in: neighbours sit
    close together in it, which :func:`knn_operator` uses for cache locality.
    """

    indices: np.ndarray
    sims: np.ndarray
    index_desc: str
    timings: dict[str, float] = field(default_factory=dict)
    order: np.ndarray | None = None


# ------------------------------------------------------------------------------------ features
def open_features(source: str | os.PathLike[str] | np.ndarray) -> np.ndarray:
    """A ``[n, dim]`` float feature matrix: an array as is, a ``.npy`` path memory-mapped read-only."""
    if isinstance(source, np.ndarray):
        x = source
    else:
        path = Path(source)
        if not path.exists():
            raise InputDataError(
                f"feature file {path} not found; pass a .npy file of shape [n, dim]"
            )
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise InputDataError(
                f"{path} is not a plain .npy array ({e}); save features with numpy.save"
            ) from e
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise InputDataError(f"features must be a 2-D array [n >= 2, dim], got shape {x.shape}")
    if x.dtype not in FEATURE_DTYPES:
        raise InputDataError(
            f"features have dtype {x.dtype}; convert them to float16 or float32 (x.astype('float16'))"
        )
    return x


def prepare_block(x: np.ndarray, metric: str, first_row: int = 0) -> np.ndarray:
    """Rows as a float32 C-contiguous copy, L2-normalised for ``cosine``; rejects NaN/inf rows."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        bad = first_row + int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise InputDataError(f"feature row {bad} holds NaN or inf; clean or drop such rows first")
    if metric == "cosine":
        norms = np.linalg.norm(out, axis=1)
        if (norms == 0).any():
            bad = first_row + int(np.flatnonzero(norms == 0)[0])
            raise InputDataError(
                f"feature row {bad} is all zeros, which has no cosine similarity; use metric='l2' or drop it"
            )
        out /= norms[:, None]
    return out


def default_large_nlist(n: int) -> int:
    """IVF lists for ``n`` points: the power of two nearest ``1.3 sqrt(n)``, within [16, 65536]."""
    target = 1.3 * math.sqrt(max(n, 1))
    return int(min(65536, max(16, 2 ** round(math.log2(max(target, 1.0))))))


def _check_params(n: int, dim: int, p: LargeKnnParams) -> tuple[int, int, int]:
    if p.metric not in METRICS:
        raise InputDataError(f"metric must be one of {METRICS}, not {p.metric!r}")
    if p.k < 1 or p.k >= n:
        raise InputDataError(f"k={p.k} must be between 1 and n - 1 = {n - 1}")
    if p.nprobe < 1 or p.rerank < 0 or p.block < 1:
        raise InputDataError("nprobe and block must be >= 1 and rerank >= 0")
    m = p.pq_m if p.pq_m is not None else dim
    if dim % m:
        raise InputDataError(
            f"pq_m={m} does not divide dim={dim}; pick a divisor of {dim} (e.g. {dim})"
        )
    nlist = p.nlist if p.nlist is not None else default_large_nlist(n)
    nlist = int(max(1, min(nlist, n // 4 or 1)))
    n_train = p.train_size if p.train_size is not None else max(64 * nlist, 50_000)
    n_train = int(min(n, max(n_train, nlist * 4, 1024)))
    return m, nlist, n_train


# ------------------------------------------------------------------------------------ build
def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="pt", unit_scale=True, disable=not enabled, file=sys.stderr
    )


def _alloc(shape: tuple[int, ...], dtype: Any, path: Path | None) -> np.ndarray:
    if path is None:
        return np.empty(shape, dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _train(x: np.ndarray, p: LargeKnnParams, m: int, nlist: int, n_train: int) -> tuple[Any, Any]:
    """The trained index (OPQ + IVF-PQ fast scan) and its IVF part."""
    n, dim = x.shape
    rng = np.random.default_rng([p.seed, 7])
    sample = np.sort(rng.choice(n, n_train, replace=False))
    xs = prepare_block(x[sample], p.metric)
    desc = f"{f'OPQ{m},' if p.opq else ''}IVF{nlist},PQ{m}x4fs"
    # cosine runs as L2 on unit vectors (same ranking) so the PQ encodes residuals
    index = faiss.index_factory(dim, desc, faiss.METRIC_L2)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.niter = 10
    ivf.cp.seed = int(p.seed) % (2**31)
    ivf.cp.max_points_per_centroid = max(64, -(-n_train // nlist))
    ivf.cp.min_points_per_centroid = 1
    if p.opq:
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = 10
    index.train(xs)
    ivf.nprobe = int(min(p.nprobe, nlist))
    return index, ivf


def build_large_knn(
    features: str | os.PathLike[str] | np.ndarray,
    params: LargeKnnParams | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> LargeKnn:
    """The kNN lists of every point among all points (itself excluded), built block by block.

    ``features``: ``[n, dim]`` array or ``.npy`` path (memory-mapped). With ``out_dir`` the lists
    (``knn_indices.npy``, ``knn_sims.npy``) are memory-mapped files there; otherwise in RAM.
    Deterministic for a given seed and thread count.
    """
    import time

    p = params or LargeKnnParams()
    x = open_features(features)
    n, dim = x.shape
    m, nlist, n_train = _check_params(n, dim, p)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    k, t = p.k, {}
    t0 = time.perf_counter()
    index, ivf = _train(x, p, m, nlist, n_train)
    nprobe = int(ivf.nprobe)
    t["train_s"] = time.perf_counter() - t0

    # pass 1: stream the points into the index
    t0 = time.perf_counter()
    sqnorm = np.empty(n, np.float32)  # raw rows' squared norms, for the exact re-rank
    with _progress(n, "index add", progress) as bar:
        for s in range(0, n, p.block):
            e = min(n, s + p.block)
            raw = np.asarray(x[s:e], dtype=np.float32)
            sqnorm[s:e] = np.einsum("ij,ij->i", raw, raw)
            index.add_with_ids(prepare_block(raw, p.metric, s), np.arange(s, e, dtype=np.int64))
            bar.update(e - s)
    t["add_s"] = time.perf_counter() - t0

    # pass 2: stream them again as queries; exact re-rank; drop self
    t0 = time.perf_counter()
    kc = min(n, (k + 1) * max(p.rerank, 1))
    indices = _alloc((n, k), np.int32, out / "knn_indices.npy" if out else None)
    sims = _alloc((n, k), np.float16, out / "knn_sims.npy" if out else None)
    with _progress(n, "graph search", progress) as bar:
        for s in range(0, n, p.block):
            e = min(n, s + p.block)
            xb = prepare_block(x[s:e], p.metric, s)
            dist, cand = index.search(xb, kc)
            if p.rerank > 0:
                score = _exact_scores(x, xb, cand, sqnorm, p.metric)
            else:
                score = -dist if p.metric == "l2" else 1.0 - dist / 2.0
                score = np.where(cand >= 0, score, -np.inf).astype(np.float32)
            idx, sc = _top_k_without_self(cand, score, np.arange(s, e), k)
            indices[s:e], sims[s:e] = idx, sc
            bar.update(e - s)
    t["search_s"] = time.perf_counter() - t0
    order = _list_order(ivf)
    del index, ivf
    if out is not None:
        indices.flush()
        sims.flush()
    desc = f"{f'OPQ{m},' if p.opq else ''}IVF{nlist},PQ{m}x4fs nprobe={nprobe}"
    desc += f" rerank={kc}" if p.rerank > 0 else " (PQ scores)"
    return LargeKnn(indices, sims, desc, t, order)


def _list_order(ivf: Any) -> np.ndarray:
    """The ids of an IVF index's inverted lists, list after list."""
    lists = ivf.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _exact_scores(
    x: np.ndarray, xb: np.ndarray, cand: np.ndarray, sqnorm: np.ndarray, metric: str
) -> np.ndarray:
    """Exact similarity of each prepared query row to its candidates, read from the raw ``x``.

    ``sqnorm``: squared norms of the raw rows of ``x``; ``-inf`` where a candidate is ``-1``.
    """
    out = np.empty(cand.shape, np.float32)
    for s in range(0, cand.shape[0], RERANK_QUERIES):
        e = s + RERANK_QUERIES
        out[s:e] = _exact_scores_block(x, xb[s:e], cand[s:e], sqnorm, metric)
    return out


def _exact_scores_block(
    x: np.ndarray, xb: np.ndarray, cand: np.ndarray, sqnorm: np.ndarray, metric: str
) -> np.ndarray:
    valid = cand >= 0
    flat = np.where(valid, cand, 0).ravel()
    c = torch.from_numpy(np.take(x, flat, axis=0)).to(torch.float32)
    c = c.view(cand.shape[0], cand.shape[1], -1)
    dot = torch.bmm(c, torch.from_numpy(xb)[:, :, None])[:, :, 0].numpy()
    nc = sqnorm[flat].reshape(cand.shape)
    if metric == "cosine":
        score = dot / np.sqrt(np.maximum(nc, 1e-30))
    else:
        score = 2 * dot - nc - (xb * xb).sum(1)[:, None]
    return np.where(valid, score, -np.inf).astype(np.float32)


def _top_k_without_self(
    cand: np.ndarray, score: np.ndarray, self_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` candidates per row, the row's own id and duplicate ids excluded."""
    score = np.where(cand == self_ids[:, None], -np.inf, score)
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    idx = np.take_along_axis(cand, order, 1)
    sc = np.take_along_axis(score, order, 1)
    ok = np.isfinite(sc)
    return np.where(ok, idx, -1).astype(np.int32), np.where(ok, sc, -np.inf).astype(np.float16)


# ------------------------------------------------------------------------------------ diffusion
class KnnOperator:
    """``W = D⁻¹ (W0 + W0ᵀ)`` of binary kNN lists, applied as ``W @ L`` (two sparse products).

    Quacks like the sparse ``W`` the diffusion code expects (``shape``, ``device``, ``@``).
    With ``order`` (a permutation of the nodes) the matrices are stored with rows and columns
    renumbered in that order, and ``@`` takes and returns ``L`` in the original node order.
    """

    def __init__(
        self,
        w0: torch.Tensor,
        w0t: torch.Tensor,
        inv_deg: torch.Tensor,
        order: torch.Tensor | None = None,
    ) -> None:
        self.w0, self.w0t, self.inv_deg = w0, w0t, inv_deg
        self.shape = tuple(w0.shape)
        self.device = w0.device
        self.order = order
        self.rank = None if order is None else torch.argsort(order)

    @property
    def nbytes(self) -> int:
        """Bytes held by the two CSR structures, the shared weights, the degrees and the order."""
        t = [self.w0.crow_indices(), self.w0.col_indices(), self.w0.values()]
        t += [self.w0t.crow_indices(), self.w0t.col_indices(), self.inv_deg]
        t += [a for a in (self.order, self.rank) if a is not None]
        return int(sum(a.numel() * a.element_size() for a in t))

    def __matmul__(self, L: torch.Tensor) -> torch.Tensor:
        if self.order is not None:
            L = L.index_select(0, self.order)
        out = sparse_matmul(self.w0, L)
        out += sparse_matmul(self.w0t, L)
        out *= self.inv_deg[:, None]
        return out if self.rank is None else out.index_select(0, self.rank)


def knn_operator(
    indices: np.ndarray, device: torch.device | str = "cpu", order: np.ndarray | None = None
) -> KnnOperator:
    """The transition operator of int32 kNN lists ``[n, k]`` (``-1`` entries ignored).

    ``order``: store the operator renumbered in this node order (e.g. :attr:`LargeKnn.order`),
    so that a product gathers rows of ``L`` from nearby memory: at 1M nodes of the
    ``fsbench perf large`` proxy (k = 30, 40 columns) one product took 3.09 s in id order,
    1.60 s in reverse Cuthill-McKee order and 1.76 s in 250-node blocks of it shuffled (as IVF
    lists are), the two gathers included. Every output element is summed over the same entries
    in the same order as without it, so the result has the same bits.
    """
    import warnings

    from fewshot_bench.graph.build import to_torch_csr

    nb = np.asarray(indices)
    if nb.ndim != 2:
        raise InputDataError(f"kNN lists must be [n, k], got shape {nb.shape}")
    n, k = nb.shape
    if nb.size and int(nb.max()) >= n:
        raise InputDataError(f"kNN lists point to node {int(nb.max())} but only {n} rows exist")
    valid = nb >= 0
    if valid.all():
        col = np.ascontiguousarray(nb, dtype=np.int32).ravel()
        itype = np.int32 if n * k < 2**31 - 1 else np.int64
        indptr = np.arange(0, n * k + 1, k, dtype=itype)
    else:
        col = nb[valid].astype(np.int32)
        indptr = np.concatenate([[0], np.cumsum(valid.sum(1))])
    ones = np.ones(col.size, np.float32)
    w0 = sp.csr_matrix((ones, col, indptr), shape=(n, n))
    t = w0.tocsc()  # linear-time transpose: CSC of W0 is CSR of W0ᵀ
    deg = np.diff(w0.indptr).astype(np.float64) + np.diff(t.indptr)
    inv = np.where(deg > 0, 1.0 / np.maximum(deg, 1.0), 0.0).astype(np.float32)
    parts = [(w0.indptr, w0.indices), (t.indptr, t.indices)]
    perm = None
    if order is not None:
        perm, rank = check_order(order, n)
        parts = [renumbered_csr(ptr, ids, None, perm, rank)[:2] for ptr, ids in parts]
        inv = inv[perm]
    del w0, t
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        a, b = (to_torch_csr(ptr, ids, ones, (n, n), device) for ptr, ids in parts)
    return KnnOperator(
        a,
        b,
        torch.from_numpy(inv).to(device),
        None if perm is None else torch.from_numpy(perm).to(device),
    )


def diffuse_large(
    op: KnnOperator,
    seeds: np.ndarray,
    seed_labels: np.ndarray,
    n_classes: int,
    *,
    n_iter: int | str = "auto",
    norm: str = "col",
    max_iter: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Predicted class of every node and the iteration count used.

    ``n_iter="auto"`` chooses it on 3 leave-one-out-per-class folds of the seeds (as the
    ``diffusion`` method does); classes run in column batches when ``norm`` allows.
    """
    from fewshot_bench.graph.diffusion import diffuse, diffuse_select, leave_some_out_folds

    dev = op.device
    s = torch.from_numpy(np.asarray(seeds, dtype=np.int64)).to(dev)
    y = torch.from_numpy(np.asarray(seed_labels, dtype=np.int64)).to(dev)
    folds = []
    if n_iter == "auto":
        folds = leave_some_out_folds(y.cpu(), 3, torch.Generator().manual_seed(seed))
    if folds:
        best, _, L = diffuse_select(op, s, y, n_classes, folds, max_iter=max_iter, norm=norm)  # type: ignore[arg-type]
    else:
        best = 3 if n_iter == "auto" else int(n_iter)
        L = diffuse(op, s, y, n_classes, best, norm=norm)  # type: ignore[arg-type]
    return L.argmax(1).cpu().numpy(), best


def exact_knn_sample(
    features: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine", block: int = 1 << 13
) -> np.ndarray:
    """Exact ``k`` nearest neighbours (int64 ids, self excluded) of rows ``queries`` of ``features``."""
    x = open_features(features)
    qids = np.asarray(queries, dtype=np.int64)
    q = prepare_block(x[qids], metric)
    heap = faiss.ResultHeap(len(q), k + 1, keep_max=True)
    for s in range(0, x.shape[0], block):
        xb = prepare_block(x[s : s + block], metric, s)
        score = q @ xb.T
        if metric == "l2":
            score = 2 * score - (xb * xb).sum(1)[None, :]
        ids = np.broadcast_to(np.arange(s, s + len(xb), dtype=np.int64), score.shape)
        heap.add_result(np.ascontiguousarray(score, dtype=np.float32), np.ascontiguousarray(ids))
    heap.finalize()
    res, _ = _top_k_without_self(heap.I, np.asarray(heap.D, np.float32), qids, k)
    return res.astype(np.int64)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each exact list found in the matching approximate list."""
    hits = [
        len(np.intersect1d(a[a >= 0], e[e >= 0])) / max((e >= 0).sum(), 1)
        for a, e in zip(approx, exact, strict=True)
    ]
    return float(np.mean(hits)) if hits else float("nan")
