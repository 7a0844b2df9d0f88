"""Turn a manifest's task into what a method sees (shuffled per task) and score what it returns.

Position must say nothing about labels: manifests store items class by class (and some datasets
are class-sorted), so support, unlabeled and query items are each put in a random order drawn
from the task's own seed before a method sees them. The runner keeps the permuted truth; the
method gets a :class:`~fewshot_bench.tasks.task.Task` whose tensors are fresh copies (no view
into the pool through which other items could be reached).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fewshot_bench.errors import FsbenchError
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
) -> AssembledTask:
    """Gather task ``task_index`` of ``seed`` from the pool tensor in a seeded random order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, task_index, stream]))
    perm_s = rng.permutation(len(idx.support))
    perm_u = rng.permutation(len(idx.unlabeled))
    perm_q = rng.permutation(len(idx.query))

    def take(rows: np.ndarray) -> torch.Tensor:
        return data[torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))]

    task = Task(
        support=take(idx.support[perm_s]),
        support_labels=torch.from_numpy(
            np.ascontiguousarray(idx.support_labels[perm_s], dtype=np.int64)
        ),
        unlabeled=take(idx.unlabeled[perm_u]),
        query=take(idx.query[perm_q]),
        n_way=idx.n_way,
        kind=kind,
    )
    shuffled = TaskTruth(
        query_labels=np.asarray(truth.query_labels, dtype=np.int64)[perm_q],
        unlabeled_labels=np.asarray(truth.unlabeled_labels, dtype=np.int64)[perm_u],
    )
    return AssembledTask(task=task, truth=shuffled, query_order=perm_q)


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
    y = torch.from_numpy(np.asarray(truth.query_labels, dtype=np.int64))
    acc = (scores.argmax(1) == y).float().mean().item()
    t5 = None
    if top5 and n_way > 5:
        t5 = (scores.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item()
    return acc, t5
