"""Locks part of the REST contract (/v1/locks...) and the course prototype's aliases.

Everything runs on the leader: each route only reads the body, and `run_on_leader` runs
its leader-side half (validation included) there, batched with other clients' requests
when this node is a follower (service/api/calls.py). Writes are Raft commands; reads
pass a ReadIndex barrier first, so they are linearizable.
Additions to the contract: `POST /v1/locks/{name}/cancel` (give up a wait) and the
`queued`/`position` fields a 409 `wait_timeout` never needs but GET shows for waiters.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from service.api.calls import LeaderCall, leader_call, run_on_leader
from service.api.errors import ApiError, bad_request
from service.api.http import (
    field_int,
    field_str,
    read_json,
    request_id_from,
    request_id_header,
)
from service.locks.commands import MAX_NAME_BYTES, MAX_OWNER_BYTES, MAX_TTL_MS
from service.locks.service import LockService
from service.locks.table import LockView

if TYPE_CHECKING:
    from service.node import Node

routes = web.RouteTableDef()
log = logging.getLogger("dsync.api")

DEFAULT_TTL_MS = 30_000
MIN_TTL_MS = 100  # shorter than a few heartbeats cannot be kept alive reliably
MAX_WAIT_MS = 600_000
READ_TIMEOUT_SECONDS = 5.0
MAX_TOKEN = 2**63 - 1


def _locks_of(node: Node) -> LockService:
    if node.locks is None:
        raise ApiError(503, "unavailable", "the lock service is not running on this node")
    return node.locks


def _name(name: str | None) -> str:
    if not name:
        raise bad_request("lock name must not be empty")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise bad_request(f"lock name is {size} bytes; the limit is {MAX_NAME_BYTES}")
    return name


def _owner(body: dict[str, Any], field: str = "owner") -> str:
    owner = field_str(body, field, max_bytes=MAX_OWNER_BYTES)
    assert owner is not None
    return owner


def _token(body: dict[str, Any]) -> int:
    if "token" not in body:
        raise bad_request("'token' is required (the fencing token of your grant)")
    return field_int(body, "token", 0, 0, MAX_TOKEN)


def _mode(body: dict[str, Any]) -> str:
    mode = body.get("mode", "exclusive")
    if mode not in ("exclusive", "shared"):
        raise bad_request("'mode' must be \"exclusive\" or \"shared\"")
    return str(mode)


def _grant_json(locks: LockService, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": result["name"],
        "owner": result["owner"],
        "mode": result["mode"],
        "token": result["token"],
        "ttl_ms": result["ttl_ms"],
        "expires_in_ms": locks.expires_in_ms(result["expires_at_ms"], result["ttl_ms"]),
    }


def _raise_for(result: dict[str, Any]) -> None:
    """Turn a non-success lock result into the contract's error."""
    status = result.get("status")
    name = result.get("name")
    if status == "held":
        raise ApiError(
            409, "lock_held", f"lock {name!r} is held; retry later or pass wait_ms to wait"
        )
    if status == "wait_timeout":
        raise ApiError(409, "wait_timeout", f"lock {name!r} was not granted within wait_ms")
    if status == "deadlock":
        cycle = result.get("cycle", [])
        raise ApiError(
            409,
            "deadlock",
            "waiting would close a cycle among owners: " + " -> ".join([*cycle, cycle[0]])
            if cycle
            else "waiting would close a cycle among owners",
            cycle=cycle,
        )
    if status == "not_held":
        raise ApiError(404, "not_held", "this owner does not hold the lock (released or expired)")
    if status == "stale_token":
        raise ApiError(
            409, "stale_token", "the token is not the owner's current grant for this lock"
        )
    if status == "error":
        code = str(result.get("code", "error"))
        message = str(result.get("message", code))
        extra = {k: v for k, v in result.items() if k not in ("status", "code", "message")}
        if code in ("bad_command", "bad_request_id"):
            raise ApiError(400, "bad_request", message)
        if code in ("mode_conflict", "request_id_reused"):
            raise ApiError(409, code, message, **extra)
        raise ApiError(503, "unavailable", message)
    raise ApiError(503, "unavailable", f"unexpected lock result {status!r}")


