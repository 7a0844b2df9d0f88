"""The Method interface every registered method implements."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from fewshot_bench.methods.params import Schema, schema_from_defaults, validate
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


#: Scores one query (``[1, D...]``) or a few (``[n, D...]``): ``[n, n_way]``.
Scorer = Callable[[torch.Tensor], torch.Tensor]


class Method:
    """Base class: subclass, set ``consumes``/``setting``/``schema``, implement the prediction.

    - ``consumes``: ``"features"`` (frozen-backbone embeddings) or ``"images"`` (uint8 pixels).
    - ``setting`` says what the runner gives the method, and each result row records what it
      gave: ``"inductive"``: the support only, queries one at a time; ``"semi-supervised"``: the
      support and the unlabeled pool, queries one at a time (a task without a pool is recorded
      ``inductive``); ``"transductive"``: the support, the pool and the whole query set at once.
    - ``schema``: typed parameters (:class:`~fewshot_bench.methods.params.Param`);
      ``Method(**overrides)`` checks every value. A subclass may set plain ``defaults``
      instead; their types are then inferred.

    Inductive and semi-supervised methods implement :meth:`fit_task` (adapt to the support and
    pool, return a scorer the runner calls once per query); transductive ones :meth:`predict`.
    A method that implements only ``predict`` still runs inductively: each query is then
    scored by a ``predict`` call on a one-query task (correct, but it adapts once per query).
    """

    name: ClassVar[str] = "unnamed"
    consumes: ClassVar[str] = "features"
    setting: ClassVar[str] = "inductive"
    schema: ClassVar[Schema] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    #: ``True``: ``fit`` refines the method but is not needed; on a protocol without base classes
    #: (no ``[dataset] fit_split``) the runner skips it instead of refusing the method.
    fit_optional: ClassVar[bool] = False
    #: ``True``: the scorer :meth:`fit_task` returns scores each query row on its own (a fixed
    #: function once adapted, so ``scorer(Q)[i] == scorer(Q[i:i+1])``). For a built-in method
    #: the runner then sends a task's queries in one request instead of one per round trip; a
    #: plugin's claim is not taken (its queries still come one at a time).
    rowwise_scorer: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "schema" in vars(cls):
            cls.defaults = {k: p.default for k, p in cls.schema.items()}
        elif "defaults" in vars(cls):
            cls.schema = schema_from_defaults(cls.defaults)

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = validate(self.name, self.schema, params)

    def config(self) -> dict[str, Any]:
        """Everything that determines this method's output besides its code, for hashing."""
        return {"method": self.name, "params": self.params}

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

    @property
    def trains(self) -> bool:
        """Whether this method overrides ``fit``."""
        return type(self).fit is not Method.fit

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(Method, name)

    def fit_task(self, task: Task, ctx: TaskContext) -> Scorer:
        """Adapt to ``task`` (support, and the unlabeled pool if the setting gives one; no
        queries) and return a function that scores queries ``[n, ...] -> [n, n_way]``.

        The default scores each query with :meth:`predict` on a one-query copy of ``task``."""
        if self._overrides("fit_tasks"):
            return self.fit_tasks([task], [ctx])[0]
        if not (self._overrides("predict") or self._overrides("predict_batch")):
            raise NotImplementedError(
                f"{type(self).__name__} implements neither fit_task nor predict"
            )
        return lambda query: self.predict_batch([replace(task, query=query)], [ctx])[0]

    def fit_tasks(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[Scorer]:
        """:meth:`fit_task` for several tasks; override to vectorise the adaptation."""
        return [self.fit_task(t, c) for t, c in zip(tasks, ctxs, strict=True)]

    def predict(self, task: Task, ctx: TaskContext) -> torch.Tensor:
        """Scores ``[n_query, task.n_way]`` (higher = more likely); logits or probabilities.

        The default adapts with :meth:`fit_tasks` and scores the queries with its scorer."""
        return self.predict_batch([task], [ctx])[0]

    def predict_batch(self, tasks: list[Task], ctxs: list[TaskContext]) -> list[torch.Tensor]:
        """Score several whole tasks; override to vectorise. Default: ``predict`` per task, or
        for a method that adapts (``fit_task``/``fit_tasks``) its scorers on the queries."""
        if self._overrides("predict"):
            return [self.predict(t, c) for t, c in zip(tasks, ctxs, strict=True)]
        if not (self._overrides("fit_task") or self._overrides("fit_tasks")):
            raise NotImplementedError(
                f"{type(self).__name__} implements neither fit_task nor predict"
            )
        given = [replace(t, query=t.query[:0]) for t in tasks]
        scorers = self.fit_tasks(given, ctxs)
        return [s(t.query) for s, t in zip(scorers, tasks, strict=True)]
