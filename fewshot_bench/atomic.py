"""Atomic file writes (readers see the old file or the whole new one, never a torn one), and
removal of the temporary files a killed writer left behind.

A writer killed (``kill -9``, out of memory, power loss) between creating its temporary file and
renaming it onto the target leaves the temporary file behind, e.g. ~33 MB per feature-cache
entry. ``remove_stale_temps(folder)`` deletes such leftovers; it knows two name forms:

- ``.<target>.w<pid>-<ns>@<host>.<8 random>.tmp<suffix>``, written by ``atomic_path``: when
  ``host`` and PID namespace ``ns`` are this machine's, stale as soon as process ``pid`` is gone
  (or its pid now belongs to a process started after the file was last written); from another
  machine or namespace, treated like the next form;
- ``.<target>.<8 random>.tmp<suffix>`` (older versions, no owner in the name): stale when its contents have not changed for ``max_age`` seconds and no process
  has it open (checked through ``/proc`` where there is one).

A temporary file of a live writer is never removed: its owner runs, or (owner unknown here) it
was modified recently (a writer modifies its file until it renames it) or a process holds it
open.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Seconds an unowned temporary file must stay unmodified before it counts as abandoned.
DEFAULT_MAX_AGE = 600.0

#: an :func:`owner_tag`
_TAG_PATTERN = r"w(?P<pid>\d+)-(?P<ns>\d+|x)@(?P<host>[A-Za-z0-9_-]+)"
_TAG = re.compile(_TAG_PATTERN)
_OWNED = re.compile(rf"\.(?P<target>.+)\.{_TAG_PATTERN}\.[a-z0-9_]{{8}}\.tmp(\.[A-Za-z0-9]+)*")
_ANONYMOUS = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)*")


def _pid_namespace() -> str:
    """The inode of this process's PID namespace (``x`` where the system has no ``/proc``)."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:
        return "x"
    digits = re.sub(r"\D", "", link)
    return digits or "x"


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
_NS = _pid_namespace()


def owner_tag(pid: int | None = None) -> str:
    """The owner part of a temporary file's name: ``w<pid>-<pid namespace>@<host>``."""
    return f"w{os.getpid() if pid is None else pid}-{_NS}@{_HOST}"


def _local_owner_gone(tag: re.Match[str], since: float) -> bool | None:
    """Whether the owner named by a matched tag is gone (``since``: when what it owns was last
    modified; a later process with the same pid does not count as the owner); ``None`` when it
    is not a process of this machine and PID namespace, which cannot be asked."""
    if tag["host"] != _HOST or tag["ns"] != _NS:
        return None
    return not process_alive(int(tag["pid"]), since=since)


def owner_gone(tag: str, since: float) -> bool:
    """Whether ``tag`` (an :func:`owner_tag`) names a process of this machine and PID namespace
    that is gone (see :func:`_local_owner_gone`). False for anything else: never call a
    stranger dead."""
    m = _TAG.fullmatch(tag)
    return m is not None and _local_owner_gone(m, since) is True


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` named after this process; on success rename it onto
    ``path``, else delete it. Stale temporary files of dead writers in the folder go first.

    The name says which process writes it, so ``remove_stale_temps`` can remove it as soon as
    that process is gone. ``suffix`` stays at the end of the name (``np.savez`` appends ``.npz``
    otherwise). The file gets the usual mode (``0666 & ~umask``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{owner_tag()}.", suffix=f".tmp{suffix}"
    )
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` (of this PID namespace) runs, is not a zombie and, when ``since``
    (a time in seconds since the epoch) is given, started before ``since`` (a process started
    later merely reuses the pid of a dead one)."""
    if pid <= 0:
        return True  # not a real owner: never call it dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # e.g. PermissionError: it exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
    except OSError:
        return True  # no /proc: existence is all we know
    if not fields or fields[0] in (b"Z", b"X"):
        return False  # killed, and its parent has not reaped it yet
    boot = _boot_time()
    if since is not None and boot is not None and len(fields) > 19:
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        if started > since + 2.0:  # btime and start ticks are coarse: allow some slack
            return False
    return True


def _open_files() -> set[str] | None:
    """Real paths of the files open in any process this user may inspect (``None``: unknown)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    found: set[str] = set()
    with os.scandir("/proc") as procs:
        for proc in procs:
            if not proc.name.isdigit():
                continue
            try:
                with os.scandir(f"/proc/{proc.name}/fd") as fds:
                    for fd in fds:
                        try:
                            found.add(os.readlink(fd.path))
                        except OSError:
                            pass
            except OSError:
                continue  # gone, or another user's process
    return found


def remove_stale_temps(
    folder: str | os.PathLike, *, max_age: float = DEFAULT_MAX_AGE, now: float | None = None
) -> list[Path]:
    """Delete the temporary files in ``folder`` (not below it) that no live writer owns.

    Returns the paths removed. A file whose owner (named in it) is a process of this machine is
    removed as soon as that process is gone, never while it runs; any other temporary file once
    it is unmodified for ``max_age`` seconds and open in no process. Files that are not
    temporary files of an atomic write are never touched; errors (a file already gone, no
    permission) are ignored.
    """
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if e.name.startswith(".") and ".tmp" in e.name]
    except OSError:
        return []
    now = time.time() if now is None else now
    open_files: set[str] | None = None
    checked_open = False
    removed: list[Path] = []
    for entry in entries:
        owned = _OWNED.fullmatch(entry.name)
        if owned is None and _ANONYMOUS.fullmatch(entry.name) is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        gone = None if owned is None else _local_owner_gone(owned, mtime)
        if gone is not None:  # the owner is a process of this machine and PID namespace
            stale = gone
        elif now - mtime >= max_age:
            if not checked_open:
                open_files, checked_open = _open_files(), True
            stale = open_files is None or os.path.realpath(entry.path) not in open_files
        else:
            stale = False
        if stale:
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(Path(entry.path))
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
