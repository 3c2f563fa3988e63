"""A real node in-process on loopback port 0, driven by the real clients."""

from __future__ import annotations

import math
import multiprocessing
import random
import socket
import time
from typing import Any

import cbor2
import pytest
import trio
import trio.testing
from support import start_node

import dcache
from dcache import codec, protocol, transport, wsframe
from dcache.codec import ErrorCode, Limits
from dcache.node import BoundAddresses, Node, NodeConfig

TIMEOUT = 10


@pytest.fixture
async def node(nursery: trio.Nursery) -> tuple[Node, BoundAddresses]:
    return await start_node(nursery)


@pytest.fixture
async def client(node: tuple[Node, BoundAddresses]):
    async with dcache.connect(node[1].client_address, timeout=TIMEOUT) as c:
        yield c


async def raw_connection(address: str) -> transport.Connection:
    return await transport.connect(address, max_message=1 << 26, default_port=0)


async def raw_call(conn: transport.Connection, messages: list) -> list:
    await conn.send(codec.encode_frame(messages))
    (payload,) = await conn.receive()
    return cbor2.loads(payload)


HELLO = [0, "hello", {"version": codec.PROTOCOL_VERSION}]


async def test_set_get_delete_ttl(client: dcache.Client) -> None:
    with trio.fail_after(TIMEOUT):
        assert await client.get("user:1001") is None
        v1 = await client.set("user:1001", "Alice")
        assert await client.get("user:1001") == b"Alice"
        v2 = await client.set("user:1001", b"\x00\xffbinary")
        assert v2 > v1
        assert await client.get(b"user:1001") == b"\x00\xffbinary"
        assert await client.ttl("user:1001") == math.inf
        assert await client.ttl("missing") is None
        assert await client.delete("user:1001") is True
        assert await client.delete("user:1001") is False
        assert await client.get("user:1001") is None


async def test_namespaces_are_separate(client: dcache.Client) -> None:
    with trio.fail_after(TIMEOUT):
        await client.set("k", "default")
        await client.set("k", "other", ns="sessions")
        assert await client.get("k") == b"default"
        assert await client.get("k", ns="sessions") == b"other"
        await client.delete("k", ns="sessions")
        assert await client.get("k") == b"default"


async def test_batches(client: dcache.Client) -> None:
    with trio.fail_after(TIMEOUT):
        versions = await client.mset({f"k{i}": f"v{i}" for i in range(100)})
        assert len(versions) == 100 and versions == sorted(versions)
        values = await client.mget([f"k{i}" for i in range(0, 102, 2)])
        assert values[:50] == [f"v{i}".encode() for i in range(0, 100, 2)]
        assert values[50] is None
        assert await client.mdelete(["k1", "k2", "nope"]) == 2
        assert await client.mget(["k1", "k2", "k3"]) == [None, None, b"v3"]


async def test_stats_count_what_happened(client: dcache.Client) -> None:
    with trio.fail_after(TIMEOUT):
        await client.set("a", "1")
        await client.set("b", "22")
        await client.get("a")
        await client.get("zz")
        await client.delete("b")
        stats = await client.stats()
    assert (stats["hits"], stats["misses"], stats["sets"], stats["deletes"]) == (1, 1, 2, 1)
    assert stats["keys"] == 1
    assert stats["data_bytes"] == len("a") + len("1")
    assert stats["shards"] == 8192 and stats["members"] == 1
    assert stats["connections"] == 1
    assert stats["process_memory_bytes"] > 0


