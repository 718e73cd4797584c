"""MESI-coherent cache: pure, deterministic protocol cores (no I/O, no clock, no asyncio).

`lines.LineCache` is one node's cache, `directory.Directory` the home's per-key directory,
`messages` the events and actions between them and the runtime, `eviction` the LRU/LFU
policies, `values` the JSON value encoding, and `checker.HistoryChecker` the coherence
checker the tests run over recorded histories.

`recovery` (RecoveringLineCache, RecoveringDirectory) extends both cores for a real
network and kill -9: re-sends, request ids, hand-off records, persisted forwards, txn
floors. The runtime that drives them is `service.CacheService` (with `pipeline` for the
persist -> send -> reply order, `links` for peer messages, `wire` for their encoding,
`store` for Redis, `mirrored` and `mirror_store` for the copies of each node's store on
its peers, `starts` for the Raft record of which caches ever started, `report` for what
it shows); routes are in service/api/cache.py.

The protocol at a glance (details and reasons in `lines.py` and `directory.py`):

Node (LineCache), by line state:
    I    read: GetS (ops queue)  write: GetM  Inv: InvAck  Fwd*: FwdDone(no data)
         evicted first, silently
    S    read: hit while the lease lasts, then as I  write: GetM  Inv: -> I, InvAck
         evict: PutS  Data(M): -> M (upgrade)
    E    read: hit  write: -> M silently (version + 1)  Inv: -> I, InvAck
         FwdGetS: -> S, Data(S) to requester, FwdDone(value) to home
         FwdGetM: -> I, Data(M) to requester, FwdDone(value) to home  evict: PutE
    M    as E, but write: version + 1; Inv: InvAck with the dirty value;
         FwdGetS/FwdGetM: FwdDone carries the write-back; evict: PutM(value)
    evicting E/M (buffer until PutAck): ops wait; Fwd* answered from the buffer
    any  Data: install the grant, Unblock (the recovering node: for E/M grants only),
         serve queued ops; late Data/Inv/Fwd/PutAck (older txn) dropped; a grant's
         value never replaces a newer one

Home (Directory), by entry state, when idle (busy: GetS/GetM/Put* queue FIFO):
    I      GetS: Data(E)  GetM: Data(M)
    S      GetS: Data(S, lease), or Data(E) if no other live sharer
           GetM: Inv to other live sharers; Data(M) after every InvAck or lease end
           PutS (same grant): drop the sharer
    OWNED  GetS: FwdGetS to owner -> S {requester, owner}; GetM: FwdGetM -> new owner
           (owner had nothing: serve from the home's value)
           PutE/PutM (same grant): -> I, take the write-back; PutAck (always)
    busy   InvAck / FwdDone / Unblock of the running txn advance it; others dropped
           (the recovering home ends a shared grant's txn without an Unblock)
"""

from service.cache.checker import HistoryChecker, Violation
from service.cache.directory import Directory, DirEntry
from service.cache.lines import CacheStats, Line, LineCache
from service.cache.messages import (
    Action,
    CacheInput,
    CacheMessage,
    Data,
    DirState,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    HomeMessage,
    Inv,
    InvAck,
    LocalDelete,
    LocalOp,
    LocalRead,
    LocalWrite,
    Message,
    PersistEntry,
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

__all__ = [
    "Action",
    "CacheInput",
    "CacheMessage",
    "CacheStats",
    "Data",
    "DirEntry",
    "DirState",
    "Directory",
    "FwdDone",
    "FwdGetM",
    "FwdGetS",
    "GetM",
    "GetS",
    "HistoryChecker",
    "HomeMessage",
    "Inv",
    "InvAck",
    "Line",
    "LineCache",
    "LocalDelete",
    "LocalOp",
    "LocalRead",
    "LocalWrite",
    "Message",
    "PersistEntry",
    "PersistLine",
    "PutAck",
    "PutE",
    "PutM",
    "PutS",
    "ReadDone",
    "Send",
    "State",
    "Unblock",
    "Violation",
    "WriteDone",
]
