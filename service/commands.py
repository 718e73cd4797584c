"""Encoding of state-machine commands inside NORMAL log entries.

A compact msgpack array [op, args, request_id, now_ms] keeps log entries small; decoding
is defensive because a log entry must never crash the apply loop.
"""

from __future__ import annotations

from typing import Any

import msgpack

from service.statemachine import Command


class CommandDecodeError(ValueError):
    pass


def encode_command(command: Command) -> bytes:
    payload = [command.op, dict(command.args), command.request_id, command.now_ms]
    data = msgpack.packb(payload, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


def decode_command(data: bytes) -> Command:
    try:
        raw: Any = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CommandDecodeError(f"undecodable command: {exc}") from exc
    if not (isinstance(raw, list) and len(raw) == 4):
        raise CommandDecodeError("command is not a 4-element array")
    op, args, request_id, now_ms = raw
    if not isinstance(op, str) or not isinstance(args, dict):
        raise CommandDecodeError("command op/args have the wrong type")
    if request_id is not None and not isinstance(request_id, str):
        raise CommandDecodeError("request_id must be a string")
    if not isinstance(now_ms, int):
        raise CommandDecodeError("now_ms must be an integer")
    return Command(op, args, request_id, now_ms)
