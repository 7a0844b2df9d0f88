"""Run methods on a protocol's frozen tasks and append one result row per finished task."""

from __future__ import annotations

import datetime as _dt
import hashlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fewshot_bench.atomic import atomic_path
from fewshot_bench.backbones.embedders import get_embedder
from fewshot_bench.data.base import cache_root
from fewshot_bench.errors import FsbenchError, ProtocolError
from fewshot_bench.methods.base import FitSource, Method, TaskContext
from fewshot_bench.run.features import pool_features
from fewshot_bench.run.store import ResultRow, ResultsStore, config_json
from fewshot_bench.tasks.manifest import get_manifest
from fewshot_bench.tasks.protocol import Pool, Protocol, load_pool
from fewshot_bench.tasks.task import TaskTruth, build_task


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FsbenchError(
            "--device cuda asked for, but torch sees no CUDA device; use --device auto or cpu"
        )
    return device


def task_seed(seed: int, task_index: int) -> int:
    """The seed of one task's method randomness, derived from (seed, task index) only."""
    return int(np.random.SeedSequence([seed, task_index, 1]).generate_state(1)[0])


def score_task(
    scores: torch.Tensor, truth: TaskTruth, n_way: int, method: str, top5: bool
) -> tuple[float, float | None]:
    """Accuracy (and top-5 when asked and n_way > 5) of ``scores`` against the held-back labels."""
    n_query = len(truth.query_labels)
    if tuple(scores.shape) != (n_query, n_way):
        raise FsbenchError(
            f"method {method!r} returned scores of shape {tuple(scores.shape)}, expected {(n_query, n_way)}"
        )
    scores = scores.detach().float().cpu()
    if not torch.isfinite(scores).all():
        raise FsbenchError(
            f"method {method!r} returned NaN/inf scores; nothing was recorded for this task"
        )
    y = torch.from_numpy(truth.query_labels)
    acc = (scores.argmax(1) == y).float().mean().item()
    t5 = None
    if top5 and n_way > 5:
        t5 = (scores.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item()
    return acc, t5


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


def _fit_state_path(
    method: Method, fit_fingerprint: str, backbone: str, budget: int | None
) -> Path:
    key = hashlib.sha256(
        f"{method.config_hash()}|{fit_fingerprint}|{backbone}|{budget}".encode()
    ).hexdigest()[:24]
    return cache_root() / "states" / f"{method.name}-{key}.pt"


def fit_method(
    method: Method,
    protocol: Protocol,
    root,
    embedder_spec: str,
    device: torch.device,
    budget: int | None,
    seed: int,
) -> Path | None:
    """Train ``method`` on the protocol's ``fit_split`` (base classes), reusing a cached state;
    returns the cached state's path (``None`` when the method has no state to cache)."""
    from fewshot_bench.data import load_dataset

    split = protocol.dataset.get("fit_split")
    if split is None:
        raise ProtocolError(
            f"method {method.name!r} trains on base classes, but protocol {protocol.name!r} names no "
            "[dataset] fit_split"
        )
    kwargs = dict(protocol.dataset.get("options", {}))
    if "image_size" in protocol.dataset:
        kwargs["image_size"] = protocol.dataset["image_size"]
    data = load_dataset(protocol.dataset["name"], split, root, **kwargs)
    path = _fit_state_path(method, data.fingerprint(), embedder_spec, budget)
    if path.exists():
        method.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        return path
    tensor = (
        data.data
        if method.consumes == "images"
        else pool_features(data, get_embedder(embedder_spec), device)
    )
    source = FitSource(
        data=tensor, labels=data.labels, kind=method.consumes, class_names=data.class_names
    )
    method.fit(source, budget, TaskContext.create(seed, device))
    state = method.state_dict()
    if state is None:
        return None
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def run_protocol(
    protocol: Protocol,
    methods: list[Method],
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
) -> list[RunSummary]:
    """Evaluate each method on every (seed, task) of the protocol not yet in ``store``.

    ``save_state``: copy the trained state of the one method that trains to this file (for
    ``init=`` of another method, e.g. soft k-means from a ProtoNet state)."""
    device = resolve_device(device) if isinstance(device, str) else device
    seeds = list(protocol.run["seeds"] if seeds is None else seeds)
    backbone = backbone or protocol.run["backbone"]
    pool = pool or load_pool(protocol, root)
    manifests = {s: get_manifest(protocol, pool, s, Path(workdir)) for s in seeds}
    if save_state is not None and sum(m.trains for m in methods) != 1:
        raise ProtocolError(
            "--save-state needs exactly one method that trains on base classes (e.g. protonet); "
            f"got {[m.name for m in methods if m.trains] or 'none'}"
        )
    data_by_kind: dict[str, torch.Tensor] = {}
    summaries = []
    for method in methods:
        if method.consumes not in data_by_kind:
            if method.consumes == "features":
                data_by_kind["features"] = pool_features(pool.data, get_embedder(backbone), device)
            elif pool.data.kind == "images":
                data_by_kind["images"] = pool.data.images
            else:
                raise ProtocolError(
                    f"method {method.name!r} needs images, but {protocol.name} provides features"
                )
        tensor = data_by_kind[method.consumes]
        method_backbone = backbone if method.consumes == "features" else "images"
        if method.trains:
            state = fit_method(method, protocol, root, backbone, device, budget, seeds[0])
            if save_state is not None and state is not None:
                Path(save_state).parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(save_state) as tmp:
                    shutil.copyfile(state, tmp)
        config = {**method.config(), "backbone": method_backbone}
        if method.trains:
            config["budget"] = budget
        # The stored config hash covers what the features came from and the training budget,
        # so runs of one method on two backbones never pool into one leaderboard entry.
        run_hash = hashlib.sha256(config_json(config).encode()).hexdigest()[:12]
        for seed in seeds:
            manifest = manifests[seed]
            n = manifest.n_tasks if max_tasks is None else min(max_tasks, manifest.n_tasks)
            done = store.done_tasks(
                protocol.name,
                protocol.hash(),
                method.name,
                run_hash,
                method_backbone,
                seed,
            )
            todo = [i for i in range(n) if i not in done]
            summary = RunSummary(
                protocol.name, method.name, seed, ran=len(todo), skipped=n - len(todo)
            )
            bar = tqdm(
                total=n,
                initial=n - len(todo),
                desc=f"{protocol.name} {method.name} s{seed}",
                disable=not progress,
                unit="task",
                dynamic_ncols=True,
            )
            for chunk in _batches(todo, batch_size):
                built = [build_task(tensor, method.consumes, manifest.task(i)) for i in chunk]
                ctxs = [TaskContext.create(task_seed(seed, i), device) for i in chunk]
                start = time.perf_counter()
                outputs = method.predict_batch([t for t, _ in built], ctxs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                per_task = (time.perf_counter() - start) / len(chunk)
                rows = []
                stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                for i, (task, truth), scores in zip(chunk, built, outputs, strict=True):
                    acc, t5 = score_task(
                        scores, truth, task.n_way, method.name, protocol.run["top5"]
                    )
                    summary.accuracies.append(acc)
                    rows.append(
                        ResultRow(
                            protocol=protocol.name,
                            protocol_hash=protocol.hash(),
                            method=method.name,
                            config_hash=run_hash,
                            setting=method.task_setting(task),
                            backbone=method_backbone,
                            seed=seed,
                            task_index=i,
                            accuracy=acc,
                            top5=t5,
                            n_query=len(truth.query_labels),
                            seconds=per_task,
                            device=str(device),
                            x_value=protocol.x_value,
                            x_label=protocol.x_label,
                            config=config_json(config),
                            timestamp=stamp,
                        )
                    )
                store.append(rows)
                bar.update(len(chunk))
                if summary.accuracies:
                    bar.set_postfix(acc=f"{100 * np.mean(summary.accuracies):.2f}%")
            bar.close()
            summaries.append(summary)
    return summaries
