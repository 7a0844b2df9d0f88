"""Sparse × dense products for diffusion, in column chunks on CPU.

PyTorch's CPU product of a CSR matrix with a dense block gets slower *per column* as the block
widens past about a dozen columns. Measured on a 2-core AMD EPYC (AVX2): the 100k-node kNN
graph of ``fsbench perf propagation`` (46 entries per row) times a 40-column block took 149 ms
in one product and 60 ms as four products of 10 columns (one thread: 210 against 80 ms); the
k = 10 graph 40 against 26 ms. Each output column is its own sum over a row's entries in
storage order, so the chunked product has the same bits as the single one (tested).
"""

from __future__ import annotations

import math

import torch

from fewshot_bench.graph.threads import split_ranges

#: Widest dense block one CPU sparse product takes; wider ones go in near-equal chunks.
SPMM_MAX_COLUMNS = 12


def sparse_matmul(W: object, L: torch.Tensor) -> torch.Tensor:
    """``W @ L``; for a CPU sparse CSR ``W`` and a wide dense ``[N, C]`` ``L``, in chunks of columns.

    Any other ``W`` (CUDA, dense, an operator with its own ``@``) is left to its ``@``.
    """
    cols = L.shape[1] if L.dim() == 2 else 1
    chunked = (
        isinstance(W, torch.Tensor)
        and W.layout == torch.sparse_csr
        and W.device.type == "cpu"
        and cols > SPMM_MAX_COLUMNS
    )
    if not chunked:
        return W @ L  # type: ignore[operator]
    out = torch.empty((W.shape[0], cols), dtype=torch.result_type(W, L), device=W.device)
    for c0, c1 in split_ranges(cols, math.ceil(cols / SPMM_MAX_COLUMNS)):
        out[:, c0:c1] = W @ L[:, c0:c1].contiguous()
    return out
