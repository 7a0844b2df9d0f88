"""Executors: where methods run. The runner keeps the answers; an executor only maps a method
over Tasks and returns scores.

The interface is small on purpose (a distributed executor implements the same four calls):

- ``open(spec, device, fit=..., state=...)`` builds a method (training it on base-class data or
  loading a cached state) and returns a handle with what the runner must know about it;
- ``map(handle, tasks, seeds)`` returns one ``[n_query, n_way]`` score tensor per task and the
  setting each task ran in;
- ``release(handle)`` and ``close()``.

Executors with several workers also offer ``submit(handle, tasks, seeds) -> Pending`` (the
result of one chunk, fetched later with ``Pending.result()``) and say how many chunks they run at
once (``parallelism``); the runner then keeps a few chunks in flight and stores each returned
chunk in submission order, so it stays the single writer of the results store.

:class:`ProcessExecutor` runs methods in a separate Python process started fresh (not forked,
so it inherits none of the runner's memory). The runner never unpickles what comes back: scores
arrive as raw float32 bytes, trained states as ``torch.save`` bytes the runner stores unread.
:class:`ParallelExecutor` (``--executor processes --jobs N``) runs N of them; the Ray executor
(``fewshot_bench.run.ray_executor``) runs the same worker code in Ray actors.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import itertools
import json
import os
import pickle
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from fewshot_bench.choices import EXECUTORS
from fewshot_bench.errors import FsbenchError
from fewshot_bench.run.assemble import queries_at_once
from fewshot_bench.run.heap import worker_env
from fewshot_bench.run.spawn import SpawnedWorker, claim_early, spawn_worker
from fewshot_bench.run.transport import send_request
from fewshot_bench.run.worker import MethodSpec
from fewshot_bench.tasks.task import Task

__all__ = [
    "EXECUTORS",
    "MethodError",
    "MethodHandle",
    "MethodSpec",
    "ParallelExecutor",
    "Pending",
    "ProcessExecutor",
    "decode_scores",
    "make_executor",
    "shared_executor",
]


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


def raise_for_error(meta: dict[str, Any]) -> None:
    """A worker's error answer (``{"error", "traceback"?}``) as a :class:`MethodError`."""
    if "error" in meta:
        detail = f"\n{meta['traceback']}" if meta.get("traceback") else ""
        raise MethodError(f"{meta['error']}{detail}")


def decode_scores(meta: dict[str, Any], blobs: list[bytes]) -> list[torch.Tensor]:
    """Score tensors from a worker's answer: raw float32 bytes and their shapes (nothing is
    unpickled)."""
    return [
        torch.from_numpy(np.frombuffer(b, dtype=np.float32).reshape(shape).copy())
        for b, shape in zip(blobs, meta["shapes"], strict=True)
    ]


_CHUNKS = itertools.count()


def configured_threads(env: dict[str, str]) -> int | None:
    """The CPU threads ``OMP_NUM_THREADS`` in ``env`` gives a worker's torch, or None if unset."""
    value = env.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def receives_unlabeled(setting: str) -> bool:
    """Whether a method of ``setting`` is given the task's unlabeled pool: all but inductive ones
    (the runner does not even assemble it for those)."""
    return setting != "inductive"


def given_task(task: Task, setting: str) -> Task:
    """What a non-transductive method of ``setting`` receives before its queries: no queries,
    and no unlabeled pool unless it is semi-supervised."""
    empty_q = task.query[:0]
    if receives_unlabeled(setting):
        return replace(task, query=empty_q)
    return replace(task, query=empty_q, unlabeled=task.unlabeled[:0])


def recorded_setting(task: Task, setting: str) -> str:
    """The setting a row records: what the runner gave the method on ``task``."""
    if setting == "semi-supervised" and task.unlabeled.shape[0] == 0:
        return "inductive"
    return setting


