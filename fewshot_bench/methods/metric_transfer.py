"""Label propagation via metric transfer (Liu et al.), end to end on images: propagate labels to
the unlabeled images in a pretrained metric, then fine-tune that network on the support plus the
confident pseudo-labels with the confidence-weighted loss of eq. 10.

``init`` is a checkpoint of ``fsbench pretrain`` (in the paper, instance discrimination on the
unlabeled images); ``features`` picks its metric: ``embed`` (the L2-normalised projection the
objective trained) or ``backbone``. The propagator (``spectral`` by default, or ``nn`` /
``diffusion``) takes its parameters from this method's; pseudo-labels keep ``α >= min_alpha``
(and the ``top_k`` / ``k_per_class`` most confident). Training is ``finetune``'s, with loss
``-(1/B) Σ α_i log p(ŷ_i)`` over batches drawn from support ∪ pseudo-labeled (α = 1 on the
support). Queries never enter the graph: the setting is semi-supervised, inductive on queries.
"""

from __future__ import annotations

from typing import Any

import torch

from fewshot_bench.backbones.checkpoint import CheckpointEmbedder
from fewshot_bench.methods.base import TaskContext
from fewshot_bench.methods.mean_teacher import TASK_TRAINING, TaskTrainedClassifier, support_set
from fewshot_bench.methods.params import Param
from fewshot_bench.methods.propagation import PROPAGATOR, make_propagator, select_pseudo_labels
from fewshot_bench.methods.registry import register_method
from fewshot_bench.tasks.task import Task


@register_method("propagation-finetune")
class PropagationFinetune(TaskTrainedClassifier):
    """Metric transfer: propagate in the pretrained metric, then confidence-weighted fine-tuning."""

    setting = "semi-supervised"
    schema = {
        **TASK_TRAINING,
        **PROPAGATOR,
        "propagator": Param(
            "spectral",
            "how the unlabeled images get their pseudo-labels",
            choices=("diffusion", "spectral", "nn"),
            group="graph",
        ),
        "features": Param(
            "embed",
            "the checkpoint's metric: embed (its L2-normalised projection) or backbone",
            choices=("embed", "backbone"),
            group="graph",
        ),
    }
    needs_init = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        #: the last task's pseudo-labels (indices into task.unlabeled, labels, α), for inspection
        self.last_pseudo_labels = None

    def training_set(
        self, task: Task, ctx: TaskContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Support (α = 1) plus the confidently pseudo-labeled unlabeled images with their α."""
        if task.unlabeled.shape[0] == 0:
            return support_set(task, ctx)
        embedder = CheckpointEmbedder(self.params["init"], self.params["features"])
        sup = embedder.embed(task.support, ctx.device)
        unl = embedder.embed(task.unlabeled, ctx.device)
        feature_task = Task(sup, task.support_labels, unl, sup[:0], task.n_way, "features")
        scores = make_propagator(self.params).propagate_unlabeled(feature_task, ctx)
        pl = select_pseudo_labels(scores.cpu(), self.params)
        self.last_pseudo_labels = pl
        x = torch.cat([task.support, task.unlabeled[pl.indices]])
        y = torch.cat([task.support_labels.long(), pl.labels.long()])
        w = torch.cat([torch.ones(task.n_support), pl.alpha.float()])
        return x, y, w
