"""Snapshot data built from packed entries: one msgpack map of `key -> hash`.

A snapshot is every machine's hashes in one msgpack map. Packing it from a dict walked
and re-encoded every lock each time: with 50,000 held locks that held the event loop
200-280 ms per snapshot, one every 10,000 log entries, close to the election timeout.
A machine that keeps each entry packed while it is unchanged (the lock machine) hands
over bytes instead, and joining them is a copy. The result is byte for byte what
`msgpack.packb` makes of the same map, so `decode_snapshot_data` reads either.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import msgpack

_FIXMAP_MAX = 15
_MAP16_MAX = 0xFFFF


def pack_entry(key: str, fields: Mapping[str, str]) -> bytes:
    """One `key -> hash` entry of the snapshot map, packed."""
    # A two-item array is its header byte (0x92) and then exactly the key and the value
    # as a map entry packs them: one packb call instead of two.
    packed = msgpack.packb((key, fields), use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed[1:]


def join_entries(entries: Sequence[bytes]) -> bytes:
    """The snapshot map of these packed entries (their keys must be distinct)."""
    return _map_header(len(entries)) + b"".join(entries)


def _map_header(count: int) -> bytes:
    if count <= _FIXMAP_MAX:
        return bytes([0x80 | count])
    if count <= _MAP16_MAX:
        return b"\xde" + struct.pack(">H", count)
    return b"\xdf" + struct.pack(">I", count)
