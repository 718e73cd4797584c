"""The recovering node cache: `LineCache` plus re-sends, request ids, hand-off records,
txn floors and selective persistence. Why each is needed: `service/cache/recovery.py`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from service.cache.eviction import PolicyName
from service.cache.lines import Line, LineCache
from service.cache.lines import _Out as _LineOut
from service.cache.messages import (
    Action,
    CacheInput,
    Data,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    Inv,
    PersistLine,
    PutAck,
    PutE,
    PutM,
    PutS,
    Send,
    State,
    Unblock,
)
from service.cache.values import decode

DEFAULT_RESEND_MS = 1_000


@dataclass(frozen=True, slots=True)
class Handoff:
    """What an owner handed over in answer to a forward: enough to answer it again."""

    txn: int
    requester: str
    req: int
    state: State  # S (FwdGetS) or M (FwdGetM): what the requester was granted
    data: str | None
    version: int
    lease_ms: int
    kept: bool  # the owner kept a shared copy

    def messages(self, key: str, node: str, home: str) -> list[Action]:
        grant = Data(
            key, node, self.txn, self.state, self.data, self.version, self.lease_ms, self.req
        )
        done = FwdDone(key, node, self.txn, True, self.data, self.version, self.kept)
        return [Send(self.requester, grant), Send(home, done)]

    def to_fields(self) -> dict[str, str]:
        fields = {
            "h_txn": str(self.txn),
            "h_to": self.requester,
            "h_req": str(self.req),
            "h_state": self.state.value,
            "h_version": str(self.version),
            "h_lease": str(self.lease_ms),
            "h_kept": "1" if self.kept else "0",
        }
        if self.data is not None:
            fields["h_value"] = self.data
        return fields

    @classmethod
    def from_fields(cls, key: str, fields: Mapping[str, str]) -> Handoff | None:
        if "h_txn" not in fields:
            return None
        try:
            record = cls(
                int(fields["h_txn"]),
                fields["h_to"],
                int(fields["h_req"]),
                State(fields["h_state"]),
                fields.get("h_value"),
                int(fields["h_version"]),
                int(fields["h_lease"]),
                fields["h_kept"] == "1",
            )
            if record.data is not None:
                decode(record.data)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed hand-off record for {key!r}: {exc!r}") from exc
        if record.state not in (State.S, State.M) or not record.requester:
            raise ValueError(f"malformed hand-off record for {key!r}: {record}")
        return record


class RecoveringLineCache(LineCache):
    """A node's cache that survives duplicates, loss and crashes (see the module docstring).

    `req_base` must grow from one incarnation of a node to the next, by more than the
    requests any incarnation makes (the runtime uses a persisted incarnation counter
    times 2**40), so that request ids never repeat and a newer request has a larger id.
    """

    def __init__(
        self,
        node: str,
        home_of: Callable[[str], str],
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        policy: PolicyName = "lru",
        resend_ms: int = DEFAULT_RESEND_MS,
        req_base: int = 1,
    ) -> None:
        super().__init__(node, home_of, max_entries=max_entries, max_bytes=max_bytes, policy=policy)
        if resend_ms <= 0 or req_base <= 0:
            raise ValueError("resend_ms and req_base must be positive")
        self.resend_ms = resend_ms
        self._next_req = req_base
        self._reqs: dict[str, int] = {}  # key -> req of its outstanding request
        self._asked: dict[str, int] = {}  # key -> when its request was last re-sent
        self._handoffs: dict[str, Handoff] = {}
        self._put_sent: dict[str, int] = {}  # evicting key -> when PutE/PutM last went out
        self._floors: dict[str, int] = {}  # removed line -> the last txn it had seen
        self._on_disk: set[str] = set()  # keys whose persisted line must be kept current
        self._unneeded_on_disk: set[str] = set()  # restored hashes `recover` deletes
        self.persists_skipped = 0
        self.resent = 0  # requests, notices and hand-offs sent again
        self.evictions = 0  # lines evicted for capacity (eviction notices sent)
        self.write_backs = 0  # modified values sent home (PutM, dirty InvAck, FwdDone)
        self.unmatched = 0  # shared grants that answered no outstanding request

    # ---- queries -------------------------------------------------------------------------

    def handoff(self, key: str) -> Handoff | None:
        return self._handoffs.get(key)

    def floor(self, key: str) -> int | None:
        """The txn a removed line had reached (None while the line is held, or never was)."""
        return self._floors.get(key)

    def floors_kept(self) -> int:
        """Removed lines whose txn is kept (keys with a request outstanding)."""
        return len(self._floors)

    def outstanding(self) -> int:
        """Keys with a request or an eviction notice awaiting the home."""
        waiting = sum(1 for p in self._pending.values() if p.request is not None)
        return waiting + len(self._evicting)

    # ---- restart -------------------------------------------------------------------------

    def restore(self, key: str, fields: Mapping[str, str]) -> None:
        record = Handoff.from_fields(key, fields)
        super().restore(key, fields)
        if record is not None:
            self._handoffs[key] = record
        if _must_persist(fields):
            self._on_disk.add(key)
        else:
            self._unneeded_on_disk.add(key)

    def recover(self) -> list[Action]:
        """After restoring: delete the hashes a restart does not need (S and I lines
        written by versions that kept them), and answer again every forward whose
        hand-over was persisted but whose Data/FwdDone may have died with the process.
        Duplicates are dropped."""
        actions: list[Action] = [
            PersistLine(self.node, key, None) for key in sorted(self._unneeded_on_disk)
        ]
        self._unneeded_on_disk.clear()
        for key in sorted(self._handoffs):
            actions += self._handoffs[key].messages(key, self.node, self.home_of(key))
        return actions

    # ---- entry points --------------------------------------------------------------------

    def step(self, event: CacheInput, now_ms: int) -> list[Action]:
        if isinstance(event, Data | Inv | FwdGetS | FwdGetM | PutAck):
            record = self._handoffs.get(event.key)
            # A later transaction reaching us means the home finished (and persisted) the
            # one the record answers: it will not ask again.
            if record is not None and event.txn > record.txn:
                del self._handoffs[event.key]
                self._forget(event.key, record.txn)
        actions = [
            kept for a in super().step(event, now_ms) if (kept := self._to_persist(a)) is not None
        ]
        for i, action in enumerate(actions):
            if not isinstance(action, Send):
                continue
            message = action.message
            if isinstance(message, GetS | GetM):  # the base cache issues a new request
                self._reqs[message.key] = self._next_req
                actions[i] = Send(action.to, replace(message, req=self._next_req))
                self._next_req += 1
            elif isinstance(message, PutS | PutE | PutM):
                self.evictions += 1
                if isinstance(message, PutE | PutM):
                    self._put_sent[message.key] = now_ms
            if isinstance(message, PutM) or getattr(message, "dirty", False):
                self.write_backs += 1
        return actions

    def tick(self, now_ms: int) -> list[Action]:
        """Re-send requests and eviction notices outstanding for `resend_ms` or more;
        drop the txn floors no longer needed."""
        self._drop_floors()
        actions: list[Action] = []
        for key in sorted(self._pending):
            pending = self._pending[key]
            if pending.request is None:
                continue
            last = max(pending.sent_ms, self._asked.get(key, 0))
            if now_ms - last < self.resend_ms:
                continue
            req = self._reqs.get(key, 0)
            request: GetS | GetM = GetS(key, self.node, req)
            if pending.request is State.M:
                request = GetM(key, self.node, req)
            actions.append(Send(self.home_of(key), request))
            self._asked[key] = now_ms
            self.resent += 1
        for stale in [k for k in self._reqs if k not in self._pending]:
            del self._reqs[stale]
        for stale in [k for k in self._asked if k not in self._pending]:
            del self._asked[stale]
        for key in sorted(self._evicting):
            line = self._evicting[key]
            last_put = self._put_sent.get(key)
            if last_put is not None and now_ms - last_put < self.resend_ms:
                continue
            notice: PutE | PutM = PutE(key, self.node, line.txn, line.version)
            if line.state is State.M:
                notice = PutM(key, self.node, line.txn, line.version, line.data)
            actions.append(Send(self.home_of(key), notice))
            self._put_sent[key] = now_ms
            self.resent += 1
        for stale in [k for k in self._put_sent if k not in self._evicting]:
            del self._put_sent[stale]
        return actions

    # ---- overridden transitions ----------------------------------------------------------

    def _on_data(self, msg: Data, now: int, out: _LineOut) -> None:
        key = msg.key
        seen = self._seen(key)
        if seen is not None and msg.txn <= seen:
            self.stale_dropped += 1
            if msg.txn == seen:
                # Our grant again: the home (or owner) did not hear our Unblock. Only the
                # requester of a transaction gets its Data, so this line took it already.
                out.send(self.home_of(key), Unblock(key, self.node, msg.txn))
            return
        pending = self._pending.get(key)
        answers = (
            msg.req != 0
            and pending is not None
            and pending.request is not None
            and self._reqs.get(key) == msg.req
        )
        held = self._lines.get(key)
        exclusive = key in self._evicting or (held is not None and held.state in (State.M, State.E))
        if not answers and not exclusive:
            # Acknowledge an exclusive grant (the home waits for that); keep nothing
            # that could serve.
            self.unmatched += 1
            version = max(msg.version, held.version if held is not None else 0)
            self._store(Line(key, State.I, None, version, msg.txn))
            out.dirty.add(key)
            if self._home_awaits_unblock(msg):
                out.send(self.home_of(key), Unblock(key, self.node, msg.txn))
            return
        super()._on_data(msg, now, out)

    def _home_awaits_unblock(self, msg: Data) -> bool:
        # Not for a shared grant (recovery.py). So a shared grant that arrives after its
        # lease serves nothing: the home may have dropped us without an Inv and let a
        # write complete since.
        return msg.state is not State.S

    def _on_inv(self, msg: Inv, out: _LineOut) -> None:
        known = self._seen(msg.key)
        super()._on_inv(msg, out)
        if msg.key not in self._lines and (known is None or known < msg.txn):
            # Acked with no copy here: an older grant still in flight is now stale.
            self._forget(msg.key, msg.txn)
            out.dirty.add(msg.key)

    def _on_fwd(self, msg: FwdGetS | FwdGetM, now: int, out: _LineOut) -> None:
        key = msg.key
        record = self._handoffs.get(key)
        if record is not None and record.txn >= msg.txn:
            if record.txn == msg.txn:  # a repeated forward: the same answer again
                out.sends += record.messages(key, self.node, self.home_of(key))
                self.resent += 1
            else:
                self.stale_dropped += 1
            return
        seen = self._seen(key)
        if seen is not None and seen >= msg.txn:
            if seen == msg.txn:
                # We answered this forward with "nothing here" (a hand-over would have
                # left a record): say so again, the first answer may be what was lost.
                out.send(self.home_of(key), FwdDone(key, self.node, msg.txn, has_data=False))
                self.resent += 1
            else:
                self.stale_dropped += 1  # the home finished that transaction long ago
            return
        line = self._lines.get(key)
        if key not in self._evicting and line is not None and line.state is State.S:
            # The home thinks we own the key, but our grant never arrived (a home restart
            # let the next transaction overtake it): a shared copy is no hand-over, and
            # the home's value is at least as new. It must stop serving, too: the home
            # does not count it as a sharer.
            self._store(replace(line, state=State.I, data=None, lease_until=0, txn=msg.txn))
            out.dirty.add(key)
            out.send(self.home_of(key), FwdDone(key, self.node, msg.txn, has_data=False))
            return
        dirty = (self._evicting.get(key) or line or Line(key, State.I)).state is State.M
        first = len(out.sends)
        super()._on_fwd(msg, now, out)
        grant = done = None
        for i in range(first, len(out.sends)):
            action = out.sends[i]
            if not isinstance(action, Send):
                continue
            if isinstance(action.message, Data) and action.to == msg.requester:
                grant = replace(action.message, req=msg.req)
                out.sends[i] = Send(action.to, grant)
            elif isinstance(action.message, FwdDone):
                done = action.message
        if grant is not None and done is not None and done.has_data:
            self.write_backs += dirty  # the FwdDone carries the modified value home
            self._handoffs[key] = Handoff(
                msg.txn,
                msg.requester,
                msg.req,
                grant.state,
                grant.data,
                grant.version,
                grant.lease_ms,
                done.kept,
            )
            out.dirty.add(key)
        elif key not in self._lines and key not in self._evicting:
            # "Nothing here" for txn t also means "no grant older than t is coming": one
            # still in flight (from before a home restart) must not be installed later.
            self._forget(key, msg.txn)
            out.dirty.add(key)
        elif (line := self._lines.get(key)) is not None and line.txn < msg.txn:
            self._store(replace(line, txn=msg.txn))
            out.dirty.add(key)

    def _on_put_ack(self, msg: PutAck, now: int, out: _LineOut) -> None:
        record = self._handoffs.get(msg.key)
        if record is not None and record.txn == msg.txn:
            del self._handoffs[msg.key]  # the home has the hand-over durably
            self._forget(msg.key, record.txn)
            out.dirty.add(msg.key)
            return
        buffered = self._evicting.get(msg.key)
        super()._on_put_ack(msg, now, out)
        if buffered is not None and msg.key not in self._evicting:
            self._forget(msg.key, buffered.txn)  # the buffer is gone: keep its txn

    # ---- bookkeeping ---------------------------------------------------------------------

    def _to_persist(self, action: Action) -> Action | None:
        """What of `action` reaches the disk: only what a restart needs (an owned or
        evicting line, or a hand-off record) is kept there. Anything else replacing such a
        hash on disk deletes it instead; otherwise it is not written at all."""
        if not isinstance(action, PersistLine):
            return action
        if action.fields is not None and _must_persist(action.fields):
            self._on_disk.add(action.key)
            return action
        if action.key in self._on_disk:
            self._on_disk.discard(action.key)
            return action if action.fields is None else replace(action, fields=None)
        self.persists_skipped += 1
        return None

    def _store(self, line: Line, *, used: bool = False) -> None:
        self._floors.pop(line.key, None)  # the line itself carries its txn again
        super()._store(line, used=used)

    def _remove(self, key: str) -> Line:
        line = super()._remove(key)
        self._forget(key, line.txn)
        return line

    def _seen(self, key: str) -> int | None:
        """The newest txn this node knows of for `key` (line, buffer or floor)."""
        line = self._lines.get(key)
        buffered = self._evicting.get(key)
        record = self._handoffs.get(key)
        known = [
            self._floors.get(key),
            line.txn if line is not None else None,
            buffered.txn if buffered is not None else None,
            record.txn if record is not None else None,
        ]
        txns = [t for t in known if t is not None]
        return max(txns) if txns else None

    def _forget(self, key: str, txn: int) -> None:
        # Only a key with a request outstanding needs its floor (recovery.py, "Txn floors
        # last while a request is outstanding"): a grant can be installed only if it
        # answers that request, and any later request has a new req id.
        if key not in self._lines and self._awaiting(key):
            self._floors[key] = max(txn, self._floors.get(key, 0))

    def _awaiting(self, key: str) -> bool:
        pending = self._pending.get(key)
        return pending is not None and pending.request is not None

    def _drop_floors(self) -> None:
        """Drop the floors of keys whose request has ended (floors never reach the disk)."""
        for key in [k for k in self._floors if not self._awaiting(k)]:
            del self._floors[key]

    def _fields(self, key: str) -> dict[str, str] | None:
        fields = super()._fields(key)
        record = self._handoffs.get(key)
        if fields is None:
            floor = self._floors.get(key)
            if floor is None and record is None:
                return None
            # The line is gone: an I tombstone keeps its txn (and any hand-off record).
            txn = max(floor or 0, record.txn if record is not None else 0)
            fields = {"state": State.I.value, "version": "0", "txn": str(txn)}
        if record is None:
            return fields
        return {**fields, **record.to_fields()}


def _must_persist(fields: Mapping[str, str]) -> bool:
    """A line hash a restart needs: an owned or evicting line, or a hand-off record."""
    return fields.get("state") in ("E", "M") or "evicting" in fields or "h_txn" in fields


__all__ = ["DEFAULT_RESEND_MS", "Handoff", "RecoveringLineCache"]
