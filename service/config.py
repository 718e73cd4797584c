"""Node settings: one frozen `Settings`, read from CLI flags, the environment and `.env`.

Precedence is CLI flag > environment > `.env` > default. An empty value counts as unset,
so compose files can pass `${VAR:-}` through without choosing a value.

Every problem raises `ConfigError` whose message is one line naming the setting, so
`service.main` can print it and exit 2 instead of showing a traceback.

PEERS lists the *other* nodes, comma-separated, each either `id=url` or a bare `url`.
A bare URL's node id is not guessed from the URL (two URLs may reach one node, and ids
outlive addresses); `resolve_peer_ids` asks the peer's `GET /health` at start instead.

`python -m service.config` prints the configuration table in Markdown; the file
docs/configuration.md holds that output and a test keeps the two identical.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast, get_args
from urllib.parse import SplitResult, urlsplit

from dotenv import dotenv_values

__all__ = [
    "ConfigError",
    "Peer",
    "Settings",
    "add_cli_arguments",
    "load_settings",
    "parse_peers",
    "render_markdown_table",
    "resolve_peer_ids",
]

DEFAULT_ENV_FILE = Path(".env")
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A node id typed into PEERS must start like an identifier so that "http://..." is never
# mistaken for "id=url" (a URL can itself contain "=" in a query string).
_PEER_ID_PREFIX = re.compile(r"^([A-Za-z0-9_-]{1,64})\s*=(.*)$", re.DOTALL)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Added to PORT for the embedded redis-server when REDIS_PORT is not set: a fixed offset
# lets an operator find node N's Redis (`redis-cli -p 9001` for port 8001) without
# looking anything up, and nodes on one host with distinct PORTs get distinct Redis ports.
REDIS_PORT_OFFSET = 1000
# In single mode the node is alone, so a default id is harmless and saves a step.
SINGLE_MODE_NODE_ID = "node1"
_HOST_PATTERN = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})

Mode = Literal["cluster", "single"]
LogFormat = Literal["json", "text"]
_MODES: tuple[str, ...] = get_args(Mode)
_LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
_CACHE_POLICIES: tuple[str, ...] = ("lru", "lfu")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message is one line, fit to show a user."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Another node: its id (None until learned from its /health) and base URL."""

    node_id: str | None
    url: str


def _opt(env: str, default: str, doc: str) -> dict[str, str]:
    # Field metadata is the single source for the env name, the CLI flag, and the docs.
    return {"env": env, "default": default, "doc": doc}


