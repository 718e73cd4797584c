"""The cache service's one error: an HTTP status, a snake_case code and a message that
says what to do; the API turns it into the contract's error body."""

from __future__ import annotations


class CacheError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def unavailable(message: str) -> CacheError:
    """503: the key's home or owner, or this node's cache, cannot serve right now."""
    return CacheError(503, "unavailable", message)


__all__ = ["CacheError", "unavailable"]
