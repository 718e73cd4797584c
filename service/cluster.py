"""A local cluster of real node processes on 127.0.0.1.

Used by `python -m service cluster up` (and so `make run`), by the drills and by the
real-process tests: one piece of code starts, kills (-9, node and its Redis), pauses and
restarts nodes, so what the tests exercise is what users run. The partition tests give
each node an address and a network namespace of its own (`hosts`, `launchers`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import REDIS_PORT_OFFSET, default_redis_port
from service.storage.embedded import read_pidfile


@dataclass
class NodeProcess:
    node_id: str
    port: int
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    host: str = "127.0.0.1"
    # A command prefix the node runs under (e.g. `ip netns exec <ns>` in partition tests).
    launcher: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    size: int = 3
    base_port: int = 8001
    data_root: Path = Path("data")
    extra_env: dict[str, str] = field(default_factory=dict)
    log_to_files: bool = False
    nodes: list[NodeProcess] = field(default_factory=list)
    # Per node: the address it binds and is reached at (default 127.0.0.1 for all), and
    # a command prefix to run it under (default none).
    hosts: list[str] | None = None
    launchers: list[tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.size <= 9:
            raise ValueError("a local cluster has 1 to 9 nodes")
        ids = [f"node{i + 1}" for i in range(self.size)]
        ports = [self.base_port + i for i in range(self.size)]
        hosts = self.hosts or ["127.0.0.1"] * self.size
        launchers = self.launchers or [()] * self.size
        if len(hosts) != self.size or len(launchers) != self.size:
            raise ValueError("hosts and launchers need one entry per node")
        for node_id, port, host, launcher in zip(ids, ports, hosts, launchers, strict=True):
            peers = ",".join(
                f"{other}=http://{other_host}:{other_port}"
                for other, other_port, other_host in zip(ids, ports, hosts, strict=True)
                if other != node_id
            )
            data_dir = self.data_root / node_id
            env = {
                **os.environ,
                "NODE_ID": node_id,
                "HOST": host,
                "PORT": str(port),
                "PEERS": peers,
                "MODE": "cluster" if self.size > 1 else "single",
                "DATA_DIR": str(data_dir),
                **self.extra_env,
            }
            env.pop("REDIS_URL", None)  # every local node manages its own Redis
            self.nodes.append(
                NodeProcess(node_id, port, data_dir, env, host=host, launcher=launcher)
            )

    # --- lifecycle --------------------------------------------------------------

    def start(self, index: int | None = None) -> None:
        for node in self._select(index):
            if node.alive():
                continue
            node.data_dir.mkdir(parents=True, exist_ok=True)
            stdout: Any = None
            if self.log_to_files:
                node.log_path = node.data_dir / "node.log"
                stdout = node.log_path.open("ab")
            node.process = subprocess.Popen(
                [*node.launcher, sys.executable, "-m", "service.main"],
                env=node.env,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout is not None else None,
                start_new_session=True,  # Ctrl-C in a terminal reaches only the launcher
            )
            if stdout is not None:
                stdout.close()

    def kill(self, index: int, *, with_redis: bool = True) -> None:
        """kill -9 the node and its embedded redis-server together: a machine crash."""
        node = self.nodes[index]
        redis_pid = read_pidfile(node.data_dir) if with_redis else None
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
        if redis_pid is not None:
            _kill_pid(redis_pid, signal.SIGKILL)
        if node.process is not None:
            node.process.wait(timeout=10)

    def lose_disk(self, index: int) -> None:
        """kill -9 the node and its Redis, then delete everything it stored (its log file
        stays): a disk lost for good. `start(index)` brings it back empty."""
        self.kill(index)
        node = self.nodes[index]
        if not node.data_dir.exists():
            return
        for path in node.data_dir.iterdir():
            if node.log_path is not None and path == node.log_path:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def kill_all(self) -> None:
        for i in range(self.size):
            self.kill(i)

    def pause(self, index: int) -> None:
        node = self.nodes[index]
        if node.process is not None:
            node.process.send_signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        node = self.nodes[index]
        if node.process is not None:
            node.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL whatever is left after timeout."""
        for node in self.nodes:
            if node.alive():
                assert node.process is not None
                node.process.send_signal(signal.SIGCONT)
                node.process.terminate()
        deadline = time.monotonic() + timeout
        for i, node in enumerate(self.nodes):
            if node.process is None:
                continue
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(i)

    # --- observation ------------------------------------------------------------

    def health(self, index: int, timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            return http_json("GET", self.nodes[index].url + "/health", timeout=timeout)[1]
        except (OSError, ValueError):
            return None

    def leader(self) -> int | None:
        """Index of a node that reports itself leader and is followed by a majority."""
        views = [self.health(i) for i in range(self.size)]
        for i, view in enumerate(views):
            if view and view.get("role") == "leader":
                agree = sum(1 for v in views if v and v.get("leader") == view["node"])
                if agree * 2 > self.size:
                    return i
        return None

    def wait_for_leader(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            for node in self.nodes:
                if node.process is not None and node.process.poll() not in (None, 0, -9):
                    raise RuntimeError(f"{node.node_id} exited with {node.process.returncode}")
            time.sleep(0.05)
        raise TimeoutError(f"no leader elected within {timeout} s")

    def _select(self, index: int | None) -> list[NodeProcess]:
        return self.nodes if index is None else [self.nodes[index]]


def http_json(
    method: str, url: str, body: Any = None, timeout: float = 2.0
) -> tuple[int, dict[str, Any]]:
    """A tiny blocking JSON client for the launcher, drills and tests."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload or b"{}")
        except ValueError:
            return exc.code, {"raw": payload.decode(errors="replace")}


def _kill_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _gone(pid):
        time.sleep(0.01)


def _gone(pid: int) -> bool:
    """True once pid has exited; a zombie counts (an orphan is reaped only if PID 1 does
    reaping, which a container's init may not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


# --- ports -----------------------------------------------------------------------------


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(base_port: int, size: int) -> list[int]:
    """The HTTP ports of a local cluster's nodes and of their embedded Redis servers."""
    ports = [base_port + i for i in range(size)]
    return ports + [default_redis_port(p) for p in ports]


EPHEMERAL_PORTS_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_port_low(path: str = EPHEMERAL_PORTS_FILE) -> int:
    """Where the kernel starts picking local ports for outgoing connections (Linux's
    default when the file cannot be read)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port(size: int, low: int = 10_000, high: int | None = None) -> int:
    """A base port whose node ports and embedded Redis ports are all free, all below
    the ephemeral range: a port in it may be free when checked and taken a moment
    later by some outgoing connection's local end (seen in CI: a node's Redis port).
    """
    if high is None:
        high = ephemeral_port_low() - REDIS_PORT_OFFSET - size
    if high <= low:
        raise RuntimeError(f"no room for {size} nodes between port {low} and {high}")
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high)
        if all(port_free(p) for p in cluster_ports(base, size)):
            return base
    raise RuntimeError("no free port range found on 127.0.0.1")
