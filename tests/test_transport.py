"""Large task arrays reach the worker through a sealed memory file, unchanged and unchangeable."""

from __future__ import annotations

import mmap
import os
import pickle
import socket
from multiprocessing import Pipe
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_bench.data import load_dataset
from fewshot_bench.run import transport
from fewshot_bench.run.executor import MethodSpec, ProcessExecutor
from fewshot_bench.run.transport import dumps_request, recv_request, send_request
from fewshot_bench.tasks.task import Task

HOSTILE = str(Path(__file__).with_name("hostile_methods.py"))
pytestmark = pytest.mark.skipif(
    not transport.can_pass_memory_files(), reason="no sealed memfd on this platform"
)


@pytest.fixture(scope="module")
def mnist(shared_data):
    """The MNIST test set as 784-d float features and labels."""
    data = load_dataset("mnist", "test", shared_data)
    return data.images.reshape(len(data), -1).float() / 255.0, torch.from_numpy(data.labels)


def _task(mnist, n_unlabeled: int = 1500) -> Task:
    """A 10-way task of real MNIST digits: 5 labeled per class, then unlabeled items and 1000
    queries (arrays well over the out-of-band size)."""
    x, y = mnist
    support = torch.cat([torch.nonzero(y == c).flatten()[:5] for c in range(10)])
    rest = torch.from_numpy(np.setdiff1d(np.arange(len(y)), support.numpy()))
    unl, query = rest[:n_unlabeled], rest[n_unlabeled : n_unlabeled + 1000]
    return Task(x[support], y[support], x[unl], x[query], 10, "features")


@pytest.fixture()
def channel():
    runner_end, worker_end = Pipe()
    runner_sock, worker_sock = socket.socketpair()
    yield runner_end, runner_sock, worker_end, worker_sock
    for end in (runner_end, worker_end, runner_sock, worker_sock):
        end.close()


def test_large_arrays_leave_the_pickle_and_arrive_equal_and_writable(mnist, channel):
    runner_end, runner_sock, worker_end, worker_sock = channel
    task = _task(mnist)
    buffers: list[pickle.PickleBuffer] = []
    payload = dumps_request(("predict", 1, [task], [0], "cpu"), buffers)
    assert len(buffers) == 3 and len(payload) < 4096  # support, unlabeled, query out of band
    send_request(runner_end, runner_sock, ("predict", 1, [task], [0], "cpu"))
    op, hid, (got,), seeds, device = recv_request(worker_end, worker_sock)
    assert (op, hid, seeds, device) == ("predict", 1, [0], "cpu")
    for name in ("support", "support_labels", "unlabeled", "query"):
        assert torch.equal(getattr(got, name), getattr(task, name)), name
        assert getattr(got, name).dtype == getattr(task, name).dtype
    got.query.zero_()  # copy-on-write: the method's edit stays in its own mapping
    assert task.query.any()
    send_request(runner_end, runner_sock, ("predict", 1, [task], [0], "cpu"))
    again = recv_request(worker_end, worker_sock)[2][0]
    assert torch.equal(again.query, task.query)


def test_small_requests_need_no_socket(channel):
    runner_end, _, worker_end, _ = channel
    request = ("score", (1, 2), [(0, torch.ones(3, 4))])
    send_request(runner_end, None, request)
    op, key, [(i, q)] = recv_request(worker_end, None)
    assert (op, key, i) == ("score", (1, 2), 0) and torch.equal(q, torch.ones(3, 4))


def test_the_memory_file_refuses_every_write(mnist):
    arr = mnist[0][:200].numpy()
    buf = pickle.PickleBuffer(arr)
    fd = transport.sealed_memory_file([buf], [(0, arr.nbytes)])
    try:
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, arr.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
        with pytest.raises(PermissionError):  # reopened by path, as another process would
            with open(f"/proc/self/fd/{fd}", "r+b") as fh:
                fh.write(b"x")
                fh.flush()
        assert os.pread(fd, arr.nbytes, 0) == arr.tobytes()
    finally:
        os.close(fd)


