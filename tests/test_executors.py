"""Local parallel executors and sweeps: `--executor processes --jobs 2` stores exactly the rows of
a serial run (real Omniglot episodes, real methods), a training method fits once and its state
reaches every worker, sweep files are validated with one-line errors, `fsbench sweep --status`
reads the store, and `--executor ray` without Ray says how to install it."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fewshot_bench.cli import main
from fewshot_bench.errors import FsbenchError
from fewshot_bench.run.executor import (
    MethodSpec,
    ParallelExecutor,
    make_executor,
    shared_executor,
    split_evenly,
)
from fewshot_bench.run.fixtures import comparable_rows, write_episodic_protocol
from fewshot_bench.run.runner import run_protocol
from fewshot_bench.run.store import ResultsStore, load_results
from fewshot_bench.run.sweep import load_sweep
from fewshot_bench.tasks.protocol import load_pool, load_protocol_file

N_TASKS = 40
METHODS = [
    MethodSpec("nearest-prototype"),
    MethodSpec("logistic-regression", {"max_iter": 25}),
    MethodSpec("diffusion", {"k": 5}),
]

TRAINER = textwrap.dedent('''
    """A feature method that trains: its fits and the workers it predicts in are logged."""
    import os

    import torch

    from fewshot_bench.methods import Method, register_method


    def _log(kind):
        with open(os.environ["FSBENCH_TEST_LOG"], "a") as fh:
            fh.write(f"{kind} {os.getpid()}\\n")


    @register_method("scaled-prototype")
    class ScaledPrototype(Method):
        consumes = "features"
        setting = "transductive"  # scores whole tasks with predict_batch
        defaults = {"salt": ""}

        def fit(self, source, budget, ctx):
            _log("fit")
            self.scale = float(source.data.float().std())

        def state_dict(self):
            return {"scale": self.scale}

        def load_state_dict(self, state):
            self.scale = float(state["scale"])

        def predict_batch(self, tasks, ctxs):
            _log("predict")
            out = []
            for t in tasks:
                protos = torch.stack(
                    [t.support[t.support_labels == c].mean(0) for c in range(t.n_way)]
                )
                out.append(-torch.cdist(t.query, protos) / self.scale)
            return out


    @register_method("broken-after-two")
    class BrokenAfterTwo(Method):
        """Scores two chunks, then fails (a bug in a method)."""

        consumes = "features"
        setting = "transductive"
        calls = 0

        def predict_batch(self, tasks, ctxs):
            type(self).calls += 1
            if type(self).calls > 2:
                raise RuntimeError("boom")
            return [torch.zeros(t.query.shape[0], t.n_way) for t in tasks]


    @register_method("stateless-trainer")
    class StatelessTrainer(ScaledPrototype):
        """Trains but keeps no state: it can only run where it was trained."""

        def state_dict(self):
            return None
''')


def write_protocol(folder: Path, *, fit: bool = False, seeds: tuple[int, ...] = (0,)) -> Path:
    return write_episodic_protocol(
        folder,
        "omni-exec",
        n_unlabeled=3,
        n_distractor=2,
        n_tasks=N_TASKS,
        seeds=seeds,
        fit_split="test" if fit else None,
    )


def rows(path: Path):
    return comparable_rows(load_results(path))


@pytest.fixture(scope="module")
def small(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exec")
    proto = load_protocol_file(write_protocol(folder, seeds=(0, 1)))[0]
    return proto, load_pool(proto, shared_data)


@pytest.fixture(scope="module")
def pair():
    ex = ParallelExecutor(jobs=2)
    yield ex
    ex.close()


def test_split_evenly():
    assert split_evenly(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert split_evenly(1, 4) == [(0, 1)]
    assert split_evenly(0, 2) == []


def test_processes_executor_stores_the_serial_rows(small, pair, tmp_path):
    proto, pool = small
    common = dict(workdir=tmp_path, pool=pool, progress=False, batch_size=6, device="cpu")
    with ResultsStore(tmp_path / "serial.sqlite") as store:
        run_protocol(proto, METHODS, store, executor=shared_executor(), **common)
    with ResultsStore(tmp_path / "par.sqlite") as store:
        # the first 10 tasks, then the rest: resume works the same way with several workers
        first = run_protocol(proto, METHODS, store, executor=pair, max_tasks=10, **common)
        assert [s.ran for s in first] == [10] * 6
        rest = run_protocol(proto, METHODS, store, executor=pair, **common)
        assert [(s.ran, s.skipped) for s in rest] == [(N_TASKS - 10, 10)] * 6
    serial, parallel = rows(tmp_path / "serial.sqlite"), rows(tmp_path / "par.sqlite")
    assert len(serial) == 3 * 2 * N_TASKS
    assert serial.equals(parallel)
    # map splits one call across both workers and keeps the input order
    handle = pair.open(METHODS[0], "cpu")
    tasks = [b.task for b in _assembled(proto, pool, tmp_path, 8)]
    scores, settings = pair.map(handle, tasks, list(range(8)))
    pair.release(handle)
    serial = shared_executor()
    alone = serial.open(METHODS[0], "cpu")
    one, _ = serial.map(alone, tasks, list(range(8)))
    serial.release(alone)
    assert len(scores) == 8 and settings == ["inductive"] * 8
    assert all((a == b).all() for a, b in zip(scores, one, strict=True))


def _assembled(proto, pool, workdir, n):
    import numpy as np

    from fewshot_bench.run.assemble import assemble_task
    from fewshot_bench.tasks.manifest import load_task_sets
    from fewshot_bench.tasks.task import task_truth

    manifest = load_task_sets(proto, pool, workdir, [0])[0]
    feats = pool.data.images.reshape(len(pool.data), -1).float() / 255
    labels = np.asarray(pool.data.labels)
    out = []
    for i in range(n):
        idx = manifest.task(i)
        out.append(assemble_task(feats, "features", idx, task_truth(idx, labels), 0, i))
    return out


def test_parallel_workers_report_the_threads_they_were_given(pair) -> None:
    """Rows of a --executor processes run record the threads each worker got (cores // jobs
    unless OMP_NUM_THREADS is set)."""
    expected = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
    assert pair.worker_threads == int(expected)
    assert {lane.executor.worker_threads for lane in pair.lanes} == {int(expected)}


def test_a_task_assembled_without_its_pool_keeps_support_and_queries(small, tmp_path) -> None:
    """Inductive methods never receive the unlabeled pool, so the runner skips assembling it;
    what they do receive is the same bytes in the same order."""
    import numpy as np
    import torch

    from fewshot_bench.run.assemble import assemble_task
    from fewshot_bench.tasks.manifest import load_task_sets
    from fewshot_bench.tasks.task import task_truth

    proto, pool = small
    manifest = load_task_sets(proto, pool, tmp_path, [0])[0]
    feats = pool.data.images.reshape(len(pool.data), -1).float() / 255
    labels = np.asarray(pool.data.labels)
    for i in range(3):
        idx = manifest.task(i)
        full, lean = (
            assemble_task(feats, "features", idx, task_truth(idx, labels), 0, i, unlabeled=u)
            for u in (True, False)
        )
        assert full.task.unlabeled.shape[0] > 0 and lean.task.unlabeled.shape[0] == 0
        assert lean.task.unlabeled.shape[1:] == full.task.unlabeled.shape[1:]
        for name in ("support", "support_labels", "query"):
            assert torch.equal(getattr(full.task, name), getattr(lean.task, name))
        np.testing.assert_array_equal(full.truth.query_labels, lean.truth.query_labels)
        np.testing.assert_array_equal(full.query_order, lean.query_order)
        assert lean.truth.unlabeled_labels.size == 0


def test_training_method_fits_once_and_every_worker_gets_its_state(
    shared_data, tmp_path, monkeypatch
):
    plugin = tmp_path / "trainer.py"
    plugin.write_text(TRAINER)
    log = tmp_path / "log.txt"
    monkeypatch.setenv("FSBENCH_TEST_LOG", str(log))
    # the probe counts fits in a file shared by the workers, which their sandbox forbids
    monkeypatch.setenv("FSBENCH_SANDBOX", "0")
    proto = load_protocol_file(write_protocol(tmp_path, fit=True))[0]
    pool = load_pool(proto, shared_data)
    salt = str(tmp_path)  # a configuration no earlier run has cached a state for
    specs = [MethodSpec("scaled-prototype", {"salt": salt})]
    common = dict(
        workdir=tmp_path, root=shared_data, pool=pool, progress=False, batch_size=4, device="cpu"
    )
    ex = ParallelExecutor((str(plugin),), jobs=2)
    try:
        with ResultsStore(tmp_path / "par.sqlite") as store:
            run_protocol(proto, specs, store, executor=ex, **common)
        lines = log.read_text().split()
        fits = [p for kind, p in zip(lines[::2], lines[1::2], strict=True) if kind == "fit"]
        predicts = {p for kind, p in zip(lines[::2], lines[1::2], strict=True) if kind == "predict"}
        assert len(fits) == 1, "fit must run once per configuration"
        assert len(predicts) == 2, "both workers score tasks (the second from the state bytes)"
        # a trained method that keeps no state runs only in the worker that trained it
        log.write_text("")
        nostate = [MethodSpec("stateless-trainer", {"salt": salt})]
        with ResultsStore(tmp_path / "nostate.sqlite") as store:
            run_protocol(proto, nostate, store, executor=ex, **common)
        lines = log.read_text().split()
        assert lines.count("fit") == 1 and len(set(lines[1::2])) == 1
    finally:
        ex.close()
    # the serial run loads the cached state (no second fit) and scores every task alike
    log.write_text("")
    serial = ParallelExecutor((str(plugin),), jobs=1)
    try:
        with ResultsStore(tmp_path / "serial.sqlite") as store:
            run_protocol(proto, specs, store, executor=serial, **common)
    finally:
        serial.close()
    assert "fit" not in log.read_text()
    assert rows(tmp_path / "serial.sqlite").equals(rows(tmp_path / "par.sqlite"))


def write_sweep(folder: Path, proto: Path, data: Path, extra: str = "") -> Path:
    path = folder / "small.toml"
    path.write_text(
        textwrap.dedent(f"""
        protocols = ["{proto}"]
        methods = ["nearest-prototype", {{ spec = "logistic-regression:max_iter=25", num_cpus = 1 }}]
        seeds = [0, 1]
        [run]
        workdir = "{folder / "runs"}"
        data_root = "{data}"
        batch_size = 8
        max_tasks = 24
        [executor]
        kind = "processes"
        jobs = 2
    """)
        + extra
    )
    return path


def test_sweep_runs_every_cell_and_status_reads_the_store(shared_data, tmp_path, capsys):
    sweep = write_sweep(tmp_path, write_protocol(tmp_path), shared_data)
    assert main(["sweep", "--status", str(sweep)]) == 2
    assert "has not started" in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4/4 cells done, 96/96 tasks (100.0%)" in out
    assert main(["sweep", "--status", str(sweep)]) == 0
    status = capsys.readouterr().out
    assert "omni-exec  logistic-regression:max_iter=25  pixels    1     24/24" in status
    assert "4/4 cells done" in status
    df = load_results(tmp_path / "runs" / "results.sqlite")
    assert len(df) == 96 and set(df.seed) == {0, 1}
    # a rerun resumes: nothing left to do
    assert main(["sweep", str(sweep), "--quiet", "--executor", "serial"]) == 0
    assert len(load_results(tmp_path / "runs" / "results.sqlite")) == 96


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('methods = ["diffusion"]', "protocols: missing"),
        ('protocols = ["p"]\nmethods = []', "methods: must be a non-empty list"),
        ('protocols = ["p"]\nmethods = [3]', "methods[0]: 3 is neither"),
        ('protocols = ["p"]\nmethods = [{ spec = "x", gpus = 1 }]', "methods[0]: unknown key(s)"),
        ('protocols = ["p"]\nmethods = [{ spec = "x", num_gpus = -1 }]', "num_gpus = -1"),
        ('protocols = ["p"]\nmethods = [{ spec = "x", memory = "lots" }]', "methods[0].memory"),
        ('protocols = ["p"]\nmethods = ["x"]\nseeds = [-1]', "seeds: -1 is not an integer >= 0"),
        ('protocols = ["p"]\nmethods = ["x"]\nsteps = 3', "top level: unknown key(s) ['steps']"),
        ('protocols = ["p"]\nmethods = ["x"]\n[executor]\nkind = "mpi"', "[executor] kind: 'mpi'"),
        (
            'protocols = ["p"]\nmethods = ["x"]\n[executor]\nkind = "processes"\naddress = "auto"',
            "[executor] address: given for kind 'processes'",
        ),
        ('protocols = ["p"]\nmethods = ["x"]\n[run]\nbatch_size = 0', "[run] batch_size: 0"),
        ("protocols = [", "invalid TOML"),
    ],
)
def test_bad_sweep_files_get_one_line_errors(tmp_path, capsys, body, expected):
    path = tmp_path / "bad.toml"
    path.write_text(body + "\n")
    with pytest.raises(FsbenchError) as info:
        load_sweep(path)
    assert expected in str(info.value)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsbench: error: ") and str(path) in err


def test_sweep_parses_resources_and_overrides(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        textwrap.dedent("""
        name = "grid"
        protocols = "omniglot-5w1s"
        methods = ["diffusion:k=20", { spec = "protonet", num_gpus = 1, memory = "1.5GiB" }]
        backbones = ["pixels"]
        [executor]
        kind = "processes"
        jobs = 3
    """)
    )
    sweep = load_sweep(path)
    assert sweep.name == "grid" and sweep.protocols == ["omniglot-5w1s"]
    assert sweep.methods[0].spec == MethodSpec("diffusion", {"k": 20})
    gpu = sweep.resources_of(MethodSpec("protonet"))
    assert (gpu.num_cpus, gpu.num_gpus, gpu.memory, gpu.device) == (1, 1, 1610612736, "cuda")
    assert sweep.resources_of(MethodSpec("diffusion", {"k": 20})).device == "cpu"
    # another executor on the command line drops the file's settings for its own executor
    ray = load_sweep(path, executor="ray", address="127.0.0.1:6379")
    assert (ray.executor, ray.jobs, ray.address) == ("ray", None, "127.0.0.1:6379")


def test_executor_flags_are_checked(monkeypatch, tmp_path, capsys):
    with pytest.raises(FsbenchError, match="--address is for --executor ray"):
        make_executor("processes", address="auto")
    with pytest.raises(FsbenchError, match="--jobs needs --executor processes or ray"):
        make_executor("serial", jobs=2)
    with pytest.raises(FsbenchError, match="--jobs must be an integer >= 1"):
        make_executor("processes", jobs=0)
    # without Ray installed, --executor ray says how to install it
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FsbenchError, match=r"pip install -e '\.\[ray\]'"):
        make_executor("ray")
    code = main(["run", "omniglot-5w1s", "-m", "nearest-prototype", "--executor", "ray"])
    assert code == 2 and "pip install -e '.[ray]'" in capsys.readouterr().err


def test_worker_threads_follow_the_job_count(monkeypatch):
    """Each of N workers gets cores // N threads unless OMP_NUM_THREADS is set already."""
    seen = {}

    class Probe:
        def __init__(self, plugins=(), *, env=None):
            seen.setdefault("env", env)
            self.alive = True

        def close(self):
            pass

    monkeypatch.setattr("fewshot_bench.run.executor.ProcessExecutor", Probe)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ParallelExecutor(jobs=2).close()
    expected = str(max(1, (os.cpu_count() or 1) // 2))
    assert seen["env"] == {"OMP_NUM_THREADS": expected, "MKL_NUM_THREADS": expected}
    seen.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ParallelExecutor(jobs=2).close()
    assert seen["env"] is None


def test_a_failing_method_stops_the_run_and_keeps_what_finished(small, tmp_path, monkeypatch):
    from fewshot_bench.run.executor import MethodError

    proto, pool = small
    plugin = tmp_path / "trainer.py"
    plugin.write_text(TRAINER)
    monkeypatch.setenv("FSBENCH_TEST_LOG", str(tmp_path / "log.txt"))
    ex = ParallelExecutor((str(plugin),), jobs=2)
    try:
        with ResultsStore(tmp_path / "r.sqlite") as store, pytest.raises(MethodError, match="boom"):
            run_protocol(
                proto,
                [MethodSpec("broken-after-two")],
                store,
                workdir=tmp_path,
                pool=pool,
                progress=False,
                batch_size=4,
                executor=ex,
            )
    finally:
        start = time.perf_counter()
        ex.close()
        assert time.perf_counter() - start < 30
    stored = load_results(tmp_path / "r.sqlite")
    # each worker scored two chunks before failing; the driver stored the ones before the failure
    assert 4 <= len(stored) <= 16 and len(stored) % 4 == 0


def test_example_sweeps_parse():
    for path in sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.toml")):
        sweep = load_sweep(path)
        assert sweep.methods and sweep.protocols, path
