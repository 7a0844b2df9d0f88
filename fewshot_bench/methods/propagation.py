"""Label propagation methods from the two papers, on faiss kNN graphs (CPU or CUDA).

Registered methods (all consume ``features``, setting ``semi-supervised``):

- ``nn-propagation``: metric transfer eq. 5 -- support votes for the unlabeled pool, confident
  pseudo-labels (α ≥ ``min_alpha``) join the support, weighted by α, to vote for the queries.
- ``spectral-propagation``: eq. 6 -- spectral embedding of the kNN graph of support ∪ unlabeled
  (eigenpairs 2..η of ``L_sym``, η = ``n_eig``, the trivial one excluded, ``1/λ`` weighting),
  queries attached as out-only nodes, eq. 5 voting with inverse temperature ``sigma``
  (``exp(sigma * cos)``; the graph's ``temperature`` instead divides: ``exp(s / temperature)``).
- ``diffusion``: Douze et al. -- ``L <- η(W L)`` from the support seeds over support ∪ unlabeled,
  queries as out-only nodes (incoming edges only); iteration count chosen on held-out seeds.
- ``diffusion-logreg``: late fusion ``a log p_logreg + (1-a) log p_diffusion``; ``a`` (and the
  iteration count) chosen on held-out seeds.
- ``propagation-classifier``: propagate to the unlabeled pool (diffusion, spectral or nn),
  keep confident pseudo-labels, train the eq. 10 confidence-weighted logistic regression on
  support + pseudo-labels, classify the queries with it (queries never enter the graph).

Transductive fallback, stated honestly: with ``queries_in_graph="auto"`` (default) and an
*empty* unlabeled pool, the graph-based methods put the queries into the graph as ordinary
nodes (support ∪ query graph) -- that run is transductive, not semi-supervised.
``queries_in_graph=False`` keeps queries out-only always; ``True`` always puts them in.
``propagation-classifier`` with no unlabeled data reduces to logistic regression on the support.

Validation (``n_iter="auto"``, ``mix="auto"``): leave-some-out over the support -- each of
``n_folds`` random folds holds out one seed per class, diffuses from the rest and scores the
held-out seeds (still graph nodes, now unlabeled); ties go to the defaults. It needs ≥ 2 shots
in every class; otherwise the defaults (``default_iter`` = 3, ``default_mix`` = 0.5) are used.
``diffusion`` runs the folds and the final diffusion as column groups of one pass
(``class_batch`` then only applies when the widened matrix would not fit 1 GiB).

Defaults: ``k = 10`` neighbours (Douze et al. use 30 at ImageNet scale; pass ``k=30`` there),
cosine similarity on L2-normalised features, exact search up to ~14k points, IVF beyond, and
background sets of ≥ 20k points cached (``$FSBENCH_GRAPH_CACHE`` or ``$FSBENCH_CACHE/graphs``
on disk, the last two in memory) so tasks sharing an unlabeled pool build ``W_BB`` once.
Small CPU tasks (≤ 5000 nodes) run single-threaded, which is faster for episode-sized work.

Other methods can reuse the propagation through :func:`pseudo_label_unlabeled` (top-k most
confident pseudo-labels of ``task.unlabeled``, with their α).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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
from fewshot_bench.graph.spectral import extend_to_out_nodes, spectral_embedding, vote
from fewshot_bench.graph.threads import SMALL_PROBLEM_NODES, few_threads
from fewshot_bench.methods.base import Method, TaskContext
from fewshot_bench.methods.registry import register_method
from fewshot_bench.tasks.task import Task

#: Background sets at least this large go through the background-graph cache.
CACHE_MIN_NODES = 20000

GRAPH_DEFAULTS: dict[str, Any] = {
    "normalize": "l2",  # "l2" | "center-l2" (mean of support ∪ unlabeled, never queries) | "none"
    "k": 10,
    "metric": "cosine",
    "index": "auto",
    "nprobe": 8,
    "weight": "binary",
    "temperature": 0.1,
    "queries_in_graph": "auto",
    "graph_cache": True,
}
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "norm": "col",
    "n_iter": "auto",
    "max_iter": 10,
    "default_iter": 3,
    "n_folds": 3,
    "gamma": None,
    "prior": None,
    "sinkhorn_iters": 5,
    "class_batch": None,
}
SPECTRAL_DEFAULTS: dict[str, Any] = {"n_eig": 200, "sigma": 40.0, "tol": 1e-3, "solver": "auto"}
CONFIDENCE_DEFAULTS: dict[str, Any] = {
    "tau": 1.0,
    "min_alpha": 0.01,
    "k_per_class": None,
    "top_k": None,
}


def prepare_task_features(
    task: Task, ctx: TaskContext, normalize: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support, unlabeled and query features as float32 on ``ctx.device``, normalised."""
    if task.kind != "features":
        raise ProtocolError("propagation methods consume features; run them on a feature protocol")
    sup, unl, qry = (
        t.to(ctx.device, torch.float32) for t in (task.support, task.unlabeled, task.query)
    )
    unl = unl.reshape(-1, sup.shape[1]) if unl.numel() == 0 else unl
    if normalize == "center-l2":
        mean = torch.cat([sup, unl]).mean(0, keepdim=True)
        sup, unl, qry = sup - mean, unl - mean, qry - mean
    if normalize in ("l2", "center-l2"):
        sup, unl, qry = (F.normalize(t, dim=1) for t in (sup, unl, qry))
    elif normalize != "none":
        raise ProtocolError(f"normalize must be 'l2', 'center-l2' or 'none', not {normalize!r}")
    return sup, unl, qry


