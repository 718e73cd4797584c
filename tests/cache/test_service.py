"""The cache runtime (CacheService) in one process: several services joined by an in-memory
transport, each with a memory store. Checks what the cores cannot: the I/O order
(persist before send and reply), the read-hit fast path doing no I/O, group commit,
restart from the store, and timeouts as 503."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from service.cache import wire
from service.cache.messages import (
    Data,
    FwdDone,
    FwdGetM,
    FwdGetS,
    GetM,
    GetS,
    Inv,
    InvAck,
    Message,
    PutAck,
    PutE,
    PutM,
    PutS,
    State,
    Unblock,
)
from service.cache.service import CacheError, CacheService, CacheSettings
from service.cache.store import MemoryCacheStore
from service.metrics import NodeMetrics
from service.placement import home_node

NODES = ("n1", "n2", "n3")
FAST = CacheSettings(lease_ms=300, resend_ms=100, read_timeout_ms=800, write_timeout_ms=1_000)


class Net:
    """Delivers batches between services; can cut a node off and count traffic."""

    def __init__(self) -> None:
        self.services: dict[str, CacheService] = {}
        self.down: set[str] = set()
        self.posts = 0

    async def post(self, sender: str, peer: str, messages: list[Message]) -> None:
        self.posts += 1
        await asyncio.sleep(0)
        target = self.services.get(peer)
        if peer in self.down or sender in self.down or target is None or not target.ready:
            raise ConnectionError(f"{peer} unreachable")
        # Through the codec, as over HTTP.
        target.receive(sender, [wire.decode(wire.encode(m)) for m in messages])


async def start(
    net: Net, node: str, store: MemoryCacheStore | None = None, settings: CacheSettings = FAST
) -> CacheService:
    service = CacheService(node, NodeMetrics(node), store or MemoryCacheStore(), settings)

    async def post(peer: str, messages: list[Message]) -> None:
        await net.post(node, peer, messages)

    service._post = post  # type: ignore[method-assign]
    service.attach(SimpleNamespace(core=SimpleNamespace(voters=NODES)))  # type: ignore[arg-type]
    for _ in range(200):
        if service.ready:
            break
        await asyncio.sleep(0.005)
    net.services[node] = service
    return service


@pytest.fixture
async def net() -> Any:
    network = Net()
    for node in NODES:
        await start(network, node)
    yield network
    for service in network.services.values():
        await service.stop()


def homed_at(node: str, prefix: str = "k") -> str:
    return next(f"{prefix}{i}" for i in range(1000) if home_node(f"{prefix}{i}", NODES) == node)


async def test_read_your_write_across_nodes_and_invalidation(net: Net) -> None:
    a, b, c = (net.services[n] for n in NODES)
    key = homed_at("n3")
    await a.write(key, {"v": 1})
    got = await b.read(key)
    assert (got.value, got.version, got.hit) == ({"v": 1}, 1, False)
    assert (await b.read(key)).hit
    await c.write(key, "two")  # b's shared copy must be gone before this returns
    assert b.lines is not None and b.lines.state(key, 10**15) is State.I
    got = await b.read(key)
    assert (got.value, got.version) == ("two", 2)


async def test_a_hit_does_no_redis_and_no_network(net: Net) -> None:
    a = net.services["n1"]
    key = homed_at("n2")
    await a.write(key, 1)
    await asyncio.sleep(0.05)  # let the Unblock go out
    store = a.store
    assert isinstance(store, MemoryCacheStore)
    persists, posts = store.persists, net.posts
    for _ in range(100):
        assert (await a.read(key)).hit
    assert (store.persists, net.posts) == (persists, posts)


async def test_nothing_is_answered_before_it_is_durable(net: Net) -> None:
    a = net.services["n1"]
    key = homed_at("n1")
    await a.write(key, 1)  # n1 owns it: later writes are local
    gate = asyncio.Event()
    store = a.store
    assert isinstance(store, MemoryCacheStore)
    real_persist = store.persist

    async def slow_persist(writes: Any) -> None:
        await gate.wait()
        await real_persist(writes)

    store.persist = slow_persist  # type: ignore[method-assign]
    write = asyncio.ensure_future(a.write(key, 2))
    read = asyncio.ensure_future(a.read(key))  # would be a hit, but the line is not durable
    await asyncio.sleep(0.05)
    assert not write.done() and not read.done()
    gate.set()
    assert (await write).version == 2
    assert (await read).version == 2
    assert store.lines[key]["version"] == "2"


async def test_operations_in_one_turn_share_one_persist(net: Net) -> None:
    a = net.services["n1"]
    keys = [homed_at("n1", f"g{i}-") for i in range(20)]
    for key in keys:
        await a.write(key, 0)
    store = a.store
    assert isinstance(store, MemoryCacheStore)
    before = store.persists
    await asyncio.gather(*(a.write(key, 1) for key in keys))
    assert store.persists - before <= 2


async def test_an_owner_restarted_from_its_store_serves_its_line(net: Net) -> None:
    a = net.services["n1"]
    key = homed_at("n2")
    await a.write(key, "dirty")  # only n1 has this version: n1 is M
    store = a.store
    assert isinstance(store, MemoryCacheStore)
    await a.stop()
    restarted = await start(net, "n1", store.crash())
    got = await restarted.read(key)
    assert (got.value, got.version, got.state, got.hit) == ("dirty", 1, State.M, True)
    got = await net.services["n3"].read(key)  # forwarded to the restarted owner
    assert (got.value, got.version) == ("dirty", 1)


async def test_a_down_home_answers_503_within_the_timeout(net: Net) -> None:
    a = net.services["n1"]
    key = homed_at("n3")
    net.down.add("n3")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(CacheError) as failed:
        await a.read(key)
    assert failed.value.status == 503 and failed.value.code == "unavailable"
    assert loop.time() - started < FAST.read_timeout_ms / 1000 + 0.5
    net.down.clear()
    for _ in range(50):  # the link notices within its backoff (at most 1 s)
        try:
            assert (await a.read(key)).found is False
            break
        except CacheError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the home never answered again")


async def test_a_write_waits_for_a_silent_sharer_at_most_one_lease(net: Net) -> None:
    a, b, c = (net.services[n] for n in NODES)
    key = homed_at("n1")
    await a.write(key, 1)
    await b.read(key)
    await c.read(key)  # b and c share it
    net.down.add("n2")  # b never acks its Inv
    loop = asyncio.get_running_loop()
    started = loop.time()
    done = await c.write(key, 2)
    assert done.version == 2
    assert loop.time() - started < FAST.lease_ms / 1000 + 0.3
    net.down.clear()


def test_stats_describe_the_cache(net: Net) -> None:
    info = net.services["n1"].describe()
    assert info["capacity"]["max_entries"] == FAST.max_entries
    assert set(info["states"]) == {"M", "E", "S", "I"}
    assert {"hits", "misses", "hit_ratio", "invalidations_sent", "write_backs"} <= set(info)


# ---- the wire codec ------------------------------------------------------------------------

EVERY_MESSAGE: list[Message] = [
    GetS("k", "n1", 7),
    GetM("k", "n1"),
    PutS("k", "n1", 3),
    PutE("k", "n1", 3, 4),
    PutM("k", "n1", 3, 4, '{"a":1}'),
    PutM("k", "n1", 3, 4, None),
    InvAck("k", "n1", 3, True, '"d"', 9),
    FwdDone("k", "n1", 3, True, "null", 2, kept=True),
    Unblock("k", "n1", 3),
    Data("k", "h", 3, State.S, '"v"', 2, 100, 99),
    Inv("k", "h", 3),
    FwdGetS("k", "h", 3, "n2", 100, 5),
    FwdGetM("k", "h", 3, "n2", 5),
    PutAck("k", "h", 3),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    assert wire.decode(wire.encode(message)) == message


def test_a_message_without_its_optional_trailing_fields_is_accepted() -> None:
    assert wire.decode(["GetS", "k", "n1"]) == GetS("k", "n1", 0)


@pytest.mark.parametrize(
    "raw",
    [
        [],
        "GetS",
        ["Nope", "k", "n1"],
        ["GetS", "k"],
        ["GetS", "k", "n1", 1, 2],
        ["Unblock", "k", "n1", -1],
        ["Unblock", "k", "n1", True],
        ["Inv", 5, "h", 1],
        ["Data", "k", "h", 1, "X", None, 0],
        ["PutM", "k", "n1", 1, 1, 42],
        ["InvAck", "k", "n1", 1, "yes"],
        ["GetS", "k" * 2000, "n1"],
    ],
)
def test_malformed_messages_are_refused(raw: Any) -> None:
    with pytest.raises(ValueError):
        wire.decode(raw)
