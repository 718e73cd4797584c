"""Bad configuration stops a node with one clear line on stderr, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import free_base_port

REPO = Path(__file__).resolve().parents[2]


def run_node(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PEERS")}
    full_env.update({"DATA_DIR": str(tmp_path / "data"), "LOG_FORMAT": "json", **env})
    return subprocess.run(
        [sys.executable, "-m", "service.main", *args],
        cwd=tmp_path,  # no .env of the developer's
        env={**full_env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    # JSON log lines are structured logs; anything else on stderr is for the operator.
    return [line for line in result.stderr.splitlines() if not line.startswith("{")]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NODE_ID": "node1", "PEERS": "htp:/x"}, "PEERS: 'htp:/x' is not a URL"),
        ({"NODE_ID": "node1", "PEERS": "node2=http://127.0.0.1:99999"}, "PEERS"),
        ({"NODE_ID": "bad id!"}, "NODE_ID"),
        ({"NODE_ID": "node1", "PORT": "eighty"}, "PORT"),
        ({}, "NODE_ID: required"),
    ],
)
def test_bad_setting_is_one_line_exit_2(tmp_path, env, expected):
    result = run_node(tmp_path, env)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dsync: configuration error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line(tmp_path):
    port = free_base_port(1)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        result = run_node(tmp_path, {"NODE_ID": "node1", "MODE": "single", "PORT": str(port)})
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert f"PORT: cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in result.stderr


def test_unreachable_redis_url_is_one_line(tmp_path):
    port = free_base_port(1)
    result = run_node(
        tmp_path,
        {
            "NODE_ID": "node1",
            "MODE": "single",
            "PORT": str(port),
            "REDIS_URL": "redis://127.0.0.1:1/0",
        },
    )
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert "REDIS_URL: cannot reach Redis at redis://127.0.0.1:1/0" in lines[0]
    assert "Traceback" not in result.stderr


def test_seed_start_command_serves_health(tmp_path):
    """`python -m service.main --node node1 --port N` (the prototype's command) works."""
    port = free_base_port(1)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PEERS", "NODE_ID")}
    env.update({"MODE": "single", "DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.main", "--node", "node1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        import time

        from service.cluster import http_json

        deadline = time.monotonic() + 30
        body: dict = {}
        while time.monotonic() < deadline:
            try:
                _, body = http_json("GET", f"http://127.0.0.1:{port}/health", timeout=0.5)
                if body.get("role") == "leader":
                    break
            except OSError:
                pass
            time.sleep(0.05)
        assert body.get("node") == "node1" and body.get("role") == "leader", body
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
