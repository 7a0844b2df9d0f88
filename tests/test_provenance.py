"""Rows are bound to their tasks, code and weights; resume reuses a row only when all match;
``fsbench audit`` flags order-dependent methods and stale rows. Real runner, real Omniglot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from run_helpers import run_quietly

from fewshot_bench.cli import main
from fewshot_bench.errors import ManifestError
from fewshot_bench.run.audit import audit_method
from fewshot_bench.run.executor import MethodSpec, ProcessExecutor
from fewshot_bench.run.fixtures import write_episodic_protocol
from fewshot_bench.run.store import load_results
from fewshot_bench.tasks.protocol import load_pool, load_protocol_file

HERE = Path(__file__).resolve().parent
PROBES = str(HERE / "probe_methods.py")
HOSTILE = str(HERE / "hostile_methods.py")
N_TASKS = 12


def write_protocol(folder: Path, n_query: int = 3, seeds: tuple[int, ...] = (0,)) -> Path:
    return write_episodic_protocol(
        folder, "omni-prov", n_query=n_query, n_tasks=N_TASKS, seeds=seeds
    )


@pytest.fixture(scope="module")
def executor():
    ex = ProcessExecutor(plugins=(PROBES, HOSTILE))
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def pool(shared_data, tmp_path_factory):
    proto = load_protocol_file(write_protocol(tmp_path_factory.mktemp("p")))[0]
    return load_pool(proto, shared_data)


def _run(proto, spec, workdir, pool, executor, **kw):
    return run_quietly(proto, [spec], workdir, pool=pool, executor=executor, **kw)[0]


def test_rows_describe_themselves(tmp_path, pool, executor):
    proto = load_protocol_file(write_protocol(tmp_path))[0]
    _run(proto, MethodSpec("nearest-prototype", {"normalize": "none"}), tmp_path, pool, executor)
    df = load_results(tmp_path / "results.sqlite")
    assert len(df) == N_TASKS
    row = df.iloc[0]
    assert row.family == "omni-prov" and row.task_source == "sampled"
    assert len(row.manifest_hash) >= 16 and len(row.code_fingerprint) == 16
    assert json.loads(row.params) == {"normalize": "none"}
    assert row.data_fingerprint == pool.fingerprint()
    assert row.hardware and row.package_version


def test_rows_record_the_worker_threads_when_they_are_set(tmp_path, pool):
    """BLAS sums depend on the thread count, so a row says how many CPU threads its worker was
    given (OMP_NUM_THREADS) where that differs from the cores."""
    import os

    from fewshot_bench.run.provenance import hardware

    proto = load_protocol_file(write_protocol(tmp_path))[0]
    one = ProcessExecutor(env={"OMP_NUM_THREADS": "1"})
    try:
        assert one.worker_threads == 1
        _run(proto, MethodSpec("nearest-prototype"), tmp_path, pool, one)
    finally:
        one.close()
    recorded = set(load_results(tmp_path / "results.sqlite").hardware)
    assert recorded == {hardware("cpu", 1)}
    cores = os.cpu_count()
    assert hardware("cpu", cores) == hardware("cpu") == hardware("cpu", None)
    if cores and cores > 1:
        assert hardware("cpu", 1).endswith(f"({cores} cores, 1 thread)")


def test_a_file_named_by_a_parameter_is_hashed(tmp_path, pool, executor):
    """Retraining a checkpoint at the same path (here: rewriting the file a parameter names)
    makes the stored rows stale: every task runs again."""
    proto = load_protocol_file(write_protocol(tmp_path))[0]
    weights = tmp_path / "weights.txt"
    weights.write_text("1.0")
    spec = MethodSpec("file-scaled", {"weights": str(weights)})
    assert _run(proto, spec, tmp_path, pool, executor).ran == N_TASKS
    assert _run(proto, spec, tmp_path, pool, executor).skipped == N_TASKS
    weights.write_text("2.0")
    again = _run(proto, spec, tmp_path, pool, executor)
    assert (again.ran, again.skipped) == (N_TASKS, 0)
    assert load_results(tmp_path / "results.sqlite").config_hash.nunique() == 2


def test_editing_a_method_makes_its_rows_stale(tmp_path, pool):
    proto = load_protocol_file(write_protocol(tmp_path))[0]
    plugin = tmp_path / "my_method.py"
    shutil.copy(PROBES, plugin)
    spec = MethodSpec("slow-prototype")
    with _closing(str(plugin)) as ex:
        assert _run(proto, spec, tmp_path, pool, ex).ran == N_TASKS
        assert _run(proto, spec, tmp_path, pool, ex).ran == 0
    plugin.write_text(plugin.read_text() + "\n# an edit that changes the source\n")
    with _closing(str(plugin)) as ex:
        assert _run(proto, spec, tmp_path, pool, ex).ran == N_TASKS
    assert load_results(tmp_path / "results.sqlite").code_fingerprint.nunique() == 2


class _closing:
    def __init__(self, plugin: str) -> None:
        self.ex = ProcessExecutor(plugins=(plugin,))

    def __enter__(self) -> ProcessExecutor:
        return self.ex

    def __exit__(self, *exc) -> None:
        self.ex.close()


def test_changed_protocol_never_reuses_rows(tmp_path, pool, executor):
    """Editing the protocol and deleting its manifest (as the error advises) runs every task
    again under the new manifest hash instead of reporting them as already stored."""
    proto = load_protocol_file(write_protocol(tmp_path, n_query=3))[0]
    spec = MethodSpec("nearest-prototype")
    _run(proto, spec, tmp_path, pool, executor)
    edited = load_protocol_file(write_protocol(tmp_path, n_query=4))[0]
    with pytest.raises(ManifestError, match="protocol file changed"):
        _run(edited, spec, tmp_path, pool, executor)
    shutil.rmtree(tmp_path / "manifests")
    again = _run(edited, spec, tmp_path, pool, executor)
    assert (again.ran, again.skipped) == (N_TASKS, 0)
    df = load_results(tmp_path / "results.sqlite")
    assert df.manifest_hash.nunique() == 2 and len(df) == 2 * N_TASKS


def test_imported_episodes_are_one_task_set_and_not_confused_with_sampled(
    tmp_path, shared_data, capsys
):
    proto_path = write_protocol(tmp_path, seeds=(0, 1, 2))
    work = tmp_path / "runs"
    base = ["--workdir", str(work), "--data-root", str(shared_data)]
    assert main(["episodes", str(proto_path), "--export", str(tmp_path / "ep.jsonl"), *base]) == 0
    run = ["run", str(proto_path), "-m", "nearest-prototype", "--quiet", *base]
    assert main(run) == 0
    assert main(["episodes", str(proto_path), "--import", str(tmp_path / "ep.jsonl"), *base]) == 2
    lines = (tmp_path / "ep.jsonl").read_text().splitlines()[:5]
    (tmp_path / "five.jsonl").write_text("\n".join(lines) + "\n")
    imp = ["episodes", str(proto_path), "--import", str(tmp_path / "five.jsonl"), "--force"]
    assert main([*imp, *base]) == 0
    out = capsys.readouterr().out
    assert "5 imported tasks" in out
    capsys.readouterr()
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "5 run, 0 already stored" in out and "seed 1" not in out
    df = load_results(work / "results.sqlite")
    imported = df[df.task_source.str.startswith("imported:")]
    assert len(imported) == 5 and set(imported.seed) == {0}
    assert len(df) == 3 * N_TASKS + 5
    assert main([*run, "--seeds", "1"]) == 2


def test_audit_flags_order_dependent_methods_and_checks_stored_rows(tmp_path, pool, executor):
    proto = load_protocol_file(write_protocol(tmp_path))[0]
    _run(proto, MethodSpec("nearest-prototype"), tmp_path, pool, executor)
    kw = {"workdir": tmp_path, "n_tasks": 6, "executor": executor, "pool": pool}
    good = audit_method(proto, MethodSpec("nearest-prototype"), **kw)
    assert good.ok and good.agreement >= 0.99 and good.stored_checked == 6
    bad = audit_method(proto, MethodSpec("position-only"), **kw)
    assert bad.order_dependent and bad.agreement < 0.8
    assert "ORDER-DEPENDENT" in "\n".join(bad.lines())


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_state_file_is_refused_not_executed(tmp_path):
    import torch

    from fewshot_bench.errors import FsbenchError
    from fewshot_bench.methods.episodic import load_state_file

    marker = tmp_path / "pwned"
    crafted = tmp_path / "state.pt"
    torch.save({"arch": "conv4", "payload": _Exploit(marker)}, crafted)
    with pytest.raises(FsbenchError, match="cannot be read as a saved state"):
        load_state_file(crafted)
    assert not marker.exists()
