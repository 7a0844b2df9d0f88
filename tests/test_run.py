"""Registry, runner, resume after kill -9, concurrent writers and the leakage guard, on real Omniglot."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import count_rows, run_quietly

from fewshot_bench.errors import FsbenchError, ProtocolError
from fewshot_bench.methods import (
    Method,
    available_methods,
    get_method,
    register_method,
)
from fewshot_bench.run.executor import MethodSpec
from fewshot_bench.run.fixtures import write_episodic_protocol
from fewshot_bench.run.runner import run_protocol, score_task
from fewshot_bench.run.store import COLUMNS, ResultRow, ResultsStore, load_results
from fewshot_bench.tasks.protocol import load_pool, load_protocol_file
from fewshot_bench.tasks.task import TaskTruth

REPO = Path(__file__).resolve().parents[1]
PROBES = str(Path(__file__).with_name("probe_methods.py"))
N_TASKS = 60


def write_protocol(folder: Path, n_tasks: int = N_TASKS) -> Path:
    return write_episodic_protocol(
        folder, "omni-small", n_unlabeled=2, n_distractor=2, n_tasks=n_tasks
    )


@pytest.fixture(scope="module")
def small(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proto")
    proto = load_protocol_file(write_protocol(folder))[0]
    return proto, load_pool(proto, shared_data)


def test_builtin_methods_registered():
    methods = available_methods()
    assert {"nearest-prototype", "logistic-regression"} <= set(methods)
    assert methods["nearest-prototype"].setting == "inductive"
    with pytest.raises(ProtocolError, match="unknown method"):
        get_method("nope")
    with pytest.raises(ProtocolError, match="no parameter"):
        get_method("nearest-prototype")(colour="red")


def test_register_method_validates():
    with pytest.raises(TypeError):
        register_method("x")(object)

    class Bad(Method):
        setting = "clairvoyant"

    with pytest.raises(ValueError, match="setting"):
        register_method("bad")(Bad)


def test_run_and_resume_in_process(small, tmp_path):
    proto, pool = small
    methods = [get_method("nearest-prototype")(), get_method("logistic-regression")(max_iter=25)]
    with ResultsStore(tmp_path / "results.sqlite") as store:
        first = run_protocol(
            proto, methods, store, workdir=tmp_path, pool=pool, max_tasks=20, progress=False
        )
        assert [s.ran for s in first] == [20, 20]
        second = run_protocol(proto, methods, store, workdir=tmp_path, pool=pool, progress=False)
        assert [(s.ran, s.skipped) for s in second] == [(N_TASKS - 20, 20)] * 2
    df = load_results(tmp_path / "results.sqlite")
    assert len(df) == 2 * N_TASKS
    assert not df.duplicated(["method", "seed", "task_index"]).any()
    proto_acc = df[df.method == "nearest-prototype"].accuracy.mean()
    # pixels on Omniglot 5-way 1-shot: far above chance (20%), far below a learned metric
    assert 0.35 < proto_acc < 0.9
    assert set(df.setting) == {"inductive"} and set(df.device) == {"cpu"}


def make_row(**overrides) -> ResultRow:
    """A full v2 row with every field filled (overrides change some)."""
    values = {f: "x" for f in COLUMNS}
    values.update(
        budget=None,
        seed=0,
        task_index=0,
        accuracy=0.5,
        top5=None,
        n_query=10,
        seconds=0.1,
        x_value=1.0,
    )
    values.update(overrides)
    return ResultRow(**values)


def test_store_is_append_only(tmp_path):
    row = make_row()
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert store.append([row, row]) == 1
        assert store.append([row]) == 0
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            store.conn.execute("DELETE FROM results")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            store.conn.execute("UPDATE results SET accuracy = 1.0")
        assert store.dataframe().accuracy.tolist() == [0.5]
    (tmp_path / "junk.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(FsbenchError, match="not a readable SQLite"):
        ResultsStore(tmp_path / "junk.sqlite")


def test_store_refuses_old_and_foreign_schemas_and_never_creates_on_read(tmp_path):
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as c:
        c.execute("CREATE TABLE results (protocol TEXT, accuracy REAL)")
        c.execute("INSERT INTO results VALUES ('p', 0.5)")
    with pytest.raises(FsbenchError, match="schema version 0.*new --workdir"):
        ResultsStore(old)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE songs (title TEXT)")
    with pytest.raises(FsbenchError, match="another program"):
        ResultsStore(foreign)
    with pytest.raises(FsbenchError, match="no results store"):
        load_results(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(FsbenchError, match="no results table"):
        load_results(empty)
    assert empty.stat().st_size == 0


def test_score_task_rejects_bad_scores():
    truth = TaskTruth(query_labels=np.array([0, 1]), unlabeled_labels=np.array([], dtype=np.int64))
    assert score_task(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), truth, 2, "m", False)[0] == 1.0
    with pytest.raises(FsbenchError, match="shape"):
        score_task(torch.zeros(3, 2), truth, 2, "m", False)
    with pytest.raises(FsbenchError, match="NaN"):
        score_task(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), truth, 2, "m", False)


def test_what_a_method_receives(small, tmp_path):
    """The inspector plugin asserts (inside the worker) that a Task holds support, support labels,
    unlabeled and query items only, as fresh copies, not in class order; a failed assertion
    there fails the run."""
    proto, pool = small
    run_quietly(
        proto, [MethodSpec("inspector")], tmp_path, pool=pool, max_tasks=16, plugins=(PROBES,)
    )
    assert len(load_results(tmp_path / "results.sqlite")) == 16


def _spawn(delay: float, proto: Path, workdir: Path, data: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fewshot_bench", "run", str(proto), "-m", "slow-prototype"]
    cmd += ["--plugin", PROBES, "--workdir", str(workdir), "--data-root", str(data)]
    cmd += ["--batch-size", "2", "--quiet"]
    env = {**os.environ, "FSBENCH_TEST_DELAY": str(delay)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_resume_after_kill_9(shared_data, tmp_path):
    proto = write_protocol(tmp_path)
    db = tmp_path / "runs" / "results.sqlite"
    proc = _spawn(0.05, proto, tmp_path / "runs", shared_data)
    deadline = time.time() + 120
    while count_rows(db) < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = count_rows(db)
    assert 10 <= partial < N_TASKS, f"kill landed after {partial} rows"
    rerun = _spawn(0.0, proto, tmp_path / "runs", shared_data)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"{N_TASKS - partial} run, {partial} already stored" in out
    df = load_results(db)
    assert len(df) == N_TASKS and sorted(df.task_index) == list(range(N_TASKS))
    # the same numbers as an uninterrupted run of the same method
    ref = run_quietly(
        load_protocol_file(proto)[0],
        [MethodSpec("slow-prototype")],
        tmp_path / "runs",
        store=tmp_path / "ref.sqlite",
        root=shared_data,
        plugins=(PROBES,),
    )[0]
    assert np.allclose(df.sort_values("task_index").accuracy.to_numpy(), ref.accuracies)


def test_concurrent_writers(shared_data, tmp_path):
    proto = write_protocol(tmp_path)
    procs = [_spawn(0.01, proto, tmp_path / "runs", shared_data) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    db = tmp_path / "runs" / "results.sqlite"
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    df = load_results(db)
    assert len(df) == N_TASKS and not df.duplicated(["seed", "task_index"]).any()


def test_entry_point_plugin(tmp_path):
    """Install a third-party package into a temporary prefix; `fsbench methods` must list its method."""
    target = tmp_path / "site"
    source = shutil.copytree(
        REPO / "tests" / "plugin_pkg", tmp_path / "plugin_pkg"
    )  # builds stay out of the repo
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-m", "fewshot_bench", "methods"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "example-centroid" in out
    code = (
        "from fewshot_bench.methods import get_method; m = get_method('example-centroid')(scale=3.0); "
        "print(m.name, m.params['scale'], m.consumes)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert out.split() == ["example-centroid", "3.0", "features"]


def test_worker_exits_when_its_runner_is_killed(shared_data, tmp_path):
    """A runner killed while its worker is busy must not leave the worker running."""
    proto = write_protocol(tmp_path)
    proc = _spawn(30.0, proto, tmp_path / "runs", shared_data)  # each batch sleeps 30 s
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and not workers:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        workers = [int(p) for p in out.stdout.split()]
        time.sleep(0.2)
    assert workers, "the runner started no worker"
    time.sleep(3)  # let the worker get into its long predict
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
