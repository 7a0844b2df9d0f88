"""Confine what a method worker may write, with Linux Landlock (no privileges needed).

A worker runs as the same user as the runner, so without a sandbox a method could write into the
results store (forging rows the runner would then skip as "already stored"), into the feature or
state cache (poisoning what later runs read), or into manifests. When the kernel supports Landlock
(Linux 5.13+), the worker restricts itself, before it imports any plugin, so that it may create,
write, truncate, rename or delete files only in its own temporary folder (and ``/dev``, for
``/dev/null`` and shared memory). Reading is not restricted: see the README's "What a result
guarantees" for what that leaves open. On kernels without Landlock the worker runs unconfined and
says so (``confine_writes`` returns ``None``).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# LANDLOCK_ACCESS_FS_* bits that change the filesystem (reading and executing stay allowed).
_WRITE_FILE = 1 << 1
_REMOVE_DIR, _REMOVE_FILE = 1 << 4, 1 << 5
_MAKE_CHAR, _MAKE_DIR, _MAKE_REG, _MAKE_SOCK = 1 << 6, 1 << 7, 1 << 8, 1 << 9
_MAKE_FIFO, _MAKE_BLOCK, _MAKE_SYM = 1 << 10, 1 << 11, 1 << 12
_REFER, _TRUNCATE = 1 << 13, 1 << 14  # ABI 2 and 3


def _write_access(abi: int) -> int:
    bits = (
        _WRITE_FILE
        | _REMOVE_DIR
        | _REMOVE_FILE
        | _MAKE_CHAR
        | _MAKE_DIR
        | _MAKE_REG
        | _MAKE_SOCK
        | _MAKE_FIFO
        | _MAKE_BLOCK
        | _MAKE_SYM
    )
    if abi >= 2:
        bits |= _REFER
    if abi >= 3:
        bits |= _TRUNCATE
    return bits


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(int(abi), 0)


def confine_writes(writable: list[str]) -> str | None:
    """Allow this process to change files only under ``writable``; returns a description of the
    confinement, or ``None`` when the kernel offers no Landlock (the process stays unconfined)."""
    abi = landlock_abi()
    if abi < 1:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    handled = _write_access(abi)
    attr = ctypes.create_string_buffer(struct.pack("=Q", handled))
    ruleset = libc.syscall(_SYS_CREATE_RULESET, attr, ctypes.c_size_t(len(attr.raw)), 0)
    if ruleset < 0:
        return None
    try:
        for path in writable:
            if not os.path.exists(path):
                continue
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                allowed = handled if os.path.isdir(path) else handled & (_WRITE_FILE | _TRUNCATE)
                rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd))
                if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule, 0) < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"landlock_add_rule({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return None
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
            return None
    finally:
        os.close(ruleset)
    return f"landlock ABI {abi}: writes confined to {', '.join(writable)}"