def test_a_plugin_cannot_overwrite_any_memory_file_and_workers_agree_with_in_band(
    mnist, monkeypatch
):
    """Through the real worker: a hostile method edits its inputs in place (its own copy) and
    tries to overwrite every runner memory file it finds, and fails; a built-in transductive
    method gets the same scores by memory file as with everything in the pickle."""
    task = _task(mnist)
    ex = ProcessExecutor(plugins=(HOSTILE,))
    try:
        writer = ex.open(MethodSpec("memory-file-writer"))
        (scores,), _ = ex.map(writer, [task], [0])
        found, written, edited = scores[0, :3].tolist()
        assert found >= 1 and written == 0 and edited == 1  # it saw its own file, wrote none
        assert task.query.any()  # the runner's task is untouched
        diffusion = ex.open(MethodSpec("diffusion"))
        (by_file,), _ = ex.map(diffusion, [task], [0])
        monkeypatch.setattr(transport, "can_pass_memory_files", lambda: False)
        (in_band,), _ = ex.map(diffusion, [task], [0])
    finally:
        ex.close()
    assert torch.equal(by_file, in_band)


def _record_passed_files(monkeypatch) -> list[list[tuple[int, int]]]:
    """Per request sent, (inode, size) of each descriptor passed."""
    sent: list[list[tuple[int, int]]] = []
    real = socket.send_fds

    def spy(sock, buffers, fds, *args):
        sent.append([(os.fstat(fd).st_ino, os.fstat(fd).st_size) for fd in fds])
        return real(sock, buffers, fds, *args)

    monkeypatch.setattr(transport.socket, "send_fds", spy)
    return sent


def test_a_sealed_tensor_passes_its_own_file_to_every_request(mnist, channel, monkeypatch):
    runner_end, runner_sock, worker_end, worker_sock = channel
    task = _task(mnist)
    labels = task.support_labels
    assert transport.sealed_tensor(labels) is labels  # below the out-of-band size: as it was
    shared = Task(
        transport.sealed_tensor(task.support),
        labels,
        transport.sealed_tensor(task.unlabeled),
        transport.sealed_tensor(task.query),
        10,
        "features",
    )
    for name in ("support", "unlabeled", "query"):
        assert torch.equal(getattr(shared, name), getattr(task, name))
    sent = _record_passed_files(monkeypatch)
    writes = []
    monkeypatch.setattr(
        transport,
        "sealed_memory_file",
        lambda b, s, real=transport.sealed_memory_file: writes.append(len(b)) or real(b, s),
    )
    for _ in range(2):  # two methods receiving the same chunk: no bytes written again
        send_request(runner_end, runner_sock, ("predict", 1, [shared], [0], "cpu"))
        got = recv_request(worker_end, worker_sock)[2][0]
        for name in ("support", "unlabeled", "query"):
            assert torch.equal(getattr(got, name), getattr(task, name)), name
        got.unlabeled.zero_()  # copy-on-write in the receiver, as with a new file
    assert writes == []
    assert sent[0] == sent[1] and len(sent[0]) == 3
    sizes = sorted(size for _, size in sent[0])
    assert sizes == sorted(t.nbytes for t in (task.support, task.unlabeled, task.query))
    assert shared.unlabeled.any()


def test_a_slice_of_a_sealed_tensor_never_passes_the_whole_file(mnist, channel, monkeypatch):
    """One query sent to a worker must not hand it the file of all the queries."""
    runner_end, runner_sock, worker_end, worker_sock = channel
    queries = transport.sealed_tensor(_task(mnist).query)
    whole = {ino for ino, _ in [(os.fstat(fd).st_ino, 0) for fd in transport._SEALED.values()]}
    sent = _record_passed_files(monkeypatch)
    for part in (queries[:100], queries[100:]):  # 313 KB and 2.8 MB: both out of band
        send_request(runner_end, runner_sock, ("score", (1, 0), [(0, part)]))
        ((_, got),) = recv_request(worker_end, worker_sock)[2]
        assert torch.equal(got, part)
    assert [len(files) for files in sent] == [1, 1]
    assert not {ino for files in sent for ino, _ in files} & whole
    assert sent[0][0][1] < queries.nbytes and sent[1][0][1] < queries.nbytes


def test_a_sealed_tensors_file_is_sealed_and_closed_with_its_last_view(mnist):
    import fcntl
    import gc

    t = transport.sealed_tensor(mnist[0][:1000])
    key = (t.data_ptr(), t.nbytes)
    fd = transport._SEALED[key]
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    view = t[10:20]
    del t
    gc.collect()
    assert key in transport._SEALED  # a view still holds the mapping
    del view
    gc.collect()
    assert key not in transport._SEALED
    with pytest.raises(OSError):
        os.fstat(fd)
