"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine 2017), second- and first-order, written
with ``torch.func.functional_call`` (learn2learn does not build on Python >= 3.11).

The network is a backbone (Conv-4 by default) with a linear ``n_way`` head. ``fit`` meta-trains
the initialisation on episodes of the base classes: for each of ``meta_batch`` tasks, take
``inner_steps`` SGD steps of size ``inner_lr`` on the support loss, then the query loss of the
adapted weights is back-propagated to the initial weights through the inner loop
(``maml``: second order, ``create_graph=True``; ``fomaml``: first order, the inner gradients
are treated as constants), Adam with ``meta_lr``. ``predict`` adapts on the support with
``test_inner_steps`` steps and scores the queries.

Batch norm: every BN layer normalises with the statistics of the *support* images of the task
(no running statistics, Finn's "batch statistics" mode); queries are normalised with the
support's statistics too, so no query ever influences another and the method stays
**inductive** (Finn et al. normalised the query batch with its own statistics, which is
transductive). ``n_way`` must equal the protocol's way (the head is ``n_way``-wide).
Finn's settings: Omniglot 5-way ``inner_lr=0.4``, 1 step in training, 3 at test, meta batch 32;
20-way ``inner_lr=0.1``, 5 steps in training and test, meta batch 16; 60 000 meta-iterations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from fewshot_bench.errors import FsbenchError, ProtocolError
from fewshot_bench.methods.base import FitSource, Method, Scorer, TaskContext
from fewshot_bench.methods.episodic import (
    TrainingLog,
    image_geometry,
    load_state_file,
    require_images,
    resolve_steps,
    seeded_backbone,
    step_lr,
)
from fewshot_bench.methods.param_groups import training
from fewshot_bench.methods.params import Param, grouped
from fewshot_bench.methods.registry import register_method
from fewshot_bench.runtime import seeded
from fewshot_bench.tasks.sampler import EpisodeSampler
from fewshot_bench.tasks.task import Task

Params = dict[str, torch.Tensor]


class ReferenceBatchNorm2d(nn.BatchNorm2d):
    """Batch norm with statistics of the first ``ref`` items of the batch (all when ``None``),
    applied to the whole batch; never uses or updates running statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps, affine=True, track_running_stats=False)
        self.ref: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x if self.ref is None else x[: self.ref]
        mean = r.mean(dim=(0, 2, 3))
        var = r.var(dim=(0, 2, 3), unbiased=False)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def _swap_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = ReferenceBatchNorm2d(child.num_features, child.eps)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                new.bias.copy_(child.bias)
            setattr(module, name, new)
        else:
            _swap_batchnorm(child)


class MamlNet(nn.Module):
    """A backbone with support-statistics batch norm and a linear classifier head."""

    def __init__(self, arch: str, in_channels: int, image_size: int, n_way: int, seed: int) -> None:
        super().__init__()
        self.backbone = seeded_backbone(arch, in_channels, image_size, seed, torch.device("cpu"))
        _swap_batchnorm(self.backbone)
        with seeded(seed + 1):
            self.head = nn.Linear(self.backbone.out_dim, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @contextlib.contextmanager
    def reference(self, n: int | None) -> Iterator[None]:
        """Normalise with the statistics of the first ``n`` items within this block."""
        bns = [m for m in self.modules() if isinstance(m, ReferenceBatchNorm2d)]
        for m in bns:
            m.ref = n
        try:
            yield
        finally:
            for m in bns:
                m.ref = None


def inner_adapt(
    net: MamlNet,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    create_graph: bool,
) -> Params:
    """``steps`` SGD steps on the cross-entropy of ``(x, y)`` starting from ``params``.

    ``create_graph=True`` keeps the graph of the gradients (second-order MAML); with ``False``
    they are constants (first-order MAML).
    """
    names = list(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
        params = {k: params[k] - lr * g for k, g in zip(names, grads, strict=True)}
    return params


def adapted_logits(
    net: MamlNet, params: Params, support: torch.Tensor, query: torch.Tensor
) -> torch.Tensor:
    """Query logits, batch norm using the support's statistics (support first in the batch)."""
    with net.reference(support.shape[0]):
        out = functional_call(net, params, (torch.cat([support, query]),))
    return out[support.shape[0] :]


@register_method("maml")
class MAML(Method):
    """MAML: a meta-learned initialisation adapted to each task by a few SGD steps."""

    consumes = "images"
    setting = "inductive"
    schema = {
        **training(steps=2000, amp=False),
        **grouped(
            "meta-learning",
            {
                "n_way": Param(5, "classes of the head (must equal the protocol's way)", low=2),
                "k_shot": Param(1, "support items per class in training episodes", low=1),
                "train_query": Param(5, "query items per class in training episodes", low=1),
                "inner_lr": Param(0.4, "inner-loop SGD step size", low=0, open_low=True),
                "inner_steps": Param(1, "inner-loop steps in training", low=1),
                "test_inner_steps": Param(3, "inner-loop steps at test time", low=0),
                "first_order": Param(False, "ignore second derivatives (FOMAML)"),
                "meta_batch": Param(32, "tasks per meta-update", low=1),
                "meta_lr": Param(1e-3, "outer-loop learning rate (Adam)", low=0, open_low=True),
                "lr_decay_every": Param(0, "halve meta_lr every this many steps (0: never)", low=0),
            },
        ),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.net: MamlNet | None = None
        self.geometry: tuple[int, int] | None = None
        self.train_log: list[dict[str, float]] = []

    def _build(self, in_channels: int, image_size: int, seed: int, device: torch.device) -> None:
        p = self.params
        self.net = MamlNet(p["arch"], in_channels, image_size, p["n_way"], seed).to(device)
        self.geometry = (in_channels, image_size)

    def state_dict(self) -> dict[str, Any] | None:
        if self.net is None:
            return None
        return {
            "arch": self.params["arch"],
            "n_way": self.params["n_way"],
            "geometry": self.geometry,
            "net": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "train_log": self.train_log,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        if (state.get("arch"), state.get("n_way")) != (
            self.params["arch"],
            self.params["n_way"],
        ):
            raise FsbenchError(
                f"{self.name}: saved state is for {state.get('arch')!r} {state.get('n_way')}-way, "
                f"this method is {self.params['arch']!r} {self.params['n_way']}-way"
            )
        self._build(*state["geometry"], 0, device or torch.device("cpu"))
        assert self.net is not None
        self.net.load_state_dict(state["net"])
        self.train_log = list(state.get("train_log", []))

    def fit(self, source: FitSource, budget: int | None, ctx: TaskContext) -> None:
        """Meta-train on episodes of the base classes for ``budget`` (or ``steps``) meta-steps."""
        require_images(source.kind, self.name)
        p = self.params
        n_steps = resolve_steps(budget, p["steps"])
        device = ctx.device
        geometry = image_geometry(source.data)
        if p["init"]:
            self.load_state_dict(load_state_file(p["init"]), device)
            if self.geometry != geometry:
                raise ProtocolError(f"{self.name}: init state is for images {self.geometry}")
        else:
            self._build(*geometry, ctx.seed, device)
            self.train_log = []
        assert self.net is not None
        if n_steps == 0:
            return
        sampler = EpisodeSampler.for_training(
            source.labels, p["n_way"], p["k_shot"], p["train_query"], name=f"{self.name} training"
        )
        data = source.data.to(device)
        net = self.net.train()
        opt = torch.optim.Adam(net.parameters(), lr=p["meta_lr"])
        way, nq, batch = p["n_way"], p["train_query"], p["meta_batch"]
        second_order = not p["first_order"]
        bar = tqdm(range(n_steps), desc=f"fit {self.name}", unit="step", mininterval=2.0)
        log = TrainingLog(self.train_log, bar, every=20)
        for step in bar:
            step_lr(opt, p["meta_lr"], step, p["lr_decay_every"])
            opt.zero_grad(set_to_none=True)
            params = dict(net.named_parameters())
            step_loss = step_acc = 0.0
            for b in range(batch):
                ep = sampler.sample(ctx.seed, step * batch + b)
                xs = data[torch.from_numpy(ep.support).to(device)]
                xq = data[torch.from_numpy(ep.query).to(device)]
                ys = torch.from_numpy(ep.support_labels).to(device)
                yq = torch.arange(way, device=device).repeat_interleave(nq)
                fast = inner_adapt(
                    net, params, xs, ys, p["inner_steps"], p["inner_lr"], second_order
                )
                logits = adapted_logits(net, fast, xs, xq)
                loss = F.cross_entropy(logits, yq)
                (loss / batch).backward()
                step_loss += loss.item() / batch
                step_acc += (logits.argmax(1) == yq).float().mean().item() / batch
            opt.step()
            log.update(step, n_steps, step_loss, step_acc)
        bar.close()

    def fit_task(self, task: Task, ctx: TaskContext) -> Scorer:
        """Adapt a copy of the initialisation on the support; the scorer applies it to queries
        (batch norm with the support's statistics)."""
        if self.net is None:
            raise FsbenchError(
                f"method {self.name!r} must be meta-trained first (the runner calls fit on the "
                "protocol's [dataset] fit_split)"
            )
        require_images(task.kind, self.name)
        if task.n_way != self.params["n_way"]:
            raise ProtocolError(
                f"{self.name} was built for {self.params['n_way']}-way tasks, the task is "
                f"{task.n_way}-way; pass -m {self.name}:n_way={task.n_way}"
            )
        device = ctx.device
        net = self.net.to(device)
        params = {k: v.detach().requires_grad_(True) for k, v in net.named_parameters()}
        xs, ys = task.support.to(device), task.support_labels.to(device)
        with torch.enable_grad():
            fast = inner_adapt(
                net,
                params,
                xs,
                ys,
                self.params["test_inner_steps"],
                self.params["inner_lr"],
                False,
            )
        fast = {k: v.detach() for k, v in fast.items()}

        def score(query: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return adapted_logits(net, fast, xs, query.to(device)).float()

        return score


@register_method("fomaml")
class FOMAML(MAML):
    """First-order MAML: the meta-gradient ignores second derivatives through the inner loop."""

    schema = {
        **MAML.schema,
        "first_order": Param(True, "ignore second derivatives (FOMAML)", group="meta-learning"),
    }