@dataclass(frozen=True, slots=True)
class Settings:
    node_id: str = field(
        metadata=_opt(
            "NODE_ID",
            "(required; node1 in single mode)",
            "This node's id: 1-64 of `A-Z a-z 0-9 _ -`. Must be unique in the cluster "
            "and stay the same across restarts.",
        )
    )
    host: str = field(
        default="127.0.0.1",
        metadata=_opt("HOST", "127.0.0.1", "Address the HTTP server binds to."),
    )
    port: int = field(
        default=8000,
        metadata=_opt("PORT", "8000", "HTTP port (1-65535); clients and peers use it."),
    )
    peers: tuple[Peer, ...] = field(
        default=(),
        metadata=_opt(
            "PEERS",
            "(empty)",
            "The OTHER nodes, comma-separated: `node2=http://127.0.0.1:8002,...`, or "
            "bare URLs whose ids are learned from each peer's `GET /health` at start. "
            "Ignored in single mode.",
        ),
    )
    redis_url: str | None = field(
        default=None,
        metadata=_opt(
            "REDIS_URL",
            "(unset: embedded)",
            "This node's own Redis, e.g. `redis://127.0.0.1:6379/0`. Unset: the node "
            "starts its own redis-server (AOF, fsync always) in DATA_DIR.",
        ),
    )
    mode: Mode = field(
        default="cluster",
        metadata=_opt(
            "MODE",
            "cluster",
            "`cluster`: run Raft with PEERS. `single`: a one-node cluster that ignores "
            "PEERS (development, or a deployment that needs no replication).",
        ),
    )
    data_dir: Path = field(
        default=Path("data"),
        metadata=_opt(
            "DATA_DIR",
            "./data/<NODE_ID>",
            "Directory for the embedded Redis's files and other node-local state.",
        ),
    )
    # repr=False: settings get logged at start, and the secret must not be.
    cluster_secret: str | None = field(
        default=None,
        repr=False,
        metadata=_opt(
            "CLUSTER_SECRET",
            "(unset)",
            "Shared secret that peer-to-peer requests must carry; set the same value on "
            "every node. Unset: peer traffic is not authenticated. Prefer the environment "
            "to `--cluster-secret`, which other local users can read from the process list.",
        ),
    )
    log_level: str = field(
        default="INFO",
        metadata=_opt("LOG_LEVEL", "INFO", "One of " + ", ".join(LOG_LEVELS) + "."),
    )
    log_format: LogFormat = field(
        default="json",
        metadata=_opt("LOG_FORMAT", "json", "`json` (one object per line) or `text` (for humans)."),
    )
    tick_ms: int = field(
        default=50,
        metadata=_opt("TICK_MS", "50", "Length of one Raft tick in milliseconds."),
    )
    election_ticks: int = field(
        default=8,
        metadata=_opt(
            "ELECTION_TICKS",
            "8",
            "Ticks without a leader before a follower campaigns (each timeout is drawn "
            "from [E, 2E) ticks; 8 x 50 ms keeps failover under 1 s).",
        ),
    )
    heartbeat_ticks: int = field(
        default=2,
        metadata=_opt(
            "HEARTBEAT_TICKS",
            "2",
            "Ticks between a leader's heartbeats; must be less than ELECTION_TICKS.",
        ),
    )
    snapshot_threshold: int = field(
        default=10_000,
        metadata=_opt(
            "SNAPSHOT_THRESHOLD",
            "10000",
            "Log entries applied since the last snapshot before a new one is taken.",
        ),
    )
    gc_refreeze_seconds: int = field(
        default=300,
        metadata=_opt(
            "GC_REFREEZE_SECONDS",
            "300",
            "Seconds between full garbage collections of everything; in between, what "
            "survives any full collection is frozen, so automatic collections skip it and "
            "stay short however large the state (service/gc_policy.py). The interval "
            "doubles, up to 12 times this, while they find under 1% garbage. 0 leaves "
            "Python's collector as it is.",
        ),
    )
    gc_young_threshold: int = field(
        default=5000,
        metadata=_opt(
            "GC_YOUNG_THRESHOLD",
            "5000",
            "Net new container objects between collections of Python's youngest "
            "generation (Python's own default: 700). Higher means fewer collections "
            "that each find little garbage: more throughput, slightly longer pauses "
            "(service/gc_policy.py). 0 leaves Python's setting as it is.",
        ),
    )
    max_body_bytes: int = field(
        default=1024 * 1024,
        metadata=_opt(
            "MAX_BODY_BYTES", "1048576", "Largest request body accepted; larger gets 413."
        ),
    )
    redis_port: int = field(
        default=9000,
        metadata=_opt(
            "REDIS_PORT",
            f"PORT+{REDIS_PORT_OFFSET}",
            f"Port of the embedded redis-server on 127.0.0.1 (PORT-{REDIS_PORT_OFFSET} when "
            f"PORT+{REDIS_PORT_OFFSET} would pass 65535); unused when REDIS_URL is set.",
        ),
    )

    cache_max_entries: int = field(
        default=10_000,
        metadata=_opt(
            "CACHE_MAX_ENTRIES", "10000", "Lines this node's cache holds before it evicts."
        ),
    )
    cache_max_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_opt(
            "CACHE_MAX_BYTES",
            "67108864",
            "Bytes of values this node's cache holds before it evicts (64 MiB).",
        ),
    )
    cache_policy: str = field(
        default="lru",
        metadata=_opt(
            "CACHE_POLICY", "lru", "Which line the cache evicts first: `lru` or `lfu`."
        ),
    )
    cache_lease_ms: int = field(
        default=5_000,
        metadata=_opt(
            "CACHE_LEASE_MS",
            "5000",
            "How long a shared cache line serves reads without asking its home; a write "
            "waits at most this long for a sharer that does not answer.",
        ),
    )

    @property
    def election_timeout_ms(self) -> int:
        """The shortest election timeout, for logs and docs; Raft counts ticks."""
        return self.tick_ms * self.election_ticks

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(name, default, description) for every setting, in declaration order."""
        return [(f.metadata["env"], f.metadata["default"], f.metadata["doc"]) for f in fields(cls)]


# Defaults as declared above; load_settings derives DATA_DIR and REDIS_PORT instead.
_DEFAULTS = Settings(node_id=SINGLE_MODE_NODE_ID)


# --- small parsers: each returns a value or raises ConfigError naming the setting ------


def _parse_int(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value} is out of range; use {low}..{high}")
    return value


def _parse_node_id(name: str, raw: str) -> str:
    value = raw.strip()
    if not NODE_ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{name}: {raw!r} is not a node id; use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    return value


def _parse_choice(name: str, raw: str, choices: tuple[str, ...], *, upper: bool) -> str:
    value = raw.strip().upper() if upper else raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}: {raw!r} is not one of {', '.join(choices)}")
    return value


def _parse_host(raw: str) -> str:
    value = raw.strip()
    # Catches the usual slip of writing a URL ("http://0.0.0.0:8000") where an address goes.
    if not _HOST_PATTERN.fullmatch(value):
        raise ConfigError(
            f"HOST: {raw!r} is not an address to bind; use e.g. 127.0.0.1, 0.0.0.0 or ::"
        )
    return value


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _parse_http_url(name: str, raw: str) -> tuple[str, str, int]:
    """Validate a peer base URL; return (normalised url, host, effective port)."""
    bad = ConfigError(f"{name}: {raw!r} is not a URL like http://host:port")
    try:
        parts: SplitResult = urlsplit(raw.strip())
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise bad from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise bad
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{name}: {raw!r} carries credentials; remove them and set CLUSTER_SECRET"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{name}: {raw!r} must be a base URL with no path, like http://host:port")
    if port == 0:
        raise ConfigError(f"{name}: {raw!r} has port 0; use 1..65535")
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    effective_port = port if port is not None else (443 if scheme == "https" else 80)
    netloc = _host_for_url(host) if port is None else f"{_host_for_url(host)}:{port}"
    return f"{scheme}://{netloc}", host, effective_port


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_own_address(peer_host: str, peer_port: int, host: str, port: int) -> bool:
    """Whether a peer URL reaches this very node (judged from HOST and PORT only).

    A wildcard or loopback HOST is reachable as any loopback name, so those count too;
    a DNS name that happens to resolve here cannot be detected without I/O and is left
    to `resolve_peer_ids`, which catches a peer answering with our own id.
    """
    if peer_port != port:
        return False
    own = host.strip().lower().strip("[]")
    if peer_host == own:
        return True
    return _is_loopback(peer_host) and (own in _WILDCARD_HOSTS or _is_loopback(own))


def parse_peers(
    raw: str, *, node_id: str | None = None, host: str = "127.0.0.1", port: int = 8000
) -> tuple[Peer, ...]:
    """Parse PEERS; reject malformed entries, duplicates, and this node itself."""
    peers: list[Peer] = []
    seen_urls: dict[tuple[str, int], str] = {}
    seen_ids: set[str] = set()
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue  # tolerate a trailing comma or doubled separator
        match = _PEER_ID_PREFIX.match(item)
        peer_id: str | None = None
        url_text = item
        if match:
            peer_id = _parse_node_id("PEERS", match.group(1))
            url_text = match.group(2).strip()
        url, peer_host, peer_port = _parse_http_url("PEERS", url_text)
        if peer_id is not None:
            if peer_id == node_id:
                raise ConfigError(
                    f"PEERS: {item!r} has this node's own id {node_id!r}; list only the other nodes"
                )
            if peer_id in seen_ids:
                raise ConfigError(f"PEERS: node id {peer_id!r} appears more than once")
            seen_ids.add(peer_id)
        if _is_own_address(peer_host, peer_port, host, port):
            raise ConfigError(
                f"PEERS: {url!r} is this node's own address (HOST={host}, PORT={port}); "
                "list only the other nodes"
            )
        earlier = seen_urls.get((peer_host, peer_port))
        if earlier is not None:
            raise ConfigError(f"PEERS: {url!r} appears more than once (also as {earlier!r})")
        seen_urls[peer_host, peer_port] = url
        peers.append(Peer(node_id=peer_id, url=url))
    return tuple(peers)


def _parse_redis_url(raw: str) -> str:
    value = raw.strip()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme in ("redis", "rediss") and parts.hostname and port != -1:
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigError(f"REDIS_URL: {raw!r} names database {db!r}; use a number")
        return value
    if parts.scheme == "unix" and parts.path:
        return value
    raise ConfigError(
        f"REDIS_URL: {raw!r} is not a URL like redis://host:6379/0 (or unix:///path.sock)"
    )


def default_redis_port(port: int) -> int:
    """PORT+1000, or PORT-1000 where PORT+1000 would pass 65535: always a valid port."""
    return (
        port + REDIS_PORT_OFFSET if port + REDIS_PORT_OFFSET <= 65535 else port - REDIS_PORT_OFFSET
    )


# --- loading ---------------------------------------------------------------------------


def _merged_sources(
    overrides: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None,
    env_file: str | os.PathLike[str] | None,
) -> dict[str, str]:
    """Raw string values with precedence applied; empty values count as unset."""
    layers: list[Mapping[str, Any]] = []
    if env_file is not None and Path(env_file).is_file():
        layers.append(dotenv_values(env_file))
    layers.append(os.environ if environ is None else environ)
    layers.append(overrides or {})
    merged: dict[str, str] = {}
    for layer in layers:  # lowest precedence first
        for key, value in layer.items():
            # Dropped per layer, so an empty variable lets the layer below show through.
            if value is not None and str(value).strip() != "":
                merged[key] = str(value)
    return merged


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = DEFAULT_ENV_FILE,
) -> Settings:
    """Build and validate Settings.

    `overrides` are CLI values keyed by setting name (e.g. {"PORT": "8001"}); None values
    are ignored so an argparse namespace can be passed as `vars(args)`. `environ`
    defaults to os.environ. `env_file` is read when it exists (a missing `.env` is normal)
    and never modifies os.environ.
    """
    raw = _merged_sources(overrides, environ, env_file)

    def integer(name: str, low: int, high: int, default: int) -> int:
        return _parse_int(name, raw[name], low, high) if name in raw else default

    mode = cast(Mode, _parse_choice("MODE", raw.get("MODE", _DEFAULTS.mode), _MODES, upper=False))
    if "NODE_ID" in raw:
        node_id = _parse_node_id("NODE_ID", raw["NODE_ID"])
    elif mode == "single":
        node_id = SINGLE_MODE_NODE_ID
    else:
        raise ConfigError("NODE_ID: required; set it to this node's unique id, e.g. node1")

    host = _parse_host(raw.get("HOST", _DEFAULTS.host))
    port = integer("PORT", 1, 65535, _DEFAULTS.port)

    # Single mode ignores PEERS entirely (not even parsed), so switching a node to single
    # mode for debugging never requires editing its peer list.
    peers = (
        parse_peers(raw.get("PEERS", ""), node_id=node_id, host=host, port=port)
        if mode == "cluster"
        else ()
    )

    redis_url = _parse_redis_url(raw["REDIS_URL"]) if "REDIS_URL" in raw else None
    redis_port = integer("REDIS_PORT", 1, 65535, default_redis_port(port))
    if redis_url is None and redis_port == port:
        raise ConfigError(f"REDIS_PORT: {redis_port} is also PORT; pick another port")

    election_ticks = integer("ELECTION_TICKS", 2, 10_000, _DEFAULTS.election_ticks)
    heartbeat_ticks = integer("HEARTBEAT_TICKS", 1, 10_000, _DEFAULTS.heartbeat_ticks)
    if heartbeat_ticks >= election_ticks:
        raise ConfigError(
            f"HEARTBEAT_TICKS: {heartbeat_ticks} must be less than ELECTION_TICKS "
            f"({election_ticks}), or followers time out between heartbeats"
        )

    return Settings(
        node_id=node_id,
        host=host,
        port=port,
        peers=peers,
        redis_url=redis_url,
        mode=mode,
        data_dir=Path(raw["DATA_DIR"]) if "DATA_DIR" in raw else Path("data") / node_id,
        cluster_secret=raw.get("CLUSTER_SECRET"),
        log_level=_parse_choice(
            "LOG_LEVEL", raw.get("LOG_LEVEL", _DEFAULTS.log_level), LOG_LEVELS, upper=True
        ),
        log_format=cast(
            LogFormat,
            _parse_choice(
                "LOG_FORMAT", raw.get("LOG_FORMAT", _DEFAULTS.log_format), _LOG_FORMATS, upper=False
            ),
        ),
        tick_ms=integer("TICK_MS", 1, 60_000, _DEFAULTS.tick_ms),
        election_ticks=election_ticks,
        heartbeat_ticks=heartbeat_ticks,
        snapshot_threshold=integer("SNAPSHOT_THRESHOLD", 1, 10**9, _DEFAULTS.snapshot_threshold),
        gc_refreeze_seconds=integer(
            "GC_REFREEZE_SECONDS", 0, 86_400, _DEFAULTS.gc_refreeze_seconds
        ),
        gc_young_threshold=integer(
            "GC_YOUNG_THRESHOLD", 0, 10_000_000, _DEFAULTS.gc_young_threshold
        ),
        max_body_bytes=integer("MAX_BODY_BYTES", 1024, 1 << 30, _DEFAULTS.max_body_bytes),
        redis_port=redis_port,
        cache_max_entries=integer("CACHE_MAX_ENTRIES", 1, 10**8, _DEFAULTS.cache_max_entries),
        cache_max_bytes=integer("CACHE_MAX_BYTES", 1024, 1 << 40, _DEFAULTS.cache_max_bytes),
        cache_policy=_parse_choice(
            "CACHE_POLICY", raw.get("CACHE_POLICY", _DEFAULTS.cache_policy), _CACHE_POLICIES,
            upper=False,
        ),
        cache_lease_ms=integer("CACHE_LEASE_MS", 100, 600_000, _DEFAULTS.cache_lease_ms),
    )


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per setting (e.g. --node-id), for `load_settings(vars(args))`.

    Flags default to None, so an absent flag leaves the environment's value in force.
    """
    for f in fields(Settings):
        env = f.metadata["env"]
        parser.add_argument(
            "--" + env.lower().replace("_", "-"),
            dest=env,
            default=None,
            metavar=env,
            # argparse expands %-formats in help text, so a literal % must be doubled.
            help=f"{f.metadata['doc']} Default: {f.metadata['default']}.".replace("%", "%%"),
        )


