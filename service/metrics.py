"""Prometheus metrics of one node.

Each node gets its own CollectorRegistry so several nodes can live in one process (tests,
the simulator) without their series colliding; every series carries the node label so a
Prometheus scraping all nodes can tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROLES = ("leader", "follower", "candidate", "pre_candidate")


@dataclass(frozen=True, slots=True)
class PeerTraffic:
    """What the node's peer transport has done since start (read at each scrape)."""

    raft_sent: int  # Raft messages written to a peer's socket
    raft_dropped: int  # dropped on this side (peer down, queue full, oversized)
    raft_received: int
    raft_rejected: int  # refused from a peer (bad secret, malformed, wrong node)
    raft_send_failures: int  # attempts to reach a peer that failed
    sockets: dict[str, int]  # open sockets by kind: raft_out, raft_in, calls_out, calls_in


def _no_traffic() -> PeerTraffic | None:
    return None


class _PeerTrafficCollector(Collector):
    """Reads the transport's counters at each scrape; before the transport is up (or
    in a registry with no transport) the families are there with no samples."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id
        self.read: Callable[[], PeerTraffic | None] = _no_traffic

    def collect(self) -> Iterator[Metric]:
        traffic = self.read()
        node = self._node_id
        messages = CounterMetricFamily(
            "dsync_raft_messages",
            "Raft messages by outcome: sent (written to a peer's socket), dropped (on this "
            "side: peer down, queue full, too large), received, rejected (from a peer)",
            labels=["node", "outcome"],
        )
        failures = CounterMetricFamily(
            "dsync_raft_send_failures",
            "Failed attempts to deliver Raft messages to a peer (each backs off)",
            labels=["node"],
        )
        sockets = GaugeMetricFamily(
            "dsync_peer_sockets",
            "Open node-to-node WebSockets by kind (raft_out, raft_in, calls_out, calls_in)",
            labels=["node", "kind"],
        )
        if traffic is not None:
            for outcome, value in (
                ("sent", traffic.raft_sent),
                ("dropped", traffic.raft_dropped),
                ("received", traffic.raft_received),
                ("rejected", traffic.raft_rejected),
            ):
                messages.add_metric([node, outcome], value)
            failures.add_metric([node], traffic.raft_send_failures)
            for kind, value in sorted(traffic.sockets.items()):
                sockets.add_metric([node, kind], value)
        yield from (messages, failures, sockets)


_HTTP_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


class NodeMetrics:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._peer_traffic = _PeerTrafficCollector(node_id)
        r.register(self._peer_traffic)
        n = ["node"]
        self.raft_role = Gauge(
            "dsync_raft_role", "1 for the node's current role", [*n, "role"], registry=r
        )
        self.raft_term = Gauge("dsync_raft_term", "Current Raft term", n, registry=r)
        self.raft_commit_index = Gauge(
            "dsync_raft_commit_index", "Raft commit index", n, registry=r
        )
        self.raft_applied_index = Gauge("dsync_raft_applied_index", "Applied index", n, registry=r)
        self.raft_last_index = Gauge("dsync_raft_last_index", "Last log index", n, registry=r)
        self.raft_rejoining = Gauge(
            "dsync_raft_rejoining",
            "1 while this node, back from lost storage, has not caught up (no vote)",
            n,
            registry=r,
        )
        self.raft_elections = Counter(
            "dsync_raft_elections_total", "Times this node became leader", n, registry=r
        )
        self.raft_proposals = Counter(
            "dsync_raft_proposals_total", "Commands proposed on this node", n, registry=r
        )
        self.raft_proposals_failed = Counter(
            "dsync_raft_proposals_failed_total",
            "Proposals refused or dropped",
            [*n, "reason"],
            registry=r,
        )
        self.raft_persist_seconds = Histogram(
            "dsync_raft_persist_seconds",
            "Time to persist one Ready (group commit) to Redis",
            n,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.raft_replication_seconds = Histogram(
            "dsync_raft_replication_seconds",
            "Time from proposing a command to applying it",
            n,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.raft_batch_entries = Histogram(
            "dsync_raft_batch_entries",
            "Entries persisted per loop turn",
            n,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.raft_state_write_entries = Histogram(
            "dsync_raft_state_write_hashes",
            "Hash writes per background applied-state transaction",
            n,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.peer_call_batch_calls = Histogram(
            "dsync_peer_call_batch_calls",
            "Calls per batched node-to-node request (forwarded writes, queue RPCs), by lane",
            [*n, "lane"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.raft_snapshots = Counter(
            "dsync_raft_snapshots_total", "Snapshots taken or installed", [*n, "kind"], registry=r
        )
        self.raft_snapshot_seconds = Histogram(
            "dsync_raft_snapshot_seconds",
            "Time to take one snapshot (dump the state, encode, save, compact the log)",
            n,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.gc_young_threshold = Gauge(
            "dsync_gc_young_threshold",
            "Net new objects between collections of Python's youngest generation "
            "(GC_YOUNG_THRESHOLD, or Python's own when that is 0)",
            n,
            registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "dsync_gc_pause_seconds",
            "Garbage-collector pauses, by generation (2 = a full collection)",
            [*n, "generation"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.event_loop_lag_seconds = Histogram(
            "dsync_event_loop_lag_seconds",
            "How late a 100 ms timer fires on the node's event loop (long synchronous steps)",
            n,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.http_request_seconds = Histogram(
            "dsync_http_request_seconds",
            "HTTP request latency",
            [*n, "route", "method", "status"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self._http_children: dict[tuple[str, str, int], Histogram] = {}
        # Service metrics; the services update them.
        self.lock_acquisitions = Counter(
            "dsync_lock_acquisitions_total", "Lock grants", [*n, "mode"], registry=r
        )
        self.lock_releases = Counter("dsync_lock_releases_total", "Lock releases", n, registry=r)
        self.lock_expiries = Counter("dsync_lock_expiries_total", "Leases expired", n, registry=r)
        self.lock_waits = Counter(
            "dsync_lock_waits_total", "Acquires that had to wait", [*n, "outcome"], registry=r
        )
        self.lock_deadlocks = Counter(
            "dsync_lock_deadlocks_total", "Acquires refused as deadlock", n, registry=r
        )
        self.lock_held = Gauge("dsync_lock_held", "Locks currently held", n, registry=r)
        self.lock_acquire_seconds = Histogram(
            "dsync_lock_acquire_seconds",
            "Acquire latency as seen by the API",
            n,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.queue_published = Counter(
            "dsync_queue_published_total", "Messages published", [*n, "queue"], registry=r
        )
        self.queue_delivered = Counter(
            "dsync_queue_delivered_total", "Messages delivered", [*n, "queue"], registry=r
        )
        self.queue_acked = Counter(
            "dsync_queue_acked_total", "Messages acknowledged", [*n, "queue"], registry=r
        )
        self.queue_redelivered = Counter(
            "dsync_queue_redelivered_total", "Messages delivered again", [*n, "queue"], registry=r
        )
        self.queue_dead_lettered = Counter(
            "dsync_queue_dead_lettered_total",
            "Messages moved to the dead letters",
            [*n, "queue"],
            registry=r,
        )
        self.queue_lag = Gauge(
            "dsync_queue_lag",
            "Messages not yet finished by the slowest group, per partition led here",
            [*n, "queue", "partition"],
            registry=r,
        )
        self.queue_publish_seconds = Histogram(
            "dsync_queue_publish_seconds",
            "Publish latency on the partition leader (until durable on the ISR)",
            n,
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter("dsync_cache_hits_total", "Cache hits", n, registry=r)
        self.cache_misses = Counter("dsync_cache_misses_total", "Cache misses", n, registry=r)
        # Hit ratio is derived: hits / (hits + misses).
        self.cache_invalidations = Counter(
            "dsync_cache_invalidations_total", "Invalidations sent by homes", n, registry=r
        )
        self.cache_invalidation_seconds = Histogram(
            "dsync_cache_invalidation_seconds", "Inv sent to InvAck received", n,
            buckets=_FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_write_backs = Counter(
            "dsync_cache_write_backs_total", "Dirty values sent home", n, registry=r
        )
        self.cache_evictions = Counter(
            "dsync_cache_evictions_total", "Lines evicted for capacity", n, registry=r
        )
        self.cache_lines = Gauge(
            "dsync_cache_lines", "Cache lines per MESI state", [*n, "state"], registry=r
        )
        self.cache_mirror_in_step = Gauge(
            "dsync_cache_mirror_in_step",
            "1 when the peer's mirror of this node's cache store is active and in step",
            [*n, "peer"],
            registry=r,
        )
        self.cache_mirror_images = Gauge(
            "dsync_cache_mirror_full_images",
            "Full images of this node's cache store sent to the peer since start",
            [*n, "peer"],
            registry=r,
        )

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """`http_request_seconds` for one request. The labelled child is looked up in a
        dict of this node's own: prometheus_client's labels() checks and converts every
        label and takes a lock, a visible share of a cache hit's CPU. A method outside
        HTTP's own is counted as OTHER, so clients cannot grow either without bound."""
        if method not in _HTTP_METHODS:
            method = "OTHER"
        key = (route, method, status)
        child = self._http_children.get(key)
        if child is None:
            child = self.http_request_seconds.labels(self.node_id, route, method, str(status))
            self._http_children[key] = child
        child.observe(seconds)

    def set_role(self, role: str) -> None:
        for candidate in ROLES:
            self.raft_role.labels(self.node_id, candidate).set(1 if candidate == role else 0)

    def track_peer_traffic(self, read: Callable[[], PeerTraffic | None]) -> None:
        """Report what `read()` returns at every scrape."""
        self._peer_traffic.read = read

    def render(self) -> bytes:
        return generate_latest(self.registry)
