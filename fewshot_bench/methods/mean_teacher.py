"""Mean Teacher (Tarvainen & Valpola 2017) for the semi-supervised split protocols, and the
"supervised" baseline with the same network and training but no unlabeled data.

One task is one semi-supervised split: ``task.support`` = the labeled images, ``task.unlabeled`` =
the rest of the training set, ``task.query`` = the test set. ``fit_task`` trains a fresh network
(``arch`` backbone + linear head) on the task for ``steps`` steps; the teacher's logits score
each query:

- student: Adam (``lr``, cosine decay to 0, ``weight_decay``) on the cross-entropy of a labeled
  batch plus ``w(t)`` × the consistency cost — the squared difference of student and teacher
  softmax outputs (summed over classes, averaged over the batch) on labeled + unlabeled images,
  each network seeing its own random augmentation;
- ``w(t) = consistency · exp(−5 (1 − t/T)²)`` for ``t < T = ramp_fraction · steps``, then
  ``consistency`` (the sigmoid ramp-up of the paper);
- teacher: exponential moving average of the student's weights (and batch-norm statistics),
  decay ``ema_ramp`` during the ramp-up and ``ema`` after it (0.99 → 0.999 in the paper);
- augmentations on batched tensors: random translation by up to ``translate`` pixels (reflect
  padding + crop), horizontal flip (``flip``), additive Gaussian noise of std ``noise``.

``init=PATH`` starts the backbone from a checkpoint of ``fsbench pretrain`` instead of random
weights; ``finetune`` is ``supervised`` with such a checkpoint required.

Defaults are small enough for a CPU (Conv-4, 500 steps); the paper's CIFAR-10 runs use a
13-layer ConvNet or ResNet for far longer (pass ``arch=wrn-28-2,steps=...`` on a GPU).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fewshot_bench.backbones.checkpoint import load_checkpoint
from fewshot_bench.errors import ProtocolError
from fewshot_bench.methods.base import Method, Scorer, TaskContext
from fewshot_bench.methods.episodic import (
    image_geometry,
    require_images,
    seeded_backbone,
)
from fewshot_bench.methods.param_groups import training
from fewshot_bench.methods.params import Param, Schema, grouped
from fewshot_bench.methods.registry import register_method
from fewshot_bench.runtime import autocast, seeded
from fewshot_bench.tasks.task import Task


def augment_batch(
    x: torch.Tensor, gen: torch.Generator, translate: int, flip: bool, noise: float
) -> torch.Tensor:
    """Random translation (reflect pad + crop), horizontal flip and Gaussian noise of float
    images ``[N, C, H, W]``; random numbers come from the CPU generator ``gen``."""
    n, c, h, w = x.shape
    dev = x.device
    if translate > 0:
        p = min(translate, h - 1, w - 1)
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (torch.arange(h)[None, :] + dy[:, None]).to(dev)
        cols = (torch.arange(w)[None, :] + dx[:, None]).to(dev)
        x = padded[
            torch.arange(n, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    if flip:
        mirror = (torch.rand(n, generator=gen) < 0.5).to(dev).view(n, 1, 1, 1)
        x = torch.where(mirror, x.flip(-1), x)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen).to(dev)
    return x


class Classifier(nn.Module):
    """A backbone and a linear head."""

    def __init__(self, arch: str, in_channels: int, image_size: int, n_way: int, seed: int) -> None:
        super().__init__()
        self.backbone = seeded_backbone(arch, in_channels, image_size, seed, torch.device("cpu"))
        with seeded(seed + 1):
            self.head = nn.Linear(self.backbone.out_dim, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(−5 (1 − t)²)`` with ``t = step / length`` clipped to [0, 1] (Laine & Aila 2017)."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher ← decay · teacher + (1 − decay) · student`` for parameters and float buffers."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s, 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(s, 1.0 - decay)
        else:
            t.copy_(s)


#: Training of a per-task network, shared by every method of this module.
TASK_TRAINING: Schema = {
    **training(steps=500, lr=3e-3),
    **grouped(
        "task training",
        {
            "labeled_batch": Param(32, "labeled images per step", low=1),
            "weight_decay": Param(1e-4, "Adam weight decay", low=0),
            "ramp_fraction": Param(0.4, "fraction of the steps in the ramp-up", low=0, high=1),
            "ema_ramp": Param(0.99, "teacher EMA decay during the ramp-up", low=0, high=1),
            "ema": Param(0.999, "teacher EMA decay after the ramp-up", low=0, high=1),
            "translate": Param(2, "random translation in pixels", low=0),
            "flip": Param(True, "random horizontal flips"),
            "noise": Param(0.15, "std of additive Gaussian noise", low=0),
            "eval_batch": Param(1024, "images per forward pass at evaluation", low=1),
        },
    ),
}
#: The Mean Teacher consistency objective.
CONSISTENCY: Schema = grouped(
    "consistency",
    {
        "consistency": Param(8.0, "weight of the consistency cost after the ramp-up", low=0),
        "unlabeled_batch": Param(96, "unlabeled images per step", low=1),
    },
)


def support_set(task: Task, ctx: TaskContext) -> tuple[torch.Tensor, torch.Tensor, None]:
    """The labeled set of the supervised methods: the support, weight 1."""
    return task.support, task.support_labels, None


class TaskTrainedClassifier(Method):
    """A network trained on each task, assembled from parts (not registered itself):

    - initialisation: random, or the backbone of ``init`` (required when ``needs_init``);
    - labeled set: ``training_set(task, ctx) -> (images, labels, weights or None)``;
    - objective: cross-entropy (confidence-weighted when the labeled set has weights), plus
      the Mean Teacher consistency cost when the schema has ``consistency`` > 0 and the task
      has unlabeled images.

    The teacher (EMA of the student) scores the queries, one at a time, in eval mode.
    """

    consumes = "images"
    needs_init = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.needs_init and not self.params["init"]:
            raise ProtocolError(
                f"{self.name} needs the backbone to start from: -m {self.name}:init=PATH with a "
                "checkpoint written by `fsbench pretrain --out PATH`"
            )
        #: the last task's networks, kept for inspection (tests, notebooks)
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None

    def build_network(self, in_channels: int, image_size: int, n_way: int, seed: int) -> Classifier:
        """A fresh backbone + head; with ``init=PATH`` the backbone starts from a pretraining
        checkpoint (``fsbench pretrain``) instead of random weights."""
        init = self.params["init"]
        if not init:
            return Classifier(self.params["arch"], in_channels, image_size, n_way, seed)
        ckpt = load_checkpoint(init)
        geometry = (int(ckpt["in_channels"]), int(ckpt["image_size"]))
        if geometry != (in_channels, image_size):
            raise ProtocolError(
                f"{self.name}: checkpoint {init} was trained on {geometry[0]}-channel "
                f"{geometry[1]}px images but the task has {in_channels}-channel {image_size}px "
                "images; pretrain on the protocol's dataset (fsbench pretrain --image-size ...)"
            )
        net = Classifier(ckpt["arch"], in_channels, image_size, n_way, seed)
        net.backbone.load_state_dict(ckpt["state_dict"])
        return net

    def training_set(
        self, task: Task, ctx: TaskContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The labeled images, their labels and per-image loss weights (``None``: all 1)."""
        return support_set(task, ctx)

    def fit_task(self, task: Task, ctx: TaskContext) -> Scorer:
        """Train student and teacher on this task; the scorer returns the teacher's logits."""
        require_images(task.kind, self.name)
        p = self.params
        device = ctx.device
        gen = ctx.generator
        in_channels, size = image_geometry(task.support)
        if task.n_support == 0:
            raise ProtocolError(f"{self.name}: the task has no labeled images")
        student = self.build_network(in_channels, size, task.n_way, ctx.seed).to(device)
        teacher = copy.deepcopy(student).requires_grad_(False)
        xl, yl, wl = self.training_set(task, ctx)
        xl_all, yl_all = xl.to(device), yl.to(device)
        wl_all = None if wl is None else wl.to(device)
        consistency = float(p.get("consistency", 0.0))
        xu_all = task.unlabeled.to(device) if consistency > 0 else task.unlabeled[:0]
        use_unl = consistency > 0 and xu_all.shape[0] > 0
        n_steps = int(p["steps"])
        ramp = int(p["ramp_fraction"] * n_steps)
        opt = torch.optim.Adam(student.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, n_steps) / max(n_steps, 1)))
        )

        def aug(x: torch.Tensor) -> torch.Tensor:
            return augment_batch(x.float() / 255.0, gen, p["translate"], p["flip"], p["noise"])

        student.train()
        teacher.train()
        bar = tqdm(range(n_steps), desc=self.name, unit="step", leave=False, mininterval=2.0)
        for step in bar:
            li = torch.randint(0, xl_all.shape[0], (p["labeled_batch"],), generator=gen)
            xb, yb = xl_all[li.to(device)], yl_all[li.to(device)]
            if use_unl:
                ui = torch.randint(0, xu_all.shape[0], (p["unlabeled_batch"],), generator=gen)
                xb = torch.cat([xb, xu_all[ui.to(device)]])
            x_student = aug(xb)
            with autocast(device, p["amp"]):
                logits = student(x_student).float()
            if wl_all is None:
                loss = F.cross_entropy(logits[: len(yb)], yb)
            else:  # eq. 10 of metric transfer: per-image confidence weights
                ce = F.cross_entropy(logits[: len(yb)], yb, reduction="none")
                loss = (wl_all[li.to(device)] * ce).mean()
            if use_unl:
                x_teacher = aug(xb)
                with torch.no_grad(), autocast(device, p["amp"]):
                    target = torch.softmax(teacher(x_teacher).float(), dim=-1)
                cons = (torch.softmax(logits, dim=-1) - target).pow(2).sum(-1).mean()
                loss = loss + consistency * sigmoid_rampup(step, ramp) * cons
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            decay = p["ema_ramp"] if step < ramp else p["ema"]
            ema_update(teacher, student, min(decay, 1.0 - 1.0 / (step + 2)))
            if (step + 1) % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        self.student, self.teacher = student.eval(), teacher.eval()
        amp = p["amp"]

        def score(query: torch.Tensor) -> torch.Tensor:
            outs = []
            with torch.no_grad(), autocast(device, amp):
                for i in range(0, query.shape[0], p["eval_batch"]):
                    outs.append(teacher(query[i : i + p["eval_batch"]].to(device)).float())
            return torch.cat(outs)

        return score


@register_method("mean-teacher")
class MeanTeacher(TaskTrainedClassifier):
    """Mean Teacher: consistency between a student and its weight-averaged teacher."""

    setting = "semi-supervised"
    schema = {**TASK_TRAINING, **CONSISTENCY}


@register_method("supervised")
class Supervised(TaskTrainedClassifier):
    """Mean Teacher's network and training on the labeled images only (no unlabeled data,
    no consistency cost); predicts with the weight-averaged network like Mean Teacher."""

    setting = "inductive"
    schema = TASK_TRAINING


@register_method("finetune")
class Finetune(TaskTrainedClassifier):
    """The supervised baseline started from a pretrained backbone (``init=PATH``, a checkpoint of
    ``fsbench pretrain``, e.g. instance discrimination on the unlabeled images): the
    "fine-tune" row of semi-supervised tables."""

    setting = "inductive"
    schema = TASK_TRAINING
    needs_init = True
