"""Find and stop the processes of one Ray instance, leaving every other Ray on the machine alone
(`ray stop` would stop them all; other jobs share this host).

A Ray instance here is named by its temp dir: the GCS, raylet, dashboard and every worker carry it
(or its session dir below it) on their command line. A driver started in a session of its own
(`start_new_session=True`) also owns every process it spawned, whatever their command lines say.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def processes(temp_dir: str, session_id: int | None = None) -> list[int]:
    """PIDs of the processes naming `temp_dir` on their command line or belonging to the session
    `session_id`, with all their descendants."""
    parents, ours = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone already, or not ours to read
        # After "(comm)": state, ppid, pgrp, session, ...
        pid, fields = int(entry.name), stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue  # exited, waiting to be reaped: nothing left to stop
        parents[pid] = int(fields[1])
        if temp_dir in cmdline or (session_id is not None and int(fields[3]) == session_id):
            ours.add(pid)
    for pid in parents:
        chain, p = [], pid
        while p in parents and p not in ours and p > 1 and len(chain) < 64:
            chain.append(p)
            p = parents[p]
        if p in ours:
            ours.update(chain)
    ours.discard(os.getpid())  # a test process may name the temp dir in its own arguments
    return sorted(ours)


def stop(temp_dir: str, session_id: int | None = None, grace_s: float = 20.0) -> list[int]:
    """SIGTERM, then SIGKILL, the processes `processes(temp_dir, session_id)` finds. Returns the
    PIDs still alive afterwards (none, normally)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes(temp_dir, session_id)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.5)
            pids = processes(temp_dir, session_id)
        if not pids:
            break
    return processes(temp_dir, session_id)
