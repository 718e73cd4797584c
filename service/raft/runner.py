"""The asyncio driver of one Raft node: the only place that does I/O for consensus.

Each loop turn: step every message that arrived, start every queued proposal/read, tick if
a tick is due, then handle the core's Ready in the order that keeps Raft safe:
persist (one Redis round trip: group commit) -> send -> apply (state writes and the applied
index in one transaction) -> advance. Requests that arrive while a turn awaits Redis are
batched into the next turn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from service.commands import CommandDecodeError, decode_command, encode_command
from service.machines import MachineRegistry
from service.metrics import NodeMetrics
from service.raft.core import RaftCore, RaftError, RaftStatus, Role
from service.raft.messages import Entry, EntryKind, Message, Ready, Snapshot
from service.statemachine import Command
from service.storage.protocols import HashWrite, RaftStorage, StateStore, merge_hash_writes

log = logging.getLogger("dsync.raft")


class ProposalDropped(RaftError):
    """The entry was overwritten by another leader: the command did not apply."""


class RunnerStopped(RaftError):
    pass


class OutcomeUnknown(RaftError):
    """The command entered the log, and this node can no longer see it through (it
    stopped, or cannot write its log): another leader may still commit it, so it may or
    may not apply. Retry only with the same request_id."""


class StorageStalled(RaftError):
    """This node cannot write its log right now; the command was not proposed."""


# A node whose log write has not succeeded this long gives up on what waits for it:
# the commands in flight get OutcomeUnknown and new ones StorageStalled at once, so
# their clients can go to another node (the others elect a leader in about half a
# second) instead of waiting out the whole storage retry budget (storage_retry_seconds).
# Long enough to ride out a restart of the node's own Redis (about 0.5 s, supervised)
# and a slow fsync without a client noticing.
STORAGE_STALL_SECONDS = 2.0


class Sender(Protocol):
    """What the runner needs of a transport (see service.transport.protocols)."""

    def send(self, messages: Sequence[Message]) -> None: ...


RoleListener = Callable[[Role, int, str | None], None]
ApplyListener = Callable[[int, Command, Any], None]


@dataclass(slots=True)
class _Proposal:
    data: bytes
    future: asyncio.Future[Any]
    started: float
    index: int = 0
    term: int = 0


def encode_snapshot_data(hashes: dict[str, dict[str, str]]) -> bytes:
    data = msgpack.packb(hashes, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


def decode_snapshot_data(data: bytes) -> dict[str, dict[str, str]]:
    raw = msgpack.unpackb(data, raw=False)
    if not isinstance(raw, dict):
        raise ValueError("snapshot data is not a map")
    return {str(k): {str(f): str(v) for f, v in h.items()} for k, h in raw.items()}


class RaftRunner:
    def __init__(
        self,
        core: RaftCore,
        storage: RaftStorage,
        state: StateStore,
        machines: MachineRegistry,
        metrics: NodeMetrics,
        *,
        tick_seconds: float = 0.05,
        snapshot_threshold: int = 10_000,
        state_write_delay: float = 0.1,
        retryable_errors: tuple[type[BaseException], ...] = (
            ConnectionError,
            OSError,
            TimeoutError,
        ),
    ) -> None:
        self.core = core
        self.storage = storage
        self.state = state
        self.machines = machines
        self.metrics = metrics
        self.tick_seconds = tick_seconds
        self.snapshot_threshold = snapshot_threshold
        self.state_write_delay = state_write_delay
        self.storage_retry_seconds = 5.0
        # When the current run of failed storage writes began (monotonic); None while
        # writes succeed.
        self.storage_failing_since: float | None = None
        # When the log write under way began (monotonic); None between writes.
        self._log_write_started: float | None = None
        self.retryable_errors = retryable_errors
        self.transport: Sender | None = None
        self._inbox: collections.deque[Message] = collections.deque()
        self._proposals: list[_Proposal] = []
        self._pending: dict[int, _Proposal] = {}
        self._reads: list[tuple[int, asyncio.Future[None]]] = []
        self._read_waiting: dict[int, asyncio.Future[None]] = {}
        self._read_ready: list[tuple[int, asyncio.Future[None]]] = []
        self._read_ctx = 0
        self._transfers: list[tuple[str, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # The snapshot being written to storage, off the loop's turn (maybe_snapshot).
        self._snapshot_save: asyncio.Task[None] | None = None
        self._role_listeners: list[RoleListener] = []
        self._apply_listeners: list[ApplyListener] = []
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._last_role: tuple[Role, int, str | None] = (core.role, core.term, core.leader)
        self.fatal_error: BaseException | None = None
        # Applied-state writes waiting for the background writer (see _queue_state_write).
        self._state_batches: list[tuple[list[HashWrite], int]] = []
        self._state_task: asyncio.Task[None] | None = None
        self._state_written_at = float("-inf")  # loop time the last state write began
        # When each peer was last heard from (loop time): services use it as liveness.
        self.last_heard: dict[str, float] = {}
        self._publish_status()

    # --- wiring ---------------------------------------------------------------

    def deliver(self, messages: Sequence[Message]) -> None:
        """Transport callback: queue messages for the next loop turn."""
        self._inbox.extend(messages)
        self._wake.set()

    def add_role_listener(self, listener: RoleListener) -> None:
        self._role_listeners.append(listener)

    def add_apply_listener(self, listener: ApplyListener) -> None:
        self._apply_listeners.append(listener)

    # --- client API -----------------------------------------------------------

    async def propose(self, command: Command, timeout: float) -> Any:
        """Replicate a command and return the state machine's result.

        Raises NotLeader / TransferInProgress / TooManyPending at once when the command
        cannot be proposed here, ProposalDropped when it was overwritten, and TimeoutError
        when the outcome is unknown (the caller may retry with the same request_id).
        """
        self._check_running()
        self._check_storage()
        loop = asyncio.get_running_loop()
        proposal = _Proposal(encode_command(command), loop.create_future(), time.monotonic())
        self._proposals.append(proposal)
        self._wake.set()
        return await asyncio.wait_for(asyncio.shield(proposal.future), timeout)

    async def read_barrier(self, timeout: float) -> None:
        """Wait until this node (the leader) may serve a linearizable read (ReadIndex)."""
        self._check_running()
        self._check_storage()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._read_ctx += 1
        self._reads.append((self._read_ctx, future))
        self._wake.set()
        await asyncio.wait_for(asyncio.shield(future), timeout)

    async def wait_applied(self, index: int, timeout: float) -> None:
        if self.core.applied >= index:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied_waiters.append((index, future))
        await asyncio.wait_for(asyncio.shield(future), timeout)

    async def transfer_leadership(self, target: str, timeout: float) -> None:
        """Hand leadership to target and wait until this node is no longer leader."""
        self._check_running()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transfers.append((target, future))
        self._wake.set()
        await asyncio.wait_for(asyncio.shield(future), timeout)
        deadline = time.monotonic() + timeout
        while self.core.role == Role.LEADER and time.monotonic() < deadline:
            await asyncio.sleep(self.tick_seconds / 2)

    def status(self) -> RaftStatus:
        return self.core.status()

    def _check_running(self) -> None:
        if self._stopping or self.fatal_error is not None:
            raise RunnerStopped("node is shutting down")

    def storage_stalled(self) -> bool:
        """A log write has been under way, or writes failing, for STORAGE_STALL_SECONDS."""
        started, failing = self._log_write_started, self.storage_failing_since
        if started is None and failing is None:
            return False  # the usual case, on every proposal
        now = time.monotonic()
        return any(
            since is not None and now - since >= STORAGE_STALL_SECONDS
            for since in (started, failing)
        )

    def _check_storage(self) -> None:
        if self.storage_stalled():
            raise StorageStalled("this node cannot write its log right now")

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"raft-{self.core.id}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:
                # The loop failed: already in fatal_error and logged. Raising it here
                # would cut the node's shutdown short (its HTTP server, peers' sockets
                # and Redis left running), and the process could then hang on exit.
                pass
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._finish_snapshot_save(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drain_state_writes(), 5)
        self._fail_everything(RunnerStopped("node stopped"))

    async def wait_stopped(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.tick_seconds
        try:
            while not self._stopping:
                delay = next_tick - loop.time()
                if delay > 0 and not self._has_input():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                self._wake.clear()
                if loop.time() >= next_tick:
                    # One tick per turn even after a long pause: a stalled process must
                    # not burn through election timeouts all at once.
                    self.core.tick()
                    next_tick = max(next_tick + self.tick_seconds, loop.time())
                await self._turn()
        except Exception as exc:
            # Storage failed after retries, or a state machine broke: stop rather than
            # serve from state that is ahead of (or diverged from) what is durable.
            self.fatal_error = exc
            log.critical("raft loop failed; node stops", exc_info=exc, extra={"error": str(exc)})
            self._fail_everything(RunnerStopped(f"raft loop failed: {exc}"))
            raise

    def _has_input(self) -> bool:
        return bool(self._inbox or self._proposals or self._reads or self._transfers)

    async def _turn(self) -> None:
        core = self.core
        if self._inbox:
            heard = asyncio.get_running_loop().time()
            while self._inbox:
                message = self._inbox.popleft()
                self.last_heard[message.src] = heard
                core.step(message)
        self._start_queued()
        if core.has_ready():
            rd = core.ready()
            await self._handle_ready(rd)
            core.advance(rd)
            self._after_advance()
            await self.maybe_snapshot()
        self._publish_status()

    def _start_queued(self) -> None:
        core = self.core
        proposals, self._proposals = self._proposals, []
        for proposal in proposals:
            try:
                proposal.index, proposal.term = core.propose(proposal.data)
            except RaftError as exc:
                self.metrics.raft_proposals_failed.labels(core.id, type(exc).__name__).inc()
                _settle(proposal.future, exc)
                continue
            self.metrics.raft_proposals.labels(core.id).inc()
            self._pending[proposal.index] = proposal
        reads, self._reads = self._reads, []
        for ctx, future in reads:
            try:
                core.read_index(ctx)
            except RaftError as exc:
                _settle(future, exc)
                continue
            self._read_waiting[ctx] = future
        transfers, self._transfers = self._transfers, []
        for target, future in transfers:
            try:
                core.transfer_leadership(target)
            except RaftError as exc:
                _settle(future, exc)
                continue
            _settle(future, None)

    async def _handle_ready(self, rd: Ready) -> None:
        early, messages = rd.early_messages(self.core.role == Role.LEADER)
        if early and self.transport is not None:
            self.transport.send(early)
        # Committed entries already in this node's durable log are applied (and their
        # clients answered) before this Ready's own write, not after it: they do not
        # depend on it, and the write (an fsync, 2-3 ms under load) would otherwise
        # delay every answer once more. Entries this Ready writes (new or rewritten
        # after a conflict) wait for the write, as does everything after a snapshot.
        stable = _stable_prefix(rd)
        if stable:
            self._apply(rd.committed[:stable])
        if rd.snapshot is not None:
            # A snapshot of our own still being written must land first: written after
            # this newer one from the leader, it would replace it in storage.
            await self._finish_snapshot_save()
        if rd.hard_state is not None or rd.entries or rd.snapshot is not None:
            started = time.monotonic()
            await self._persist(rd)
            self.metrics.raft_persist_seconds.labels(self.core.id).observe(
                time.monotonic() - started
            )
            if rd.entries:
                self.metrics.raft_batch_entries.labels(self.core.id).observe(len(rd.entries))
        if rd.snapshot is not None:
            await self._install_snapshot(rd.snapshot)
        if messages and self.transport is not None:
            self.transport.send(messages)
        if len(rd.committed) > stable:
            self._apply(rd.committed[stable:])
        for read in rd.read_states:
            future = self._read_waiting.pop(read.ctx, None)
            if future is not None:
                self._read_ready.append((read.index, future))

    async def _persist(self, rd: Ready) -> None:
        # Persisting the same Ready twice is harmless (entries replace their own suffix), so
        # a Redis blip is retried; if Redis stays away the loop fails and the node stops.
        # A write that has not succeeded STORAGE_STALL_SECONDS after it began, however
        # its time went (redis-py's own reconnect attempts, our retries, a disk that
        # hangs), stalls the node: see _on_storage_stall.
        started = time.monotonic()
        self._log_write_started = started
        stall = asyncio.get_running_loop().call_later(
            STORAGE_STALL_SECONDS, self._on_storage_stall, started)
        try:
            await self._retrying(
                lambda: self.storage.persist(rd.hard_state, rd.entries, rd.snapshot))
        finally:
            stall.cancel()
            self._log_write_started = None

    async def _retrying(self, write: Callable[[], Awaitable[None]]) -> None:
        """A storage write, retried on connection errors with a growing pause for
        storage_retry_seconds, then raised."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(self.retryable_errors),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            stop=stop_after_delay(self.storage_retry_seconds),
            reraise=True,
        ):
            with attempt:
                await self._tracked(write())

    async def _tracked(self, write: Awaitable[None]) -> None:
        """Run one storage write, noting since when writes have been failing (cleared
        by the next write that succeeds): /health reports a node that cannot persist."""
        try:
            await write
        except self.retryable_errors:
            if self.storage_failing_since is None:
                self.storage_failing_since = time.monotonic()
            raise
        self.storage_failing_since = None

    def _on_storage_stall(self, started: float) -> None:
        """The log write that began at `started` has not succeeded yet: answer what
        waits on it rather than keep it waiting for the rest of the retry budget."""
        if self._log_write_started != started:
            return  # that write is done
        log.warning("log write stalled; answering the requests waiting on it",
                    extra={"pending": len(self._pending), "queued": len(self._proposals)})
        # Pending proposals stay where they are: if the write succeeds after all, their
        # apply finds their futures answered already, which is harmless.
        self._answer_waiting(
            StorageStalled("this node cannot write its log right now"),
            OutcomeUnknown("this node cannot write its log; the command may still apply "
                           "through another leader"),
        )

    def _answer_waiting(self, refusal: BaseException, unknown: BaseException) -> None:
        """Answer the clients waiting on the log: commands not in it yet and reads get
        `refusal` (nothing applied; queued ones are dropped), commands in it `unknown`
        (another leader may still commit them)."""
        for proposal in self._proposals:
            _settle(proposal.future, refusal)
        self._proposals = []
        for proposal in self._pending.values():
            _settle(proposal.future, unknown)
        for _, future in self._reads:
            _settle(future, refusal)
        self._reads = []
        for future in self._read_waiting.values():
            _settle(future, refusal)

    async def _install_snapshot(self, snapshot: Snapshot) -> None:
        hashes = decode_snapshot_data(snapshot.data)
        # Older applied-state writes must land first, or they would overwrite the snapshot.
        await self._drain_state_writes()
        self.machines.load(hashes)
        await self.state.replace_all(self.machines.prefixes, hashes, snapshot.meta.index)
        self.metrics.raft_snapshots.labels(self.core.id, "installed").inc()
        log.info("installed snapshot", extra={"index": snapshot.meta.index})

    def _apply(self, committed: list[Entry]) -> None:
        outcomes: list[tuple[int, Command | None, Any]] = []
        for entry in committed:
            command: Command | None = None
            result: Any = None
            if entry.kind == EntryKind.NORMAL:
                try:
                    command = decode_command(entry.data)
                except CommandDecodeError as exc:
                    result = {"status": "error", "code": "bad_command", "message": str(exc)}
                else:
                    result = self.machines.apply(entry.index, command)
            outcomes.append((entry.index, command, result))
        self._queue_state_write(self.machines.take_writes(), committed[-1].index)
        now = time.monotonic()
        for (index, command, result), entry in zip(outcomes, committed, strict=True):
            proposal = self._pending.pop(index, None)
            if proposal is not None:
                if proposal.term == entry.term:
                    self.metrics.raft_replication_seconds.labels(self.core.id).observe(
                        now - proposal.started
                    )
                    _settle(proposal.future, None, result)
                else:
                    _settle(proposal.future, ProposalDropped("overwritten by a new leader"))
            if command is not None:
                for listener in self._apply_listeners:
                    listener(index, command, result)

    def _queue_state_write(self, writes: list[HashWrite], applied: int) -> None:
        """Materialise applied state in Redis off the critical path.

        Clients are answered once an entry is committed (durable in a majority's logs)
        and applied in memory; the hashes and the applied index follow in the background,
        in order, batched, and always together in one transaction. A crash in between
        loses nothing: the restarted node loads the older state with its older applied
        index and re-applies the committed entries after it from its log (or the
        snapshot, if the log was compacted meanwhile).
        """
        self._state_batches.append((writes, applied))
        if self._state_task is None or self._state_task.done():
            self._state_task = asyncio.create_task(self._write_state())

    async def _write_state(self) -> None:
        loop = asyncio.get_running_loop()
        while self._state_batches:
            # At most one write per state_write_delay: under load the apply batches of
            # that time gather into one transaction (and one wake-up of Redis), each key
            # written once. 0.1 s spans a typical lock hold, so an acquire and its
            # release become one DEL instead of DEL+HSET and DEL: a third of the
            # commands (lock_bench A/B runs: 1.6 against 2.0 ms of CPU per cycle with
            # 0.01 s). After a quiet spell the first batch goes at once, so at low rates
            # Redis (and redis-cli) lags the applied state by one write only. Nobody
            # waits on this write.
            wait = self._state_written_at + self.state_write_delay - loop.time()
            if wait > 0 and not self._stopping:
                await asyncio.sleep(wait)
            self._state_written_at = loop.time()
            batches, self._state_batches = self._state_batches, []
            writes = merge_hash_writes([w for batch, _ in batches for w in batch])
            applied = batches[-1][1]
            try:
                await self._retrying(functools.partial(self.state.apply, writes, applied))
            except Exception as exc:
                self.fatal_error = exc
                log.critical(
                    "applied state could not be written; node stops",
                    exc_info=exc,
                    extra={"error": str(exc)},
                )
                self._fail_everything(RunnerStopped(f"state write failed: {exc}"))
                self._stopping = True
                self._wake.set()
                return
            self.metrics.raft_state_write_entries.labels(self.core.id).observe(len(writes))

    async def _drain_state_writes(self) -> None:
        while self._state_task is not None and not self._state_task.done():
            await asyncio.shield(self._state_task)

    def _after_advance(self) -> None:
        applied = self.core.applied
        # Proposals at or below the applied index that were not settled were lost in a
        # snapshot install (their entries were replaced wholesale): their outcome is unknown.
        for index in [i for i in self._pending if i <= applied]:
            _settle(self._pending.pop(index).future, ProposalDropped("replaced by a snapshot"))
        still: list[tuple[int, asyncio.Future[None]]] = []
        for index, future in self._read_ready:
            if index <= applied:
                _settle(future, None)
            else:
                still.append((index, future))
        self._read_ready = still
        waiting: list[tuple[int, asyncio.Future[None]]] = []
        for index, future in self._applied_waiters:
            if index <= applied:
                _settle(future, None)
            elif not future.done():
                waiting.append((index, future))
        self._applied_waiters = waiting

    async def maybe_snapshot(self) -> None:
        """Snapshot the state once SNAPSHOT_THRESHOLD entries were applied since the last.

        The dump and its encoding hold the event loop (a few ms; unchanged locks stay
        packed); writing it to storage and compacting the log there happen in a task of
        their own, and the log in memory is compacted once they are done. They used to
        be awaited inside the loop's turn, so for those 25-35 ms every few seconds under
        load (100-150 ms with 60,000 held locks) this node appended, committed and
        answered nothing."""
        core = self.core
        if self._snapshot_save is not None:
            if not self._snapshot_save.done():
                return  # one at a time
            await self._finish_snapshot_save()  # raises what the write raised
        if core.applied - core.log.snapshot_index < self.snapshot_threshold:
            return
        started = time.monotonic()
        meta = core.snapshot_meta(core.applied)
        snapshot = Snapshot(meta, self.machines.snapshot_data())
        self._snapshot_save = asyncio.create_task(
            self._save_snapshot(snapshot, started, time.monotonic() - started),
            name=f"raft-snapshot-{meta.index}",
        )

    async def _save_snapshot(self, snapshot: Snapshot, started: float, encode_s: float) -> None:
        core = self.core
        await self.storage.save_snapshot(snapshot)
        await self.storage.compact(snapshot.meta.index)
        core.compact(snapshot)  # a no-op if a newer snapshot was installed meanwhile
        done = time.monotonic()
        self.metrics.raft_snapshots.labels(core.id, "taken").inc()
        self.metrics.raft_snapshot_seconds.labels(core.id).observe(done - started)
        log.info(
            "took snapshot",
            extra={
                "index": snapshot.meta.index,
                "bytes": len(snapshot.data),
                "encode_ms": round(encode_s * 1000, 1),
                "ms": round((done - started) * 1000, 1),
            },
        )

    async def _finish_snapshot_save(self) -> None:
        """Wait for the snapshot being written, if any; raise what its write raised (the
        loop then fails, as it did when the write was awaited in its turn)."""
        task, self._snapshot_save = self._snapshot_save, None
        if task is not None:
            await task

    def _publish_status(self) -> None:
        core = self.core
        m = self.metrics
        m.raft_term.labels(core.id).set(core.term)
        m.raft_commit_index.labels(core.id).set(core.commit)
        m.raft_applied_index.labels(core.id).set(core.applied)
        m.raft_last_index.labels(core.id).set(core.log.last_index)
        m.raft_rejoining.labels(core.id).set(1 if core.rejoining else 0)
        current = (core.role, core.term, core.leader)
        if current == self._last_role:
            return
        previous = self._last_role
        self._last_role = current
        m.set_role("candidate" if core.role == Role.CANDIDATE else core.role.value)
        if core.role == Role.LEADER and previous[0] != Role.LEADER:
            m.raft_elections.labels(core.id).inc()
        if previous[0] == Role.LEADER and core.role != Role.LEADER:
            # Reads that were waiting for leadership confirmation can no longer get it.
            for future in self._read_waiting.values():
                _settle(future, RaftError("lost leadership"))
            self._read_waiting.clear()
        log.info(
            "raft role",
            extra={"role": core.role.value, "term": core.term, "leader": core.leader},
        )
        for listener in self._role_listeners:
            listener(core.role, core.term, core.leader)

    def _fail_everything(self, exc: BaseException) -> None:
        self._answer_waiting(exc, OutcomeUnknown(f"{exc}; the command may still apply"))
        for _, future in self._read_ready:
            _settle(future, exc)
        for _, future in self._transfers:
            _settle(future, exc)
        for _, future in self._applied_waiters:
            _settle(future, exc)
        self._proposals, self._pending, self._reads = [], {}, []
        self._read_waiting, self._read_ready, self._transfers = {}, [], []
        self._applied_waiters = []


def _settle(future: asyncio.Future[Any], exc: BaseException | None, result: Any = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
        future.exception()  # mark retrieved: a caller that gave up must not log noise
    else:
        future.set_result(result)


def _stable_prefix(rd: Ready) -> int:
    """How many of `rd.committed` are already durable in this node's log: those before
    the first entry this Ready writes (all of them when it writes none), none when it
    installs a snapshot."""
    if rd.snapshot is not None or not rd.committed:
        return 0
    if not rd.entries:
        return len(rd.committed)
    # Committed entries are consecutive: applied+1 .. commit.
    return max(0, min(len(rd.committed), rd.entries[0].index - rd.committed[0].index))
