"""Compact msgpack encoding of Raft peer messages.

Wire format of a batch: ``[FORMAT_VERSION, [message, ...]]`` where every message is a
positional array starting with a small integer tag (no field names on the wire: a
heartbeat is ~20 bytes). Field order per tag is fixed by this module; a change in any
array layout must bump FORMAT_VERSION so a mixed-version cluster rejects instead of
misreading.

Decoding treats its input as untrusted (it arrives from the network): anything that is
not exactly a well-formed batch raises `CodecError` and nothing else, so the HTTP handler
can turn every malformed body into a 400 with one except clause.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgpack

from service.raft.messages import (
    AppendRequest,
    AppendResponse,
    Entry,
    EntryKind,
    Message,
    Snapshot,
    SnapshotMeta,
    SnapshotRequest,
    SnapshotResponse,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)

FORMAT_VERSION = 2  # 2: AppendResponse carries log_lost

TAG_VOTE_REQUEST = 1
TAG_VOTE_RESPONSE = 2
TAG_APPEND_REQUEST = 3
TAG_APPEND_RESPONSE = 4
TAG_SNAPSHOT_REQUEST = 5
TAG_SNAPSHOT_RESPONSE = 6
TAG_TIMEOUT_NOW = 7

# 0x92 = fixarray of 2 elements: [version, messages].
_BATCH_PREFIX = b"\x92" + msgpack.packb(FORMAT_VERSION)
# Upper bound of prefix + array header, so callers can budget a body size.
BATCH_OVERHEAD = len(_BATCH_PREFIX) + 5


class CodecError(ValueError):
    """The bytes are not a valid encoded batch (malformed, truncated, wrong types...)."""


# --- encoding -----------------------------------------------------------------


def _wire(m: Message) -> list[object]:
    # bool()/int() guard against truthy non-bools or IntEnum subclasses leaking into the
    # packer, which would change the encoded type and fail strict decoding on the peer.
    if isinstance(m, AppendRequest):
        return [
            TAG_APPEND_REQUEST,
            m.term,
            m.src,
            m.dst,
            m.prev_index,
            m.prev_term,
            m.commit,
            m.read_ctx,
            [[e.index, e.term, int(e.kind), bytes(e.data)] for e in m.entries],
        ]
    if isinstance(m, AppendResponse):
        return [
            TAG_APPEND_RESPONSE,
            m.term,
            m.src,
            m.dst,
            bool(m.success),
            m.match_index,
            m.read_ctx,
            bool(m.log_lost),
        ]
    if isinstance(m, VoteRequest):
        return [
            TAG_VOTE_REQUEST,
            m.term,
            m.src,
            m.dst,
            m.last_log_index,
            m.last_log_term,
            bool(m.prevote),
            bool(m.transfer),
        ]
    if isinstance(m, VoteResponse):
        return [TAG_VOTE_RESPONSE, m.term, m.src, m.dst, bool(m.granted), bool(m.prevote)]
    if isinstance(m, SnapshotRequest):
        meta = m.snapshot.meta
        return [
            TAG_SNAPSHOT_REQUEST,
            m.term,
            m.src,
            m.dst,
            meta.index,
            meta.term,
            list(meta.voters),
            bytes(m.snapshot.data),
        ]
    if isinstance(m, SnapshotResponse):
        return [TAG_SNAPSHOT_RESPONSE, m.term, m.src, m.dst, m.match_index]
    if isinstance(m, TimeoutNow):
        return [TAG_TIMEOUT_NOW, m.term, m.src, m.dst]
    raise TypeError(f"not a Raft message: {type(m).__name__}")


def encode_message(message: Message) -> bytes:
    """One message as a msgpack array; join with `join_encoded` to build a batch.

    Encoding messages one by one lets the HTTP sender split a large backlog into bodies
    under a size cap without encoding anything twice.
    """
    packed: bytes = msgpack.packb(_wire(message), use_bin_type=True)
    return packed


def join_encoded(parts: Sequence[bytes]) -> bytes:
    """A batch from messages already encoded with `encode_message`."""
    header: bytes = msgpack.Packer().pack_array_header(len(parts))
    return b"".join((_BATCH_PREFIX, header, *parts))


def encode_batch(messages: Sequence[Message]) -> bytes:
    return join_encoded([encode_message(m) for m in messages])


# --- decoding -----------------------------------------------------------------


def _uint(v: object, what: str) -> int:
    # bool is an int subclass; a True where a term belongs is malformed, not 1.
    # Terms, indexes and read contexts are never negative in Raft.
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CodecError(f"{what}: expected a non-negative integer")
    return v


def _str(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise CodecError(f"{what}: expected a string")
    return v


def _bool(v: object, what: str) -> bool:
    if not isinstance(v, bool):
        raise CodecError(f"{what}: expected a boolean")
    return v


def _bytes(v: object, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise CodecError(f"{what}: expected binary data")
    return v


def _list(v: object, what: str) -> list[object]:
    if not isinstance(v, list):
        raise CodecError(f"{what}: expected an array")
    return v


def _entry(v: object) -> Entry:
    f = _list(v, "entry")
    if len(f) != 4:
        raise CodecError("entry: expected 4 fields")
    kind = _uint(f[2], "entry.kind")
    try:
        entry_kind = EntryKind(kind)
    except ValueError:
        raise CodecError(f"entry.kind: unknown kind {kind}") from None
    return Entry(
        index=_uint(f[0], "entry.index"),
        term=_uint(f[1], "entry.term"),
        kind=entry_kind,
        data=_bytes(f[3], "entry.data"),
    )


def _vote_request(f: list[object]) -> VoteRequest:
    return VoteRequest(
        term=_uint(f[1], "term"),
        src=_str(f[2], "src"),
        dst=_str(f[3], "dst"),
        last_log_index=_uint(f[4], "last_log_index"),
        last_log_term=_uint(f[5], "last_log_term"),
        prevote=_bool(f[6], "prevote"),
        transfer=_bool(f[7], "transfer"),
    )


def _vote_response(f: list[object]) -> VoteResponse:
    return VoteResponse(
        term=_uint(f[1], "term"),
        src=_str(f[2], "src"),
        dst=_str(f[3], "dst"),
        granted=_bool(f[4], "granted"),
        prevote=_bool(f[5], "prevote"),
    )


def _append_request(f: list[object]) -> AppendRequest:
    return AppendRequest(
        term=_uint(f[1], "term"),
        src=_str(f[2], "src"),
        dst=_str(f[3], "dst"),
        prev_index=_uint(f[4], "prev_index"),
        prev_term=_uint(f[5], "prev_term"),
        commit=_uint(f[6], "commit"),
        read_ctx=_uint(f[7], "read_ctx"),
        entries=tuple(_entry(e) for e in _list(f[8], "entries")),
    )


def _append_response(f: list[object]) -> AppendResponse:
    return AppendResponse(
        term=_uint(f[1], "term"),
        src=_str(f[2], "src"),
        dst=_str(f[3], "dst"),
        success=_bool(f[4], "success"),
        match_index=_uint(f[5], "match_index"),
        read_ctx=_uint(f[6], "read_ctx"),
        log_lost=_bool(f[7], "log_lost"),
    )


def _snapshot_request(f: list[object]) -> SnapshotRequest:
    voters = tuple(_str(v, "voter") for v in _list(f[6], "voters"))
    meta = SnapshotMeta(
        index=_uint(f[4], "snapshot.index"), term=_uint(f[5], "snapshot.term"), voters=voters
    )
    return SnapshotRequest(
        term=_uint(f[1], "term"),
        src=_str(f[2], "src"),
        dst=_str(f[3], "dst"),
        snapshot=Snapshot(meta=meta, data=_bytes(f[7], "snapshot.data")),
    )


def _snapshot_response(f: list[object]) -> SnapshotResponse:
    return SnapshotResponse(
        term=_uint(f[1], "term"),
        src=_str(f[2], "src"),
        dst=_str(f[3], "dst"),
        match_index=_uint(f[4], "match_index"),
    )


def _timeout_now(f: list[object]) -> TimeoutNow:
    return TimeoutNow(term=_uint(f[1], "term"), src=_str(f[2], "src"), dst=_str(f[3], "dst"))


# tag -> (array length including the tag, decoder). Exact lengths: a newer layout must
# come with a new FORMAT_VERSION, so extra fields are an error, not silently ignored.
_DECODERS: dict[int, tuple[int, Callable[[list[object]], Message]]] = {
    TAG_VOTE_REQUEST: (8, _vote_request),
    TAG_VOTE_RESPONSE: (6, _vote_response),
    TAG_APPEND_REQUEST: (9, _append_request),
    TAG_APPEND_RESPONSE: (8, _append_response),
    TAG_SNAPSHOT_REQUEST: (8, _snapshot_request),
    TAG_SNAPSHOT_RESPONSE: (5, _snapshot_response),
    TAG_TIMEOUT_NOW: (4, _timeout_now),
}


def _message(v: object) -> Message:
    f = _list(v, "message")
    if not f:
        raise CodecError("message: empty array")
    tag = f[0]
    if isinstance(tag, bool) or not isinstance(tag, int) or tag not in _DECODERS:
        raise CodecError(f"message: unknown tag {tag!r:.20}")
    size, decode = _DECODERS[tag]
    if len(f) != size:
        raise CodecError(f"message tag {tag}: expected {size} fields, got {len(f)}")
    return decode(f)


def decode_batch(data: bytes | bytearray | memoryview) -> list[Message]:
    """Decode a batch from untrusted bytes; raise `CodecError` for anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("expected bytes")
    try:
        # unpackb caps every length header by the input size, so a forged header
        # claiming 4 G elements fails fast instead of allocating; nesting depth is
        # capped by msgpack's own stack limit.
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        # msgpack raises a zoo of types for bad input (ValueError subclasses,
        # TypeError for unhashable map keys, UnicodeDecodeError, StackError...);
        # callers get one.
        raise CodecError(f"not valid msgpack: {type(exc).__name__}") from exc
    batch = _list(obj, "batch")
    if len(batch) != 2:
        raise CodecError("batch: expected [version, messages]")
    version = batch[0]
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise CodecError(f"batch: unsupported format version {version!r:.20}")
    return [_message(m) for m in _list(batch[1], "messages")]


def decode_message(data: bytes) -> Message:
    """Decode one message made by `encode_message` (tests and tools)."""
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        raise CodecError(f"not valid msgpack: {type(exc).__name__}") from exc
    return _message(obj)
