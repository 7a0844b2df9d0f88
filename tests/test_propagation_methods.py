"""Registered propagation methods: registry, shapes, fallbacks, determinism, real-data check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits_episodes import digits_episode, prototype_scores

from fewshot_bench.errors import ProtocolError
from fewshot_bench.methods import available_methods
from fewshot_bench.methods.base import TaskContext
from fewshot_bench.methods.propagation import (
    Diffusion,
    DiffusionLogreg,
    NNPropagation,
    PropagationClassifier,
    SpectralPropagation,
    pseudo_label_unlabeled,
    with_rows,
)
from fewshot_bench.tasks.task import Task

NAMES = [
    "nn-propagation",
    "spectral-propagation",
    "diffusion",
    "diffusion-logreg",
    "propagation-classifier",
]


def test_registered() -> None:
    methods = available_methods()
    for name in NAMES:
        assert name in methods
        assert methods[name].consumes == "features"
    # graph methods take the whole query set (the runner records them transductive); the
    # others score each query alone after propagating to the unlabeled pool
    expected = {"nn-propagation": "semi-supervised", "propagation-classifier": "semi-supervised"}
    for name in NAMES:
        assert methods[name].setting == expected.get(name, "transductive"), name


def test_propagation_beats_nearest_prototype_on_digits(digits) -> None:
    x, y = digits
    accs: dict[str, list[float]] = {"proto": [], "diffusion": [], "spectral": []}
    for seed in range(12):
        task, ql = digits_episode(x, y, seed, n_unl=30)
        ctx = TaskContext.create(seed)
        accs["proto"].append(float((prototype_scores(task).argmax(1).numpy() == ql).mean()))
        accs["diffusion"].append(
            float((Diffusion().predict(task, ctx).argmax(1).numpy() == ql).mean())
        )
        accs["spectral"].append(
            float((SpectralPropagation().predict(task, ctx).argmax(1).numpy() == ql).mean())
        )
    mean = {k: float(np.mean(v)) for k, v in accs.items()}
    assert mean["diffusion"] > mean["proto"] + 0.05, mean
    assert mean["spectral"] > mean["proto"] + 0.05, mean


@pytest.mark.parametrize(
    "method",
    [
        NNPropagation(),
        SpectralPropagation(),
        Diffusion(),
        Diffusion(norm="sinkhorn", n_iter=4),
        DiffusionLogreg(),
        PropagationClassifier(),
        PropagationClassifier(propagator="spectral"),
        PropagationClassifier(propagator="nn", k_per_class=5),
    ],
    ids=lambda m: f"{m.name}-{m.config_hash()}",
)
def test_shapes_shots_and_empty_pool(method, digits) -> None:
    x, y = digits
    for shot, n_unl in [(1, 20), (3, 20), (2, 0)]:
        task, _ = digits_episode(
            x, y, 3, shot=shot, queries=4, n_unl=n_unl, distractors=1 if n_unl else 0
        )
        scores = method.predict(task, TaskContext.create(0))
        assert scores.shape == (20, 5)
        assert torch.isfinite(scores).all()


def test_queries_out_only_do_not_change_each_other(digits) -> None:
    """With queries out-only, a query's score does not depend on the other queries."""
    x, y = digits
    task, _ = digits_episode(x, y, 5, shot=1, n_unl=30)
    full = Diffusion(n_iter=3).predict(task, TaskContext.create(0))
    half = Task(task.support, task.support_labels, task.unlabeled, task.query[:10], 5, "features")
    torch.testing.assert_close(Diffusion(n_iter=3).predict(half, TaskContext.create(0)), full[:10])
    in_graph = Diffusion(n_iter=3, queries_in_graph=True).predict(half, TaskContext.create(0))
    assert not torch.allclose(in_graph, full[:10])


def test_deterministic_given_seed(digits) -> None:
    x, y = digits
    task, _ = digits_episode(x, y, 1, shot=3, n_unl=30)
    for cls in (Diffusion, DiffusionLogreg, SpectralPropagation):
        a = cls().predict(task, TaskContext.create(7))
        b = cls().predict(task, TaskContext.create(7))
        torch.testing.assert_close(a, b)