def deliver(
    call: Callable[..., tuple[dict[str, Any], list[bytes]]],
    handle: MethodHandle,
    tasks: list[Task],
    seeds: list[int],
) -> tuple[list[torch.Tensor], list[str]]:
    """Run ``tasks`` through one worker under the method's setting; ``call(op, *args)`` is a
    blocking request to that worker.

    Transductive methods get whole tasks in one request. The others first get the tasks
    without queries (``fit``), then one query per task per ``score`` request, each sent after
    the previous answer came back: a query is scored before the method sees the next, so no
    method can use its queries jointly, whatever code it runs in its worker. A built-in method
    whose scorer is row-wise (:func:`~fewshot_bench.run.assemble.queries_at_once`) gets each
    task's queries in one request instead: its scores are the same either way."""
    setting = handle.info["setting"]
    if setting == "transductive":
        meta, blobs = call("predict", handle.hid, tasks, seeds, handle.device)
        return decode_scores(meta, blobs), [setting] * len(tasks)
    # several chunks of one method may be in flight on one worker (Ray actors): each chunk's
    # scorers live under their own key
    key = (handle.hid, next(_CHUNKS))
    call("fit", key, [given_task(t, setting) for t in tasks], seeds, handle.device)
    rows: list[list[torch.Tensor]] = [[] for _ in tasks]
    n_query = [int(t.query.shape[0]) for t in tasks]
    step = max(n_query, default=0) if queries_at_once(handle.spec.name, handle.spec.origin) else 1
    try:
        for r in range(0, max(n_query, default=0), max(step, 1)):
            live = [i for i, n in enumerate(n_query) if r < n]
            meta, blobs = call("score", key, [(i, tasks[i].query[r : r + step]) for i in live])
            for i, s in zip(live, decode_scores(meta, blobs), strict=True):
                expected = (min(step, n_query[i] - r), tasks[i].n_way)
                if tuple(s.shape) != expected:
                    raise MethodError(
                        f"method {handle.name!r} scored {expected[0]} queries with shape "
                        f"{tuple(s.shape)}; expected {expected}"
                    )
                rows[i].append(s)
    except BaseException:
        with contextlib.suppress(Exception):  # the worker may be gone; keep the first error
            call("drop", key)
        raise
    call("drop", key)
    scores = [
        torch.cat(r) if r else torch.zeros(0, t.n_way) for r, t in zip(rows, tasks, strict=True)
    ]
    return scores, [recorded_setting(t, setting) for t in tasks]


