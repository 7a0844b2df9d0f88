"""ProtoNet, MAML, soft k-means variants, Mean Teacher and the run cards (tiny budgets, real data)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot_bench.data import load_dataset
from fewshot_bench.errors import FsbenchError, ProtocolError
from fewshot_bench.methods import FitSource, TaskContext, available_methods, get_method
from fewshot_bench.methods.episodic import prototypes
from fewshot_bench.methods.maml import MamlNet, adapted_logits, inner_adapt
from fewshot_bench.methods.mean_teacher import augment_batch, sigmoid_rampup
from fewshot_bench.report.cards import CardError, load_cards, reported_numbers
from fewshot_bench.run.runner import run_protocol
from fewshot_bench.run.store import ResultsStore, load_results
from fewshot_bench.tasks.protocol import all_protocols, load_protocol_file
from fewshot_bench.tasks.sampler import EpisodeSampler
from fewshot_bench.tasks.task import Task

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def omniglot(shared_data):
    """Real Omniglot at 28×28: base = 150 background characters, novel = 100 evaluation ones."""
    bg = load_dataset("omniglot", "background", shared_data)
    ev = load_dataset("omniglot", "evaluation", shared_data)
    keep_b = np.flatnonzero(bg.labels < 150)
    keep_e = np.flatnonzero(ev.labels < 100)
    base = FitSource(bg.images[keep_b].clone(), bg.labels[keep_b], "images", bg.class_names[:150])
    return base, ev.images[keep_e].clone(), ev.labels[keep_e]


def episodes(images, labels, n_tasks, n_way=5, k_shot=1, n_query=5, n_unlabeled=0, seed=0):
    """Evaluation tasks (and query labels) drawn from held-out classes."""
    sampler = EpisodeSampler.for_training(labels, n_way, k_shot, n_query, n_unlabeled)
    tasks, truths = [], []
    for i in range(n_tasks):
        ep = sampler.sample(seed, i)
        tasks.append(
            Task(
                images[ep.support],
                torch.from_numpy(ep.support_labels),
                images[ep.unlabeled],
                images[ep.query],
                n_way,
                "images",
            )
        )
        truths.append(torch.arange(n_way).repeat_interleave(n_query))
    return tasks, truths


def accuracy(scores, truths) -> float:
    return float(
        np.mean(
            [(s.argmax(1) == y).float().mean().item() for s, y in zip(scores, truths, strict=True)]
        )
    )


def test_methods_registered():
    methods = available_methods()
    expected = {
        "protonet": "inductive",
        "maml": "inductive",
        "fomaml": "inductive",
        "soft-kmeans": "semi-supervised",
        "soft-kmeans-cluster": "semi-supervised",
        "masked-soft-kmeans": "semi-supervised",
        "mean-teacher": "semi-supervised",
        "supervised": "inductive",
        "finetune": "inductive",
    }
    for name, setting in expected.items():
        assert methods[name].consumes == "images"
        assert methods[name].setting == setting
    assert methods["fomaml"]().params["first_order"] is True
    assert methods["maml"]().params["first_order"] is False
    assert "consistency" not in methods["supervised"].defaults


def test_training_episodes_come_from_the_evaluation_sampler():
    """Training draws distinct items, distractor classes outside the episode, and never a
    class too small for an episode."""
    labels = np.concatenate([np.repeat(np.arange(12), 6), np.full(2, 12)])  # class 12: 2 items
    sampler = EpisodeSampler.for_training(labels, 5, 2, 3, n_unlabeled=1, n_distractor=3)
    for t in range(20):
        ep = sampler.sample(0, t)
        items = np.concatenate([ep.support, ep.query, ep.unlabeled])
        assert len(set(items.tolist())) == len(items) == 5 * 6 + 3
        classes = labels[ep.support]
        assert (labels[ep.query] == np.repeat(classes[::2], 3)).all()
        unl_classes = labels[ep.unlabeled]
        distractors = set(unl_classes) - set(classes)
        assert len(distractors) == 3 and 12 not in set(classes) | distractors
    assert (sampler.sample(0, 3).support == sampler.sample(0, 3).support).all()
    with pytest.raises(ProtocolError, match="needs n_way"):
        EpisodeSampler.for_training(labels, 13, 1, 2)  # class 12 has too few items


def test_protonet_training_improves_novel_class_accuracy(omniglot):
    base, images, labels = omniglot
    tasks, truths = episodes(images, labels, 30, n_query=3)
    params = dict(train_way=10, train_shot=1, train_query=2, lr=3e-3)
    untrained = get_method("protonet")(**params)
    untrained.fit(base, 0, TaskContext.create(0))
    trained = get_method("protonet")(**params)
    trained.fit(base, 20, TaskContext.create(0))
    log = trained.train_log
    assert log and log[-1]["step"] == 20
    ctxs = [TaskContext.create(i) for i in range(len(tasks))]
    before = accuracy(untrained.predict_batch(tasks, ctxs), truths)
    after = accuracy(trained.predict_batch(tasks, ctxs), truths)
    assert after > before + 0.05, (before, after)
    # vectorised batch == one task at a time
    one = trained.predict(tasks[3], ctxs[3])
    assert torch.allclose(one, trained.predict_batch(tasks, ctxs)[3], atol=1e-4)
    assert one.shape == (15, 5)


def test_protonet_is_deterministic_and_state_round_trips(omniglot, tmp_path):
    base, images, labels = omniglot
    tasks, _ = episodes(images, labels, 3)
    ctxs = [TaskContext.create(i) for i in range(3)]
    params = dict(train_way=5, train_shot=1, train_query=2)
    a, b = get_method("protonet")(**params), get_method("protonet")(**params)
    a.fit(base, 3, TaskContext.create(7))
    b.fit(base, 3, TaskContext.create(7))
    for x, y in zip(a.predict_batch(tasks, ctxs), b.predict_batch(tasks, ctxs), strict=True):
        assert torch.equal(x, y)
    c = get_method("protonet")(**params)
    c.fit(base, 3, TaskContext.create(8))
    assert not torch.equal(a.predict(tasks[0], ctxs[0]), c.predict(tasks[0], ctxs[0]))
    # state → file → a fresh method via `init` with zero further steps
    path = tmp_path / "state.pt"
    torch.save(a.state_dict(), path)
    d = get_method("protonet")(**params, init=str(path))
    d.fit(base, 0, TaskContext.create(0))
    assert torch.equal(a.predict(tasks[0], ctxs[0]), d.predict(tasks[0], ctxs[0]))
    with pytest.raises(FsbenchError, match="fitted"):
        get_method("protonet")().predict(tasks[0], ctxs[0])


def _toy_images(
    n_per_class: int, n_way: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ``c`` = a bright square at a class-specific place, plus noise (28×28 uint8)."""
    x = torch.rand(n_way * n_per_class, 1, 28, 28, generator=gen) * 60
    y = torch.arange(n_way).repeat_interleave(n_per_class)
    for c in range(n_way):
        r, k = divmod(c, 3)
        x[y == c, :, 2 + 8 * r : 10 + 8 * r, 2 + 8 * k : 10 + 8 * k] += 180
    return x.clamp(0, 255).to(torch.uint8), y


