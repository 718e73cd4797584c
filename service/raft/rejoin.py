"""Bringing back a node whose Raft storage was lost (its disk, or its Redis, emptied).

Raft assumes what a node persisted survives. A node back with empty storage has forgotten
two things that matter: the vote it may have cast in the current term, and entries it
held that may have counted towards a commit. Voting again in that term could elect a
second leader for it; voting for a candidate that lacks those entries could elect a
leader without them. Either way acknowledged writes could be lost.

So at start, a node whose storage is empty asks its peers (GET /health) for their term
and log. If none has a log, the cluster is new and the node starts as usual (the first
start; also when some peers are not up yet). If any has one, the node has lost its
storage, and it:

1. waits until *every* peer has answered, then takes the highest term they report with
   the vote ABSTAIN (it votes in no term it could have voted in before);
2. starts its core `rejoining`: it grants no vote and does not campaign until it has
   caught up with the first leader that contacts it (core.py).

The marker key REJOIN_KEY makes (2) survive a crash before catching up; it is written
before the hard state and deleted once the core has caught up.

What this does not cover: a second failure before the node has caught up (another node
down for good) may leave no copy of some entries; the cluster then waits rather than
elect a leader without them, as with any two failures in a three-node cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

log = logging.getLogger("dsync.raft")

REJOIN_KEY = "dsync:raft:rejoining"
ASK_TIMEOUT_SECONDS = 2.0
RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class PeerLog:
    term: int
    has_log: bool


Ask = Callable[[str], Awaitable[PeerLog]]  # base URL -> what that peer reports


async def ask_health(session: aiohttp.ClientSession, url: str) -> PeerLog:
    timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT_SECONDS)
    async with session.get(f"{url}/health", timeout=timeout) as response:
        body = await response.json(content_type=None)
    if not isinstance(body, dict) or body.get("status") == "starting":
        raise ValueError(f"{url} is starting")
    term = int(body.get("term", 0))
    last = int(body.get("last_log_index", 0) or 0)
    commit = int(body.get("commit_index", 0) or 0)
    return PeerLog(term, max(last, commit) > 0)


async def term_floor(
    peers: Mapping[str, str], ask: Ask, *, retry: float = RETRY_SECONDS
) -> int | None:
    """None if the cluster is new; else the highest term of all peers (once all answer).

    Retries until every peer has answered when any of them has a log; the caller's
    shutdown cancels it."""
    waited = 0
    while True:
        answers = await asyncio.gather(
            *(ask(url) for url in peers.values()), return_exceptions=True
        )
        known = {
            peer: answer
            for peer, answer in zip(peers, answers, strict=True)
            if isinstance(answer, PeerLog)
        }
        if not any(answer.has_log for answer in known.values()):
            return None
        if len(known) == len(peers):
            return max(answer.term for answer in known.values())
        if waited % 10 == 0:
            log.warning(
                "this node's Raft storage is empty but the cluster has a log: it was lost. "
                "Waiting for every peer to answer before rejoining",
                extra={"missing": sorted(set(peers) - set(known))},
            )
        waited += 1
        await asyncio.sleep(retry)


__all__ = ["REJOIN_KEY", "Ask", "PeerLog", "ask_health", "term_floor"]
