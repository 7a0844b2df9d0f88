"""The one abstraction: a Task (what a method sees) and its TaskTruth (what only the runner sees)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fewshot_bench.errors import ManifestError


@dataclass(frozen=True)
class TaskIndices:
    """One materialised task as indices into the protocol's pool (see ``tasks.protocol.Pool``).

    ``support_labels`` are episode labels ``0..n_way-1``; ``classes[j]`` is the pool class id
    behind episode label ``j``. There are no query or unlabeled labels here: they follow from
    the pool's labels (``task_truth``), so a manifest of TaskIndices tells a reader nothing the
    public dataset does not.
    """

    support: np.ndarray
    support_labels: np.ndarray
    unlabeled: np.ndarray
    query: np.ndarray
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

    @property
    def n_items(self) -> int:
        """Support, unlabeled and query items together (a task's size)."""
        return self.n_support + int(self.unlabeled.shape[0]) + int(self.query.shape[0])

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
    """The labels a method must never see, kept by the runner for scoring.

    ``query_labels``: episode label (``0..n_way-1``) of each query item; ``unlabeled_labels``:
    episode label of each unlabeled item, ``-1`` for distractors. Both in manifest order.
    """

    query_labels: np.ndarray
    unlabeled_labels: np.ndarray

    @property
    def distractor_mask(self) -> np.ndarray:
        return self.unlabeled_labels < 0


def _episode_labels(classes: np.ndarray, item_classes: np.ndarray) -> np.ndarray:
    """Position of each of ``item_classes`` in ``classes`` (``-1`` where absent)."""
    order = np.argsort(classes, kind="stable")
    ranked = classes[order]
    pos = np.searchsorted(ranked, item_classes)
    pos = np.minimum(pos, max(len(ranked) - 1, 0))
    found = ranked[pos] == item_classes if len(ranked) else np.zeros(len(item_classes), dtype=bool)
    out = np.full(len(item_classes), -1, dtype=np.int64)
    out[found] = order[pos[found]]
    return out


def task_truth(idx: TaskIndices, pool_labels: np.ndarray) -> TaskTruth:
    """The scoring labels of one task, derived from the pool's labels.

    Episode label ``j`` is pool class ``idx.classes[j]``. A query item whose class is not one of
    ``idx.classes`` is an error (it could not be scored); an unlabeled item whose class is not
    one of them is a distractor (label ``-1``). Raises ``ManifestError`` when ``classes`` repeats
    a class or a query item falls outside them.
    """
    pool_labels = np.asarray(pool_labels)
    classes = np.asarray(idx.classes, dtype=np.int64)
    if len(np.unique(classes)) != len(classes):
        raise ManifestError(
            f"task classes {classes.tolist()} repeat a pool class: two episode labels would "
            "mean the same class; the manifest is broken, delete it to re-materialise it"
        )
    query = np.asarray(idx.query, dtype=np.int64)
    unlabeled = np.asarray(idx.unlabeled, dtype=np.int64)
    query_labels = _episode_labels(classes, pool_labels[query].astype(np.int64))
    bad = np.flatnonzero(query_labels < 0)
    if len(bad):
        i = int(bad[0])
        raise ManifestError(
            f"query item {int(query[i])} (pool class {int(pool_labels[query[i]])}) belongs to none "
            f"of the task's classes {classes.tolist()} ({len(bad)} such query items): it cannot "
            "be scored; the manifest does not fit this pool, delete it to re-materialise it"
        )
    unlabeled_labels = _episode_labels(classes, pool_labels[unlabeled].astype(np.int64))
    return TaskTruth(query_labels=query_labels, unlabeled_labels=unlabeled_labels)
