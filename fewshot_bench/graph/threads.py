"""Scoped single-threading for small problems.

Small torch / LAPACK / faiss calls gain nothing from threads, and on a busy machine their
OpenMP barriers make them many times slower (measured: a 185x185 ``eigh`` 12 ms on one thread,
560 ms on two under load). Methods wrap small tasks in :func:`few_threads`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import faiss
import torch

T = TypeVar("T")
R = TypeVar("R")

#: Problems with at most this many nodes run single-threaded on CPU.
SMALL_PROBLEM_NODES = 5000


@contextmanager
def few_threads(active: bool = True) -> Iterator[None]:
    """Run the block with one torch and one faiss thread (restored afterwards) if ``active``."""
    if not active:
        yield
        return
    torch_before = torch.get_num_threads()
    faiss_before = faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_before)
        faiss.omp_set_num_threads(faiss_before)


def n_workers() -> int:
    """Worker threads for coarse-grained parallel loops: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool, every op inside single-threaded.

    Coarse-grained parallelism (a few big independent chunks, no OpenMP barrier per small op)
    keeps both cores busy on an idle machine and degrades gracefully on a busy one. torch,
    BLAS and faiss release the GIL, so the threads run truly in parallel.
    """
    items = list(items)
    workers = min(workers if workers is not None else n_workers(), len(items))
    with few_threads(True):
        if workers <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, near-equal ``[start, stop)`` ranges covering ``range(n)`` (none empty)."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]
