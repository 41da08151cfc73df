"""Process helpers (Linux ``/proc``) for the tests and benchmarks that start servers.

No pytest here: ``tests/pushpin.py`` and ``bench/chaos.py`` both use them.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have ``signum`` sent to this process when the thread that started it dies
    (``prctl(PR_SET_PDEATHSIG)``): in a child before exec, or first thing in it, so a
    killed test run or benchmark leaves nothing behind."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def children(pid: int) -> list[int]:
    """Every descendant of process ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *children(int(child))]
    return found


def status_kb(pid: int, field: str) -> int:
    """A memory figure of ``/proc/<pid>/status`` in kB (``VmRSS``, ``VmHWM``); 0 once gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0
