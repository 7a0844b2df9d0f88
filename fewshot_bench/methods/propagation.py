"""Label propagation methods from the two papers, on faiss kNN graphs (CPU or CUDA).

Registered methods (all consume ``features``; parameters in :mod:`.param_groups`, where every
temperature divides):

- ``nn-propagation`` (semi-supervised): metric transfer eq. 5 -- support votes for the
  unlabeled pool, confident pseudo-labels (α ≥ ``min_alpha``) join the support, weighted by α,
  to vote for each query.
- ``spectral-propagation`` (transductive): eq. 6 -- spectral embedding of the kNN graph of
  support ∪ unlabeled (eigenpairs 2..η of ``L_sym``, η = ``n_eig``, the trivial one excluded,
  ``1/λ`` weighting), queries attached as out-only nodes, eq. 5 voting
  ``exp(cos / vote_temperature)``.
- ``diffusion`` (transductive): Douze et al. -- ``L <- η(W L)`` from the support seeds over support ∪ unlabeled,
  queries as out-only nodes (incoming edges only); iteration count chosen on held-out seeds.
- ``diffusion-logreg``: late fusion ``a log p_logreg + (1-a) log p_diffusion``; ``a`` (and the
  iteration count) chosen on held-out seeds.
- ``propagation-classifier`` (semi-supervised): propagate to the unlabeled pool (diffusion, spectral or nn),
  keep confident pseudo-labels, train the eq. 10 confidence-weighted logistic regression on
  support + pseudo-labels, classify the queries with it (queries never enter the graph).

The graph methods receive the whole query set, so the runner records them ``transductive``
even where the queries are out-only nodes (incoming edges only, scores independent of the other
queries): the runner cannot check that, only give or withhold the query set. With
``queries_in_graph="auto"`` (default) and an *empty* unlabeled pool the queries join the graph
as ordinary nodes; ``False`` keeps them out-only always; ``True`` always puts them in.
``propagation-classifier`` with no unlabeled data reduces to logistic regression on the support.

Validation (``n_iter="auto"``, ``mix="auto"``): leave-some-out over the support -- each of
``n_folds`` random folds holds out one seed per class, diffuses from the rest and scores the
held-out seeds (still graph nodes, now unlabeled); ties go to the defaults. It needs ≥ 2 shots
in every class; otherwise the defaults (``default_iter`` = 3, ``default_mix`` = 0.5) are used.
``diffusion`` runs the folds and the final diffusion as column groups of one pass
(``class_batch`` then only applies when the widened matrix would not fit 1 GiB). With
``support_check`` (default) the same folds decide whether the graph is worth it: diffusion and
spectral-propagation keep their answer only when it classifies the held-out seeds better than
the support's eq. 5 vote on the features does; otherwise the queries get that vote.

Class masses (``diffusion``, ``prior="auto"``, default): when the queries are graph nodes, the
column normalisation gives each class the share of the graph's nodes that the support's feature
vote assigns it (plus one node), not equal shares, which assumed a balanced query set; with an
unlabeled pool it keeps equal masses (``prior=none``: Douze et al.'s equal masses always).

Defaults: ``k = "auto"`` neighbours, ``min(10, core nodes per class // 2)`` (:func:`graph_k`: 10
on large pools and shapes with 20 or more nodes per class, fewer on small episode graphs, where
k = 10 linked every node mostly to other classes; Douze et al. use 30 at ImageNet scale, pass
``k=30`` there); graphs with fewer than :data:`MIN_NODES_PER_CLASS` core nodes per class are
not built (the queries get the support's eq. 5 vote on the features);
cosine similarity on L2-normalised features, exact search up to ~14k points, IVF beyond, and
background sets of ≥ 20k points cached (the last six in memory, and on disk under
:func:`~fewshot_bench.graph.build.default_cache_dir`, which a confined worker points at its private
folder) so tasks sharing an unlabeled pool build ``W_BB`` once.
Small CPU tasks (≤ 5000 nodes) run single-threaded, which is faster for episode-sized work.

Other methods can reuse the propagation through :func:`pseudo_label_unlabeled` (top-k most
confident pseudo-labels of ``task.unlabeled``, with their α).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fewshot_bench.errors import ProtocolError
from fewshot_bench.graph.build import Graph, build_block_graph, default_cache
from fewshot_bench.graph.classifier import fit_weighted_logreg
from fewshot_bench.graph.confidence import PseudoLabels, confident_pseudo_labels
from fewshot_bench.graph.diffusion import (
    diffuse,
    diffuse_select,
    leave_some_out_folds,
    scores_to_log_probs,
)
from fewshot_bench.graph.spectral import Voters, extend_to_out_nodes, spectral_embedding, vote
from fewshot_bench.graph.spreading import label_spreading
from fewshot_bench.graph.threads import SMALL_PROBLEM_NODES, few_threads
from fewshot_bench.methods.base import Method, Scorer, TaskContext
from fewshot_bench.methods.param_groups import (
    CONFIDENCE,
    DIFFUSION,
    GRAPH,
    LOGREG,
    NORMALIZE,
    SPECTRAL,
)
from fewshot_bench.methods.params import Param, Schema
from fewshot_bench.methods.registry import register_method
from fewshot_bench.methods.simple import feature_transform
from fewshot_bench.tasks.task import Task

#: Background sets at least this large go through the background-graph cache.
CACHE_MIN_NODES = 20000


def prepare_task_features(
    task: Task, ctx: TaskContext, normalize: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support, unlabeled and query features as float32 on ``ctx.device``, normalised
    (``center-l2``: the mean of support and unlabeled items, never of the queries)."""
    if task.kind != "features":
        raise ProtocolError("propagation methods consume features; run them on a feature protocol")
    f = feature_transform(task, normalize, ctx.device)
    unl = task.unlabeled.reshape(-1, task.support.shape[1])
    return f(task.support), f(unl), f(task.query)


