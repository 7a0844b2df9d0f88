"""Label spreading with a persistence term (Zhou et al. 2004, "Learning with local and global
consistency").

``S = D^-1/2 A D^-1/2`` over the core nodes, ``Y`` the one-hot seed matrix,
``F_{t+1} = α S F_t + (1 - α) Y`` (iterative, ``F_0 = Y``) or its fixed point
``F* = (1 - α) (I - α S)^-1 Y`` (closed form). Unlike Douze et al.'s diffusion the seeds keep
pulling towards their own labels at every step (the persistence term ``(1 - α) Y``), so a few
cross-class edges cannot wash a class out. Out-only nodes (queries outside the graph) take the
row-normalised average of their neighbours' ``F``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from fewshot_bench.graph.build import Graph


def normalized_affinity(a: sp.csr_matrix) -> sp.csr_matrix:
    """``D^-1/2 A D^-1/2`` (isolated nodes get zero rows and columns)."""
    deg = np.asarray(a.sum(axis=1), dtype=np.float64).ravel()
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    d = sp.diags(inv_sqrt)
    return (d @ a.astype(np.float64) @ d).tocsr()


def label_spreading(
    graph: Graph,
    seeds: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    alpha: float,
    *,
    n_iter: int | None = None,
) -> torch.Tensor:
    """``F`` of every node (core rows, then out-only rows) as float32 ``[n_nodes, n_classes]``.

    ``n_iter=None``: the closed form, solved by a sparse LU factorisation (exact); otherwise
    ``n_iter`` iterations of the update."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    s = normalized_affinity(graph.core_adjacency())
    y = np.zeros((graph.n_core, n_classes))
    y[np.asarray(seeds), np.asarray(labels)] = 1.0
    if n_iter is None:
        system = (sp.identity(graph.n_core, format="csc") - alpha * s).tocsc()
        f = (1.0 - alpha) * spla.splu(system).solve(y)
    else:
        f = y.copy()
        for _ in range(n_iter):
            f = alpha * (s @ f) + (1.0 - alpha) * y
    if graph.n_out:
        out = graph.out_adjacency().astype(np.float64)
        deg = np.asarray(out.sum(axis=1)).ravel()
        rows = (out @ f) / np.where(deg > 0, deg, 1.0)[:, None]
        f = np.vstack([f, rows])
    return torch.from_numpy(f.astype(np.float32))
