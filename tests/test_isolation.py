"""Methods cannot reach the answers: not by position, the call stack, the heap or the workdir.

Every test runs the real runner, whose methods run in a separate worker process, on real data.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from run_helpers import run_quietly

from fewshot_bench.errors import DataNotFoundError
from fewshot_bench.run.executor import MethodSpec, ProcessExecutor
from fewshot_bench.run.sandbox import landlock_abi
from fewshot_bench.run.store import load_results
from fewshot_bench.tasks.protocol import all_protocols, load_pool
from fewshot_bench.tasks.task import TaskTruth

HOSTILE = str(Path(__file__).with_name("hostile_methods.py"))


@pytest.fixture(scope="module")
def hostile_executor():
    ex = ProcessExecutor(plugins=(HOSTILE,))
    yield ex
    ex.close()


def _one_per_shape() -> list[str]:
    """One protocol per built-in shape: every episodic protocol, one budget per SSL family."""
    seen, names = set(), []
    for name, proto in all_protocols().items():
        key = proto.family if proto.kind == "ssl" else name
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _assert_chance(df, n_way_of) -> None:
    """The mean accuracy is within its 95% CI (plus a hair for tiny samples) of chance."""
    acc = df.accuracy.to_numpy()
    chance = float(np.mean([1.0 / n_way_of(r) for r in df.itertuples()]))
    if len(acc) > 1:
        half = 1.96 * acc.std(ddof=1) / math.sqrt(len(acc))
    else:  # one SSL task: binomial interval over its queries
        n = int(df.n_query.iloc[0])
        half = 1.96 * math.sqrt(chance * (1 - chance) / n)
    assert abs(acc.mean() - chance) <= half + 0.01, (acc.mean(), chance, half)


@pytest.mark.parametrize("name", _one_per_shape())
def test_position_carries_no_label(name, shared_data, tmp_path, hostile_executor):
    """A method that predicts from the query's position alone scores at chance on every
    built-in protocol shape (manifests and some datasets are class-sorted)."""
    proto = all_protocols()[name]
    try:
        pool = load_pool(proto, shared_data)
    except DataNotFoundError as exc:
        pytest.skip(f"{name}: its images are not on this machine ({str(exc)[:80]})")
    run_quietly(
        proto,
        [MethodSpec("position-only")],
        tmp_path,
        seeds=[proto.run["seeds"][0]],
        pool=pool,
        backbone="pixels",
        max_tasks=80,
        executor=hostile_executor,
    )
    df = load_results(tmp_path / "results.sqlite")
    n_way = proto.params.get("n_way") or pool.data.n_classes
    _assert_chance(df, lambda row: n_way)


@pytest.fixture(scope="module")
def omniglot_5w(shared_data):
    proto = all_protocols()["omniglot-semi-5w1s"]
    return proto, load_pool(proto, shared_data)


@pytest.mark.parametrize("method", ["stack-walker", "gc-search", "workdir-reader", "seed-replay"])
def test_hostile_plugins_score_at_chance(method, omniglot_5w, tmp_path, hostile_executor):
    proto, pool = omniglot_5w
    workdir = tmp_path / "runs"
    # a first method leaves manifests and rows in the workdir for the reader to find
    specs = [MethodSpec("position-only"), MethodSpec(method)]
    run_quietly(proto, specs, workdir, pool=pool, max_tasks=100, executor=hostile_executor)
    df = load_results(workdir / "results.sqlite")
    _assert_chance(df[df.method == method], lambda row: 5)


def test_the_hostile_methods_have_teeth():
    """In the runner's own process the stack walker and heap search would find the answers."""
    sys.path.insert(0, str(Path(HOSTILE).parent))
    try:
        import hostile_methods
    finally:
        sys.path.pop(0)
    import torch

    from fewshot_bench.tasks.task import Task

    truth = TaskTruth(np.array([3, 1, 4, 0, 2]), np.array([], dtype=np.int64))  # noqa: F841
    task = Task(torch.zeros(5, 2), torch.arange(5), torch.zeros(0, 2), torch.zeros(5, 2), 5, "f")
    for cls in (hostile_methods.StackWalker, hostile_methods.GcSearch):
        pred = cls().predict(task, None).argmax(1).tolist()
        assert pred == [3, 1, 4, 0, 2], cls.__name__


def test_the_seed_replay_would_win_against_a_seed_only_order():
    """Against items ordered by a permutation drawn from the task seed alone, replaying the seed
    recovers every label; the runner's content-keyed order (tested above) defeats it."""
    sys.path.insert(0, str(Path(HOSTILE).parent))
    try:
        import hostile_methods
    finally:
        sys.path.pop(0)
    from fewshot_bench.run.assemble import task_seed

    seed, index, n_way, q = 0, 17, 5, 15
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 2]))
    rng.permutation(5)
    rng.permutation(0)
    perm_q = rng.permutation(n_way * q)
    truth = np.repeat(np.arange(n_way), q)[perm_q]
    guess = hostile_methods.replay_seed_order(task_seed(seed, index), 5, 0, n_way * q, n_way)
    assert (guess == truth).all()


