"""``fsbench run`` starts its worker before its own imports and the serial executor adopts it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fewshot_bench.cli import _starts_serial_run
from fewshot_bench.run import spawn
from fewshot_bench.run.executor import MethodSpec, ProcessExecutor


@pytest.mark.parametrize(
    ("argv", "early"),
    [
        (["run", "fashion-mnist-ssl", "-m", "diffusion"], True),
        (["run", "p", "--executor", "serial"], True),
        (["run", "p", "--executor=serial"], True),
        (["run", "p", "--executor", "processes", "--jobs", "2"], False),
        (["run", "p", "--executor=ray"], False),
        (["run", "--help"], False),
        (["report"], False),
        ([], False),
    ],
)
def test_which_commands_start_a_worker_early(argv, early, monkeypatch):
    monkeypatch.delitem(sys.modules, "fewshot_bench.run.executor", raising=False)
    assert _starts_serial_run(argv) is early


def test_a_process_that_has_run_starts_no_second_worker():
    import fewshot_bench.run.executor  # noqa: F401  (imported: this process has its worker)

    assert not _starts_serial_run(["run", "p"])


def test_the_early_worker_is_adopted_and_answers(monkeypatch):
    spawn.start_early()
    early = spawn._EARLY
    assert early is not None and early.proc.poll() is None
    ex = ProcessExecutor(spawned=spawn.claim_early())
    try:
        assert ex.proc is early.proc and spawn._EARLY is None
        assert ex.describe(MethodSpec("nearest-prototype"))["name"] == "nearest-prototype"
    finally:
        ex.close()
    assert early.proc.poll() == 0 and not Path(early.folder).exists()


def test_an_early_worker_started_with_another_environment_is_discarded(monkeypatch):
    spawn.start_early()
    early = spawn._EARLY
    monkeypatch.setenv("FSBENCH_TEST_CHANGED", "1")  # e.g. set by the command after the start
    assert spawn.claim_early() is None
    assert early.proc.poll() is not None and not Path(early.folder).exists()
    assert spawn.claim_early() is None  # nothing left to claim
    with pytest.raises(OSError):
        os.fstat(early.to_worker)


def test_folders_of_runners_that_are_gone_are_removed(tmp_path):
    """A runner killed outright leaves its worker's folder; the next worker start removes it."""
    import subprocess

    from fewshot_bench.atomic import owner_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {
        "dead": tmp_path / f"{spawn.FOLDER_PREFIX}{owner_tag(dead.pid)}-k2j4h5g6",
        "alive": tmp_path / f"{spawn.FOLDER_PREFIX}{owner_tag()}-a1b2c3d4",
        "other host": tmp_path / f"{spawn.FOLDER_PREFIX}w{dead.pid}-1@elsewhere-a1b2c3d4",
        "no owner": tmp_path / f"{spawn.FOLDER_PREFIX}q8w7e6r5",
    }
    for folder in folders.values():
        (folder / "graphs").mkdir(parents=True)
    assert spawn.remove_stale_folders(str(tmp_path)) == [str(folders["dead"])]
    assert not folders["dead"].exists()
    assert all(folders[k].exists() for k in ("alive", "other host", "no owner"))


def test_a_workers_folder_names_its_runner(tmp_path):
    from fewshot_bench.atomic import owner_tag

    ex = ProcessExecutor()
    try:
        name = Path(ex._worker.folder).name
        assert name.startswith(f"{spawn.FOLDER_PREFIX}{owner_tag()}-")
    finally:
        ex.close()
