"""A node's local cache: MESI lines, capacity, eviction, and the node's side of the protocol.

Pure and deterministic: `step(event, now_ms)` takes a local client operation or a protocol
message and returns actions (see `messages.py`); time only ever arrives as `now_ms`.

Design choices, and why:
- One request per key in flight. Local operations on a key queue FIFO behind an
  outstanding GetS/GetM (or an unacknowledged PutE/PutM), so a client's operations on a
  key take effect in the order it issued them and the home never sees two requests from
  one node for one key at once.
- Versions count writes, and the writer counts. The home serialises ownership: only the
  node it granted M (or E) may write, so that node alone numbers writes
  (`version + 1` per write, including repeated silent writes while it stays M). The
  home's grant is what makes the number unique; a version therefore names one value,
  and the checker can compare reads to writes by version.
- Shared copies are leases. An S line serves reads only while `now_ms < lease_until`,
  and the lease is counted from when this node *sent* its GetS; the home counts the same
  lease from when it heard the Unblock, which is later. So when the home gives up on a
  silent sharer (its lease over on the home's clock), the sharer's copy has already
  stopped serving, even if the Inv is still in the network; this only assumes the
  clocks tick at the same rate, not that they agree. An S copy handed over by a
  downgrading owner (FwdGetS) counts from the forward's arrival (the home counts from the
  FwdDone, again later).
- Evicting E/M keeps the line in an eviction buffer until the home's PutAck: until then
  the home may still forward a request here, and the buffer answers it.
- Late messages are recognised by `txn`/`version` and dropped (see `messages.py`); an
  Inv for a copy we no longer have is still acknowledged, because the home may be
  waiting for it. A Data with a newer txn is always taken and Unblocked (the home is
  waiting for it; it can cross our own eviction, or answer a request sent before a
  restart), but its value never replaces a newer one we hold.
- Ops queued before a grant arrives are served by that grant even if its lease has
  already run out: the value was current when the home granted it, which was after
  those reads began, so they are not stale. Later reads need a live lease.
- Restart rule (`Line.from_hash`): E and M lines come back as they were; S lines come
  back as I. While the home records this node as owner it lets nobody else write, and
  ownership only leaves by a forward this node answered after persisting the hand-over
  (persist actions precede sends), so a reloaded owner line is never stale and an M line
  may hold the only copy of an acknowledged write, which must not be thrown away. An S
  line's lease was measured on a clock that did not survive the restart, so it is
  dropped; its version and txn are kept so late messages are still recognised.
- Capacity counts entries (I lines included: they remember versions, and are evicted
  first) and bytes (JSON size of the values).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from service.cache.eviction import PolicyName, make_policy
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
    InvAck,
    LocalDelete,
    LocalOp,
    LocalRead,
    LocalWrite,
    Message,
    PersistLine,
    PutAck,
    PutE,
    PutM,
    PutS,
    ReadDone,
    Send,
    State,
    Unblock,
    WriteDone,
)
from service.cache.values import decode, encode, size

VALID = (State.M, State.E, State.S)


@dataclass(frozen=True, slots=True)
class Line:
    key: str
    state: State
    data: str | None = None  # JSON text; None: absent key (or no data, in state I)
    version: int = 0
    txn: int = 0  # the home transaction that last touched this copy
    lease_until: int = 0  # S only, on this node's clock; never persisted
    evicting: bool = False  # an evicted E/M line awaiting the home's PutAck

    @property
    def size(self) -> int:
        return size(self.data)

    def to_hash(self) -> dict[str, str]:
        """The Redis hash mirroring this line (`dsync:cache:line:<key>` in the node's own
        Redis; see store.py)."""
        fields = {"state": self.state.value, "version": str(self.version), "txn": str(self.txn)}
        if self.data is not None and self.state is not State.I:
            fields["value"] = self.data
        if self.evicting:
            fields["evicting"] = "1"
        return fields

    @classmethod
    def from_hash(cls, key: str, fields: Mapping[str, str]) -> Line:
        """Reload a line after a restart. S comes back as I (see the module docstring)."""
        try:
            state = State(fields["state"])
            version = int(fields["version"])
            txn = int(fields["txn"])
            data = fields.get("value")
            evicting = fields.get("evicting", "0") == "1"
            if data is not None:
                decode(data)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed cache line hash for {key!r}: {exc!r}") from exc
        if version < 0 or txn < 0:
            raise ValueError(f"malformed cache line hash for {key!r}: negative version/txn")
        if evicting and state not in (State.M, State.E):
            raise ValueError(f"malformed cache line hash for {key!r}: evicting {state} line")
        if state in (State.S, State.I):
            return cls(key, State.I, None, version, txn)
        return cls(key, state, data, version, txn, evicting=evicting)


@dataclass(slots=True)
class _Op:
    op: int
    key: str
    write: bool
    data: str | None = None  # for writes: the new value (None deletes)


@dataclass(slots=True)
class _Pending:
    ops: deque[_Op] = field(default_factory=deque)
    request: State | None = None  # S (GetS) or M (GetM) outstanding
    sent_ms: int = 0


@dataclass(frozen=True, slots=True)
class CacheStats:
    max_entries: int
    max_bytes: int
    entries: int
    bytes: int
    hits: int
    misses: int
    by_state: dict[str, int]

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class _Out:
    """Collects one step's effects and orders them: persists, then sends, then replies."""

    def __init__(self) -> None:
        self.dirty: set[str] = set()
        self.sends: list[Action] = []
        self.replies: list[Action] = []

    def send(self, to: str, message: Message) -> None:
        self.sends.append(Send(to, message))


