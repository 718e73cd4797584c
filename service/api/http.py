"""Request plumbing shared by every route: JSON bodies, validation helpers, middleware."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from service.api.errors import ApiError, bad_request, error_response
from service.metrics import NodeMetrics
from service.raft.core import NotLeader, RaftError, TooManyPending, TransferInProgress
from service.raft.runner import (
    OutcomeUnknown,
    ProposalDropped,
    RunnerStopped,
    StorageStalled,
)
from service.transport.streams import OpenStreams

log = logging.getLogger("dsync.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

METRICS_KEY: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)
MAX_BODY_KEY: web.AppKey[int] = web.AppKey("max_body", int)
# How long a client may take to send its body once its headers are in. A client that
# stalls mid-body would otherwise hold its connection and handler for good (a slow
# client attack needs only many such connections); nginx's client_body_timeout is 60 s.
BODY_TIMEOUT_KEY: web.AppKey[float] = web.AppKey("body_timeout", float)
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0
# Peers' WebSockets served by this application, closed when it shuts down.
STREAMS_KEY: web.AppKey[OpenStreams] = web.AppKey("streams", OpenStreams)


# Node-to-node bodies (batched calls, cache messages) carry what clients sent and more: a
# full image of a node's cache store for its mirror, a queue partition's whole state for
# a follower that fell behind. They come from authenticated peers, not clients, so they
# get a cap of their own instead of the clients' MAX_BODY_BYTES.
INTERNAL_MAX_BODY_BYTES = 512 * 1024 * 1024


async def read_internal_body(
    request: web.Request, limit: int = INTERNAL_MAX_BODY_BYTES
) -> bytes:
    """The body of a node-to-node request, read past the API's client_max_size (which
    request.read() obeys), up to `limit`; 413 beyond."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"internal request body is over {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    # Bounded: every round consumes at least one byte, and the total is capped.
    while chunk := await request.content.readany():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "too_large", f"internal request body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# Deeper documents are refused: Python's JSON codecs recurse, and a document nested near
# the interpreter's recursion limit would parse here and then fail (500) wherever it is
# encoded again (the log, a forward, a reply). Limits of other parsers, for scale: Rust's
# serde_json 128, Ruby's JSON 100.
MAX_JSON_DEPTH = 100
# A \uD800-\uDFFF escape: the only way a JSON text can hold a lone UTF-16 surrogate,
# which Python decodes into a str that UTF-8 cannot encode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_json_document(body: object, *, depth: bool, surrogates: bool) -> str | None:
    """Why a decoded JSON document cannot be accepted, or None. Iterative, so a deep
    document cannot exhaust the stack here either."""
    stack: list[tuple[object, int]] = [(body, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            if depth and level > MAX_JSON_DEPTH:
                return f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if surrogates and isinstance(k, str):
                    stack.append((k, level))
                stack.append((v, level + 1))
        elif surrogates and isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "a JSON string holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF " \
                    "escape that is not half of a pair)"
    return None


async def read_json(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request's JSON object; 413 when too large, 400 when not UTF-8, not a JSON
    object, nested deeper than MAX_JSON_DEPTH, or holding a string UTF-8 cannot encode
    (so every str in it, request_id included, can be encoded downstream)."""
    limit = request.app[MAX_BODY_KEY]
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"request body is over {limit} bytes")
    timeout = request.app.get(BODY_TIMEOUT_KEY, DEFAULT_BODY_TIMEOUT_SECONDS)
    # A body that arrived with its headers (most do) is read at once, without the cost
    # of arming a timer for it on every request.
    deadline = None if request.content.is_eof() else timeout
    try:
        # request.read() caches the body, so forwarding can still send it on after a read.
        async with asyncio.timeout(deadline):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, "too_large", f"request body is over {limit} bytes") from exc
    except TimeoutError as exc:
        raise ApiError(408, "body_timeout",
                       f"the request body did not arrive within {timeout:g} s",
                       close_connection=True) from exc
    except ConnectionResetError as exc:
        # The client went away mid-body: nobody will read this answer, and it is no
        # server error to log with a traceback.
        raise ApiError(400, "incomplete_body",
                       "the connection closed before the body arrived",
                       close_connection=True) from exc
    if not raw.strip():
        if required:
            raise bad_request("a JSON object body is required", "bad_json")
        return {}
    try:
        # Decoded strictly first: json.loads of bytes decodes them with "surrogatepass",
        # which lets UTF-8-encoded surrogates (not UTF-8) through as unencodable strs.
        # RFC 8259 asks for UTF-8 anyway.
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"body is not valid JSON: {exc}", "bad_json") from exc
    except RecursionError as exc:
        raise bad_request(f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
                          "bad_json") from exc
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object", "bad_json")
    # Both checks walk the document, so each runs only when the raw text makes it
    # possible: more brackets than the depth limit, or a surrogate escape.
    problem = check_json_document(
        body,
        depth=len(raw) > MAX_JSON_DEPTH and raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH,
        surrogates=b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None,
    )
    if problem is not None:
        raise bad_request(problem, "bad_json")
    return body


def field_str(
    body: dict[str, Any], name: str, *, required: bool = True, max_bytes: int = 256
) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"'{name}' is required")
        return None
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{name}' must be a non-empty string")
    if len(value.encode()) > max_bytes:
        raise bad_request(f"'{name}' is longer than {max_bytes} bytes")
    return value


def field_int(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer")
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}")
    return value


def request_id_of(request: web.Request, body: dict[str, Any]) -> str | None:
    return request_id_from(body, request_id_header(request))


def request_id_from(body: dict[str, Any], header: str | None) -> str | None:
    """The body's request_id, else the X-Request-Id header's; 400 when malformed."""
    rid = body.get("request_id", header)
    if rid is None:
        return None
    if not isinstance(rid, str) or not rid or len(rid) > 128:
        raise bad_request("'request_id' must be a string of 1-128 characters")
    return rid


def request_id_header(request: web.Request) -> str | None:
    """The X-Request-Id header, checked before it is sent anywhere; 400 when it holds
    bytes that are not UTF-8 (aiohttp maps them to lone surrogates, which nothing
    downstream can encode)."""
    header = request.headers.get("X-Request-Id")
    if header is not None and not _is_utf8_text(header):
        raise bad_request("the X-Request-Id header must be UTF-8 text")
    return header


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def raft_error(exc: Exception) -> ApiError | None:
    """Map consensus-layer failures a client can act on to clear answers."""
    if isinstance(exc, TooManyPending):
        return ApiError(429, "too_busy", str(exc))
    if isinstance(exc, NotLeader):
        return ApiError(503, "no_leader", "no leader is known right now; retry shortly")
    if isinstance(exc, OutcomeUnknown):
        return ApiError(
            503,
            "unavailable",
            f"{exc}: the outcome is unknown, retry with the same request_id to apply it "
            "at most once",
        )
    if isinstance(exc, StorageStalled):
        return ApiError(503, "unavailable", f"{exc}; retry (another node may lead)")
    if isinstance(exc, TransferInProgress | RunnerStopped):
        return ApiError(503, "unavailable", f"{exc}; retry shortly")
    if isinstance(exc, ProposalDropped):
        return ApiError(
            503, "unavailable", "leader changed and the request was not applied; retry it"
        )
    if isinstance(exc, TimeoutError):
        return ApiError(
            503,
            "unavailable",
            "timed out waiting for the cluster; the outcome is unknown, retry with the "
            "same request_id to apply it at most once",
        )
    if isinstance(exc, RaftError):
        return ApiError(503, "unavailable", f"{exc}; retry shortly")
    return None


def raft_error_response(exc: Exception) -> web.Response | None:
    mapped = raft_error(exc)
    if mapped is None:
        return None
    return error_response(mapped.status, mapped.code, mapped.message, **mapped.extra)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, **exc.extra)
        if exc.close_connection:
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "http_error"
        )
        return error_response(exc.status, code, exc.reason or code)
    except ConnectionResetError as exc:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            return _unhandled(request, exc)  # a reset elsewhere (a peer's connection)
        # The client went away before it could be answered (say, a peer that gave up on
        # a WebSocket handshake): no server error, and nobody to answer.
        log.info("client went away before the answer", extra={"path": request.path})
        response = error_response(400, "client_gone", "the connection was reset")
        response.force_close()
        return response
    except Exception as exc:
        return _unhandled(request, exc)


def _unhandled(request: web.Request, exc: Exception) -> web.Response:
    mapped = raft_error_response(exc)
    if mapped is not None:
        return mapped
    log.exception("unhandled error", extra={"path": request.path})
    return error_response(500, "internal", "internal error; see the node's log")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        metrics = request.app[METRICS_KEY]
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        metrics.observe_http(name, request.method, status, time.perf_counter() - started)
