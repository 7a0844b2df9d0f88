"""Plugin methods the runner tests load with ``--plugin`` / ``plugins=``: they run in the worker."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from fewshot_bench.methods import Method, register_method
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

    def predict_batch(self, tasks, ctxs):
        time.sleep(float(os.environ.get("FSBENCH_TEST_DELAY", "0")))
        return super().predict_batch(tasks, ctxs)


@register_method("file-scaled")
class FileScaled(NearestPrototype):
    """Nearest prototype whose parameter names a file (like ``init=`` of trained methods)."""

    defaults = {"normalize": True, "weights": ""}

    def predict_batch(self, tasks, ctxs):
        scale = float(Path(self.params["weights"]).read_text()) if self.params["weights"] else 1.0
        return [s * scale for s in super().predict_batch(tasks, ctxs)]