def test_maml_inner_loop_and_first_vs_second_order_gradients():
    gen = torch.Generator().manual_seed(0)
    net = MamlNet("conv4", 1, 28, 5, seed=0)
    xs, ys = _toy_images(2, 5, gen)
    xq, yq = _toy_images(3, 5, gen)
    params = dict(net.named_parameters())

    def support_loss(p):
        return F.cross_entropy(torch.func.functional_call(net, p, (xs,)), ys).item()

    fast = inner_adapt(net, params, xs, ys, steps=3, lr=0.05, create_graph=False)
    assert support_loss(fast) < support_loss(params)

    grads = {}
    for order, create in (("second", True), ("first", False)):
        fast = inner_adapt(net, params, xs, ys, steps=1, lr=0.4, create_graph=create)
        loss = F.cross_entropy(adapted_logits(net, fast, xs, xq), yq)
        g = torch.autograd.grad(loss, list(params.values()))
        assert all(torch.isfinite(t).all() for t in g)
        grads[order] = torch.cat([t.flatten() for t in g])
    assert not torch.allclose(grads["first"], grads["second"], rtol=1e-3, atol=1e-6)
    # first order = the query-loss gradient at the adapted weights, taken as independent leaves
    fast = inner_adapt(net, params, xs, ys, steps=1, lr=0.4, create_graph=False)
    leaves = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    manual = torch.autograd.grad(
        F.cross_entropy(adapted_logits(net, leaves, xs, xq), yq), list(leaves.values())
    )
    assert torch.allclose(grads["first"], torch.cat([t.flatten() for t in manual]), atol=1e-6)
    # queries are normalised with the support's batch statistics only: inductive
    other_q = torch.cat([xq[:1], torch.full_like(xq[1:], 255)])
    la = adapted_logits(net, params, xs, xq)[:1]
    lb = adapted_logits(net, params, xs, other_q)[:1]
    assert torch.allclose(la, lb, atol=1e-5)


