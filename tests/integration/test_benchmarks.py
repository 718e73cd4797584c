"""The queue and cache benchmarks run and print their figures (on a small scale; the
figures themselves are measured with the defaults, see the README)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.cluster import LocalCluster

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run(script: str, c: LocalCluster, *args: str) -> str:
    urls = ",".join(node.url for node in c.nodes)
    command = [sys.executable, f"benchmarks/{script}", "--url", urls, "--seconds", "2",
               "--warmup", "0.3", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=90)
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0
    return done.stdout


def test_queue_bench_reports_throughput_and_latency(c: LocalCluster) -> None:
    out = run("queue_bench.py", c, "--producers", "4", "--consumers", "4", "--batch", "5")
    published = re.search(r"published: (\d+) msgs in .* = ([0-9.]+) msgs/s", out)
    consumed = re.search(r"consumed and acked: (\d+) msgs", out)
    assert published is not None and int(published.group(1)) > 0
    assert consumed is not None and int(consumed.group(1)) > 0
    assert re.search(r"publish request: n=\d+ p50 [0-9.]+ ms, .*p99 [0-9.]+ ms", out)
    assert "errors: 0" in out


def test_queue_bench_offers_a_fixed_rate_when_asked(c: LocalCluster) -> None:
    out = run("queue_bench.py", c, "--producers", "4", "--consumers", "2", "--batch", "5",
              "--rate", "400")
    assert "offered: 400 msgs/s (80 requests/s over 4 producers)" in out
    published = re.search(r"published: \d+ msgs in .* = ([0-9.]+) msgs/s", out)
    assert published is not None
    # Paced, not flat out: 400/s give or take a request per producer at the edges.
    assert 300 <= float(published.group(1)) <= 420, out
    assert "errors: 0" in out


def test_cache_bench_reports_hits_misses_and_writes(c: LocalCluster) -> None:
    out = run("cache_bench.py", c, "--clients", "8", "--keys", "50")
    rate = re.search(r"= ([0-9.]+) ops/s", out)
    assert rate is not None and float(rate.group(1)) > 0
    assert re.search(r"hit ratio \(reads\): [0-9.]+", out)
    for label in ("read hits", "writes"):
        assert re.search(label + r"\s*: n=\d+ p50 [0-9.]+ ms", out), label


def test_locust_users_run_without_failures(c: LocalCluster) -> None:
    """What `make bench` runs: every user class of the locustfile, headless, against all
    nodes; Locust exits non-zero if any request failed."""
    urls = ",".join(node.url for node in c.nodes)
    command = [
        sys.executable, "-m", "locust", "-f", "benchmarks/locustfile.py", "--headless",
        "--only-summary", "-u", "8", "-r", "8", "-t", "4s", "--host", urls,
        "LockUser", "QueueUser", "CacheUser", "SeedScenarioUser",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=90)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    summary = done.stdout + done.stderr
    aggregated = re.search(r"Aggregated\s+(\d+)\s+(\d+)\(", summary)
    assert aggregated is not None, "no Locust summary"
    assert int(aggregated.group(1)) > 0 and int(aggregated.group(2)) == 0
    for name in ("/v1/locks/[own] acquire", "/v1/queues/[q]/messages", "/v1/cache/[key]",
                 "/lock", "/enqueue"):
        assert name in summary, name


@pytest.mark.parametrize(
    ("scenario", "size", "expect"),
    [
        ("hot-lock", "--waiters=60", r"drained: 60 grants in .*; distinct tokens 60"),
        ("unacked", "--messages=600", r"consumed unacked: 600 msgs \(600 distinct\)"),
        ("cache-churn", "--keys=30", r"churned: 30 keys .*errors: 0"),
        (
            "held-locks",
            "--locks=200",
            r"acquired: 200 of 200 locks (.|\n)*then 6400 acquire\+release(.|\n)*node3: snap",
        ),
        (
            "long-poll",
            "--consumers=60",
            r"consumed: 60 \(60 distinct, 0 duplicates\)(.|\n)*errors: 0",
        ),
    ],
)
def test_scale_bench_scenarios_run_and_report(
    c: LocalCluster, scenario: str, size: str, expect: str
) -> None:
    urls = ",".join(node.url for node in c.nodes)
    command = [sys.executable, "benchmarks/scale_bench.py", scenario, size, "--url", urls]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=90)
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0
    assert re.search(expect, done.stdout), done.stdout


def test_scale_bench_kill_waiters_sees_every_forwarded_wait_granted() -> None:
    command = [sys.executable, "benchmarks/scale_bench.py", "kill-waiters", "--waiters=60"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0
    assert re.search(r"queued: 60 of 60 through the followers; killing leader", done.stdout)
    assert re.search(r"after the kill: 60 granted \(60 distinct tokens\)", done.stdout)


def test_scale_bench_mass_expiry_kills_its_own_leader_and_sees_every_lease_expire() -> None:
    command = [sys.executable, "benchmarks/scale_bench.py", "mass-expiry", "--locks=300",
               "--ttl-ms=2000"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0
    assert re.search(r"killed leader node\d; node\d leads", done.stdout), done.stdout
    assert re.search(r"expired: 300 of 300; first", done.stdout), done.stdout
    assert re.search(r"elections after the failover: term \d+ -> \d+", done.stdout)
    refused = subprocess.run([*command, "--url", "http://127.0.0.1:1"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "no --url" in refused.stderr
