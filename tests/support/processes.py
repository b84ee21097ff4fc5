"""Process-table helpers for the tests that kill a command and check what it leaves running (Linux /proc)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie counts as dead (its new parent may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def survivors_after(pids: list[int], seconds: float) -> list[int]:
    """Those of ``pids`` still alive ``seconds`` after now (returned early once all are gone). Survivors are
    killed before returning, so a failing test leaves nothing running."""
    gone_by = time.monotonic() + seconds
    while any(map(alive, pids)) and time.monotonic() < gone_by:
        time.sleep(0.05)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left
