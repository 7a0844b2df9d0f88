"""The runner's task feed: each scheduled chunk assembled once, ahead, in a background thread,
shared by the methods that receive the same tasks, dropped after its last use."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from run_helpers import run_quietly

from fewshot_bench.data import load_dataset
from fewshot_bench.run import feed as feed_module
from fewshot_bench.run import runner
from fewshot_bench.run.executor import MethodSpec
from fewshot_bench.run.feed import ChunkKey, TaskFeed
from fewshot_bench.run.fixtures import write_episodic_protocol
from fewshot_bench.run.store import load_results
from fewshot_bench.tasks.protocol import load_pool, load_protocol_file
from fewshot_bench.tasks.task import Task


@pytest.fixture(scope="module")
def digits(shared_data):
    data = load_dataset("mnist", "test", shared_data)
    return data.images.reshape(len(data), -1).float() / 255.0


class Chunk(list):
    """A built chunk (a list, as the runner's are) that can be weakly referenced."""


class Builds:
    """``build`` for a feed: a chunk of one real MNIST task per key, recording who built what."""

    def __init__(self, digits: torch.Tensor) -> None:
        self.digits = digits
        self.calls: list[tuple[ChunkKey, str]] = []

    def __call__(self, key: ChunkKey) -> Chunk:
        self.calls.append((key, threading.current_thread().name))
        if key.consumes == "broken":
            raise ValueError("no such pool")
        rows = self.digits[100 * key.seed : 100 * key.seed + 100]
        task = Task(rows[:10], torch.arange(10), rows[10:60], rows[60:], 10, "features")
        return Chunk([SimpleNamespace(task=task)])

    def count(self, key: ChunkKey) -> int:
        return sum(k == key for k, _ in self.calls)


def key(seed: int, consumes: str = "features") -> ChunkKey:
    return ChunkKey(consumes, seed, (0,), True)


def test_each_scheduled_chunk_is_built_once_ahead_and_shared(digits):
    build = Builds(digits)
    a, b, c = key(0), key(1), key(2)
    with TaskFeed([a, b, a, b, c], build) as feed:
        first = feed.get(a)
        assert feed.get(b) is not None
        assert feed.get(a) is first  # the second method gets the very same chunk
        feed.get(b)
        feed.get(c)
    assert [build.count(k) for k in (a, b, c)] == [1, 1, 1]
    assert {name for _, name in build.calls} == {"fsbench-assemble_0"}


def test_a_chunk_is_dropped_after_its_last_use(digits):
    build = Builds(digits)
    a, b = key(0), key(1)
    with TaskFeed([a, a, b], build) as feed:
        held = weakref.ref(feed.get(a))
        assert held() is not None  # kept for its second use
        feed.get(a)
        feed.get(b)
        gc.collect()
        assert held() is None


def test_over_budget_chunks_are_built_again_and_unscheduled_ones_on_demand(digits):
    build = Builds(digits)
    a, stray = key(0), key(7)
    with TaskFeed([a, a], build, size=lambda k: 313_600, budget=1000) as feed:
        feed.get(a)
        feed.get(a)
        feed.get(stray)
    assert build.count(a) == 2 and build.count(stray) == 1


def test_what_is_built_ahead_stays_within_the_budget(digits):
    """An ImageNet-scale task must not be assembled twice over in memory ahead of its turn."""
    build = Builds(digits)
    a, b, c, d = (key(i) for i in range(4))
    with TaskFeed([a, b, c, d], build, size=lambda k: 100, ahead=3, budget=250) as feed:
        feed._thread.submit(lambda: None).result()  # let the first builds finish
        assert build.count(a) == 1 and build.count(b) == 1 and build.count(c) == 0
        feed.get(a)  # a is dropped after its only use: room for c, not for d as well
        feed._thread.submit(lambda: None).result()
        assert build.count(c) == 1 and build.count(d) == 0
        for k in (b, c, d):
            feed.get(k)
    assert [build.count(k) for k in (a, b, c, d)] == [1, 1, 1, 1]


def test_the_feed_builds_ahead_while_the_caller_works(digits):
    build = Builds(digits)
    a, b, c = key(0), key(1), key(2)
    with TaskFeed([a, b, c], build, ahead=2) as feed:
        feed.get(a)
        for _ in range(200):  # b and c are built without being asked for
            if build.count(c):
                break
            threading.Event().wait(0.01)
        assert build.count(b) == 1 and build.count(c) == 1


def test_a_build_error_reaches_the_caller(digits):
    build = Builds(digits)
    with TaskFeed([key(0, "broken")], build) as feed, pytest.raises(ValueError, match="no such"):
        feed.get(key(0, "broken"))


def test_methods_given_the_same_tasks_share_their_assembly_with_identical_rows(
    shared_data, tmp_path, monkeypatch
):
    """On real Omniglot episodes: two inductive methods share every assembled chunk, and their
    rows equal those of a run that assembles every chunk again for each method."""
    proto = load_protocol_file(
        write_episodic_protocol(tmp_path, "omni-feed", n_unlabeled=2, n_distractor=1, n_tasks=12)
    )[0]
    pool = load_pool(proto, shared_data)
    specs = [MethodSpec("nearest-prototype"), MethodSpec("logistic-regression", {"max_iter": 25})]
    calls: list[tuple[int, ...]] = []
    real = runner._assemble_chunk
    monkeypatch.setattr(
        runner,
        "_assemble_chunk",
        lambda chunk, **kw: calls.append(tuple(chunk)) or real(chunk, **kw),
    )

    def run(folder: Path) -> list:
        calls.clear()
        run_quietly(proto, specs, folder, pool=pool, batch_size=5)
        df = load_results(folder / "results.sqlite")
        return sorted(zip(df.method, df.seed, df.task_index, df.accuracy, strict=True))

    sizes: list[tuple[int, int]] = []
    real_get = feed_module.TaskFeed.get

    def get(self, k):
        built = real_get(self, k)
        parts = [t for b in built for t in (b.task.support, b.task.unlabeled, b.task.query)]
        held = sum(t.numel() * t.element_size() for t in parts)
        sizes.append((self._size(k), held))
        return built

    monkeypatch.setattr(feed_module.TaskFeed, "get", get)
    shared = run(tmp_path / "shared")
    assert sizes and all(estimate == held for estimate, held in sizes)
    assert sorted(calls) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11)]
    monkeypatch.setattr(feed_module, "default_budget", lambda: 0)
    again = run(tmp_path / "again")
    assert len(calls) == 6
    assert shared == again and len(shared) == 24


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priorities here")
def test_assembly_runs_at_a_lower_priority_than_the_runner(digits):
    """Building ahead takes the cycles a busy worker leaves, not its compute threads' share."""
    seen: list[int] = []

    def build(key: ChunkKey) -> list:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return []

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with TaskFeed([key(0)], build) as feed:
        feed.get(key(0))
    assert seen == [max(main_before, feed_module.ASSEMBLY_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
