"""Crash and message-loss recovery for the MESI cores: what a real network and kill -9 need.

The base cores (`lines.LineCache`, `directory.Directory`) assume every message is
delivered exactly once and that a home restarts only between transactions. A real cluster
breaks both: an HTTP batch is re-sent after a timeout (duplicates), a node killed -9
loses what it had not sent yet and what it had received but not persisted (loss), and a
home can die in the middle of any transaction. These subclasses add what that takes. They
add no message types (only the optional `req` field, see `messages.py`), and the base
classes, their tests and the seeded simulation are unchanged. The fault-injecting
simulation (tests/cache/faulty_sim.py) found each of the holes closed below.

Re-sends, every `resend_ms` while something is outstanding (`tick`):
- a node re-sends its outstanding GetS/GetM (a crashed home forgot it) and PutE/PutM
  while an eviction buffer waits for its PutAck;
- a home re-sends, for the transaction running on a key, the forward to the owner (no
  FwdDone yet), the Inv to every sharer that has not acked, or an exclusive grant (Data)
  while no Unblock has arrived.

Idempotence, so that re-sends and duplicates are harmless:
- Requests carry a `req` id, echoed by the answer. The home ignores a request whose
  transaction is already running, and any request or notice identical to one queued.
- A Data for the transaction a line already has (same txn) is answered with Unblock
  again (the first Unblock may be what was lost) instead of being dropped silently.
- A grant that does not answer the request outstanding now (a duplicate, or the answer
  to a request from before a restart) is acknowledged but not installed. An S copy's
  lease would be dated from the wrong request (the home may have started counting it,
  or restarted and counted it from its restart, long before); and an E/M copy taken
  that way would break what the home relies on below: that the owner's copy came from
  the owner's latest request. The home then names as owner a node with nothing, which
  answers a forward with "nothing here", and the home serves its own value, which is
  current since nobody wrote. (A node that already holds the exclusive copy keeps it,
  with the new txn, as in the base cache.)
- Forwards are the dangerous duplicate. An owner that hands its copy over keeps a durable
  *hand-off record* (txn, requester, req, granted state, value, version, lease): a repeated
  forward of that txn is answered again from it, with the same value. Without the record a
  repeated FwdGetM would find the line already I and answer "nothing here", the home
  would grant its own older value, and an acknowledged write would be lost. The record
  is persisted with the hand-over, before the Data goes out, and `recover()` re-sends it
  after a restart, so a value being handed over never lives only in memory. The home
  sends PutAck(txn) to the old owner once the FwdDone's outcome is persisted; that, or
  any later transaction reaching the line (which implies it), drops the record.
- The home remembers (durably) which request made the current owner the owner. If the
  owner asks again with that same req, its grant was lost (say, with a crashed home):
  the same grant is sent again, same txn and value. An older req is a late duplicate
  and is ignored. Only a newer req means the owner really lost its copy (it restarted
  before persisting it) and gets a new grant. The base directory would answer all
  three with a new grant; if that one were lost too, the owner's later write-back
  would carry the older txn, be refused as stale, and an acknowledged write would be
  lost. This needs request ids that grow across a node's restarts (`req_base`).
- A home persists a running forward (owner, requester, kind, req) with the directory
  entry, and a restarted home resumes waiting for that FwdDone, re-sending the forward,
  instead of forgetting it: otherwise its entry would still name the old owner while the
  requester may already hold the copy, and two nodes could end up writing.

Shared grants end their transaction at once. The recovering home does not wait for the
Unblock of a shared grant (a Data(S), from the home or from a downgrading owner): the
transaction ends when the grant is sent or the owner's FwdDone arrives, and the node
sends no Unblock for it. On the cache benchmark about one message in eight was such an
Unblock, and the key's next request no longer waits for it: 2-4% more throughput.
It is safe because the only message of a later transaction that can reach a node whose
shared grant is still in flight is an Inv (forwards go to owners, and the node has only
this one request out): the Inv is acknowledged and leaves a txn floor (below), so the
grant it overtook is dropped when it comes and the read asks again; the home counts the
new sharer's lease from the grant or the FwdDone, which is after the node sent its
GetS, where the node's own lease starts. So a shared grant serves only within that
lease, the reads queued for it included (the base cache serves those even from a grant
that arrives late, since its home waits for the Unblock before any later write): a grant
that arrives after the lease may have been overtaken by a write whose home dropped this
silent sharer without an Inv, so it serves nothing and the node asks again. A lost
shared grant is asked for again by the node's re-sent request. Exclusive grants are
still acknowledged: a forward that overtakes one costs the new owner its grant, and its
write a re-sent request. Tried on the benchmark without those Unblocks too, forwards
overtook grants about 75 times a second per node (a grant from an old owner travels one
hop, the next forward two, but on links that are busier), write p99 went from 90 ms to
1.04 s and throughput fell 4-8%; asking again at once instead of after `resend_ms` did
not win it back. A node still answers a repeated shared grant (same txn) with an
Unblock, for a home of an older version, which waits for one and re-sends the grant
until it comes.

Txn floors last while a request is outstanding. The base cache forgets a line once it is
evicted (after PutS, or after the PutAck of a PutE/PutM), and with it the line's txn. A
grant is installed only if it answers the request outstanding now (its `req`), so a late
duplicate of an old grant is harmless unless that request is still outstanding. It can
be: a forward or an Inv answered with "no copy here" while our GetS/GetM is out means
that a grant older than it, still in flight from before a home restart, carries our
request's id and must not be installed. So a line removed while its key has a request
outstanding leaves a *txn floor* (in memory), raised by such answers, and a Data, Inv or
forward at or below the floor is old. Once the request is answered (the grant's line
carries the txn) or ends, the floor goes (`tick` drops any left over): every later
request has a new `req`, which no grant from before can carry. So a node keeps no state
for keys it no longer holds, however many distinct keys pass through it.

Only what matters after a crash is persisted. A line write is kept only if the line is
E or M (or evicting) or carries a hand-off record; when such a hash on disk is replaced
by anything else (an S or I line, a floor, nothing), it is deleted. S and I lines are
never persisted. Nothing is lost by that: an S line reloads as
I anyway, and a node never installs a grant left over from before its restart (its
request ids are new), so it needs no txn floor from disk to recognise one. Misses and
invalidations then cost no Redis write on the node that had the copy.

Other transactions need no persisted progress. An Inv phase is simply repeated by the
requester's re-sent GetM (sharers that already acked were persisted as dropped); a grant
whose Data was lost with a crashed home is re-granted when the requester asks again (the
base cores handle a re-grant of what a node already holds: the newer value is kept).
"""

from service.cache.recovering_directory import RecoveringDirectory
from service.cache.recovering_lines import DEFAULT_RESEND_MS, Handoff, RecoveringLineCache

__all__ = ["DEFAULT_RESEND_MS", "Handoff", "RecoveringDirectory", "RecoveringLineCache"]
