"""Sparse kNN graphs: symmetrised core block, out-only (query) rows, block assembly, disk cache.

Node order is always ``[core nodes..., out-only nodes...]``. Core nodes (labeled seeds and the
background / unlabeled set) are linked by ``A = W0 + W0ᵀ`` where ``W0[i, j]`` is the weight of
``j`` in ``i``'s kNN list (Douze et al.); out-only nodes (test / query points) have a row
holding their own kNN edges into the core and an empty column: labels flow *to* them, never
*from* them, so queries cannot influence propagation among the other nodes.

The graph is assembled with ``scipy.sparse`` (linear-time COO->CSR with duplicate summing, int32
indices) and handed to the propagation code as a **torch sparse CSR** tensor: the same
propagation code then runs on CPU (MKL sparse x dense, ~2x faster than scipy here) and on CUDA.
Stored size: ``nnz * (4 + 4)`` bytes (int32 column + float32 weight) plus row pointers, i.e.
between ``8 N k`` (all edges mutual) and ``16 N k`` bytes.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from fewshot_bench.atomic import atomic_path
from fewshot_bench.graph.knn import (
    KnnIndex,
    Neighbors,
    choose_index,
    merge_neighbors,
    prepare_vectors,
)
from fewshot_bench.rowhash import row_hashes

WEIGHTS = ("binary", "exp")
CACHE_VERSION = "2"


@dataclass
class Graph:
    """Affinity ``A`` over ``n_core`` core nodes followed by ``n_out`` out-only nodes (CSR)."""

    adjacency: sp.csr_matrix
    n_core: int
    n_out: int = 0

    @property
    def n_nodes(self) -> int:
        return self.n_core + self.n_out

    @property
    def nbytes(self) -> int:
        a = self.adjacency
        return int(a.data.nbytes + a.indices.nbytes + a.indptr.nbytes)

    def degrees(self) -> np.ndarray:
        """Row sums of ``A`` (float64)."""
        return np.asarray(self.adjacency.sum(axis=1), dtype=np.float64).ravel()

    def transition(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Row-stochastic ``W = D⁻¹ A`` as a torch sparse CSR tensor on ``device``."""
        a = self.adjacency
        deg = self.degrees()
        inv = np.where(deg > 0, 1.0 / np.maximum(deg, 1e-300), 0.0).astype(np.float32)
        data = a.data * np.repeat(inv, np.diff(a.indptr))
        return to_torch_csr(a.indptr, a.indices, data, a.shape, device)

    def core_adjacency(self) -> sp.csr_matrix:
        """The symmetric core block ``A_cc``."""
        a = self.adjacency
        if self.n_out == 0:
            return a
        end = int(a.indptr[self.n_core])
        return sp.csr_matrix(
            (a.data[:end], a.indices[:end], a.indptr[: self.n_core + 1]),
            shape=(self.n_core, self.n_core),
        )

    def out_adjacency(self) -> sp.csr_matrix:
        """The out-only rows ``A_oc`` (``[n_out, n_core]``)."""
        a = self.adjacency
        start = int(a.indptr[self.n_core])
        return sp.csr_matrix(
            (a.data[start:], a.indices[start:], a.indptr[self.n_core :] - start),
            shape=(self.n_out, self.n_core),
        )


