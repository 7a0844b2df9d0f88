"""Run methods on a protocol's frozen tasks and append one result row per finished task.

The runner is the only place that holds answers. It loads the task sets (manifests), assembles
each task in its seeded random order, hands the Tasks to an executor (a separate worker process
by default) and scores what comes back against the truth it kept.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

import fewshot_bench
from fewshot_bench.atomic import atomic_path
from fewshot_bench.backbones.embedders import get_embedder
from fewshot_bench.data.base import LabeledData, cache_root
from fewshot_bench.errors import FsbenchError, ProtocolError
from fewshot_bench.methods.base import Method
from fewshot_bench.run.assemble import assemble_task, score_task, task_seed
from fewshot_bench.run.executor import (
    MethodError,
    MethodHandle,
    MethodSpec,
    receives_unlabeled,
    shared_executor,
)
from fewshot_bench.run.features import pool_features
from fewshot_bench.run.feed import ChunkKey, TaskFeed
from fewshot_bench.run.provenance import backbone_hash, git_commit, hardware, referenced_files
from fewshot_bench.run.store import ResultRow, ResultsStore, config_json
from fewshot_bench.run.transport import sealed_tensor
from fewshot_bench.runtime import resolve_device
from fewshot_bench.tasks.manifest import Manifest, load_task_sets
from fewshot_bench.tasks.protocol import Pool, Protocol, load_pool
from fewshot_bench.tasks.task import Task, task_truth

__all__ = ["RunSummary", "as_spec", "resolve_device", "run_protocol", "score_task", "task_seed"]


def as_spec(method: MethodSpec | Method) -> MethodSpec:
    """A spec for a method given by spec or as a built instance (its class and parameters)."""
    if isinstance(method, MethodSpec):
        return method
    cls = type(method)
    builtin = cls.__module__.startswith("fewshot_bench.methods.")
    origin = "" if builtin else f"{cls.__module__}:{cls.__qualname__}"
    return MethodSpec(method.name, dict(method.params), origin)


@dataclass
class RunSummary:
    protocol: str
    method: str
    seed: int
    ran: int
    skipped: int
    accuracies: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies)) if self.accuracies else float("nan")


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _assemble_chunk(
    chunk: list[int],
    *,
    manifest: Manifest,
    pool_labels: np.ndarray,
    tensor: torch.Tensor,
    consumes: str,
    seed: int,
    unlabeled: bool,
) -> list:
    built = []
    for i in chunk:
        idx = manifest.task(i)
        truth = task_truth(idx, pool_labels)
        built.append(assemble_task(tensor, consumes, idx, truth, seed, i, unlabeled=unlabeled))
    return built


def _store_chunk(
    chunk: list[int],
    built: list,
    outputs: list[torch.Tensor],
    settings: list[str],
    per_task: float,
    *,
    name: str,
    top5: bool,
    summary: RunSummary,
    common: dict[str, Any],
    store: ResultsStore,
    bar: Any,
) -> None:
    """Score a returned chunk against the truth kept here and append its rows."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for i, b, scores, setting in zip(chunk, built, outputs, settings, strict=True):
        acc, t5 = score_task(scores, b.truth, b.task.n_way, name, top5)
        summary.accuracies.append(acc)
        rows.append(
            ResultRow(
                **common,
                setting=setting,
                task_index=i,
                accuracy=acc,
                top5=t5,
                n_query=len(b.truth.query_labels),
                seconds=per_task,
                timestamp=stamp,
            )
        )
    store.append(rows)
    bar.update(len(chunk))
    bar.set_postfix(acc=f"{100 * np.mean(summary.accuracies):.2f}%")


def _finish_pending(item: tuple, finish: Any) -> None:
    chunk, built, pending = item
    outputs, settings = pending.result()
    seconds = pending.seconds if pending.seconds is not None else float("nan")
    finish(chunk, built, outputs, settings, seconds / len(chunk))


def _state_path(info: dict[str, Any], run_hash: str, fit_fingerprint: str) -> Path:
    key = hashlib.sha256(
        f"{run_hash}|{info['fit_fingerprint']}|{fit_fingerprint}".encode()
    ).hexdigest()[:24]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", info["name"])
    return cache_root() / "states" / f"{safe}-{key}.pt"


