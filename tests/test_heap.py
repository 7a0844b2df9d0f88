"""Freed memory stays in the process for the next task (glibc), and workers get torch's 2 MiB
pages unless the user said otherwise."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fewshot_bench.run.heap import worker_env

# Allocates a 200 MB tensor, fills it, frees it; prints the resident MB after the free.
_PROBE = """
import os, sys, torch
if sys.argv[1] == "keep":
    from fewshot_bench.run.heap import keep_freed_memory
    assert keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
base = rss_mb()
x = torch.ones(50_000_000); del x
print(rss_mb() - base)
"""


def _resident_after_free(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_freed_task_sized_memory_stays_in_the_process() -> None:
    """By default glibc unmaps a freed 200 MB block (the next task faults it in and zeroes it
    again); after keep_freed_memory() it stays mapped in the heap, for the next allocation."""
    assert _resident_after_free("default") < 20
    assert _resident_after_free("keep") > 180


def test_worker_env_adds_torch_huge_pages_unless_the_user_chose(monkeypatch) -> None:
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    env = worker_env({"OMP_NUM_THREADS": "1"})
    assert env["THP_MEM_ALLOC_ENABLE"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"] == os.environ["PATH"]
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert worker_env()["THP_MEM_ALLOC_ENABLE"] == "0"
