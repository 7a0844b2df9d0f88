"""Executors: where methods run. The runner keeps the answers; an executor only maps a method
over Tasks and returns scores.

The interface is small on purpose (a distributed executor implements the same four calls):

- ``open(spec, device, fit=..., state=...)`` builds a method (training it on base-class data or
  loading a cached state) and returns a handle with what the runner must know about it;
- ``map(handle, tasks, seeds)`` returns one ``[n_query, n_way]`` score tensor per task and the
  setting each task ran in;
- ``release(handle)`` and ``close()``.

:class:`ProcessExecutor` runs methods in a separate Python process started fresh (not forked,
so it inherits none of the runner's memory). The runner never unpickles what comes back: scores
arrive as raw float32 bytes, trained states as ``torch.save`` bytes the runner stores unread.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from fewshot_bench.errors import FsbenchError
from fewshot_bench.run.worker import MethodSpec
from fewshot_bench.tasks.task import Task

__all__ = ["MethodError", "MethodHandle", "MethodSpec", "ProcessExecutor", "shared_executor"]


class MethodError(FsbenchError):
    """A method failed inside the worker (bad parameters, or a bug with its traceback)."""


@dataclass(frozen=True)
class MethodHandle:
    """A method built in an executor: ``info`` is what the worker reported about it
    (name, consumes, setting, trains, params, changed params, config, code fingerprint)."""

    hid: int
    spec: MethodSpec
    info: dict[str, Any]
    device: str
    state: bytes | None  # the trained state when ``open`` trained it, else None

    @property
    def name(self) -> str:
        return self.info["name"]


class ProcessExecutor:
    """One worker process; requests are answered in order."""

    def __init__(self, plugins: tuple[str, ...] = ()) -> None:
        self.plugins = tuple(plugins)
        self._ids = itertools.count(1)
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fewshot_bench.run.worker",
                str(to_worker_r),
                str(from_worker_w),
            ],
            pass_fds=(to_worker_r, from_worker_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._out = Connection(to_worker_w, readable=False)
        self._in = Connection(from_worker_r, writable=False)
        self._call("init", list(sys.path), list(self.plugins))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _call(self, *request: Any) -> tuple[dict[str, Any], list[bytes]]:
        try:
            self._out.send_bytes(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL))
            meta = json.loads(self._in.recv_bytes())
            blobs = [self._in.recv_bytes() for _ in range(int(meta.get("n_blobs", 0)))]
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            code = self.proc.wait(timeout=30)
            raise MethodError(
                f"the method worker exited (code {code}) during {request[0]!r}; finished tasks are "
                "stored: fix the cause and rerun the same command to resume"
            ) from None
        if "error" in meta:
            detail = f"\n{meta['traceback']}" if meta.get("traceback") else ""
            raise MethodError(f"{meta['error']}{detail}")
        return meta, blobs

    def open(
        self,
        spec: MethodSpec,
        device: torch.device | str = "cpu",
        *,
        fit: dict[str, Any] | None = None,
        state: bytes | None = None,
    ) -> MethodHandle:
        """Build the method in the worker; ``fit`` = ``{"source": FitSource fields, "budget",
        "seed"}`` trains it, ``state`` (bytes of a cached state) restores it instead."""
        hid = next(self._ids)
        meta, blobs = self._call("open", hid, spec, str(device), fit, state)
        return MethodHandle(hid, spec, meta["info"], str(device), blobs[0] if blobs else None)

    def describe(self, spec: MethodSpec) -> dict[str, Any]:
        """Validate a spec and return the method's info without keeping it."""
        handle = self.open(spec)
        self.release(handle)
        return handle.info

    def map(
        self, handle: MethodHandle, tasks: list[Task], seeds: list[int]
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Scores of each task (float32 on the CPU) and the setting each ran in."""
        meta, blobs = self._call("predict", handle.hid, tasks, seeds, handle.device)
        scores = [
            torch.from_numpy(np.frombuffer(b, dtype=np.float32).reshape(shape).copy())
            for b, shape in zip(blobs, meta["shapes"], strict=True)
        ]
        return scores, [str(s) for s in meta["settings"]]

    def release(self, handle: MethodHandle) -> None:
        if self.alive:
            self._call("release", handle.hid)

    def close(self) -> None:
        if self.alive:
            try:
                self._out.send_bytes(pickle.dumps(("exit",)))
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._in.close()


_SHARED: dict[tuple, ProcessExecutor] = {}


def shared_executor(plugins: tuple[str, ...] = ()) -> ProcessExecutor:
    """A worker reused across runs of this process (started on first use, closed at exit)."""
    key = (tuple(plugins), tuple(sys.path))
    ex = _SHARED.get(key)
    if ex is None or not ex.alive:
        ex = _SHARED[key] = ProcessExecutor(plugins)
    return ex


@atexit.register
def _close_shared() -> None:
    for ex in _SHARED.values():
        ex.close()
    _SHARED.clear()
