"""The one abstraction: a Task (what a method sees) and its TaskTruth (what only the runner sees)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TaskIndices:
    """One materialised task as indices into the protocol's pool (see ``tasks.protocol.Pool``).

    ``*_labels`` are episode labels ``0..n_way-1``; ``unlabeled_labels`` is ``-1`` for items of
    distractor classes. ``classes[j]`` is the pool class id behind episode label ``j``.
    """

    support: np.ndarray
    support_labels: np.ndarray
    unlabeled: np.ndarray
    unlabeled_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    classes: np.ndarray

    @property
    def n_way(self) -> int:
        return len(self.classes)

    def all_items(self) -> np.ndarray:
        return np.concatenate([self.support, self.unlabeled, self.query])


@dataclass(frozen=True)
class Task:
    """What a method receives: labeled support, an unlabeled pool (maybe empty), unlabeled queries.

    ``support``/``unlabeled``/``query`` hold images (uint8 ``[n, C, H, W]``) or features (float32
    ``[n, D]``), as ``kind`` says. Query and unlabeled labels and the distractor mask are *not* here.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    unlabeled: torch.Tensor
    query: torch.Tensor
    n_way: int
    kind: str

    @property
    def n_support(self) -> int:
        return int(self.support.shape[0])

    def to(self, device: torch.device | str) -> Task:
        return Task(
            self.support.to(device),
            self.support_labels.to(device),
            self.unlabeled.to(device),
            self.query.to(device),
            self.n_way,
            self.kind,
        )


@dataclass(frozen=True)
class TaskTruth:
    """The labels a method must never see, kept by the runner for scoring."""

    query_labels: np.ndarray
    unlabeled_labels: np.ndarray

    @property
    def distractor_mask(self) -> np.ndarray:
        return self.unlabeled_labels < 0


def build_task(data: torch.Tensor, kind: str, idx: TaskIndices) -> tuple[Task, TaskTruth]:
    """Gather a Task and its TaskTruth from the pool tensor ``data`` (images or features)."""

    def take(rows: np.ndarray) -> torch.Tensor:
        return data[torch.from_numpy(np.asarray(rows, dtype=np.int64))]

    task = Task(
        support=take(idx.support),
        support_labels=torch.from_numpy(np.asarray(idx.support_labels, dtype=np.int64)),
        unlabeled=take(idx.unlabeled),
        query=take(idx.query),
        n_way=idx.n_way,
        kind=kind,
    )
    truth = TaskTruth(
        query_labels=np.asarray(idx.query_labels, dtype=np.int64),
        unlabeled_labels=np.asarray(idx.unlabeled_labels, dtype=np.int64),
    )
    return task, truth
