"""How Raft values are laid out in Redis (see keys.py for why this shape)."""

from __future__ import annotations

from collections.abc import Mapping

from service.raft.messages import Entry, EntryKind, HardState, Snapshot, SnapshotMeta


def as_text(raw: bytes | str) -> str:
    """A Redis reply value as text (clients may be set to decode responses or not)."""
    return raw.decode() if isinstance(raw, bytes) else raw


def encode_entry(entry: Entry) -> bytes:
    header = f"{entry.index}:{entry.term}:{entry.kind.name.lower()}:".encode()
    return header + entry.data


def decode_entry(member: bytes) -> Entry:
    index, term, kind, data = member.split(b":", 3)
    return Entry(int(index), int(term), EntryKind[kind.decode().upper()], data)


def encode_hard_state(state: HardState) -> dict[str, str]:
    """Fields to set; a missing vote is expressed by deleting the field (see below)."""
    fields = {"term": str(state.term)}
    if state.vote is not None:
        fields["vote"] = state.vote
    return fields


def decode_hard_state(fields: Mapping[bytes, bytes]) -> HardState:
    term = fields.get(b"term")
    vote = fields.get(b"vote")
    return HardState(int(term) if term else 0, vote.decode() if vote is not None else None)


def encode_snapshot(snapshot: Snapshot) -> dict[str, str | bytes]:
    meta = snapshot.meta
    return {
        "index": str(meta.index),
        "term": str(meta.term),
        "voters": ",".join(meta.voters),
        "data": snapshot.data,
    }


def decode_snapshot(fields: Mapping[bytes, bytes]) -> Snapshot | None:
    if b"index" not in fields:
        return None
    voters = tuple(v for v in fields.get(b"voters", b"").decode().split(",") if v)
    meta = SnapshotMeta(int(fields[b"index"]), int(fields[b"term"]), voters)
    return Snapshot(meta, fields.get(b"data", b""))
