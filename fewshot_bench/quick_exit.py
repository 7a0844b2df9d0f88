"""Ending a process without the interpreter's teardown.

With torch loaded, Python's teardown (module cleanup, library destructors, freeing every tensor
one by one) takes half a second for nothing: the memory goes with the process. The ``fsbench``
command and the method workers end through :func:`exit_now` instead, after doing what teardown
would do that matters: the exit handlers (the shared worker is closed and a worker's private
folder removed by them) and the standard streams' buffers.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_now(code: int) -> None:
    """Run the exit handlers, flush stdout and stderr, and end the process with ``code``.

    Falls back to a normal ``sys.exit`` while a non-daemon thread still runs (teardown would
    wait for it)."""
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken (output piped into `head`)
            pass
    os._exit(code)
