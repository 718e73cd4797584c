"""The protocol vocabulary: events in, actions out (sans-IO, like h11).

The cores (`LineCache`, `Directory`) never send, store or wait; each `step()` returns a
list of actions for the runtime to carry out, in order:

    PersistLine / PersistEntry  ->  Send  ->  ReadDone / WriteDone

Persist actions always come first and must be durable before any later action runs:
a node must never tell anyone (a peer or a client) something its Redis would not
remember after kill -9. That ordering is what makes a reloaded M/E line or directory
entry trustworthy (see `lines.py` and `directory.py`).

Every message names its `key` and its `sender`. Two numbers order them:
- `txn`: the home's per-key transaction number. The home runs one transaction per key at
  a time and numbers them; every message belonging to a transaction carries its number,
  and a line remembers the number of the last transaction that touched it. A message
  whose `txn` is older than what the receiver knows is late and is dropped.
- `version`: counts the writes of a key (a version names exactly one value). Data only
  ever replaces data of a lower version.

`req` (optional, 0 when unused) is the requester's own id for one GetS/GetM, echoed by the
forward and the Data that answer it. The base cores ignore it; the recovering cores
(`recovery.py`) use it to tell the answer to the request a node has outstanding from a
grant for an older request of its (e.g. from before it restarted), which must not start
a lease.

Message flow (node -> home: requests, notices and replies; home -> node: grants and
demands):

    GetS / GetM          a node wants a readable / writable copy
    Data                 the grant: value, version, state (S/E/M) and, for S, a lease
    Unblock              the requester has installed the grant; the home may move on
    Inv -> InvAck        the home revokes a shared copy (ack carries dirty data, if any)
    FwdGetS / FwdGetM    the home asks the owner to serve a requester; the owner sends
    FwdDone              Data to the requester and FwdDone (with the value) to the home
    PutS / PutE / PutM   eviction notices (PutM carries the dirty value: a write-back)
    PutAck               the home has taken the PutE/PutM; the node may forget the line
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.cache.values import Json


class State(StrEnum):
    """A line's MESI state on one node."""

    M = "M"  # modified: the only copy, newer than the home's
    E = "E"  # exclusive: the only copy, equal to the home's; may become M silently
    S = "S"  # shared: read-only, valid until its lease ends or an Inv arrives
    I = "I"  # invalid: nothing usable (version and txn kept to spot late messages)  # noqa: E741


class DirState(StrEnum):
    """What the home knows about the copies of a key."""

    I = "I"  # no copies; the home's value is current  # noqa: E741
    S = "S"  # read-only copies at `sharers`; the home's value is current
    OWNED = "O"  # one copy in E or M at `owner`; the home's value may be stale


# ---- local events (from the node's own clients) --------------------------------------


@dataclass(frozen=True, slots=True)
class LocalRead:
    op: int  # the runtime's handle for the client request; echoed in ReadDone
    key: str


@dataclass(frozen=True, slots=True)
class LocalWrite:
    op: int
    key: str
    value: Json


@dataclass(frozen=True, slots=True)
class LocalDelete:
    op: int
    key: str


LocalOp = LocalRead | LocalWrite | LocalDelete


# ---- node -> home ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetS:
    key: str
    sender: str
    req: int = 0  # the requester's id for this request (see the module docstring)


@dataclass(frozen=True, slots=True)
class GetM:
    key: str
    sender: str
    req: int = 0


@dataclass(frozen=True, slots=True)
class PutS:
    key: str
    sender: str
    txn: int  # the grant the evicted copy came from


@dataclass(frozen=True, slots=True)
class PutE:
    key: str
    sender: str
    txn: int
    version: int


@dataclass(frozen=True, slots=True)
class PutM:
    key: str
    sender: str
    txn: int
    version: int
    data: str | None  # JSON text of the dirty value; None: the key was deleted


@dataclass(frozen=True, slots=True)
class InvAck:
    key: str
    sender: str
    txn: int
    dirty: bool = False  # the copy was M: data/version are a write-back
    data: str | None = None
    version: int = 0


@dataclass(frozen=True, slots=True)
class FwdDone:
    """The owner's answer to FwdGetS/FwdGetM, sent to the home."""

    key: str
    sender: str
    txn: int
    has_data: bool  # False: the owner had no copy left (the home serves from its own)
    data: str | None = None
    version: int = 0
    kept: bool = False  # the owner still holds a shared copy (after FwdGetS)


@dataclass(frozen=True, slots=True)
class Unblock:
    key: str
    sender: str
    txn: int


HomeMessage = GetS | GetM | PutS | PutE | PutM | InvAck | FwdDone | Unblock


# ---- home (or forwarding owner) -> node --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Data:
    key: str
    sender: str
    txn: int
    state: State  # granted state: S, E or M
    data: str | None
    version: int
    lease_ms: int = 0  # S only: how long the copy may serve reads
    req: int = 0  # the GetS/GetM this answers


@dataclass(frozen=True, slots=True)
class Inv:
    key: str
    sender: str
    txn: int


@dataclass(frozen=True, slots=True)
class FwdGetS:
    key: str
    sender: str
    txn: int
    requester: str
    lease_ms: int
    req: int = 0  # the requester's GetS, for the Data the owner sends


@dataclass(frozen=True, slots=True)
class FwdGetM:
    key: str
    sender: str
    txn: int
    requester: str
    req: int = 0


@dataclass(frozen=True, slots=True)
class PutAck:
    key: str
    sender: str
    txn: int


CacheMessage = Data | Inv | FwdGetS | FwdGetM | PutAck
Message = HomeMessage | CacheMessage
CacheInput = LocalOp | CacheMessage


# ---- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    message: Message


@dataclass(frozen=True, slots=True)
class PersistLine:
    """Write (or, with fields None, delete) this node's hash for one line."""

    node: str
    key: str
    fields: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class PersistEntry:
    """Write (or, with fields None, delete) the home's directory hash for one key."""

    key: str
    fields: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class ReadDone:
    op: int
    key: str
    found: bool  # False: the key is absent (value is then None)
    value: Json
    data: str | None  # the same value as canonical JSON text (None when absent)
    version: int
    state: State  # the line's state after the read
    hit: bool  # served from the local copy without asking the home


@dataclass(frozen=True, slots=True)
class WriteDone:
    op: int
    key: str
    version: int  # the version this write (or delete) created


Action = Send | PersistLine | PersistEntry | ReadDone | WriteDone