def test_maml_fit_predict_and_determinism(omniglot):
    base, images, labels = omniglot
    tasks, _ = episodes(images, labels, 1)
    ctxs = [TaskContext.create(0)]
    outs = []
    for name in ("maml", "maml", "fomaml"):
        m = get_method(name)(meta_batch=2, train_query=1, test_inner_steps=2)
        m.fit(base, 1, TaskContext.create(0))
        outs.append(m.predict_batch(tasks, ctxs))
        assert len(m.train_log) == 1 and np.isfinite(m.train_log[0]["loss"])
    assert outs[0][0].shape == (25, 5) and torch.isfinite(outs[0][0]).all()
    assert torch.equal(outs[0][0], outs[1][0])
    assert not torch.equal(outs[0][0], outs[2][0])
    with pytest.raises(ProtocolError, match="n_way=20"):
        m.predict(episodes(images, labels, 1, n_way=20)[0][0], ctxs[0])


def _clusters(gen, n_way=5, dim=8, spread=0.3):
    """Class centres far apart; one noisy support point each; unlabeled near the true centres."""
    centres = torch.randn(n_way, dim, generator=gen) * 4 + 10
    support = centres + torch.randn(n_way, dim, generator=gen) * 1.5
    y = torch.arange(n_way)
    unl_y = torch.arange(n_way).repeat_interleave(10)
    unl = centres[unl_y] + torch.randn(len(unl_y), dim, generator=gen) * spread
    return centres, support[None], y[None], unl[None]


def test_soft_kmeans_moves_prototypes_toward_class_means():
    gen = torch.Generator().manual_seed(0)
    centres, support, y, unl = _clusters(gen)
    m = get_method("soft-kmeans")(refine_steps=1)
    start = prototypes(support, y, 5)[0]
    refined = m.refine(support, y, unl, 5)[0]
    err0 = (start - centres).norm(dim=1)
    err1 = (refined - centres).norm(dim=1)
    assert (err1 < err0).all()
    more = get_method("soft-kmeans")(refine_steps=3).refine(support, y, unl, 5)[0]
    assert (more - centres).norm(dim=1).mean() <= err1.mean() + 1e-6
    # no unlabeled items: plain prototypes
    assert torch.equal(m.refine(support, y, unl[:, :0], 5)[0], start)


def test_masked_and_cluster_variants_downweight_distractors():
    gen = torch.Generator().manual_seed(1)
    centres, support, y, unl = _clusters(gen)
    # distractors: a tight cluster away from every class, near the origin
    distractors = torch.randn(1, 30, centres.shape[1], generator=gen) * 0.3
    mixed = torch.cat([unl, distractors], dim=1)
    is_d = torch.cat([torch.zeros(50), torch.ones(30)]).bool()

    plain = get_method("soft-kmeans")()
    masked = get_method("masked-soft-kmeans")()
    masked.extra = masked.build_extra()
    cluster = get_method("soft-kmeans-cluster")(radius_init=3.0)
    cluster.extra = cluster.build_extra()
    protos = prototypes(support, y, 5)
    w_plain = plain.unlabeled_weights(mixed, protos)[0].sum(-1)
    w_masked = masked.unlabeled_weights(mixed, protos)[0].sum(-1)
    w_cluster = cluster.unlabeled_weights(mixed, protos)[0].sum(-1)
    assert torch.allclose(w_plain, torch.ones(80))  # soft k-means gives every item weight 1
    for w in (w_masked, w_cluster):
        assert w[is_d].mean() < 0.1 * w[~is_d].mean()
    err = {}
    for name, method in (("plain", plain), ("masked", masked), ("cluster", cluster)):
        err[name] = (method.refine(support, y, mixed, 5)[0] - centres).norm(dim=1).mean()
    assert err["masked"] < err["plain"] and err["cluster"] < err["plain"]


