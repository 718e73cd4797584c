"""Settings: sources and precedence, PEERS forms, every validation error, peer id
resolution, the generated configuration table, and the logging setup they feed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from aiohttp import web

from service.config import (
    ConfigError,
    Peer,
    Settings,
    add_cli_arguments,
    load_settings,
    parse_peers,
    render_markdown_table,
    resolve_peer_ids,
)
from service.logs import setup_logging

ROOT = Path(__file__).resolve().parent.parent


def load(env: Mapping[str, str], **kwargs: object) -> Settings:
    """Settings from exactly `env`: never the real environment or a stray .env."""
    kwargs.setdefault("env_file", None)
    return load_settings(environ=env, **kwargs)  # type: ignore[arg-type]


def error_of(env: Mapping[str, str], **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load(env, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, "errors must be one line"
    return message


# --- defaults and plain values ---------------------------------------------------------


def test_defaults_with_only_node_id() -> None:
    settings = load({"NODE_ID": "node1"})
    assert settings == Settings(
        node_id="node1",
        host="127.0.0.1",
        port=8000,
        peers=(),
        redis_url=None,
        mode="cluster",
        data_dir=Path("data") / "node1",
        cluster_secret=None,
        log_level="INFO",
        log_format="json",
        tick_ms=50,
        election_ticks=8,
        heartbeat_ticks=2,
        snapshot_threshold=10_000,
        max_body_bytes=1024 * 1024,
        redis_port=9000,
    )
    assert settings.embedded_redis
    assert settings.election_timeout_ms == 400


def test_every_setting_from_environment() -> None:
    settings = load(
        {
            "NODE_ID": "n-2_b",
            "HOST": "0.0.0.0",
            "PORT": "8002",
            "PEERS": "n1=http://10.0.0.1:8001",
            "REDIS_URL": "redis://10.0.0.2:6380/3",
            "MODE": "cluster",
            "DATA_DIR": "/var/lib/dsync",
            "CLUSTER_SECRET": "s3cret",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "TEXT",
            "TICK_MS": "20",
            "ELECTION_TICKS": "15",
            "HEARTBEAT_TICKS": "3",
            "SNAPSHOT_THRESHOLD": "500",
            "GC_REFREEZE_SECONDS": "0",
            "GC_YOUNG_THRESHOLD": "0",
            "MAX_BODY_BYTES": "2048",
            "REDIS_PORT": "7000",
        }
    )
    assert settings.node_id == "n-2_b"
    assert settings.host == "0.0.0.0"
    assert settings.port == 8002
    assert settings.peers == (Peer("n1", "http://10.0.0.1:8001"),)
    assert settings.redis_url == "redis://10.0.0.2:6380/3"
    assert not settings.embedded_redis
    assert settings.data_dir == Path("/var/lib/dsync")
    assert settings.cluster_secret == "s3cret"
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "text"
    assert (settings.tick_ms, settings.election_ticks, settings.heartbeat_ticks) == (20, 15, 3)
    assert settings.snapshot_threshold == 500
    assert settings.gc_refreeze_seconds == 0
    assert settings.gc_young_threshold == 0
    assert settings.max_body_bytes == 2048
    assert settings.redis_port == 7000


def test_settings_are_frozen() -> None:
    settings = load({"NODE_ID": "node1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_secret_is_not_in_repr() -> None:
    settings = load({"NODE_ID": "node1", "CLUSTER_SECRET": "hunter2-very-secret"})
    assert "hunter2" not in repr(settings)


def test_empty_values_count_as_unset() -> None:
    settings = load({"NODE_ID": "node1", "REDIS_URL": "", "PORT": "  ", "CLUSTER_SECRET": ""})
    assert settings.redis_url is None
    assert settings.port == 8000
    assert settings.cluster_secret is None


def test_redis_port_follows_port() -> None:
    assert load({"NODE_ID": "a", "PORT": "8003"}).redis_port == 9003
    # Near the top of the range the offset goes the other way rather than failing.
    assert load({"NODE_ID": "a", "PORT": "65000"}).redis_port == 64000
    assert load({"NODE_ID": "a", "PORT": "64535"}).redis_port == 65535


def test_redis_port_equal_to_port_is_rejected_only_for_embedded_redis() -> None:
    env = {"NODE_ID": "a", "PORT": "8000", "REDIS_PORT": "8000"}
    assert error_of(env) == "REDIS_PORT: 8000 is also PORT; pick another port"
    assert load({**env, "REDIS_URL": "redis://r:6379/0"}).redis_port == 8000


# --- sources and precedence --------------------------------------------------------------


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("NODE_ID=fromfile\nPORT=8100\nLOG_LEVEL=warning\n# comment\n")
    settings = load({"PORT": "8200"}, env_file=env_file)
    assert settings.node_id == "fromfile"
    assert settings.port == 8200
    assert settings.log_level == "WARNING"


def test_cli_overrides_win_over_environment_and_dotenv(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("NODE_ID=fromfile\nPORT=8100\n")
    settings = load({"PORT": "8200"}, env_file=env_file, overrides={"PORT": "8300", "HOST": None})
    assert settings.port == 8300
    assert settings.host == "127.0.0.1"  # a None override (absent flag) changes nothing


def test_empty_environment_value_lets_dotenv_show_through(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("NODE_ID=node1\nPORT=8100\n")
    assert load({"PORT": ""}, env_file=env_file).port == 8100


def test_dotenv_does_not_touch_os_environ(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("NODE_ID=node1\nDSYNC_TEST_ONLY_KEY=1\n")
    load({}, env_file=env_file)
    assert "DSYNC_TEST_ONLY_KEY" not in os.environ


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    assert load({"NODE_ID": "node1"}, env_file=tmp_path / "absent.env").node_id == "node1"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NODE_ID", "envnode")
    monkeypatch.setenv("PORT", "8765")
    settings = load_settings(env_file=tmp_path / "absent.env")
    assert (settings.node_id, settings.port) == ("envnode", 8765)


def test_cli_flags_map_to_settings() -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--node-id", "cli1", "--port", "8123", "--log-format", "text"])
    settings = load({"NODE_ID": "env1", "PORT": "8000"}, overrides=vars(args))
    assert (settings.node_id, settings.port, settings.log_format) == ("cli1", 8123, "text")
    # One flag per setting, named after it.
    flags = {action.dest for action in parser._actions if action.dest != "help"}
    assert flags == {name for name, _, _ in Settings.describe()}


# --- MODE ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "mode"),
    [("cluster", "cluster"), ("single", "single"), ("SINGLE", "single"), (" Cluster ", "cluster")],
)
def test_mode_values(raw: str, mode: str) -> None:
    assert load({"NODE_ID": "node1", "MODE": raw}).mode == mode


def test_unknown_mode() -> None:
    assert error_of({"NODE_ID": "node1", "MODE": "solo"}) == (
        "MODE: 'solo' is not one of cluster, single"
    )


def test_single_mode_ignores_peers_even_malformed_ones() -> None:
    settings = load({"NODE_ID": "node1", "MODE": "single", "PEERS": "htp:/x,,"})
    assert settings.peers == ()


def test_single_mode_defaults_node_id_but_cluster_mode_requires_it() -> None:
    assert load({"MODE": "single"}).node_id == "node1"
    assert load({"MODE": "single"}).data_dir == Path("data") / "node1"
    assert error_of({}) == "NODE_ID: required; set it to this node's unique id, e.g. node1"


# --- NODE_ID --------------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", ["a", "node1", "Node_1-x", "x" * 64, "123"])
def test_valid_node_ids(node_id: str) -> None:
    assert load({"NODE_ID": node_id}).node_id == node_id


@pytest.mark.parametrize("node_id", ["node 1", "x" * 65, "nöde", "a/b", "a.b", "a=b"])
def test_invalid_node_ids(node_id: str) -> None:
    assert error_of({"NODE_ID": node_id}) == (
        f"NODE_ID: {node_id!r} is not a node id; use 1-64 characters from A-Z a-z 0-9 _ -"
    )


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("abc", "PORT: 'abc' is not a whole number"),
        ("80.5", "PORT: '80.5' is not a whole number"),
        ("0x50", "PORT: '0x50' is not a whole number"),
        ("0", "PORT: 0 is out of range; use 1..65535"),
        ("-1", "PORT: -1 is out of range; use 1..65535"),
        ("65536", "PORT: 65536 is out of range; use 1..65535"),
    ],
)
def test_bad_port(raw: str, message: str) -> None:
    assert error_of({"NODE_ID": "node1", "PORT": raw}) == message


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("REDIS_PORT", "70000"),
        ("TICK_MS", "0"),
        ("ELECTION_TICKS", "1"),
        ("HEARTBEAT_TICKS", "0"),
        ("SNAPSHOT_THRESHOLD", "0"),
        ("GC_REFREEZE_SECONDS", "-1"),
        ("GC_REFREEZE_SECONDS", "5m"),
        ("MAX_BODY_BYTES", "10"),
        ("MAX_BODY_BYTES", "1MiB"),
    ],
)
def test_bad_numbers_name_their_setting(name: str, raw: str) -> None:
    assert error_of({"NODE_ID": "node1", name: raw}).startswith(f"{name}: ")


def test_heartbeat_must_be_shorter_than_election_timeout() -> None:
    message = error_of({"NODE_ID": "n", "ELECTION_TICKS": "4", "HEARTBEAT_TICKS": "4"})
    assert message.startswith("HEARTBEAT_TICKS: 4 must be less than ELECTION_TICKS (4)")


# --- other strings ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["verbose", "5", "warn"])
def test_bad_log_level(raw: str) -> None:
    assert error_of({"NODE_ID": "n", "LOG_LEVEL": raw}) == (
        f"LOG_LEVEL: {raw!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )


def test_bad_log_format() -> None:
    assert error_of({"NODE_ID": "n", "LOG_FORMAT": "xml"}) == (
        "LOG_FORMAT: 'xml' is not one of json, text"
    )


@pytest.mark.parametrize("host", ["http://0.0.0.0:8000", "local host", "0.0.0.0/24"])
def test_bad_host(host: str) -> None:
    assert error_of({"NODE_ID": "n", "HOST": host}).startswith(f"HOST: {host!r} is not an address")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "node-1.internal", "localhost"])
def test_good_host(host: str) -> None:
    assert load({"NODE_ID": "n", "HOST": host}).host == host


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://r.example:6380", "redis://r", "unix:///t/r.sock"]
)
def test_good_redis_url(url: str) -> None:
    assert load({"NODE_ID": "n", "REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url", ["localhost:6379", "http://r:6379", "redis://", "redis://r:x"])
def test_bad_redis_url(url: str) -> None:
    assert error_of({"NODE_ID": "n", "REDIS_URL": url}) == (
        f"REDIS_URL: {url!r} is not a URL like redis://host:6379/0 (or unix:///path.sock)"
    )


def test_redis_url_database_must_be_a_number() -> None:
    assert error_of({"NODE_ID": "n", "REDIS_URL": "redis://r:6379/main"}) == (
        "REDIS_URL: 'redis://r:6379/main' names database 'main'; use a number"
    )


# --- PEERS -------------------------------------------------------------------------------------


def test_peers_with_explicit_ids() -> None:
    settings = load(
        {
            "NODE_ID": "node1",
            "PORT": "8001",
            "PEERS": "node2=http://127.0.0.1:8002,node3=http://127.0.0.1:8003",
        }
    )
    assert settings.peers == (
        Peer("node2", "http://127.0.0.1:8002"),
        Peer("node3", "http://127.0.0.1:8003"),
    )


def test_peers_as_bare_urls_like_the_seed_prototype() -> None:
    settings = load(
        {"NODE_ID": "node1", "PORT": "8001", "PEERS": "http://127.0.0.1:8002,http://127.0.0.1:8003"}
    )
    assert settings.peers == (
        Peer(None, "http://127.0.0.1:8002"),
        Peer(None, "http://127.0.0.1:8003"),
    )


def test_peers_normalised_and_forms_mixed() -> None:
    peers = parse_peers(
        " node2 = HTTP://Node2.Example:8000/ , https://[::1]:9443,, http://n4 ,",
        node_id="node1",
        port=8001,
    )
    assert peers == (
        Peer("node2", "http://node2.example:8000"),
        Peer(None, "https://[::1]:9443"),
        Peer(None, "http://n4"),
    )


def test_peers_empty() -> None:
    assert parse_peers("") == ()
    assert parse_peers(" , ") == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("htp:/x", "PEERS: 'htp:/x' is not a URL like http://host:port"),
        ("http://", "PEERS: 'http://' is not a URL like http://host:port"),
        ("127.0.0.1:8002", "PEERS: '127.0.0.1:8002' is not a URL like http://host:port"),
        ("localhost:8002", "PEERS: 'localhost:8002' is not a URL like http://host:port"),
        ("ftp://h:21", "PEERS: 'ftp://h:21' is not a URL like http://host:port"),
        ("http://h:abc", "PEERS: 'http://h:abc' is not a URL like http://host:port"),
        ("http://h:99999", "PEERS: 'http://h:99999' is not a URL like http://host:port"),
        ("node2=", "PEERS: '' is not a URL like http://host:port"),
        ("node 2=http://h:1", "PEERS: 'node 2=http://h:1' is not a URL like http://host:port"),
        ("http://h:0", "PEERS: 'http://h:0' has port 0; use 1..65535"),
        (
            "http://h:1/api",
            "PEERS: 'http://h:1/api' must be a base URL with no path, like http://host:port",
        ),
        (
            "http://h:1?x=1",
            "PEERS: 'http://h:1?x=1' must be a base URL with no path, like http://host:port",
        ),
        (
            "http://u:pw@h:1",
            "PEERS: 'http://u:pw@h:1' carries credentials; remove them and set CLUSTER_SECRET",
        ),
    ],
)
def test_malformed_peers(raw: str, message: str) -> None:
    assert error_of({"NODE_ID": "node1", "PEERS": raw}) == message


def test_malformed_peer_among_good_ones() -> None:
    env = {"NODE_ID": "node1", "PEERS": "node2=http://h2:8000,node3=htp:/h3"}
    assert error_of(env) == "PEERS: 'htp:/h3' is not a URL like http://host:port"


def test_duplicate_peer_url() -> None:
    env = {"NODE_ID": "node1", "PEERS": "http://h2:8000,node9=HTTP://H2:8000/"}
    assert error_of(env) == (
        "PEERS: 'http://h2:8000' appears more than once (also as 'http://h2:8000')"
    )


def test_duplicate_peer_url_by_default_port() -> None:
    env = {"NODE_ID": "node1", "PEERS": "http://h2,http://h2:80"}
    assert "appears more than once" in error_of(env)


def test_duplicate_peer_id() -> None:
    env = {"NODE_ID": "node1", "PEERS": "node2=http://h2:8000,node2=http://h3:8000"}
    assert error_of(env) == "PEERS: node id 'node2' appears more than once"


def test_peers_must_not_name_this_node_by_id() -> None:
    env = {"NODE_ID": "node1", "PEERS": "node1=http://h1:8000"}
    assert error_of(env) == (
        "PEERS: 'node1=http://h1:8000' has this node's own id 'node1'; list only the other nodes"
    )


@pytest.mark.parametrize(
    ("host", "peer"),
    [
        ("127.0.0.1", "http://127.0.0.1:8001"),
        ("127.0.0.1", "http://localhost:8001"),
        ("localhost", "http://127.0.0.1:8001"),
        ("0.0.0.0", "http://127.0.0.1:8001"),
        ("0.0.0.0", "http://[::1]:8001"),
        ("10.1.2.3", "http://10.1.2.3:8001"),
        ("Node1.Internal", "http://node1.internal:8001"),
    ],
)
def test_peers_must_not_include_own_address(host: str, peer: str) -> None:
    message = error_of({"NODE_ID": "node1", "HOST": host, "PORT": "8001", "PEERS": peer})
    assert message.startswith("PEERS: ") and "is this node's own address" in message


@pytest.mark.parametrize(
    ("host", "peer"),
    [
        ("127.0.0.1", "http://127.0.0.1:8002"),  # same host, other port: a local cluster
        ("0.0.0.0", "http://node2:8001"),  # same port, other host: docker-compose
        ("10.1.2.3", "http://127.0.0.1:8001"),  # bound to one interface, not loopback
    ],
)
def test_other_nodes_are_not_mistaken_for_this_one(host: str, peer: str) -> None:
    settings = load({"NODE_ID": "node1", "HOST": host, "PORT": "8001", "PEERS": peer})
    assert len(settings.peers) == 1


# --- resolving bare-URL peers -----------------------------------------------------------------


def _settings_with_peers(peers: str) -> Settings:
    return load({"NODE_ID": "node1", "PORT": "8001", "PEERS": peers})


async def test_resolve_learns_missing_ids_and_keeps_given_ones() -> None:
    asked: list[str] = []

    async def fetch(url: str) -> str:
        asked.append(url)
        return {"http://h2:8002": "node2", "http://h3:8003": "node3"}[url]

    settings = _settings_with_peers("http://h2:8002,node3=http://h3:8003")
    resolved = await resolve_peer_ids(settings, fetch=fetch)
    assert resolved.peers == (Peer("node2", "http://h2:8002"), Peer("node3", "http://h3:8003"))
    assert asked == ["http://h2:8002"]
    assert dataclasses.replace(resolved, peers=settings.peers) == settings


async def test_resolve_without_bare_urls_does_nothing() -> None:
    async def fetch(url: str) -> str:
        raise AssertionError("must not be called")

    settings = _settings_with_peers("node2=http://h2:8002")
    assert await resolve_peer_ids(settings, fetch=fetch) is settings


async def test_resolve_retries_until_the_peer_is_up() -> None:
    calls = 0

    async def fetch(url: str) -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionRefusedError("connection refused")
        if calls < 4:
            return "not a node id!"  # a half-started peer answering garbage
        return "node2"

    resolved = await resolve_peer_ids(
        _settings_with_peers("http://h2:8002"), fetch=fetch, first_delay_s=0.001
    )
    assert resolved.peers == (Peer("node2", "http://h2:8002"),)
    assert calls == 4


async def test_resolve_gives_up_with_a_clear_error() -> None:
    calls = 0

    async def fetch(url: str) -> str:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(ConfigError) as caught:
        await resolve_peer_ids(
            _settings_with_peers("http://h2:8002"), fetch=fetch, attempts=3, first_delay_s=0.001
        )
    assert calls == 3
    assert str(caught.value) == (
        "PEERS: could not learn the node id of http://h2:8002 after 3 attempts "
        "(ConnectionRefusedError: connection refused); start that node or write the entry "
        "as id=http://h2:8002"
    )


async def test_resolve_rejects_a_peer_answering_with_our_id() -> None:
    async def fetch(url: str) -> str:
        return "node1"

    with pytest.raises(ConfigError, match=r"answers as 'node1', this node's own id"):
        await resolve_peer_ids(_settings_with_peers("http://h2:8002"), fetch=fetch)


async def test_resolve_rejects_two_urls_of_one_node() -> None:
    async def fetch(url: str) -> str:
        return "node2"

    with pytest.raises(ConfigError) as caught:
        await resolve_peer_ids(
            _settings_with_peers("node2=http://h2:8002,http://h2-alias:8002"), fetch=fetch
        )
    assert str(caught.value) == (
        "PEERS: http://h2:8002 and http://h2-alias:8002 are both node 'node2'; "
        "each node needs its own NODE_ID"
    )


async def test_resolve_over_real_http() -> None:
    health_calls = 0

    async def health(request: web.Request) -> web.Response:
        nonlocal health_calls
        health_calls += 1
        if health_calls == 1:  # still starting: the resolver must retry, not give up
            return web.Response(text="starting", status=503)
        if health_calls == 2:  # up but not ready: the id it reports is still good
            return web.json_response({"status": "unavailable", "node": "node7"}, status=503)
        raise AssertionError("asked again after learning the id")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}"
        resolved = await resolve_peer_ids(_settings_with_peers(url), first_delay_s=0.01)
        assert resolved.peers == (Peer("node7", url),)
        assert health_calls == 2
    finally:
        await runner.cleanup()


async def test_resolve_over_real_http_unreachable() -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    settings = _settings_with_peers("http://127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"could not learn the node id of http://127.0.0.1:1"):
        await resolve_peer_ids(settings, attempts=2, first_delay_s=0.01)


# --- documentation ------------------------------------------------------------------------------


def test_describe_covers_every_field() -> None:
    described = Settings.describe()
    names = [name for name, _, _ in described]
    assert len(names) == len(dataclasses.fields(Settings))
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Z_]+", name) for name in names)
    assert all(default and doc for _, default, doc in described)


def test_configuration_doc_is_current() -> None:
    doc = ROOT / "docs" / "configuration.md"
    assert doc.read_text() == render_markdown_table(), (
        "docs/configuration.md is stale; run `make docs`"
    )


def test_readme_table_is_current_if_embedded() -> None:
    # The README may embed the table between these markers; if so it must match too.
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else ""
    start, end = "<!-- config-table:start -->", "<!-- config-table:end -->"
    if start not in text:
        pytest.skip("README.md does not embed the configuration table")
    embedded = text.split(start, 1)[1].split(end, 1)[0]
    assert embedded.strip() == render_markdown_table().strip()


def test_module_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    assert result.stdout == render_markdown_table()


# --- logging setup (service/logs.py, configured from LOG_LEVEL / LOG_FORMAT) ---------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_log_lines(root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("node3", "info", "json")
    log = logging.getLogger("dsync.test")
    log.debug("not shown at INFO")
    log.info("elected %s", "leader", extra={"term": 7, "node": "node2", "path": Path("/x")})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert list(first)[:5] == ["ts", "level", "logger", "node", "msg"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first["level"] == "INFO" and first["logger"] == "dsync.test"
    assert first["node"] == "node3" and first["msg"] == "elected leader"
    # Extras are kept; one named like a core field neither overwrites it nor vanishes.
    assert first["term"] == 7 and first["path"] == "/x" and first["extra.node"] == "node2"
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exc"]


def test_text_log_lines_and_reconfiguration(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("node1", "INFO", "json")
    setup_logging("node1", "DEBUG", "text")  # replaces the first handler, not adds one
    logging.getLogger("dsync.test").debug("hello", extra={"peer": "node2"})
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\S+Z DEBUG   \[node1\] dsync\.test: hello peer='node2'", line), line


@pytest.mark.parametrize(("level", "fmt"), [("LOUD", "json"), ("INFO", "xml")])
def test_setup_logging_rejects_bad_values(
    root_logger: logging.Logger, level: str, fmt: str
) -> None:
    with pytest.raises(ValueError):
        setup_logging("node1", level, fmt)


# --- cache settings --------------------------------------------------------------------------


def test_cache_settings_are_read_and_checked() -> None:
    settings = load({"NODE_ID": "n", "CACHE_MAX_ENTRIES": "500", "CACHE_MAX_BYTES": "2048",
                     "CACHE_POLICY": "LFU", "CACHE_LEASE_MS": "800"})
    assert (settings.cache_max_entries, settings.cache_max_bytes, settings.cache_policy,
            settings.cache_lease_ms) == (500, 2048, "lfu", 800)
    assert error_of({"NODE_ID": "n", "CACHE_POLICY": "fifo"}) == (
        "CACHE_POLICY: 'fifo' is not one of lru, lfu"
    )
    assert error_of({"NODE_ID": "n", "CACHE_MAX_ENTRIES": "0"}).startswith("CACHE_MAX_ENTRIES")
    assert error_of({"NODE_ID": "n", "CACHE_LEASE_MS": "5"}).startswith("CACHE_LEASE_MS")


def test_gc_young_threshold_defaults_and_bounds() -> None:
    assert load({"NODE_ID": "node1"}).gc_young_threshold == 5000
    assert load({"NODE_ID": "node1", "GC_YOUNG_THRESHOLD": "700"}).gc_young_threshold == 700
    with pytest.raises(ConfigError, match="GC_YOUNG_THRESHOLD: -1 is out of range"):
        load({"NODE_ID": "node1", "GC_YOUNG_THRESHOLD": "-1"})
