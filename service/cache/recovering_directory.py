"""The recovering home directory: `Directory` plus re-sends, duplicate suppression, the
owner's request id and persisted forwards. Why each is needed: `service/cache/recovery.py`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from service.cache.directory import RETIRED_KEY, Directory, DirEntry, QueuedMessage, _Out, _Txn
from service.cache.messages import (
    Action,
    Data,
    DirState,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    HomeMessage,
    Inv,
    PersistEntry,
    PutAck,
    PutE,
    PutM,
    PutS,
    Send,
    State,
)
from service.cache.recovering_lines import DEFAULT_RESEND_MS


@dataclass(frozen=True, slots=True)
class _Forward:
    """A forward in progress, persisted with its directory entry."""

    txn: int
    owner: str
    requester: str
    want: State
    req: int

    def fields(self) -> dict[str, str]:
        return {
            "fwd_txn": str(self.txn),
            "fwd_owner": self.owner,
            "fwd_to": self.requester,
            "fwd_want": self.want.value,
            "fwd_req": str(self.req),
        }

    @classmethod
    def parse(cls, key: str, fields: Mapping[str, str]) -> _Forward | None:
        if "fwd_txn" not in fields:
            return None
        try:
            forward = cls(
                int(fields["fwd_txn"]),
                fields["fwd_owner"],
                fields["fwd_to"],
                State(fields["fwd_want"]),
                int(fields["fwd_req"]),
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed forward in the hash of {key!r}: {exc!r}") from exc
        if forward.want not in (State.S, State.M) or not forward.owner or not forward.requester:
            raise ValueError(f"malformed forward in the hash of {key!r}: {forward}")
        return forward


class RecoveringDirectory(Directory):
    """A home directory that survives duplicates, loss and its own crash mid-transaction."""

    def __init__(
        self, node: str, *, lease_ms: int = 5_000, resend_ms: int = DEFAULT_RESEND_MS
    ) -> None:
        super().__init__(node, lease_ms=lease_ms)
        if resend_ms <= 0:
            raise ValueError("resend_ms must be positive")
        self.resend_ms = resend_ms
        self._reqs: dict[str, tuple[int, int]] = {}  # key -> (running txn, requester's req)
        self._grants: dict[str, Data] = {}  # key -> the Data granted in its running txn
        self._sent_at: dict[str, tuple[int, int]] = {}  # key -> (txn, last (re)send)
        self._owner_reqs: dict[str, int] = {}  # owned key -> req its ownership answered
        self.duplicates = 0  # repeated requests and notices ignored
        self.resent = 0

    def busy_keys(self) -> int:
        return len(self._busy)

    # ---- restart -------------------------------------------------------------------------

    def restore(self, key: str, fields: Mapping[str, str], now_ms: int) -> None:
        if key == RETIRED_KEY:
            super().restore(key, fields, now_ms)
            return
        forward = _Forward.parse(key, fields)
        try:
            owner_req = int(fields.get("owner_req", "0"))
        except ValueError as exc:
            raise ValueError(f"malformed owner_req in the hash of {key!r}") from exc
        super().restore(key, fields, now_ms)
        if owner_req and self._entries[key].state is DirState.OWNED:
            self._owner_reqs[key] = owner_req
        if forward is None:
            return
        entry = self._entries[key]
        if (
            entry.state is not DirState.OWNED
            or entry.owner != forward.owner
            or entry.txn != forward.txn
        ):
            raise ValueError(f"inconsistent forward in the directory hash of {key!r}")
        self._busy[key] = _Txn(forward.txn, forward.want, forward.requester, fwd_to=forward.owner)
        self._reqs[key] = (forward.txn, forward.req)
        self._sent_at[key] = (forward.txn, now_ms - self.resend_ms)  # re-send at once

    # ---- entry points --------------------------------------------------------------------

    def step(self, msg: HomeMessage, now_ms: int) -> list[Action]:
        key = msg.key
        running = self._busy.get(key)
        if (
            isinstance(msg, GetS | GetM)
            and running is not None
            and running.requester == msg.sender
            and self._reqs.get(key) == (running.id, msg.req)
        ):
            self.duplicates += 1  # a re-sent request for the transaction under way
            return []
        if isinstance(msg, GetS | GetM | PutS | PutE | PutM) and msg in self._queues.get(key, ()):
            self.duplicates += 1
            return []
        completes_forward = (
            isinstance(msg, FwdDone)
            and running is not None
            and running.id == msg.txn
            and running.fwd_to == msg.sender
        )
        actions = super().step(msg, now_ms)
        if completes_forward:
            assert isinstance(msg, FwdDone) and running is not None
            if msg.has_data:
                granted = State.S if running.want is State.S else State.M
                lease = self.lease_ms if granted is State.S else 0
                req = self._req_for(key, msg.txn)
                self._grants[key] = Data(
                    key, self.node, msg.txn, granted, msg.data, msg.version, lease, req
                )
            # Sent after the outcome is persisted (persists come first): the old owner
            # may now drop its hand-off record.
            actions.append(Send(msg.sender, PutAck(key, self.node, msg.txn)))
        self._note(actions)
        txn = self._busy.get(key)
        if txn is not None and self._sent_at.get(key, (None, 0))[0] != txn.id:
            self._sent_at[key] = (txn.id, now_ms)
        return actions

    def tick(self, now_ms: int) -> list[Action]:
        """Lease expiry (as the base class), then re-sends for transactions that have
        waited `resend_ms` since their last message went out."""
        actions = super().tick(now_ms)
        self._note(actions)
        for key in sorted(self._busy):
            txn = self._busy[key]
            sent = self._sent_at.get(key)
            if sent is None or sent[0] != txn.id:
                self._sent_at[key] = (txn.id, now_ms)
                continue
            if now_ms - sent[1] < self.resend_ms:
                continue
            again: list[Action] = []
            if txn.fwd_to is not None:
                req = self._req_for(key, txn.id)
                fwd: FwdGetS | FwdGetM = FwdGetM(key, self.node, txn.id, txn.requester, req)
                if txn.want is State.S:
                    fwd = FwdGetS(key, self.node, txn.id, txn.requester, self.lease_ms, req)
                again.append(Send(txn.fwd_to, fwd))
            elif txn.acks:
                again += [Send(n, Inv(key, self.node, txn.id)) for n in sorted(txn.acks)]
            elif txn.granted and txn.unblocked_at is None:
                grant = self._grants.get(key)
                if grant is not None and grant.txn == txn.id:
                    again.append(Send(txn.requester, grant))
            if again:
                self.resent += 1
                actions += again
            self._sent_at[key] = (txn.id, now_ms)
        for table in (self._sent_at, self._grants, self._reqs):
            for stale in [k for k in table if k not in self._busy]:
                del table[stale]
        return actions

    def next_deadline(self) -> int | None:
        deadlines = [at + self.resend_ms for _, at in self._sent_at.values()]
        base = super().next_deadline()
        if base is not None:
            deadlines.append(base)
        return min(deadlines) if deadlines else None

    # ---- overridden transitions ----------------------------------------------------------

    def _begin(self, entry: DirEntry, msg: QueuedMessage, now: int, out: _Out) -> None:
        if (
            isinstance(msg, GetS | GetM)
            and entry.state is DirState.OWNED
            and entry.owner == msg.sender
        ):
            owner_req = self._owner_reqs.get(entry.key, 0)
            if msg.req == owner_req:  # the owner never got its grant: the same one again
                state = State.E if isinstance(msg, GetS) else State.M
                grant = Data(
                    entry.key,
                    self.node,
                    entry.owner_txn,
                    state,
                    entry.data,
                    entry.version,
                    0,
                    msg.req,
                )
                out.send(msg.sender, grant)
                self.resent += 1
                return
            if msg.req < owner_req:
                self.duplicates += 1  # a late copy of a request answered long ago
                return
        before = entry.txn
        super()._begin(entry, msg, now, out)
        if isinstance(msg, GetS | GetM) and entry.txn != before:
            self._reqs[entry.key] = (entry.txn, msg.req)

    def _actions(self, out: _Out) -> list[Action]:
        """As the base class, plus: a running forward is persisted with its entry, and
        the grants and forwards of a transaction carry its requester's `req`."""
        actions = super()._actions(out)
        for i, action in enumerate(actions):
            if isinstance(action, PersistEntry):
                key = action.key
                if action.fields is None:  # retired: it was not owned, nothing runs
                    self._owner_reqs.pop(key, None)
                    continue
                if key == RETIRED_KEY:
                    continue
                fields = dict(action.fields)
                entry = self._entries[key]
                if entry.state is not DirState.OWNED:
                    self._owner_reqs.pop(key, None)
                elif self._reqs.get(key, (None, 0))[0] == entry.owner_txn:
                    self._owner_reqs[key] = self._reqs[key][1]  # granted by this txn
                if key in self._owner_reqs:
                    fields["owner_req"] = str(self._owner_reqs[key])
                txn = self._busy.get(key)
                if txn is not None and txn.fwd_to is not None:
                    req = self._req_for(key, txn.id)
                    forward = _Forward(txn.id, txn.fwd_to, txn.requester, txn.want, req)
                    fields.update(forward.fields())
                actions[i] = PersistEntry(key, fields)
            elif isinstance(action, Send) and isinstance(action.message, Data | FwdGetS | FwdGetM):
                message = action.message
                running = self._reqs.get(message.key)
                if (
                    running is not None
                    and running[0] == message.txn
                    and (running[1] != message.req)
                ):
                    actions[i] = Send(action.to, replace(message, req=running[1]))
        return actions

    def _granted_shared(self, txn: _Txn, now: int) -> None:
        txn.unblocked_at = now  # no Unblock comes for a shared grant (recovery.py)

    # ---- helpers -------------------------------------------------------------------------

    def _req_for(self, key: str, txn: int) -> int:
        running = self._reqs.get(key)
        return running[1] if running is not None and running[0] == txn else 0

    def _note(self, actions: list[Action]) -> None:
        """Remember the grants sent, to send them again if no Unblock comes."""
        for action in actions:
            if isinstance(action, Send) and isinstance(action.message, Data):
                self._grants[action.message.key] = action.message


__all__ = ["RecoveringDirectory"]
