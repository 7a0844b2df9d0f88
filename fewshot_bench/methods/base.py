"""The Method interface every registered method implements."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fewshot_bench.errors import ProtocolError
from fewshot_bench.tasks.task import Task

CONSUMES = ("features", "images")
SETTINGS = ("inductive", "transductive", "semi-supervised")


@dataclass
class TaskContext:
    """Per-task execution context: the device and the task's own random generators.

    All randomness a method uses must come from ``generator`` / ``rng`` so a task's result
    depends only on its seed.
    """

    device: torch.device
    seed: int
    generator: torch.Generator
    rng: np.random.Generator

    @classmethod
    def create(cls, seed: int, device: torch.device | str = "cpu") -> TaskContext:
        device = torch.device(device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return cls(device=device, seed=seed, generator=gen, rng=np.random.default_rng(seed))


@dataclass
class FitSource:
    """What ``Method.fit`` may train on: base-class data (never the evaluation classes)."""

    data: torch.Tensor
    labels: np.ndarray
    kind: str
    class_names: list[str]


class Method:
    """Base class: subclass, set ``consumes``/``setting``/``defaults``, implement ``predict``.

    - ``consumes``: ``"features"`` (frozen-backbone embeddings) or ``"images"`` (uint8 pixels).
    - ``setting``: ``"inductive"`` (support only), ``"transductive"`` (also looks at the query
      set as a whole) or ``"semi-supervised"`` (uses ``task.unlabeled``).
    - ``defaults``: hyper-parameters; ``Method(**overrides)`` replaces them, unknown keys fail.
    """

    name: ClassVar[str] = "unnamed"
    consumes: ClassVar[str] = "features"
    setting: ClassVar[str] = "inductive"
    defaults: ClassVar[dict[str, Any]] = {}
    version: ClassVar[str] = "1"

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ProtocolError(
                f"method {self.name!r} has no parameter(s) {sorted(unknown)}; "
                f"its parameters are {sorted(self.defaults)}"
            )
        self.params: dict[str, Any] = {**self.defaults, **params}

    def config(self) -> dict[str, Any]:
        """Everything that determines this method's output, for hashing and reporting."""
        return {"method": self.name, "version": self.version, "params": self.params}

    def config_hash(self) -> str:
        blob = json.dumps(self.config(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def fit(self, source: FitSource, budget: int | None, ctx: TaskContext) -> None:  # noqa: B027
        """Train on base classes; default does nothing. ``budget`` is in optimisation steps."""

    def state_dict(self) -> dict[str, Any] | None:
        """Trained state to cache after ``fit`` (``None``: nothing to cache)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what ``state_dict`` returned."""

    def task_setting(self, task: Task) -> str:
        """The setting this method ran in on ``task`` (recorded per result row).

        Defaults to ``setting``; a method that falls back to using the queries as a whole (for
        example when a task has no unlabeled pool) reports ``"transductive"`` for that task.
        """
        return self.setting

    @property
    def trains(self) -> bool:
        """Whether this method overrides ``fit``."""
        return type(self).fit is not Method.fit

    def predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        """Scores ``[n_query, task.n_way]`` (higher = more likely); logits or probabilities."""
        raise NotImplementedError

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        """Score several tasks; override to vectorise. Default loops over ``predict``."""
        return [self.predict(t, c) for t, c in zip(tasks, ctxs, strict=True)]
