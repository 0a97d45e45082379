"""Worker processes that never outlive the process that started them.

A process pool's workers are children of the main process. When the main process is killed without a
chance to clean up (``kill -9``, the OOM killer), its children are re-parented to PID 1 and keep running.
:func:`init_bound_worker`, given as a pool's ``initializer``, prevents that twice over:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` asks the kernel to kill the worker when its parent dies;
* everywhere, a daemon thread checks once a second whether the parent is still the one that started the
  worker, and exits the worker when it is not (this also covers a parent that died before the
  ``prctl`` call took effect).

It also limits the worker to one intra-op torch thread: a forked process must not enter the parent's OpenMP
thread pool (it would deadlock), which is what torch's DataLoader workers do too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 1.0


def _kill_on_parent_death() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog thread still covers it


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(PARENT_POLL_SECONDS)


def init_bound_worker(parent_pid: int) -> None:
    """Pool ``initializer``: bind this worker's life to ``parent_pid`` and use one torch thread."""
    _kill_on_parent_death()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    import torch

    torch.set_num_threads(1)


__all__ = ["init_bound_worker"]
