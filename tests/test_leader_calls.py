"""run_on_leader (service/api/calls.py) when the leader fails with a call: which calls are
sent again to the next leader, how often, and with how much of their wait left."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import service.api.locks  # noqa: F401  (registers the lock calls)
from service.api.calls import MAX_RESENDS, run_on_leader
from service.api.forwarding import NODE_KEY
from service.transport.forward import ForwardError

ACQUIRE = "lock.acquire"  # registered resend-safe by service/api/locks.py
RELEASE = "lock.release"  # not resend-safe: applied twice it answers not_held


@dataclass
class FailingCalls:
    """Every leader takes `delay` seconds and then fails with the call in hand, until
    `failures` have; the next answers 200."""

    failures: int
    delay: float = 0.0
    sent: list[dict[str, Any]] = field(default_factory=list)

    async def call(self, url: str, name: str, args: dict[str, Any], **_: Any) -> Any:
        self.sent.append(args)
        await asyncio.sleep(self.delay)
        if len(self.sent) <= self.failures:
            raise ForwardError(f"{url} died", maybe_applied=True)
        return 200, {"answered_by": url}


@dataclass
class FollowerNode:
    calls: FailingCalls
    node_id: str = "n1"
    runner: object = object()
    peer_urls: dict[str, str] = field(
        default_factory=lambda: {"n2": "http://n2", "n3": "http://n3"}
    )

    def is_leader(self) -> bool:
        return False

    async def wait_for_leader(self, timeout: float, other_than: str | None = None) -> str:
        return "n3" if other_than == "n2" else "n2"  # each failed leader is replaced


async def run(name: str, body: dict[str, Any], calls: FailingCalls) -> web.StreamResponse:
    app = web.Application()
    app[NODE_KEY] = FollowerNode(calls)  # type: ignore[assignment]
    request = make_mocked_request("POST", "/v1/locks/x", app=app)
    return await run_on_leader(request, name, {"name": "x", "body": body, "rid": None})


def status_and_body(response: web.StreamResponse) -> tuple[int, Any]:
    assert isinstance(response, web.Response) and response.body is not None
    assert isinstance(response.body, bytes)
    return response.status, json.loads(response.body)


async def test_an_acquire_whose_leader_died_goes_to_the_next_with_the_wait_left() -> None:
    calls = FailingCalls(failures=2, delay=0.2)
    status, body = status_and_body(await run(ACQUIRE, {"owner": "a", "wait_ms": 5_000}, calls))
    assert status == 200 and body == {"answered_by": "http://n2"}
    waits = [args["body"]["wait_ms"] for args in calls.sent]
    assert waits[0] == 5_000
    # What is left of the client's 5 s, counted from when it asked: 0.2 s and 0.4 s gone.
    assert 4_700 <= waits[1] <= 4_800 and 4_500 <= waits[2] <= 4_600, waits


async def test_a_wait_spent_while_leaders_failed_is_sent_with_none_left() -> None:
    calls = FailingCalls(failures=1, delay=0.15)
    status, _ = status_and_body(await run(ACQUIRE, {"owner": "a", "wait_ms": 100}, calls))
    assert status == 200 and [a["body"]["wait_ms"] for a in calls.sent] == [100, 0]


async def test_an_acquire_with_a_request_id_is_sent_again_unchanged() -> None:
    calls = FailingCalls(failures=1, delay=0.1)
    body = {"owner": "a", "wait_ms": 5_000, "request_id": "r-1"}
    status, _ = status_and_body(await run(ACQUIRE, body, calls))
    assert status == 200 and [a["body"] for a in calls.sent] == [body, body]


async def test_resends_are_bounded() -> None:
    calls = FailingCalls(failures=100)
    status, body = status_and_body(await run(ACQUIRE, {"owner": "a"}, calls))
    assert status == 503 and "outcome is unknown" in body["error"]["message"]
    assert len(calls.sent) == 1 + MAX_RESENDS


async def test_a_call_that_is_not_resend_safe_is_not_sent_again_without_a_request_id() -> None:
    calls = FailingCalls(failures=1)
    status, body = status_and_body(await run(RELEASE, {"owner": "a", "token": 7}, calls))
    assert status == 503 and "outcome is unknown" in body["error"]["message"]
    assert len(calls.sent) == 1
