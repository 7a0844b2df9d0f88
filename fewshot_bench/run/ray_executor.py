"""``--executor ray``: run methods in Ray actors, on a local Ray instance or a cluster.

The driver (the process running ``fsbench run`` / ``fsbench sweep``) keeps everything that
decides a result: it loads the data, materialises the manifests, assembles each Task in its
seeded random order, keeps the TaskTruth, scores, and is the only writer of the results store.
Ray actors get what a :class:`~fewshot_bench.run.executor.ProcessExecutor` worker gets -- a
method spec, Tasks, per-task seeds, base-class fit data and trained-state bytes -- and run the
same code (:class:`fewshot_bench.run.worker.Worker`). They answer with plain values only: a dict
of JSON-able values and a list of ``bytes`` (scores as raw float32, trained states as
``torch.save`` bytes the driver caches unread). ``ray.get`` deserialises those plain values with
Ray's own serialiser; that is the one deserialisation of worker output the driver trusts.

Fault tolerance: actors are created with ``max_restarts`` and ``max_task_retries``, so an actor
whose process dies is restarted by Ray and its unfinished chunks are retried. A restarted actor
has lost its built methods; every chunk carries a reference to what opened the method (spec,
device and the trained state in Ray's object store), and the actor rebuilds it before scoring.
Training methods fit once per configuration, on the first actor (a GPU actor when the method
asks for GPUs); the others load the state bytes from the object store.

Ray is an optional dependency: ``pip install -e '.[ray]'``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from fewshot_bench.errors import FsbenchError
from fewshot_bench.run.executor import (
    MethodError,
    MethodHandle,
    MethodSpec,
    Pending,
    check_same_info,
    deliver,
    map_in_chunks,
    raise_for_error,
)
from fewshot_bench.run.worker import LOST_CHUNK
from fewshot_bench.tasks.task import Task

__all__ = ["INSTALL_HINT", "RayExecutor", "RayWorker", "Resources", "import_ray", "parse_memory"]

INSTALL_HINT = "pip install -e '.[ray]' (or pip install 'ray[default]')"


def import_ray() -> Any:
    """``import ray``, or an error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise FsbenchError(
            f"--executor ray needs Ray, which is not installed here ({exc}); install it with "
            f"{INSTALL_HINT}"
        ) from None
    return ray


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory(value: Any, where: str = "memory") -> int:
    """Bytes from ``4294967296``, ``"4GB"``, ``"512MiB"`` or ``"1.5 GiB"``."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int | float) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if value is not None and m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise FsbenchError(
        f'{where} = {value!r} is not an amount of memory; write bytes or e.g. "4GB", "512MiB"'
    )


@dataclass(frozen=True)
class Resources:
    """What one worker of a method reserves on the cluster (Ray's ``num_cpus``, ``num_gpus``,
    ``memory`` in bytes). A method with GPUs runs on ``cuda`` in its workers."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None

    def __post_init__(self) -> None:
        for key in ("num_cpus", "num_gpus"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise FsbenchError(f"{key} = {v!r}: give a number >= 0 (e.g. {key} = 1)")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise FsbenchError("num_cpus = 0 and num_gpus = 0: a worker must reserve something")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            opts["memory"] = int(self.memory)
        return opts

    def __str__(self) -> str:
        text = f"{self.num_cpus:g} CPU"
        if self.num_gpus:
            text += f", {self.num_gpus:g} GPU"
        if self.memory:
            text += f", {self.memory / 1e9:.3g} GB"
        return text


def _plain(meta: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    return meta, [bytes(b) for b in blobs]


class RayWorker:
    """The body of a Ray actor: a :class:`fewshot_bench.run.worker.Worker` whose answers are a
    JSON-able dict and a list of bytes. It holds no TaskTruth, manifest or store path: nothing
    it could reach says what the answers are."""

    def __init__(self, sys_path: list[str], plugins: list[str]) -> None:
        self._init = (list(sys_path), list(plugins))
        self._worker: Any = None

    def _call(self, request: tuple) -> tuple[dict[str, Any], list[bytes]]:
        start = time.perf_counter()
        if self._worker is None:
            from fewshot_bench.run.worker import Worker

            worker = Worker()
            meta, blobs = worker.answer(("init", *self._init))
            if "error" in meta:
                meta["seconds"] = time.perf_counter() - start
                return _plain(meta, blobs)
            self._worker = worker
        meta, blobs = self._worker.answer(request)
        meta["seconds"] = time.perf_counter() - start
        return _plain(meta, blobs)

    def whoami(self) -> dict[str, Any]:
        """Process id, node address, Ray node id and host name (logged by the driver)."""
        import ray

        return {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
        }

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of this actor's process."""
        t = os.times()
        return float(t.user + t.system)

    def open(self, hid: int, opener: tuple) -> tuple[dict[str, Any], list[bytes]]:
        """Build method ``hid`` from ``(spec, device, fit, state)``."""
        spec, device, fit, state = opener
        meta, blobs = self._call(("open", hid, spec, device, fit, state))
        if "info" in meta:
            from fewshot_bench.run.provenance import hardware

            try:
                meta["info"]["hardware"] = hardware(device)
            except Exception:  # noqa: BLE001 - informative only
                meta["info"]["hardware"] = ""
        return meta, blobs

    def describe(self, spec: MethodSpec) -> tuple[dict[str, Any], list[bytes]]:
        meta, _ = self._call(("open", -1, spec, "cpu", None, None))
        self._call(("release", -1))
        return meta, []

    def call(
        self, hid: int, opener_ref: list, request: tuple
    ) -> tuple[dict[str, Any], list[bytes]]:
        """One request about method ``hid`` (``predict``, ``fit``, ``score``, ``drop``); rebuilds
        the method first when this actor was restarted (a lost ``fit`` then fails ``score``)."""
        if self._worker is None or hid not in self._worker.methods:
            import ray

            meta, _ = self.open(hid, ray.get(opener_ref[0]))
            if "error" in meta:
                return meta, []
        return self._call(request)

    def release(self, hid: int) -> tuple[dict[str, Any], list[bytes]]:
        return self._call(("release", hid))


@dataclass
class _Pool:
    """Actors with one shape of resources."""

    resources: Resources
    actors: list[Any]
    where: list[dict[str, Any]]
    inflight: list[int]  # chunks in flight per actor
    handles: set[int] = field(default_factory=set)


@dataclass
class _Opened:
    pool: _Pool
    members: list[int]  # indices of the pool's actors that hold the method
    opener: Any  # ObjectRef of (spec, device, fit, state)
    device: str


class RayExecutor:
    """Methods in Ray actors; the interface of :class:`~fewshot_bench.run.executor.ProcessExecutor`
    plus ``submit`` / ``parallelism`` for the runner's pipelined chunks.

    ``address``: ``None`` starts a local Ray instance for this process; ``"auto"`` joins the
    cluster this machine belongs to; ``"HOST:PORT"`` joins that head node. ``jobs``: actors per
    method (default: as many as the cluster's CPUs or GPUs allow for the method's resources).
    ``resources``: a function from a MethodSpec to its :class:`Resources` (default 1 CPU, plus
    1 GPU when ``device`` is CUDA).
    """

    def __init__(
        self,
        plugins: tuple[str, ...] = (),
        *,
        address: str | None = None,
        jobs: int | None = None,
        device: str = "cpu",
        resources: Any = None,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        start_timeout: float = 300.0,
        verbose: bool = True,
    ) -> None:
        if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
            raise FsbenchError(f"--jobs must be an integer >= 1, got {jobs!r}")
        self.ray = ray = import_ray()
        self.plugins = tuple(plugins)
        self.jobs = jobs
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries
        self.start_timeout = start_timeout
        self.verbose = verbose
        default = Resources(num_gpus=1.0 if str(device).startswith("cuda") else 0.0)
        self._resources = resources or (lambda spec: default)
        self._ids = itertools.count(1)
        #: driver threads that carry chunks' request sequences (see ``submit``)
        self._threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="fsbench-ray")
        self._pools: dict[Resources, _Pool] = {}
        self._opened: dict[int, _Opened] = {}
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "namespace": "fewshot_bench",
                "logging_level": logging.WARNING,
                "configure_logging": True,
            }
            try:
                if address is None:
                    ray.init(include_dashboard=False, **kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = "a local Ray instance" if address is None else f"Ray at {address!r}"
                raise FsbenchError(
                    f"cannot start or reach {where}: {str(exc).splitlines()[0] if str(exc) else exc}; "
                    "for a cluster, start it with `ray start --head` and pass --address HOST:PORT "
                    "(or auto on one of its nodes)"
                ) from None
            self._owns_ray = True

    # ------------------------------------------------------------------ pools of actors
    @property
    def parallelism(self) -> int:
        if self._pools:
            return max(len(p.actors) for p in self._pools.values())
        return self.jobs or self._auto_jobs(self._resources(MethodSpec("?")))

    def _auto_jobs(self, res: Resources) -> int:
        total = self.ray.cluster_resources()
        n = math.inf
        if res.num_cpus > 0:
            n = min(n, math.floor(total.get("CPU", 0) / res.num_cpus + 1e-9))
        if res.num_gpus > 0:
            n = min(n, math.floor(total.get("GPU", 0) / res.num_gpus + 1e-9))
        return max(1, int(n if n != math.inf else 1))

    def _pool(self, res: Resources) -> _Pool:
        pool = self._pools.get(res)
        if pool is not None:
            return pool
        for other in list(self._pools.values()):  # free what idle pools of other shapes hold
            if not other.handles:
                self._kill(other)
        total = self.ray.cluster_resources()
        for key, need in (("CPU", res.num_cpus), ("GPU", res.num_gpus)):
            if need > total.get(key, 0):
                raise FsbenchError(
                    f"a method asks for {need:g} {key} per worker, but the Ray cluster has "
                    f"{total.get(key, 0):g}; change the method's num_cpus/num_gpus in the sweep "
                    "file, or add nodes with them"
                )
        n = self.jobs or self._auto_jobs(res)
        cls = self.ray.remote(RayWorker).options(
            **res.options(),
            max_restarts=self.max_restarts,
            max_task_retries=self.max_task_retries,
            scheduling_strategy="SPREAD",
        )
        actors = [cls.remote(list(sys.path), list(self.plugins)) for _ in range(n)]
        try:
            where = self.ray.get([a.whoami.remote() for a in actors], timeout=self.start_timeout)
        except self.ray.exceptions.GetTimeoutError:
            for a in actors:
                self.ray.kill(a)
            raise FsbenchError(
                f"{n} Ray workers of {res} each did not all start within {self.start_timeout:.0f} s; "
                f"the cluster has {self._cluster_text()}: lower --jobs or the method's resources"
            ) from None
        pool = _Pool(res, actors, where, [0 for _ in actors])
        self._pools[res] = pool
        if self.verbose:
            listing = ", ".join(
                f"pid {w['pid']} on {w['node']} (node {w['node_id'][:8]})" for w in where
            )
            print(f"fsbench: {n} Ray workers ({res} each): {listing}", file=sys.stderr, flush=True)
        return pool

    def _cluster_text(self) -> str:
        total = self.ray.cluster_resources()
        return ", ".join(f"{total[k]:g} {k}" for k in ("CPU", "GPU") if k in total) or "nothing"

    def _kill(self, pool: _Pool) -> None:
        for a in pool.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._pools.pop(pool.resources, None)

    def workers(self) -> list[dict[str, Any]]:
        """``whoami`` of every live actor (pid, node, host), with its resources."""
        return [{**w, "resources": str(p.resources)} for p in self._pools.values() for w in p.where]

    def worker_cpu_seconds(self) -> float:
        """CPU seconds used by the live actors' processes (since their last restart)."""
        refs = [a.cpu_seconds.remote() for p in self._pools.values() for a in p.actors]
        return float(sum(self.ray.get(refs))) if refs else 0.0

    # ------------------------------------------------------------------ answers
    def _get(self, ref: Any, what: str) -> tuple[dict[str, Any], list[bytes]]:
        ray = self.ray
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise MethodError(
                f"a Ray worker died during {what} and was not restarted ({type(exc).__name__}); "
                "finished tasks are stored: fix the cause and rerun the same command to resume"
            ) from None
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MethodError(f"Ray failed during {what}: {first}") from None
        ok = (
            isinstance(value, tuple | list)
            and len(value) == 2
            and isinstance(value[0], dict)
            and isinstance(value[1], list)
            and all(isinstance(b, bytes) for b in value[1])
        )
        if not ok:
            raise MethodError(f"a Ray worker answered {what} with something other than plain data")
        meta, blobs = value
        raise_for_error(meta)
        return meta, blobs

    # ------------------------------------------------------------------ the executor interface
    def describe(self, spec: MethodSpec) -> dict[str, Any]:
        """Validate a spec in a worker and return the method's info."""
        pool = next(iter(self._pools.values()), None) or self._pool(self._resources(spec))
        meta, _ = self._get(pool.actors[0].describe.remote(spec), "describe")
        return meta["info"]

    def open(
        self,
        spec: MethodSpec,
        device: torch.device | str = "cpu",
        *,
        fit: dict[str, Any] | None = None,
        state: bytes | None = None,
    ) -> MethodHandle:
        """Build the method on every actor of its pool. ``fit`` trains it once, on the first
        actor; the others load the resulting state from Ray's object store. The device is the
        method's resources' (``cuda`` with GPUs, else ``cpu``), whatever the driver has."""
        ray = self.ray
        res = self._resources(spec)
        pool = self._pool(res)
        dev = res.device
        hid = next(self._ids)
        members = list(range(len(pool.actors)))
        trained: bytes | None = None
        first_info = None
        if state is None and fit is not None:
            fit_opener = ray.put((spec, dev, fit, None))
            meta, blobs = self._get(pool.actors[0].open.remote(hid, fit_opener), "fit")
            first_info = meta["info"]
            trained = blobs[0] if blobs else None
            if first_info["trains"] and trained is None:
                # nothing to share: the method runs on the actor that trained it (a restarted
                # actor trains it again)
                opened = _Opened(pool, [0], fit_opener, dev)
                pool.handles.add(hid)
                self._opened[hid] = opened
                return MethodHandle(hid, spec, first_info, dev, None)
        opener = ray.put((spec, dev, None, state if state is not None else trained))
        todo = members[1:] if first_info is not None else members
        refs = [pool.actors[i].open.remote(hid, opener) for i in todo]
        infos = [first_info] if first_info is not None else []
        try:
            infos += [self._get(r, "open")[0]["info"] for r in refs]
            check_same_info(infos[0]["name"], infos)
        except BaseException:
            for a in pool.actors:
                a.release.remote(hid)
            raise
        pool.handles.add(hid)
        self._opened[hid] = _Opened(pool, members, opener, dev)
        return MethodHandle(hid, spec, infos[0], dev, trained)

    def _least_busy(self, opened: _Opened) -> int:
        pool = opened.pool
        return min(opened.members, key=lambda i: (pool.inflight[i], i))

    def submit(self, handle: MethodHandle, tasks: list[Task], seeds: list[int]) -> Pending:
        """Send one chunk to the least busy actor holding the method (its requests run in a
        driver thread, so several chunks proceed at once)."""
        opened = self._opened[handle.hid]
        i = self._least_busy(opened)
        actor = opened.pool.actors[i]

        def call(*request: Any) -> tuple[dict[str, Any], list[bytes]]:
            ref = actor.call.remote(handle.hid, [opened.opener], request)
            return self._get(ref, str(request[0]))

        def work() -> tuple[list[torch.Tensor], list[str], float]:
            start = time.perf_counter()
            try:
                for attempt in range(3):
                    try:
                        scores, settings = deliver(call, handle, list(tasks), list(seeds))
                        break
                    except MethodError as exc:
                        # Ray restarted the actor between fit and score: run the chunk again
                        if LOST_CHUNK not in str(exc) or attempt == 2:
                            raise
            finally:
                opened.pool.inflight[i] -= 1
            return scores, settings, time.perf_counter() - start

        opened.pool.inflight[i] += 1

        future = self._threads.submit(work)
        return Pending(future.result)

    def map(
        self, handle: MethodHandle, tasks: list[Task], seeds: list[int]
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Scores of each task, the tasks split across the actors, in input order."""
        submit = functools.partial(self.submit, handle)
        return map_in_chunks(submit, len(self._opened[handle.hid].members), tasks, seeds)

    def release(self, handle: MethodHandle) -> None:
        opened = self._opened.pop(handle.hid, None)
        if opened is None:
            return
        opened.pool.handles.discard(handle.hid)
        refs = [opened.pool.actors[i].release.remote(handle.hid) for i in opened.members]
        try:
            self.ray.get(refs, timeout=60)
        except Exception:  # noqa: BLE001 - a dead or slow actor has nothing left to free
            pass

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        for pool in list(self._pools.values()):
            self._kill(pool)
        self._opened.clear()
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self._owns_ray = False
