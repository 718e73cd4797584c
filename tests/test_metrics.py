"""NodeMetrics: what /metrics exports for HTTP requests."""

from __future__ import annotations

from prometheus_client import generate_latest

from service.metrics import NodeMetrics


def _count(metrics: NodeMetrics, route: str, method: str, status: str) -> float | None:
    return metrics.registry.get_sample_value(
        "dsync_http_request_seconds_count",
        {"node": "n1", "route": route, "method": method, "status": status},
    )


def test_each_request_is_counted_under_its_route_method_and_status() -> None:
    metrics = NodeMetrics("n1")
    metrics.observe_http("/v1/cache/{key}", "GET", 200, 0.001)
    metrics.observe_http("/v1/cache/{key}", "GET", 200, 0.002)
    metrics.observe_http("/v1/cache/{key}", "GET", 404, 0.001)
    metrics.observe_http("/v1/cache/{key}", "PUT", 200, 0.003)
    assert _count(metrics, "/v1/cache/{key}", "GET", "200") == 2
    assert _count(metrics, "/v1/cache/{key}", "GET", "404") == 1
    assert _count(metrics, "/v1/cache/{key}", "PUT", "200") == 1
    assert metrics.registry.get_sample_value(
        "dsync_http_request_seconds_sum",
        {"node": "n1", "route": "/v1/cache/{key}", "method": "GET", "status": "200"},
    ) == 0.003


def test_methods_outside_http_do_not_add_series() -> None:
    metrics = NodeMetrics("n1")
    for n in range(50):
        metrics.observe_http("unmatched", f"X{n}", 405, 0.001)
    assert _count(metrics, "unmatched", "OTHER", "405") == 50
    assert b'method="X1"' not in generate_latest(metrics.registry)
