"""A history checker for the cache's two coherence promises, used by the tests.

Record every completed read and write (node, key, value, version, start and end time)
and the state of every line after every step; the checker reports, with a description
a person can act on:

- single-writer/many-readers: at every recorded step, at most one node holds a key in
  M or E, and if one does, no other node holds it in S;
- no stale read: a read never returns a version older than the newest write that was
  acknowledged (ended) before the read began;
- and, because versions name values: a read of version v returns exactly what the write
  of v wrote (version 0 is the initial value), and no two writes share a version;
- write order: a write acknowledged before another began has the smaller version (the
  versions of a key increase with its acknowledged writes).

Why incremental: each record is checked against everything recorded so far, in both
directions (a read against earlier-acknowledged writes, a write against reads that began
after it ended), so the result does not depend on the order records arrive in, and a
simulation can stop at the first bad step instead of after the run.

The states to record are the ones that count for coherence (`LineCache.state`: an S line
past its lease is I); snapshots are kept in `states` whenever they change, for reading
back around a violation. Times are whatever the caller uses consistently (the
simulations use their ms clock).
"acknowledged before the read began" is strict (`write.end < read.start`): operations
that overlap may be ordered either way, so they are never reported.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

EXCLUSIVE = ("M", "E")


@dataclass(frozen=True, slots=True)
class Op:
    node: str
    key: str
    value: object  # any comparable form, used consistently (the tests use JSON text)
    version: int
    start_ms: int
    end_ms: int

    def describe(self, verb: str) -> str:
        return (
            f"{verb} by {self.node} of {self.key!r} = {self.value!r} (version {self.version}) "
            f"during [{self.start_ms}, {self.end_ms}]"
        )


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # single-writer | stale-read | version-mismatch | duplicate-version | write-order
    at_ms: int
    description: str

    def __str__(self) -> str:
        return f"[{self.kind} @ {self.at_ms}] {self.description}"


class CoherenceViolation(AssertionError):
    def __init__(self, violations: list[Violation], context: str = "") -> None:
        self.violations = violations
        lines = [str(v) for v in violations]
        head = f"{len(violations)} coherence violation(s)" + (f" ({context})" if context else "")
        super().__init__("\n  ".join([head, *lines]))


@dataclass(slots=True)
class _KeyHistory:
    writes_by_end: list[tuple[int, int, Op]] = field(default_factory=list)  # (end, seq, op)
    prefix_max: list[Op] = field(default_factory=list)  # newest version among writes[:i+1]
    reads_by_start: list[tuple[int, int, Op]] = field(default_factory=list)
    writes_by_start: list[tuple[int, int, Op]] = field(default_factory=list)
    write_of_version: dict[int, Op] = field(default_factory=dict)
    reads_of_version: dict[int, list[Op]] = field(default_factory=dict)


class HistoryChecker:
    def __init__(self, initial: object = None) -> None:
        self.initial = initial  # the value version 0 stands for
        self._keys: dict[str, _KeyHistory] = {}
        self._seq = 0
        self.violations: list[Violation] = []
        self.reads = 0
        self.writes = 0
        self.steps = 0
        # (at_ms, node -> key -> state) after every step that changed some state.
        self.states: list[tuple[int, dict[str, dict[str, str]]]] = []

    # ---- recording -----------------------------------------------------------------------

    def record_write(
        self, node: str, key: str, value: object, version: int, start_ms: int, end_ms: int
    ) -> list[Violation]:
        w = Op(node, key, value, version, start_ms, end_ms)
        h = self._history(key)
        found: list[Violation] = []
        self.writes += 1
        other = h.write_of_version.get(version)
        if other is not None or version == 0:
            first = other.describe("write") if other else "the initial value"
            found.append(
                Violation(
                    "duplicate-version",
                    end_ms,
                    f"{w.describe('write')} reuses version {version} of {first}: "
                    "two writers were allowed at once",
                )
            )
        else:
            h.write_of_version[version] = w
        for r in h.reads_of_version.get(version, []):
            if r.value != value:
                found.append(self._mismatch(r, w))
        start = bisect.bisect_right(h.reads_by_start, (end_ms, self._seq + 1))
        for _, _, r in h.reads_by_start[start:]:
            if r.start_ms > end_ms and r.version < version:
                found.append(self._stale(r, w))
        found += self._write_order(h, w)
        self._seq += 1
        bisect.insort(h.writes_by_start, (start_ms, self._seq, w))
        pos = bisect.bisect_right(h.writes_by_end, (end_ms, self._seq))
        h.writes_by_end.insert(pos, (end_ms, self._seq, w))
        if pos == len(h.prefix_max):  # the usual case: recorded in end order
            prev = h.prefix_max[-1] if h.prefix_max else w
            h.prefix_max.append(w if w.version >= prev.version else prev)
        else:
            self._reindex(h)
        self.violations.extend(found)
        return found

    def record_read(
        self, node: str, key: str, value: object, version: int, start_ms: int, end_ms: int
    ) -> list[Violation]:
        r = Op(node, key, value, version, start_ms, end_ms)
        h = self._history(key)
        found: list[Violation] = []
        self.reads += 1
        written = h.write_of_version.get(version)
        if written is not None and written.value != value:
            found.append(self._mismatch(r, written))
        elif version == 0 and value != self.initial:
            found.append(
                Violation(
                    "version-mismatch",
                    end_ms,
                    f"{r.describe('read')} but version 0 is the initial value {self.initial!r}",
                )
            )
        before = bisect.bisect_left(h.writes_by_end, (start_ms, -1))
        if before:
            newest = h.prefix_max[before - 1]
            if newest.version > version:
                found.append(self._stale(r, newest))
        self._seq += 1
        bisect.insort(h.reads_by_start, (start_ms, self._seq, r))
        h.reads_of_version.setdefault(version, []).append(r)
        self.violations.extend(found)
        return found

    def record_states(self, at_ms: int, states: Mapping[str, Mapping[str, str]]) -> list[Violation]:
        """Check single-writer/many-readers; `states` maps node -> key -> state name."""
        self.steps += 1
        snapshot = {node: {k: str(v) for k, v in lines.items()} for node, lines in states.items()}
        if not self.states or self.states[-1][1] != snapshot:
            self.states.append((at_ms, snapshot))
        by_key: dict[str, dict[str, str]] = {}
        for node, lines in states.items():
            for key, state in lines.items():
                if state != "I":
                    by_key.setdefault(key, {})[node] = str(state)
        found: list[Violation] = []
        for key in sorted(by_key):
            holders = by_key[key]
            owners = sorted(n for n, s in holders.items() if s in EXCLUSIVE)
            sharers = sorted(n for n, s in holders.items() if s == "S")
            if len(owners) > 1:
                listed = ", ".join(f"{n}={holders[n]}" for n in owners)
                found.append(
                    Violation(
                        "single-writer",
                        at_ms,
                        f"key {key!r} has {len(owners)} exclusive copies ({listed})",
                    )
                )
            elif owners and sharers:
                owner = owners[0]
                found.append(
                    Violation(
                        "single-writer",
                        at_ms,
                        f"key {key!r} is {holders[owner]} at {owner} while S copies "
                        f"remain at {', '.join(sharers)}",
                    )
                )
        self.violations.extend(found)
        return found

    # ---- verdict -------------------------------------------------------------------------

    def assert_ok(self, context: str = "") -> None:
        if self.violations:
            raise CoherenceViolation(self.violations, context)

    # ---- helpers -------------------------------------------------------------------------

    def _history(self, key: str) -> _KeyHistory:
        return self._keys.setdefault(key, _KeyHistory())

    @staticmethod
    def _reindex(h: _KeyHistory) -> None:
        h.prefix_max = []
        for _, _, w in h.writes_by_end:
            best = h.prefix_max[-1] if h.prefix_max else w
            h.prefix_max.append(w if w.version >= best.version else best)

    @staticmethod
    def _write_order(h: _KeyHistory, w: Op) -> list[Violation]:
        """`w` against writes acknowledged before it began and writes begun after it
        was acknowledged (equal versions are reported as duplicate-version)."""
        found: list[Violation] = []
        before = bisect.bisect_left(h.writes_by_end, (w.start_ms, -1))
        if before:
            newest = h.prefix_max[before - 1]
            if newest.end_ms < w.start_ms and newest.version > w.version:
                found.append(
                    Violation(
                        "write-order",
                        w.end_ms,
                        f"{w.describe('write')} got a smaller version than the "
                        f"{newest.describe('write')}, acknowledged before it began",
                    )
                )
        later = bisect.bisect_right(h.writes_by_start, (w.end_ms, 1 << 62))
        for _, _, other in h.writes_by_start[later:]:
            if other.start_ms > w.end_ms and other.version < w.version:
                found.append(
                    Violation(
                        "write-order",
                        other.end_ms,
                        f"{other.describe('write')} got a smaller version than the "
                        f"{w.describe('write')}, acknowledged before it began",
                    )
                )
        return found

    @staticmethod
    def _stale(r: Op, w: Op) -> Violation:
        return Violation(
            "stale-read",
            r.end_ms,
            f"{r.describe('read')} returned an older version than the "
            f"{w.describe('write')}, which was acknowledged before the read began",
        )

    @staticmethod
    def _mismatch(r: Op, w: Op) -> Violation:
        return Violation(
            "version-mismatch",
            r.end_ms,
            f"{r.describe('read')} but version {w.version} was written as {w.value!r} "
            f"({w.describe('write')})",
        )