def test_soft_kmeans_trains_with_unlabeled_episodes(omniglot):
    base, images, labels = omniglot
    m = get_method("masked-soft-kmeans")(
        train_way=5, train_query=2, train_unlabeled=2, train_distractors=2
    )
    m.fit(base, 2, TaskContext.create(0))
    assert m.extra is not None
    mlp_bias = m.extra.net[2].bias.detach()
    assert not torch.allclose(mlp_bias, torch.tensor([0.6, 10.0]))  # the mask MLP was updated
    tasks, truths = episodes(images, labels, 3, n_unlabeled=2)
    out = m.predict_batch(tasks, [TaskContext.create(i) for i in range(3)])
    assert out[0].shape == (25, 5) and torch.isfinite(out[0]).all()


@pytest.fixture(scope="module")
def fashion_task():
    if not FASHION.exists():
        pytest.skip("apt-get install dataset-fashion-mnist")
    train = load_dataset("fashion-mnist", "train", "/nonexistent")
    test = load_dataset("fashion-mnist", "test", "/nonexistent")
    y = torch.from_numpy(train.labels)
    lab = torch.cat([torch.nonzero(y == c).flatten()[:5] for c in range(10)])
    unl = torch.arange(1000, 1400)
    task = Task(train.images[lab], y[lab], train.images[unl], test.images[:100], 10, "images")
    return task, torch.from_numpy(test.labels[:100])


def test_mean_teacher_runs_and_teacher_differs_from_student(fashion_task):
    task, _ = fashion_task
    kw = dict(steps=4, labeled_batch=8, unlabeled_batch=8, eval_batch=64)
    m = get_method("mean-teacher")(**kw)
    scores = m.predict(task, TaskContext.create(3))
    assert scores.shape == (100, 10) and torch.isfinite(scores).all()
    sw = torch.cat([p.flatten() for p in m.student.parameters()])
    tw = torch.cat([p.flatten() for p in m.teacher.parameters()])
    assert not torch.allclose(sw, tw)
    assert torch.equal(
        scores, get_method("mean-teacher")(**kw).predict(task, TaskContext.create(3))
    )
    # the supervised baseline never looks at the unlabeled images
    sup = get_method("supervised")(steps=2, labeled_batch=8)
    a = sup.predict(task, TaskContext.create(3))
    blank = Task(task.support, task.support_labels, task.unlabeled[:0], task.query, 10, "images")
    b = get_method("supervised")(steps=2, labeled_batch=8).predict(blank, TaskContext.create(3))
    assert torch.equal(a, b)


def test_finetune_starts_from_the_checkpoint_backbone(fashion_task, tmp_path):
    from fewshot_bench.backbones.checkpoint import save_checkpoint
    from fewshot_bench.methods.episodic import seeded_backbone

    task, _ = fashion_task
    with pytest.raises(ProtocolError, match="init=PATH"):
        get_method("finetune")()
    pretrained = seeded_backbone("conv4", 1, 28, 123, torch.device("cpu"))
    state = {k: v.clone() for k, v in pretrained.state_dict().items()}
    ckpt = {"arch": "conv4", "in_channels": 1, "image_size": 28, "objective": "instance"}
    path = save_checkpoint({**ckpt, "state_dict": state}, tmp_path / "b.pt")
    m = get_method("finetune")(init=str(path), steps=0)
    net = m.build_network(1, 28, 10, seed=0)
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in state.items())
    scratch = get_method("supervised")().build_network(1, 28, 10, seed=0)
    assert not torch.equal(
        scratch.backbone.state_dict()["encoder.0.0.weight"], state["encoder.0.0.weight"]
    )
    scores = get_method("finetune")(init=str(path), steps=3, labeled_batch=8).predict(
        task, TaskContext.create(0)
    )
    assert scores.shape == (100, 10) and torch.isfinite(scores).all()
    wrong = save_checkpoint({**ckpt, "image_size": 32, "state_dict": state}, tmp_path / "c.pt")
    with pytest.raises(ProtocolError, match="32px"):
        get_method("finetune")(init=str(wrong), steps=1).predict(task, TaskContext.create(0))


