"""Routing without sockets: routers wired to each other through an in-memory forwarder."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache import codec
from dcache.codec import ErrorCode, Limits, Status
from dcache.errors import PeerUnavailable
from dcache.node import gather_members
from dcache.protocol import ServerSession as Session
from dcache.router import MOVED_RETRY_DELAYS, Router
from dcache.shard import ShardMap, shard_of
from dcache.store import Store

NODES = ("a:1", "b:1", "c:1")


class Later:
    """A forward handed over in placement; it runs when awaited (no real link keeps order here)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call

    async def wait(self) -> Any:
        return await self.call()

    def release(self) -> None:
        pass

    def notify(self, callback: Callable[[bytes | None], None]) -> None:
        return None  # only awaited here


class Wire:
    """Forwards a node's requests to another router as a peer would."""

    def __init__(self) -> None:
        self.routers: dict[str, Router] = {}
        self.down: set[str] = set()
        self.calls: list[tuple[str, int]] = []
        self.relayed = 0

    def forwarder_for(self, sender: str) -> Any:
        wire = self

        class Forwarder:
            async def forward(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
                if node_id in wire.down:
                    raise PeerUnavailable(f"{node_id} is down")
                wire.calls.append((node_id, len(requests)))
                session = Session(greeted=True, peer_id=sender)
                messages = [[i, op, args] for i, (op, args) in enumerate(requests)]
                reply = await wire.routers[node_id].handle(session, [cbor2.dumps(messages)])
                return [(status, body) for _, status, body in cbor2.loads(reply)]

            def submit(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> Later:
                return Later(lambda: self.forward(node_id, requests))

            def submit_raw(self, node_id: str, rest: bytes) -> Later:
                return Later(lambda: self.relay(node_id, rest))

            async def relay(self, node_id: str, rest: bytes) -> bytes:
                if node_id in wire.down:
                    raise PeerUnavailable(f"{node_id} is down")
                wire.calls.append((node_id, 1))
                wire.relayed += 1
                session = Session(greeted=True, peer_id=sender)
                reply = await wire.routers[node_id].handle(session, [codec.single_frame(7, rest)])
                split = codec.split_single(reply)
                assert split is not None and split[0] == 7
                return reply[split[1] :]

        return Forwarder()


def make_cluster(epoch: int = 1, members: tuple[str, ...] = NODES, clock: Callable[[], float] | None = None) -> Wire:
    wire = Wire()
    for node_id in members:
        store = Store(clock=lambda: 0.0)

        async def gather(node_id: str = node_id) -> dict[str, Any]:  # as a node gathers them
            router = wire.routers[node_id]
            return await gather_members(
                node_id=node_id,
                shard_map=router.shard_map,
                client_addresses=router.client_addresses,
                own_stats=router.store.stats,
                peers=router.peers,
            )

        wire.routers[node_id] = Router(
            store=store,
            node_id=node_id,
            limits=Limits(),
            shard_map=ShardMap.build(epoch, members),
            stats=store.stats,
            members=gather,
            server_name="test",
            peers=wire.forwarder_for(node_id),
            **({"clock": clock} if clock else {}),
        )
    return wire


async def call(router: Router, *messages: list[Any]) -> list[list[Any]]:
    session = Session(greeted=True)
    reply = await router.handle(session, [cbor2.dumps(list(messages))])
    return cbor2.loads(reply)


def keys_owned_by(shard_map: ShardMap, owner: str, count: int) -> list[bytes]:
    keys = []
    i = 0
    while len(keys) < count:
        key = f"key{i}".encode()
        if shard_map.owner("", key) == owner:
            keys.append(key)
        i += 1
    return keys


async def test_every_node_serves_every_key() -> None:
    wire = make_cluster()
    a, b, c = (wire.routers[n] for n in NODES)
    keys = [f"user:{i}".encode() for i in range(60)]
    for i, key in enumerate(keys):
        [reply] = await call([a, b, c][i % 3], [i, "set", {"key": key, "value": key + b"!"}])
        assert reply[:2] == [i, Status.OK]
    for router in (a, b, c):
        replies = await call(router, *[[i, "get", {"key": k}] for i, k in enumerate(keys)])
        assert [r[2] for r in replies] == [k + b"!" for k in keys]
    # Each entry lives only on its owner.
    counts = [len(r.store) for r in (a, b, c)]
    assert sum(counts) == 60 and all(counts)
    for router in (a, b, c):
        for key in keys:
            owned = router.shard_map.owner("", key) == router.node_id
            assert (router.store.get("", key) is not None) == owned


async def test_a_frame_is_split_by_owner_and_forwarded_in_one_batch_each() -> None:
    wire = make_cluster()
    a = wire.routers["a:1"]
    b_keys = keys_owned_by(a.shard_map, "b:1", 5)
    c_keys = keys_owned_by(a.shard_map, "c:1", 5)
    messages = [[i, "set", {"key": k, "value": b"v"}] for i, k in enumerate(b_keys + c_keys)]
    replies = await call(a, *messages)
    assert [r[0] for r in replies] == list(range(10))
    assert sorted(wire.calls) == [("b:1", 5), ("c:1", 5)]


async def test_multi_key_ops_are_split_and_merged_in_order() -> None:
    wire = make_cluster()
    a = wire.routers["a:1"]
    keys = [f"k{i}".encode() for i in range(30)]
    [reply] = await call(a, [1, "mset", {"items": [[k, k.upper()] for k in keys], "ttl_ms": 0}])
    assert reply[1] == Status.OK and len(reply[2]) == 30
    [reply] = await call(wire.routers["b:1"], [2, "mget", {"keys": keys + [b"missing"]}])
    assert reply[2] == [k.upper() for k in keys] + [None]
    [reply] = await call(wire.routers["c:1"], [3, "mdelete", {"keys": keys[:10] + [b"missing"]}])
    assert reply[2] == 10
    assert sum(len(r.store) for r in wire.routers.values()) == 20


async def test_peer_requests_for_keys_not_owned_are_answered_moved() -> None:
    wire = make_cluster(epoch=7)
    a = wire.routers["a:1"]
    [key] = keys_owned_by(a.shard_map, "b:1", 1)
    session = Session(greeted=True, peer_id="c:1")
    reply = cbor2.loads(await a.handle(session, [cbor2.dumps([[1, "get", {"key": key}]])]))
    assert reply[0][1] == Status.ERROR
    code, _, details = reply[0][2]
    assert code == ErrorCode.MOVED and details == {"epoch": 7, "owner": "b:1"}
    assert len(a.store) == 0


async def test_stale_sender_retries_with_the_new_map(autojump_clock: trio.abc.Clock) -> None:
    # d joined; b, c and d know it, a does not yet.
    everyone = (*NODES, "d:1")
    wire = make_cluster(epoch=2, members=everyone)
    a = wire.routers["a:1"]
    a.shard_map = ShardMap.build(1, NODES)
    new_map = wire.routers["b:1"].shard_map
    # A key a believes b owns, which moved to d.
    key = next(
        k
        for k in (f"x{i}".encode() for i in range(100000))
        if a.shard_map.owner("", k) == "b:1" and new_map.owner("", k) == "d:1"
    )

    async def catch_up() -> None:
        await trio.sleep(0.07)  # a's membership catches up between retries
        a.shard_map = new_map

    async with trio.open_nursery() as nursery:
        nursery.start_soon(catch_up)
        [reply] = await call(a, [1, "set", {"key": key, "value": b"v"}])
    assert reply[1] == Status.OK
    assert wire.routers["d:1"].store.get("", key) == b"v"
    assert len(wire.routers["b:1"].store) == 0
    assert a.counters.moved_retries >= 1


async def test_moved_retries_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    wire = make_cluster(epoch=1)
    a = wire.routers["a:1"]
    [key] = keys_owned_by(a.shard_map, "b:1", 1)
    # b insists c owns everything, c insists b does: views that never converge.
    wire.routers["b:1"].shard_map = ShardMap.build(5, ("c:1",))
    wire.routers["c:1"].shard_map = ShardMap.build(5, ("b:1",))
    with trio.fail_after(5):
        [reply] = await call(a, [1, "get", {"key": key}])
    assert reply[1] == Status.ERROR and reply[2][0] == ErrorCode.UNAVAILABLE
    assert a.counters.moved_retries == len(MOVED_RETRY_DELAYS)


async def test_unreachable_owner_fails_only_its_requests() -> None:
    wire = make_cluster()
    a = wire.routers["a:1"]
    wire.down.add("b:1")
    [kb] = keys_owned_by(a.shard_map, "b:1", 1)
    [kc] = keys_owned_by(a.shard_map, "c:1", 1)
    [ka] = keys_owned_by(a.shard_map, "a:1", 1)
    replies = await call(
        a, [1, "set", {"key": kb, "value": b"1"}], [2, "set", {"key": kc, "value": b"2"}], [3, "set", {"key": ka, "value": b"3"}]
    )
    assert [r[1] for r in replies] == [Status.ERROR, Status.OK, Status.OK]
    assert replies[0][2][0] == ErrorCode.UNAVAILABLE
    [reply] = await call(a, [4, "mget", {"keys": [ka, kb, kc]}])
    assert reply[1] == Status.ERROR and reply[2][0] == ErrorCode.UNAVAILABLE


async def test_a_lone_request_is_relayed_and_its_reply_passed_back() -> None:
    wire = make_cluster()
    a = wire.routers["a:1"]
    [kb] = keys_owned_by(a.shard_map, "b:1", 1)
    [reply] = await call(a, [41, "set", {"key": kb, "value": b"relayed"}])
    assert reply[:2] == [41, Status.OK]
    [reply] = await call(a, [2**40, "get", {"key": kb}])
    assert reply == [2**40, Status.OK, b"relayed"]
    [reply] = await call(a, [3, "get", {"key": kb, "bogus": 1}])  # refused before it travels
    assert reply[0] == 3 and reply[2][0] == ErrorCode.BAD_REQUEST
    assert wire.relayed == 2 and a.counters.forwarded == 2
    # A frame the relay cannot split (an array of indefinite length) is forwarded the long way.
    odd = b"\x9f" + cbor2.dumps([5, "get", {"key": kb}]) + b"\xff"
    assert cbor2.loads(await a.handle(Session(greeted=True), [odd])) == [[5, Status.OK, b"relayed"]]
    assert wire.relayed == 2 and a.counters.forwarded == 3
    wire.down.add("b:1")
    [reply] = await call(a, [4, "get", {"key": kb}])
    assert reply[0] == 4 and reply[2][0] == ErrorCode.UNAVAILABLE
    assert a.counters.ops[("get", "unavailable")] == 1


async def test_members_gathers_every_nodes_stats() -> None:
    wire = make_cluster()
    a = wire.routers["a:1"]
    a.client_addresses = {"a:1": "a:2", "b:1": "b:2", "c:1": "c:2"}
    await call(a, *[[i, "set", {"key": f"k{i}".encode(), "value": b"v"}] for i in range(30)])
    wire.down.add("c:1")
    [reply] = await call(a, [1, "members", {}])
    view = reply[2]
    assert view["epoch"] == 1
    rows = {m["node"]: m for m in view["members"]}
    assert rows["a:1"]["client"] == "a:2" and rows["a:1"]["state"] == "up"
    assert rows["c:1"]["state"] == "unreachable"
    assert rows["a:1"]["stats"]["keys"] + rows["b:1"]["stats"]["keys"] == 30 - len(wire.routers["c:1"].store)
    assert sum(m["shards"] for m in view["members"]) == 8192


@pytest.mark.parametrize("op", [["get"], {"get": 1}, 7, None])
async def test_a_lone_request_with_an_op_of_any_type_is_refused(op: Any) -> None:
    wire = make_cluster()
    reply = cbor2.loads(await wire.routers["a:1"].handle(Session(greeted=True), [cbor2.dumps([[1, op, {"key": b"k"}]])]))
    assert reply[0][0] == 1 and reply[0][2][0] == ErrorCode.UNKNOWN_OP


@pytest.mark.parametrize("op", ["get", "delete", "ttl"])
async def test_hello_is_required_even_for_peers(op: str) -> None:
    wire = make_cluster()
    reply = cbor2.loads(await wire.routers["a:1"].handle(Session(), [cbor2.dumps([[1, op, {"key": b"k"}]])]))
    assert reply[0][2][0] == ErrorCode.HELLO_REQUIRED


def test_router_counts_ops_by_result() -> None:
    wire = make_cluster(members=("a:1",))
    a = wire.routers["a:1"]

    async def run() -> None:
        await call(a, [1, "get", {"key": b"k"}], [2, "nonsense", {}], [3, "set", {"key": b"k", "value": b"v"}])

    trio.run(run)
    assert a.counters.ops[("get", "ok")] == 1
    assert a.counters.ops[("set", "ok")] == 1
    assert a.counters.ops[("invalid", "error")] == 1


keyed_args = st.dictionaries(
    st.sampled_from(["key", "ns", "value", "ttl_ms", "junk"]),
    st.none() | st.booleans() | st.integers(min_value=-(2**65), max_value=2**65) | st.binary(max_size=20) | st.text(max_size=10),
    max_size=4,
)
lone_requests = st.tuples(
    st.integers(min_value=-2, max_value=2**64), st.sampled_from(["get", "set", "delete", "ttl", "mget"]), keyed_args
)


_fuzz_wire: Wire | None = None


@settings(max_examples=300, deadline=None)
@given(lone_requests, st.integers(min_value=0, max_value=60), st.binary(max_size=3))
def test_fuzz_lone_requests_always_get_a_reply(request: tuple[int, str, dict[str, Any]], position: int, garbage: bytes) -> None:
    # Lone keyed requests take the short way, relayed to other nodes as they
    # came; whatever they hold, each gets one well-formed reply.
    global _fuzz_wire
    if _fuzz_wire is None:
        _fuzz_wire = make_cluster()  # placing 8192 shards three times is slow: once will do
    wire = _fuzz_wire
    payload = bytearray(cbor2.dumps([list(request)]))
    if garbage:
        position %= len(payload)
        payload[position : position + len(garbage)] = garbage

    async def run() -> bytes:
        return await wire.routers["a:1"].handle(Session(greeted=True), [bytes(payload)])

    replies = cbor2.loads(trio.run(run))
    assert type(replies) is list
    for _rid, status, body in replies:
        assert status in (Status.OK, Status.ERROR)
        if status == Status.ERROR:
            assert ErrorCode(body[0]) and type(body[1]) is str


async def test_a_node_past_its_vouched_time_answers_keyed_requests_unavailable(mock_clock: trio.testing.MockClock) -> None:
    """Past the time its membership vouched for (its lease may have lapsed,
    others may own its keys), a node serves no keyed request, whichever way
    it comes, and still answers the rest; once vouched again it serves."""
    wire = make_cluster(clock=trio.current_time)
    a = wire.routers["a:1"]
    [ka] = keys_owned_by(a.shard_map, "a:1", 1)
    [kb] = keys_owned_by(a.shard_map, "b:1", 1)
    a.vouched_until = trio.current_time() + 5
    [reply] = await call(a, [1, "set", {"key": ka, "value": b"old"}])
    assert reply[1] == Status.OK
    mock_clock.jump(5)  # the bound is when the lease may lapse: not vouched from then on

    def unavailable(reply: list[Any], rid: int) -> bool:
        return reply[0] == rid and reply[1] == Status.ERROR and reply[2][0] == ErrorCode.UNAVAILABLE and "etcd" in reply[2][1]

    calls = len(wire.calls)
    # Alone in its frame (the short way), owned here or elsewhere.
    assert unavailable((await call(a, [2, "get", {"key": ka}]))[0], 2)
    assert unavailable((await call(a, [3, "get", {"key": kb}]))[0], 3)
    # In a batch, next to what is still answered.
    replies = await call(
        a,
        [4, "get", {"key": ka}],
        [5, "set", {"key": kb, "value": b"x"}],
        [6, "mget", {"keys": [ka, kb]}],
        [7, "mdelete", {"keys": [ka]}],
        [8, "ping", {}],
        [9, "stats", {}],
        [10, "get", {"key": ka, "bogus": 1}],
        [11, "members", {}],
    )
    assert [unavailable(r, i) for i, r in enumerate(replies[:4], 4)] == [True] * 4
    assert replies[4] == [8, Status.OK, None]
    assert replies[5][1] == Status.OK and replies[5][2]["keys"] == 1
    assert replies[6][2][0] == ErrorCode.BAD_REQUEST
    assert replies[7][1] == Status.OK and len(replies[7][2]["members"]) == 3
    # Several frames received in one read; over a peer link (never "moved" nor a value).
    frames = [cbor2.dumps([[12, "get", {"key": ka}]]), cbor2.dumps([[13, "ttl", {"key": ka}]])]
    replies = cbor2.loads(await a.handle(Session(greeted=True), frames))
    assert unavailable(replies[0], 12) and unavailable(replies[1], 13)
    peer = Session(greeted=True, peer_id="b:1")
    for key in (ka, kb):
        [reply] = cbor2.loads(await a.handle(peer, [cbor2.dumps([[14, "get", {"key": key}]])]))
        assert unavailable(reply, 14)
    # A new connection still says hello, and must.
    fresh = Session()
    [refused, hello] = cbor2.loads(
        await a.handle(fresh, [cbor2.dumps([[15, "get", {"key": ka}], [16, "hello", {"version": 1}]])])
    )
    assert refused[2][0] == ErrorCode.HELLO_REQUIRED and hello[:2] == [16, Status.OK]
    assert sorted(wire.calls[calls:]) == [("b:1", 1), ("c:1", 1)]  # only members asking for stats: nothing keyed travelled
    assert a.store.get("", ka) == b"old"  # dropping what it holds is the node's business
    assert a.counters.ops[("get", "unavailable")] == 6 and a.counters.ops[("mget", "unavailable")] == 1
    assert a.counters.ops[("ping", "ok")] == 1

    a.vouched_until = trio.current_time() + 5
    [reply] = await call(a, [20, "get", {"key": ka}])
    assert reply == [20, Status.OK, b"old"]
    reply, _ = await call(a, [21, "set", {"key": kb, "value": b"new"}], [22, "ping", {}])
    assert reply[:2] == [21, Status.OK] and wire.routers["b:1"].store.get("", kb) == b"new"


async def test_a_request_placed_here_on_a_retry_is_checked_again(autojump_clock: trio.abc.Clock) -> None:
    """A forward bounced as "moved" is placed again after a wait; if it lands
    on this node by then past its vouched time, it is not served."""
    wire = make_cluster(epoch=2, clock=trio.current_time)
    a = wire.routers["a:1"]
    new_map = a.shard_map
    a.shard_map = ShardMap.build(1, ("b:1", "c:1"))  # a's view is behind: it thinks b owns the key
    [key] = keys_owned_by(new_map, "a:1", 1)
    assert a.shard_map.owner("", key) == "b:1"
    a.store.set("", key, b"old", 0)
    first_retry = MOVED_RETRY_DELAYS[0]
    a.vouched_until = trio.current_time() + first_retry / 5

    async def catch_up() -> None:
        await trio.sleep(first_retry / 2)  # past the bound, before the first retry
        a.shard_map = new_map

    async with trio.open_nursery() as nursery:
        nursery.start_soon(catch_up)
        [reply] = await call(a, [1, "get", {"key": key}])
    assert reply[1] == Status.ERROR and reply[2][0] == ErrorCode.UNAVAILABLE
    assert a.counters.moved_retries == 1


async def test_requests_from_peers_for_an_arriving_shard_are_passed_to_its_holder(autojump_clock: trio.abc.Clock) -> None:
    """b waits for shard S's entries from a; c routes S to b, its owner by
    the view: b passes a lone request and a many-key one on to a (found by
    review: the many-key one was bounced until c gave up)."""
    a_id, b_id, c_id = "a:1", "b:1", "c:1"
    wire = make_cluster(epoch=2, members=(a_id, b_id, c_id))
    a, b, c = (wire.routers[n] for n in (a_id, b_id, c_id))
    [key] = keys_owned_by(c.shard_map, b_id, 1)
    [other] = keys_owned_by(c.shard_map, c_id, 1)
    shard = shard_of("", key)
    for router in (a, b):
        owners = list(router.shard_map.shard_owners)
        owners[shard] = a_id
        router.shard_map = ShardMap(2, (a_id, b_id, c_id), owners)
    b.arriving = {shard: a_id}
    a.store.set("", key, b"held by a")
    [get] = await call(c, [1, "get", {"key": key}])
    assert get[2] == b"held by a"
    [mget] = await call(c, [2, "mget", {"keys": [key, other]}])
    assert mget[1] == Status.OK and mget[2] == [b"held by a", None]


class RefusingReplicator:
    """A replicator whose replicas never confirm: as when a replica's view disagrees for good."""

    def check(self, ns: str, keys: list[bytes]) -> None:
        return None

    def send(self, ns: str, keys: list[bytes]) -> Any:
        class Refused:
            def replicas(self) -> list[str]:
                return []

            def notify(self, callback: Any) -> None:
                return None

            async def wait(self) -> str:
                return "b:1 does not keep a copy of this key yet; try again"

            def release(self) -> None:
                pass

        return Refused()


async def test_a_write_its_replicas_did_not_confirm_is_answered_and_counted_unavailable() -> None:
    wire = make_cluster(members=("a:1",))
    router = wire.routers["a:1"]
    router.replicator = RefusingReplicator()  # type: ignore[assignment]
    single = await call(router, [1, "set", {"key": b"k", "value": b"v"}])
    batch = await call(router, [2, "set", {"key": b"k", "value": b"v"}], [3, "get", {"key": b"k"}])
    assert [r[:2] for r in single + batch] == [[1, 1], [2, 1], [3, 0]]
    assert single[0][2][0] == ErrorCode.UNAVAILABLE.value
    assert router.counters.ops.get(("set", "unavailable")) == 2 and router.counters.ops.get(("set", "ok"), 0) == 0


async def test_a_scan_page_ends_early_past_its_time_budget_and_the_walk_still_lists_every_key() -> None:
    ticks = itertools.count()
    wire = make_cluster(clock=lambda: next(ticks) * 0.004)  # (every reading of the clock 4 ms later)
    router = wire.routers[NODES[0]]
    await call(router, [1, "mset", {"items": [[f"k{i}", b"v"] for i in range(3000)]}])
    [[_, status, page]] = await call(router, [2, "scan", {"prefix": "nothing-has-this-prefix"}])
    assert status == Status.OK and page["keys"] == [] and page["cursor"] is not None  # (not all 8192 shards at once)
    keys: list[bytes] = []
    cursor = None
    pages = 0
    while True:
        [[_, status, page]] = await call(router, [3, "scan", {"cursor": cursor, "limit": 1000}])
        keys.extend(page["keys"])
        cursor, pages = page["cursor"], pages + 1
        if cursor is None:
            break
    assert sorted(keys) == sorted(f"k{i}".encode() for i in range(3000)) and pages > 3
