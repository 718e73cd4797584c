"""The one clock services read: this node's monotonic time in milliseconds.

Deadlines (leases, waits, visibility timeouts) are points on the deciding leader's
monotonic clock; they travel inside commands and ops, and a new leader rebases them onto
its own clock before comparing (wall time can jump; monotonic time cannot).
"""

from __future__ import annotations

import time


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000