def _view_json(locks: LockService, view: LockView) -> dict[str, Any]:
    return {
        "name": view.name,
        "mode": view.mode.value if view.mode is not None else None,
        "last_token": view.last_token,
        "holders": [
            {
                "owner": h.owner,
                "mode": h.mode.value,
                "token": h.token,
                "ttl_ms": h.ttl_ms,
                "expires_in_ms": locks.expires_in_ms(h.expires_at_ms, h.ttl_ms),
            }
            for h in view.holders
        ],
        "waiters": [
            {"owner": w.owner, "mode": w.mode.value, "seq": w.seq, "position": i + 1}
            for i, w in enumerate(view.waiters)
        ],
    }


async def _barrier(node: Node) -> None:
    """A ReadIndex barrier: what is read after it includes every write acknowledged
    before the read began."""
    assert node.runner is not None  # run_on_leader answered 503 otherwise
    await node.runner.read_barrier(READ_TIMEOUT_SECONDS)


# --- /v1/locks -----------------------------------------------------------------------


# Writes: the handler reads the body here and the leader-side half (validation included,
# the leader being the trust boundary) runs on the leader, batched from followers.


def _leader_route(
    method: str, path: str, call: str, acquires: bool = False
) -> Callable[[LeaderCall], LeaderCall]:
    """Register `method path` as a request whose leader-side half is the decorated
    coroutine, run as leader call `call`: the route only reads the body (none for GET).

    `acquires`: the call grants locks. It may then be sent again when its leader fails
    with it: the table answers a repeated acquire with the owner's current grant or its
    place in the queue. Without that, a waiter forwarded by a follower was told "outcome
    unknown" while its wait stayed queued, to be granted to nobody and hold the lock for
    a whole lease. And a grant whose client has gone meanwhile is released at once."""

    def register(handler: LeaderCall) -> LeaderCall:
        async def route(request: web.Request) -> web.StreamResponse:
            body = {} if method == "GET" else await read_json(request)
            args = {
                "name": request.match_info.get("name"),
                "body": body,
                "rid": request_id_header(request),
            }
            response = await run_on_leader(request, call, args)
            if (acquires and response.status == 200 and request.transport is None
                    and args["rid"] is None and "request_id" not in body):
                # (A request with a request_id may be retried, and its retry must get
                # the grant the first copy was given: that grant is kept.)
                _release_unheard(request, response)
            return response

        route.__doc__ = handler.__doc__
        routes.route(method, path)(route)
        return leader_call(call, resend_safe=acquires)(handler)

    return register


# Releases of grants whose clients went away (kept so they are not collected mid-way).
_RELEASING: set[asyncio.Task[None]] = set()


def _release_unheard(request: web.Request, response: web.StreamResponse) -> None:
    """The client of this grant closed its connection while it waited: nobody will use
    the lock or ever learn its token, so release it now rather than let it block every
    other waiter until the lease ends. (Only a connection aiohttp already saw close is
    noticed; a client that vanished without a word holds it for its lease, as before.)"""
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return
    grant = json.loads(response.body)
    args = {"name": grant["name"], "body": {"owner": grant["owner"], "token": grant["token"]},
            "rid": None}

    async def release() -> None:
        answer = await run_on_leader(request, "lock.release", args)
        log.info("released a grant its client did not wait for",
                 extra={"lock": args["name"], "owner": grant["owner"], "token": grant["token"],
                        "status": answer.status})

    task = asyncio.get_running_loop().create_task(release())
    _RELEASING.add(task)
    task.add_done_callback(_RELEASING.discard)


def _target(node: Node, args: dict[str, Any]) -> tuple[LockService, dict[str, Any], str, str]:
    """The lock service, body, lock name and owner of a write's args (validated)."""
    body = args["body"]
    return _locks_of(node), body, _name(args["name"]), _owner(body)


