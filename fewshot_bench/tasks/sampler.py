"""Draw tasks from a pool: N-way K-shot episodes (with Ren et al. unlabeled/distractor pools)
and balanced semi-supervised splits. Every task is seeded by (seed, task index) alone."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fewshot_bench.errors import ProtocolError
from fewshot_bench.tasks.protocol import BACKGROUND, Pool, Protocol
from fewshot_bench.tasks.task import TaskIndices

_EMPTY = np.empty(0, dtype=np.int64)


def task_rng(seed: int, task_index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one task: depends only on its numbers, not on process or order."""
    return np.random.default_rng(np.random.SeedSequence([seed, task_index, stream]))


def class_members(labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """Item indices of each class, in ascending order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(n_classes)]


class EpisodeSampler:
    """N-way K-shot episodes with M unlabeled per class and D distractor classes (Ren et al. 2018).

    With ``labeled_fraction < 1`` each class's items are split once (by ``split_seed``) into a
    labeled part, from which support and query are drawn, and an unlabeled part, from which the
    unlabeled examples of episode and distractor classes are drawn. With ``labeled_fraction == 1``
    support, query and unlabeled are drawn disjointly from all of a class's items. With
    ``unlabeled_pool = "all"`` every task's unlabeled pool is the unlabeled part of every class
    (in a per-task random order), as in the metric-transfer few-shot protocol.
    """

    def __init__(
        self,
        labels: np.ndarray,
        n_classes: int,
        params: dict,
        *,
        name: str = "protocol",
        skip_small: bool = False,
    ) -> None:
        self.p = dict(params)
        self.name = name
        members = [m for m in class_members(np.asarray(labels), n_classes)]
        if (
            skip_small
        ):  # classes too small for an episode are never drawn (training on base classes)
            need = self.p["k_shot"] + self.p["n_query"] + self.p["n_unlabeled"]
            members = [m if len(m) >= need else m[:0] for m in members]
        frac = self.p["labeled_fraction"]
        if frac < 1.0:
            split_rng = np.random.default_rng(np.random.SeedSequence([self.p["split_seed"], 7919]))
            self.labeled, self.unlabeled = [], []
            for m in members:
                perm = split_rng.permutation(m)
                cut = int(round(frac * len(m)))
                self.labeled.append(np.sort(perm[:cut]))
                self.unlabeled.append(np.sort(perm[cut:]))
        else:
            self.labeled, self.unlabeled = members, None
        self.classes = np.array([c for c, m in enumerate(members) if len(m) > 0], dtype=np.int64)
        self._validate()

    @classmethod
    def for_training(
        cls,
        labels: np.ndarray | torch.Tensor,
        n_way: int,
        k_shot: int,
        n_query: int,
        n_unlabeled: int = 0,
        n_distractor: int = 0,
        *,
        name: str = "training",
    ) -> EpisodeSampler:
        """The sampler a method trains with on base classes: the same draws as evaluation
        episodes, over the classes that have enough items; episode ``t`` of seed ``s`` is
        ``sample(s, t)``."""
        labels = np.asarray(labels)
        params = {
            "n_way": n_way,
            "k_shot": k_shot,
            "n_query": n_query,
            "n_unlabeled": n_unlabeled,
            "n_distractor": n_distractor if n_unlabeled else 0,
            "labeled_fraction": 1.0,
            "split_seed": 0,
        }
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        return cls(labels, n_classes, params, name=name, skip_small=True)

    def _validate(self) -> None:
        p, name = self.p, self.name
        n_avail = len(self.classes)
        need = p["n_way"] + p["n_distractor"]
        if need > n_avail:
            raise ProtocolError(
                f"{name}: needs n_way + n_distractor = {p['n_way']} + {p['n_distractor']} = {need} "
                f"classes but the pool has {n_avail}; lower n_way/n_distractor or use a bigger split"
            )
        lab = min(len(self.labeled[c]) for c in self.classes)
        kq = p["k_shot"] + p["n_query"]
        if self.unlabeled is None:
            total = kq + p["n_unlabeled"]
            if total > lab:
                raise ProtocolError(
                    f"{name}: k_shot + n_query + n_unlabeled = {p['k_shot']} + {p['n_query']} + "
                    f"{p['n_unlabeled']} = {total} images per class, but the smallest class has {lab}; "
                    "lower them"
                )
        else:
            if kq > lab:
                raise ProtocolError(
                    f"{name}: k_shot + n_query = {kq} but the labeled part (labeled_fraction="
                    f"{p['labeled_fraction']}) of the smallest class has {lab} images; "
                    "raise labeled_fraction or lower k_shot/n_query"
                )
            unl = min(len(self.unlabeled[c]) for c in self.classes)
            if p["n_unlabeled"] > unl:
                raise ProtocolError(
                    f"{name}: n_unlabeled = {p['n_unlabeled']} but the unlabeled part of the smallest "
                    f"class has {unl} images; lower n_unlabeled or labeled_fraction"
                )

    def sample(self, seed: int, task_index: int) -> TaskIndices:
        """Episode ``task_index`` of seed ``seed`` (query/unlabeled truth: ``task.task_truth``)."""
        p = self.p
        rng = task_rng(seed, task_index)
        n_way, k, q, m = p["n_way"], p["k_shot"], p["n_query"], p["n_unlabeled"]
        chosen = rng.choice(self.classes, size=n_way + p["n_distractor"], replace=False)
        episode, distractors = chosen[:n_way], chosen[n_way:]
        counts = [q] * n_way
        if p.get("query_imbalance"):
            reserved = k + (m if self.unlabeled is None else 0)
            caps = [len(self.labeled[c]) - reserved for c in episode]
            counts = imbalanced_counts(rng, n_way * q, caps, float(p["query_imbalance"]))
        sup, qry, unl = [], [], []
        for c, qc in zip(episode, counts, strict=True):
            items = rng.permutation(self.labeled[c])
            sup.append(items[:k])
            qry.append(items[k : k + qc])
            if m:
                pool = (
                    items[k + qc :]
                    if self.unlabeled is None
                    else rng.permutation(self.unlabeled[c])
                )
                unl.append(pool[:m])
        if m:
            for c in distractors:
                pool = self.labeled[c] if self.unlabeled is None else self.unlabeled[c]
                unl.append(rng.choice(pool, size=m, replace=False))
        if p.get("unlabeled_pool") == "all":  # the unlabeled part of every class of the split
            unl = [self.unlabeled[c] for c in self.classes]
        unlabeled = np.concatenate(unl) if unl else _EMPTY
        if len(unlabeled):
            unlabeled = unlabeled[rng.permutation(len(unlabeled))]
        return TaskIndices(
            support=np.concatenate(sup).astype(np.int64),
            support_labels=np.repeat(np.arange(n_way, dtype=np.int64), k),
            unlabeled=unlabeled.astype(np.int64),
            query=np.concatenate(qry).astype(np.int64),
            classes=episode.astype(np.int64),
        )


def imbalanced_counts(
    rng: np.random.Generator, total: int, caps: list[int], alpha: float
) -> list[int]:
    """Queries per class for an imbalanced episode (Veilleux et al. 2021): class proportions
    drawn from a symmetric Dirichlet(``alpha``), ``total`` queries allotted by a multinomial,
    a class never past its ``caps`` entry (its excess goes to the classes with room)."""
    cap = np.asarray(caps, dtype=np.int64)
    share = rng.dirichlet(np.full(len(cap), alpha))
    counts = np.zeros(len(cap), dtype=np.int64)
    left = min(total, int(cap.sum()))
    while left > 0:
        room = (counts < cap) * share
        room = room / room.sum() if room.sum() > 0 else (counts < cap) / (counts < cap).sum()
        new = np.minimum(counts + rng.multinomial(left, room), cap)
        left -= int((new - counts).sum())
        counts = new
    return counts.tolist()


def resolve_classes(pool: Pool, spec: str | list[str], key: str, name: str) -> np.ndarray:
    """Sorted class indices of ``spec``: a class group the pool's dataset exposes
    (``Pool.class_groups``) or a list of its class names. ProtocolError naming the valid ones."""
    names = pool.data.class_names[: pool.n_task_classes]
    if isinstance(spec, str):
        groups = pool.class_groups
        if spec not in groups:
            have = (
                f"it exposes {', '.join(map(repr, groups))}"
                if groups
                else "it exposes no class groups (imagenet-features and imagenet expose 'base' "
                "and 'novel' with the option subset = 'lowshot-test' or 'lowshot-val')"
            )
            raise ProtocolError(
                f"{name}: [ssl] {key} = {spec!r} is no class group of {pool.data.name}: {have}; "
                "name one of those, or give a list of class names"
            )
        wanted = list(groups[spec])
    else:
        wanted = list(spec)
    index = {c: i for i, c in enumerate(names)}
    unknown = [c for c in wanted if c not in index]
    if unknown:
        raise ProtocolError(
            f"{name}: [ssl] {key} names {len(unknown)} class(es) that {pool.data.name} does not "
            f"have (e.g. {', '.join(map(repr, unknown[:3]))}); use its class names "
            f"(e.g. {', '.join(map(repr, names[:3]))})"
        )
    return np.array(sorted(index[c] for c in wanted), dtype=np.int64)


def ssl_split(pool: Pool, params: dict, seed: int, *, name: str = "protocol") -> TaskIndices:
    """One semi-supervised task: balanced labels from the labeled split, the rest unlabeled,
    the query split as query; ``classes`` are all pool classes, so episode label = pool label.
    ``n_labels`` not divisible by the class count gives the first
    ``n_labels % C`` classes (in a seeded order) one extra label.

    Optional ``params``: ``fully_labeled`` (classes whose labeled-split items are all labeled;
    ``n_labels`` / ``label_fraction`` then apply to the other classes and their items),
    ``query_classes`` (only the query-split items of these classes are queries, still predicted
    among all classes) and ``background`` (the pool's background items join the unlabeled set;
    see ``protocol.add_background``)."""
    data = pool.data
    lab_idx = pool.indices_of_split(params["labeled_split"])
    qry_idx = pool.indices_of_split(params["query_split"])
    labels = data.labels
    present = np.unique(labels[lab_idx])
    n_classes = pool.n_task_classes
    if len(present) != n_classes:
        raise ProtocolError(
            f"{name}: the labeled split lacks classes {sorted(set(range(n_classes)) - set(present))}"
        )
    drawn = np.arange(n_classes, dtype=np.int64)  # the classes that get balanced labels
    full = _EMPTY
    if "fully_labeled" in params:
        full = resolve_classes(pool, params["fully_labeled"], "fully_labeled", name)
        drawn = np.setdiff1d(drawn, full)
        if len(drawn) == 0:
            raise ProtocolError(
                f"{name}: [ssl] fully_labeled covers all {n_classes} classes, so nothing is left "
                "to draw labels for or to leave unlabeled; name only the base classes"
            )
    members = class_members(labels[lab_idx], n_classes)
    if "n_labels" in params:
        n_labels = params["n_labels"]
    else:
        n_drawn_items = sum(len(members[c]) for c in drawn)
        n_labels = int(round(params["label_fraction"] * n_drawn_items))
    n_draw = len(drawn)
    if n_labels < n_draw:
        which = "classes" if len(full) == 0 else "classes not in fully_labeled"
        raise ProtocolError(
            f"{name}: {n_labels} labels cannot cover {n_draw} {which}; use >= {n_draw}"
        )
    rng = task_rng(seed, 0)
    per_class = np.full(n_draw, n_labels // n_draw)
    per_class[rng.permutation(n_draw)[: n_labels % n_draw]] += 1
    smallest = min(len(members[c]) for c in drawn)
    if per_class.max() >= smallest:
        raise ProtocolError(
            f"{name}: {per_class.max()} labels per class leave no unlabeled data in a class of {smallest}; "
            "use fewer labels"
        )
    chosen = np.concatenate(
        [
            rng.choice(members[c], size=k, replace=False)
            for c, k in zip(drawn, per_class, strict=True)
        ]
        + [members[c] for c in full]
    )
    chosen_global = lab_idx[np.sort(chosen)]
    mask = np.ones(len(lab_idx), dtype=bool)
    mask[np.searchsorted(lab_idx, chosen_global)] = False
    unlabeled = lab_idx[mask]
    if "background" in params:
        if pool.background_class is None:
            raise ProtocolError(
                f"{name}: the protocol has an [ssl] background but this pool was loaded without "
                "it; load the pool with tasks.protocol.load_pool(protocol)"
            )
        unlabeled = np.concatenate([unlabeled, pool.indices_of_split(BACKGROUND)])
    query = qry_idx
    if "query_classes" in params:
        wanted = resolve_classes(pool, params["query_classes"], "query_classes", name)
        query = qry_idx[np.isin(labels[qry_idx], wanted)]
        if len(query) == 0:
            raise ProtocolError(
                f"{name}: the {params['query_split']} split holds no items of [ssl] query_classes; "
                "name classes that have query items"
            )
    return TaskIndices(
        support=chosen_global,
        support_labels=labels[chosen_global],
        unlabeled=unlabeled,
        query=query,
        classes=np.arange(n_classes, dtype=np.int64),
    )


def iter_tasks(protocol: Protocol, pool: Pool, seed: int) -> Iterator[TaskIndices]:
    """All tasks of ``protocol`` for one seed, in task-index order."""
    if protocol.kind == "episodic":
        sampler = EpisodeSampler(
            pool.data.labels, pool.data.n_classes, protocol.params, name=protocol.name
        )
        for i in range(protocol.params["n_tasks"]):
            yield sampler.sample(seed, i)
    else:
        yield ssl_split(pool, protocol.params, seed, name=protocol.name)
