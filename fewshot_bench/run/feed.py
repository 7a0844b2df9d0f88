"""Assembled tasks for the runner: each chunk built once, ahead of its use.

The runner evaluates a protocol's methods one after another on the same task sets, and methods
that consume the same pool tensor and receive the same parts of a task (with or without its
unlabeled pool) get identical assembled tasks. Assembly (gathering up to the whole pool, hashing
every row for its keyed order) is work the worker otherwise waits for. The feed knows the run's
schedule of chunks up front; it builds them in order in one background thread, one chunk ahead
of the chunk being evaluated, so that assembly overlaps the worker's computation, and it keeps a
built chunk for the later methods that need it, dropping it after its last scheduled use. What
it holds ahead or keeps stays within a byte budget: tasks too large for it (an ImageNet-scale
pool) are built one at a time when asked for, as without a feed.

Only the runner's process ever holds these chunks: what a method receives is unchanged.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

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


class TaskFeed:
    """Chunks of assembled tasks in ``schedule`` order, built by ``build(key)`` in a background
    thread, up to ``ahead`` chunks beyond the one last asked for.

    ``size(key)``: the bytes a chunk will hold (known from its indices before it is built). The
    chunks built ahead or kept for a later use hold at most ``budget`` bytes together (default:
    :func:`default_budget`); a chunk larger than that is built when asked for, used and dropped,
    as without a feed. ``get(key)`` returns the chunk (building it now if it was not ahead);
    keys outside the schedule are built on demand and not kept. Use as a context manager:
    leaving it waits for the chunk being built and drops the rest."""

    def __init__(
        self,
        schedule: Sequence[ChunkKey],
        build: Callable[[ChunkKey], list],
        *,
        size: Callable[[ChunkKey], int] = lambda key: 0,
        ahead: int = 2,
        budget: int | None = None,
    ) -> None:
        self._schedule = list(schedule)
        self._uses = Counter(self._schedule)
        self._build = build
        self._size = size
        self._ahead = ahead
        self._budget = default_budget() if budget is None else budget
        self._pos = 0
        #: every chunk built ahead, being built or kept, with the bytes it holds
        self._built: dict[ChunkKey, tuple[Future, int]] = {}
        self._lock = threading.Lock()
        # assembly runs in this one thread only, so a chunk is never built twice at once
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fsbench-assemble", initializer=_yield_to_workers
        )
        with self._lock:
            self._prefetch()

    def _held(self) -> int:
        return sum(size for _, size in self._built.values())

    def _start(self, key: ChunkKey, size: int) -> Future:
        fut = self._thread.submit(self._build, key)
        self._built[key] = (fut, size)
        return fut

    def get(self, key: ChunkKey) -> list:
        """The assembled chunk of ``key``."""
        with self._lock:
            entry = self._built.get(key)
            fut = entry[0] if entry else self._start(key, self._size(key))
            if self._pos < len(self._schedule) and self._schedule[self._pos] == key:
                self._pos += 1
            self._prefetch()
        built = fut.result()
        with self._lock:
            self._uses[key] -= 1
            if self._uses[key] <= 0 or self._held() > self._budget:
                self._built.pop(key, None)
            self._prefetch()
        return built

    def _prefetch(self) -> None:
        for key in self._schedule[self._pos : self._pos + self._ahead]:
            if key in self._built:
                continue
            size = self._size(key)
            if self._held() + size > self._budget:
                return  # in order: a later chunk never takes the room of an earlier one
            self._start(key, size)

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._built.clear()

    def __enter__(self) -> TaskFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