class PropagationMethod(Method):
    """Shared machinery (graph building, diffusion, spectral, voting); not registered itself."""

    consumes = "features"
    setting = "semi-supervised"
    defaults: dict[str, Any] = {}

    def predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        """Scores ``[n_query, n_way]``; small CPU tasks run single-threaded (see ``graph.threads``)."""
        n = task.n_support + int(task.unlabeled.shape[0]) + int(task.query.shape[0])
        with few_threads(ctx.device.type == "cpu" and n <= SMALL_PROBLEM_NODES):
            return self._predict(task, ctx)

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        raise NotImplementedError

    def task_setting(self, task: Task) -> str:
        """``transductive`` when the queries join the graph (no unlabeled pool, by default)."""
        if "queries_in_graph" in self.params and self._queries_in_graph(
            int(task.unlabeled.shape[0])
        ):
            return "transductive"
        return self.setting

    # ------------------------------------------------------------------ graph
    def _queries_in_graph(self, n_unlabeled: int) -> bool:
        q = self.params.get("queries_in_graph", "auto")
        q = q.lower() if isinstance(q, str) else q
        if q == "auto":
            return n_unlabeled == 0
        if q in (True, False, "true", "false", 1, 0):
            return q in (True, "true", 1)
        raise ProtocolError(f"queries_in_graph must be 'auto', True or False, not {q!r}")

    def _graph(
        self,
        sup: torch.Tensor,
        background: torch.Tensor,
        out: torch.Tensor | None,
        ctx: TaskContext,
    ) -> Graph:
        p = self.params
        use_cache = p.get("graph_cache", True) and background.shape[0] >= CACHE_MIN_NODES
        return build_block_graph(
            sup,
            background,
            out,
            k=int(p["k"]),
            metric=p["metric"],
            index=p["index"],
            nprobe=int(p["nprobe"]),
            weight=p["weight"],
            temperature=float(p["temperature"]),
            device=ctx.device,
            seed=0,  # the graph depends on the data only, so tasks share a cached background graph
            cache=default_cache() if use_cache else None,
        )

    def _task_graph(
        self, task: Task, ctx: TaskContext, *, with_queries: bool = True
    ) -> tuple[Graph, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Graph over ``[support, unlabeled, (queries)]``; query ``i`` is node ``n_s + n_u + i``."""
        sup, unl, qry = prepare_task_features(task, ctx, self.params["normalize"])
        if not with_queries:
            return self._graph(sup, unl, None, ctx), sup, unl, qry
        if self._queries_in_graph(unl.shape[0]):
            return self._graph(sup, torch.cat([unl, qry]), None, ctx), sup, unl, qry
        return self._graph(sup, unl, qry, ctx), sup, unl, qry

    # ------------------------------------------------------------------ diffusion
    def _diffuse_kw(
        self, n_classes: int, device: torch.device, n_core: int | None = None
    ) -> dict[str, Any]:
        p = self.params
        prior = p.get("prior")
        return {
            "n_core": n_core,
            "norm": p["norm"],
            "prior": None
            if prior is None
            else torch.as_tensor(prior, dtype=torch.float32, device=device),
            "sinkhorn_iters": int(p["sinkhorn_iters"]),
            "gamma": p["gamma"],
            "class_batch": p["class_batch"],
        }

    def _folds(self, labels: torch.Tensor, ctx: TaskContext) -> list:
        return leave_some_out_folds(labels, int(self.params["n_folds"]), ctx.generator)

    def _diffusion_scores(
        self, graph: Graph, rows: torch.Tensor, task: Task, ctx: TaskContext
    ) -> torch.Tensor:
        """Log-probabilities of ``rows`` after diffusing from the support seeds.

        ``n_iter="auto"``: validation and the final diffusion share one pass
        (:func:`~fewshot_bench.graph.diffusion.diffuse_select`).
        """
        p = self.params
        W = graph.transition(ctx.device)
        seeds = torch.arange(task.n_support, device=ctx.device)
        labels = task.support_labels.to(ctx.device).long()
        kw = self._diffuse_kw(task.n_way, W.device, graph.n_core)
        kw.pop("class_batch")
        folds = self._folds(labels, ctx) if p["n_iter"] == "auto" else []
        if folds:
            n_iter, _, L = diffuse_select(
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

    # ------------------------------------------------------------------ unlabeled pool
    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        """Log-scores ``[n_unlabeled, n_way]`` this method's propagation gives the unlabeled pool."""
        raise NotImplementedError


class _DiffusionPropagator(PropagationMethod):
    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        graph, sup, unl, _ = self._task_graph(task, ctx, with_queries=False)
        rows = torch.arange(sup.shape[0], sup.shape[0] + unl.shape[0])
        return self._diffusion_scores(graph, rows, task, ctx)


@register_method("diffusion")
class Diffusion(_DiffusionPropagator):
    """Douze et al. diffusion over support ∪ unlabeled; queries are out-only graph nodes.

    Parameters: graph (``k``, ``metric``, ``index``, ``nprobe``, ``weight``, ``temperature``
    (``weight="exp"`` only: edge weight ``exp((s - s_max) / temperature)``, a temperature that
    *divides* the similarity, 0.1), ``normalize``, ``queries_in_graph``, ``graph_cache``) and
    diffusion (``norm`` ∈ col/row/sinkhorn/none, ``n_iter`` int or "auto", ``max_iter``,
    ``default_iter``, ``n_folds``, ``gamma`` (Γ_r power), ``prior`` (Sinkhorn class prior,
    uniform if None), ``sinkhorn_iters``, ``class_batch``). Scores: log of the row-normalised
    query mass.
    """

    defaults = {**GRAPH_DEFAULTS, **DIFFUSION_DEFAULTS}

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        graph, sup, unl, qry = self._task_graph(task, ctx)
        n0 = sup.shape[0] + unl.shape[0]
        rows = torch.arange(n0, n0 + qry.shape[0])
        return self._diffusion_scores(graph, rows, task, ctx).cpu()


@register_method("diffusion-logreg")
class DiffusionLogreg(_DiffusionPropagator):
    """Late fusion ``a log p_logreg + (1-a) log p_diffusion`` (Douze et al.).

    ``mix``: ``a`` in [0, 1] or "auto" (grid ``0, 0.1, .., 1`` jointly with the iteration count,
    on held-out seeds; ``default_mix`` when the support cannot be split). ``l2``/``logreg_iter``:
    the logistic regression on support features. Other parameters as ``diffusion``.
    """

    defaults = {
        **GRAPH_DEFAULTS,
        **DIFFUSION_DEFAULTS,
        "mix": "auto",
        "default_mix": 0.5,
        "l2": 1e-3,
        "logreg_iter": 100,
    }

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
        kw = self._diffuse_kw(task.n_way, W.device, graph.n_core)
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
class SpectralPropagation(PropagationMethod):
    """Metric transfer eq. 6: spectral embedding of the kNN graph, then eq. 5 voting.

    Parameters: graph ones (as ``diffusion``; ``temperature`` divides the edge similarity)
    plus ``n_eig`` (η, 200: eigenpairs ``j = 2..min(η, n)`` of ``L_sym``, the trivial ``j = 1``
    excluded, so at most η - 1 embedding columns), ``sigma`` (σ, 40: an *inverse* temperature
    that multiplies the cosine of embedding rows in the eq. 5 exponential, ``exp(σ cos)``, as in
    the paper), ``tol`` (eigen-residual), ``solver`` (auto/dense/chebyshev/arpack). Queries are
    attached out-only (Nyström-style neighbour average) unless they are in the graph (see
    module docstring).
    """

    defaults = {**GRAPH_DEFAULTS, **SPECTRAL_DEFAULTS}

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        graph, sup, unl, qry = self._task_graph(task, ctx)
        e = self._spectral_embeddings(graph, ctx)
        n_s, n0 = sup.shape[0], sup.shape[0] + unl.shape[0]
        labels = task.support_labels.to(ctx.device).long()
        return vote(
            e[:n_s], labels, e[n0 : n0 + qry.shape[0]], task.n_way, float(self.params["sigma"])
        ).cpu()

    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        graph, sup, unl, _ = self._task_graph(task, ctx, with_queries=False)
        e = self._spectral_embeddings(graph, ctx)
        n_s = sup.shape[0]
        labels = task.support_labels.to(ctx.device).long()
        return vote(
            e[:n_s], labels, e[n_s : n_s + unl.shape[0]], task.n_way, float(self.params["sigma"])
        )


@register_method("nn-propagation")
class NNPropagation(PropagationMethod):
    """Metric transfer eq. 5 on the features: ``z[u,c] = mean_{i∈c} exp(sigma * cos(x_i, x_u))``.

    ``sigma`` multiplies the cosine (an inverse temperature, 20 here); ``tau`` divides the
    scores in the eq. 8 confidence softmax ``softmax(z / τ)``.

    With unlabeled data, the support first votes for the pool; pseudo-labels with α ≥
    ``min_alpha`` (``tau``, ``k_per_class``, ``top_k`` as in :func:`confident_pseudo_labels`) join
    the support with weight α and all of them vote for the queries. No graph and no query
    interaction: with an empty pool it is the plain (inductive) eq. 5 classifier.
    """

    defaults = {"normalize": "l2", "sigma": 20.0, "use_unlabeled": True, **CONFIDENCE_DEFAULTS}

    def task_setting(self, task: Task) -> str:
        return self.setting if task.unlabeled.shape[0] else "inductive"

    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        sup, unl, _ = prepare_task_features(task, ctx, self.params["normalize"])
        labels = task.support_labels.to(ctx.device).long()
        return vote(sup, labels, unl, task.n_way, float(self.params["sigma"]))

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        p = self.params
        sup, unl, qry = prepare_task_features(task, ctx, p["normalize"])
        labels = task.support_labels.to(ctx.device).long()
        sigma = float(p["sigma"])
        if not p["use_unlabeled"] or unl.shape[0] == 0:
            return vote(sup, labels, qry, task.n_way, sigma).cpu()
        pl = select_pseudo_labels(vote(sup, labels, unl, task.n_way, sigma), p)
        x = torch.cat([sup, unl[pl.indices]])
        y = torch.cat([labels, pl.labels])
        w = torch.cat([torch.ones(sup.shape[0], device=ctx.device), pl.alpha])
        return vote(x, y, qry, task.n_way, sigma, weights=w).cpu()


def select_pseudo_labels(scores: torch.Tensor, p: dict[str, Any]) -> PseudoLabels:
    """Confident pseudo-labels of ``scores`` under a method's ``top_k``, ``k_per_class``,
    ``min_alpha`` and ``tau`` parameters (:data:`CONFIDENCE_DEFAULTS`)."""
    return confident_pseudo_labels(
        scores,
        k=p.get("top_k"),
        k_per_class=p.get("k_per_class"),
        min_alpha=float(p["min_alpha"]),
        tau=float(p["tau"]),
    )


PROPAGATORS: dict[str, type[PropagationMethod]] = {
    "diffusion": Diffusion,
    "spectral": SpectralPropagation,
    "nn": NNPropagation,
}


def make_propagator(params: dict[str, Any]) -> PropagationMethod:
    """The propagation method named by ``params["propagator"]`` ("diffusion" | "spectral" |
    "nn"), built from the entries of ``params`` it accepts (``nn_sigma`` as the NN ``sigma``)."""
    name = params["propagator"]
    if name not in PROPAGATORS:
        raise ProtocolError(f"propagator must be one of {sorted(PROPAGATORS)}, not {name!r}")
    cls = PROPAGATORS[name]
    kwargs = {k: v for k, v in params.items() if k in cls.defaults}
    if name == "nn":
        kwargs["sigma"] = params["nn_sigma"]
    return cls(**kwargs)


@register_method("propagation-classifier")
class PropagationClassifier(PropagationMethod):
    """Metric transfer pipeline: propagate to the unlabeled pool, then the eq. 10 classifier.

    ``propagator``: "diffusion" | "spectral" | "nn" (its parameters are accepted here too;
    ``sigma``/``nn_sigma`` multiply the cosine in eq. 5, ``temperature`` divides the edge
    similarity); pseudo-labels: ``tau`` (divides: ``softmax(z / τ)``), ``min_alpha`` (0.01),
    ``k_per_class``, ``top_k``; classifier: ``l2``, ``logreg_iter``. Loss
    ``-(1/N) Σ α_i log p(ŷ_i)`` with α = 1 for the support. Queries are scored by the
    classifier only (inductive with respect to the queries).
    """

    defaults = {
        **GRAPH_DEFAULTS,
        **DIFFUSION_DEFAULTS,
        **SPECTRAL_DEFAULTS,
        **CONFIDENCE_DEFAULTS,
        "propagator": "diffusion",
        "nn_sigma": 20.0,
        "l2": 1e-3,
        "logreg_iter": 100,
    }

    def task_setting(self, task: Task) -> str:
        """Queries never enter the graph; with no unlabeled pool this is plain (inductive) eq. 10."""
        return self.setting if task.unlabeled.shape[0] else "inductive"

    def _propagator(self) -> PropagationMethod:
        return make_propagator(self.params)

    def propagate_unlabeled(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        return self._propagator().propagate_unlabeled(task, ctx)

    def _predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        p = self.params
        sup, unl, qry = prepare_task_features(task, ctx, p["normalize"])
        labels = task.support_labels.to(ctx.device).long()
        x, y, w = sup, labels, torch.ones(sup.shape[0], device=ctx.device)
        if unl.shape[0]:
            pl = select_pseudo_labels(self.propagate_unlabeled(task, ctx).to(ctx.device), p)
            self.last_pseudo_labels = pl
            x = torch.cat([sup, unl[pl.indices]])
            y = torch.cat([labels, pl.labels])
            w = torch.cat([w, pl.alpha])
        clf = fit_weighted_logreg(
            x, y, task.n_way, w, l2=float(p["l2"]), max_iter=int(p["logreg_iter"])
        )
        return clf(qry).log_softmax(1).cpu()


def pseudo_label_unlabeled(
    task: Task,
    ctx: TaskContext,
    *,
    propagator: str = "diffusion",
    k: int | None = None,
    k_per_class: int | None = None,
    min_alpha: float = 0.01,
    tau: float = 1.0,
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
        scores, k=k, k_per_class=k_per_class, min_alpha=min_alpha, tau=tau
    )


__all__ = [
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
