"""Codec: every message round-trips; anything malformed raises CodecError and only that."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from service.transport.codec import (
    FORMAT_VERSION,
    CodecError,
    decode_batch,
    decode_message,
    encode_batch,
    encode_message,
)

u64 = st.integers(min_value=0, max_value=2**64 - 1)
small = st.integers(min_value=0, max_value=2**31)
ints = st.one_of(small, u64)
node_ids = st.text(max_size=20)
blobs = st.binary(max_size=300)

entries = st.builds(
    Entry, index=ints, term=ints, kind=st.sampled_from(list(EntryKind)), data=blobs
)
snapshots = st.builds(
    Snapshot,
    meta=st.builds(
        SnapshotMeta, index=ints, term=ints, voters=st.lists(node_ids, max_size=5).map(tuple)
    ),
    data=blobs,
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        VoteRequest,
        term=ints, src=node_ids, dst=node_ids, last_log_index=ints, last_log_term=ints,
        prevote=st.booleans(), transfer=st.booleans(),
    ),
    st.builds(
        VoteResponse,
        term=ints, src=node_ids, dst=node_ids, granted=st.booleans(), prevote=st.booleans(),
    ),
    st.builds(
        AppendRequest,
        term=ints, src=node_ids, dst=node_ids, prev_index=ints, prev_term=ints,
        entries=st.lists(entries, max_size=5).map(tuple), commit=ints, read_ctx=ints,
    ),
    st.builds(
        AppendResponse,
        term=ints, src=node_ids, dst=node_ids, success=st.booleans(), match_index=ints,
        read_ctx=ints,
    ),
    st.builds(SnapshotRequest, term=ints, src=node_ids, dst=node_ids, snapshot=snapshots),
    st.builds(SnapshotResponse, term=ints, src=node_ids, dst=node_ids, match_index=ints),
    st.builds(TimeoutNow, term=ints, src=node_ids, dst=node_ids),
)
batches = st.lists(messages, max_size=8)


def decodes_or_codec_error(data: bytes) -> None:
    """The only acceptable outcomes for arbitrary input."""
    try:
        result = decode_batch(data)
    except CodecError:
        return
    # Rarely the garbage is a valid batch (msgpack has several encodings of one value);
    # then it must be made of real messages that survive a round trip.
    assert isinstance(result, list)
    assert decode_batch(encode_batch(result)) == result


@given(batches)
def test_batch_round_trip(batch: list[Message]) -> None:
    data = encode_batch(batch)
    assert decode_batch(data) == batch
    assert decode_batch(bytearray(data)) == batch
    assert decode_batch(memoryview(data)) == batch


@given(messages)
def test_message_round_trip(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


@given(batches)
def test_types_survive_exactly(batch: list[Message]) -> None:
    # == on dataclasses would accept 1 == True; the core relies on real bools/ints.
    for got, want in zip(decode_batch(encode_batch(batch)), batch, strict=True):
        assert type(got) is type(want)
        if isinstance(got, AppendRequest):
            assert all(type(e.kind) is EntryKind for e in got.entries)
        if isinstance(got, VoteRequest):
            assert type(got.prevote) is bool and type(got.transfer) is bool


def test_heartbeat_is_compact() -> None:
    hb = AppendRequest(term=7, src="n1", dst="n2", prev_index=100, prev_term=7, entries=(),
                       commit=100)
    assert len(encode_message(hb)) <= 20
    assert len(encode_batch([hb])) <= 25


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_codec_error(data: bytes) -> None:
    decodes_or_codec_error(data)


@settings(max_examples=300)
@given(batches, st.data())
def test_truncation_is_codec_error(batch: list[Message], data: st.DataObject) -> None:
    encoded = encode_batch(batch)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(CodecError):
        decode_batch(encoded[:cut])


@settings(max_examples=300)
@given(batches, st.binary(min_size=1, max_size=10))
def test_trailing_bytes_are_codec_error(batch: list[Message], extra: bytes) -> None:
    with pytest.raises(CodecError):
        decode_batch(encode_batch(batch) + extra)


@settings(max_examples=500)
@given(batches.filter(bool), st.data())
def test_mutated_bytes_only_raise_codec_error(batch: list[Message], data: st.DataObject) -> None:
    encoded = bytearray(encode_batch(batch))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        pos = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
        encoded[pos] = data.draw(st.integers(min_value=0, max_value=255))
    decodes_or_codec_error(bytes(encoded))


# Well-formed msgpack of the wrong shape: the decoder's own validation must catch it.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=10) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=9)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=30,
)


@settings(max_examples=500)
@given(msgpack_values)
def test_wrong_shapes_only_raise_codec_error(value: object) -> None:
    decodes_or_codec_error(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=500)
@given(st.integers(min_value=1, max_value=7), st.lists(msgpack_values, max_size=9))
def test_known_tag_with_garbage_fields(tag: int, fields: list[object]) -> None:
    decodes_or_codec_error(msgpack.packb([FORMAT_VERSION, [[tag, *fields]]], use_bin_type=True))


def _batch_of(*wire_messages: object) -> bytes:
    packed: bytes = msgpack.packb([FORMAT_VERSION, list(wire_messages)], use_bin_type=True)
    return packed


GOOD_VOTE = [1, 3, "a", "b", 10, 2, False, False]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty input"),
        (b"\xc1", "reserved msgpack byte"),
        (b"\xdd\xff\xff\xff\xff", "array header claiming 4G elements"),
        (b"\x91" * 100_000, "nesting deeper than the unpacker's stack"),
        (msgpack.packb({"a": 1}), "map instead of array"),
        (msgpack.packb([FORMAT_VERSION]), "missing message list"),
        (msgpack.packb([FORMAT_VERSION + 1, []]), "unknown format version"),
        (msgpack.packb([FORMAT_VERSION - 1, []]), "an older format version"),
        (msgpack.packb([True, []]), "bool as version"),
        (msgpack.packb([1.0, []]), "float as version"),
        (msgpack.packb([FORMAT_VERSION, {}]), "messages not an array"),
        (_batch_of([]), "empty message"),
        (_batch_of([99, 1, "a", "b"]), "unknown tag"),
        (_batch_of([True, 1, "a", "b"]), "bool tag"),
        (_batch_of(GOOD_VOTE[:-1]), "too few fields"),
        (_batch_of([*GOOD_VOTE, 0]), "too many fields"),
        (_batch_of([1, -1, "a", "b", 10, 2, False, False]), "negative term"),
        (_batch_of([1, True, "a", "b", 10, 2, False, False]), "bool as term"),
        (_batch_of([1, 3.0, "a", "b", 10, 2, False, False]), "float as term"),
        (_batch_of([1, 3, b"a", "b", 10, 2, False, False]), "bytes as node id"),
        (_batch_of([1, 3, "a", "b", 10, 2, 0, False]), "int as bool"),
        (_batch_of([7, 3, "a", None]), "nil dst"),
        (_batch_of([3, 1, "a", "b", 0, 0, 0, 0, [[1, 1, 9, b""]]]), "unknown entry kind"),
        (_batch_of([3, 1, "a", "b", 0, 0, 0, 0, [[1, 1, 0, "x"]]]), "str as entry data"),
        (_batch_of([3, 1, "a", "b", 0, 0, 0, 0, [[1, 1, 0]]]), "short entry"),
        (_batch_of([3, 1, "a", "b", 0, 0, 0, 0, {}]), "entries not an array"),
        (_batch_of([5, 1, "a", "b", 0, 0, [1], b""]), "int voter"),
        (_batch_of([5, 1, "a", "b", 0, 0, "ab", b""]), "voters not an array"),
        (b"\x92\x01\x91\x94\x07\x01\xa1a\xa1\xff", "invalid utf-8 in a string"),
        (msgpack.packb([FORMAT_VERSION, [msgpack.ExtType(5, b"x")]]), "ext type"),
        (b"\x92\x01\x91\x84\x90\x00\x90\x00\x90\x00\x90\x00", "unhashable map keys"),
    ],
)
def test_malformed_examples(data: bytes, why: str) -> None:
    with pytest.raises(CodecError):
        decode_batch(data)


def test_codec_error_is_a_value_error() -> None:
    # Callers that already catch ValueError for bad input keep working.
    assert issubclass(CodecError, ValueError)


def test_encoding_a_non_message_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        encode_batch([object()])  # type: ignore[list-item]


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(CodecError):
        decode_batch("not bytes")  # type: ignore[arg-type]
