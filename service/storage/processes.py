"""Linux process and port checks for the embedded redis-server (via /proc; elsewhere
they find nothing, which callers treat as "no leftover server")."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

POLL_S = 0.02


async def wait_for(done: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


def send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has released its port and files; only its exit status is left to reap.
    return proc_state(pid) not in ("Z", None)


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def redis_pids_in(data_dir: Path) -> list[int]:
    """Live redis-server processes whose working directory is data_dir (redis chdirs to
    its `dir`, so this finds a server using our AOF even if its pidfile is gone)."""
    try:
        entries = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes()
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue  # exited meanwhile, or not ours to inspect
        is_redis = comm == "redis-server" or cmdline.startswith(b"redis-server")
        pid = int(entry.name)
        if is_redis and cwd == data_dir and pid != os.getpid() and alive(pid):
            found.append(pid)
    return found


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR ignores TIME_WAIT leftovers but still fails against a listener.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False
