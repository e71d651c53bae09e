"""Child processes that die with their parent: ``adapterdeck serve``'s workers, a worker's training."""

from __future__ import annotations

import os
import signal

PARENT_ENV = "ADAPTERDECK_PARENT_PID"
WORKER_INDEX_ENV = "ADAPTERDECK_WORKER_INDEX"  # which of `serve`'s workers a worker is (its devices)


def die_with_parent() -> None:
    """When started by a supervising process (``ADAPTERDECK_PARENT_PID``: ``serve`` or a worker), ask
    Linux to SIGKILL this process when that parent dies; exit now if it already has. A worker
    started by hand is left alone (its shell may well exit before it)."""
    expected = os.environ.get(PARENT_ENV)
    if not expected:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe to the worker breaks instead
        pass
    if os.getppid() != int(expected):
        os._exit(1)
