"""k-nearest-neighbour search over faiss: exact Flat, IVF (settable ``nprobe``) and HNSW.

Similarities, not distances, flow through the graph code: for ``metric="cosine"``/``"ip"`` a
neighbour's score is the inner product, for ``"l2"`` it is minus the squared distance, so
"higher is closer" everywhere. Missing neighbours (fewer than ``k`` points reachable) are
index ``-1`` with score ``-inf``.

IVF on CPU: the coarse quantiser is trained with ``faiss.Kmeans``; searching many queries at
once (the all-vs-all graph of a background set) goes *list-major*: the queries probing an
inverted list are scored against that list's members with one GEMM and pushed into faiss'
C++ result heaps (``faiss.ResultHeap``). For the same centroids and ``nprobe`` this returns
what ``IndexIVFFlat.search`` returns (up to the order of exact ties), but at BLAS speed: the
200k-point self-graph (k=31, nprobe=8) took 6.5 s against 16.2 s for ``IndexIVFFlat.search``
on the 2-core development machine. The CPU loops run one single-threaded worker per core on
disjoint query sets (see :mod:`fewshot_bench.graph.threads`). On CUDA the same loop runs in
torch (GEMM + top-k); when faiss itself sees a GPU, Flat and IVF searches use faiss GPU
indexes instead. HNSW always searches on CPU (faiss has no GPU HNSW).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from fewshot_bench.graph.threads import few_threads, n_workers, parallel_map, split_ranges

METRICS = ("cosine", "ip", "l2")
INDEXES = ("auto", "flat", "ivf", "hnsw")
#: ``index="auto"`` uses exact search while (#queries x #base) stays below this.
FLAT_MAX_PAIRS = 200_000_000
#: Largest similarity block (floats) materialised at once by the torch / list-major paths.
_BLOCK_FLOATS = 1 << 24
#: Score block of the CPU coarse probe: ~4 MiB stays in cache for the top-k that follows (100k
#: queries x 1024 centroids, 2 threads: 0.155 s against 0.22 s in 16M-float blocks, same lists).
_PROBE_BLOCK_FLOATS = 1 << 20


@dataclass(frozen=True)
class Neighbors:
    """kNN lists: ``indices`` int64 ``[n, k]`` (``-1`` = none), ``sims`` float32 ``[n, k]``, best first."""

    indices: np.ndarray
    sims: np.ndarray

    @property
    def n(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def shifted(self, offset: int) -> Neighbors:
        """The same lists with every valid index moved by ``offset`` (for block assembly)."""
        idx = np.where(self.indices >= 0, self.indices + offset, -1)
        return Neighbors(idx, self.sims)

    def padded(self, k: int) -> Neighbors:
        """Exactly ``k`` columns: truncated, or padded with missing entries."""
        if self.k >= k:
            return Neighbors(
                np.ascontiguousarray(self.indices[:, :k]), np.ascontiguousarray(self.sims[:, :k])
            )
        pad = k - self.k
        idx = np.concatenate([self.indices, np.full((self.n, pad), -1, np.int64)], axis=1)
        sims = np.concatenate([self.sims, np.full((self.n, pad), -np.inf, np.float32)], axis=1)
        return Neighbors(idx, sims)


def faiss_gpu_available() -> bool:
    """Whether this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def prepare_vectors(x: np.ndarray | torch.Tensor, metric: str) -> np.ndarray:
    """float32, C-contiguous copy on the host; L2-normalised rows for ``metric="cosine"``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if out.ndim != 2:
        raise ValueError(f"expected a 2-D array [n, dim], got shape {out.shape}")
    if metric == "cosine":
        faiss.normalize_L2(out)
    return out


def choose_index(n_base: int, n_queries: int) -> str:
    """The index ``"auto"`` picks: exact Flat while the search is cheap, IVF beyond."""
    return "flat" if n_base * max(n_queries, 1) <= FLAT_MAX_PAIRS or n_base < 4096 else "ivf"


def default_nlist(n_base: int, nprobe: int) -> int:
    """Inverted lists balancing coarse assignment against list scanning: ~sqrt(nprobe * n)."""
    target = math.sqrt(max(nprobe, 1) * n_base)
    nlist = 2 ** round(math.log2(max(target, 16)))
    return int(max(16, min(nlist, 65536, max(n_base // 8, 16))))


def merge_neighbors(parts: list[Neighbors], k: int) -> Neighbors:
    """Top-``k`` of several candidate lists per row (each part sorted best first, indices global)."""
    parts = [p.padded(k) for p in parts]
    if len(parts) == 1:
        return parts[0]
    sims = np.stack(
        [np.where(np.isfinite(p.sims), p.sims, -np.inf).astype(np.float32) for p in parts]
    )
    idx = np.stack([p.indices for p in parts])
    d, i = faiss.merge_knn_results(sims, idx, keep_max=True)
    d = np.where(i >= 0, d, -np.inf).astype(np.float32)
    return Neighbors(i.astype(np.int64), d)


def exclude_self(nbrs: Neighbors, self_ids: np.ndarray, k: int) -> Neighbors:
    """Drop each row's own id from a ``k+1`` search (or its last entry if absent) -> ``k`` columns."""
    n, kk = nbrs.indices.shape
    drop = nbrs.indices == self_ids[:, None]
    first = drop & (np.cumsum(drop, axis=1) == 1)  # only the first occurrence
    missing = ~first.any(axis=1)
    first[missing, kk - 1] = True
    keep = ~first
    idx = nbrs.indices[keep].reshape(n, kk - 1)
    sims = nbrs.sims[keep].reshape(n, kk - 1)
    return Neighbors(idx, sims).padded(k)


