"""`python -m service cluster up` (what `make run` starts) as an operator uses it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.cluster import free_base_port, http_json, port_free

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def launch(base: int, data: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "cluster", "up", "--nodes", "3",
         "--base-port", str(base), "--data", str(data)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not printed; output:\n{''.join(seen)}")


def test_sigterm_stops_every_node_and_a_second_launch_resumes(tmp_path: Path) -> None:
    base = free_base_port(3)
    proc = launch(base, tmp_path)
    try:
        wait_line(proc, "cluster is up", 60)
        status, _ = http_json("PUT", f"http://127.0.0.1:{base}/v1/kv/k", {"value": "kept"})
        assert status == 200
        # A second launcher on the same ports must refuse, not report the first as its own.
        second = launch(base, tmp_path / "other")
        assert second.wait(30) == 1
        assert second.stdout is not None and "in use" in second.stdout.read()
        # Twice, as `timeout` or a supervisor may: the second must not cut the stop short.
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(port_free(base + i) for i in range(3)):
        time.sleep(0.1)
    assert all(port_free(base + i) for i in range(3)), "a node outlived its launcher"
    again = launch(base, tmp_path)
    try:
        wait_line(again, "cluster is up", 60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, body = http_json("GET", f"http://127.0.0.1:{base + 1}/v1/kv/k")
            if status == 200:
                break
            time.sleep(0.1)
        assert (status, body.get("value")) == (200, "kept")
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(30)
