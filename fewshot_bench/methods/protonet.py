"""Prototypical Networks (Snell, Swersky & Zemel 2017), trained episodically on base classes.

``fit`` trains a backbone (Conv-4 by default) on N-way K-shot episodes drawn from the fit source
(e.g. Omniglot's Vinyals trainval classes, rotations as classes) with a higher way at training
than at test, as in the paper (60-way for Omniglot), Adam with the learning rate halved every
``lr_decay_every`` steps. ``predict`` embeds support and queries (eval mode), takes class means
as prototypes and scores each query by negative squared Euclidean distance; ``fit_tasks`` embeds
the support images of a batch of same-shaped tasks in one pass.

Parameters: ``arch`` (``conv4``, ``resnet12``, ``wrn-28-2``, ...), ``train_way``, ``train_shot``,
``train_query``, ``lr``, ``lr_decay_every`` (0 = constant), ``steps`` (training steps when the
runner gives no ``--budget``), ``init`` (path of a saved state to start from; with ``steps=0``
it is used as is), ``amp`` (bfloat16 autocast, CUDA only).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fewshot_bench.backbones.nets import Backbone
from fewshot_bench.errors import FsbenchError, ProtocolError
from fewshot_bench.methods.base import FitSource, Method, Scorer, TaskContext
from fewshot_bench.methods.episodic import (
    TrainingLog,
    embed,
    group_by_shape,
    image_geometry,
    load_state_file,
    prototypes,
    require_images,
    resolve_steps,
    seeded_backbone,
    sq_distances,
    step_lr,
)
from fewshot_bench.methods.param_groups import training
from fewshot_bench.methods.params import Param, grouped
from fewshot_bench.methods.registry import register_method
from fewshot_bench.runtime import autocast, seeded
from fewshot_bench.tasks.sampler import EpisodeSampler
from fewshot_bench.tasks.task import Task


@register_method("protonet")
class ProtoNet(Method):
    """Prototypical Networks: class means of learned embeddings, squared Euclidean distance."""

    consumes = "images"
    setting = "inductive"
    schema = {
        **training(steps=2000, lr=1e-3),
        **grouped(
            "episodes",
            {
                "train_way": Param(60, "classes per training episode", low=2),
                "train_shot": Param(1, "support items per class in training episodes", low=1),
                "train_query": Param(5, "query items per class in training episodes", low=1),
                "lr_decay_every": Param(
                    2000, "halve the learning rate every this many steps (0: never)", low=0
                ),
            },
        ),
    }
    #: whether the scoring rule reads ``task.unlabeled`` (the semi-supervised subclasses do)
    uses_unlabeled = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.backbone: Backbone | None = None
        self.extra: nn.Module | None = None
        self.geometry: tuple[int, int] | None = None
        self.train_log: list[dict[str, float]] = []

    # ---------------------------------------------------------------- construction and state
    def build_extra(self) -> nn.Module | None:
        """Learnable parameters besides the backbone (subclasses); ``None`` for ProtoNet."""
        return None

    def _build(self, in_channels: int, image_size: int, seed: int, device: torch.device) -> None:
        self.backbone = seeded_backbone(self.params["arch"], in_channels, image_size, seed, device)
        with seeded(seed + 1):
            extra = self.build_extra()
        self.extra = None if extra is None else extra.to(device)
        self.geometry = (in_channels, image_size)

    def _trainable(self) -> list[nn.Parameter]:
        assert self.backbone is not None
        params = list(self.backbone.parameters())
        if self.extra is not None:
            params += list(self.extra.parameters())
        return params

    def state_dict(self) -> dict[str, Any] | None:
        if self.backbone is None:
            return None
        return {
            "arch": self.params["arch"],
            "geometry": self.geometry,
            "backbone": {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()},
            "extra": None
            if self.extra is None
            else {k: v.detach().cpu() for k, v in self.extra.state_dict().items()},
            "train_log": self.train_log,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        device = device or torch.device("cpu")
        if state.get("arch") != self.params["arch"]:
            raise FsbenchError(
                f"{self.name}: saved state is for arch {state.get('arch')!r}, "
                f"this method uses {self.params['arch']!r}"
            )
        in_channels, image_size = state["geometry"]
        self._build(in_channels, image_size, 0, device)
        assert self.backbone is not None
        self.backbone.load_state_dict(state["backbone"])
        if self.extra is not None and state.get("extra") is not None:
            self.extra.load_state_dict(state["extra"])
        self.train_log = list(state.get("train_log", []))

    def _to(self, device: torch.device) -> None:
        if self.backbone is None:
            raise FsbenchError(
                f"method {self.name!r} has no trained backbone: it must be fitted on base classes "
                "first (the runner does this for protocols with a [dataset] fit_split)"
            )
        self.backbone.to(device)
        if self.extra is not None:
            self.extra.to(device)

    # ---------------------------------------------------------------- training
    def fit(self, source: FitSource, budget: int | None, ctx: TaskContext) -> None:
        """Episodic training on the base classes of ``source`` for ``budget`` (or ``steps``) steps."""
        require_images(source.kind, self.name)
        p = self.params
        n_steps = resolve_steps(budget, p["steps"])
        device = ctx.device
        in_channels, image_size = image_geometry(source.data)
        if p["init"]:
            self.load_state_dict(load_state_file(p["init"]), device)
            if self.geometry != (in_channels, image_size):
                raise ProtocolError(
                    f"{self.name}: init state {p['init']} was trained on images {self.geometry}, "
                    f"the fit source has {(in_channels, image_size)}"
                )
        else:
            self._build(in_channels, image_size, ctx.seed, device)
            self.train_log = []
        assert self.backbone is not None
        if n_steps == 0:
            return
        n_unl = int(p.get("train_unlabeled", 0))
        n_dis = int(p.get("train_distractors", 0)) if n_unl else 0
        way, shot, nq = p["train_way"], p["train_shot"], p["train_query"]
        sampler = EpisodeSampler.for_training(
            source.labels, way, shot, nq, n_unl, n_dis, name=f"{self.name} training"
        )
        data = source.data.to(device)
        opt = torch.optim.Adam(self._trainable(), lr=p["lr"])
        self.backbone.train()
        bar = tqdm(range(n_steps), desc=f"fit {self.name}", unit="step", mininterval=2.0)
        log = TrainingLog(self.train_log, bar, every=50)
        target = torch.arange(way, device=device).repeat_interleave(nq)
        for step in bar:
            step_lr(opt, p["lr"], step, p["lr_decay_every"])
            ep = sampler.sample(ctx.seed, step)
            idx = torch.from_numpy(np.concatenate([ep.support, ep.query, ep.unlabeled])).to(device)
            with autocast(device, p["amp"]):
                emb = self.backbone(data[idx]).float()
            ns, nqt = len(ep.support), len(ep.query)
            logits = self.scores(
                emb[None, :ns],
                torch.from_numpy(ep.support_labels).to(device)[None],
                emb[None, ns + nqt :],
                emb[None, ns : ns + nqt],
                way,
            )[0]
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = (logits.argmax(1) == target).float().mean().item()
            log.update(step, n_steps, loss.item(), acc)
        bar.close()
        self.backbone.eval()

    # ---------------------------------------------------------------- evaluation
    def class_prototypes(
        self, support: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        """Prototypes ``[B, C, D]`` from embedded support (and unlabeled items, subclasses)."""
        return prototypes(support, labels, n_way)

    def scores(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        unlabeled: torch.Tensor,
        query: torch.Tensor,
        n_way: int,
    ) -> torch.Tensor:
        """Negative squared distances of embedded queries to the prototypes ``[B, Q, C]``."""
        return -sq_distances(
            query, self.class_prototypes(support, support_labels, unlabeled, n_way)
        )

    def fit_tasks(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[Scorer]:
        """Prototypes of each task (same-shaped tasks share one forward pass); the scorer
        embeds each query and returns its negative squared distances to them."""
        if not tasks:
            return []
        device = ctxs[0].device
        self._to(device)
        assert self.backbone is not None
        for t in tasks:
            require_images(t.kind, self.name)
            if image_geometry(t.support)[0] != self.geometry[0]:
                raise ProtocolError(
                    f"{self.name}: trained on {self.geometry[0]}-channel images, the task has "
                    f"{t.support.shape[1]}"
                )
        out: list[Scorer | None] = [None] * len(tasks)
        backbone = self.backbone
        for group in group_by_shape(tasks):
            batch = [tasks[i] for i in group]
            ns, nu = batch[0].n_support, batch[0].unlabeled.shape[0]
            if not self.uses_unlabeled:
                nu = 0
            parts = [torch.cat([t.support, t.unlabeled[:nu]]) for t in batch]
            emb = embed(backbone, torch.cat(parts), device).view(len(batch), ns + nu, -1)
            labels = torch.stack([t.support_labels for t in batch]).to(device)
            with torch.no_grad():
                protos = self.class_prototypes(emb[:, :ns], labels, emb[:, ns:], batch[0].n_way)
            for j, i in enumerate(group):
                out[i] = functools.partial(_prototype_scores, backbone, protos[j], device)
        return out  # type: ignore[return-value]


def _prototype_scores(
    backbone: Backbone, protos: torch.Tensor, device: torch.device, query: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        return -sq_distances(embed(backbone, query, device), protos).float()