class KnnIndex:
    """A searchable set of base vectors (Flat, IVF or HNSW), on CPU or CUDA.

    ``search(queries, k)`` returns each query's ``k`` nearest base points; ``search_self(k)``
    the kNN graph of the base set itself (each point excluded from its own list).
    """

    def __init__(
        self,
        base: np.ndarray | torch.Tensor,
        *,
        metric: str = "cosine",
        index: str = "auto",
        nprobe: int = 8,
        nlist: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 64,
        device: torch.device | str = "cpu",
        seed: int = 0,
        expected_queries: int | None = None,
        state: dict[str, np.ndarray] | None = None,
    ) -> None:
        if index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, not {index!r}")
        self.metric = metric
        self.xb = prepare_vectors(base, metric)
        self.n, self.dim = self.xb.shape
        if index == "auto":
            index = choose_index(self.n, self.n if expected_queries is None else expected_queries)
        if index == "ivf" and self.n < 64:
            index = "flat"
        self.kind = index
        self.nprobe = int(nprobe)
        self.ef_search = int(ef_search)
        self.device = torch.device(device)
        self.seed = seed
        self._faiss_gpu = self.device.type == "cuda" and faiss_gpu_available()
        self._torch_path = self.device.type == "cuda" and not self._faiss_gpu
        self._faiss_index: Any = None
        self.centroids: np.ndarray | None = None
        self.assign: np.ndarray | None = None
        if self.kind == "flat":
            self._init_flat()
        elif self.kind == "ivf":
            self._init_ivf(nlist, state)
        else:
            self._init_hnsw(hnsw_m)

    # ------------------------------------------------------------------ construction
    def _faiss_metric(self) -> int:
        return faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def _flat(self, d: int) -> Any:
        return faiss.IndexFlatL2(d) if self.metric == "l2" else faiss.IndexFlatIP(d)

    def _to_gpu(self, index: Any) -> Any:
        self._gpu_res = faiss.StandardGpuResources()
        dev = self.device.index or 0
        return faiss.index_cpu_to_gpu(self._gpu_res, dev, index)

    def _init_flat(self) -> None:
        if self._torch_path:
            self._xb_t = torch.from_numpy(self.xb).to(self.device)
            return
        index = self._flat(self.dim)
        index.add(self.xb)
        self._faiss_index = self._to_gpu(index) if self._faiss_gpu else index

    def _init_hnsw(self, m: int) -> None:
        index = faiss.IndexHNSWFlat(self.dim, m, self._faiss_metric())
        index.hnsw.efConstruction = max(40, 2 * m)
        index.add(self.xb)
        self._faiss_index = index  # faiss has no GPU HNSW; CPU search either way

    def _init_ivf(self, nlist: int | None, state: dict[str, np.ndarray] | None) -> None:
        if state is not None:
            self.centroids = np.ascontiguousarray(state["centroids"], dtype=np.float32)
            self.assign = np.ascontiguousarray(state["assign"], dtype=np.int64)
        else:
            nlist = default_nlist(self.n, self.nprobe) if nlist is None else int(nlist)
            nlist = max(1, min(nlist, self.n))
            km = faiss.Kmeans(
                self.dim,
                nlist,
                niter=8,
                seed=int(self.seed) % (2**31),
                spherical=self.metric != "l2",
                max_points_per_centroid=16,  # a coarse quantiser needs no more
                min_points_per_centroid=1,
                verbose=False,
            )
            with few_threads(True):  # see graph.threads: robust on busy CPUs
                km.train(self.xb)
            self.centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
            # probe the base once: column 0 is its list, all columns serve search_self
            self._base_probes = self._probe(self.xb, self.nprobe)
            self.assign = np.ascontiguousarray(self._base_probes[:, 0])
        self.nlist = int(self.centroids.shape[0])
        dev = self.device if self._torch_path else torch.device("cpu")
        self._cent_t = torch.from_numpy(self.centroids).to(dev)
        self._cnorm_t = self._cent_t.pow(2).sum(1)
        order = np.argsort(self.assign, kind="stable")
        self._order = order
        counts = np.bincount(self.assign, minlength=self.nlist)
        self._bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._xb_sorted = torch.from_numpy(self.xb[order]).to(dev)
        self._bnorm_sorted = self._xb_sorted.pow(2).sum(1) if self.metric == "l2" else None
        if self._faiss_gpu:
            quant = self._flat(self.dim)
            quant.add(self.centroids)
            ivf = faiss.IndexIVFFlat(quant, self.dim, self.nlist, self._faiss_metric())
            ivf.add_core(
                self.n,
                faiss.swig_ptr(self.xb),
                None,
                faiss.swig_ptr(np.ascontiguousarray(self.assign)),
            )
            self._ivf_cpu_quant = quant
            self._faiss_index = self._to_gpu(ivf)
            self._base_probes = None  # the faiss GPU index does its own probing

    @property
    def list_order(self) -> np.ndarray | None:
        """Base ids grouped by IVF list (``None`` for Flat and HNSW): an order of the base points
        in which neighbours sit close together."""
        return getattr(self, "_order", None)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that rebuild this index without retraining (IVF: centroids + assignment)."""
        if self.kind != "ivf":
            return {}
        assert self.centroids is not None and self.assign is not None
        return {"centroids": self.centroids, "assign": self.assign}

    # ------------------------------------------------------------------ search
    def _probe(self, xq: np.ndarray, nprobe: int) -> np.ndarray:
        """The ``nprobe`` best coarse centroids of each query, ``[nq, nprobe]`` int64."""
        assert self.centroids is not None
        dev = self.device if self._torch_path else torch.device("cpu")
        cent = torch.from_numpy(self.centroids).to(dev)
        cnorm = cent.pow(2).sum(1)
        nprobe = min(nprobe, cent.shape[0])
        out = np.empty((xq.shape[0], nprobe), np.int64)
        block_floats = _BLOCK_FLOATS if self._torch_path else _PROBE_BLOCK_FLOATS
        step = max(1, min(block_floats // max(cent.shape[0], 1), -(-xq.shape[0] // n_workers())))

        def block(s: int) -> None:
            q = torch.from_numpy(xq[s : s + step]).to(dev)
            score = q @ cent.T
            if self.metric == "l2":
                score.mul_(2).sub_(cnorm)
            top = (
                score.argmax(1, keepdim=True) if nprobe == 1 else score.topk(nprobe, dim=1).indices
            )
            out[s : s + step] = top.cpu().numpy()

        starts = range(0, xq.shape[0], step)
        if self._torch_path:
            for s in starts:
                block(s)
        else:
            parallel_map(block, starts)
        return out

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> Neighbors:
        """The ``k`` nearest base points of each query (padded with ``-1`` if fewer exist)."""
        return self._search_prepared(prepare_vectors(queries, self.metric), k)

    def _search_prepared(self, xq: np.ndarray, k: int) -> Neighbors:
        k_eff = min(k, self.n)
        if xq.shape[0] == 0 or k_eff == 0:
            return Neighbors(
                np.full((xq.shape[0], k), -1, np.int64),
                np.full((xq.shape[0], k), -np.inf, np.float32),
            )
        if self.kind == "ivf" and not self._faiss_gpu:
            res = self._ivf_bulk(xq, k_eff)
        elif self._torch_path:
            res = self._torch_flat(xq, k_eff)
        else:
            if self.kind == "hnsw":
                self._faiss_index.hnsw.efSearch = max(self.ef_search, k_eff)
            elif self.kind == "ivf":
                self._faiss_index.nprobe = self.nprobe
            d, i = self._faiss_index.search(xq, k_eff)
            sims = -d if self.metric == "l2" else d
            res = Neighbors(i.astype(np.int64), np.where(i >= 0, sims, -np.inf).astype(np.float32))
        return res.padded(k)

    def search_self(self, k: int) -> Neighbors:
        """The kNN graph of the base set (each point excluded from its own list)."""
        k_eff = min(k, self.n - 1)
        if k_eff <= 0:
            return Neighbors(
                np.full((self.n, k), -1, np.int64), np.full((self.n, k), -np.inf, np.float32)
            )
        base_probes = getattr(self, "_base_probes", None)
        if self.kind == "ivf" and not self._faiss_gpu and base_probes is not None:
            nb = self._ivf_bulk(self.xb, min(k_eff + 1, self.n), base_probes).padded(k_eff + 1)
            self._base_probes = None  # one self-search per index; free the memory
        else:
            nb = self._search_prepared(self.xb, k_eff + 1)
        return exclude_self(nb, np.arange(self.n), k)

    def _torch_flat(self, xq: np.ndarray, k: int) -> Neighbors:
        xb = self._xb_t
        bnorm = xb.pow(2).sum(1) if self.metric == "l2" else None
        idx = np.empty((xq.shape[0], k), np.int64)
        sims = np.empty((xq.shape[0], k), np.float32)
        step = max(1, _BLOCK_FLOATS // self.n)
        for s in range(0, xq.shape[0], step):
            q = torch.from_numpy(xq[s : s + step]).to(self.device)
            score = q @ xb.T
            if bnorm is not None:
                score.mul_(2).sub_(bnorm).sub_(q.pow(2).sum(1, keepdim=True))
            v, i = score.topk(k, dim=1)
            idx[s : s + step] = i.cpu().numpy()
            sims[s : s + step] = v.cpu().numpy()
        return Neighbors(idx, sims)

    def _ivf_bulk(self, xq: np.ndarray, k: int, probes: np.ndarray | None = None) -> Neighbors:
        """List-major IVF search: one GEMM per (inverted list, query block), heap/top-k merge.

        On CPU the queries are split into one contiguous part per worker thread, each with its
        own faiss result heaps, so the threads never share a heap and need no locking.
        """
        nq = xq.shape[0]
        if probes is None:
            probes = self._probe(xq, self.nprobe)
        if self._torch_path or getattr(self, "_force_torch_merge", False):
            idx, sims = self._ivf_scan_torch(xq, probes, k)
        else:
            idx = np.empty((nq, k), np.int64)
            sims = np.empty((nq, k), np.float32)

            def part(rng: tuple[int, int]) -> None:
                q0, q1 = rng
                d, i = self._ivf_scan_heap(xq[q0:q1], probes[q0:q1], k)
                sims[q0:q1], idx[q0:q1] = d, i

            parallel_map(part, split_ranges(nq, n_workers()))
        if self.metric == "l2":
            sims -= (xq.astype(np.float32) ** 2).sum(1, keepdims=True)
        valid = (idx >= 0) & (sims > -1e37)
        sims = np.where(valid, sims, -np.inf).astype(np.float32)
        idx = np.where(valid, idx, -1).astype(np.int64)
        return Neighbors(idx, sims)

    def _queries_by_list(self, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Query ids grouped by probed list, and each list's ``[start, stop)`` in that order."""
        lflat = probes.ravel()
        qid = np.repeat(np.arange(probes.shape[0], dtype=np.int64), probes.shape[1])
        qsorted = qid[np.argsort(lflat, kind="stable")]
        qbounds = np.concatenate([[0], np.cumsum(np.bincount(lflat, minlength=self.nlist))])
        return qsorted, qbounds

    def _list_blocks(self, qbounds: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        """``(m0, m1, q0, q1)``: member range of a list and a block of its probing queries."""
        for lst in range(self.nlist):
            m0, m1 = int(self._bounds[lst]), int(self._bounds[lst + 1])
            q0, q1 = int(qbounds[lst]), int(qbounds[lst + 1])
            if m1 == m0 or q1 == q0:
                continue
            step = max(1, _BLOCK_FLOATS // (m1 - m0))
            for s in range(q0, q1, step):
                yield m0, m1, s, min(s + step, q1)

    def _block_scores(self, xq_t: torch.Tensor, qs: torch.Tensor, m0: int, m1: int) -> torch.Tensor:
        score = xq_t.index_select(0, qs) @ self._xb_sorted[m0:m1].T
        if self._bnorm_sorted is not None:
            score.mul_(2).sub_(self._bnorm_sorted[m0:m1])
        return score

    def _ivf_scan_heap(
        self, xq: np.ndarray, probes: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """CPU scan of one query part into faiss' C++ result heaps (keep-max)."""
        qsorted, qbounds = self._queries_by_list(probes)
        xq_t = torch.from_numpy(xq)
        heap = faiss.ResultHeap(xq.shape[0], k, keep_max=True)
        for m0, m1, s0, s1 in self._list_blocks(qbounds):
            qs = qsorted[s0:s1]
            score = self._block_scores(xq_t, torch.from_numpy(qs), m0, m1)
            heap.add_result_subset(qs, score.numpy(), self._order[m0:m1])
        heap.finalize()
        return np.array(heap.D, dtype=np.float32), heap.I

    def _ivf_scan_torch(
        self, xq: np.ndarray, probes: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The same scan with torch top-k merges (the CUDA path without faiss-gpu)."""
        dev = self._xb_sorted.device
        nq = xq.shape[0]
        qsorted, qbounds = self._queries_by_list(probes)
        xq_t = torch.from_numpy(xq).to(dev)
        best_s = torch.full((nq, k), -math.inf, device=dev)
        best_i = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
        order_t = torch.from_numpy(self._order).to(dev)
        for m0, m1, s0, s1 in self._list_blocks(qbounds):
            qs = torch.from_numpy(qsorted[s0:s1]).to(dev)
            score = self._block_scores(xq_t, qs, m0, m1)
            v, i = score.topk(min(k, m1 - m0), dim=1)
            cs = torch.cat([best_s[qs], v], 1)
            ci = torch.cat([best_i[qs], order_t[m0:m1][i]], 1)
            v2, j = cs.topk(k, dim=1)
            best_s[qs] = v2
            best_i[qs] = ci.gather(1, j)
        return best_i.cpu().numpy(), best_s.cpu().numpy().astype(np.float32)


def knn_search(
    base: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor | None = None,
    k: int = 10,
    *,
    metric: str = "cosine",
    index: str = "auto",
    nprobe: int = 8,
    nlist: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Neighbors:
    """kNN of ``queries`` among ``base``; with ``queries=None`` the kNN graph of ``base`` itself."""
    nq = None if queries is None else int(queries.shape[0])
    idx = KnnIndex(
        base,
        metric=metric,
        index=index,
        nprobe=nprobe,
        nlist=nlist,
        device=device,
        seed=seed,
        expected_queries=nq,
    )
    return idx.search_self(k) if queries is None else idx.search(queries, k)
