"""Turn a manifest's task into what a method sees (shuffled per task) and score what it returns.

Position must say nothing about labels: manifests store items class by class (and some datasets
are class-sorted), so support, unlabeled and query items are each put in a pseudo-random order
before a method sees them. The runner keeps the permuted truth; the method gets a
:class:`~fewshot_bench.tasks.task.Task` whose tensors are fresh copies (no view into the pool
through which other items could be reached).

The order sorts items by a keyed hash of their own bytes (keyed with the task's seed, index and
stream), not by a permutation drawn from the seed alone. A method knows its task's
seed (``ctx.seed``), from which the task index and hence the manifest's class-sorted layout can
be recovered; a seed-only permutation would then give every label away. With the content-keyed
order, mapping the items a method receives back to manifest positions needs the items' contents
in the manifest, i.e. re-reading the dataset (the documented limit in the README). The order is
still deterministic: the same task always arrives in the same order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from fewshot_bench.errors import FsbenchError
from fewshot_bench.rowhash import row_hashes
from fewshot_bench.tasks.task import Task, TaskIndices, TaskTruth

#: Random streams of one task: 1 is the method's own seed (``task_seed``), 2 the item order
#: every result is computed under, 3 the other order ``fsbench audit`` compares it with.
METHOD_STREAM, ORDER_STREAM, AUDIT_STREAM = 1, 2, 3


def task_seed(seed: int, task_index: int) -> int:
    """The seed of one task's method randomness, derived from (seed, task index) only."""
    return int(np.random.SeedSequence([seed, task_index, METHOD_STREAM]).generate_state(1)[0])


@dataclass(frozen=True)
class AssembledTask:
    """A task as a method receives it, with the runner's private truth in the same order.

    ``query_order[k]`` is the manifest position of the ``k``-th query the method sees.
    """

    task: Task
    truth: TaskTruth
    query_order: np.ndarray


def assemble_task(
    data: torch.Tensor,
    kind: str,
    idx: TaskIndices,
    truth: TaskTruth,
    seed: int,
    task_index: int,
    stream: int = ORDER_STREAM,
    *,
    unlabeled: bool = True,
) -> AssembledTask:
    """Gather task ``task_index`` of ``seed`` from the pool tensor in a seeded random order.

    ``unlabeled=False`` leaves the unlabeled pool out (for a method that will not receive it);
    the support and queries are the same either way (each role has its own order key)."""
    key = hashlib.blake2b(f"{seed}|{task_index}|{stream}".encode(), digest_size=32).digest()
    # numpy gathers (pool tensors live on the CPU): a torch index of a few rows costs
    # milliseconds of thread start-up, which dominated runs of many small episodes
    pool = data.numpy()

    def take(rows: np.ndarray, role: bytes) -> tuple[torch.Tensor, np.ndarray]:
        items = pool[np.ascontiguousarray(rows, dtype=np.int64)]
        perm = keyed_order(torch.from_numpy(items), key + role)
        return torch.from_numpy(items[perm]), perm

    support, perm_s = take(idx.support, b"s")
    unlabeled_rows = idx.unlabeled if unlabeled else np.zeros(0, dtype=np.int64)
    unlabeled_items, perm_u = take(unlabeled_rows, b"u")
    query, perm_q = take(idx.query, b"q")
    task = Task(
        support=support,
        support_labels=torch.from_numpy(
            np.ascontiguousarray(idx.support_labels[perm_s], dtype=np.int64)
        ),
        unlabeled=unlabeled_items,
        query=query,
        n_way=idx.n_way,
        kind=kind,
    )
    shuffled = TaskTruth(
        query_labels=np.asarray(truth.query_labels, dtype=np.int64)[perm_q],
        unlabeled_labels=np.asarray(truth.unlabeled_labels, dtype=np.int64)[perm_u],
    )
    return AssembledTask(task=task, truth=shuffled, query_order=perm_q)


def keyed_order(items: torch.Tensor, key: bytes) -> np.ndarray:
    """The permutation that sorts ``items`` (rows) by a keyed hash of their bytes.

    Each row's bytes, read as 64-bit words, are combined with odd multipliers drawn from ``key``
    and mixed with the splitmix64 finaliser, all in exact integer arithmetic (the order is the
    same on every machine). Ties (identical rows) fall back to a keyed order of positions."""
    n = int(items.shape[0])
    if n < 2:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(
        int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    )
    h = row_hashes(items.detach().cpu().contiguous().numpy(), rng)[:, 0]
    return np.lexsort((rng.permutation(n), h)).astype(np.int64)


def queries_at_once(name: str, origin: str) -> bool:
    """Whether a non-transductive method's queries may go to its worker in one request: only a
    built-in method (found by name among the package's own classes, not a plugin's ``origin``)
    whose class declares :attr:`~fewshot_bench.methods.base.Method.rowwise_scorer`.

    The decision is made here, in the runner, from the package's own registry: a plugin runs in
    the worker and could claim anything there."""
    if origin:
        return False
    from fewshot_bench.methods.registry import builtin_method

    cls = builtin_method(name)
    return cls is not None and bool(cls.__dict__.get("rowwise_scorer", False))


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
    # numpy: torch would start its thread pool for these small checks while the worker holds
    # every core (~10 ms each); numpy's argmax also returns the first of tied maxima, and the
    # mean stays torch's float32 one, so stored accuracies keep their exact values
    values = scores.numpy()
    if not np.isfinite(values).all():
        raise FsbenchError(
            f"method {method!r} returned NaN/inf scores; nothing was recorded for this task"
        )
    y = torch.from_numpy(np.asarray(truth.query_labels, dtype=np.int64))
    acc = torch.from_numpy(values.argmax(1) == y.numpy()).float().mean().item()
    t5 = None
    if top5 and n_way > 5:
        t5 = (scores.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item()
    return acc, t5