class ProcessExecutor:
    """One worker process; requests are answered in order.

    ``env``: extra environment variables for the worker (e.g. ``OMP_NUM_THREADS``)."""

    def __init__(
        self,
        plugins: tuple[str, ...] = (),
        *,
        env: dict[str, str] | None = None,
        spawned: SpawnedWorker | None = None,
    ) -> None:
        self.plugins = tuple(plugins)
        self._ids = itertools.count(1)
        self._described: dict[bytes, dict[str, Any]] = {}
        # ``spawned``: a worker started already (the early one of ``fsbench run``)
        worker = spawned or spawn_worker(env)
        self.proc = worker.proc
        self._out = Connection(worker.to_worker, readable=False)
        self._in = Connection(worker.from_worker, writable=False)
        # carries the sealed memory files of large arrays (fewshot_bench.run.transport)
        self._files = worker.files
        self._worker = worker
        #: the worker's CPU threads where OMP_NUM_THREADS sets them (recorded with the hardware)
        self.worker_threads = configured_threads(worker.env)
        meta, _ = self._call("init", list(sys.path), list(self.plugins))
        #: how the worker is confined ("landlock ABI N: writes confined to ...") or None
        self.sandbox: str | None = meta.get("sandbox")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _call(self, *request: Any) -> tuple[dict[str, Any], list[bytes]]:
        try:
            send_request(self._out, self._files, request)
            meta = json.loads(self._in.recv_bytes())
            blobs = [self._in.recv_bytes() for _ in range(int(meta.get("n_blobs", 0)))]
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            code = self.proc.wait(timeout=30)
            raise MethodError(
                f"the method worker exited (code {code}) during {request[0]!r}; finished tasks are "
                "stored: fix the cause and rerun the same command to resume"
            ) from None
        raise_for_error(meta)
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
        """Validate a spec and return the method's info without keeping it (asked of the worker
        once per spec: the worker's code does not change while it runs)."""
        key = pickle.dumps(spec)
        if key not in self._described:
            handle = self.open(spec)
            self.release(handle)
            self._described[key] = handle.info
        return copy.deepcopy(self._described[key])

    def map(
        self, handle: MethodHandle, tasks: list[Task], seeds: list[int]
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Scores of each task (float32 on the CPU) and the setting each ran in."""
        return deliver(self._call, handle, tasks, seeds)

    def release(self, handle: MethodHandle) -> None:
        if self.alive:
            self._call("release", handle.hid)

    def close(self) -> None:
        if self.alive:
            try:
                send_request(self._out, None, ("exit",))
            except OSError:
                pass
        self._worker.reap()
        self._out.close()
        self._in.close()
        self._files.close()


class Pending:
    """The answer to one submitted chunk: ``result()`` waits for it and returns the score tensors
    and settings (as ``map`` does); ``seconds`` is then the time the worker spent on it."""

    def __init__(self, get: Callable[[], tuple[list[torch.Tensor], list[str], float]]) -> None:
        self._get = get
        self._value: tuple[list[torch.Tensor], list[str]] | None = None
        self.seconds: float | None = None

    def result(self) -> tuple[list[torch.Tensor], list[str]]:
        if self._value is None:
            scores, settings, seconds = self._get()
            self._value, self.seconds = (scores, settings), seconds
        return self._value


def check_same_info(name: str, infos: list[dict[str, Any]]) -> None:
    """Every worker must build the same method from the same code: a worker whose code
    fingerprint or configuration differs (another version installed on a node) is an error."""
    keys = ("name", "consumes", "setting", "trains", "config", "code_fingerprint")
    first = {k: infos[0].get(k) for k in keys}
    for info in infos[1:]:
        other = {k: info.get(k) for k in keys}
        if other != first:
            diff = sorted(k for k in keys if other[k] != first[k])
            raise MethodError(
                f"workers disagree about method {name!r} ({', '.join(diff)} differ): they run "
                "different code; install the same fewshot-bench and plugins on every node"
            )


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous non-empty ranges covering ``range(n)`` (fewer when ``n < parts``)."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def map_in_chunks(
    submit: Callable[[list[Task], list[int]], Pending],
    parts: int,
    tasks: list[Task],
    seeds: list[int],
) -> tuple[list[torch.Tensor], list[str]]:
    """``map`` of an executor with ``submit``: the tasks split into ``parts`` chunks (one per
    worker holding the method), all submitted at once; scores and settings in input order."""
    pending = [submit(tasks[a:b], seeds[a:b]) for a, b in split_evenly(len(tasks), parts)]
    scores: list[torch.Tensor] = []
    settings: list[str] = []
    for p in pending:
        s, t = p.result()
        scores += s
        settings += t
    return scores, settings


class _Lane:
    """One worker process driven by its own thread: calls to it run in order, off the caller's
    thread, so the runner can keep several workers busy at once."""

    def __init__(self, make: Callable[[], ProcessExecutor]) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.outstanding = 0
        self.executor: ProcessExecutor | None = None
        self.ready: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(make,), daemon=True)
        self._thread.start()

    def _loop(self, make: Callable[[], ProcessExecutor]) -> None:
        try:
            self.executor = make()
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits on ``ready``
            self.ready.set_exception(exc)
            return
        self.ready.set_result(self.executor)
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.executor))
                    except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                        fut.set_exception(exc)
            finally:
                with self._lock:
                    self.outstanding -= 1

    def run(self, fn: Callable[[ProcessExecutor], Any]) -> Future:
        fut: Future = Future()
        with self._lock:
            self.outstanding += 1
        self._queue.put((fn, fut))
        return fut

    def close(self) -> None:
        if self.executor is not None and self._thread.is_alive():
            if self.outstanding and self.executor.alive:
                # chunks still running (an error or ^C in the runner): nobody waits for them
                self.executor.proc.kill()
            self.run(lambda ex: ex.close())
            self._queue.put(None)
            self._thread.join(timeout=60)
        elif self.executor is not None:
            self.executor.close()


class ParallelExecutor:
    """``--executor processes --jobs N``: N worker processes on this machine, one interface.

    ``open`` builds the method on every worker; a method that trains is fitted once, on the first
    worker, and the others load its state (the same bytes the runner caches), so ``fit`` runs once
    per configuration. A trained method that keeps no state runs on the first worker only.
    ``submit`` sends a chunk to the least busy worker; ``map`` splits its tasks across workers and
    returns the results in input order. Each worker gets ``OMP_NUM_THREADS = cores // N`` unless
    the variable is set already. Results equal the serial executor's for batch-independent
    methods (every built-in feature method), since each task carries its own seed.
    """

    def __init__(self, plugins: tuple[str, ...] = (), jobs: int | None = None) -> None:
        if jobs is None:
            jobs = os.cpu_count() or 1
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise FsbenchError(f"--jobs must be an integer >= 1, got {jobs!r}")
        self.plugins = tuple(plugins)
        self.jobs = jobs
        env = None
        if "OMP_NUM_THREADS" not in os.environ:
            n = str(max(1, (os.cpu_count() or 1) // jobs))
            env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        self._ids = itertools.count(1)
        self._subs: dict[int, dict[int, MethodHandle]] = {}
        #: every lane's worker gets this environment, hence these threads
        self.worker_threads = configured_threads(worker_env(env))
        # workers start concurrently (each imports torch), each in its own lane
        self.lanes = [_Lane(lambda: ProcessExecutor(self.plugins, env=env)) for _ in range(jobs)]
        errors = []
        for lane in self.lanes:
            try:
                lane.ready.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below after cleanup
                errors.append(exc)
        if errors:
            self.close()
            raise errors[0]

    @property
    def parallelism(self) -> int:
        return self.jobs

    @property
    def alive(self) -> bool:
        return all(lane.executor is not None and lane.executor.alive for lane in self.lanes)

    def open(
        self,
        spec: MethodSpec,
        device: torch.device | str = "cpu",
        *,
        fit: dict[str, Any] | None = None,
        state: bytes | None = None,
    ) -> MethodHandle:
        first = self.lanes[0].run(lambda ex: ex.open(spec, device, fit=fit, state=state)).result()
        subs = {0: first}
        share = state if state is not None else first.state
        pinned = state is None and fit is not None and first.info["trains"] and share is None
        if not pinned:
            futures = {
                i: lane.run(lambda ex: ex.open(spec, device, state=share))
                for i, lane in enumerate(self.lanes[1:], start=1)
            }
            try:
                for i, fut in futures.items():
                    subs[i] = fut.result()
                check_same_info(first.name, [h.info for h in subs.values()])
            except BaseException:
                self._release_subs(subs, wait=False)
                raise
        hid = next(self._ids)
        self._subs[hid] = subs
        return MethodHandle(hid, spec, first.info, str(device), first.state)

    def describe(self, spec: MethodSpec) -> dict[str, Any]:
        """Validate a spec (in the first worker) and return the method's info."""
        return self.lanes[0].run(lambda ex: ex.describe(spec)).result()

    def submit(self, handle: MethodHandle, tasks: list[Task], seeds: list[int]) -> Pending:
        """Send one chunk to the least busy worker that holds the method."""
        subs = self._subs[handle.hid]
        i = min(subs, key=lambda j: (self.lanes[j].outstanding, j))
        sub = subs[i]

        def work(ex: ProcessExecutor) -> tuple[list[torch.Tensor], list[str], float]:
            start = time.perf_counter()
            scores, settings = ex.map(sub, tasks, seeds)
            return scores, settings, time.perf_counter() - start

        return Pending(self.lanes[i].run(work).result)

    def map(
        self, handle: MethodHandle, tasks: list[Task], seeds: list[int]
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Scores of each task, the tasks split across the workers, in input order."""
        submit = functools.partial(self.submit, handle)
        return map_in_chunks(submit, len(self._subs[handle.hid]), tasks, seeds)

    def _release_subs(self, subs: dict[int, MethodHandle], wait: bool = True) -> None:
        futures = [
            self.lanes[i].run(lambda ex, h=h: ex.release(h))
            for i, h in subs.items()
            if self.lanes[i].executor is not None
        ]
        if wait:
            for fut in futures:
                fut.result()

    def release(self, handle: MethodHandle) -> None:
        subs = self._subs.pop(handle.hid, None)
        if subs:
            self._release_subs(subs)

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()


def make_executor(
    kind: str,
    plugins: tuple[str, ...] = (),
    *,
    jobs: int | None = None,
    address: str | None = None,
    device: torch.device | str = "cpu",
    resources: Any = None,
) -> Any:
    """The executor ``--executor KIND`` names: ``serial`` (the shared worker process),
    ``processes`` (``jobs`` worker processes, default one per core) or ``ray`` (actors on a Ray
    cluster at ``address``, or a local Ray instance). ``resources``: for Ray, a function from a
    MethodSpec to its :class:`~fewshot_bench.run.ray_executor.Resources` (default: 1 CPU, and 1
    GPU when ``device`` is CUDA)."""
    if kind not in EXECUTORS:
        raise FsbenchError(f"--executor {kind!r} is not known; use one of {', '.join(EXECUTORS)}")
    if address is not None and kind != "ray":
        raise FsbenchError(f"--address is for --executor ray, not --executor {kind}")
    if kind == "serial":
        if jobs not in (None, 1):
            raise FsbenchError("--jobs needs --executor processes or ray (serial runs one worker)")
        return shared_executor(tuple(plugins))
    if kind == "processes":
        return ParallelExecutor(tuple(plugins), jobs)
    from fewshot_bench.run.ray_executor import RayExecutor

    return RayExecutor(
        tuple(plugins), address=address, jobs=jobs, device=str(device), resources=resources
    )


_SHARED: dict[tuple, ProcessExecutor] = {}


def shared_executor(plugins: tuple[str, ...] = ()) -> ProcessExecutor:
    """A worker reused across runs of this process (started on first use, closed at exit)."""
    key = (tuple(plugins), tuple(sys.path))
    ex = _SHARED.get(key)
    if ex is None or not ex.alive:
        ex = _SHARED[key] = ProcessExecutor(plugins, spawned=claim_early())
    return ex


@atexit.register
def _close_shared() -> None:
    for ex in _SHARED.values():
        ex.close()
    _SHARED.clear()
