"""How a runner request reaches its method worker: a pickle through the pipe, with the large arrays
(a task's items) beside it in one sealed in-memory file.

Pickled through a pipe, a task of 70 000 × 784 float32 items (220 MB) is copied into the pickle,
through the kernel in 64 KiB pieces, into the worker's receive buffer and once more when
unpickled: about as long as some methods take to run. Instead, arrays of at least
``OUT_OF_BAND_BYTES`` leave the pickle (protocol 5 out-of-band buffers) and are written once into
an anonymous memory file (``memfd_create``) that the runner then seals against any further write,
growth or shrinking before it passes the descriptor over a Unix socket. The file has no name in
``/dev/shm`` that another process could open, and once sealed no process can change it, so one
worker's method cannot alter what another worker's method reads. The worker maps it
copy-on-write: a method may modify its inputs in place without touching the file. Where memfd is
unavailable (not Linux), or the socket is absent, everything travels in the pickle as before.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import pickle
import socket
import struct
from multiprocessing.connection import Connection
from typing import Any

import torch

#: Arrays at least this large travel in the sealed memory file; smaller ones stay in the pickle.
OUT_OF_BAND_BYTES = 1 << 16
_ALIGN = 64
_HEAD = struct.Struct("<I")
_SEALS = ("F_SEAL_WRITE", "F_SEAL_GROW", "F_SEAL_SHRINK", "F_SEAL_SEAL")


class _RequestPickler(pickle.Pickler):
    """Pickles CPU tensors as numpy arrays (rebuilt by ``torch.from_numpy`` in the worker): the
    same values and dtypes, without torch's per-tensor serialisation, which dominated the
    runner's cost per episode, and with their bytes eligible for the out-of-band path."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and not obj.requires_grad:
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def dumps_request(request: tuple, out_of_band: list[pickle.PickleBuffer] | None = None) -> bytes:
    """A runner request as pickle bytes; with ``out_of_band`` given, the buffers of large arrays
    are appended to it instead of written into the bytes."""

    def keep_in_band(buf: pickle.PickleBuffer) -> bool:
        if out_of_band is None or buf.raw().nbytes < OUT_OF_BAND_BYTES:
            return True
        out_of_band.append(buf)
        return False

    stream = io.BytesIO()
    _RequestPickler(stream, protocol=5, buffer_callback=keep_in_band).dump(request)
    return stream.getvalue()


def _layout(buffers: list[pickle.PickleBuffer]) -> list[tuple[int, int]]:
    spans, end = [], 0
    for buf in buffers:
        n = buf.raw().nbytes
        spans.append((end, n))
        end += -(-n // _ALIGN) * _ALIGN
    return spans


def sealed_memory_file(buffers: list[pickle.PickleBuffer], spans: list[tuple[int, int]]) -> int:
    """A memfd holding ``buffers`` at ``spans``, sealed read-only; the caller closes it."""
    import fcntl

    size = spans[-1][0] + spans[-1][1]
    fd = os.memfd_create("fsbench-task", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        for buf, (offset, n) in zip(buffers, spans, strict=True):
            view = buf.raw()
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:], offset + done)
        seals = 0
        for name in _SEALS:
            seals |= getattr(fcntl, name)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def can_pass_memory_files() -> bool:
    """Whether this platform offers sealed memfds and descriptor passing."""
    import fcntl

    return (
        hasattr(os, "memfd_create")
        and hasattr(socket, "send_fds")
        and hasattr(fcntl, "F_SEAL_SEAL")
    )


def send_request(conn: Connection, sock: socket.socket | None, request: tuple) -> None:
    """Send ``request`` to the worker: its large arrays through a sealed memfd over ``sock``
    (when given and supported), the rest as a pickle over ``conn``."""
    buffers: list[pickle.PickleBuffer] = []
    use_file = sock is not None and can_pass_memory_files()
    payload = dumps_request(request, buffers if use_file else None)
    spans = _layout(buffers)
    if spans:
        try:
            fd = sealed_memory_file(buffers, spans)
        except OSError:  # no memfd here after all (e.g. a seccomp filter): send it all in-band
            spans, payload = [], dumps_request(request)
        else:
            try:
                socket.send_fds(sock, [b"m"], [fd])
            finally:
                os.close(fd)
    head = json.dumps(spans).encode()
    conn.send_bytes(_HEAD.pack(len(head)) + head + payload)


def recv_request(conn: Connection, sock: socket.socket | None) -> tuple:
    """The next request from the runner (see :func:`send_request`); raises EOFError when the
    runner has closed the pipe."""
    message = conn.recv_bytes()
    (n_head,) = _HEAD.unpack_from(message)
    spans = json.loads(message[_HEAD.size : _HEAD.size + n_head])
    payload = memoryview(message)[_HEAD.size + n_head :]
    if not spans:
        return pickle.loads(payload)
    if sock is None:
        raise EOFError("a request came with a memory file but this worker has no socket")
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if len(fds) != 1:
        raise EOFError("the runner's memory file did not arrive")
    try:
        size = spans[-1][0] + spans[-1][1]
        # copy-on-write: a method may write into its arrays; the sealed file never changes
        mapped = mmap.mmap(
            fds[0], size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    finally:
        os.close(fds[0])
    view = memoryview(mapped)
    request = pickle.loads(payload, buffers=[view[o : o + n] for o, n in spans])
    with contextlib.suppress(BufferError):  # the arrays keep their own views of the mapping
        view.release()
    return request
