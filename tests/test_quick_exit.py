"""Ending ``fsbench`` and its workers without the interpreter's teardown loses nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_exit_handlers_run_and_buffered_output_is_flushed(tmp_path):
    done = _run(
        """
        import atexit, sys
        from fewshot_bench.quick_exit import exit_now
        atexit.register(lambda: open("handler-ran", "w").close())
        sys.stdout.write("no newline yet")  # still in the buffer
        sys.stderr.write("to stderr")
        exit_now(3)
        print("not reached")
        """,
        tmp_path,
    )
    assert done.returncode == 3
    assert done.stdout == "no newline yet" and done.stderr == "to stderr"
    assert (tmp_path / "handler-ran").exists()


def test_a_running_non_daemon_thread_is_waited_for(tmp_path):
    done = _run(
        """
        import threading, time
        from fewshot_bench.quick_exit import exit_now
        def work():
            time.sleep(0.5)
            open("thread-finished", "w").close()
        threading.Thread(target=work).start()
        exit_now(0)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "thread-finished").exists()


def test_fsbench_exits_with_mains_code_and_output(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fewshot_bench", "run", "no-such-protocol", "-m", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "fsbench: error:" in done.stderr
