"""Structured logging: JSON lines (or plain text) on stderr, each naming this node.

A JSON line holds `ts` (UTC, ISO 8601, ms), `level`, `logger`, `node`, `msg`, then every
field passed through `extra=`, then `exc` / `stack` when present. Use it as
`log.info("elected", extra={"term": 7})`: fields stay machine-readable instead of being
formatted into the message. With several nodes writing to one terminal or one log
store, the `node` field is what tells them apart.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

FORMATS = ("json", "text")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_CORE_KEYS = ("ts", "level", "logger", "node", "msg", "exc", "stack")
# Marks the handler this module installed, so a second setup_logging replaces it
# without removing handlers that others (pytest's caplog, say) attached to the root.
_HANDLER_MARK = "_dsync_handler"


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _RECORD_ATTRS or key.startswith("_"):
            continue
        # An extra named like a core key must not overwrite it, nor be lost.
        fields[f"extra.{key}" if key in _CORE_KEYS else key] = value
    return fields


class _NodeFilter(logging.Filter):
    """Stamps the node id on every record reaching the handler, whatever its logger."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        # A private attribute, so a caller's own `extra={"node": ...}` (say, a peer's id)
        # survives as `extra.node` instead of being overwritten.
        record._dsync_node = self.node_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "node": getattr(record, "_dsync_node", None),
            "msg": record.getMessage(),
        }
        line.update(_extra_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd extra value (a Path, an exception) must not lose the line.
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = (
            f"{_timestamp(record)} {record.levelname:<7} [{getattr(record, '_dsync_node', '-')}] "
            f"{record.name}: {record.getMessage()}"
        )
        extras = _extra_fields(record)
        if extras:
            text += " " + " ".join(f"{key}={value!r}" for key, value in extras.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def setup_logging(node_id: str, level: str, fmt: str) -> None:
    """Send all logging to stderr in `fmt` ("json" or "text") at `level` for `node_id`.

    Safe to call again (tests, reconfiguration): it replaces only its own handler.
    """
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_NodeFilter(node_id))
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # Python warnings (deprecations in dependencies) then arrive as structured lines too.
    logging.captureWarnings(True)
