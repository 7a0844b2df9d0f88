"""Feature preparation shared by the transductive peers: base-class centring and L2 (SimpleShot's
"CL2N"), and the power transform of PT-MAP.

SimpleShot (Wang et al. 2019) subtracts the mean feature of the *base* classes before L2
normalisation. A :class:`BaseCentred` method computes that mean in ``fit`` from the base-class
features the runner gives it (the protocol's ``fit_split``; cached like any trained state), so the
centring never depends on the evaluation classes or on other tasks. Where no fit ran (a protocol
without base classes, a hand-built task) the method centres on the mean of the items of the task
it was given (support, unlabeled pool and, for a transductive method, queries); ``centre``
chooses between the two or turns centring off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fewshot_bench.methods.base import FitSource, Method, TaskContext
from fewshot_bench.methods.params import Param
from fewshot_bench.tasks.task import Task

CENTRE = Param(
    "base",
    "centring before L2: base (mean of the base-class features, computed in fit; falls back to "
    "task when the protocol has no base classes), task (mean of the items given with the task) "
    "or none",
    choices=("base", "task", "none"),
)


class BaseCentred(Method):
    """A feature method whose features are centred (on the base-class mean) and L2-normalised."""

    consumes = "features"
    fit_optional = True
    base_mean: torch.Tensor | None = None

    def fit(self, source: FitSource, budget: int | None, ctx: TaskContext) -> None:
        """The mean base-class feature (only when ``centre = "base"``)."""
        if self.params.get("centre", "base") == "base":
            self.base_mean = source.data.to(torch.float64).mean(0).to(torch.float32)

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.base_mean is None else {"base_mean": self.base_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_mean = state["base_mean"]

    def centre_vector(self, items: torch.Tensor) -> torch.Tensor | None:
        """What to subtract from every feature row of a task whose given items are ``items``."""
        mode = self.params.get("centre", "base")
        if mode == "none":
            return None
        if mode == "base" and self.base_mean is not None:
            return self.base_mean.to(items.device)
        return items.to(torch.float32).mean(0)

    def prepare(self, task: Task, *, with_queries: bool) -> torch.Tensor:
        """The centre vector for ``task``: the base mean, or the mean of the task's support, pool
        and (``with_queries``, transductive methods only) queries."""
        parts = [task.support, task.unlabeled.reshape(-1, *task.support.shape[1:])]
        if with_queries:
            parts.append(task.query)
        c = self.centre_vector(torch.cat(parts))
        return torch.zeros(task.support.shape[1], device=task.support.device) if c is None else c


def centred_l2(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``(x - centre) / ||x - centre||`` row-wise, in float32."""
    return F.normalize(x.to(torch.float32) - centre, dim=-1)


def power_transform(x: torch.Tensor, beta: float, eps: float = 1e-6) -> torch.Tensor:
    """PT-MAP's power transform ``(x + eps)^beta`` of non-negative features, then L2.

    Features with negative entries (a backbone without a final ReLU) are shifted by their row's
    minimum first so the power is defined; the transform is monotone per coordinate either way.
    """
    x = x.to(torch.float32)
    low = x.amin(-1, keepdim=True).clamp_max(0)
    return F.normalize((x - low + eps).pow(beta), dim=-1)
