"""``fsbench audit``: is an entry's method permutation-equivariant, and do its rows reproduce?

A method that scores queries from their position, or from anything but their content, gives
different predictions when the same task is presented in another order. The audit reruns a
sample of an entry's tasks twice — in the order every result is computed under and in an
independent random order — maps both predictions back to the manifest's query order and
compares them. It also checks that the first rerun reproduces the accuracies stored for the
entry (a cached or stale result would not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_bench.run.assemble import AUDIT_STREAM, ORDER_STREAM, assemble_task, task_seed
from fewshot_bench.run.executor import MethodSpec, shared_executor
from fewshot_bench.run.runner import (
    method_config,
    open_method,
    pool_tensor,
    resolve_device,
    row_key,
)
from fewshot_bench.run.store import ResultsStore
from fewshot_bench.tasks.manifest import load_task_sets
from fewshot_bench.tasks.protocol import Pool, Protocol, load_pool
from fewshot_bench.tasks.task import task_truth

#: Below this share of queries with the same prediction under two orders, an entry is flagged.
EQUIVARIANCE_THRESHOLD = 0.99


@dataclass
class AuditResult:
    protocol: str
    method: str
    seed: int
    task_indices: list[int]
    n_queries: int
    agreement: float  # share of queries predicted alike under the two orders
    accuracy_run_order: float
    accuracy_audit_order: float
    stored_checked: int  # tasks with a stored row for this exact entry
    stored_mismatches: list[int]  # their indices whose recomputed accuracy differs

    @property
    def order_dependent(self) -> bool:
        return self.agreement < EQUIVARIANCE_THRESHOLD

    def lines(self) -> list[str]:
        verdict = (
            "ORDER-DEPENDENT: predictions change with the order items are presented in"
            if self.order_dependent
            else "permutation-equivariant"
        )
        out = [
            f"{self.protocol} {self.method} seed {self.seed}: {len(self.task_indices)} tasks, "
            f"{self.n_queries} queries",
            f"  same prediction under both orders: {100 * self.agreement:.2f}% of queries -> {verdict}",
            f"  accuracy in the run order {100 * self.accuracy_run_order:.2f}%, in the audit order "
            f"{100 * self.accuracy_audit_order:.2f}%",
        ]
        if self.stored_checked:
            bad = self.stored_mismatches
            out.append(
                f"  stored rows reproduced: {self.stored_checked - len(bad)}/{self.stored_checked}"
                + (f" (differ: tasks {bad[:10]})" if bad else "")
            )
        else:
            out.append("  no stored rows of this exact entry (manifest, config, code) to compare")
        return out

    @property
    def ok(self) -> bool:
        return not self.order_dependent and not self.stored_mismatches


def audit_method(
    protocol: Protocol,
    spec: MethodSpec,
    *,
    workdir: Path = Path("runs"),
    root: str | Path | None = None,
    device: str = "auto",
    backbone: str | None = None,
    budget: int | None = None,
    seed: int | None = None,
    n_tasks: int = 20,
    executor: Any = None,
    pool: Pool | None = None,
) -> AuditResult:
    """Rerun ``n_tasks`` tasks (spread over the task set) of one seed in two orders."""
    dev = resolve_device(device)
    executor = executor or shared_executor()
    info = executor.describe(spec)
    backbone = backbone or protocol.run["backbone"]
    pool = pool or load_pool(protocol, root)
    task_sets = load_task_sets(protocol, pool, Path(workdir), None if seed is None else [seed])
    seed = min(task_sets) if seed is None else seed
    manifest = task_sets[seed]
    config, run_hash = method_config(info, backbone, budget)
    stored: dict[int, float] = {}
    store_path = Path(workdir) / "results.sqlite"
    if store_path.is_file():
        with ResultsStore(store_path, readonly=True) as store:
            stored = store.stored_accuracies(
                row_key(protocol, manifest, info, config, run_hash, seed)
            )
    # a sample of the entry's stored tasks (of the whole task set when none is stored yet)
    candidates = np.array(sorted(stored) or range(manifest.n_tasks))
    spread = np.linspace(0, len(candidates) - 1, min(n_tasks, len(candidates))).round()
    picks = [int(candidates[int(k)]) for k in np.unique(spread)]
    tensor = pool_tensor(pool, info["consumes"], backbone, dev, {})
    handle = open_method(
        executor, spec, info, run_hash, protocol, root, backbone, dev, budget, seed, None
    )
    labels = np.asarray(pool.data.labels)
    agree = total = 0
    correct = {ORDER_STREAM: 0, AUDIT_STREAM: 0}
    mismatches = []
    try:
        for i in picks:
            idx = manifest.task(i)
            truth = task_truth(idx, labels)
            preds = {}
            for stream in (ORDER_STREAM, AUDIT_STREAM):
                a = assemble_task(tensor, info["consumes"], idx, truth, seed, i, stream)
                (scores,), _ = executor.map(handle, [a.task], [task_seed(seed, i)])
                pred = np.empty(len(idx.query), dtype=np.int64)
                pred[a.query_order] = torch.as_tensor(scores).argmax(1).numpy()
                preds[stream] = pred
                correct[stream] += int((pred == truth.query_labels).sum())
            agree += int((preds[ORDER_STREAM] == preds[AUDIT_STREAM]).sum())
            total += len(idx.query)
            if i in stored:
                acc = float((preds[ORDER_STREAM] == truth.query_labels).mean())
                if abs(acc - stored[i]) > 1e-6:  # stored accuracies are float32 means
                    mismatches.append(i)
    finally:
        executor.release(handle)
    return AuditResult(
        protocol=protocol.name,
        method=info["name"],
        seed=seed,
        task_indices=picks,
        n_queries=total,
        agreement=agree / total,
        accuracy_run_order=correct[ORDER_STREAM] / total,
        accuracy_audit_order=correct[AUDIT_STREAM] / total,
        stored_checked=sum(i in stored for i in picks),
        stored_mismatches=mismatches,
    )
