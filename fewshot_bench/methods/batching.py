"""Running a vectorised method over a mixed batch of tasks: same-shaped tasks are stacked and
solved together, in chunks, and every task gets its own output back in order.

A method whose ``predict_batch`` stacks tasks only has to solve one batch of identically shaped
tasks; :func:`predict_by_shape` does the grouping, the chunking and the reordering (the runner
hands over tasks in any order and any mix of shapes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewshot_bench.methods.base import TaskContext
from fewshot_bench.tasks.task import Task

#: Same-shaped tasks solved together at most, unless the method says otherwise.
DEFAULT_CHUNK = 512


def shape_key(task: Task, ctx: TaskContext) -> tuple:
    """What must agree for two tasks to be stacked: tensor shapes, ``n_way`` and device."""
    return (
        tuple(task.support.shape),
        tuple(task.unlabeled.shape),
        tuple(task.query.shape),
        task.n_way,
        str(ctx.device),
    )


def same_shape_groups(tasks: list[Task], ctxs: list[TaskContext]) -> list[list[int]]:
    """Indices of the tasks that can be stacked together, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, (t, c) in enumerate(zip(tasks, ctxs, strict=True)):
        groups.setdefault(shape_key(t, c), []).append(i)
    return list(groups.values())


def predict_by_shape(
    tasks: list[Task],
    ctxs: list[TaskContext],
    solve: Callable[[list[Task], torch.device], list[torch.Tensor]],
    *,
    chunk: int | Callable[[Task], int] = DEFAULT_CHUNK,
) -> list[torch.Tensor]:
    """``solve`` on chunks of same-shaped tasks; one output per task, in task order.

    ``chunk``: tasks per ``solve`` call, or a function of a group's first task giving it (e.g.
    a memory bound). Tasks without queries get an empty ``[0, n_way]`` score matrix unsolved."""
    out: list[torch.Tensor | None] = [None] * len(tasks)
    for idx in same_shape_groups(tasks, ctxs):
        first, device = tasks[idx[0]], ctxs[idx[0]].device
        if first.query.shape[0] == 0:
            for i in idx:
                out[i] = torch.zeros(0, first.n_way, device=device)
            continue
        size = max(1, chunk(first) if callable(chunk) else chunk)
        for s in range(0, len(idx), size):
            part = idx[s : s + size]
            for i, score in zip(part, solve([tasks[i] for i in part], device), strict=True):
                out[i] = score
    return out  # type: ignore[return-value]
