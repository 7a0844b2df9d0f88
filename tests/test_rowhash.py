"""Row content hashes: exact 64-bit arithmetic, so task orders and graph-cache keys never move."""

import numpy as np
from sklearn.datasets import load_digits

from fewshot_bench.rowhash import row_hashes

M64 = (1 << 64) - 1


def reference_hashes(x: np.ndarray, seed: int, n_hashes: int) -> np.ndarray:
    """The documented hash written with Python integers, one row and one word at a time."""
    n = x.shape[0]
    raw = np.ascontiguousarray(x).reshape(n, -1).view(np.uint8).reshape(n, -1)
    raw = np.concatenate([raw, np.zeros((n, (-raw.shape[1]) % 8), np.uint8)], axis=1)
    words = raw.view("<u8")
    mult = np.random.default_rng(seed).integers(
        0, 2**63, size=(words.shape[1], n_hashes), dtype=np.uint64
    )
    out = np.zeros((n, n_hashes), dtype=np.uint64)
    for i in range(n):
        for j in range(n_hashes):
            h = (
                sum(int(w) * (2 * int(m) + 1) for w, m in zip(words[i], mult[:, j], strict=True))
                & M64
            )
            h ^= h >> 30
            h = (h * 0xBF58476D1CE4E5B9) & M64
            h ^= h >> 27
            h = (h * 0x94D049BB133111EB) & M64
            h ^= h >> 31
            out[i, j] = h
    return out


def test_row_hashes_equal_the_exact_integer_definition():
    digits = load_digits().data[:40]
    cases = [
        digits.astype(np.float32),  # 256 bytes per row
        digits.astype(np.uint8)[:, :61],  # 61 bytes: a zero-padded last word
        digits.astype(np.float64).reshape(40, 8, 8),
    ]
    for x in cases:
        for n_hashes in (1, 2):
            got = row_hashes(x, np.random.default_rng(11), n_hashes=n_hashes)
            assert got.dtype == np.uint64 and got.shape == (40, n_hashes)
            np.testing.assert_array_equal(got, reference_hashes(x, 11, n_hashes))


def test_a_rows_hash_depends_on_its_bytes_only():
    x = load_digits().data[:30].astype(np.float32)
    perm = np.random.default_rng(0).permutation(30)
    h = row_hashes(x, np.random.default_rng(3), n_hashes=2)
    np.testing.assert_array_equal(
        row_hashes(x[perm], np.random.default_rng(3), n_hashes=2), h[perm]
    )
    assert len(np.unique(h[:, 0])) == len(np.unique(x, axis=0))
