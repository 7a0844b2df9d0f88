"""A real Ray cluster on this machine: a head on 127.0.0.1 and a second node joined to it, one CPU
each. A sweep runs through `--executor ray --address 127.0.0.1:PORT` in its own process, one Ray
worker process is killed (SIGKILL) mid-run, and the store must then equal a serial run's, row by
row: Ray restarts the actor, retries its chunk, the actor rebuilds its method, nothing finished
is lost and nothing is stored twice.

Skipped only when Ray is not installed (`pip install -e '.[ray]'`)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

try:
    import ray  # noqa: F401

    RAY_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the install
    RAY_ERROR = str(exc)

from run_helpers import count_rows, run_quietly

from fewshot_bench.run.executor import MethodSpec
from fewshot_bench.run.fixtures import comparable_rows, write_episodic_protocol
from fewshot_bench.run.store import load_results
from fewshot_bench.tasks.protocol import load_protocol_file

pytestmark = pytest.mark.skipif(
    bool(RAY_ERROR), reason=f"Ray is not installed ({RAY_ERROR}): pip install -e '.[ray]'"
)

PROBES = str(Path(__file__).with_name("probe_methods.py"))
N_TASKS = 40
SEEDS = (0, 1)
DELAY = 0.25  # seconds per chunk of slow-prototype, in the Ray workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray head exited early (code {proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the Ray head did not listen on port {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop one `ray start --block` (it stops the Ray processes it started) by its own id."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the processes it started
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def cluster():
    """Head + one more node, one CPU each, with token authentication (a token made here)."""
    base = Path(tempfile.mkdtemp(prefix="fsray", dir="/tmp"))  # short: Ray's socket paths
    token = base / "token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        "FSBENCH_TEST_DELAY": str(DELAY),  # inherited by the Ray workers (slow-prototype)
    }
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    procs = []
    try:
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}"]
            + ["--include-dashboard=false", f"--temp-dir={base}"]
            + common,
            env=env,
            stdout=open(base / "head.log", "w"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(head)
        _wait_port(port, head, timeout=90)
        node = subprocess.Popen(
            [ray_cli, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1"]
            + common,
            env=env,
            stdout=open(base / "node.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(node)
        yield {"address": f"127.0.0.1:{port}", "env": env, "base": base}
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def test_sweep_on_a_two_node_cluster_survives_a_killed_worker(cluster, shared_data, tmp_path):
    proto = write_episodic_protocol(
        tmp_path, "omni-ray", n_unlabeled=2, n_distractor=2, n_tasks=N_TASKS, seeds=SEEDS
    )
    workdir = tmp_path / "runs"
    sweep = tmp_path / "ray.toml"
    sweep.write_text(
        textwrap.dedent(f"""
        protocols = ["{proto}"]
        methods = ["slow-prototype", {{ spec = "nearest-prototype", num_cpus = 1 }}]
        [run]
        workdir = "{workdir}"
        data_root = "{shared_data}"
        batch_size = 4
        plugins = ["{PROBES}"]
        [executor]
        kind = "ray"
        jobs = 2
    """)
    )
    total = 2 * len(SEEDS) * N_TASKS
    db = workdir / "results.sqlite"
    cmd = [sys.executable, "-m", "fewshot_bench", "sweep", str(sweep), "--quiet"]
    cmd += ["--address", cluster["address"]]
    proc = subprocess.Popen(
        cmd, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        # the driver names its workers: pid, node address and Ray node id
        deadline = time.time() + 120
        workers = []
        while not workers and time.time() < deadline and proc.poll() is None:
            for line in list(err_lines):
                if "Ray workers" in line:
                    workers = re.findall(r"pid (\d+) on \S+ \(node (\w+)\)", line)
            time.sleep(0.1)
        assert len(workers) == 2, "".join(err_lines)
        assert len({node for _, node in workers}) == 2, "one worker on each node"
        while count_rows(db) < 12 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before the kill:\n" + "".join(err_lines)
        os.kill(int(workers[0][0]), signal.SIGKILL)
        at_kill = count_rows(db)
        assert 12 <= at_kill < total, f"the kill landed after {at_kill} rows"
        status = subprocess.run(
            [sys.executable, "-m", "fewshot_bench", "sweep", "--status", str(sweep)],
            env=cluster["env"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "done/total" in status.stdout and "omni-ray" in status.stdout
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert proc.returncode == 0, out + "".join(err_lines)
    assert f"4/4 cells done, {total}/{total} tasks" in out
    # the serial reference: the same tasks, seeds and methods in one worker process
    run_quietly(
        load_protocol_file(proto)[0],
        [MethodSpec("slow-prototype"), MethodSpec("nearest-prototype")],
        workdir,
        store=tmp_path / "serial.sqlite",
        root=shared_data,
        device="cpu",
        plugins=(PROBES,),
    )
    ray_rows = load_results(db)
    assert len(ray_rows) == total
    serial = load_results(tmp_path / "serial.sqlite")
    assert comparable_rows(ray_rows).equals(comparable_rows(serial))
    assert set(ray_rows.device) == {"cpu"}
