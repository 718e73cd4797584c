"""Forwarding client requests from a follower to the leader's REST API.

The one rule that matters: a request is retried only when a retry cannot apply it twice.
That is the case when it never reached the leader (the connection could not even be
opened) or when the caller vouches that it is idempotent (a GET, or a command carrying a
request_id the state machine deduplicates). A timeout or a dropped connection after the
request was sent means "maybe applied": retrying a non-idempotent command then could take
a lock twice, so the caller gets a ForwardError with maybe_applied=True and must report an
unknown outcome, never a failure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from service.raft.messages import NodeId
from service.transport.http import FROM_HEADER, SECRET_HEADER
from service.transport.sessions import client_session

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Dsync-Forwarded"

# Hop-by-hop and framing headers describe the incoming connection, not the request;
# aiohttp sets its own for the outgoing one.
_DROP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Keep-Alive",
        "Upgrade",
        "TE",
        "Trailer",
        "Proxy-Authorization",
        "Proxy-Connection",
        SECRET_HEADER,  # set from our own configuration, never passed through
        FORWARDED_HEADER,
        FROM_HEADER,
    )
)

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_forwarded(headers: Mapping[str, str]) -> bool:
    """True when a request already came through a forwarding node (the loop guard:
    such a request must be served or refused, never forwarded again)."""
    return headers.get(FORWARDED_HEADER) == "1"


class ForwardError(Exception):
    """The leader gave no usable answer.

    `maybe_applied` is False only when the request certainly never reached the leader;
    otherwise the command may have been applied and the outcome is unknown.
    """

    def __init__(self, message: str, *, maybe_applied: bool) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


def _never_sent(exc: BaseException) -> bool:
    # ClientConnectorError and ConnectionTimeoutError come from opening the connection,
    # before a byte of the request was written. TLS failures are excluded: retrying a
    # certificate error cannot help.
    return isinstance(
        exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
    ) and not isinstance(exc, aiohttp.ClientSSLError)


def _retry_safe(exc: BaseException, idempotent: bool) -> bool:
    if isinstance(exc, aiohttp.InvalidURL):
        return False  # a bad URL stays bad
    if _never_sent(exc):
        return True
    return idempotent and isinstance(exc, aiohttp.ClientError | TimeoutError)


class LeaderClient:
    """Sends requests to the leader's REST API over one pooled ClientSession."""

    def __init__(
        self,
        node_id: NodeId,
        *,
        secret: str | None = None,
        default_timeout: float = 5.0,
        connect_timeout: float = 1.0,
        max_attempts: int = 4,
        retry_deadline: float = 3.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 0.5,
        max_response_bytes: int = 8 * 1024 * 1024,
        connections_per_host: int = 32,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if default_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.node_id = node_id
        self._secret = secret or None
        self._default_timeout = default_timeout
        self._connect_timeout = connect_timeout
        self._max_attempts = max_attempts
        self._retry_deadline = retry_deadline
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max_response_bytes = max_response_bytes
        self._connections_per_host = connections_per_host
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> LeaderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def forward(
        self,
        method: str,
        url: str,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        *,
        idempotent: bool | None = None,
    ) -> tuple[int, Any]:
        """Send a JSON request; return (status, parsed JSON body).

        The body is None when the answer is empty or not JSON (a plain-text error page
        from aiohttp or a proxy): the status alone still tells what happened.

        `idempotent=None` treats GET/HEAD/OPTIONS as idempotent and everything else as
        not; pass True for a command that carries a request_id.
        """
        body = None if json_body is None else json.dumps(json_body).encode()
        status, raw = await self.forward_raw(
            method, url, body, headers, timeout, idempotent=idempotent
        )
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            log.debug("forward %s %s: %d with a non-JSON body", method, url, status)
            return status, None

    async def forward_raw(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        *,
        idempotent: bool | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        """Like forward() but relays bytes both ways (no re-encoding of the client's JSON)."""
        if self._closed:
            raise ForwardError("forwarding client is closed", maybe_applied=False)
        method = method.upper()
        if idempotent is None:
            idempotent = method in _SAFE_METHODS
        out_headers = self._headers(headers, body is not None, content_type)
        per_try = self._default_timeout if timeout is None else timeout
        if per_try <= 0:
            raise ValueError("timeout must be positive")
        safe = idempotent  # bound for the closure below

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.debug("forward %s %s failed (%r), retry %d", method, url, exc, state.attempt_number)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts) | stop_after_delay(self._retry_deadline),
            wait=wait_exponential_jitter(
                multiplier=self._backoff_initial,
                max=self._backoff_max,
                jitter=self._backoff_initial,
            ),
            retry=retry_if_exception(lambda exc: _retry_safe(exc, safe)),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            # The loop runs at most max_attempts times (stop_after_attempt).
            async for attempt in retrying:
                with attempt:
                    return await self._once(method, url, body, out_headers, per_try)
        except ForwardError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent = not _never_sent(exc)
            raise ForwardError(
                f"{method} {url}: {type(exc).__name__}: {exc}", maybe_applied=sent
            ) from exc
        raise AssertionError("tenacity returned without result or exception")

    def _headers(
        self, headers: Mapping[str, str] | None, has_body: bool, content_type: str
    ) -> dict[str, str]:
        out = {k: v for k, v in (headers or {}).items() if k.lower() not in _DROP_HEADERS}
        out[FORWARDED_HEADER] = "1"
        out[FROM_HEADER] = self.node_id
        if self._secret is not None:
            out[SECRET_HEADER] = self._secret
        if has_body and not any(k.lower() == "content-type" for k in out):
            out["Content-Type"] = content_type
        return out

    async def _once(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float
    ) -> tuple[int, bytes]:
        session = self._get_session()
        client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=min(timeout, self._connect_timeout)
        )
        async with session.request(
            method,
            url,
            data=body,
            headers=headers,
            timeout=client_timeout,
            # A redirect would replay a possibly non-idempotent request elsewhere;
            # the caller sees the 3xx instead.
            allow_redirects=False,
        ) as resp:
            chunks: list[bytes] = []
            total = 0
            # Bounded by max_response_bytes and by the request's total timeout.
            while chunk := await resp.content.readany():
                total += len(chunk)
                if total > self._max_response_bytes:
                    raise ForwardError(
                        f"leader response exceeds {self._max_response_bytes} bytes",
                        maybe_applied=True,
                    )
                chunks.append(chunk)
            return resp.status, b"".join(chunks)

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running loop, and the
        # node constructs this client before it starts serving.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit_per_host=self._connections_per_host)
            self._session = client_session(connector=connector)
        return self._session