def test_pseudo_label_export(digits) -> None:
    x, y = digits
    task, _ = digits_episode(x, y, 2, shot=1, n_unl=30)
    pl = pseudo_label_unlabeled(task, TaskContext.create(0), k_per_class=4)
    assert len(pl) <= 20 and (pl.alpha[:-1] >= pl.alpha[1:]).all() and (pl.alpha >= 0.01).all()
    assert int(pl.indices.max()) < task.unlabeled.shape[0]
    assert torch.bincount(pl.labels, minlength=5).max() <= 4
    top = pseudo_label_unlabeled(task, TaskContext.create(0), propagator="spectral", k=7)
    assert len(top) == 7


def test_unknown_parameter_rejected() -> None:
    with pytest.raises(ProtocolError):
        Diffusion(eta=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu(digits) -> None:
    x, y = digits
    task, _ = digits_episode(x, y, 4, shot=1, n_unl=30)
    cpu = Diffusion(n_iter=3).predict(task, TaskContext.create(0))
    gpu = Diffusion(n_iter=3).predict(task, TaskContext.create(0, device="cuda"))
    torch.testing.assert_close(cpu, gpu, atol=1e-4, rtol=1e-4)


def test_auto_k_follows_the_nodes_per_class() -> None:
    from fewshot_bench.methods.propagation import graph_k

    assert graph_k("auto", 40, 20) == 1  # 20-way 1-shot, one query per class
    assert graph_k("auto", 120, 20) == 3  # 20-way 5-shot, one query per class
    assert graph_k("auto", 80, 5) == 8  # 5-way 1-shot, 15 queries
    assert graph_k("auto", 100, 5) == 10  # 5-way 5-shot, 15 queries
    assert graph_k("auto", 55, 5) == 5  # 5-way 1-shot, 5 unlabeled/class + 5 distractor classes
    assert graph_k("auto", 70000, 10) == 10
    assert graph_k("auto", 3, 5) == 1  # fewer nodes than classes
    assert graph_k(7, 40, 20) == 7


def test_graphs_too_small_for_knn_structure_are_not_built(digits) -> None:
    """With fewer than 3 core nodes per class (1-shot, one query per class, no pool) the graph
    methods give the support's eq. 5 vote on the features: the nearest-prototype ranking at
    1 shot; an explicit k still builds the graph."""
    x, y = digits
    task, _ = digits_episode(x, y, 3, shot=1, queries=1)
    ctx = TaskContext.create(0)
    proto = prototype_scores(task).argmax(1)
    for method in (Diffusion(), SpectralPropagation(), DiffusionLogreg()):
        assert method.too_small(task)
        assert torch.equal(method.predict(task, ctx).argmax(1), proto)
    assert not Diffusion(k=1).too_small(task)
    bigger, _ = digits_episode(x, y, 3, shot=1, queries=2)
    assert not Diffusion().too_small(bigger)


def test_spectral_support_check_keeps_the_better_vote(digits) -> None:
    """With >= 2 shots the spectral vote is kept only when it beats the feature vote on held-out
    support items; with 1 shot there is nothing to check and the spectral vote is used."""
    x, y = digits
    one_shot, _ = digits_episode(x, y, 5, shot=1, queries=5, n_unl=10)
    method = SpectralPropagation()
    method.predict(one_shot, TaskContext.create(0))
    assert method.last_choice == "spectral"
    # a one-column embedding (n_eig=2) cannot separate 5 classes: the check must notice it on
    # the support and fall back to the feature vote, restoring the features' accuracy
    crippled, unchecked = (
        SpectralPropagation(n_eig=2),
        SpectralPropagation(n_eig=2, support_check=False),
    )
    acc = {"checked": [], "unchecked": [], "proto": []}
    choices = []
    for seed in range(12):
        task, ql = digits_episode(x, y, seed, shot=3, queries=5, n_unl=10)
        ctx, truth = TaskContext.create(seed), torch.from_numpy(ql)
        acc["checked"].append((crippled.predict(task, ctx).argmax(1) == truth).float().mean())
        choices.append(crippled.last_choice)
        acc["unchecked"].append((unchecked.predict(task, ctx).argmax(1) == truth).float().mean())
        assert unchecked.last_choice == "spectral"
        acc["proto"].append((prototype_scores(task).argmax(1) == truth).float().mean())
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    assert choices.count("features") >= 10, choices
    assert mean["checked"] > mean["unchecked"] + 0.1 and mean["checked"] >= mean["proto"] - 0.03, (
        mean
    )


def test_queries_no_seed_reaches_get_the_support_vote_not_a_uniform_guess(digits) -> None:
    """Imbalanced queries on a small graph (one class has 6 queries, the others 1): queries in
    a component without a seed used to get uniform scores; they get the support's eq. 5 vote."""
    x, y = digits
    rng = np.random.default_rng(0)
    uniform_rows = 0
    for seed in range(10):
        task, _ = digits_episode(x, y, rng, queries=[6, 1, 1, 1, 1])
        scores = Diffusion(k=1).predict(task, TaskContext.create(seed))
        uniform_rows += int(((scores.max(1).values - scores.min(1).values) <= 1e-6).sum())
        assert torch.isfinite(scores).all()
    assert uniform_rows == 0


def test_estimated_class_prior_follows_imbalanced_queries(digits) -> None:
    """Column normalisation with equal class mass (Douze et al.) assumes balanced classes; with
    prior="auto" the class masses follow the support's vote over the graph's nodes, which tracks
    the true class sizes, and imbalanced tasks are classified better than with equal masses."""
    from fewshot_bench.methods.propagation import Diffusion as D

    x, y = digits
    rng = np.random.default_rng(1)
    acc: dict[str, list[float]] = {"auto": [], "uniform": []}
    priors = []
    for seed in range(20):
        task, ql = digits_episode(x, y, rng, queries=[20, 10, 3, 1, 0])
        ctx, truth = TaskContext.create(seed), torch.from_numpy(ql)
        method = D()
        sup, unl, qry = method_features(method, task, ctx)
        graph, *_ = method._task_graph(task, ctx)
        prior = method._class_prior(graph, torch.cat([sup, unl, qry]), task, ctx)
        assert prior is not None and abs(float(prior.mean()) - 1) < 1e-6
        priors.append(prior)
        for key, m in (("auto", method), ("uniform", D(prior=None))):
            scores = m.predict(task, ctx)
            assert torch.isfinite(scores).all()
            acc[key].append((scores.argmax(1) == truth).float().mean().item())
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    assert mean["auto"] > mean["uniform"] + 0.03, mean
    average = torch.stack(priors).mean(0)  # classes of 21, 11, 4, 2 and 1 nodes
    assert average[0] > average[1] > average[3] and average[0] > average[4], average


def method_features(method, task: Task, ctx: TaskContext):
    from fewshot_bench.methods.propagation import prepare_task_features

    return prepare_task_features(task, ctx, method.params["normalize"])


def test_diffusion_support_check_falls_back_to_the_feature_vote(digits) -> None:
    """With >= 2 shots, diffusion keeps its answer only when it beats the feature vote on the
    held-out support items of its n_iter folds; otherwise the queries get the feature vote."""
    x, y = digits
    seen = set()
    for seed in range(8):
        task, _ = digits_episode(x, y, seed, shot=3, queries=5, n_unl=10)
        ctx = TaskContext.create(seed)
        checked = Diffusion()
        scores = checked.predict(task, ctx)
        seen.add(checked.last_choice)
        if checked.last_choice == "features":
            sup, _, qry = method_features(checked, task, ctx)
            from fewshot_bench.graph.spectral import vote

            expected = vote(sup, task.support_labels.long(), qry, 5, 20.0)
            assert torch.equal(scores.argmax(1), expected.argmax(1))
        unchecked = Diffusion(support_check=False)
        unchecked.predict(task, TaskContext.create(seed))
        assert unchecked.last_choice == "diffusion"
    assert seen <= {"features", "diffusion"} and seen


def test_with_rows_equals_concatenating_the_selected_rows():
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().data).float()
    head, pool = x[:20], x[20:]
    for rows in (torch.tensor([5, 0, 5, 1700]), torch.zeros(0, dtype=torch.long)):
        assert torch.equal(with_rows(head, pool, rows), torch.cat([head, pool[rows]]))
    mixed = with_rows(
        head.double(), pool, torch.tensor([3])
    )  # dtypes differ: torch.cat's promotion
    assert mixed.dtype == torch.float64 and torch.equal(mixed[-1], pool[3].double())
