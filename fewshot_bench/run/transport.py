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

An array the runner will send more than once (a task chunk that several methods evaluate) can be
written into its own sealed file ahead of time (:func:`sealed_tensor`, done by the runner's task
feed off the worker's critical path): a request that holds such an array whole passes that
file's descriptor, so the bytes are written once however many methods or workers receive them.
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
import weakref
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

#: Arrays at least this large travel in the sealed memory file; smaller ones stay in the pickle.
OUT_OF_BAND_BYTES = 1 << 16
_ALIGN = 64
_HEAD = struct.Struct("<I")
_SEALS = ("F_SEAL_WRITE", "F_SEAL_GROW", "F_SEAL_SHRINK", "F_SEAL_SEAL")
#: Descriptors passed with one request at most (the kernel's limit per message is 253).
_MAX_FILES = 64


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


#: Arrays that live in their own sealed memory file (:func:`sealed_tensor`), by (address,
#: bytes): a request holding one of them whole passes its file instead of copying it.
_SEALED: dict[tuple[int, int], int] = {}


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def sealed_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into its own sealed memory file, mapped copy-on-write (``t`` itself when it is
    small, not a dense CPU tensor, or memfds are unavailable).

    Sending the result to a worker passes the file's descriptor instead of writing the bytes
    again, however many requests (or workers) receive it: what the runner's task feed does with
    a chunk that several methods evaluate. Only a request that holds the array whole passes the
    file, never a slice of it: a worker that gets one query of a task cannot read the others.
    The runner's copy may be written (copy-on-write); what a worker reads stays the sealed bytes.
    """
    nbytes = t.numel() * t.element_size()
    if (
        nbytes < OUT_OF_BAND_BYTES
        or type(t) is not torch.Tensor
        or t.device.type != "cpu"
        or t.requires_grad
        or not t.is_contiguous()
        or not can_pass_memory_files()
    ):
        return t
    array = t.numpy()
    buf = pickle.PickleBuffer(array)
    try:
        fd = sealed_memory_file([buf], [(0, nbytes)])
    except OSError:
        return t
    try:
        mapped = mmap.mmap(
            fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    except BaseException:
        os.close(fd)
        raise
    copy = np.frombuffer(mapped, dtype=array.dtype).reshape(array.shape)
    key = (_address(memoryview(copy).cast("B")), nbytes)
    _SEALED[key] = fd
    # the mapping lives as long as ``copy`` (every tensor made from it holds it): until then its
    # address cannot be reused, so the registry entry cannot name another array
    weakref.finalize(copy, _unseal, key, fd)
    return torch.from_numpy(copy)


def _unseal(key: tuple[int, int], fd: int) -> None:
    _SEALED.pop(key, None)
    with contextlib.suppress(OSError):
        os.close(fd)


def can_pass_memory_files() -> bool:
    """Whether this platform offers sealed memfds and descriptor passing."""
    import fcntl

    return (
        hasattr(os, "memfd_create")
        and hasattr(socket, "send_fds")
        and hasattr(fcntl, "F_SEAL_SEAL")
    )


def _files_for(buffers: list[pickle.PickleBuffer]) -> list[int | None]:
    """Per buffer, the sealed file that holds exactly its bytes (None: it needs copying), for at
    most ``_MAX_FILES - 1`` distinct files (one descriptor is kept for the new file)."""
    out: list[int | None] = []
    distinct: set[int] = set()
    for buf in buffers:
        view = buf.raw()
        fd = _SEALED.get((_address(view), view.nbytes))
        if fd is not None and fd not in distinct and len(distinct) >= _MAX_FILES - 1:
            fd = None
        if fd is not None:
            distinct.add(fd)
        out.append(fd)
    return out


def send_request(conn: Connection, sock: socket.socket | None, request: tuple) -> None:
    """Send ``request`` to the worker: its large arrays through sealed memfds over ``sock`` (when
    given and supported), the rest as a pickle over ``conn``. An array made by
    :func:`sealed_tensor` passes its own file; the others are written into one new file."""
    buffers: list[pickle.PickleBuffer] = []
    use_file = sock is not None and can_pass_memory_files()
    payload = dumps_request(request, buffers if use_file else None)
    owners = _files_for(buffers)
    fresh = [buf for buf, fd in zip(buffers, owners, strict=True) if fd is None]
    files: list[int] = []  # the descriptors passed; a span names one by its position here
    new_fd = None
    layout = _layout(fresh)
    if fresh:
        try:
            new_fd = sealed_memory_file(fresh, layout)
        except OSError:  # no memfd here after all (e.g. a seccomp filter): send it all in-band
            buffers, owners, payload = [], [], dumps_request(request)
        else:
            files.append(new_fd)
    spans: list[tuple[int, int, int]] = []  # (file, offset, bytes) of each buffer
    in_new_file = iter(layout)
    for buf, fd in zip(buffers, owners, strict=True):
        if fd is None:
            spans.append((0, *next(in_new_file)))
            continue
        if fd not in files:
            files.append(fd)
        spans.append((files.index(fd), 0, buf.raw().nbytes))
    try:
        if files:
            socket.send_fds(sock, [b"m"], files)
    finally:
        if new_fd is not None:
            os.close(new_fd)
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
    n_files = max(f for f, _, _ in spans) + 1
    _, fds, _, _ = socket.recv_fds(sock, 1, n_files)
    views = []
    try:
        if len(fds) != n_files:
            raise EOFError("the runner's memory files did not arrive")
        for fd in fds:
            # copy-on-write: a method may write into its arrays; the sealed file never changes
            mapped = mmap.mmap(
                fd,
                os.fstat(fd).st_size,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            views.append(memoryview(mapped))
    finally:
        for fd in fds:
            os.close(fd)
    request = pickle.loads(payload, buffers=[views[f][o : o + n] for f, o, n in spans])
    for view in views:
        with contextlib.suppress(BufferError):  # the arrays keep their own views of the mapping
            view.release()
    return request