def test_manifest_files_hold_no_query_labels(omniglot_5w, tmp_path, hostile_executor):
    proto, pool = omniglot_5w
    specs = [MethodSpec("position-only")]
    run_quietly(proto, specs, tmp_path, pool=pool, max_tasks=2, executor=hostile_executor)
    files = list(tmp_path.rglob("*.npz"))
    assert files
    for path in files:
        with np.load(path) as z:
            labels = {k for k in z.files if k.endswith("_labels") or k.endswith("_labels_offsets")}
            assert labels <= {"support_labels", "support_labels_offsets"}, (path, labels)


def _forge(proto, pool, workdir: Path, executor) -> tuple:
    import hashlib
    import os

    cache = Path(os.environ["FSBENCH_CACHE"])
    # an honest first run caches the pool's features, which the forger then tries to overwrite
    run_quietly(proto, [MethodSpec("nearest-prototype")], workdir, pool=pool, max_tasks=1)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.rglob("*.pt")}
    run_quietly(
        proto,
        [MethodSpec("store-forger")],
        workdir,
        pool=pool,
        max_tasks=40,
        batch_size=4,
        executor=executor,
    )
    df = load_results(workdir / "results.sqlite")
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before if p.exists()}
    return df, before, after


@pytest.mark.skipif(landlock_abi() < 1, reason="the kernel offers no Landlock sandbox")
def test_a_method_cannot_forge_rows_or_poison_the_caches(omniglot_5w, tmp_path, monkeypatch):
    proto, pool = omniglot_5w
    monkeypatch.chdir(tmp_path)  # the forger searches the worker's working directory
    ex = ProcessExecutor(plugins=(HOSTILE,))
    try:
        assert ex.sandbox and "landlock" in ex.sandbox
        df, before, after = _forge(proto, pool, tmp_path / "runs", ex)
    finally:
        ex.close()
    assert before and after == before, "a cached file was overwritten"
    df = df[df.method == "store-forger"]
    assert len(df) == 40 and (df.accuracy == 1.0).mean() < 0.1
    _assert_chance(df, lambda row: 5)


def test_without_the_sandbox_the_forger_would_win(omniglot_5w, tmp_path, monkeypatch):
    """The same attack with the sandbox turned off forges rows: the test above has teeth. (The
    feature cache it would poison here is a copy, so other tests are unaffected.)"""
    import os
    import shutil

    proto, pool = omniglot_5w
    cache = tmp_path / "cache"
    shutil.copytree(os.environ["FSBENCH_CACHE"], cache, ignore=shutil.ignore_patterns("states"))
    env = {"FSBENCH_SANDBOX": "0", "FSBENCH_CACHE": str(cache)}
    monkeypatch.chdir(tmp_path)
    ex = ProcessExecutor(plugins=(HOSTILE,), env=env)
    try:
        assert ex.sandbox is None
        run_quietly(
            proto,
            [MethodSpec("store-forger")],
            tmp_path / "runs",
            pool=pool,
            max_tasks=40,
            batch_size=4,
            executor=ex,
        )
    finally:
        ex.close()
    df = load_results(tmp_path / "runs" / "results.sqlite")
    assert (df.accuracy == 1.0).sum() >= 30  # forged rows took the place of real ones


@pytest.mark.skipif(landlock_abi() < 1, reason="the kernel offers no Landlock sandbox")
def test_a_confined_worker_caches_pool_graphs_privately(tmp_path):
    """With a disk cache configured, a confined worker still builds and caches the kNN graph of a
    large pool (in its private folder), and writes nothing into the shared cache."""
    import torch

    from fewshot_bench.methods.propagation import CACHE_MIN_NODES
    from fewshot_bench.run.executor import deliver
    from fewshot_bench.tasks.task import Task

    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(3, 8, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 3
        return centres[labels] + torch.randn(n, 8, generator=g), labels

    support, support_labels = draw(6)
    unlabeled, _ = draw(CACHE_MIN_NODES)
    query, query_labels = draw(30)
    task = Task(support, support_labels, unlabeled, query, n_way=3, kind="features")
    shared = tmp_path / "cache"
    ex = ProcessExecutor(env={"FSBENCH_CACHE": str(shared), "OMP_NUM_THREADS": "1"})
    private = Path(ex._worker.folder)
    try:
        assert ex.sandbox and "landlock" in ex.sandbox and str(private) in ex.sandbox
        handle = ex.open(MethodSpec("diffusion", {}), "cpu")
        scores, _ = deliver(ex._call, handle, [task, task], [0, 1])
        ex.release(handle)
        assert any((private / "graphs").iterdir())  # the worker's own cache
    finally:
        ex.close()
    for s in scores:
        assert (s.argmax(1) == query_labels).float().mean() > 0.9
    assert not (shared / "graphs").exists()
    # the confined worker could only empty its folder; the runner removed it after its exit
    assert not private.exists()
