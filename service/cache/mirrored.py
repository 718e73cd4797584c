"""A cache store that also keeps a copy of itself on the peers, and takes it back after
its own disk was lost (the layout on the peers: mirror_store.py).

persist: the local write, and the same writes to the mirroring peer (in parallel: the
copy costs no extra wait); `persist` returns once the local write and at least one peer
hold them. The cache service answers and sends nothing a persist guards before it
returns, so every acknowledged write is then on two disks.

One peer mirrors at a time (the next node in sorted order: each node then carries one
mirror, and a write costs one copy, not one per peer). When it says no or stays silent
for HEDGE_SECONDS, the next peer is brought in, starting from a full image; once the
preferred peer has been back in step for RETIRE_AFTER_SECONDS, the spare is let go
again. A channel whose update failed sends its peer a full image, retrying with a
growing pause; writes offered meanwhile are answered by the next attempt.

Start (`next_incarnation`): a store that never started here may be a first start, or a
node whose disk was lost. The Raft log tells them apart: the node records its first
start there (`register`, which answers whether it had registered before). If it had, the
node takes back the newest of its peers' mirrors, and it waits until *every* peer has
answered: an acknowledged write may be on one peer only, and a restore from another one
would silently lose it. A node whose local store is intact never asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service.cache.mirror_store import (
    Applied,
    MirrorImage,
    MirrorUpdate,
    Position,
    encode_position,
    fields_of,
    image_of,
    stored_of,
)
from service.cache.store import LocalCacheStore, Persist, StoredCache

log = logging.getLogger("dsync.cache")

Send = Callable[[str, MirrorUpdate], Awaitable[Applied]]  # raises when unreachable
Fetch = Callable[[str], Awaitable[MirrorImage | None]]  # raises when unreachable; bounded
Register = Callable[[], Awaitable[bool]]  # True: this node's cache had started before

MIRROR_TIMEOUT_SECONDS = 3.0
HEDGE_SECONDS = 0.3  # no answer from the active mirrors this long: bring in another peer
RETIRE_AFTER_SECONDS = 10.0  # the preferred peer in step this long: back to one mirror
IMAGE_PART_BYTES = 4 * 1024 * 1024  # a full image travels in requests of about this
RETRY_MIN_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0


class MirrorUnavailable(Exception):
    """No peer could take a copy, or a restore could not reach every peer."""


@dataclass(slots=True)
class _Offer:
    sequence: int
    writes: dict[str, str | None]
    done: asyncio.Future[bool]


class _Channel:
    """Keeps one peer's mirror of this node in step: updates in order, one request in
    flight, and a full image whenever the mirror's position is not known.

    The rule that makes a mirror trustworthy: a mirror at position P holds every write
    of sequence <= P. So an offer is dropped only once a successful update carried it or
    a successful image covers it (an image covers what was durable here when it was
    read). A failed send answers its offers "no" at once, but keeps their writes."""

    def __init__(self, peer: str, owner: MirroredCacheStore) -> None:
        self.peer = peer
        self._owner = owner
        self._pending: list[_Offer] = []
        self.synced: Position | None = None  # the mirror's position, when known
        self.synced_since = 0.0  # monotonic time it last got in step
        self.active = False  # kept in step now (offered every write)
        self._wake = asyncio.Event()
        self.stopped = False
        self.full_images = 0  # sent, for tests and logs

    def activate(self) -> None:
        if not self.active:
            self.active, self.synced = True, None  # a full image first: it may be behind
            # Writes whose local write is still under way were offered to the mirrors
            # active then, not to this one, and its image cannot hold them (it holds
            # what is durable here): they must follow the image, or this mirror would
            # claim a position it has a hole in.
            for sequence, writes in self._owner.writes_in_flight():
                self.offer(sequence, writes)
            self._wake.set()

    def retire(self) -> None:
        """Stop keeping this mirror in step. It keeps what it holds (all up to its
        position); a later `activate` starts over with a full image."""
        self.active, self.synced = False, None
        _settle(self._pending, False)
        self._pending = []
        self._wake.set()

    def offer(self, sequence: int, writes: dict[str, str | None]) -> asyncio.Future[bool]:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # While the peer is out of step this waits for the next full image attempt and
        # is answered by it: "no" at once would fail writes for nothing when the peer
        # comes back, and waiting costs nothing while another peer answers.
        self._pending.append(_Offer(sequence, writes, done))
        if len(self._pending) > 1 and self._pending[-2].sequence > sequence:
            # An older write offered late (brought in by a hedge): updates go in order.
            self._pending.sort(key=lambda o: o.sequence)
        self._wake.set()
        return done

    async def run(self) -> None:
        retry = RETRY_MIN_SECONDS
        while not self.stopped:
            if not self.active:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.synced is None:
                if await self._send_image():
                    retry = RETRY_MIN_SECONDS
                else:
                    await asyncio.sleep(retry)
                    retry = min(RETRY_MAX_SECONDS, retry * 2)
                continue
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            offers, self._pending = self._pending, []
            writes: dict[str, str | None] = {}
            for item in offers:
                writes.update(item.writes)
            position = (self._owner.incarnation, offers[-1].sequence)
            ok = await self._send(MirrorUpdate(position, writes, base=self.synced))
            _settle(offers, ok)
            if ok:
                self.synced = position
            else:
                self.synced = None
                self._pending = offers + self._pending

    async def _send_image(self) -> bool:
        position = self._owner.durable_position
        # Offers up to `position` are in the image; later ones follow it as updates.
        covered = [o for o in self._pending if o.sequence <= position[1]]
        self._pending = [o for o in self._pending if o.sequence > position[1]]
        try:
            stored = await self._owner.local.load()
        except Exception as exc:
            log.warning("cache mirror image not loaded", extra={"error": repr(exc)})
            ok = False
        else:
            self.full_images += 1
            parts = image_parts(image_of(stored), IMAGE_PART_BYTES)
            ok = True
            for index, part in enumerate(parts):
                last = index == len(parts) - 1
                ok = await self._send(MirrorUpdate(position, part, None, index, last))
                if not ok:
                    break
        _settle(covered, ok)
        if not self.active:
            return True  # retired meanwhile: nothing more to do
        if ok:
            self.synced, self.synced_since = position, time.monotonic()
        else:
            _settle(self._pending, False)  # a write waits for one attempt at most
        return ok

    async def _send(self, update: MirrorUpdate) -> bool:
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT_SECONDS):
                reply = await self._owner.send(self.peer, update)
        except Exception as exc:
            log.debug("cache mirror unreachable", extra={"peer": self.peer, "error": repr(exc)})
            return False
        if not reply.applied:
            log.info(
                "cache mirror out of step; sending a full image",
                extra={"peer": self.peer, "mirror_at": reply.position, "base": update.base},
            )
        return reply.applied


def image_parts(fields: dict[str, str], part_bytes: int) -> list[dict[str, str | None]]:
    """A full image in parts of about `part_bytes` (at least one part, maybe empty)."""
    parts: list[dict[str, str | None]] = [{}]
    size = 0
    for name, value in fields.items():
        if size >= part_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = value
        size += len(name) + len(value)
    return parts


def preference(node_id: str, peers: Sequence[str]) -> tuple[str, ...]:
    """The peers in the order this node mirrors to them: the next ones after it in
    sorted order, so that every node is the preferred mirror of exactly one other."""
    ring = sorted({node_id, *peers})
    at = ring.index(node_id)
    return tuple(p for p in ring[at + 1 :] + ring[:at])


def _settle(offers: Sequence[_Offer], ok: bool) -> None:
    for item in offers:
        if not item.done.done():
            item.done.set_result(ok)


class MirroredCacheStore:
    def __init__(
        self,
        node_id: str,
        local: LocalCacheStore,
        peers: Sequence[str],
        send: Send,
        fetch: Fetch,
        register: Register,
    ) -> None:
        self.local = local
        self.peers = preference(node_id, peers)
        self.send = send
        self._fetch = fetch
        self._register = register
        self.incarnation = 0
        self._sequence = 0
        # sequence -> its writes, while its local write is under way
        self._local_inflight: dict[int, dict[str, str | None]] = {}
        self.channels = [_Channel(peer, self) for peer in self.peers]
        self._tasks: list[asyncio.Task[None]] = []
        self.restored_from: Position | None = None

    @property
    def position(self) -> Position:
        return self.incarnation, self._sequence

    @property
    def durable_position(self) -> Position:
        """Every persist up to this position is durable here (what an image holds)."""
        if self._local_inflight:
            return self.incarnation, min(self._local_inflight) - 1
        return self.position

    def writes_in_flight(self) -> list[tuple[int, dict[str, str | None]]]:
        """(sequence, writes) of the persists whose local write is under way, in order."""
        return sorted(self._local_inflight.items())

    async def persist(self, writes: Sequence[Persist]) -> None:
        if not self.channels:
            await self.local.persist(writes)
            return  # a single node: there is nobody to copy to
        # The local write and the copies go out together: an acknowledgement needs both,
        # and a peer holding a write this node's crash lost is a crash before the answer
        # (the protocol re-sends from the restored state).
        self._sequence += 1
        sequence = self._sequence
        fields = fields_of(writes)
        offers = {ch.offer(sequence, fields) for ch in self.channels if ch.active}
        self._local_inflight[sequence] = fields
        try:
            await self.local.persist(writes)
        finally:
            del self._local_inflight[sequence]
        if await self._acknowledged(sequence, fields, offers):
            self._retire_spares()
            return
        raise MirrorUnavailable("no peer took a copy of the write; it is not acknowledged")

    async def _acknowledged(
        self, sequence: int, fields: dict[str, str | None], offers: set[asyncio.Future[bool]]
    ) -> bool:
        """Wait for a mirror to take the write; bring in another peer when the active ones
        said no or stay silent for HEDGE_SECONDS (it starts with a full image, which holds
        this write: it is durable here by now)."""
        now = time.monotonic()
        deadline, hedge_at = now + MIRROR_TIMEOUT_SECONDS, now + HEDGE_SECONDS
        while True:
            now = time.monotonic()
            spare = next((ch for ch in self.channels if not ch.active), None)
            if spare is not None and (not offers or now >= hedge_at):
                log.info("cache mirror: bringing in another peer", extra={"peer": spare.peer})
                spare.activate()
                offers.add(spare.offer(sequence, fields))
                hedge_at = now + HEDGE_SECONDS
                continue
            if not offers or now >= deadline:
                return False
            wake_at = deadline if spare is None else min(deadline, hedge_at)
            done, offers = await asyncio.wait(
                offers, timeout=max(0.0, wake_at - now), return_when=asyncio.FIRST_COMPLETED
            )
            if any(f.result() for f in done):
                return True

    def _retire_spares(self) -> None:
        """Back to one mirror once the preferred peer has been in step for a while."""
        first = self.channels[0]
        if (
            first.active
            and first.synced is not None
            and time.monotonic() - first.synced_since >= RETIRE_AFTER_SECONDS
        ):
            for channel in self.channels[1:]:
                if channel.active:
                    log.info("cache mirror: back to one peer", extra={"retired": channel.peer})
                    channel.retire()

    async def load(self) -> StoredCache:
        return await self.local.load()

    async def next_incarnation(self) -> int:
        """Restore first if the local disk was lost (see the module doc), then count a
        start. Raises (and changes nothing) while a restore cannot be done safely yet."""
        if self.peers and await self.local.incarnation() == 0 and await self._register():
            image = await self._newest_image()
            if image is not None:
                await self.local.restore(stored_of(image.writes), image.position[0])
                self.restored_from = image.position
                log.warning(
                    "cache store was lost: restored from the peers' mirrors",
                    extra={"position": image.position, "hashes": len(image.writes)},
                )
        self.incarnation = await self.local.next_incarnation()
        self._sequence = 0
        return self.incarnation

    async def _newest_image(self) -> MirrorImage | None:
        # The fetch bounds its own wait (a whole mirror may take a while to travel).
        answers = await asyncio.gather(
            *(self._fetch(p) for p in self.peers), return_exceptions=True
        )
        silent = [
            p for p, a in zip(self.peers, answers, strict=True) if isinstance(a, BaseException)
        ]
        if silent:
            raise MirrorUnavailable(
                f"this node's cache store was lost and peers {silent} did not answer: "
                "the newest copy may be on them, so the cache waits for every peer"
            )
        images = [a for a in answers if isinstance(a, MirrorImage)]
        return max(images, key=lambda image: image.position, default=None)

    def describe(self) -> dict[str, Any]:
        """Where the copies stand (GET /v1/cache): a peer whose `synced` is null is being
        sent a full image, or is down."""
        return {
            "position": encode_position(self.position),
            "restored_from": None
            if self.restored_from is None
            else encode_position(self.restored_from),
            "peers": {
                ch.peer: {
                    "active": ch.active,
                    "synced": None if ch.synced is None else encode_position(ch.synced),
                    "full_images": ch.full_images,
                }
                for ch in self.channels
            },
        }

    def start(self) -> None:
        """Start keeping the preferred peer's mirror in step (from a full image)."""
        for channel in self.channels:
            self._tasks.append(asyncio.ensure_future(channel.run()))
        if self.channels:
            self.channels[0].activate()

    async def stop(self) -> None:
        for channel in self.channels:
            channel.stopped = True  # besides the cancel, which a finishing await may absorb
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


__all__ = ["MirrorUnavailable", "MirroredCacheStore"]
