"""service/raft/rejoin.py: how a node with empty Raft storage tells a new cluster from
lost storage, and which term it takes."""

from __future__ import annotations

import asyncio

import pytest

from service.raft.rejoin import PeerLog, term_floor

PEERS = {"b": "http://b", "c": "http://c"}


def asker(answers: dict[str, list[PeerLog | None]]):  # type: ignore[no-untyped-def]
    """Each call pops the next answer for that URL; None is a peer that does not answer."""

    async def ask(url: str) -> PeerLog:
        queue = answers[url]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if answer is None:
            raise ConnectionError(url)
        return answer

    return ask


async def test_a_new_cluster_starts_as_usual_even_with_a_peer_missing() -> None:
    ask = asker({"http://b": [PeerLog(1, False)], "http://c": [None]})
    assert await term_floor(PEERS, ask, retry=0.001) is None


async def test_lost_storage_takes_the_highest_term_of_all_peers() -> None:
    ask = asker({"http://b": [PeerLog(7, True)], "http://c": [PeerLog(9, True)]})
    assert await term_floor(PEERS, ask, retry=0.001) == 9


async def test_lost_storage_waits_until_every_peer_answered() -> None:
    # c is down twice; its term is the highest, so answering without it would be wrong.
    ask = asker({"http://b": [PeerLog(4, True)], "http://c": [None, None, PeerLog(6, False)]})
    assert await term_floor(PEERS, ask, retry=0.001) == 6


async def test_it_keeps_waiting_while_a_peer_never_answers() -> None:
    ask = asker({"http://b": [PeerLog(4, True)], "http://c": [None]})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(term_floor(PEERS, ask, retry=0.001), 0.1)