# --- peer id resolution ----------------------------------------------------------------

FetchNodeId = Callable[[str], Awaitable[str]]


async def resolve_peer_ids(
    settings: Settings,
    *,
    fetch: FetchNodeId | None = None,
    attempts: int = 30,
    first_delay_s: float = 0.1,
    max_delay_s: float = 2.0,
) -> Settings:
    """Return settings whose every peer has an id, asking bare-URL peers' GET /health.

    Peers are asked concurrently, each up to `attempts` times with doubling delays
    (about a minute in total by default), because the nodes of a cluster start together
    and a peer may not be listening yet. Call this only once this node's own HTTP server
    answers /health, or two nodes that list each other by URL would wait on each other.
    `fetch(url)` returns the id a peer reports; it defaults to an aiohttp GET.
    Raises ConfigError naming the URL when a peer cannot be reached, or answers with an
    id that is ours or another peer's.
    """
    pending = [peer.url for peer in settings.peers if peer.node_id is None]
    if not pending:
        return settings
    if attempts < 1:
        raise ValueError("attempts must be at least 1")

    async def ask(fetch_id: FetchNodeId, url: str) -> str:
        delay = first_delay_s
        last_error = ""
        for attempt in range(attempts):
            try:
                answer = await fetch_id(url)
                if NODE_ID_PATTERN.fullmatch(answer):
                    return answer
                last_error = f"it answered with {answer!r}, which is not a node id"
            except (OSError, ValueError) as exc:
                # Refused connections, timeouts, non-200 answers and half-started peers
                # all clear up once the peer is serving, so every failure is retried.
                last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if attempt + 1 < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay_s)
        raise ConfigError(
            f"PEERS: could not learn the node id of {url} after {attempts} attempts "
            f"({last_error}); start that node or write the entry as id={url}"
        )

    async def ask_all(fetch_id: FetchNodeId) -> list[str]:
        # return_exceptions: a failing peer must not leave the others' requests running
        # after the HTTP session below is closed.
        results = await asyncio.gather(
            *(ask(fetch_id, url) for url in pending), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [result for result in results if isinstance(result, str)]

    learned = await (ask_all(fetch) if fetch is not None else _over_http(ask_all))

    by_url = dict(zip(pending, learned, strict=True))
    resolved = tuple(Peer(peer.node_id or by_url[peer.url], peer.url) for peer in settings.peers)
    owners: dict[str, str] = {}
    for peer in resolved:
        assert peer.node_id is not None
        if peer.node_id == settings.node_id:
            raise ConfigError(
                f"PEERS: {peer.url} answers as {peer.node_id!r}, this node's own id; "
                "remove it from PEERS (or give that node its own NODE_ID)"
            )
        if peer.node_id in owners:
            raise ConfigError(
                f"PEERS: {owners[peer.node_id]} and {peer.url} are both node "
                f"{peer.node_id!r}; each node needs its own NODE_ID"
            )
        owners[peer.node_id] = peer.url
    return dataclasses.replace(settings, peers=resolved)


async def _over_http(ask_all: Callable[[FetchNodeId], Awaitable[list[str]]]) -> list[str]:
    # Imported here so that loading settings (and `python -m service.config`) does not
    # pay for importing aiohttp.
    import aiohttp

    from service.transport.sessions import client_session

    async with client_session(timeout=aiohttp.ClientTimeout(total=2.0)) as session:

        async def fetch(url: str) -> str:
            try:
                async with session.get(url + "/health") as response:
                    status = response.status
                    try:
                        body = await response.json(content_type=None)
                    except ValueError:
                        body = None
            except aiohttp.ClientError as exc:
                # Not all aiohttp errors are OSErrors; the retry loop expects one.
                raise OSError(str(exc) or type(exc).__name__) from exc
            # The id is taken even from a non-200 answer: a peer that is up but not yet
            # ready (no leader, say) already knows who it is, and waiting for readiness
            # could deadlock nodes that are each waiting to learn the other's id.
            node = body.get("node") if isinstance(body, dict) else None
            if isinstance(node, str):
                return node
            if status != 200:
                raise ValueError(f"GET /health answered HTTP {status}")
            raise ValueError("GET /health has no string field 'node'")

        return await ask_all(fetch)


# --- documentation ---------------------------------------------------------------------


def render_markdown_table() -> str:
    lines = [
        "<!-- Generated by `python -m service.config`; tests/test_config.py checks it. -->",
        "",
        "| Variable | Default | Meaning |",
        "| --- | --- | --- |",
    ]
    for name, default, doc in Settings.describe():
        # Literal values read best as code; "(unset)"-style notes stay prose.
        default = default if default.startswith("(") else f"`{default}`"
        escaped = doc.replace("|", "\\|")  # a bare | would end the table cell
        lines.append(f"| `{name}` | {default} | {escaped} |")
    lines.append("")
    lines.append(
        "Precedence: command-line flag (`--node-id`, `--port`, ...) > environment > `.env` "
        "> default. An empty value counts as unset."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown_table())