def test_propagation_finetune_trains_on_weighted_pseudo_labels(fashion_task, tmp_path):
    from fewshot_bench.backbones.checkpoint import save_checkpoint
    from fewshot_bench.methods.episodic import seeded_backbone

    task, truth = fashion_task
    net = seeded_backbone("conv4", 1, 28, 5, torch.device("cpu"))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ckpt = {"arch": "conv4", "in_channels": 1, "image_size": 28, "objective": "instance"}
    path = save_checkpoint({**ckpt, "state_dict": state}, tmp_path / "b.pt")
    m = get_method("propagation-finetune")(
        init=str(path), features="backbone", n_eig=20, k=5, steps=3, labeled_batch=8
    )
    assert m.setting == "semi-supervised"
    x, y, w = m.training_set(task, TaskContext.create(0))
    pl = m.last_pseudo_labels
    n_s = task.n_support
    assert len(pl.indices) > 0 and len(x) == n_s + len(pl.indices) == len(y) == len(w)
    assert torch.equal(x[:n_s], task.support) and torch.equal(x[n_s:], task.unlabeled[pl.indices])
    assert torch.all(w[:n_s] == 1) and torch.all((w[n_s:] >= 0.01) & (w[n_s:] <= 1))
    # pseudo-labels from an untrained metric on Fashion-MNIST are still far above chance
    train = load_dataset("fashion-mnist", "train", "/nonexistent")
    unl_truth = torch.from_numpy(train.labels[1000:1400])
    assert (pl.labels == unl_truth[pl.indices]).float().mean() > 0.3
    scores = m.predict(task, TaskContext.create(0))
    assert scores.shape == (100, 10) and torch.isfinite(scores).all()
    with pytest.raises(ProtocolError, match="propagator"):
        get_method("propagation-finetune")(init=str(path), propagator="magic")


