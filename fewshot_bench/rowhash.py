"""64-bit content hashes of array rows, in exact integer arithmetic (the same on every machine).

Used for the keyed item order a method receives (``run.assemble.keyed_order``) and for the
content order that lets tasks holding the same items share one kNN graph
(``graph.build.canonical_order``).
"""

from __future__ import annotations

import numpy as np


def row_hashes(x: np.ndarray, rng: np.random.Generator, n_hashes: int = 1) -> np.ndarray:
    """``[n, n_hashes]`` uint64 hashes of the rows of ``x`` (any dtype and shape ``[n, ...]``).

    A row's bytes, read as 64-bit words, are combined with odd multipliers drawn from ``rng``
    (``[words, n_hashes]``, the only draws made) and mixed with the splitmix64 finaliser: a
    row's hashes depend on its bytes and ``rng`` only, not on the other rows or their order."""
    n = int(x.shape[0])
    raw = np.ascontiguousarray(x).reshape(n, -1).view(np.uint8).reshape(n, -1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((n, pad), dtype=np.uint8)], axis=1)
    words = np.ascontiguousarray(raw).view("<u8")
    mult = rng.integers(0, 2**63, size=(words.shape[1], n_hashes), dtype=np.uint64)
    mult = mult * np.uint64(2) + np.uint64(1)
    h = np.empty((n, n_hashes), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n_hashes):
            # unsigned sums wrap modulo 2**64 in any order, so this equals the row-by-row sum;
            # einsum's matrix-vector loop is ~7x faster than a multiply-then-sum
            h[:, j] = np.einsum("ij,j->i", words, np.ascontiguousarray(mult[:, j]))
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h