def _fit_data(protocol: Protocol, root: Any) -> LabeledData:
    """The base-class data a training method fits on (the protocol's ``fit_split``)."""
    from fewshot_bench.data import load_dataset

    split = protocol.dataset.get("fit_split")
    if split is None:
        raise ProtocolError(
            f"a method here trains on base classes, but protocol {protocol.name!r} names no "
            "[dataset] fit_split"
        )
    kwargs = dict(protocol.dataset.get("options", {}))
    if "image_size" in protocol.dataset:
        kwargs["image_size"] = protocol.dataset["image_size"]
    return load_dataset(protocol.dataset["name"], split, root, **kwargs)


def _fit_source(data: LabeledData, consumes: str, backbone: str, device: torch.device) -> dict:
    """What ``fit`` receives: the base-class images, or their features for feature methods."""
    tensor = (
        data.data if consumes == "images" else pool_features(data, get_embedder(backbone), device)
    )
    return {
        "data": tensor,
        "labels": data.labels,
        "kind": consumes,
        "class_names": data.class_names,
    }


def open_method(
    executor: Any,
    spec: MethodSpec,
    info: dict[str, Any],
    run_hash: str,
    protocol: Protocol,
    root: Any,
    backbone: str,
    device: torch.device,
    budget: int | None,
    seed: int,
    save_state: Path | None,
) -> MethodHandle:
    """Build the method in the executor: trained methods fit once per configuration and code
    (the state is cached by the runner as bytes it never unpickles) or load the cached state."""
    if not info["trains"] or (info["fit_optional"] and "fit_split" not in protocol.dataset):
        return executor.open(spec, device)
    data = _fit_data(protocol, root)
    path = _state_path(info, run_hash, data.fingerprint())
    handle = None
    if path.is_file():
        try:
            handle = executor.open(spec, device, state=path.read_bytes())
        except MethodError as exc:
            print(f"fsbench: cached state {path} is unusable ({exc}); training again")
    if handle is None:
        # features of the base classes are computed only when the method actually fits
        source = _fit_source(data, info["consumes"], backbone, device)
        handle = executor.open(spec, device, fit={"source": source, "budget": budget, "seed": seed})
        if handle.state is not None:
            with atomic_path(path) as tmp:
                tmp.write_bytes(handle.state)
    if save_state is not None:
        if not path.is_file():
            raise FsbenchError(f"method {info['name']!r} kept no trained state to save")
        Path(save_state).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(save_state) as tmp:
            tmp.write_bytes(path.read_bytes())
    return handle


def pool_tensor(pool: Pool, consumes: str, backbone: str, device: torch.device, cache: dict):
    if consumes not in cache:
        if consumes == "features":
            cache["features"] = pool_features(pool.data, get_embedder(backbone), device)
        elif pool.data.kind == "images":
            cache["images"] = pool.data.images
        else:
            raise ProtocolError(f"a method needs images, but {pool.data.name} provides features")
    return cache[consumes]


def method_config(
    info: dict[str, Any], backbone: str, budget: int | None
) -> tuple[dict[str, Any], str]:
    """The configuration a row is bound to, and its hash: the method's parameters, the backbone
    with the content hash of its weights, the content hash of every file a parameter names, and
    the training budget of methods that train."""
    features = info["consumes"] == "features"
    config = {
        **info["config"],
        "backbone": backbone if features else "images",
        "backbone_hash": backbone_hash(backbone) if features else "",
        "files": referenced_files(info["params"]),
    }
    if info["trains"]:
        config["budget"] = budget
    return config, hashlib.sha256(config_json(config).encode()).hexdigest()[:12]


def row_key(
    protocol: Protocol,
    manifest: Manifest,
    info: dict[str, Any],
    config: dict[str, Any],
    run_hash: str,
    seed: int,
) -> dict[str, Any]:
    """The store key (``ENTRY_KEY``: all but the task index) of one method configuration on one
    task set."""
    return {
        "protocol": protocol.name,
        "manifest_hash": manifest.content_hash,
        "method": info["name"],
        "config_hash": run_hash,
        "code_fingerprint": info["code_fingerprint"],
        "backbone": config["backbone"],
        "seed": seed,
    }