def to_torch_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    shape: tuple[int, int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A torch sparse CSR tensor sharing ``indptr``/``indices``/``data`` memory where possible."""
    itype = np.int32 if max(shape[0], shape[1], len(indices)) < 2**31 - 1 else np.int64
    crow = torch.from_numpy(np.ascontiguousarray(indptr, dtype=itype))
    col = torch.from_numpy(np.ascontiguousarray(indices, dtype=itype))
    val = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        t = torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)
    return t.to(device) if torch.device(device).type != "cpu" else t


def edge_weights(sims: np.ndarray, weight: str, temperature: float, ref: float) -> np.ndarray:
    """``binary``: 1 per edge (Douze); ``exp``: ``exp((s - ref) / temperature)`` (metric transfer).

    ``temperature`` is a temperature in the usual sense: the score is *divided* by it (smaller =
    sharper kernel; default 0.1 on cosine scores). This is the kNN-graph kernel of the metric
    transfer reference code, ``exp(-(1 - cos) / 0.2)``, there with 0.2. It is not the ``σ`` of
    eq. 5 voting (:func:`fewshot_bench.graph.spectral.vote`), which *multiplies* the cosine
    (an inverse temperature, σ = 40 for spectral propagation); both follow the paper's meaning.

    With ``metric="l2"`` the score is ``-||x-y||²`` so ``exp`` is the Gaussian kernel. ``ref`` is one
    global constant (the largest score), which keeps ``A`` symmetric and cancels in any normalisation.
    """
    if weight == "binary":
        return np.ones(sims.shape, np.float32)
    if weight == "exp":
        return np.exp((sims.astype(np.float64) - ref) / float(temperature)).astype(np.float32)
    raise ValueError(f"weight must be one of {WEIGHTS}, not {weight!r}")


def graph_from_neighbors(
    core: Neighbors,
    out: Neighbors | None = None,
    *,
    weight: str = "binary",
    temperature: float = 0.1,
    symmetrize: bool = True,
) -> Graph:
    """Assemble ``A``: core rows ``W0 + W0ᵀ`` (or ``W0`` if not ``symmetrize``), out rows ``W0`` only.

    ``W0`` holds :func:`edge_weights` (``temperature`` divides the score; ``weight="exp"`` only).
    """
    n_core = core.n
    n_out = 0 if out is None else out.n
    n = n_core + n_out
    ref = 0.0
    if weight == "exp":  # one global reference score (keeps A symmetric)
        parts = [nb.sims[nb.indices >= 0] for nb in (core, out) if nb is not None]
        ref = max((float(p.max()) for p in parts if p.size), default=0.0)

    def coo(nb: Neighbors, row0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        valid = nb.indices >= 0
        rows = np.broadcast_to(
            np.arange(row0, row0 + nb.n, dtype=np.int32)[:, None], nb.indices.shape
        )
        return (
            rows[valid],
            nb.indices[valid].astype(np.int32),
            edge_weights(nb.sims[valid], weight, temperature, ref),
        )

    r, c, v = coo(core, 0)
    core_csr = sp.csr_matrix((v, (r, c)), shape=(n_core, n_core), dtype=np.float32)
    del r, c, v
    if symmetrize:
        core_csr = (core_csr + core_csr.T).tocsr()
    core_csr.sum_duplicates()
    if n_out == 0:
        return Graph(_with_index_dtype(core_csr, n), n_core, 0)
    assert out is not None
    r, c, v = coo(out, 0)
    out_csr = sp.csr_matrix((v, (r, c)), shape=(n_out, n_core), dtype=np.float32)
    out_csr.sum_duplicates()
    indptr = np.concatenate([core_csr.indptr, core_csr.nnz + out_csr.indptr[1:]])
    indices = np.concatenate([core_csr.indices, out_csr.indices])
    data = np.concatenate([core_csr.data, out_csr.data])
    a = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    return Graph(_with_index_dtype(a, n), n_core, n_out)


def _with_index_dtype(a: sp.csr_matrix, n: int) -> sp.csr_matrix:
    if a.shape != (n, n):
        a = sp.csr_matrix(
            (a.data, a.indices, np.concatenate([a.indptr, np.full(n - a.shape[0], a.nnz)])),
            shape=(n, n),
        )
    itype = np.int32 if max(n, a.nnz) < 2**31 - 1 else np.int64
    a.indices = a.indices.astype(itype, copy=False)
    a.indptr = a.indptr.astype(itype, copy=False)
    return a


def build_graph(
    core: np.ndarray | torch.Tensor,
    out: np.ndarray | torch.Tensor | None = None,
    *,
    k: int = 30,
    metric: str = "cosine",
    index: str = "auto",
    nprobe: int = 8,
    nlist: int | None = None,
    weight: str = "binary",
    temperature: float = 0.1,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Graph:
    """Monolithic build: one kNN search over all core points, out-only rows searched against them."""
    idx = KnnIndex(
        core, metric=metric, index=index, nprobe=nprobe, nlist=nlist, device=device, seed=seed
    )
    core_nb = idx.search_self(k)
    out_nb = idx.search(out, k) if out is not None and len(out) else None
    return graph_from_neighbors(core_nb, out_nb, weight=weight, temperature=temperature)


# ---------------------------------------------------------------------------- background cache
def default_cache_dir() -> Path | None:
    """``$FSBENCH_GRAPH_CACHE``, else ``$FSBENCH_CACHE/graphs``, else ``None`` (memory only)."""
    if os.environ.get("FSBENCH_GRAPH_CACHE"):
        return Path(os.environ["FSBENCH_GRAPH_CACHE"])
    if os.environ.get("FSBENCH_CACHE"):
        return Path(os.environ["FSBENCH_CACHE"]) / "graphs"
    return None


class BackgroundGraphCache:
    """Background kNN lists (``W_BB``) + index state, in memory (last few) and optionally on disk.

    Disk entries are ``<dir>/bg-<key>.npz`` holding ``indices`` (int32), ``sims`` (float32) and,
    for IVF, the coarse ``centroids`` and ``assign``ment, so the background index is rebuilt
    without retraining. The key hashes the features, ``k``, metric, index type, ``nprobe``/``nlist``.
    """

    def __init__(self, directory: Path | str | None = None, memory_slots: int = 6) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.memory_slots = memory_slots
        self._mem: OrderedDict[str, tuple[Neighbors, dict[str, np.ndarray], str]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(digest: str, **params: object) -> str:
        blob = repr(sorted(params.items())) + digest + CACHE_VERSION
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, key: str) -> tuple[Neighbors, dict[str, np.ndarray], str] | None:
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        if self.directory is not None:
            path = self.directory / f"bg-{key}.npz"
            if path.exists():
                try:
                    with np.load(path, allow_pickle=False) as z:
                        nb = Neighbors(z["indices"].astype(np.int64), z["sims"].astype(np.float32))
                        state = {n: z[n] for n in ("centroids", "assign") if n in z.files}
                        kind = str(z["kind"])
                except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                    path.unlink(
                        missing_ok=True
                    )  # damaged or foreign: a miss, rebuilt and rewritten
                else:
                    self._remember(key, (nb, state, kind))
                    self.hits += 1
                    return nb, state, kind
        self.misses += 1
        return None

    def put(self, key: str, nb: Neighbors, state: dict[str, np.ndarray], kind: str) -> None:
        self._remember(key, (nb, state, kind))
        if self.directory is not None:
            itype = np.int32 if nb.indices.max(initial=0) < 2**31 - 1 else np.int64
            with atomic_path(self.directory / f"bg-{key}.npz", suffix=".npz") as tmp:
                np.savez(
                    tmp,
                    indices=nb.indices.astype(itype),
                    sims=nb.sims,
                    kind=np.array(kind),
                    **state,
                )

    def _remember(self, key: str, value: tuple[Neighbors, dict[str, np.ndarray], str]) -> None:
        self._mem[key] = value
        self._mem.move_to_end(key)
        while len(self._mem) > self.memory_slots:
            self._mem.popitem(last=False)


_DEFAULT_CACHE: BackgroundGraphCache | None = None


def default_cache() -> BackgroundGraphCache:
    """The process-wide background cache (directory from :func:`default_cache_dir`)."""
    global _DEFAULT_CACHE
    d = default_cache_dir()
    if _DEFAULT_CACHE is None or _DEFAULT_CACHE.directory != d:
        _DEFAULT_CACHE = BackgroundGraphCache(d)
    return _DEFAULT_CACHE


BUILDS = ("union", "block")

#: Seed of the multipliers of :func:`canonical_order`'s row hashes: cache keys must agree
#: across processes and runs.
_ROW_HASH_SEED = 0x5EED_F5B


def canonical_order(x: np.ndarray) -> tuple[np.ndarray, str]:
    """The permutation that puts the rows of ``x`` in content order, and a digest of the row set.

    Two tasks holding the same items in different orders get the same digest and, after the
    permutation, the same matrix: a graph built on it is shared between them and does not
    depend on the order a task lists its items in."""
    h = row_hashes(x, np.random.default_rng(_ROW_HASH_SEED), n_hashes=2)
    order = np.lexsort((h[:, 1], h[:, 0])).astype(np.int64)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{x.shape}|{x.dtype}".encode())
    digest.update(np.ascontiguousarray(h[order]).data)
    return order, digest.hexdigest()


def _inverse(order: np.ndarray) -> np.ndarray:
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order), dtype=order.dtype)
    return inv


def _from_canonical(nb: Neighbors, order: np.ndarray, rows: np.ndarray | None) -> Neighbors:
    """Lists computed on canonically ordered points, back in the caller's order: row ``r`` of the
    result is row ``rows[r]`` of ``nb`` (``None``: the same row), ids mapped through ``order``."""
    idx = nb.indices if rows is None else nb.indices[rows]
    sims = nb.sims if rows is None else nb.sims[rows]
    return Neighbors(np.where(idx >= 0, order[np.maximum(idx, 0)], -1), sims)


def _cached_search(
    cache: BackgroundGraphCache | None, key: str | None, compute: Any
) -> tuple[Neighbors, dict[str, np.ndarray], str]:
    """``compute()`` -> (lists, index state, index kind), through ``cache`` under ``key``."""
    if cache is not None and key is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    nb, state, kind = compute()
    if cache is not None and key is not None:
        cache.put(key, nb, state, kind)
    return nb, state, kind


def _content_ordered_lists(
    x: np.ndarray,
    *,
    k: int,
    index: str,
    opts: dict[str, Any],
    cache: BackgroundGraphCache | None,
    **key_params: object,
) -> tuple[Neighbors, Callable[[], KnnIndex], np.ndarray, str | None]:
    """The kNN lists of ``x`` computed on its points in content order (:func:`canonical_order`),
    so one cache entry serves every order the same points come in. Returns the lists in ``x``'s
    order, a function giving an index over the content-ordered points (the one just built, or
    rebuilt from the cached state), the order (an index search's ids map back as ``order[ids]``)
    and the cache key."""
    order, digest = canonical_order(x)
    built: list[KnnIndex] = []

    def compute() -> tuple[Neighbors, dict[str, np.ndarray], str]:
        idx = KnnIndex(np.ascontiguousarray(x[order]), index=index, **opts)
        built.append(idx)
        return idx.search_self(k), idx.state(), idx.kind

    key = None if cache is None else cache.key(digest, k=k, index=index, **key_params)
    nb, state, kind = _cached_search(cache, key, compute)

    def index_over_points() -> KnnIndex:
        # on a cache hit the points are reordered (a copy of the pool) only if a search needs them
        if not built:
            xc = np.ascontiguousarray(x[order])
            built.append(KnnIndex(xc, index=kind, state=state or None, **opts))
        return built[0]

    return _from_canonical(nb, order, _inverse(order)), index_over_points, order, key


def background_index(
    background: np.ndarray | torch.Tensor,
    *,
    k: int = 30,
    metric: str = "cosine",
    index: str = "auto",
    nprobe: int = 8,
    nlist: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    cache: BackgroundGraphCache | None = None,
) -> tuple[Neighbors, KnnIndex, np.ndarray]:
    """``W_BB`` kNN lists of the background set, a searchable index over it and ``order``: the
    index holds the background in content order, so one cached graph serves every order a task
    lists the same background in. The lists are in the caller's order; ids an index search
    returns are mapped back with ``order[ids]``."""
    xb = prepare_vectors(background, metric)
    inner = "ip" if metric == "cosine" else metric  # xb is already normalised
    opts = {"metric": inner, "nprobe": nprobe, "nlist": nlist, "device": device, "seed": seed}
    nb, index_over, order, _ = _content_ordered_lists(
        xb, k=k, index=index, opts=opts, cache=cache, metric=metric, **opts_key(opts)
    )
    return nb, index_over(), order


def _union_graph(
    xu: np.ndarray,
    xq: np.ndarray | None,
    *,
    k: int,
    metric: str,
    index: str,
    opts: dict[str, Any],
    weight: str,
    temperature: float,
    cache: BackgroundGraphCache | None,
) -> Graph:
    """One kNN graph over all core points ``xu`` (in content order, so that tasks holding the same
    items share it from ``cache``), and the out-only rows of ``xq``, whose lists are cached too."""
    core, index_over, order, key = _content_ordered_lists(
        xu, k=k, index=index, opts=opts, cache=cache, metric=metric, build="union", **opts_key(opts)
    )
    out = None
    if xq is not None:
        q_order, q_digest = canonical_order(xq)

        def search_queries() -> tuple[Neighbors, dict[str, np.ndarray], str]:
            return index_over().search(np.ascontiguousarray(xq[q_order]), k), {}, "queries"

        q_key = None if key is None else cache.key(q_digest, of=key)  # type: ignore[union-attr]
        qn, _, _ = _cached_search(cache, q_key, search_queries)
        out = _from_canonical(qn, order, _inverse(q_order))
    return graph_from_neighbors(core, out, weight=weight, temperature=temperature)


def opts_key(opts: dict[str, Any]) -> dict[str, Any]:
    """The index options that decide a graph (not where it is computed)."""
    return {n: v for n, v in opts.items() if n not in ("device", "metric")}


def build_block_graph(
    labeled: np.ndarray | torch.Tensor,
    background: np.ndarray | torch.Tensor | None,
    queries: np.ndarray | torch.Tensor | None = None,
    *,
    k: int = 30,
    metric: str = "cosine",
    index: str = "auto",
    nprobe: int = 8,
    nlist: int | None = None,
    weight: str = "binary",
    temperature: float = 0.1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    cache: BackgroundGraphCache | None = None,
    build: str = "union",
) -> Graph:
    """The kNN graph over nodes ``[labeled, background, queries]``; queries are out-only.

    ``build="union"`` (default): the graph of all core points ``[labeled; background]``, as
    :func:`build_graph` would build it. When the index is exact (Flat) it is assembled from
    blocks -- the background's own lists (``W_BB``, from ``cache``) merged with exact searches
    against the small labeled set -- which gives the same lists; when it is approximate (IVF)
    one index over all core points is built (in content order) and cached whole, with the
    queries' lists: tasks holding the same items (a semi-supervised split, where each task labels
    other items of the same pool) share it. ``build="block"``: Douze et al.'s offline/online
    split with any index: ``W_BB`` from an index over the background alone (built once per
    background and cached), the labeled and query points searched in it online -- for a fixed
    background and changing labeled sets. Either way a graph depends on the items only, never on
    whether a cache held it.
    """
    if build not in BUILDS:
        raise ValueError(f"build must be one of {BUILDS}, not {build!r}")
    xl = prepare_vectors(labeled, metric)
    inner = "ip" if metric == "cosine" else metric
    n_l = xl.shape[0]
    xq = prepare_vectors(queries, metric) if queries is not None and len(queries) else None
    has_bg = background is not None and len(background) > 0
    if not has_bg:
        lab_idx = KnnIndex(xl, metric=inner, index="flat", device=device)
        core = lab_idx.search_self(k)
        out = lab_idx.search(xq, k) if xq is not None else None
        return graph_from_neighbors(core, out, weight=weight, temperature=temperature)
    assert background is not None
    xb = prepare_vectors(background, metric)
    n_u = n_l + xb.shape[0]
    kind = index if index != "auto" else choose_index(n_u, n_u)
    if build == "union" and kind != "flat":
        opts = {"metric": inner, "nprobe": nprobe, "nlist": nlist, "device": device, "seed": seed}
        return _union_graph(
            np.concatenate([xl, xb]),
            xq,
            k=k,
            metric=metric,
            index=kind,
            opts=opts,
            weight=weight,
            temperature=temperature,
            cache=cache,
        )
    if kind == "flat" and cache is None:
        # exact search, nothing to share: one index over all core points gives the same lists
        # as the block assembly below, with one search instead of four and no merging
        return build_graph(
            np.concatenate([xl, xb]),
            xq,
            k=k,
            metric=inner,
            index="flat",
            weight=weight,
            temperature=temperature,
            device=device,
        )
    lab_idx = KnnIndex(xl, metric=inner, index="flat", device=device)
    bb, bg_idx, order = background_index(
        xb,
        k=k,
        metric=inner,
        index=kind,
        nprobe=nprobe,
        nlist=nlist,
        device=device,
        seed=seed,
        cache=cache,
    )

    def in_background(x: np.ndarray) -> Neighbors:
        return _from_canonical(bg_idx.search(x, k), order, None).shifted(n_l)

    rows_l = merge_neighbors([lab_idx.search_self(k), in_background(xl)], k)
    rows_b = merge_neighbors([bb.shifted(n_l), lab_idx.search(xb, k)], k)
    core = Neighbors(
        np.concatenate([rows_l.indices, rows_b.indices]), np.concatenate([rows_l.sims, rows_b.sims])
    )
    out = None
    if xq is not None:
        out = merge_neighbors([lab_idx.search(xq, k), in_background(xq)], k)
    return graph_from_neighbors(core, out, weight=weight, temperature=temperature)
