"""Methods a hostile plugin author would write to read the answers instead of the images.

Loaded with ``fsbench run --plugin tests/hostile_methods.py``; each must score at chance.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import torch

from fewshot_bench.methods import Method, register_method


def _by_position(n_query: int, n_way: int) -> torch.Tensor:
    """Scores that put query k in class k * n_way // n_query (the class-by-class layout)."""
    guess = torch.arange(n_query) * n_way // n_query
    return torch.nn.functional.one_hot(guess, n_way).float()


def _from_labels(labels, n_query: int, n_way: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64)[:n_query]).clamp(0, n_way - 1)
    if len(y) < n_query:
        return _by_position(n_query, n_way)
    return torch.nn.functional.one_hot(y, n_way).float()


def _looks_like_truth(obj) -> bool:
    return type(obj).__name__ == "TaskTruth" or (
        hasattr(obj, "query_labels") and hasattr(obj, "unlabeled_labels")
    )


@register_method("position-only")
class PositionOnly(Method):
    """Never looks at an image: predicts from the query's position alone."""

    consumes = "images"
    setting = "transductive"  # the most a method can get: every query at once

    def predict(self, task, ctx):
        return _by_position(task.query.shape[0], task.n_way)


class _AnswerHunter(Method):
    """Looks for the query labels where a method should find none (``find_labels``); predicts
    from position when it finds nothing."""

    consumes = "features"
    setting = "transductive"  # the most a method can get: every query at once

    def find_labels(self, task, ctx, n_query: int, n_way: int):
        raise NotImplementedError

    def predict(self, task, ctx):
        n_query, n_way = task.query.shape[0], task.n_way
        labels = self.find_labels(task, ctx, n_query, n_way)
        if labels is None:
            return _by_position(n_query, n_way)
        return _from_labels(labels, n_query, n_way)


@register_method("stack-walker")
class StackWalker(_AnswerHunter):
    """Walks up the call stack looking for the runner's (Task, TaskTruth) pairs."""

    def find_labels(self, task, ctx, n_query, n_way):
        frame = sys._getframe(1)
        while frame is not None:
            for value in list(frame.f_locals.values()):
                candidates = value if isinstance(value, (list, tuple)) else [value]
                for c in candidates:
                    truth = getattr(c, "truth", c)
                    if _looks_like_truth(truth) and len(truth.query_labels) == n_query:
                        return truth.query_labels
            frame = frame.f_back
        return None


@register_method("gc-search")
class GcSearch(_AnswerHunter):
    """Searches every live object of the process for truth objects of this task's size."""

    def find_labels(self, task, ctx, n_query, n_way):
        for obj in gc.get_objects():
            try:
                if _looks_like_truth(obj) and len(obj.query_labels) == n_query:
                    return obj.query_labels
            except Exception:  # noqa: BLE001, S112
                continue
        return None


@register_method("workdir-reader")
class WorkdirReader(_AnswerHunter):
    """Opens every manifest it can find under the working directory and uses any label
    array of the right length, in order."""

    def find_labels(self, task, ctx, n_query, n_way):
        for path in sorted(Path.cwd().rglob("*.npz"))[:200]:
            try:
                with np.load(path, allow_pickle=False) as z:
                    for key in z.files:
                        if "label" in key and key != "support_labels":
                            arr = z[key]
                            if arr.ndim == 1 and len(arr) >= n_query and arr.max() < n_way:
                                return arr
            except Exception:  # noqa: BLE001, S112
                continue
        return None


def replay_seed_order(
    seed_of_task: int, n_support: int, n_unlabeled: int, n_query: int, n_way: int
):
    """Recover (seed, task index) from the method seed, then redraw a seed-only permutation of
    the class-by-class query layout: the labels, if the order came from the seed alone."""
    for seed in range(4):
        for index in range(2000):
            state = np.random.SeedSequence([seed, index, 1]).generate_state(1)[0]
            if int(state) == seed_of_task:
                rng = np.random.default_rng(np.random.SeedSequence([seed, index, 2]))
                rng.permutation(n_support)
                rng.permutation(n_unlabeled)
                perm_q = rng.permutation(n_query)
                layout = np.repeat(np.arange(n_way), n_query // n_way)
                return layout[perm_q]
    return None


@register_method("seed-replay")
class SeedReplay(_AnswerHunter):
    """Uses the public task seed to recompute where each class's queries went."""

    def find_labels(self, task, ctx, n_query, n_way):
        return replay_seed_order(
            ctx.seed, task.support.shape[0], task.unlabeled.shape[0], n_query, n_way
        )


@register_method("store-forger")
class StoreForger(Method):
    """Copies its own stored rows with accuracy 1.0 onto task indices not run yet, so that the
    runner skips those tasks as "already stored"; and overwrites every cached feature file."""

    consumes = "features"
    setting = "transductive"  # the most a method can get: every query at once

    def predict_batch(self, tasks, ctxs):
        import os
        import sqlite3

        for db in Path.cwd().rglob("results.sqlite"):
            try:
                with sqlite3.connect(db, timeout=5) as conn:
                    rows = conn.execute(
                        "SELECT * FROM results WHERE method = 'store-forger'"
                    ).fetchall()
                    names = [d[0] for d in conn.execute("SELECT * FROM results").description]
                    if rows:
                        last = dict(zip(names, rows[-1], strict=True))
                        for k in range(1, 200):
                            forged = {**last, "task_index": last["task_index"] + k, "accuracy": 1.0}
                            marks = ", ".join("?" for _ in forged)
                            conn.execute(
                                f"INSERT OR IGNORE INTO results ({', '.join(forged)}) VALUES ({marks})",
                                list(forged.values()),
                            )
            except Exception:  # noqa: BLE001, S112
                continue
        cache = os.environ.get("FSBENCH_CACHE")
        if cache:
            for path in Path(cache).rglob("*.pt"):
                try:
                    path.write_bytes(b"poisoned")
                except OSError:
                    continue
        return [_by_position(t.query.shape[0], t.n_way) for t in tasks]


@register_method("memory-file-writer")
class MemoryFileWriter(Method):
    """Writes into its own inputs (allowed: its private copy-on-write mapping), then reopens every
    runner memory file it can find, its own and other workers', through ``/proc/*/map_files``
    and tries to overwrite it. Scores: row 0 holds (files found, writes that succeeded,
    in-place edits that worked), the rest zeros."""

    consumes = "features"
    setting = "transductive"

    def predict(self, task, ctx):
        import os
        import re

        task.query.zero_()  # in place: must work, and must not reach any other process
        edited = int(not bool(task.query.any()))
        found = written = 0
        for maps in Path("/proc").glob("[0-9]*/maps"):
            try:
                lines = maps.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                if "fsbench-task" not in line:
                    continue
                found += 1
                span = re.match(r"([0-9a-f]+-[0-9a-f]+)", line).group(1)
                try:
                    fd = os.open(maps.parent / "map_files" / span, os.O_RDWR)
                except OSError:
                    continue
                try:
                    written += os.pwrite(fd, b"\xff" * 64, 0) > 0
                except OSError:
                    pass
                finally:
                    os.close(fd)
        scores = torch.zeros(task.query.shape[0], task.n_way)
        scores[0, :3] = torch.tensor([found, written, edited], dtype=torch.float32)
        return scores