def check_counts(batch_size: int, max_tasks: int | None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FsbenchError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if max_tasks is not None and (
        isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1
    ):
        raise FsbenchError(f"--max-tasks must be an integer >= 1, got {max_tasks!r}")


@dataclass(frozen=True)
class _Prepared:
    """What every method of one run shares: the run's options, the resolved device and executor,
    the validated method specs and the loaded pool and task sets."""

    protocol: Protocol
    store: ResultsStore
    root: str | Path | None
    device: torch.device
    backbone: str
    budget: int | None
    batch_size: int
    progress: bool
    save_state: Path | None
    executor: Any
    # the executor's ``submit`` when it takes chunks asynchronously, and how many it keeps in flight
    submit: Any
    depth: int
    specs: list[MethodSpec]
    infos: list[dict[str, Any]]
    pool: Pool
    task_sets: dict[int, Manifest]
    n_tasks: dict[int, int]
    pool_labels: np.ndarray
    data_note: str


@dataclass(frozen=True)
class _MethodRun:
    """One method ready to evaluate: its configuration and hash, the tasks still to run per seed,
    and (when there is work or a state to save) its open handle."""

    info: dict[str, Any]
    config: dict[str, Any]
    run_hash: str
    todo: dict[int, list[int]]
    handle: MethodHandle | None


def _prepare(
    protocol: Protocol,
    methods: Sequence[MethodSpec | Method],
    store: ResultsStore,
    *,
    seeds: list[int] | None,
    workdir: Path,
    root: str | Path | None,
    device: torch.device | str,
    backbone: str | None,
    max_tasks: int | None,
    batch_size: int,
    budget: int | None,
    pool: Pool | None,
    progress: bool,
    save_state: Path | None,
    executor: Any,
    plugins: tuple[str, ...],
) -> _Prepared:
    """Validate the run's options and every method, then load the pool and the task sets."""
    check_counts(batch_size, max_tasks)
    device = resolve_device(device) if isinstance(device, str) else device
    executor = executor or shared_executor(tuple(plugins))
    # executors with several workers take chunks asynchronously (see run/executor.py)
    submit = getattr(executor, "submit", None)
    depth = 2 * int(getattr(executor, "parallelism", 1))
    specs = [as_spec(m) for m in methods]
    # every method and parameter is validated (in the worker) before any task runs
    infos = [executor.describe(s) for s in specs]
    if save_state is not None and sum(i["trains"] for i in infos) != 1:
        raise ProtocolError(
            "--save-state needs exactly one method that trains on base classes (e.g. protonet); "
            f"got {[i['name'] for i in infos if i['trains']] or 'none'}"
        )
    backbone = backbone or protocol.run["backbone"]
    pool = pool or load_pool(protocol, root)
    task_sets: dict[int, Manifest] = load_task_sets(
        protocol, pool, Path(workdir), seeds, progress=progress
    )
    n_tasks = {
        seed: m.n_tasks if max_tasks is None else min(max_tasks, m.n_tasks)
        for seed, m in task_sets.items()
    }
    return _Prepared(
        protocol=protocol,
        store=store,
        root=root,
        device=device,
        backbone=backbone,
        budget=budget,
        batch_size=batch_size,
        progress=progress,
        save_state=save_state,
        executor=executor,
        submit=submit,
        depth=depth,
        specs=specs,
        infos=infos,
        pool=pool,
        task_sets=task_sets,
        n_tasks=n_tasks,
        pool_labels=np.asarray(pool.data.labels),
        data_note="; ".join(pool.data.meta.get("notes", [])),
    )


def _method_todo(
    prep: _Prepared, info: dict[str, Any]
) -> tuple[dict[str, Any], str, dict[int, list[int]]]:
    """The method's configuration, its hash, and the tasks not yet stored per seed."""
    config, run_hash = method_config(info, prep.backbone, prep.budget)
    todo: dict[int, list[int]] = {}
    for seed, manifest in prep.task_sets.items():
        key = row_key(prep.protocol, manifest, info, config, run_hash, seed)
        done = prep.store.done_tasks(key)
        todo[seed] = [i for i in range(prep.n_tasks[seed]) if i not in done]
    return config, run_hash, todo


def _fit_or_load(
    prep: _Prepared,
    spec: MethodSpec,
    info: dict[str, Any],
    plan: tuple[dict[str, Any], str, dict[int, list[int]]],
) -> _MethodRun:
    """The method with its ``plan`` (:func:`_method_todo`), opened (trained, or loaded from its
    cached state) only when there is work or a state to save."""
    config, run_hash, todo = plan
    handle = None
    if any(todo.values()) or prep.save_state is not None:
        handle = open_method(
            prep.executor,
            spec,
            info,
            run_hash,
            prep.protocol,
            prep.root,
            prep.backbone,
            prep.device,
            prep.budget,
            min(prep.task_sets),
            prep.save_state,
        )
    return _MethodRun(info, config, run_hash, todo, handle)


def _common_fields(
    prep: _Prepared, run: _MethodRun, handle: MethodHandle, seed: int, manifest: Manifest
) -> dict[str, Any]:
    """The fields shared by every row of one method on one task set."""
    protocol, info, config = prep.protocol, run.info, run.config
    return {
        "protocol": protocol.name,
        "family": protocol.family,
        "protocol_hash": protocol.hash(),
        "manifest_hash": manifest.content_hash,
        "task_source": str(manifest.header.get("source", "sampled")),
        "data_fingerprint": str(manifest.header["dataset_fingerprint"]),
        "data_note": prep.data_note,
        "method": info["name"],
        "config_hash": run.run_hash,
        "code_fingerprint": info["code_fingerprint"],
        "params": config_json(info["changed"]),
        "config": config_json(config),
        "backbone": config["backbone"],
        "backbone_hash": config["backbone_hash"],
        "budget": prep.budget if info["trains"] else None,
        "seed": seed,
        # where the method ran: a Ray worker may hold a GPU the driver lacks
        "device": handle.device,
        "hardware": handle.info.get("hardware")
        or hardware(handle.device, getattr(prep.executor, "worker_threads", None)),
        "x_value": protocol.x_value,
        "x_label": protocol.x_label,
        "package_version": fewshot_bench.__version__,
        "git_commit": git_commit(),
    }


def _run_chunks(
    prep: _Prepared,
    handle: MethodHandle,
    todo: list[int],
    seed: int,
    build: Any,
    finish: Any,
) -> None:
    """Run the tasks in ``todo`` in chunks of ``batch_size`` and store each chunk, in order."""
    if prep.submit is None:
        for chunk in _batches(todo, prep.batch_size):
            built = build(chunk)
            start = time.perf_counter()
            outputs, settings = prep.executor.map(
                handle, [b.task for b in built], [task_seed(seed, i) for i in chunk]
            )
            per_task = (time.perf_counter() - start) / len(chunk)
            finish(chunk, built, outputs, settings, per_task)
    else:
        # several workers: keep a few chunks in flight (the workers compute while this
        # process assembles the next chunks), store each as it returns, in order; a kill
        # loses at most the chunks in flight
        inflight: deque = deque()
        for chunk in _batches(todo, prep.batch_size):
            built = build(chunk)
            pending = prep.submit(
                handle, [b.task for b in built], [task_seed(seed, i) for i in chunk]
            )
            inflight.append((chunk, built, pending))
            while len(inflight) > prep.depth:
                _finish_pending(inflight.popleft(), finish)
        while inflight:
            _finish_pending(inflight.popleft(), finish)


def _evaluate_seed(
    prep: _Prepared,
    run: _MethodRun,
    seed: int,
    manifest: Manifest,
    summary: RunSummary,
    feed: TaskFeed,
) -> None:
    """Run one method's remaining tasks of one task set and store their rows."""
    handle = cast(MethodHandle, run.handle)  # opened: this seed has work
    todo, n, name = run.todo[seed], prep.n_tasks[seed], run.info["name"]
    common = _common_fields(prep, run, handle, seed, manifest)
    bar = tqdm(
        total=n,
        initial=n - len(todo),
        desc=f"{prep.protocol.name} {name} s{seed}",
        disable=not prep.progress,
        unit="task",
        dynamic_ncols=True,
    )

    def build(chunk: list[int]) -> list:
        return feed.get(_chunk_key(run.info, seed, chunk))

    finish = functools.partial(
        _store_chunk,
        name=name,
        top5=prep.protocol.run["top5"],
        summary=summary,
        common=common,
        store=prep.store,
        bar=bar,
    )
    _run_chunks(prep, handle, todo, seed, build, finish)
    bar.close()


def _evaluate(prep: _Prepared, run: _MethodRun, feed: TaskFeed) -> list[RunSummary]:
    """One summary per seed for the method; the seeds with tasks left are run and stored."""
    summaries = []
    for seed, manifest in prep.task_sets.items():
        todo, n = run.todo[seed], prep.n_tasks[seed]
        summary = RunSummary(
            prep.protocol.name, run.info["name"], seed, ran=len(todo), skipped=n - len(todo)
        )
        summaries.append(summary)
        if todo:
            _evaluate_seed(prep, run, seed, manifest, summary, feed)
    return summaries


def run_protocol(
    protocol: Protocol,
    methods: Sequence[MethodSpec | Method],
    store: ResultsStore,
    *,
    seeds: list[int] | None = None,
    workdir: Path = Path("runs"),
    root: str | Path | None = None,
    device: torch.device | str = "auto",
    backbone: str | None = None,
    max_tasks: int | None = None,
    batch_size: int = 64,
    budget: int | None = None,
    pool: Pool | None = None,
    progress: bool = True,
    save_state: Path | None = None,
    executor: Any = None,
    plugins: tuple[str, ...] = (),
) -> list[RunSummary]:
    """Evaluate each method on every (seed, task) of the protocol not yet in ``store``.

    A stored task is skipped only when its manifest hash, configuration hash (parameters,
    backbone and the content of every file they name), code fingerprint and backbone all match.
    ``save_state``: copy the trained state of the one method that trains to this file (for
    ``init=`` of another method, e.g. soft k-means from a ProtoNet state)."""
    prep = _prepare(
        protocol,
        methods,
        store,
        seeds=seeds,
        workdir=workdir,
        root=root,
        device=device,
        backbone=backbone,
        max_tasks=max_tasks,
        batch_size=batch_size,
        budget=budget,
        pool=pool,
        progress=progress,
        save_state=save_state,
        executor=executor,
        plugins=plugins,
    )
    tensors: dict[str, torch.Tensor] = {}
    summaries: list[RunSummary] = []
    plans = [_method_todo(prep, info) for info in prep.infos]
    with _task_feed(prep, plans, tensors) as feed:
        for spec, info, plan in zip(prep.specs, prep.infos, plans, strict=True):
            run = _fit_or_load(prep, spec, info, plan)
            summaries.extend(_evaluate(prep, run, feed))
            if run.handle is not None:
                prep.executor.release(run.handle)
    return summaries


def _sealed_task(task: Task) -> Task:
    parts = {name: getattr(task, name) for name in ("support", "unlabeled", "query")}
    sealed = {name: sealed_tensor(t) for name, t in parts.items()}
    if all(sealed[name] is parts[name] for name in parts):
        return task  # small arrays (an episode's) travel in the pickle anyway
    return replace(task, **sealed)


def _chunk_key(info: dict[str, Any], seed: int, chunk: list[int]) -> ChunkKey:
    return ChunkKey(info["consumes"], seed, tuple(chunk), receives_unlabeled(info["setting"]))


def _task_feed(prep: _Prepared, plans: list, tensors: dict[str, torch.Tensor]) -> TaskFeed:
    """The run's chunks in evaluation order (methods, then seeds, then chunks), assembled ahead.
    The pool tensors they need are loaded into ``tensors`` first (before any method opens, so a
    pool that cannot give a method what it consumes fails the run before any task)."""
    schedule = [
        _chunk_key(info, seed, chunk)
        for info, (_, _, todos) in zip(prep.infos, plans, strict=True)
        for seed, todo in todos.items()
        for chunk in _batches(todo, prep.batch_size)
    ]
    for consumes in dict.fromkeys(key.consumes for key in schedule):
        pool_tensor(prep.pool, consumes, prep.backbone, prep.device, tensors)

    def build(key: ChunkKey) -> list:
        built = _assemble_chunk(
            list(key.tasks),
            manifest=prep.task_sets[key.seed],
            pool_labels=prep.pool_labels,
            tensor=tensors[key.consumes],
            consumes=key.consumes,
            seed=key.seed,
            unlabeled=key.unlabeled,
        )
        # written once into sealed files here, off the worker's critical path; every method
        # that gets the chunk then receives the files' descriptors
        return [replace(b, task=_sealed_task(b.task)) for b in built]

    def size(key: ChunkKey) -> int:
        pool = tensors[key.consumes]
        row = pool[0].numel() * pool.element_size() if len(pool) else 0
        n = 0
        for i in key.tasks:
            idx = prep.task_sets[key.seed].task(i)
            n += len(idx.support) + len(idx.query) + (len(idx.unlabeled) if key.unlabeled else 0)
        return n * row

    return TaskFeed(schedule, build, size=size)
