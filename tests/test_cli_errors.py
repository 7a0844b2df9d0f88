"""User mistakes on the real `fsbench` command line: each is one `fsbench: error: ...` line that
names the problem and the fix, exit code 2, no traceback, and nothing already stored changes.
Runs are real (nearest-prototype on 6 Omniglot tasks, in this process)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch

from fewshot_bench.cli import main
from fewshot_bench.run.fixtures import write_episodic_protocol

N_TASKS = 6
STORED = 3  # tasks in the `stored` workdir's store


@pytest.fixture(scope="module")
def proto(tmp_path_factory) -> Path:
    return write_episodic_protocol(tmp_path_factory.mktemp("proto"), "tiny", n_tasks=N_TASKS)


def run_args(proto: Path, workdir: Path, data: Path, *extra: str) -> list[str]:
    return [
        "run", str(proto), "-m", "nearest-prototype", "--backbone", "pixels", "--quiet",
        "--workdir", str(workdir), "--data-root", str(data), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stored(proto, shared_data, tmp_path_factory) -> Path:
    """A workdir whose store holds a real run of the first ``STORED`` tasks (do not change it:
    tests copy it)."""
    wd = tmp_path_factory.mktemp("stored") / "runs"
    assert main(run_args(proto, wd, shared_data, "--max-tasks", str(STORED))) == 0
    return wd


def copy_of(stored: Path, tmp_path: Path) -> Path:
    wd = tmp_path / "runs"
    shutil.copytree(stored, wd)
    return wd


def error_line(capsys) -> str:
    """The one error line of the last command (notes may come before it, nothing else)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("fsbench: error: "), err
    assert all(line.startswith("fsbench: note: ") for line in lines[:-1]), err
    return lines[-1]


def rows(store: Path) -> int:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
        n = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    conn.close()
    return n


