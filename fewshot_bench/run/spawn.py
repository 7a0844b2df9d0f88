"""Starting a method worker process, and starting the serial run's worker early.

A worker spends most of a second importing torch and the built-in methods before it can answer;
so does the runner before it gets to start one. ``fsbench run`` therefore starts its worker
first thing (:func:`start_early`, before the runner's own imports), and the serial executor
adopts it (:func:`claim_early`): the two processes import at the same time. This module imports
nothing heavy, so that the early start costs the runner nothing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from fewshot_bench.atomic import owner_gone, owner_tag
from fewshot_bench.run.heap import worker_env

__all__ = [
    "SpawnedWorker",
    "claim_early",
    "remove_folder",
    "remove_stale_folders",
    "spawn_worker",
    "start_early",
]


@dataclass
class SpawnedWorker:
    """A started worker process and the runner's ends of its channels: requests go down
    ``to_worker`` (a pipe's write end), answers come up ``from_worker``, large arrays' sealed
    files travel over ``files``."""

    proc: subprocess.Popen
    to_worker: int
    from_worker: int
    files: socket.socket
    env: dict[str, str]
    #: the worker's private temporary folder: removed by :func:`remove_folder` once it has exited
    folder: str

    def reap(self) -> None:
        """Wait for the process to end (killed after 10 s: it was asked to end or its pipe is
        closed) and remove its folder."""
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        remove_folder(self.folder)

    def discard(self) -> None:
        """Close the channels (the worker exits on the closed pipe), then :meth:`reap`."""
        for fd in (self.to_worker, self.from_worker):
            try:
                os.close(fd)
            except OSError:
                pass
        self.files.close()
        self.reap()


def remove_folder(folder: str) -> None:
    """Remove an exited worker's private folder (the worker, confined to it, can only empty it)."""
    shutil.rmtree(folder, ignore_errors=True)


#: A worker's private folder is ``<tmp>/fsbench-worker-<owner tag of its runner>-<random>``.
FOLDER_PREFIX = "fsbench-worker-"


def remove_stale_folders(parent: str | None = None) -> list[str]:
    """Remove the worker folders in ``parent`` (default: the temporary folder) whose runner is
    gone: a runner killed outright removes nothing, and its worker ends with it. Folders of live
    runners, of other machines or namespaces, and without an owner in their name stay."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(FOLDER_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        tag = entry.name[len(FOLDER_PREFIX) :].rpartition("-")[0]  # mkdtemp's suffix has no "-"
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            since = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if owner_gone(tag, since):
            remove_folder(entry.path)
            removed.append(entry.path)
    return removed


def spawn_worker(extra_env: dict[str, str] | None = None) -> SpawnedWorker:
    """Start ``python -m fewshot_bench.run.worker`` (fresh, not forked: it inherits none of the
    runner's memory) with ``extra_env`` added to its environment."""
    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    files, worker_files = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = worker_env(extra_env)
    remove_stale_folders()
    folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{owner_tag()}-")
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fewshot_bench.run.worker",
                str(to_worker_r),
                str(from_worker_w),
                str(os.getpid()),
                str(worker_files.fileno()),
                folder,
            ],
            pass_fds=(to_worker_r, from_worker_w, worker_files.fileno()),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except BaseException:
        for fd in (to_worker_w, from_worker_r):
            os.close(fd)
        files.close()
        remove_folder(folder)
        raise
    finally:
        os.close(to_worker_r)
        os.close(from_worker_w)
        worker_files.close()
    return SpawnedWorker(proc, to_worker_w, from_worker_r, files, env, folder)


_EARLY: SpawnedWorker | None = None


def start_early() -> None:
    """Start the default worker now, for :func:`claim_early`; discarded at exit if unclaimed."""
    global _EARLY
    if _EARLY is None:
        _EARLY = spawn_worker()
        atexit.register(_discard_unclaimed)


def claim_early(extra_env: dict[str, str] | None = None) -> SpawnedWorker | None:
    """The early worker, if one is running and was started with the environment this caller
    would give a new one; else None (the caller starts its own)."""
    global _EARLY
    early, _EARLY = _EARLY, None
    if early is None:
        return None
    if early.proc.poll() is None and early.env == worker_env(extra_env):
        return early
    early.discard()
    return None


def _discard_unclaimed() -> None:
    global _EARLY
    if _EARLY is not None:
        early, _EARLY = _EARLY, None
        early.discard()
