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
"""

from __future__ import annotations

import math

import torch

from fewshot_bench.graph.threads import split_ranges

#: Widest dense chunk one CPU sparse product takes.
SPMM_MAX_COLUMNS = 12
#: Narrowest chunk worth splitting into; below it the whole block goes in one product.
SPMM_MIN_COLUMNS = 8
#: Bytes of one dense chunk (``N x width`` float32) that still gathers from cache.
SPMM_CACHE_BYTES = 6 << 20


def chunk_width(n_rows: int, cols: int, itemsize: int = 4) -> int:
    """Columns per CPU sparse product for a dense ``[n_rows, cols]`` block (``cols``: no chunks)."""
    fits = SPMM_CACHE_BYTES // max(n_rows * itemsize, 1)
    width = min(SPMM_MAX_COLUMNS, fits)
    return width if SPMM_MIN_COLUMNS <= width < cols else cols


def sparse_matmul(W: object, L: torch.Tensor) -> torch.Tensor:
    """``W @ L``; for a CPU sparse CSR ``W`` and a wide dense ``L``, in chunks of :func:`chunk_width`.

    Any other ``W`` (CUDA, dense, an operator with its own ``@``) is left to its ``@``.
    """
    cols = L.shape[1] if L.dim() == 2 else 1
    cpu_csr = (
        isinstance(W, torch.Tensor) and W.layout == torch.sparse_csr and W.device.type == "cpu"
    )
    width = chunk_width(L.shape[0], cols, L.element_size()) if cpu_csr else cols
    if width >= cols:
        return W @ L  # type: ignore[operator]
    out = torch.empty((W.shape[0], cols), dtype=torch.result_type(W, L), device=W.device)
    for c0, c1 in split_ranges(cols, math.ceil(cols / width)):
        out[:, c0:c1] = W @ L[:, c0:c1].contiguous()
    return out
