"""SimpleShot and BD-CSPN (fewshot_bench/methods/simpleshot.py) on real data: scikit-learn's digits.

The digits are split once: 600 items are the "base" data (``fit`` takes their mean for the CL2N
centring), the rest hold the episodes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from digits_episodes import digits_episode, load_digits_features

from fewshot_bench.methods import FitSource, TaskContext, get_method
from fewshot_bench.methods.feature_prep import centred_l2
from fewshot_bench.methods.simple import class_means
from fewshot_bench.methods.simpleshot import cross_class_shift, rectification_weights, rectify
from fewshot_bench.tasks.task import Task

N_BASE = 600


@pytest.fixture(scope="module")
def digits() -> dict:
    """The digits split once (overrides conftest's ``digits``): ``x``, ``y`` the episode pool,
    ``base`` the N_BASE base items."""
    x, y = load_digits_features()
    perm = np.random.default_rng(0).permutation(len(y))
    base, pool = perm[:N_BASE], perm[N_BASE:]
    source = FitSource(torch.from_numpy(x[base]), y[base], "features", [str(c) for c in range(10)])
    return {"x": x[pool], "y": y[pool], "base": source}


def fitted(name: str, d: dict, shift: np.ndarray | None = None, **params):
    method = get_method(name)(**params)
    base = d["base"]
    if shift is not None:
        base = FitSource(
            base.data + torch.from_numpy(shift), base.labels, base.kind, base.class_names
        )
    method.fit(base, None, TaskContext.create(0))
    return method


def accuracy(method, tasks: list[tuple[Task, np.ndarray]]) -> float:
    scores = method.predict_batch(
        [t for t, _ in tasks], [TaskContext.create(i) for i in range(len(tasks))]
    )
    return float(
        np.mean(
            [(s.argmax(1).numpy() == y).mean() for s, (_, y) in zip(scores, tasks, strict=True)]
        )
    )


def awkward_tasks(d: dict) -> list[Task]:
    """10-way 1-shot 1 query per class, one query in all, all queries of one class, an empty
    class next to a full one (imbalanced), a pool with distractors, 5-shot."""
    x, y = d["x"], d["y"]
    return [
        digits_episode(x, y, 1, way=10, queries=1)[0],
        digits_episode(x, y, 2, queries=[1, 0, 0, 0, 0])[0],
        digits_episode(x, y, 3, queries=[0, 0, 12, 0, 0])[0],
        digits_episode(x, y, 4, queries=[7, 0, 3, 1, 0])[0],
        digits_episode(x, y, 5, way=3, queries=2, n_unl=4)[0],
        digits_episode(x, y, 6, shot=5, queries=[2, 1, 0, 9, 4])[0],
    ]


# --- SimpleShot -------------------------------------------------------------------------------


def test_simpleshot_is_cl2n_nearest_class_mean(digits):
    x, y = digits["x"], digits["y"]
    method = fitted("simpleshot", digits)
    assert method.setting == "inductive"
    task, _ = digits_episode(x, y, 0, shot=5)
    centre = digits["base"].data.double().mean(0).float()
    torch.testing.assert_close(method.base_mean, centre)
    sup = centred_l2(task.support, centre)
    qry = centred_l2(task.query, centre)
    protos = class_means(sup, task.support_labels, 5)
    expected = -torch.cdist(qry.double(), protos.double()).pow(2)
    scores = method.predict(task, TaskContext.create(0))
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)


def test_simpleshot_is_shift_invariant_and_inductive(digits):
    """Defining property: CL2N with the base mean makes the scores invariant to adding a constant
    vector to every feature (base and task alike), and the scores depend on the support only."""
    x, y = digits["x"], digits["y"]
    shift = np.random.default_rng(1).normal(0, 5, 64).astype(np.float32)
    plain, moved = fitted("simpleshot", digits), fitted("simpleshot", digits, shift=shift)
    for seed in range(5):
        task, _ = digits_episode(x, y, seed, shot=1 + seed % 2)
        task_moved, _ = digits_episode(x + shift, y, seed, shot=1 + seed % 2)
        a = plain.predict(task, TaskContext.create(seed))
        b = moved.predict(task_moved, TaskContext.create(seed))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(1), b.argmax(1))
        # one query at a time == all at once; other queries never matter
        scorer = plain.fit_task(task, TaskContext.create(seed))
        one_by_one = torch.cat([scorer(task.query[i : i + 1]) for i in range(len(task.query))])
        torch.testing.assert_close(one_by_one, a, rtol=0, atol=1e-6)
        torch.testing.assert_close(scorer(task.query.flip(0)).flip(0), a, rtol=0, atol=1e-6)
    # without the centring the shift changes the scores
    no_centre = fitted("simpleshot", digits, centre="none")
    task, _ = digits_episode(x, y, 0)
    task_moved, _ = digits_episode(x + shift, y, 0)
    ctx = TaskContext.create(0)
    assert not torch.allclose(
        no_centre.predict(task, ctx), no_centre.predict(task_moved, ctx), atol=1e-3
    )


@pytest.mark.parametrize("name", ["simpleshot", "bd-cspn"])
@pytest.mark.parametrize("centre", ["base", "task", "none"])
def test_awkward_shapes_give_finite_scores(digits, name, centre):
    method = fitted(name, digits, centre=centre)
    tasks = awkward_tasks(digits)
    scores = method.predict_batch(tasks, [TaskContext.create(i) for i in range(len(tasks))])
    for task, s in zip(tasks, scores, strict=True):
        assert s.shape == (task.query.shape[0], task.n_way)
        assert torch.isfinite(s).all(), (name, centre, task.query.shape)
    # a method that never ran fit centres on the task (base mean unknown)
    unfitted = get_method(name)()
    s = unfitted.predict(tasks[1], TaskContext.create(0))
    assert s.shape == (1, 5) and torch.isfinite(s).all()


@pytest.mark.parametrize("name", ["simpleshot", "bd-cspn"])
def test_deterministic(digits, name):
    x, y = digits["x"], digits["y"]
    tasks = [digits_episode(x, y, i)[0] for i in range(4)] + awkward_tasks(digits)
    ctxs = [TaskContext.create(i) for i in range(len(tasks))]
    a = fitted(name, digits).predict_batch(tasks, ctxs)
    b = fitted(name, digits).predict_batch(tasks, ctxs)
    for first, second in zip(a, b, strict=True):
        assert torch.equal(first, second)
    # a task's scores do not depend on its batch
    torch.testing.assert_close(fitted(name, digits).predict(tasks[2], ctxs[2]), a[2])


# --- BD-CSPN ----------------------------------------------------------------------------------


def test_bd_cspn_without_bias_diminishing_is_cosine_nearest_prototype(digits):
    x, y = digits["x"], digits["y"]
    method = fitted("bd-cspn", digits, cross_class=False, intra_class=False)
    centre = method.base_mean
    temperature = method.params["rectify_temperature"]
    for seed, shot in [(0, 1), (1, 5), (2, 3)]:
        task, _ = digits_episode(x, y, seed, shot=shot, queries=[3, 0, 5, 1, 2])
        protos = class_means(centred_l2(task.support, centre), task.support_labels, 5)
        qry = centred_l2(task.query, centre)
        expected = F.normalize(qry, dim=1) @ F.normalize(protos, dim=1).T / temperature
        scores = method.predict(task, TaskContext.create(seed))
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_bd_cspn_rectified_prototypes_are_convex_combinations(digits):
    """Defining property: each rectified prototype is a convex combination of its class's support
    items and at most top_z queries predicted as that class; a class without predicted queries
    (classes with 0 queries, Q < n_way) keeps its support only."""
    x, y = digits["x"], digits["y"]
    method = fitted("bd-cspn", digits)
    z = method.params["top_z"]
    for seed, shot, queries in [
        (0, 1, 15),
        (1, 5, 15),
        (2, 1, [9, 0, 0, 1, 0]),
        (3, 2, [0, 0, 3, 0, 0]),
    ]:
        task, _ = digits_episode(x, y, seed, shot=shot, queries=queries)
        sup = centred_l2(task.support, method.base_mean).double()[None]
        qry = centred_l2(task.query, method.base_mean).double()[None]
        labels = task.support_labels[None]
        basic = class_means(sup, labels, 5)
        shifted = cross_class_shift(sup, qry)
        w = rectification_weights(sup, labels, shifted, basic, z, 0.1)[0]  # [C, S + Q]
        n_s = sup.shape[1]
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(5, dtype=w.dtype))
        # support weight only on the class's own support items
        own = F.one_hot(task.support_labels, 5).T.bool()
        assert (w[:, :n_s][~own] == 0).all() and (w[:, :n_s][own] > 0).all()
        # queries: at most top_z per class, each in at most one class (its predicted one)
        used = w[:, n_s:] > 0
        assert (used.sum(1) <= z).all() and (used.sum(0) <= 1).all()
        pred = (F.normalize(shifted[0], dim=1) @ F.normalize(basic[0], dim=1).T).argmax(1)
        for c in range(5):
            assert (pred[used[c]] == c).all()
            if not (pred == c).any():  # nobody predicted as c: support only
                assert not used[c].any()
        # the method's prototypes are exactly these combinations of its items
        _, protos = rectify(sup, labels, qry, 5, method.params)
        torch.testing.assert_close(protos[0], w @ torch.cat([sup[0], shifted[0]]))
        # every prototype lies in the convex hull: its weights reproduce it from real items
        assert torch.isfinite(protos).all()


def test_bd_cspn_cross_class_shift_matches_the_means(digits):
    x, y = digits["x"], digits["y"]
    task, _ = digits_episode(x, y, 0, queries=[2, 7, 0, 1, 5])
    sup = torch.from_numpy(np.asarray(task.support, dtype=np.float64))[None]
    qry = torch.from_numpy(np.asarray(task.query, dtype=np.float64))[None]
    shifted = cross_class_shift(sup, qry)
    torch.testing.assert_close(shifted.mean(1), sup.mean(1))
    # a pure translation: differences between queries are kept
    torch.testing.assert_close(shifted - shifted[:, :1], qry - qry[:, :1])
    assert cross_class_shift(sup, qry[:, :0]).shape == (1, 0, 64)


def test_bd_cspn_top_z_and_intra_class_switch(digits):
    x, y = digits["x"], digits["y"]
    task, _ = digits_episode(x, y, 0)
    ctx = TaskContext.create(0)
    shift_only = fitted("bd-cspn", digits, intra_class=False).predict(task, ctx)
    # top_z = 0 with one shot: the rectified prototype is the support item itself
    torch.testing.assert_close(fitted("bd-cspn", digits, top_z=0).predict(task, ctx), shift_only)
    full = fitted("bd-cspn", digits).predict(task, ctx)
    assert not torch.allclose(full, shift_only)
    assert fitted("bd-cspn", digits, top_z=None).predict(task, ctx).shape == (75, 5)


def test_accuracy_on_digits_episodes(digits):
    """100 5-way 1-shot episodes, 15 queries per class: SimpleShot is not worse than the plain
    L2 nearest prototype, BD-CSPN beats SimpleShot (the paper's claim for transduction)."""
    x, y = digits["x"], digits["y"]
    tasks = [digits_episode(x, y, 1000 + i) for i in range(100)]
    proto = accuracy(get_method("nearest-prototype")(), tasks)
    simple = accuracy(fitted("simpleshot", digits), tasks)
    bd = accuracy(fitted("bd-cspn", digits), tasks)
    cosine = accuracy(fitted("bd-cspn", digits, cross_class=False, intra_class=False), tasks)
    assert simple >= proto - 0.01, (simple, proto)
    assert bd >= simple + 0.015 and bd >= cosine + 0.015, (bd, simple, cosine)
