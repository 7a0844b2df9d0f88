"""Few-shot episodes of scikit-learn's digits (1797 items, 64-dim features, 10 classes), shared
by the tests of the feature methods, and the nearest-prototype scores they compare against.

The ``digits`` fixture of ``conftest.py`` is ``load_digits_features()``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fewshot_bench.tasks.task import Task


def load_digits_features() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: float32 features ``[1797, 64]`` and their labels ``[1797]``."""
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


def digits_episode(
    x: np.ndarray,
    y: np.ndarray,
    seed: int | np.random.Generator,
    *,
    way: int = 5,
    shot: int = 1,
    queries: int | list[int] = 15,
    n_unl: int = 0,
    distractors: int = 0,
) -> tuple[Task, np.ndarray]:
    """A ``way``-way ``shot``-shot episode of ``(x, y)`` and its query labels.

    ``queries``: queries per class, or a list of per-class counts (which may hold zeros).
    ``n_unl``: unlabeled items of each episode class, plus ``n_unl`` items of each of
    ``distractors`` other classes. ``seed``: an int, or a Generator to draw from (and advance).

    Draws: ``way + distractors`` classes, then per class in that order a permutation of its
    items, taking the support, then the queries, then the unlabeled items (a distractor class:
    its unlabeled items only). The episode's classes are labeled ``0 .. way - 1`` in draw order.
    """
    rng = np.random.default_rng(seed)
    per_class = [queries] * way if isinstance(queries, int) else list(queries)
    if len(per_class) != way:
        raise ValueError(f"{len(per_class)} query counts for {way} classes")
    classes = rng.choice(10, way + distractors, replace=False)
    s: list[int] = []
    sl: list[int] = []
    u: list[int] = []
    q: list[int] = []
    ql: list[int] = []
    for j, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        if j < way:
            n_q = per_class[j]
            s += list(idx[:shot])
            sl += [j] * shot
            q += list(idx[shot : shot + n_q])
            ql += [j] * n_q
            u += list(idx[shot + n_q : shot + n_q + n_unl])
        else:
            u += list(idx[:n_unl])
    task = Task(
        torch.from_numpy(x[s]),
        torch.tensor(sl),
        torch.from_numpy(x[u]).reshape(len(u), x.shape[1]),
        torch.from_numpy(x[q]).reshape(len(q), x.shape[1]),
        way,
        "features",
    )
    return task, np.array(ql, dtype=np.int64)


def prototype_scores(task: Task) -> torch.Tensor:
    """Nearest-prototype scores ``[Q, n_way]``: minus the distance of each L2-normalised query to
    the mean of each class's L2-normalised support items."""
    sup, qry = F.normalize(task.support, dim=1), F.normalize(task.query, dim=1)
    protos = torch.stack([sup[task.support_labels == c].mean(0) for c in range(task.n_way)])
    return -torch.cdist(qry, protos)
