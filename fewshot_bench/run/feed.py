"""Assembled tasks for the runner: each chunk built once, ahead of its use.

The runner evaluates a protocol's methods one after another on the same task sets, and methods
that consume the same pool tensor and receive the same parts of a task (with or without its
unlabeled pool) get identical assembled tasks. Assembly (gathering up to the whole pool, hashing
every row for its keyed order) is work the worker otherwise waits for. The feed knows the run's
schedule of chunks up front; it builds them in order in one background thread, one chunk ahead
of the chunk being evaluated, so that assembly overlaps the worker's computation, and it keeps a
built chunk for the later methods that need it (within a byte budget; a chunk over budget is
simply built again), dropping it after its last scheduled use.

Only the runner's process ever holds these chunks: what a method receives is unchanged.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["ChunkKey", "TaskFeed", "default_budget"]


@dataclass(frozen=True)
class ChunkKey:
    """What determines an assembled chunk: the pool tensor it is gathered from (by what the
    method consumes), the task set (seed), the task indices, and whether the unlabeled pool is
    included."""

    consumes: str
    seed: int
    tasks: tuple[int, ...]
    unlabeled: bool


def default_budget() -> int:
    """Bytes of assembled chunks kept for later methods: an eighth of physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (AttributeError, ValueError, OSError):
        return 1 << 30


#: Niceness of the assembling thread: building ahead uses the cycles the worker leaves idle
#: instead of taking them from its compute threads.
ASSEMBLY_NICENESS = 10


def _yield_to_workers() -> None:
    try:
        tid = threading.get_native_id()
        nice = max(os.getpriority(os.PRIO_PROCESS, tid), ASSEMBLY_NICENESS)  # never raised
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: same work, same results
        pass


def chunk_bytes(built: Sequence[Any]) -> int:
    """Bytes held by the task tensors of an assembled chunk."""
    total = 0
    for b in built:
        for t in (b.task.support, b.task.unlabeled, b.task.query):
            total += t.numel() * t.element_size()
    return total


class TaskFeed:
    """Chunks of assembled tasks in ``schedule`` order, built by ``build(key)`` in a background
    thread, up to ``ahead`` chunks beyond the one last asked for.

    ``get(key)`` returns the chunk (building it now if it was not ahead) and starts building the
    next scheduled ones; keys outside the schedule are built on demand and not kept. Use as a
    context manager: leaving it waits for the chunk being built and drops the rest."""

    def __init__(
        self,
        schedule: Sequence[ChunkKey],
        build: Callable[[ChunkKey], list],
        *,
        ahead: int = 2,
        budget: int | None = None,
    ) -> None:
        self._schedule = list(schedule)
        self._uses = Counter(self._schedule)
        self._build = build
        self._ahead = ahead
        self._budget = default_budget() if budget is None else budget
        self._pos = 0
        self._built: dict[ChunkKey, Future] = {}
        self._sizes: dict[ChunkKey, int] = {}  # bytes of the chunks kept for a later use
        self._kept = 0
        self._lock = threading.Lock()
        # assembly runs in this one thread only, so a chunk is never built twice at once
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fsbench-assemble", initializer=_yield_to_workers
        )
        with self._lock:
            self._prefetch()

    def _start(self, key: ChunkKey) -> Future:
        fut = self._built.get(key)
        if fut is None:
            fut = self._thread.submit(self._build, key)
            self._built[key] = fut
        return fut

    def get(self, key: ChunkKey) -> list:
        """The assembled chunk of ``key``."""
        with self._lock:
            fut = self._start(key)
            if self._pos < len(self._schedule) and self._schedule[self._pos] == key:
                self._pos += 1
            self._prefetch()
        built = fut.result()
        with self._lock:
            self._uses[key] -= 1
            if key not in self._sizes:
                size = chunk_bytes(built)
                if self._uses[key] > 0 and self._kept + size <= self._budget:
                    self._sizes[key] = size
                    self._kept += size
                else:
                    self._built.pop(key, None)
            elif self._uses[key] <= 0:
                self._built.pop(key, None)
                self._kept -= self._sizes.pop(key)
        return built

    def _prefetch(self) -> None:
        for key in self._schedule[self._pos : self._pos + self._ahead]:
            self._start(key)

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._built.clear()
        self._sizes.clear()
        self._kept = 0

    def __enter__(self) -> TaskFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
