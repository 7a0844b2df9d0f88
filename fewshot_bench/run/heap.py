"""Keep freed memory in the runner and worker processes, so that task after task of the same
shape reuses it instead of asking the kernel for fresh, zeroed pages.

A semi-supervised task over a 70 000-image pool allocates several arrays of ~200 MB (the task's
items, their normalised copy, the pseudo-labelled training set). glibc serves every allocation
above 32 MB with its own ``mmap`` and returns it with ``munmap`` when freed, so the next task
faults in and zeroes the same amount again: in the README's main job (84 such tasks) that was
9.7 million page faults and 43 of its ~150 CPU seconds in the kernel. Serving large allocations
from the heap and never trimming it (:func:`keep_freed_memory`), and letting torch back its
large CPU tensors with 2 MiB pages (``THP_MEM_ALLOC_ENABLE``, read by torch when it starts),
took the same job to 0.35-0.47 million faults and 12 kernel CPU seconds, with identical results
(memory placement changes no arithmetic). Reuse is not guaranteed: a freed block is reused only
where the next request fits in it (torch's aligned allocations ask for slightly more than they
use). The cost is that a process keeps its peak heap until it exits (the main job's largest
process went from 1.89 to 2.2-2.4 GB).

Both are skipped where the user has set the corresponding glibc / torch variables, and are
no-ops off glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Free memory at the top of the heap kept before glibc returns it (mallopt takes an int).
_TRIM_THRESHOLD = 2**31 - 1

#: Environment for method workers: torch uses 2 MiB pages for CPU tensors of >= 2 MiB. torch reads
#: it once, when the process starts, so it is passed in the worker's environment.
WORKER_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}

_USER_MALLOC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Make glibc serve large allocations from the heap and keep freed memory for reuse.

    Returns whether the setting was applied (False off glibc, or where the user's environment
    already tunes malloc)."""
    if platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in _USER_MALLOC_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # trim threshold first: setting it also stops glibc from adapting the mmap threshold
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, 0))


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a method worker: this process's, plus :data:`WORKER_ENV` where the user
    has not set those variables, plus ``extra``."""
    return {**WORKER_ENV, **os.environ, **(extra or {})}