async def test_ttl_expires_on_virtual_time(mock_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    # mock_clock does not move unless jumped, so socket waits cannot trip timeouts.
    _, bound = await start_node(nursery)
    async with dcache.connect(bound.client_address) as client:
        await client.set("session:abc", "active", ttl=60)
        await client.set("forever", "x")
        assert await client.ttl("session:abc") == 60
        mock_clock.jump(59.5)
        assert await client.get("session:abc") == b"active"
        assert await client.ttl("session:abc") == pytest.approx(0.5)
        mock_clock.jump(0.5)
        assert await client.get("session:abc") is None
        assert await client.get("forever") == b"x"
        stats = await client.stats()
        assert stats["expired"] == 1 and stats["keys"] == 1


async def test_sweeper_reclaims_expired_keys_nobody_reads(mock_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    node, bound = await start_node(nursery)
    async with dcache.connect(bound.client_address) as client:
        await client.mset({f"k{i}": "v" for i in range(2500)}, ttl=1)
        assert len(node.store) == 2500
        mock_clock.jump(2)
        # Let the sweeper (which sleeps on the mock clock) run its passes.
        for _ in range(10):
            mock_clock.jump(0.2)
            await trio.testing.wait_all_tasks_blocked()
        assert len(node.store) == 0
        assert (await client.stats())["expired"] == 2500


async def test_many_concurrent_callers_share_one_connection(client: dcache.Client) -> None:
    """The seed's concurrent-access test: 100 tasks x 100 ops, no lost or crossed replies."""

    async def worker(n: int) -> None:
        rng = random.Random(n)
        for i in range(100):
            key = f"w{n}:k{rng.randrange(10)}"
            value = f"{n}:{i}".encode()
            await client.set(key, value)
            assert await client.get(key) == value

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(worker, n)
    stats = await client.stats()
    assert stats["sets"] == 10_000 and stats["hits"] == 10_000 and stats["misses"] == 0


async def test_many_connections(node: tuple[Node, BoundAddresses]) -> None:
    async def one(n: int) -> None:
        async with dcache.connect(node[1].client_address) as c:
            for i in range(20):
                await c.set(f"c{n}", str(i))
                assert await c.get(f"c{n}") == str(i).encode()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(one, n)


async def test_big_values_both_ways_on_one_connection(client: dcache.Client) -> None:
    """Replies too big for the socket buffers arrive while another caller's
    big request is still being written: the reader must keep reading (the
    node finishes a reply before it reads on), or both sides stall until the
    write timeout."""
    big = 15 << 20
    with trio.fail_after(20):
        await client.mset({f"big{i}": b"x" * big for i in range(3)})
        results: list[int] = []

        async def read_all() -> None:
            values = await client.mget(["big0", "big1", "big2"])
            results.append(sum(len(v) for v in values))

        async def write_all() -> None:
            await trio.sleep(0.05)  # while the replies stream in
            await client.mset({f"new{i}": b"y" * big for i in range(3)})
            results.append(-1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await trio.sleep(0.001)
            nursery.start_soon(read_all)
            nursery.start_soon(write_all)
    assert sorted(results) == [-1, 3 * big, 3 * big]


async def test_cancelled_caller_does_not_disturb_others(client: dcache.Client) -> None:
    with trio.fail_after(TIMEOUT):
        await client.set("k", "v")
        for _ in range(20):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(client.get, "k")
                await trio.sleep(0)
                nursery.cancel_scope.cancel()
        assert await client.get("k") == b"v"
        assert await client.mget(["k"] * 10) == [b"v"] * 10


async def test_sync_client(node: tuple[Node, BoundAddresses]) -> None:
    def use_it() -> tuple:
        with dcache.SyncClient(node[1].client_address, timeout=TIMEOUT) as c:
            c.set("k", "v", ttl=100)
            return c.get("k"), c.get("nope"), c.delete("k"), c.mget(["k"]), c.stats()["sets"]

    with trio.fail_after(TIMEOUT):
        result = await trio.to_thread.run_sync(use_it)
    assert result == (b"v", None, True, [None], 1)


def _serve_with_a_slow_key(addresses: Any) -> None:
    """A node that takes 200 ms over requests naming the key "slow"."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            node, bound = await start_node(nursery)
            place = node.router.place

            class Slow:  # what the router answers, but only after 200 ms, far longer than the client's poll window
                def __init__(self, reply: bytes) -> None:
                    self.reply = reply

                async def finish(self) -> bytes:
                    await trio.sleep(0.2)
                    return self.reply

                def owners(self) -> list[str]:
                    return []

                def notify(self, done: object) -> None:
                    return None  # finished by a task

            def slowly(session, payloads):  # type: ignore[no-untyped-def]
                reply, waiting = place(session, payloads)
                if any(b"slow" in payload for payload in payloads):
                    return None, Slow(reply)
                return reply, waiting

            node.router.place = slowly  # type: ignore[method-assign]
            addresses.put(bound.client_address)

    trio.run(main)


def test_sync_client_spins_then_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    # The node runs in a process of its own: in this one, its thread and the
    # client's, both spinning, would take turns at the interpreter lock.
    monkeypatch.setenv("DCACHE_BUSY_POLL_US", "20000")  # ample, on a busy machine
    context = multiprocessing.get_context("fork")
    addresses = context.Queue()
    server = context.Process(target=_serve_with_a_slow_key, args=(addresses,), daemon=True)
    server.start()
    try:
        address = addresses.get(timeout=TIMEOUT)
        with dcache.SyncClient(address, timeout=TIMEOUT) as c:
            c.set("k", "v")
            assert (c._poller.skip, c._poller.penalty) == (0, 1)  # the reply came while it spun
            assert c.get("slow") is None
            assert (c._poller.skip, c._poller.penalty) == (1, 2)  # it spun for its window, then slept
            assert c.get("k") == b"v"  # sleeps at once: backing off
            assert c.get("k") == b"v"  # spins again, and finds the reply
            assert (c._poller.skip, c._poller.penalty) == (0, 1)
        with dcache.SyncClient(address, timeout=TIMEOUT, busy_poll=0) as c:
            for _ in range(2):
                assert c.get("slow") is None
            assert (c._poller.skip, c._poller.penalty) == (0, 1)  # never polled, never missed
    finally:
        server.kill()
        server.join(TIMEOUT)


async def test_client_side_limits_come_from_the_node(nursery: trio.Nursery) -> None:
    _, bound = await start_node(nursery, limits=Limits(max_key_bytes=8, max_value_bytes=16))
    async with dcache.connect(bound.client_address) as client:
        with pytest.raises(dcache.RequestError) as info:
            await client.set("k", "x" * 17)
        assert info.value.code == ErrorCode.VALUE_TOO_LARGE
        with pytest.raises(dcache.RequestError) as info:
            await client.get("123456789")
        assert info.value.code == ErrorCode.KEY_TOO_LARGE
        assert await client.set("k", "x" * 16) > 0


async def test_connect_errors_are_typed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        with pytest.raises(dcache.ConnectError) as refused_async:
            await dcache.Client.connect(f"127.0.0.1:{port}")
    with pytest.raises(dcache.ConnectError) as refused_sync:
        await trio.to_thread.run_sync(lambda: dcache.SyncClient(f"127.0.0.1:{port}"))
    # Both clients say it in the same words.
    assert str(refused_async.value) == str(refused_sync.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"


async def test_request_timeout_when_node_never_answers(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        conn = await transport.accept(stream, max_message=1 << 20)
        assert conn is not None
        (payload,) = await conn.receive()  # the hello
        ((rid, _, _),) = cbor2.loads(payload)
        await conn.send(codec.encode_frame([codec.ok(rid, {"limits": Limits().as_dict()})]))
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, silent, 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(f"127.0.0.1:{port}", timeout=0.3) as client:
            with pytest.raises(dcache.RequestTimeout):
                await client.get("k")


# -- bad input never hurts the node -------------------------------------------


async def test_requests_before_hello_are_refused(node: tuple[Node, BoundAddresses]) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(node[1].client_address)
        [reply] = await raw_call(conn, [[1, "get", {"key": b"k"}]])
        assert reply == [1, 1, [ErrorCode.HELLO_REQUIRED, reply[2][1]]]
        [reply] = await raw_call(conn, [[2, "hello", {"version": 99}]])
        assert reply[2][0] == ErrorCode.UNSUPPORTED_VERSION
        replies = await raw_call(conn, [HELLO, [3, "ping", {}]])
        assert [r[:2] for r in replies] == [[0, 0], [3, 0]]
        await conn.aclose()


async def test_garbage_gets_typed_errors_and_the_connection_survives(node: tuple[Node, BoundAddresses]) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(node[1].client_address)
        await raw_call(conn, [HELLO])
        garbage = [
            (b"\xff\xfe not cbor", ErrorCode.BAD_FRAME),
            (cbor2.dumps({"not": "a list"}), ErrorCode.BAD_FRAME),
            (cbor2.dumps([[1, "explode", {}]]), ErrorCode.UNKNOWN_OP),
            (cbor2.dumps([[1, "get", {"key": 5}]]), ErrorCode.BAD_REQUEST),
            (cbor2.dumps([[1, "set", {"key": b"k"}]]), ErrorCode.BAD_REQUEST),
            (cbor2.dumps([[1, "set", {"key": b"k", "value": b"v", "ttl_ms": -1}]]), ErrorCode.BAD_REQUEST),
            (cbor2.dumps(["nonsense"]), ErrorCode.BAD_REQUEST),
        ]
        for payload, code in garbage:
            await conn.send(payload)
            (reply,) = cbor2.loads((await conn.receive())[0])
            assert reply[1] == 1 and reply[2][0] == code, (payload, reply)
        # A bad request in a batch spoils only itself.
        replies = await raw_call(conn, [[5, "set", {"key": b"k", "value": b"v"}], [6, "get", {}], [7, "get", {"key": b"k"}]])
        assert [(r[0], r[1]) for r in replies] == [(5, 0), (6, 1), (7, 0)]
        assert replies[2][2] == b"v"


async def test_value_over_the_limit_is_refused_by_the_node(nursery: trio.Nursery) -> None:
    _, bound = await start_node(nursery, limits=Limits(max_value_bytes=100, max_key_bytes=10))
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(bound.client_address)
        await raw_call(conn, [HELLO])
        replies = await raw_call(
            conn,
            [
                [1, "set", {"key": b"k", "value": b"x" * 101}],
                [2, "get", {"key": b"k" * 11}],
                [3, "set", {"key": b"k", "value": b"x" * 100}],
            ],
        )
        assert [r[2][0] if r[1] else "ok" for r in replies] == [ErrorCode.VALUE_TOO_LARGE, ErrorCode.KEY_TOO_LARGE, "ok"]


async def test_unfinished_messages_share_one_budget(nursery: trio.Nursery) -> None:
    """Each connection stays under the frame limit, yet together they would
    hold more than the node allows: the one that goes over is closed, its
    share is given back, and the node serves on."""
    node, bound = await start_node(nursery, limits=Limits(max_frame_bytes=1 << 20), max_unfinished_bytes=300_000)
    with trio.fail_after(TIMEOUT):
        frame = wsframe.build_frame(b"\x00" * 200_000, masked=True)
        first, second = await raw_connection(bound.client_address), await raw_connection(bound.client_address)
        for conn in (first, second):  # (until it has said hello, a connection may send only small messages)
            await conn.send(codec.encode_frame([[1, "hello", protocol.hello_args("test")]]))
            await conn.receive()
        await first.send_raw(frame[:150_000])  # unfinished: 150,000 bytes held
        await trio.testing.wait_all_tasks_blocked()
        assert node.unfinished.used == 150_000
        await second.send_raw(frame[:160_000])  # over the budget together
        with pytest.raises(transport.ConnectionClosed) as closed:
            await second.receive()
        assert closed.value.code == wsframe.CLOSE_TRY_AGAIN_LATER
        await trio.testing.wait_all_tasks_blocked()  # the node finishes closing it
        assert node.unfinished.used == 150_000
        # The first finishes its message (the node answers it: not a request) and gives its share back.
        await first.send_raw(frame[150_000:])
        (reply,) = await first.receive()
        assert cbor2.loads(reply)[0][:2] == [None, 1]  # "a frame must be a CBOR array"
        assert node.unfinished.used == 0
        async with dcache.connect(bound.client_address) as good:
            await good.set("k", "v")
            assert await good.get("k") == b"v"


async def test_hostile_connections_leave_the_node_serving(nursery: trio.Nursery) -> None:
    _, bound = await start_node(nursery, limits=Limits(max_frame_bytes=4096))
    host, port = bound.client
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(bound.client_address) as good:
            await good.set("k", "v")
            # Not HTTP at all.
            junk = await trio.open_tcp_stream(host, port)
            await junk.send_all(b"\x00\x01garbage\r\n\r\n")
            response = b""
            while chunk := await junk.receive_some(1000):
                response += chunk
            assert response.startswith(b"HTTP/1.1 400 ")
            # A half-open connection that never says anything.
            silent = await trio.open_tcp_stream(host, port)
            # A WebSocket text message: closed with 1003.
            text = await raw_connection(bound.client_address)
            await text.send_raw(wsframe.build_frame(b"hello", opcode=wsframe.OP_TEXT, masked=True))
            with pytest.raises(transport.ConnectionClosed) as closed:
                await text.receive()
            assert closed.value.code == wsframe.CLOSE_UNSUPPORTED_DATA
            # A message larger than the node accepts: closed with 1009.
            big = await raw_connection(bound.client_address)
            await big.send(b"\x00" * 5000)
            with pytest.raises(transport.ConnectionClosed) as closed:
                await big.receive()
            assert closed.value.code == wsframe.CLOSE_TOO_BIG
            # An unmasked client frame breaks the protocol: closed with 1002.
            unmasked = await raw_connection(bound.client_address)
            await unmasked.send_raw(wsframe.build_frame(cbor2.dumps([HELLO]), masked=False))
            with pytest.raises(transport.ConnectionClosed) as closed:
                await unmasked.receive()
            assert closed.value.code == wsframe.CLOSE_PROTOCOL_ERROR
            # The node still serves, the silent connection still open.
            assert await good.get("k") == b"v"
            async with dcache.connect(bound.client_address) as other:
                assert await other.get("k") == b"v"
            await silent.aclose()
            await junk.aclose()


async def test_a_connection_that_answers_pings_stays_open(mock_clock: trio.testing.MockClock, nursery: trio.Nursery) -> None:
    node, bound = await start_node(nursery, idle_timeout=30)
    conn = await raw_connection(bound.client_address)
    await raw_call(conn, [HELLO])
    nursery.start_soon(conn.receive)  # answers the node's pings, sends nothing else
    await trio.testing.wait_all_tasks_blocked()
    for _ in range(4):
        mock_clock.jump(30)
        await trio.testing.wait_all_tasks_blocked()
    assert node.connections == 1


async def test_idle_and_handshake_timeouts_close_dead_connections(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    node, bound = await start_node(nursery, idle_timeout=30)
    host, port = bound.client
    silent = await trio.open_tcp_stream(host, port)  # never handshakes
    conn = await raw_connection(bound.client_address)
    await raw_call(conn, [HELLO])
    await trio.testing.wait_all_tasks_blocked()
    assert node.connections == 2
    mock_clock.jump(transport.HANDSHAKE_TIMEOUT + 1)
    await trio.testing.wait_all_tasks_blocked()
    assert node.connections == 1
    assert await silent.receive_some(10) == b""
    # The WebSocket one gets a ping after 30 s idle; it does not answer, as our
    # test does not read, so it is closed 30 s later.
    mock_clock.jump(30)
    await trio.testing.wait_all_tasks_blocked()
    assert node.connections == 1
    mock_clock.jump(30)
    await trio.testing.wait_all_tasks_blocked()
    assert node.connections == 0


async def test_a_sync_client_idle_past_the_nodes_patience_carries_on(nursery: trio.Nursery) -> None:
    """A node closes a connection that stays idle and answers no ping; the
    client finds that out before its next request and reconnects, rather
    than failing a request it never got to send."""
    node, bound = await start_node(nursery, idle_timeout=0.3)

    def idle_then_use() -> list[bytes | None]:
        with dcache.SyncClient(bound.client_address, timeout=TIMEOUT) as c:
            c.set("k", "v")
            time.sleep(1.5)  # pinged after 0.3 s idle, closed 0.3 s later
            first = c.get("k")
            time.sleep(0.45)  # pinged, not closed yet: the client answers, the connection lives on
            return [first, c.get("k")]

    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(idle_then_use) == [b"v", b"v"]


async def test_an_async_client_idle_past_the_nodes_patience_carries_on(nursery: trio.Nursery) -> None:
    node, bound = await start_node(nursery, idle_timeout=0.3)
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(bound.client_address) as client:
            await client.set("k", "v")
            await trio.sleep(1.5)  # pinged after 0.3 s idle, closed 0.3 s later
            assert await client.get("k") == b"v"
            await trio.sleep(1.5)
            assert await client.pipeline().get("k").get("nope").execute() == [b"v", None]
        async with await dcache.ClusterClient.connect(bound.client_address) as cluster_client:
            assert await cluster_client.get("k") == b"v"
            await trio.sleep(1.5)
            assert await cluster_client.get("k") == b"v"


async def test_a_stopping_node_tells_its_clients(nursery: trio.Nursery) -> None:
    scope = trio.CancelScope()

    async def run_node(task_status: trio.TaskStatus[BoundAddresses]) -> None:
        with scope:
            await Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0")).run(task_status=task_status)

    bound = await nursery.start(run_node)
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(bound.client_address)
        await raw_call(conn, [HELLO])
        scope.cancel()
        with pytest.raises(transport.ConnectionClosed) as closed:
            await conn.receive()
        assert (closed.value.code, closed.value.reason) == (wsframe.CLOSE_GOING_AWAY, "the node is shutting down")


async def test_sync_client_pipeline(nursery: trio.Nursery) -> None:
    _, bound = await start_node(nursery, limits=Limits(max_batch=8))

    def use_it() -> tuple[list, list]:
        with dcache.SyncClient(bound.client_address, timeout=TIMEOUT) as c:
            p = c.pipeline()
            p.set("a", "1").get("a").get("nope").ttl("a").delete("a")
            assert len(p) == 5
            done = p.execute()
            p.set("b", "2").mget([f"k{i}" for i in range(9)]).get("b")  # the mget is over the node's batch limit
            with pytest.raises(dcache.RequestError, match="batch_too_large"):
                p.execute()
            p.set("b", "3").mget([f"k{i}" for i in range(9)]).get("b")
            return done, p.execute(raise_on_error=False)

    with trio.fail_after(TIMEOUT):
        done, kept_going = await trio.to_thread.run_sync(use_it)
    version, value, missing, ttl, deleted = done
    assert (value, missing, ttl, deleted) == (b"1", None, float("inf"), True) and version > 0
    assert kept_going[0] > 0 and kept_going[2] == b"3"
    assert isinstance(kept_going[1], dcache.RequestError) and kept_going[1].code == "batch_too_large"


async def test_clients_carry_on_at_once_when_their_node_comes_back(nursery: trio.Nursery) -> None:
    """A node restarts on its address. A caller that retries at once (well
    within a second) gets through on its next request, with either client."""
    from dcache.localcluster import free_port

    address = f"127.0.0.1:{free_port()}"

    async def run_node(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            node = Node(NodeConfig(client_listen=address, listen="127.0.0.1:0"))
            async with trio.open_nursery() as inner:
                await inner.start(node.run)
                task_status.started(scope)

    with trio.fail_after(TIMEOUT):
        first = await nursery.start(run_node)
        sync = await trio.to_thread.run_sync(lambda: dcache.SyncClient(address, timeout=TIMEOUT))
        client = await dcache.Client.connect(address, timeout=TIMEOUT)
        await client.set("k", "v")
        first.cancel()  # the node goes away...
        await trio.testing.wait_all_tasks_blocked()
        await nursery.start(run_node)  # ...and comes back on its address

        def sync_tries() -> list[str]:
            outcomes = []
            for _ in range(3):
                try:
                    sync.get("k")
                    outcomes.append("ok")
                except dcache.ConnectionLost:
                    outcomes.append("lost")
                time.sleep(0.1)  # far less than the idle check's second
            return outcomes

        outcomes = await trio.to_thread.run_sync(sync_tries)
        assert outcomes[-1] == "ok" and outcomes.count("lost") <= 1, outcomes
        async_outcomes = []
        for _ in range(3):
            try:
                await client.get("k")
                async_outcomes.append("ok")
            except dcache.ConnectionLost:
                async_outcomes.append("lost")
            await trio.sleep(0.1)
        assert async_outcomes[-1] == "ok" and async_outcomes.count("lost") <= 1, async_outcomes
        sync.close()
        await client.aclose()