#: Eq. 5 inverse temperature (1 / 0.05, nn-propagation's default) for queries diffusion never
#: reaches.
UNREACHED_SIGMA = 20.0

#: The largest neighbour count ``k="auto"`` picks (the published default on episode graphs).
K_AUTO_MAX = 10


def graph_k(k: int | str, n_core: int, n_way: int) -> int:
    """The neighbour count of a graph of ``n_core`` core nodes over ``n_way`` classes.

    ``"auto"``: ``min(10, m // 2)`` (at least 1) with ``m = n_core / n_way`` core nodes per
    class. A node has at most ``m - 1`` neighbours of its own class when the classes are
    balanced and every node belongs to one of them; distractor classes in the pool and
    imbalanced queries leave a class fewer nodes than that (a 5-way 1-shot task with 5 unlabeled
    items per class and 5 distractor classes has m = 11 but 6 nodes per class), and any ``k``
    beyond a class's size links its nodes to other classes. Half the average class size keeps
    ``k`` below the class size while up to half of the graph is other classes' items; episode
    graphs with 20 or more nodes per class, and large unlabeled pools, keep ``k = 10``."""
    if k != "auto":
        return int(k)
    per_class = n_core // max(1, n_way)
    return max(1, min(K_AUTO_MAX, per_class // 2))


#: Support folds of spectral-propagation's ``support_check`` (diffusion uses its ``n_folds``).
CHECK_FOLDS = 5

#: Graphs with fewer core nodes per class than this carry no kNN structure to propagate along
#: (a 1-shot task with one query per class has 2): the graph methods score the queries by the
#: support's eq. 5 vote on the features instead (:meth:`GraphPropagation.too_small`).
MIN_NODES_PER_CLASS = 3


def feature_vote_accuracy(
    x: torch.Tensor, labels: torch.Tensor, folds: list, sigma: float = UNREACHED_SIGMA
) -> float:
    """Accuracy of the eq. 5 vote on rows ``x`` of the support, each fold's held-out items voted
    for by its training items (all folds pooled)."""
    n_way, hits, total = int(labels.max()) + 1, 0, 0
    for fold in folds:
        tr, ho = fold.train.to(labels.device), fold.held_out.to(labels.device)
        votes = vote(x[tr], labels[tr], x[ho], n_way, sigma)
        hits += int((votes.argmax(1) == labels[ho]).sum())
        total += int(ho.numel())
    return hits / max(total, 1)


class PropagationMethod(Method):
    """Shared machinery (graph building, diffusion, spectral, voting); not registered itself."""

    consumes = "features"
    setting = "semi-supervised"

    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        """Log-scores ``[n_unlabeled, n_way]`` this method's propagation gives the unlabeled pool."""
        raise NotImplementedError

    def _sigma(self) -> float:
        """Eq. 5's inverse temperature σ = 1 / ``vote_temperature``."""
        return 1.0 / float(self.params["vote_temperature"])

    def _few_threads(self, task: Task, ctx: TaskContext) -> Any:
        return few_threads(ctx.device.type == "cpu" and task.n_items <= SMALL_PROBLEM_NODES)


class GraphPropagation(PropagationMethod):
    """Graph methods: they take the whole query set (out-only graph nodes, or ordinary nodes
    when the task has no unlabeled pool), so the runner gives it and records ``transductive``."""

    setting = "transductive"

    def predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        """Scores ``[n_query, n_way]``; small CPU tasks run single-threaded (see ``graph.threads``).

        A graph too small to carry a kNN structure (:meth:`too_small`) is not built: the queries
        get the support's eq. 5 vote on the features."""
        if self.too_small(task):
            sup, _, qry = prepare_task_features(task, ctx, self.params["normalize"])
            labels = task.support_labels.to(ctx.device).long()
            return vote(sup, labels, qry, task.n_way, UNREACHED_SIGMA).log_softmax(1).cpu()
        with self._few_threads(task, ctx):
            return self._predict(task, ctx)

    def too_small(self, task: Task) -> bool:
        """Whether the task's graph would have fewer than :data:`MIN_NODES_PER_CLASS` core nodes
        per class (only with ``k="auto"``: an explicit ``k`` always builds the graph)."""
        if self.params["k"] != "auto":
            return False
        n_unl = int(task.unlabeled.shape[0])
        n_core = task.n_support + n_unl
        if self._queries_in_graph(n_unl):
            n_core += int(task.query.shape[0])
        return n_core < MIN_NODES_PER_CLASS * task.n_way

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ graph
    def _queries_in_graph(self, n_unlabeled: int) -> bool:
        q = self.params.get("queries_in_graph", "auto")
        return n_unlabeled == 0 if q == "auto" else bool(q)

    def _graph(
        self,
        sup: torch.Tensor,
        background: torch.Tensor,
        out: torch.Tensor | None,
        ctx: TaskContext,
        n_way: int,
    ) -> Graph:
        p = self.params
        use_cache = p["graph_cache"] and background.shape[0] >= CACHE_MIN_NODES
        return build_block_graph(
            sup,
            background,
            out,
            k=graph_k(p["k"], sup.shape[0] + background.shape[0], n_way),
            metric=p["metric"],
            index=p["index"],
            nprobe=int(p["nprobe"]),
            weight=p["weight"],
            temperature=float(p["temperature"]),
            device=ctx.device,
            seed=0,  # the graph depends on the data only, so tasks share a cached background graph
            cache=default_cache() if use_cache else None,
            build=p["graph_build"],
        )

    def _task_graph(
        self, task: Task, ctx: TaskContext, *, with_queries: bool = True
    ) -> tuple[Graph, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Graph over ``[support, unlabeled, (queries)]``; query ``i`` is node ``n_s + n_u + i``."""
        sup, unl, qry = prepare_task_features(task, ctx, self.params["normalize"])
        n_way = task.n_way
        if not with_queries:
            return self._graph(sup, unl, None, ctx, n_way), sup, unl, qry
        if self._queries_in_graph(unl.shape[0]):
            return self._graph(sup, torch.cat([unl, qry]), None, ctx, n_way), sup, unl, qry
        return self._graph(sup, unl, qry, ctx, n_way), sup, unl, qry

    # ------------------------------------------------------------------ diffusion
    def _diffuse_kw(
        self, n_classes: int, device: torch.device, n_core: int | None = None, prior: Any = None
    ) -> dict[str, Any]:
        p = self.params
        return {
            "n_core": n_core,
            "norm": p["norm"],
            "prior": prior,
            "sinkhorn_iters": int(p["sinkhorn_iters"]),
            "gamma": p["gamma"],
            "class_batch": p["class_batch"],
        }

    def _class_prior(
        self, graph: Graph, nodes: torch.Tensor, task: Task, ctx: TaskContext
    ) -> torch.Tensor | None:
        """The class prior of the normalisation (``None``: uniform), scaled to mean 1.

        ``prior="auto"`` estimates it when the queries are graph nodes (a query set of unknown
        composition): the share of the graph's core nodes (``nodes``, in node order) that the
        support's eq. 5 vote on the features gives each class, plus one per class. With an
        unlabeled pool the queries are out-only nodes and the pool is taken as drawn evenly
        (equal masses): on Fashion-MNIST pixels the feature vote's class shares over 70 000
        nodes are biased enough to cost diffusion 4-5 points there."""
        prior = self.params.get("prior")
        if prior is None:
            return None
        if prior == "auto" and graph.n_core <= task.n_support + int(task.unlabeled.shape[0]):
            return None  # queries are not graph nodes: the pool is taken as drawn evenly
        if prior == "auto":
            labels = task.support_labels.to(ctx.device).long()
            votes = vote(
                nodes[: task.n_support], labels, nodes[: graph.n_core], task.n_way, UNREACHED_SIGMA
            )
            counts = torch.bincount(votes.argmax(1), minlength=task.n_way).float() + 1.0
        else:
            counts = torch.as_tensor(prior, dtype=torch.float32, device=ctx.device)
        return counts * (task.n_way / counts.sum().clamp_min(1e-12))

    def _folds(self, labels: torch.Tensor, ctx: TaskContext) -> list:
        return leave_some_out_folds(labels, int(self.params["n_folds"]), ctx.generator)

    def _diffusion_scores(
        self, graph: Graph, rows: torch.Tensor, task: Task, ctx: TaskContext, nodes: torch.Tensor
    ) -> torch.Tensor:
        """Log-probabilities of ``rows`` after diffusing from the support seeds (``nodes``: the
        graph's node features in node order, for ``prior="auto"``).

        ``n_iter="auto"``: validation and the final diffusion share one pass
        (:func:`~fewshot_bench.graph.diffusion.diffuse_select`).
        """
        p = self.params
        if p["alpha"] is not None:
            n_iter = None
            if p["spreading"] == "iterative":
                n_iter = int(p["max_iter"] if p["n_iter"] == "auto" else p["n_iter"])
            F = label_spreading(
                graph,
                np.arange(task.n_support),
                task.support_labels.cpu().numpy(),
                task.n_way,
                float(p["alpha"]),
                n_iter=n_iter,
            )
            self.last_n_iter = n_iter
            return scores_to_log_probs(F[rows.cpu()].to(ctx.device))
        W = graph.transition(ctx.device)
        seeds = torch.arange(task.n_support, device=ctx.device)
        labels = task.support_labels.to(ctx.device).long()
        prior = self._class_prior(graph, nodes, task, ctx)
        kw = self._diffuse_kw(task.n_way, W.device, graph.n_core, prior)
        kw.pop("class_batch")
        folds = self._folds(labels, ctx) if p["n_iter"] == "auto" else []
        if folds:
            n_iter, held_out_acc, L = diffuse_select(
                W,
                seeds,
                labels,
                task.n_way,
                folds,
                max_iter=int(p["max_iter"]),
                prefer=int(p["default_iter"]),
                rows=rows.to(ctx.device),
                **kw,
            )
            self.last_choice = "diffusion"
            sup = nodes[: task.n_support]
            if p.get("support_check") and feature_vote_accuracy(sup, labels, folds) >= float(
                held_out_acc[n_iter - 1]
            ):
                self.last_n_iter, self.last_choice = n_iter, "features"
                votes = vote(sup, labels, nodes[rows.to(nodes.device)], task.n_way, UNREACHED_SIGMA)
                return votes.log_softmax(1)
        else:
            n_iter = int(p["default_iter"] if p["n_iter"] == "auto" else p["n_iter"])
            L = diffuse(
                W,
                seeds,
                labels,
                task.n_way,
                n_iter,
                rows=rows.to(ctx.device),
                class_batch=p["class_batch"],
                **kw,
            )
        self.last_n_iter = n_iter
        return scores_to_log_probs(L)

    # ------------------------------------------------------------------ spectral
    def _spectral_embeddings(self, graph: Graph, ctx: TaskContext) -> torch.Tensor:
        """Embedding rows for every node of ``graph`` (core rows, then out-only rows)."""
        p = self.params
        emb = spectral_embedding(
            graph.core_adjacency(),
            int(p["n_eig"]),
            solver=p["solver"],
            tol=float(p["tol"]),
            device=ctx.device,
            generator=ctx.generator,
        )
        e = emb.embedding()
        if graph.n_out:
            e = torch.cat([e, extend_to_out_nodes(e, graph)])
        return e


class _DiffusionPropagator(GraphPropagation):
    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        graph, sup, unl, _ = self._task_graph(task, ctx, with_queries=False)
        rows = torch.arange(sup.shape[0], sup.shape[0] + unl.shape[0])
        return self._diffusion_scores(graph, rows, task, ctx, torch.cat([sup, unl]))


@register_method("diffusion")
class Diffusion(_DiffusionPropagator):
    """Douze et al. diffusion over support ∪ unlabeled; queries are out-only graph nodes.

    Parameters: graph (``k``, ``metric``, ``index``, ``nprobe``, ``weight``, ``temperature``
    (``weight="exp"`` only: edge weight ``exp((s - s_max) / temperature)``, a temperature that
    *divides* the similarity, 0.1), ``normalize``, ``queries_in_graph``, ``graph_cache``) and
    diffusion (``norm`` ∈ col/row/sinkhorn/none, ``n_iter`` int or "auto", ``max_iter``,
    ``default_iter``, ``n_folds``, ``gamma`` (Γ_r power), ``prior`` (class prior of the column
    or Sinkhorn normalisation: uniform if None, a list, or ``auto``: estimated per task by the
    support's vote on the graph's nodes), ``sinkhorn_iters``, ``class_batch``). Scores: log of the row-normalised
    query mass.
    """

    schema = {**GRAPH, **DIFFUSION}

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        graph, sup, unl, qry = self._task_graph(task, ctx)
        n0 = sup.shape[0] + unl.shape[0]
        rows = torch.arange(n0, n0 + qry.shape[0])
        scores = self._diffusion_scores(graph, rows, task, ctx, torch.cat([sup, unl, qry]))
        # a query in a component without any seed gets no mass (a uniform row): on small or
        # imbalanced graphs that is common, and a uniform guess is the worst answer; such
        # queries are scored by the support's eq. 5 vote on the features instead
        unreached = (scores.max(1).values - scores.min(1).values) <= 1e-6
        if bool(unreached.any()):
            labels = task.support_labels.to(ctx.device).long()
            votes = vote(sup, labels, qry[unreached], task.n_way, UNREACHED_SIGMA)
            scores[unreached] = votes.log_softmax(1).to(scores.dtype)
        return scores.cpu()


@register_method("diffusion-logreg")
class DiffusionLogreg(_DiffusionPropagator):
    """Late fusion ``a log p_logreg + (1-a) log p_diffusion`` (Douze et al.).

    ``mix``: ``a`` in [0, 1] or "auto" (grid ``0, 0.1, .., 1`` jointly with the iteration count,
    on held-out seeds; ``default_mix`` when the support cannot be split). ``l2``/``logreg_iter``:
    the logistic regression on support features. Other parameters as ``diffusion``.
    """

    schema = {
        **GRAPH,
        **DIFFUSION,
        **LOGREG,
        "mix": Param(
            "auto", "fusion weight a of the logistic regression, or auto", kind=float, low=0, high=1
        ),
        "default_mix": Param(0.5, "a when the support cannot be split for mix=auto", low=0, high=1),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["alpha"] is not None:
            raise ProtocolError(
                f"method {self.name!r}: parameter alpha (label spreading) is not supported by "
                "the late fusion; use -m diffusion:alpha=..."
            )

    def _logreg(self, x: torch.Tensor, y: torch.Tensor, n_way: int) -> torch.nn.Linear:
        return fit_weighted_logreg(
            x, y, n_way, l2=float(self.params["l2"]), max_iter=int(self.params["logreg_iter"])
        )

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        p = self.params
        graph, sup, unl, qry = self._task_graph(task, ctx)
        n0 = sup.shape[0] + unl.shape[0]
        W = graph.transition(ctx.device)
        seeds = torch.arange(sup.shape[0], device=ctx.device)
        labels = task.support_labels.to(ctx.device).long()
        prior = self._class_prior(graph, torch.cat([sup, unl, qry]), task, ctx)
        kw = self._diffuse_kw(task.n_way, W.device, graph.n_core, prior)
        grid = torch.linspace(0, 1, 11).tolist() if p["mix"] == "auto" else [float(p["mix"])]
        fixed_t = None if p["n_iter"] == "auto" else int(p["n_iter"])
        folds = self._folds(labels, ctx) if (len(grid) > 1 or fixed_t is None) else []
        if folds:
            max_t = fixed_t if fixed_t is not None else int(p["max_iter"])
            score = torch.zeros(max_t, len(grid))
            for fold in folds:
                tr, ho = fold.train.to(ctx.device), fold.held_out.to(ctx.device)
                lr = self._logreg(sup[tr], labels[tr], task.n_way)(sup[ho]).log_softmax(1)
                rec = diffuse(
                    W,
                    seeds[tr],
                    labels[tr],
                    task.n_way,
                    max_t,
                    rows=seeds[ho],
                    record_all=True,
                    **kw,
                )
                lp = scores_to_log_probs(rec.reshape(-1, task.n_way)).reshape(rec.shape)
                for j, a in enumerate(grid):
                    fused = a * lr.unsqueeze(0) + (1 - a) * lp  # [T, H, C]
                    score[:, j] += (fused.argmax(2) == labels[ho]).float().sum(1).cpu()
            # ties (frequent: few held-out seeds) go to the defaults' neighbourhood
            dt = (torch.arange(1, max_t + 1) - int(p["default_iter"])).abs().float()
            da = (torch.tensor(grid) - float(p["default_mix"])).abs() * 10
            score -= 1e-3 * (dt[:, None] + da[None, :])
            if fixed_t is not None:
                score[: fixed_t - 1] = -torch.inf
            flat = int(score.argmax())
            n_iter, a = flat // len(grid) + 1, grid[flat % len(grid)]
        else:
            n_iter = fixed_t if fixed_t is not None else int(p["default_iter"])
            a = grid[0] if len(grid) == 1 else float(p["default_mix"])
        self.last_n_iter, self.last_mix = n_iter, a
        rows = torch.arange(n0, n0 + qry.shape[0], device=ctx.device)
        lp = scores_to_log_probs(diffuse(W, seeds, labels, task.n_way, n_iter, rows=rows, **kw))
        lr = self._logreg(sup, labels, task.n_way)(qry).log_softmax(1)
        return (a * lr + (1 - a) * lp).cpu()


@register_method("spectral-propagation")
class SpectralPropagation(GraphPropagation):
    """Metric transfer eq. 6: spectral embedding of the kNN graph, then eq. 5 voting.

    Parameters: graph ones (as ``diffusion``; ``temperature`` divides the edge similarity)
    plus ``n_eig`` (η, 200: eigenpairs ``j = 2..min(η, n)`` of ``L_sym``, the trivial ``j = 1``
    excluded, so at most η - 1 embedding columns), ``vote_temperature`` (0.025: eq. 5 voting
    ``exp(cos / vote_temperature)`` on embedding rows, the paper's σ = 40), ``tol``
    (eigen-residual), ``solver`` (auto/dense/chebyshev/arpack), ``support_check`` (with ≥ 2
    shots per class the spectral vote is kept only when it beats the support's feature vote on
    held-out support items; on Omniglot's 5-shot shapes it did not, by 0.3-2 points). Queries
    are attached out-only (Nyström-style neighbour average) unless they are in the graph (see
    module docstring).
    """

    schema = {**GRAPH, **SPECTRAL}

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        graph, sup, unl, qry = self._task_graph(task, ctx)
        e = self._spectral_embeddings(graph, ctx)
        n_s, n0 = sup.shape[0], sup.shape[0] + unl.shape[0]
        labels = task.support_labels.to(ctx.device).long()
        if self.params["support_check"] and not self._spectral_wins(e[:n_s], sup, labels, ctx):
            self.last_choice = "features"
            return vote(sup, labels, qry, task.n_way, UNREACHED_SIGMA).cpu()
        self.last_choice = "spectral"
        return vote(e[:n_s], labels, e[n0 : n0 + qry.shape[0]], task.n_way, self._sigma()).cpu()

    def _spectral_wins(
        self, emb: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, ctx: TaskContext
    ) -> bool:
        """Whether the spectral vote classifies held-out support items (still graph nodes) more
        accurately than the feature vote, over :data:`CHECK_FOLDS` folds. A tie keeps the
        feature vote (the simpler model); a task with a 1-shot class has no folds and keeps the
        spectral vote."""
        folds = leave_some_out_folds(labels, CHECK_FOLDS, ctx.generator)
        if not folds:
            return True
        graph_acc = feature_vote_accuracy(emb, labels, folds, self._sigma())
        return graph_acc > feature_vote_accuracy(feats, labels, folds)

    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        graph, sup, unl, _ = self._task_graph(task, ctx, with_queries=False)
        e = self._spectral_embeddings(graph, ctx)
        n_s = sup.shape[0]
        labels = task.support_labels.to(ctx.device).long()
        return vote(e[:n_s], labels, e[n_s : n_s + unl.shape[0]], task.n_way, self._sigma())


@register_method("nn-propagation")
class NNPropagation(PropagationMethod):
    """Metric transfer eq. 5 on the features: ``z[u,c] = mean_{i∈c} exp(cos(x_i, x_u) / T)``
    with ``T = vote_temperature`` (0.05, the paper's σ = 20).

    With unlabeled data, the support first votes for the pool; pseudo-labels with α ≥
    ``min_alpha`` (``confidence_temperature``, ``k_per_class``, ``top_k`` as in
    :func:`confident_pseudo_labels`) join the support with weight α and all of them vote for
    each query. No graph and no query interaction: with an empty pool it is the plain
    (inductive) eq. 5 classifier.
    """

    rowwise_scorer = True
    schema = {
        "normalize": NORMALIZE,
        "vote_temperature": Param(
            0.05,
            "eq. 5 voting exp(cos / vote_temperature) (the paper's sigma = 20)",
            low=0,
            open_low=True,
        ),
        "use_unlabeled": Param(True, "let confident pseudo-labels of the pool vote too"),
        **CONFIDENCE,
    }

    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        sup, unl, _ = prepare_task_features(task, ctx, self.params["normalize"])
        labels = task.support_labels.to(ctx.device).long()
        return vote(sup, labels, unl, task.n_way, self._sigma())

    def fit_task(self, task: Task, ctx: TaskContext) -> Scorer:
        p = self.params
        f = feature_transform(task, p["normalize"], ctx.device)
        sup, unl = f(task.support), f(task.unlabeled.reshape(-1, task.support.shape[1]))
        labels = task.support_labels.to(ctx.device).long()
        x, y, w = sup, labels, None
        if p["use_unlabeled"] and unl.shape[0]:
            with self._few_threads(task, ctx):
                pl = select_pseudo_labels(vote(sup, labels, unl, task.n_way, self._sigma()), p)
            x = with_rows(sup, unl, pl.indices)
            y = torch.cat([labels, pl.labels])
            w = torch.cat([torch.ones(sup.shape[0], device=ctx.device), pl.alpha])
        voters = Voters(x, y, task.n_way, self._sigma(), weights=w)
        return lambda query: voters(f(query))


def with_rows(head: torch.Tensor, pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``torch.cat([head, pool[rows]])`` written straight into one new tensor: the selected rows
    (up to a whole 60 000-item pool) are not first gathered into a copy of their own."""
    if head.dtype != pool.dtype or head.device != pool.device or head.shape[1:] != pool.shape[1:]:
        return torch.cat([head, pool[rows]])
    out = torch.empty(
        (head.shape[0] + rows.numel(), *pool.shape[1:]), dtype=pool.dtype, device=pool.device
    )
    out[: head.shape[0]] = head
    torch.index_select(pool, 0, rows.to(pool.device), out=out[head.shape[0] :])
    return out


def select_pseudo_labels(scores: torch.Tensor, p: dict[str, Any]) -> PseudoLabels:
    """Confident pseudo-labels of ``scores`` under a method's ``top_k``, ``k_per_class``,
    ``min_alpha`` and ``confidence_temperature`` parameters (:data:`CONFIDENCE`)."""
    return confident_pseudo_labels(
        scores,
        k=p.get("top_k"),
        k_per_class=p.get("k_per_class"),
        min_alpha=float(p["min_alpha"]),
        tau=float(p["confidence_temperature"]),
    )


PROPAGATORS: dict[str, type[PropagationMethod]] = {
    "diffusion": Diffusion,
    "spectral": SpectralPropagation,
    "nn": NNPropagation,
}

#: What a pipeline that propagates to its unlabeled pool (propagation-classifier,
#: propagation-finetune) accepts besides its own parameters.
PROPAGATOR: Schema = {
    **GRAPH,
    **DIFFUSION,
    **SPECTRAL,
    **CONFIDENCE,
    "propagator": Param(
        "diffusion", "how the unlabeled pool gets its pseudo-labels", choices=tuple(PROPAGATORS)
    ),
    "vote_temperature": Param(
        None,
        "eq. 5 voting temperature of the spectral / nn propagator (none: its default, 0.025 / 0.05)",
        kind=float,
        low=0,
        open_low=True,
        group="spectral",
    ),
}


def make_propagator(params: dict[str, Any]) -> PropagationMethod:
    """The propagation method named by ``params["propagator"]``, built from the entries of
    ``params`` it accepts (``vote_temperature`` None: the propagator's default)."""
    cls = PROPAGATORS[params["propagator"]]
    kwargs = {k: v for k, v in params.items() if k in cls.schema and v is not None}
    return cls(**kwargs)


@register_method("propagation-classifier")
class PropagationClassifier(PropagationMethod):
    """Metric transfer pipeline: propagate to the unlabeled pool, then the eq. 10 classifier.

    ``propagator``: "diffusion" | "spectral" | "nn" (its parameters are accepted here too);
    pseudo-labels: ``confidence_temperature``, ``min_alpha`` (0.01), ``k_per_class``, ``top_k``;
    classifier: ``l2``, ``logreg_iter``. Loss ``-(1/N) Σ α_i log p(ŷ_i)`` with α = 1 for the
    support. Queries are scored by the classifier one at a time (they never enter the graph).
    """

    rowwise_scorer = True
    schema = {**PROPAGATOR, **LOGREG}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        #: the last task's pseudo-labels (indices into task.unlabeled, labels, α), for inspection
        self.last_pseudo_labels: PseudoLabels | None = None

    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        return make_propagator(self.params).propagate_unlabeled(task, ctx)

    def fit_task(self, task: Task, ctx: TaskContext) -> Scorer:
        p = self.params
        f = feature_transform(task, p["normalize"], ctx.device)
        sup, unl = f(task.support), f(task.unlabeled.reshape(-1, task.support.shape[1]))
        labels = task.support_labels.to(ctx.device).long()
        x, y, w = sup, labels, torch.ones(sup.shape[0], device=ctx.device)
        with self._few_threads(task, ctx):
            if unl.shape[0]:
                pl = select_pseudo_labels(self.propagate_unlabeled(task, ctx).to(ctx.device), p)
                self.last_pseudo_labels = pl
                x = with_rows(sup, unl, pl.indices)
                y = torch.cat([labels, pl.labels])
                w = torch.cat([w, pl.alpha])
            clf = fit_weighted_logreg(
                x, y, task.n_way, w, l2=float(p["l2"]), max_iter=int(p["logreg_iter"])
            )
        return lambda query: clf(f(query)).log_softmax(1)


def pseudo_label_unlabeled(
    task: Task,
    ctx: TaskContext,
    *,
    propagator: str = "diffusion",
    k: int | None = None,
    k_per_class: int | None = None,
    min_alpha: float = 0.01,
    confidence_temperature: float = 1.0,
    **params: Any,
) -> PseudoLabels:
    """Top confident pseudo-labels for ``task.unlabeled``, for use by other methods.

    ``propagator`` ∈ {"diffusion", "spectral", "nn"}; ``params`` are that method's parameters.
    Returns indices into ``task.unlabeled``, predicted episode labels and α, sorted by α.
    """
    if propagator not in PROPAGATORS:
        raise ProtocolError(f"propagator must be one of {sorted(PROPAGATORS)}, not {propagator!r}")
    if task.unlabeled.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return PseudoLabels(empty, empty, torch.zeros(0))
    n = task.n_support + int(task.unlabeled.shape[0])
    with few_threads(ctx.device.type == "cpu" and n <= SMALL_PROBLEM_NODES):
        scores = PROPAGATORS[propagator](**params).propagate_unlabeled(task, ctx)
    return confident_pseudo_labels(
        scores, k=k, k_per_class=k_per_class, min_alpha=min_alpha, tau=confidence_temperature
    )


__all__ = [
    "PROPAGATOR",
    "Diffusion",
    "DiffusionLogreg",
    "NNPropagation",
    "PropagationClassifier",
    "SpectralPropagation",
    "make_propagator",
    "prepare_task_features",
    "pseudo_label_unlabeled",
    "select_pseudo_labels",
]