# 1. bad numbers and devices: refused before anything is created or run


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--batch-size", "-4"], "--batch-size must be an integer >= 1, got -4"),
        (["--max-tasks", "0"], "--max-tasks must be an integer >= 1, got 0"),
        (["--max-tasks", "-1"], "--max-tasks must be an integer >= 1, got -1"),
        (["--seeds", "-1"], "--seeds must be integers >= 0"),
        (["--device", "foo"], "--device 'foo' is not a device; use auto, cpu, cuda or cuda:N"),
        (["--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
        (["--executor", "processes", "--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
        (["--budget", "-1"], "--budget must be an integer >= 0, got -1"),
        (["--save-state", "{tmp}/no/such/folder/s.pt"], "folder {tmp}/no/such/folder does not"),
        (["--save-state", "{tmp}"], "--save-state {tmp} is a folder; give a file name"),
    ],
)
def test_bad_run_options(proto, shared_data, tmp_path, capsys, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    wd = tmp_path / "runs"
    assert main(run_args(proto, wd, shared_data, *extra)) == 2
    assert message.format(tmp=tmp_path) in error_line(capsys)
    assert not wd.exists()  # refused before a manifest or a store was created


def test_bad_options_leave_a_store_as_it_was(proto, stored, shared_data, tmp_path, capsys):
    wd = copy_of(stored, tmp_path)
    before = (wd / "results.sqlite").read_bytes()
    assert main(run_args(proto, wd, shared_data, "--batch-size", "-4")) == 2
    assert "--batch-size must be an integer >= 1, got -4" in error_line(capsys)
    assert (wd / "results.sqlite").read_bytes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu(proto, shared_data, tmp_path, capsys):
    assert main(run_args(proto, tmp_path / "runs", shared_data, "--device", "cuda")) == 2
    assert "torch sees no CUDA device; use --device auto or cpu" in error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_bad_audit_and_sweep_numbers(proto, tmp_path, capsys):
    audit = ["audit", str(proto), "-m", "nearest-prototype", "--workdir", str(tmp_path / "r")]
    assert main([*audit, "--budget", "-2"]) == 2
    assert "--budget must be an integer >= 0, got -2" in error_line(capsys)
    assert main([*audit, "--seed", "-1"]) == 2
    assert "--seed must be an integer >= 0, got -1" in error_line(capsys)
    assert main(["sweep", str(tmp_path / "s.toml"), "--jobs", "0"]) == 2
    assert "--jobs must be an integer >= 1, got 0" in error_line(capsys)


# 2. output paths: checked before anything is computed or written


def test_episodes_export_paths(proto, shared_data, tmp_path, capsys):
    episodes = ["episodes", str(proto), "--workdir", str(tmp_path / "runs")]
    cases = {
        str(tmp_path / "missing" / "e.jsonl"): f"folder {tmp_path / 'missing'} does not exist; "
        "create it first",
        str(tmp_path): f"--export {tmp_path} is a folder; give a file name inside it",
        str(tmp_path / "{proto}.jsonl"): "only {protocol} and {seed} expand",
        str(tmp_path / "{protocol"): "only {protocol} and {seed} expand",
    }
    for export, message in cases.items():
        assert main([*episodes, "--export", export]) == 2
        assert message in error_line(capsys)
    assert main([*episodes, "--show", "-1"]) == 2
    assert "--show must be an integer >= 0, got -1" in error_line(capsys)
    assert main([*episodes, "--seeds", "-1"]) == 2
    assert "--seeds must be an integer >= 0, got -1" in error_line(capsys)
    assert main([*episodes, "--import", str(tmp_path / "none.jsonl")]) == 2
    assert "--import" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no workdir, no export
    # one file for several task sets: each overwrites the last, which the note says
    both = [*episodes, "--seeds", "0", "1", "--data-root", str(shared_data)]
    assert main([*both, "--export", str(tmp_path / "e.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "ends up holding only the last (tiny seed 1); put {protocol} and {seed}" in err


def test_leaderboard_out_paths(stored, tmp_path, capsys):
    lb = ["leaderboard", "tiny", "--workdir", str(stored)]
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main([*lb, "--out", str(afile)]) == 2
    assert f"--out {afile} is a file, not a folder; give a folder" in error_line(capsys)
    assert main([*lb, "--out", str(afile / "lb")]) == 2
    assert f"--out {afile / 'lb'}: {afile} is a file, not a folder" in error_line(capsys)
    assert afile.read_text() == "keep me"
    assert main([*lb, "--name", "../up", "--out", str(tmp_path / "lb")]) == 2
    assert "must be a plain file name" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    deep = tmp_path / "new" / "lb"  # an output folder is created, with its parents
    assert main([*lb, "--out", str(deep)]) == 0
    assert (deep / "tiny.md").is_file()


# 3. results stores that are missing, empty, foreign or damaged: never created or changed


@pytest.mark.parametrize("command", [["report"], ["leaderboard", "--all"]])
def test_report_never_creates_a_store(tmp_path, capsys, command):
    out = ["--out", str(tmp_path / "lb")] if command[0] == "leaderboard" else []
    missing = tmp_path / "nowhere"
    assert main([*command, "--workdir", str(missing), *out]) == 2
    line = error_line(capsys)
    assert "no results store" in line and f"(the folder {missing} does not exist)" in line
    assert f"`fsbench run PROTOCOL -m METHOD --workdir {missing}`" in line
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*command, "--workdir", str(empty), *out]) == 2
    assert "no results store" in error_line(capsys)
    assert list(empty.iterdir()) == []
    (empty / "results.sqlite").write_bytes(b"")
    assert main([*command, "--workdir", str(empty), *out]) == 2
    assert "holds no results table (it is an empty file)" in error_line(capsys)
    assert (empty / "results.sqlite").read_bytes() == b""
    assert not (tmp_path / "lb").exists()


def test_report_on_a_store_without_rows(tmp_path, capsys):
    from fewshot_bench.run.store import ResultsStore

    ResultsStore(tmp_path / "results.sqlite").close()
    assert main(["report", "--workdir", str(tmp_path)]) == 2
    assert "no results in" in error_line(capsys)


@pytest.mark.parametrize("kind", ["zero-bytes", "text", "foreign"])
def test_run_refuses_a_file_that_is_not_a_store(proto, shared_data, tmp_path, capsys, kind):
    wd = tmp_path / "runs"
    wd.mkdir()
    store = wd / "results.sqlite"
    if kind == "text":
        store.write_text("protocol,method,accuracy\ntiny,x,0.5\n")
        message = "is not a readable SQLite database (file is not a database)"
    elif kind == "foreign":
        with sqlite3.connect(store) as conn:
            conn.execute("CREATE TABLE songs (title TEXT)")
        conn.close()
        message = "is an SQLite database of another program (tables ['songs'])"
    else:
        store.write_bytes(b"")
    before = store.read_bytes()
    assert main(["report", "--workdir", str(wd)]) == 2
    if kind == "zero-bytes":
        assert "it is an empty file" in error_line(capsys)
        return  # a run fills an empty file: nothing was stored in it
    assert message in error_line(capsys)
    assert main(run_args(proto, wd, shared_data)) == 2
    line = error_line(capsys)
    assert message in line and "Point --workdir at a new folder" in line
    assert store.read_bytes() == before


def _damage(store: Path, where: str) -> None:
    """Overwrite bytes inside a page of a real store: the header of the key index's root page,
    or 200 bytes in the middle of the rows on the table's root page."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        root = dict(conn.execute("SELECT type, rootpage FROM sqlite_master"))
    conn.close()
    data = bytearray(store.read_bytes())
    if where == "index":
        start, length = (root["index"] - 1) * page, 8
    else:
        base = (root["table"] - 1) * page
        cells = int.from_bytes(data[base + 5 : base + 7], "big")  # where the rows begin
        start, length = base + (cells + page) // 2 - 100, 200
    assert start + length <= len(data)
    data[start : start + length] = b"\xab" * length
    store.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["index", "rows"])
def test_damaged_store(proto, stored, shared_data, tmp_path, capsys, where):
    wd = copy_of(stored, tmp_path)
    store = wd / "results.sqlite"
    _damage(store, where)
    before = store.read_bytes()
    for command in (
        ["report", "--workdir", str(wd)],
        ["leaderboard", "--all", "--workdir", str(wd), "--out", str(tmp_path / "lb")],
        run_args(proto, wd, shared_data),
    ):
        assert main(command) == 2
        line = error_line(capsys)
        assert f"results store {store} is damaged" in line or "the store is damaged" in line
        assert "point --workdir at a new folder" in line
        assert store.read_bytes() == before
    assert not (tmp_path / "lb").exists()


# 4. a writer that holds the lock: the computed batch waits, or goes to a side file


def _hold_lock(store: Path, seconds: float) -> threading.Thread:
    """A second connection that holds the store's write lock for ``seconds``."""
    taken = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(store, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(10)
    return thread


def test_run_waits_for_a_lock(proto, stored, shared_data, tmp_path, capsys, monkeypatch):
    wd = copy_of(stored, tmp_path)
    monkeypatch.setenv("FSBENCH_LOCK_PATIENCE", "60")
    # held long enough that the run reaches its write while the lock is still held even on a
    # loaded machine (starting the worker and computing the batch take a few seconds there)
    holder = _hold_lock(wd / "results.sqlite", 12.0)
    assert main(run_args(proto, wd, shared_data)) == 0
    holder.join()
    out, err = capsys.readouterr()
    assert f"({N_TASKS - STORED} run, {STORED} already stored)" in out
    assert f"another process holds the lock on {wd / 'results.sqlite'}; waiting" in err
    assert rows(wd / "results.sqlite") == N_TASKS


def test_a_batch_outlasting_the_lock_patience_is_kept(
    proto, stored, shared_data, tmp_path, capsys, monkeypatch
):
    wd = copy_of(stored, tmp_path)
    store = wd / "results.sqlite"
    monkeypatch.setenv("FSBENCH_LOCK_PATIENCE", "1")
    holder = _hold_lock(store, 4.0)
    assert main(run_args(proto, wd, shared_data)) == 2
    line = error_line(capsys)
    (side,) = wd.glob("results.sqlite.pending-*.jsonl")
    assert f"cannot store {N_TASKS - STORED} computed rows in {store}" in line
    assert f"The rows are saved in {side}" in line and "rerun the same command" in line
    assert len(side.read_text().splitlines()) == N_TASKS - STORED
    holder.join()
    # a report says what is waiting; the rerun imports the side file instead of recomputing
    assert main(["report", "--workdir", str(wd)]) == 0
    assert f"{N_TASKS - STORED} computed rows wait in 1 side file" in capsys.readouterr().err
    assert main(run_args(proto, wd, shared_data)) == 0
    out, err = capsys.readouterr()
    assert f"imported {N_TASKS - STORED} computed rows into {store}" in err
    assert f"(0 run, {N_TASKS} already stored)" in out
    assert not side.exists() and rows(store) == N_TASKS


# 5. fsbench download


def test_download_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["download", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--data-root" in help_text and "omniglot" in help_text and "cifar-fs" in help_text
    root = tmp_path / "data"
    assert main(["download", "omniglt", "--data-root", str(root)]) == 2
    line = error_line(capsys)
    assert "unknown dataset 'omniglt'; did you mean 'omniglot'?" in line
    assert "downloadable datasets: cifar-fs, " in line
    assert main(["download", "omniglot", "nope", "--data-root", str(root)]) == 2
    assert "unknown dataset 'nope'" in error_line(capsys)  # checked before omniglot is fetched
    assert main(["download", "features", "--data-root", str(root)]) == 2
    assert "features has nothing to download" in error_line(capsys)
    assert not root.exists()
    root.write_text("a file")
    assert main(["download", "omniglot", "--data-root", str(root)]) == 2
    assert f"--data-root {root} is a file, not a folder" in error_line(capsys)
    with pytest.raises(SystemExit) as exit_:
        main(["download"])
    assert exit_.value.code == 2
