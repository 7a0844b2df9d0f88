"""Plugin methods the runner tests load with ``--plugin`` / ``plugins=``: they run in the worker."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from fewshot_bench.methods import Method, register_method
from fewshot_bench.methods.params import Param
from fewshot_bench.methods.simple import NearestPrototype


@register_method("inspector")
class Inspector(Method):
    """Fails (so the run fails) if a Task carries more than it should or arrives in class order."""

    consumes = "features"
    setting = "semi-supervised"

    def predict(self, task, ctx):
        assert set(vars(task)) == {
            "support",
            "support_labels",
            "unlabeled",
            "query",
            "n_way",
            "kind",
        }
        assert set(vars(ctx)) == {"device", "seed", "generator", "rng"}
        assert (
            sorted(task.support_labels.tolist())
            == list(range(task.n_way)) * (len(task.support_labels) // task.n_way)
            or len(set(task.support_labels.tolist())) == task.n_way
        )
        # the tensors are copies: no view into the pool through which other items could be reached
        for t in (task.support, task.query, task.unlabeled):
            assert t._base is None and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return torch.zeros(task.query.shape[0], task.n_way)

    def predict_batch(self, tasks, ctxs):
        # over a batch of episodes, support labels must not always come in class order
        in_order = [t.support_labels.tolist() == sorted(t.support_labels.tolist()) for t in tasks]
        assert len(tasks) < 8 or not all(in_order), "support items arrive in class order"
        return [self.predict(t, c) for t, c in zip(tasks, ctxs, strict=True)]


@register_method("slow-prototype")
class SlowPrototype(NearestPrototype):
    """Nearest prototype that sleeps ``$FSBENCH_TEST_DELAY`` seconds per batch."""

    def fit_tasks(self, tasks, ctxs):
        time.sleep(float(os.environ.get("FSBENCH_TEST_DELAY", "0")))
        return super().fit_tasks(tasks, ctxs)


@register_method("file-scaled")
class FileScaled(NearestPrototype):
    """Nearest prototype whose parameter names a file (like ``init=`` of trained methods)."""

    schema = {**NearestPrototype.schema, "weights": Param("", "a file holding a scale")}

    def fit_tasks(self, tasks, ctxs):
        scale = float(Path(self.params["weights"]).read_text()) if self.params["weights"] else 1.0
        scorers = super().fit_tasks(tasks, ctxs)
        return [lambda q, s=s: s(q) * scale for s in scorers]


@register_method("contract-probe")
class ContractProbe(Method):
    """Reports what each call held: scores ``[queries in the call, unlabeled items, on the
    task's device]`` per query (``setting`` chooses what the runner gives it)."""

    consumes = "features"
    schema = {
        "setting": Param(
            "inductive", "what to ask for", choices=("inductive", "semi-supervised", "transductive")
        ),
        "bad_shape": Param(False, "return two rows per query (a broken scorer)"),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.setting = self.params["setting"]

    def _report(self, task, query, ctx):
        on_device = all(t.device == ctx.device for t in (task.support, task.unlabeled, query))
        row = torch.tensor(
            [float(query.shape[0]), float(task.unlabeled.shape[0]), float(on_device)]
        )
        rows = 2 if self.params["bad_shape"] else query.shape[0]
        return row.repeat(rows, 1)

    def fit_task(self, task, ctx):
        assert task.query.shape[0] == 0  # adaptation never sees a query
        return lambda query: self._report(task, query, ctx)

    def predict(self, task, ctx):
        return self._report(task, task.query, ctx)


@register_method("joint-query-ranker")
class JointQueryRanker(Method):
    """Hostile: claims to be inductive but labels each query by its rank (by norm) among the
    queries it receives at once."""

    consumes = "features"
    setting = "inductive"

    def predict(self, task, ctx):
        rank = task.query.norm(dim=1).argsort().argsort()
        return torch.nn.functional.one_hot(rank % task.n_way, task.n_way).float()


@register_method("rowwise-claimer")
class RowwiseClaimer(JointQueryRanker):
    """Hostile: the joint query ranker, claiming a row-wise scorer to get its queries at once."""

    rowwise_scorer = True