class LineCache:
    def __init__(
        self,
        node: str,
        home_of: Callable[[str], str],
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        policy: PolicyName = "lru",
    ) -> None:
        if max_entries < 1 or max_bytes < 0:
            raise ValueError("cache capacity must be at least one entry and zero bytes")
        self.node = node
        self.home_of = home_of
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lines: dict[str, Line] = {}
        self._evicting: dict[str, Line] = {}
        self._pending: dict[str, _Pending] = {}
        self._policy = make_policy(policy)
        self._invalid: dict[str, None] = {}  # I lines, oldest first: evicted before others
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.stale_dropped = 0  # messages discarded as late (older txn or version)

    # ---- queries -------------------------------------------------------------------------

    def line(self, key: str) -> Line | None:
        """The line for `key` (an evicting one included), as stored; None if none."""
        return self._lines.get(key) or self._evicting.get(key)

    def state(self, key: str, now_ms: int) -> State:
        """The state that counts for coherence: an S line past its lease is I, and an
        evicting line (which serves nothing) is I."""
        line = self._lines.get(key)
        if line is None:
            return State.I
        if line.state is State.S and now_ms >= line.lease_until:
            return State.I
        return line.state

    def states(self, now_ms: int) -> dict[str, State]:
        return {key: self.state(key, now_ms) for key in sorted(self._lines)}

    def lines(self) -> Iterator[Line]:
        yield from (self._lines[k] for k in sorted(self._lines))
        yield from (self._evicting[k] for k in sorted(self._evicting))

    def pending_keys(self) -> list[str]:
        return sorted(self._pending)

    def stats(self, now_ms: int) -> CacheStats:
        by_state = {s.value: 0 for s in State}
        for key in self._lines:
            by_state[self.state(key, now_ms).value] += 1
        return CacheStats(
            self.max_entries,
            self.max_bytes,
            len(self._lines),
            self._bytes,
            self.hits,
            self.misses,
            by_state,
        )

    # ---- restart -------------------------------------------------------------------------

    def restore(self, key: str, fields: Mapping[str, str]) -> None:
        """Load one persisted line at start (capacity is enforced from the next step)."""
        line = Line.from_hash(key, fields)
        if line.evicting:
            self._evicting[key] = line
        else:
            self._store(line, used=True)

    # ---- the one entry point -------------------------------------------------------------

    def step(self, event: CacheInput, now_ms: int) -> list[Action]:
        out = _Out()
        match event:
            case LocalRead() | LocalWrite() | LocalDelete():
                self._local(event, now_ms, out)
            case Data():
                self._on_data(event, now_ms, out)
            case Inv():
                self._on_inv(event, out)
            case FwdGetS() | FwdGetM():
                self._on_fwd(event, now_ms, out)
            case PutAck():
                self._on_put_ack(event, now_ms, out)
        self._make_room(out, spare=event.key)
        persists: list[Action] = [
            PersistLine(self.node, key, self._fields(key)) for key in sorted(out.dirty)
        ]
        return persists + out.sends + out.replies

    # ---- local operations ----------------------------------------------------------------

    def _local(self, event: LocalOp, now: int, out: _Out) -> None:
        if isinstance(event, LocalRead):
            op = _Op(event.op, event.key, write=False)
        elif isinstance(event, LocalWrite):
            op = _Op(event.op, event.key, write=True, data=encode(event.value))
        else:
            op = _Op(event.op, event.key, write=True, data=None)
        key = op.key
        line = self._lines.get(key)
        idle = key not in self._pending and key not in self._evicting
        if idle and line is not None and self._serve(op, line, now, out, hit=True, granted=False):
            self.hits += 1
            return
        self.misses += 1
        self._pending.setdefault(key, _Pending()).ops.append(op)
        self._run(key, now, out, granted=False)

    def _serve(self, op: _Op, line: Line, now: int, out: _Out, *, hit: bool, granted: bool) -> bool:
        """Complete `op` from `line` if its state allows; False if the home must be asked."""
        if not op.write:
            usable = line.state in (State.M, State.E) or (
                line.state is State.S and (granted or now < line.lease_until)
            )
            if not usable:
                return False
            self._policy.touch(line.key)
            value = None if line.data is None else decode(line.data)
            out.replies.append(
                ReadDone(
                    op.op,
                    line.key,
                    line.data is not None,
                    value,
                    line.data,
                    line.version,
                    line.state,
                    hit,
                )
            )
            return True
        if line.state not in (State.M, State.E):
            return False
        written = replace(line, state=State.M, data=op.data, version=line.version + 1)
        self._store(written, used=True)
        out.dirty.add(line.key)
        out.replies.append(WriteDone(op.op, line.key, written.version))
        return True

    def _run(self, key: str, now: int, out: _Out, *, granted: bool) -> None:
        """Serve queued ops on `key` in order until one needs the home; then ask it."""
        pending = self._pending.get(key)
        if pending is None:
            return
        while pending.ops:
            if key in self._evicting or pending.request is not None:
                return
            op = pending.ops[0]
            line = self._lines.get(key)
            if line is not None and self._serve(op, line, now, out, hit=False, granted=granted):
                pending.ops.popleft()
                continue
            pending.request = State.M if op.write else State.S
            pending.sent_ms = now
            home = self.home_of(key)
            out.send(home, GetM(key, self.node) if op.write else GetS(key, self.node))
            return
        del self._pending[key]

    # ---- protocol messages ---------------------------------------------------------------

    def _on_data(self, msg: Data, now: int, out: _Out) -> None:
        key = msg.key
        held = self._lines.get(key) or self._evicting.get(key)
        if held is not None and msg.txn <= held.txn:
            self.stale_dropped += 1
            return  # a late reply: this copy has already seen a later transaction
        # A newer txn is a grant the home is waiting on (Unblock), so it is always taken,
        # even when it crosses our own eviction (a request sent before a restart of ours
        # can get there late): a buffered copy comes back into the cache with it.
        if self._evicting.pop(key, None) is not None:
            out.dirty.add(key)
        pending = self._pending.get(key)
        if held is not None and msg.version < held.version:
            # ...but its value is older than ours, so ours stays (the home re-granted
            # ownership we already hold, from its older value).
            self.stale_dropped += 1
            ours = held.state in (State.M, State.E) and msg.state in (State.M, State.E)
            installed = (
                replace(held, txn=msg.txn, evicting=False)
                if ours
                else replace(held, state=State.I, data=None, txn=msg.txn, lease_until=0)
            )
        else:
            lease_until = 0
            if msg.state is State.S:
                asked = pending is not None and pending.request is State.S
                # No GetS of ours outstanding (e.g. we restarted): we cannot date the
                # lease, so the copy arrives already expired and only serves queued ops.
                lease_until = pending.sent_ms + msg.lease_ms if asked and pending else now
            installed = Line(key, msg.state, msg.data, msg.version, msg.txn, lease_until)
        self._store(installed, used=True)
        out.dirty.add(key)
        awaited = self._home_awaits_unblock(msg)
        if awaited:
            out.send(self.home_of(key), Unblock(key, self.node, msg.txn))
        if pending is not None:
            # A grant answers our request if it gives at least what we asked for (an
            # older S grant, e.g. for a request from before a restart, does not).
            if pending.request is State.S or msg.state in (State.E, State.M):
                pending.request = None
            self._run(key, now, out, granted=awaited)

    def _home_awaits_unblock(self, msg: Data) -> bool:
        """Whether the home holds the key's next transaction until this grant's Unblock:
        here always (RecoveringLineCache: not for shared grants). Only such a grant serves
        the ops queued for it even past its lease, since no later write can have completed
        before it arrived (see the module docstring)."""
        return True

    def _on_inv(self, msg: Inv, out: _Out) -> None:
        key = msg.key
        line = self._lines.get(key)
        known = line or self._evicting.get(key)
        if known is not None and known.txn > msg.txn:
            self.stale_dropped += 1
            return  # granted again after this Inv was sent: it is not for this copy
        ack = InvAck(key, self.node, msg.txn)
        if line is not None:
            if line.state is State.M:
                ack = InvAck(key, self.node, msg.txn, True, line.data, line.version)
            self._store(replace(line, state=State.I, data=None, lease_until=0, txn=msg.txn))
            out.dirty.add(key)
        out.send(self.home_of(key), ack)

    def _on_fwd(self, msg: FwdGetS | FwdGetM, now: int, out: _Out) -> None:
        key = msg.key
        home = self.home_of(key)
        buffered = self._evicting.get(key)
        source = buffered or self._lines.get(key)
        if source is not None and source.txn > msg.txn:
            self.stale_dropped += 1
            return  # a forward from before our latest grant
        if source is None or source.state is State.I:
            # Nothing left to hand over (lost in a crash before it was persisted): the
            # home serves the requester from its own value.
            out.send(home, FwdDone(key, self.node, msg.txn, has_data=False))
            return
        shared = isinstance(msg, FwdGetS)
        lease_ms = msg.lease_ms if isinstance(msg, FwdGetS) else 0
        grant = State.S if shared else State.M
        kept = False
        if buffered is not None:
            del self._evicting[key]
        elif shared:
            kept = True
            self._store(replace(source, state=State.S, txn=msg.txn, lease_until=now + lease_ms))
        else:
            self._store(replace(source, state=State.I, data=None, lease_until=0, txn=msg.txn))
        out.dirty.add(key)
        out.send(
            msg.requester,
            Data(key, self.node, msg.txn, grant, source.data, source.version, lease_ms),
        )
        out.send(
            home,
            FwdDone(key, self.node, msg.txn, True, source.data, source.version, kept=kept),
        )
        if buffered is not None:
            self._run(key, now, out, granted=False)  # ops stalled on the eviction

    def _on_put_ack(self, msg: PutAck, now: int, out: _Out) -> None:
        buffered = self._evicting.get(msg.key)
        if buffered is None or buffered.txn != msg.txn:
            self.stale_dropped += 1
            return  # the buffer already went to a forward, or this ack is for another one
        del self._evicting[msg.key]
        out.dirty.add(msg.key)
        self._run(msg.key, now, out, granted=False)

    # ---- capacity ------------------------------------------------------------------------

    def _make_room(self, out: _Out, spare: str) -> None:
        while len(self._lines) > self.max_entries or self._bytes > self.max_bytes:
            key = next(iter(self._invalid), None)
            if key is None:
                key = self._policy.victim(spare)
            if key is None:
                return
            self._evict(key, out)

    def _evict(self, key: str, out: _Out) -> None:
        line = self._remove(key)
        out.dirty.add(key)
        home = self.home_of(key)
        if line.state is State.M:
            self._evicting[key] = replace(line, evicting=True)
            out.send(home, PutM(key, self.node, line.txn, line.version, line.data))
        elif line.state is State.E:
            self._evicting[key] = replace(line, evicting=True)
            out.send(home, PutE(key, self.node, line.txn, line.version))
        elif line.state is State.S:
            out.send(home, PutS(key, self.node, line.txn))

    # ---- bookkeeping ---------------------------------------------------------------------

    def _store(self, line: Line, *, used: bool = False) -> None:
        key = line.key
        old = self._lines.get(key)
        if old is not None:
            self._bytes -= old.size
        self._lines[key] = line
        self._bytes += line.size
        if line.state is State.I:
            self._policy.discard(key)
            self._invalid.pop(key, None)
            self._invalid[key] = None
        else:
            self._invalid.pop(key, None)
            if used or old is None or old.state is State.I:
                self._policy.touch(key)

    def _remove(self, key: str) -> Line:
        line = self._lines.pop(key)
        self._bytes -= line.size
        self._invalid.pop(key, None)
        self._policy.discard(key)
        return line

    def _fields(self, key: str) -> dict[str, str] | None:
        line = self._lines.get(key) or self._evicting.get(key)
        return None if line is None else line.to_hash()