def test_augment_batch_and_rampup():
    x = torch.rand(4, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(x, gen, translate=2, flip=True, noise=0.0)
    assert out.shape == x.shape
    same = augment_batch(x, torch.Generator().manual_seed(0), translate=2, flip=True, noise=0.0)
    assert torch.equal(out, same)
    # with no translation, flip and noise it is the identity
    assert torch.equal(augment_batch(x, gen, 0, False, 0.0), x)
    # a pure translation keeps the interior pixels (shifted)
    shifted = augment_batch(x, torch.Generator().manual_seed(1), 1, False, 0.0)
    assert any(
        torch.equal(shifted[0, :, 1:-1, 1:-1], x[0, :, 1 + dy : 7 + dy, 1 + dx : 7 + dx])
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )
    assert sigmoid_rampup(0, 10) == pytest.approx(np.exp(-5))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(5, 0) == 1.0


def test_cards_load_and_report():
    cards = {c.method: c for c in load_cards()}
    methods = available_methods()
    assert {"protonet", "maml", "fomaml", "soft-kmeans", "mean-teacher"} <= set(cards)
    known = set(all_protocols())
    for card in cards.values():
        assert card.method in methods, card.path
        assert set(card.protocols) <= known, card.path
        for entry in card.protocols.values():
            methods[card.method](**entry.params)  # every listed parameter exists
    numbers = reported_numbers("omniglot-5w1s")
    assert numbers["protonet"][0] == 98.8 and "Snell" in numbers["protonet"][1]
    assert numbers["maml"][0] == 98.7
    assert reported_numbers("omniglot-20w1s")["protonet"][0] == 96.0
    assert reported_numbers("cifar10-ssl-250")["mean-teacher"][0] == 45.49
    spec = cards["protonet"].method_spec("omniglot-5w1s")
    assert spec.startswith("protonet:train_way=60")


def test_cards_validation(tmp_path):
    (tmp_path / "a.toml").write_text(
        textwrap.dedent("""
        method = "protonet"
        title = "x"
        paper = "y"
        [protocols.p]
        reported = 50.0
    """)
    )
    with pytest.raises(CardError, match="source"):
        load_cards(tmp_path)
    (tmp_path / "a.toml").write_text('method = "protonet"\ntitle = "x"\npaper = "y"\ncolour = 1\n')
    with pytest.raises(CardError, match="unknown key"):
        load_cards(tmp_path)
    (tmp_path / "a.toml").write_text(
        'method = "protonet"\ntitle = "x"\npaper = "y"\n[protocols.p]\nreported = 150\nsource = "s"\n'
    )
    with pytest.raises(CardError, match="number"):
        load_cards(tmp_path)


def test_protonet_through_the_runner_caches_its_state(shared_data, tmp_path):
    path = tmp_path / "omni-fit.toml"
    path.write_text(
        textwrap.dedent("""
        name = "omni-fit"
        [dataset]
        name = "omniglot"
        splits = ["test"]
        image_size = 28
        fit_split = "val"
        [episodes]
        n_way = 5
        k_shot = 1
        n_query = 3
        n_tasks = 8
    """)
    )
    proto = load_protocol_file(path)[0]
    method = get_method("protonet")(train_way=5, train_query=2, steps=2)
    states_dir = Path(os.environ["FSBENCH_CACHE"]) / "states"
    before = set(states_dir.glob("protonet-*.pt")) if states_dir.exists() else set()
    with ResultsStore(tmp_path / "r.sqlite") as store:
        run_protocol(proto, [method], store, workdir=tmp_path, root=shared_data, progress=False)
    df = load_results(tmp_path / "r.sqlite")
    assert len(df) == 8 and set(df.setting) == {"inductive"} and set(df.backbone) == {"images"}
    states = list(states_dir.glob("protonet-*.pt"))
    assert states
    fitted = max(states, key=lambda p: p.stat().st_mtime)
    assert fitted in set(states) - before or fitted.stat().st_size > 0
    stamp, content = fitted.stat().st_mtime_ns, fitted.read_bytes()
    state = torch.load(fitted, weights_only=True)
    assert state["train_log"] and state["arch"] == "conv4"
    again = get_method("protonet")(train_way=5, train_query=2, steps=2)
    with ResultsStore(tmp_path / "r2.sqlite") as store:
        run_protocol(proto, [again], store, workdir=tmp_path, root=shared_data, progress=False)
    # loaded from the cache, not retrained: the state file is untouched and the scores equal
    assert fitted.stat().st_mtime_ns == stamp and fitted.read_bytes() == content
    assert load_results(tmp_path / "r2.sqlite").accuracy.tolist() == df.accuracy.tolist()
    # --save-state hands the fitted state to init= of another method
    saved = tmp_path / "states" / "proto.pt"
    third = get_method("protonet")(train_way=5, train_query=2, steps=2)
    with ResultsStore(tmp_path / "r3.sqlite") as store:
        run_protocol(
            proto,
            [third],
            store,
            workdir=tmp_path,
            root=shared_data,
            progress=False,
            save_state=saved,
        )
        assert saved.read_bytes() == content
        init = get_method("soft-kmeans")(init=str(saved), steps=0)
        run_protocol(proto, [init], store, workdir=tmp_path, root=shared_data, progress=False)
        assert len(load_results(tmp_path / "r3.sqlite").query("method == 'soft-kmeans'")) == 8
        with pytest.raises(ProtocolError, match="exactly one method"):
            run_protocol(
                proto,
                [third, get_method("fomaml")(steps=1)],
                store,
                workdir=tmp_path,
                root=shared_data,
                progress=False,
                save_state=saved,
            )
