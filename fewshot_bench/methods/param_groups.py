"""Parameter groups shared by several methods (graph, diffusion, spectral, confidence, training).

Each name has one meaning wherever it appears. Temperatures always divide: the graph's edge
kernel ``exp((s - s_max) / temperature)``, eq. 5 voting ``exp(cos / vote_temperature)``, the
eq. 8 confidence ``softmax(z / confidence_temperature)``.
"""

from __future__ import annotations

from fewshot_bench.choices import ARCHS
from fewshot_bench.graph.diffusion import NORMS
from fewshot_bench.graph.knn import INDEXES, METRICS
from fewshot_bench.graph.spectral import SOLVERS
from fewshot_bench.methods.params import Param, Schema, grouped

NORMALIZE = Param(
    "l2",
    "feature normalisation: l2, center-l2 (subtract the mean of support and unlabeled items, "
    "never of the queries, then l2) or none",
    choices=("l2", "center-l2", "none"),
)

GRAPH: Schema = grouped(
    "graph",
    {
        "normalize": NORMALIZE,
        "k": Param(
            "auto",
            "neighbours per node of the kNN graph, or auto: min(10, core nodes per class - 1)",
            kind=int,
            low=1,
        ),
        "metric": Param("cosine", "similarity of the kNN search", choices=METRICS),
        "index": Param("auto", "faiss index: flat (exact), ivf, hnsw or auto", choices=INDEXES),
        "nprobe": Param(8, "IVF cells searched per query", low=1),
        "weight": Param(
            "binary",
            "edge weight: binary (Douze) or exp (metric transfer)",
            choices=("binary", "exp"),
        ),
        "temperature": Param(
            0.1,
            "edge kernel temperature (weight=exp): exp((s - s_max) / temperature)",
            low=0,
            open_low=True,
        ),
        "queries_in_graph": Param(
            "auto",
            "queries as ordinary graph nodes (True), out-only nodes (False) or auto (in the graph "
            "only when the task has no unlabeled pool)",
            kind=None,
            choices=("auto", True, False),
        ),
        "graph_cache": Param(
            True,
            "keep kNN graphs of large pools for the next task holding the same items (in the "
            "worker's memory, and its private folder when $FSBENCH_CACHE is set); a graph never "
            "depends on whether it was cached",
        ),
        "graph_build": Param(
            "union",
            "union: one kNN graph over support + pool (shared by tasks that label other items of "
            "the same pool); block: Douze et al.'s offline graph of the pool alone, the support "
            "and queries searched in it online (shared by tasks with the same pool)",
            choices=("union", "block"),
        ),
        "support_check": Param(
            True,
            "with >= 2 shots per class, keep the graph's answer (diffusion, spectral) only if it "
            "beats the support's feature vote on held-out support items; else the feature vote",
        ),
    },
)

DIFFUSION: Schema = grouped(
    "diffusion",
    {
        "norm": Param("col", "normalisation of the label matrix per step", choices=NORMS),
        "n_iter": Param(
            "auto", "diffusion steps, or auto (chosen on held-out support items)", kind=int, low=1
        ),
        "max_iter": Param(10, "largest step count n_iter=auto considers", low=1),
        "default_iter": Param(3, "steps when the support cannot be split for n_iter=auto", low=1),
        "n_folds": Param(3, "held-out folds of the support for n_iter=auto", low=1),
        "gamma": Param(
            None,
            "power of the class-mass normalisation (none: off)",
            kind=float,
            low=0,
            open_low=True,
        ),
        "prior": Param(
            "auto",
            "class prior of the col / sinkhorn normalisation: auto (estimated per task: the "
            "support's vote over the graph's nodes), none (uniform, Douze et al.) or a list",
            kind=list,
            item=float,
            low=0,
            auto=True,
            optional=True,
        ),
        "sinkhorn_iters": Param(5, "Sinkhorn iterations (norm=sinkhorn)", low=1),
        "class_batch": Param(None, "classes diffused at once (none: all)", kind=int, low=1),
        "alpha": Param(
            None,
            "label spreading with persistence (Zhou et al. 2004): F <- alpha S F + (1-alpha) Y "
            "instead of Douze diffusion; none: off",
            kind=float,
            low=0,
            high=1,
            open_low=True,
            open_high=True,
        ),
        "spreading": Param(
            "closed",
            "label spreading solver: closed form (sparse LU) or iterative (n_iter steps; auto: "
            "max_iter)",
            choices=("closed", "iterative"),
        ),
    },
)

SPECTRAL: Schema = grouped(
    "spectral",
    {
        "n_eig": Param(200, "eta: eigenpairs 2..eta of L_sym (the trivial one excluded)", low=2),
        "vote_temperature": Param(
            0.025,
            "eq. 5 voting exp(cos / vote_temperature) (the paper's sigma = 40)",
            low=0,
            open_low=True,
        ),
        "tol": Param(1e-3, "eigen-residual tolerance", low=0, open_low=True),
        "solver": Param("auto", "eigensolver", choices=SOLVERS),
    },
)

CONFIDENCE: Schema = grouped(
    "confidence",
    {
        "confidence_temperature": Param(
            1.0, "eq. 8 confidence softmax(z / confidence_temperature)", low=0, open_low=True
        ),
        "min_alpha": Param(
            0.01, "pseudo-labels with confidence below this are dropped", low=0, high=1
        ),
        "k_per_class": Param(
            None, "keep at most this many pseudo-labels per class", kind=int, low=1
        ),
        "top_k": Param(None, "keep at most this many pseudo-labels in all", kind=int, low=1),
    },
)

LOGREG: Schema = grouped(
    "classifier",
    {
        "l2": Param(1e-3, "L2 penalty on the weights", low=0),
        "logreg_iter": Param(100, "optimiser iterations", low=1),
    },
)


def training(*, steps: int, lr: float | None = None, amp: bool = True) -> Schema:
    """What every image-trained method has: architecture, steps, learning rate, start, AMP."""
    params = {
        "arch": Param("conv4", "backbone architecture", choices=ARCHS),
        "steps": Param(steps, "training steps when the runner gives no --budget", low=0),
    }
    if lr is not None:
        params["lr"] = Param(lr, "learning rate (Adam)", low=0, open_low=True)
    params["init"] = Param(
        "", "checkpoint to start from (fsbench pretrain / a saved state; loaded weights-only)"
    )
    if amp:
        params["amp"] = Param(True, "mixed precision on CUDA (bfloat16 autocast)")
    return grouped("training", params)
