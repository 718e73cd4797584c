"""A Wing & Gong style linearizability checker for histories of single registers.

Each operation has an invocation time, a completion time (None when the client never
learned the outcome: a timeout is "unknown", never "failed") and a result. A write whose
outcome is unknown may take effect at any point after its invocation, or never. Registers
are independent, and linearizability is compositional, so each key is checked alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Op:
    client: int
    kind: str  # "write" | "read" | "cas"
    value: Any  # written value; for reads the value observed (None: absent)
    invoked: float
    completed: float | None  # None: outcome unknown
    ok: bool = True  # False: the operation certainly had no effect (e.g. a 4xx)
    expected: Any = None  # for cas: the value it required

    @property
    def end(self) -> float:
        return math.inf if self.completed is None else self.completed


Model = Callable[[Any, Op], tuple[bool, Any]]


def register_model(state: Any, op: Op) -> tuple[bool, Any]:
    """(is op's result consistent with state, state after op)."""
    if op.kind == "write":
        return True, op.value
    if op.kind == "read":
        return op.value == state, state
    if op.kind == "cas":
        if op.ok:
            return state == op.expected, op.value
        return state != op.expected, state
    raise ValueError(op.kind)


def check(history: Sequence[Op], initial: Any = None, model: Model = register_model,
          max_steps: int = 2_000_000) -> tuple[bool, str]:
    """Return (linearizable, explanation)."""
    ops = [op for op in history if op.ok or op.kind == "cas"]
    # A read whose answer never arrived tells us nothing.
    ops = [op for op in ops if not (op.kind == "read" and op.completed is None)]
    ops.sort(key=lambda o: o.invoked)
    n = len(ops)
    seen: set[tuple[int, Hashable]] = set()
    steps = 0
    full = (1 << n) - 1
    # Unknown writes may be skipped entirely; mark which ones are optional.
    optional = 0
    for i, op in enumerate(ops):
        if op.completed is None:
            optional |= 1 << i

    def search() -> bool:
        # Iterative depth-first search (histories are longer than Python's recursion
        # limit): each frame is (linearized set, register state, next candidate to try).
        nonlocal steps
        stack: list[tuple[int, Any, int]] = [(0, initial, 0)]
        while stack:
            steps += 1
            if steps > max_steps:
                raise RuntimeError("linearizability search exceeded its step budget")
            done, state, start = stack.pop()
            if done | optional == full:
                return True
            if start == 0:
                key = (done, _freeze(state))
                if key in seen:
                    continue
                seen.add(key)
            # The earliest completion among pending ops bounds which op may go next.
            horizon = min(ops[i].end for i in range(n) if not done >> i & 1)
            for i in range(start, n):
                if done >> i & 1:
                    continue
                op = ops[i]
                if op.invoked > horizon:
                    break  # ops are sorted by invocation
                consistent, after = model(state, op)
                if consistent:
                    stack.append((done, state, i + 1))
                    stack.append((done | 1 << i, after, 0))
                    break
        return False

    ok = search()
    if ok:
        return True, f"linearizable ({n} operations, {steps} search steps)"
    return False, f"NOT linearizable: {n} operations; history: {ops}"


def _freeze(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value  # type: ignore[no-any-return]
