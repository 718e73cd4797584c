"""Locust scenarios for the lock, queue and cache APIs.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8001
    locust -f benchmarks/locustfile.py --headless -u 64 -r 16 -t 30s \\
        --host http://127.0.0.1:8001,http://127.0.0.1:8002,http://127.0.0.1:8003

--host may list several node URLs, comma-separated (or set DSYNC_HOSTS the same way):
each simulated user sticks to one of them, round-robin, so the load is spread over all
nodes (every node serves every endpoint; followers forward to the leader).

- LockUser (weight 4): acquire/release cycles on /v1/locks with request ids and fencing
  tokens: mostly on a lock of its own, sometimes on a few shared names with wait_ms, and
  an occasional linearizable read of a lock.
- QueueUser (weight 2): publish with ids (half keyed), consume with long poll and ack,
  and the prototype's /enqueue + /dequeue.
- CacheUser (weight 2): reads (90%) and writes of 1,000 shared keys through its node's
  cache; a 404 (a key not written yet) is an expected answer. Reads are named by the
  `hit` flag the API returns, so Locust shows hit and miss latency apart.
- SeedScenarioUser (weight 1): the course prototype's endpoints, POST /lock {"resource",
  "owner"}, POST /unlock, GET /locks and GET /health.

Under contention a 409 (lock_held, wait_timeout) is an expected answer, not a failure;
anything else that is not 2xx (503 no_leader, 429 too_busy, timeouts) is a failure.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import uuid
from typing import Any

from locust import HttpUser, constant, task
from locust.clients import ResponseContextManager

SHARED_LOCKS = 4
SHARED_WAIT_MS = 2_000
TTL_MS = 30_000
EXPECTED_CONFLICTS = frozenset({"lock_held", "wait_timeout"})

_assign_lock = threading.Lock()
_next_host = itertools.count()


def _hosts(default: str | None) -> list[str]:
    raw = os.environ.get("DSYNC_HOSTS") or default or ""
    return [h.strip().rstrip("/") for h in raw.split(",") if h.strip()]


def _error_code(response: ResponseContextManager) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"http_{response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code"))
    return f"http_{response.status_code}"


class _SpreadUser(HttpUser):
    """Pins each user to one node of --host (or DSYNC_HOSTS), round-robin."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        hosts = _hosts(self.host)
        if hosts:
            with _assign_lock:
                index = next(_next_host)
            self.client.base_url = hosts[index % len(hosts)]
        self.owner = f"{type(self).__name__}-{uuid.uuid4().hex[:12]}"


class LockUser(_SpreadUser):
    weight = 4

    def on_start(self) -> None:
        super().on_start()
        self.own_lock = f"locust-{self.owner}"

    def _acquire(self, name: str, wait_ms: int, label: str) -> int | None:
        body: dict[str, Any] = {
            "owner": self.owner,
            "mode": "exclusive",
            "ttl_ms": TTL_MS,
            "wait_ms": wait_ms,
            "request_id": uuid.uuid4().hex,
        }
        with self.client.post(
            f"/v1/locks/{name}", json=body, name=label, catch_response=True
        ) as response:
            if response.status_code == 200:
                token = response.json().get("token")
                if isinstance(token, int):
                    response.success()
                    return token
                response.failure(f"200 without a token: {response.text[:200]}")
                return None
            code = _error_code(response)
            if response.status_code == 409 and code in EXPECTED_CONFLICTS:
                response.success()
            else:
                response.failure(f"{response.status_code} {code}")
            return None

    def _release(self, name: str, token: int, label: str) -> None:
        body = {"owner": self.owner, "token": token, "request_id": uuid.uuid4().hex}
        with self.client.delete(
            f"/v1/locks/{name}", json=body, name=label, catch_response=True
        ) as response:
            if response.status_code == 200:
                response.success()
            else:
                response.failure(f"{response.status_code} {_error_code(response)}")

    @task(8)
    def own_lock_cycle(self) -> None:
        token = self._acquire(self.own_lock, 0, "POST /v1/locks/[own] acquire")
        if token is not None:
            self._release(self.own_lock, token, "DELETE /v1/locks/[own] release")

    @task(2)
    def shared_lock_cycle(self) -> None:
        name = f"locust-shared-{random.randrange(SHARED_LOCKS)}"
        token = self._acquire(name, SHARED_WAIT_MS, "POST /v1/locks/[shared] acquire+wait")
        if token is not None:
            self._release(name, token, "DELETE /v1/locks/[shared] release")

    @task(1)
    def read_lock(self) -> None:
        name = f"locust-shared-{random.randrange(SHARED_LOCKS)}"
        with self.client.get(
            f"/v1/locks/{name}", name="GET /v1/locks/[shared]", catch_response=True
        ) as response:
            if response.status_code in (200, 404):
                response.success()
            else:
                response.failure(f"{response.status_code} {_error_code(response)}")


