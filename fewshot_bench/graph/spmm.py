"""Sparse × dense products for diffusion, in column chunks on CPU when a chunk fits in cache.

PyTorch's CPU product of a CSR matrix with a dense block gathers one row of the block per
non-zero. While the block is small enough to stay in cache, narrower blocks are faster per
column: on a 2-core AMD EPYC (AVX2, 32 MiB L3 shared with other tenants), the 100k-node kNN graph
of ``fsbench perf propagation`` (46 entries per row) times a 40-column block took 149 ms in one
product and 60 ms as four products of 10 columns (one thread: 210 against 80 ms). Once even a
narrow chunk spills out of cache every gather is a memory access, and chunks only multiply
them: on random 30-per-row graphs, 300k nodes 516 ms whole against 570 ms in 10-column
chunks, 1M nodes 2.0 s against 3.0 s. So chunks are used only while ``N x 8`` floats fit in
:data:`SPMM_CACHE_BYTES` (up to ~196k nodes). Each output column is its own sum over a row's
entries in storage order, so a chunked product has the same bits as the single one (tested).
A matrix stored in a locality order (:class:`ReorderedCsr`; the spectral solver's reverse
Cuthill-McKee order) gathers from nearby memory at any size; such callers pass their own width.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fewshot_bench.errors import InputDataError
from fewshot_bench.graph.build import to_torch_csr
from fewshot_bench.graph.threads import split_ranges

#: Widest dense chunk one CPU sparse product takes.
SPMM_MAX_COLUMNS = 12
#: Narrowest chunk worth splitting into; below it the whole block goes in one product.
SPMM_MIN_COLUMNS = 8
#: Bytes of one dense chunk (``N x width`` float32) that still gathers from cache.
SPMM_CACHE_BYTES = 6 << 20


def gathers_miss_cache(n_rows: int, itemsize: int = 4) -> bool:
    """Whether even the narrowest chunk of ``n_rows`` rows spills out of cache: then a locality
    order of the nodes (:class:`ReorderedCsr`) pays for itself, and chunks do not."""
    return n_rows * SPMM_MIN_COLUMNS * itemsize > SPMM_CACHE_BYTES


def chunk_width(n_rows: int, cols: int, itemsize: int = 4) -> int:
    """Columns per CPU sparse product for a dense ``[n_rows, cols]`` block (``cols``: no chunks)."""
    if gathers_miss_cache(n_rows, itemsize):
        return cols
    width = min(SPMM_MAX_COLUMNS, SPMM_CACHE_BYTES // max(n_rows * itemsize, 1))
    return min(width, cols)


def sparse_matmul(W: object, L: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """``W @ L``; for a CPU sparse CSR ``W`` and a wide dense ``L``, in chunks of columns.

    ``width``: columns per product; ``None`` takes :func:`chunk_width` (for a matrix in any node
    order). A matrix stored in a locality order gathers from cache at any size, and its caller
    passes its own width (spectral embedding: 32). Any other ``W`` (CUDA, dense, an operator
    with its own ``@``) is left to its ``@``.
    """
    cols = L.shape[1] if L.dim() == 2 else 1
    cpu_csr = (
        isinstance(W, torch.Tensor) and W.layout == torch.sparse_csr and W.device.type == "cpu"
    )
    if not cpu_csr:
        return W @ L  # type: ignore[operator]
    if width is None:
        width = chunk_width(L.shape[0], cols, L.element_size())
    if width >= cols:
        return W @ L  # type: ignore[operator]
    out = torch.empty((W.shape[0], cols), dtype=torch.result_type(W, L), device=W.device)
    for c0, c1 in split_ranges(cols, math.ceil(cols / width)):
        torch.mm(W, L[:, c0:c1], out=out[:, c0:c1])
    return out


def check_order(order: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(perm, rank)`` of a node order: ``perm[r]`` is the node at position ``r``, ``rank`` its
    inverse. Refuses anything but a permutation of ``0..n-1``."""
    perm = np.asarray(order, dtype=np.int64)
    if perm.shape != (n,) or (n and (perm.min() < 0 or perm.max() >= n)):
        raise InputDataError(
            f"order must hold each of the {n} node ids once, got shape {perm.shape}"
        )
    if n and not (np.bincount(perm, minlength=n) == 1).all():
        raise InputDataError(f"order must hold each of the {n} node ids once; some repeat")
    rank = np.empty(n, np.int64)
    rank[perm] = np.arange(n)
    return perm, rank


def renumbered_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray | None,
    perm: np.ndarray,
    rank: np.ndarray,
    block: int = 1 << 18,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """CSR of ``P M Pᵀ``: row ``r`` is old row ``perm[r]``, column ids mapped by ``rank``, the
    entries kept in their old order (which fixes each product's summation order, so products
    keep their bits). Built ``block`` rows at a time so the gather index stays small."""
    lens = np.diff(indptr)[perm]
    new_ptr = np.zeros(len(perm) + 1, dtype=indptr.dtype)
    np.cumsum(lens, out=new_ptr[1:])
    new_ids = np.empty_like(indices)
    new_data = None if data is None else np.empty_like(data)
    for r0 in range(0, len(perm), block):
        r1 = min(r0 + block, len(perm))
        start, stop = new_ptr[r0], new_ptr[r1]
        take = np.repeat(indptr[perm[r0:r1]] - new_ptr[r0:r1], lens[r0:r1]) + np.arange(start, stop)
        new_ids[start:stop] = rank[indices[take]]
        if new_data is not None:
            new_data[start:stop] = data[take]
    return new_ptr, new_ids, new_data


class ReorderedCsr:
    """A square CPU CSR matrix stored renumbered in a node order in which neighbours sit close
    (e.g. :attr:`~fewshot_bench.graph.knn.KnnIndex.list_order`), so a product gathers rows of
    ``L`` from nearby memory; ``@`` takes and returns ``L`` in the original node order, with the
    bits of ``W @ L``. Quacks like ``W`` for the diffusion code (``shape``, ``device``, ``@``).
    """

    def __init__(self, W: torch.Tensor, order: np.ndarray) -> None:
        n = W.shape[0]
        perm, rank = check_order(order, n)
        ptr, ids, data = renumbered_csr(
            W.crow_indices().numpy(), W.col_indices().numpy(), W.values().numpy(), perm, rank
        )
        self.matrix = to_torch_csr(ptr, ids, data, tuple(W.shape))  # type: ignore[arg-type]
        self.shape = tuple(W.shape)
        self.device = W.device
        self.order = torch.from_numpy(perm)
        self.rank = torch.from_numpy(rank)

    def __matmul__(self, L: torch.Tensor) -> torch.Tensor:
        out = sparse_matmul(self.matrix, L.index_select(0, self.order))
        return out.index_select(0, self.rank)