@_leader_route("POST", "/v1/locks/{name}", "lock.acquire", acquires=True)
async def _acquire(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    body = args["body"]
    name = _name(args["name"])
    return await _grant(node, name, body, _mode(body), args["rid"])


async def _grant(
    node: Node, name: str, body: dict[str, Any], mode: str, rid_header: str | None
) -> dict[str, Any]:
    """Acquire (or wait for) `name` as the body asks; the grant's JSON, else the error."""
    locks = _locks_of(node)
    owner = _owner(body)
    ttl_ms = field_int(body, "ttl_ms", DEFAULT_TTL_MS, MIN_TTL_MS, MAX_TTL_MS)
    wait_ms = field_int(body, "wait_ms", 0, 0, MAX_WAIT_MS)
    rid = request_id_from(body, rid_header)
    result = await locks.acquire(name, owner, mode, ttl_ms, wait_ms, rid)
    if result.get("status") != "granted":
        _raise_for(result)
    return _grant_json(locks, result)


@_leader_route("DELETE", "/v1/locks/{name}", "lock.release")
async def _release(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    locks, body, name, owner = _target(node, args)
    token = _token(body)
    result = await locks.release(name, owner, token, request_id_from(body, args["rid"]))
    if result.get("status") != "released":
        _raise_for(result)
    return {"released": True}


@_leader_route("POST", "/v1/locks/{name}/keepalive", "lock.keepalive")
async def _keepalive(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    locks, body, name, owner = _target(node, args)
    token = _token(body)
    ttl_ms = body.get("ttl_ms")
    if ttl_ms is not None:
        ttl_ms = field_int(body, "ttl_ms", DEFAULT_TTL_MS, MIN_TTL_MS, MAX_TTL_MS)
    rid = request_id_from(body, args["rid"])
    result = await locks.keepalive(name, owner, token, ttl_ms, rid)
    if result.get("status") != "ok":
        _raise_for(result)
    return {
        "name": name,
        "owner": owner,
        "token": result["token"],
        "ttl_ms": result["ttl_ms"],
        "expires_in_ms": locks.expires_in_ms(result["expires_at_ms"], result["ttl_ms"]),
    }


@_leader_route("POST", "/v1/locks/{name}/cancel", "lock.cancel")
async def _cancel(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    """Give up a wait. 200 {"cancelled": true}; or the grant, if it came first."""
    locks, body, name, owner = _target(node, args)
    seq = body.get("seq")
    if seq is not None:
        seq = field_int(body, "seq", 0, 0, MAX_TOKEN)
    result = await locks.cancel_wait(name, owner, seq)
    status = result.get("status")
    if status == "granted":
        return {"cancelled": False, **_grant_json(locks, result)}
    if status == "cancelled":
        return {"cancelled": True}
    if status == "not_waiting":
        raise ApiError(404, "not_waiting", "this owner is not waiting for the lock")
    _raise_for(result)
    raise AssertionError("unreachable")


@_leader_route("GET", "/v1/locks/{name}", "lock.get")
async def _get_lock(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    locks = _locks_of(node)
    name = _name(args["name"])
    await _barrier(node)
    view = locks.get(name)
    if view is None or not (view.holders or view.waiters):
        raise ApiError(404, "not_found", f"lock {name!r} is not held and has no waiters")
    return _view_json(locks, view)


# --- listing: a page at a time --------------------------------------------------------
#
# Listing every held lock in one step held the leader's event loop for about a second
# with 60,000 locks (12.5 MB of JSON), long enough to depose it: the next leader's lease
# reset took as long, and one GET /v1/locks cost 6 elections. A listing is now built a
# page at a time. With `limit`, the client pages itself (`next` names the last lock of a
# page that has more after it; pass it as `after`). Without, the node that took the
# request fetches the pages from the leader one after another and streams them: every
# page is a linearizable read, but the whole is not one snapshot (a lock taken or
# released while the listing runs may or may not be in it), as with etcd's paged ranges.

LIST_PAGE_LOCKS = 1_000  # per page of an unpaged listing
MAX_LIST_LIMIT = 10_000
MAX_LIST_PAGES = 100_000  # a bound on the loop: 100 million locks


def _page_args(limit: object, after: object) -> tuple[int, str | None]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_request(f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}")
    if after is not None and not isinstance(after, str):
        raise bad_request("'after' must be a lock name")
    return limit, (None if after is None else _name(after))


def _page_query(request: web.Request) -> tuple[int | None, str | None]:
    """The `limit` and `after` of a listing request (limit None: list everything)."""
    after = request.query.get("after")
    if "limit" not in request.query:
        return None, (None if after is None else _name(after))
    try:
        limit: object = int(request.query["limit"])
    except ValueError:
        limit = None
    return _page_args(limit, after)


@leader_call("lock.list")
async def _list_page(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    limit, after = _page_args(args.get("limit"), args.get("after"))
    locks = _locks_of(node)
    await _barrier(node)
    views, more = locks.held_page(after, limit)
    page: dict[str, Any] = {"locks": [_view_json(locks, v) for v in views]}
    if more:
        page["next"] = views[-1].name
    return page


@routes.get("/v1/locks")
async def list_locks(request: web.Request) -> web.StreamResponse:
    """All held locks, in name order; `?limit=N&after=NAME` for one page of them."""
    limit, after = _page_query(request)
    if limit is not None:
        return await run_on_leader(request, "lock.list", {"limit": limit, "after": after})
    return await _stream_pages(request, after, b"[", b"]", _list_entries)


def _list_entries(page: dict[str, Any]) -> list[bytes]:
    return [json.dumps(v).encode() for v in page["locks"]]


def _seed_entries(page: dict[str, Any]) -> list[bytes]:
    """The prototype's `resource: owner` pairs (a shared lock: its earliest holder)."""
    return [
        (json.dumps(v["name"]) + ": " + json.dumps(v["holders"][0]["owner"])).encode()
        for v in page["locks"]
        if v["holders"]
    ]


async def _stream_pages(
    request: web.Request,
    after: str | None,
    opening: bytes,
    closing: bytes,
    entries_of: Callable[[dict[str, Any]], list[bytes]],
) -> web.StreamResponse:
    """`{"locks": <opening> entries... <closing>}` from pages fetched from the leader.
    An error on the first page is the answer; one on a later page (the status is sent
    by then) cuts the body short, so the client sees a broken document, never a short
    list that looks whole."""
    response: web.StreamResponse | None = None
    first = True
    for _ in range(MAX_LIST_PAGES):
        answer = await run_on_leader(
            request, "lock.list", {"limit": LIST_PAGE_LOCKS, "after": after}
        )
        page = _page_of(answer)
        if page is None:
            if response is None:
                return answer
            log.warning("a lock listing failed after its first page; cut short",
                        extra={"status": answer.status})  # fmt: skip
            response.force_close()
            return response
        if response is None:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"locks": ' + opening)
        chunk = b", ".join(entries_of(page))
        if chunk:
            await response.write((b"" if first else b", ") + chunk)
            first = False
        after = page.get("next")
        if after is None:
            await response.write(closing + b"}")
            await response.write_eof()
            return response
    raise AssertionError("a listing of more than MAX_LIST_PAGES pages")


def _page_of(answer: web.StreamResponse) -> dict[str, Any] | None:
    """The page a successful `lock.list` answer carries, else None."""
    if answer.status != 200 or not isinstance(answer, web.Response):
        return None
    body = answer.body
    if not isinstance(body, bytes):
        return None
    page = json.loads(body)
    if not isinstance(page, dict) or not isinstance(page.get("locks"), list):
        return None
    next_name = page.get("next")
    return page if next_name is None or isinstance(next_name, str) else None


@_leader_route("POST", "/v1/locks/{name}/validate", "lock.validate")
async def _validate(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    """Is `token` the current grant of an owner of this lock? (for resource servers)"""
    locks = _locks_of(node)
    name = _name(args["name"])
    token = _token(args["body"])
    await _barrier(node)
    return {"valid": locks.validate(name, token)}


# --- the course prototype's aliases --------------------------------------------------


@_leader_route("POST", "/lock", "lock.seed_lock", acquires=True)
async def _seed_lock(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    """`{"resource", "owner"}`: an exclusive try-lock with the default TTL."""
    body = args["body"]
    name = _name(field_str(body, "resource", max_bytes=MAX_NAME_BYTES))
    grant = await _grant(node, name, body, "exclusive", args["rid"])
    return {"success": True, "resource": name, **grant}


@_leader_route("POST", "/unlock", "lock.seed_unlock")
async def _seed_unlock(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    """`{"resource", "owner"}`: release whatever grant the owner holds (no token needed,
    as in the prototype; the token is looked up on the leader)."""
    locks = _locks_of(node)
    body = args["body"]
    name = _name(field_str(body, "resource", max_bytes=MAX_NAME_BYTES))
    owner = _owner(body)
    hold = locks.hold_of(name, owner)
    if hold is None:
        _raise_for({"status": "not_held", "name": name})
        raise AssertionError("unreachable")
    result = await locks.release(name, owner, hold.token, request_id_from(body, args["rid"]))
    if result.get("status") != "released":
        _raise_for(result)
    return {"success": True, "released": True, "resource": name}


@routes.get("/locks")
async def seed_locks(request: web.Request) -> web.StreamResponse:
    """`{"locks": {resource: owner}}`; a shared lock shows its earliest holder. Built a
    page at a time like GET /v1/locks."""
    return await _stream_pages(request, None, b"{", b"}", _seed_entries)