class SeedScenarioUser(_SpreadUser):
    weight = 1

    @task(4)
    def lock_unlock(self) -> None:
        resource = f"seed-{random.randrange(16)}"
        body = {"resource": resource, "owner": self.owner}
        with self.client.post("/lock", json=body, catch_response=True) as response:
            if response.status_code == 200:
                response.success()
            else:
                code = _error_code(response)
                if response.status_code == 409 and code in EXPECTED_CONFLICTS:
                    response.success()
                else:
                    response.failure(f"{response.status_code} {code}")
                return
        with self.client.post("/unlock", json=body, catch_response=True) as response:
            if response.status_code == 200:
                response.success()
            else:
                response.failure(f"{response.status_code} {_error_code(response)}")

    @task(1)
    def list_locks(self) -> None:
        self.client.get("/locks")

    @task(1)
    def health(self) -> None:
        self.client.get("/health")


class QueueUser(_SpreadUser):
    """Publishes uniquely-id'd messages and consumes+acks them on one shared queue, plus
    the prototype's /enqueue and /dequeue now and then."""

    weight = 2
    queue = "locust"

    @task(4)
    def publish(self) -> None:
        body = {"body": {"from": self.owner}, "id": uuid.uuid4().hex}
        if random.random() < 0.5:
            body["key"] = f"k{random.randrange(64)}"
        with self.client.post(f"/v1/queues/{self.queue}/messages", json=body,
                              name="/v1/queues/[q]/messages", catch_response=True) as response:
            if response.status_code == 201:
                response.success()
            else:
                response.failure(f"{response.status_code} {_error_code(response)}")

    @task(4)
    def consume_and_ack(self) -> None:
        body = {"consumer": self.owner, "max": 10, "wait_ms": 100}
        with self.client.post(f"/v1/queues/{self.queue}/consume", json=body,
                              name="/v1/queues/[q]/consume", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code} {_error_code(response)}")
                return
            messages = response.json().get("messages", [])
            response.success()
        if messages:
            receipts = [m["receipt"] for m in messages]
            self.client.post(f"/v1/queues/{self.queue}/ack", json={"receipts": receipts},
                             name="/v1/queues/[q]/ack")

    @task(1)
    def seed_enqueue_dequeue(self) -> None:
        self.client.post("/enqueue", json={"message": {"from": self.owner}})
        self.client.post("/dequeue")


class CacheUser(_SpreadUser):
    """Reads and writes a shared key space through the node it is pinned to, as clients of
    a MESI cache do; every node caches, so the same keys are shared and invalidated."""

    weight = 2
    keys = 1_000
    read_ratio = 0.9

    @task
    def read_or_write(self) -> None:
        key = f"locust-{random.randrange(self.keys)}"
        if random.random() >= self.read_ratio:
            with self.client.put(f"/v1/cache/{key}", json={"value": {"by": self.owner}},
                                 name="PUT /v1/cache/[key]", catch_response=True) as response:
                if response.status_code == 200:
                    response.success()
                else:
                    response.failure(f"{response.status_code} {_error_code(response)}")
            return
        with self.client.get(f"/v1/cache/{key}", name="GET /v1/cache/[key]",
                             catch_response=True) as response:
            if response.status_code not in (200, 404):
                response.failure(f"{response.status_code} {_error_code(response)}")
                return
            body = response.json()
            found = body if response.status_code == 200 else body.get("error", {})
            # Renaming after the fact: Locust reports the request under the final name.
            response.request_meta["name"] = (
                "GET /v1/cache/[key] hit" if found.get("hit") else "GET /v1/cache/[key] miss"
            )
            response.success()
