"""What the cache service shows about itself: one key's line (and directory entry), the
`GET /v1/cache` summary, and the Prometheus series. Kept apart from the runtime so that
service.py is only the I/O loop; every figure here is read from the cores' counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.cache.errors import unavailable
from service.cache.messages import State
from service.cache.mirrored import MirroredCacheStore
from service.clock import now_ms

if TYPE_CHECKING:
    from service.cache.service import CacheService


def line_view(service: CacheService, key: str) -> dict[str, Any]:
    """This node's line for `key` (state as it counts for coherence: an S line past its
    lease is I) and, when this node is the key's home, its directory entry."""
    lines, directory = service.lines, service.directory
    if lines is None or directory is None:
        raise unavailable("the cache is starting on this node")
    now = now_ms()
    line = lines.line(key)
    out: dict[str, Any] = {"node": service.node_id, "state": lines.state(key, now).value}
    if line is not None:
        out.update(stored_state=line.state.value, version=line.version, txn=line.txn)
        if line.evicting:
            out["evicting"] = True
        if line.state is State.S and line.lease_until > now:
            out["lease_left_ms"] = line.lease_until - now
    if service.home_of(key) == service.node_id:
        entry = directory.entry(key)
        out["directory"] = {
            "state": entry.state.name,
            "owner": entry.owner,
            "sharers": sorted(entry.sharers),
            "version": entry.version,
            "txn": entry.txn,
            "busy": directory.is_busy(key),
        }
    return out


def update_metrics(service: CacheService) -> None:
    """Bring the Prometheus series up to the cores' counters (called about once a second
    and on every `GET /v1/cache`, so a hit costs no metrics call)."""
    lines = service.lines
    if lines is None:
        return
    m, node = service.metrics, service.node_id
    for name, counter, value in (
        ("hits", m.cache_hits, lines.hits),
        ("misses", m.cache_misses, lines.misses),
        ("evictions", m.cache_evictions, lines.evictions),
        ("write_backs", m.cache_write_backs, lines.write_backs),
    ):
        delta = value - service.reported.get(name, 0)
        if delta > 0:
            counter.labels(node).inc(delta)
            service.reported[name] = value
    for state, count in lines.stats(now_ms()).by_state.items():
        m.cache_lines.labels(node, state).set(count)
    if isinstance(service.store, MirroredCacheStore):
        for channel in service.store.channels:
            in_step = channel.active and channel.synced is not None
            m.cache_mirror_in_step.labels(node, channel.peer).set(1 if in_step else 0)
            m.cache_mirror_images.labels(node, channel.peer).set(channel.full_images)


def totals(views: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts of several nodes' describe() that add up, and the overall hit ratio."""
    hits = sum(int(v.get("hits", 0)) for v in views)
    misses = sum(int(v.get("misses", 0)) for v in views)
    states: dict[str, int] = {}
    for view in views:
        for state, count in view.get("states", {}).items():
            states[state] = states.get(state, 0) + int(count)
    return {
        "nodes_answering": len(views),
        "entries": sum(int(v.get("size", {}).get("entries", 0)) for v in views),
        "bytes": sum(int(v.get("size", {}).get("bytes", 0)) for v in views),
        "hits": hits,
        "misses": misses,
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else 0.0,
        "states": states,
        "invalidations_sent": sum(int(v.get("invalidations_sent", 0)) for v in views),
        "write_backs": sum(int(v.get("write_backs", 0)) for v in views),
        "evictions": sum(int(v.get("evictions", 0)) for v in views),
        "directory_entries": sum(int(v.get("directory", {}).get("entries", 0)) for v in views),
    }


def describe(service: CacheService) -> dict[str, Any]:
    lines, directory = service.lines, service.directory
    if lines is None or directory is None:
        raise unavailable("the cache is starting on this node; retry shortly")
    update_metrics(service)
    stats = lines.stats(now_ms())
    s = service.settings
    latencies = sorted(service.inv_latencies)
    return {
        "node": service.node_id,
        "capacity": {
            "max_entries": s.max_entries,
            "max_bytes": s.max_bytes,
            "max_value_bytes": s.max_value_bytes,
            "policy": s.policy,
        },
        "size": {"entries": stats.entries, "bytes": stats.bytes},
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_ratio": round(stats.hit_ratio, 4),
        "states": stats.by_state,
        "lease_ms": s.lease_ms,
        "invalidations_sent": service.invalidations,
        "invalidation_latency_ms": {
            "count": len(latencies),
            "p50": _ms(_percentile(latencies, 0.5)),
            "p99": _ms(_percentile(latencies, 0.99)),
        },
        "write_backs": lines.write_backs,
        "evictions": lines.evictions,
        "directory": {
            "entries": directory.entry_count(),
            "retired": directory.retired,
            "busy": directory.busy_keys(),
            "lease_drops": directory.lease_drops,
            "duplicates_ignored": directory.duplicates,
        },
        "resends": {"lines": lines.resent, "directory": directory.resent},
        "stale_dropped": {"lines": lines.stale_dropped, "directory": directory.stale_dropped},
        "txn_floors": lines.floors_kept(),
        "persists_skipped": lines.persists_skipped,
        "persist_batches": service.persist_batches,
        "outbox": service.outbox(),
        "mirrors": (
            service.store.describe() if isinstance(service.store, MirroredCacheStore) else None
        ),
    }


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


__all__ = ["describe", "line_view", "update_metrics"]
