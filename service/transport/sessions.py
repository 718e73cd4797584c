"""aiohttp client sessions that never send a request twice on their own.

aiohttp resends a GET, HEAD, OPTIONS, TRACE, PUT or DELETE once, on a new connection,
when a kept-alive connection fails before the answer arrives. RFC 9112 allows this for
methods that HTTP defines as idempotent. Ours are not idempotent in that sense: a PUT to
a register or a DELETE of a lock means something different a moment later.

The resend broke a promise. A follower forwarded a client's PUT to the leader over a
kept-alive connection; the leader appended it to its log and was killed before
answering. aiohttp's resend then found the leader's port closed and raised a connection
error, which says "never sent". So the forwarding layer sent the PUT again to the next
leader, and the write was applied twice. It happened in each of four leader kills
under a write-only load, and in about half of the leader-kill history tests
(tests/integration/test_raft_process.py now checks the log for it); once it broke the
test's linearizability check.

A session made here reports such a failure as it is: the request was sent, and the
outcome is unknown. aiohttp has no public switch for this (aio-libs/aiohttp#10790), so
`no_resend` clears the private flag its own test client clears. tests/transport/
test_sessions.py fails if an aiohttp upgrade stops honouring it.
"""

from __future__ import annotations

from typing import Any

import aiohttp


def no_resend(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    session._retry_connection = False
    return session


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    """aiohttp.ClientSession(**kwargs) without aiohttp's automatic resend."""
    return no_resend(aiohttp.ClientSession(**kwargs))
