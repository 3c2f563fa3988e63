"""The reactor: one task serving many connections, and what must not go wrong when one misbehaves."""

from __future__ import annotations

import cbor2
import pytest
import trio
import trio.testing
from support import start_node

import dcache
from dcache import codec, protocol, transport, wsframe

TIMEOUT = 20


async def greeted(address: str) -> transport.Connection:
    conn = await transport.connect(address, max_message=1 << 26, default_port=0)
    assert isinstance(conn.proto, protocol.ClientConnection)
    await conn.send_raw(conn.proto.request_frame([[0, "hello", protocol.hello_args("test")]]))
    await conn.receive()
    return conn


async def call(conn: transport.Connection, *messages: list) -> list:
    assert isinstance(conn.proto, protocol.ClientConnection)
    await conn.send_raw(conn.proto.request_frame(list(messages)))
    replies: list = []
    while len(replies) < len(messages):
        for payload in await conn.receive():
            replies += cbor2.loads(payload)
    return replies


async def test_one_task_serves_many_connections_and_counts_them(nursery: trio.Nursery) -> None:
    node, bound = await start_node(nursery)
    with trio.fail_after(TIMEOUT):
        conns = [await greeted(bound.client_address) for _ in range(200)]
        assert len(node.reactor) == 200 and node.connections == 200
        async with trio.open_nursery() as clients:
            for i, conn in enumerate(conns):

                async def use(i: int = i, conn: transport.Connection = conn) -> None:
                    for j in range(5):
                        [(rid, status, _)] = await call(conn, [j, "set", {"key": f"k{i}", "value": f"{i}-{j}"}])
                        assert (rid, status) == (j, 0)
                    assert (await call(conn, [9, "get", {"key": f"k{i}"}]))[0][2] == f"{i}-4".encode()

                clients.start_soon(use)
        for conn in conns:
            await conn.aclose()
        while node.connections:
            await trio.sleep(0.01)
        assert len(node.reactor) == 0


async def test_a_client_that_reads_no_replies_holds_up_no_one_else(nursery: trio.Nursery) -> None:
    """Big replies pile up for a client that stops reading: the reactor keeps
    them for it (and reads no more from it past a bound) while it serves
    everyone else at once."""
    node, bound = await start_node(nursery)
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(bound.client_address) as good:
            await good.set("big", b"x" * (4 << 20))
            deaf = await greeted(bound.client_address)
            assert isinstance(deaf.proto, protocol.ClientConnection)
            for rid in range(8):  # 32 MiB of replies it will not read
                await deaf.send_raw(deaf.proto.request_frame([[rid, "get", {"key": b"big"}]]))
            for i in range(50):
                await good.set(f"k{i}", "v")
                assert await good.get(f"k{i}") == b"v"
            entry = next(e for e in node.reactor._entries.values() if e.unsent)
            assert entry.paused and len(entry.unsent) > 0
        await deaf.aclose()


async def test_a_client_that_stops_reading_is_closed_after_the_idle_timeout(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    node, bound = await start_node(nursery, idle_timeout=30)
    deaf = await greeted(bound.client_address)
    assert isinstance(deaf.proto, protocol.ClientConnection)
    await good_set(bound.client_address, "big", b"x" * (8 << 20))
    await deaf.send_raw(deaf.proto.request_frame([[1, "get", {"key": b"big"}]]))
    await trio.testing.wait_all_tasks_blocked()
    assert node.connections == 1
    mock_clock.jump(31)  # no byte of its reply taken for longer than the idle timeout
    await trio.testing.wait_all_tasks_blocked()
    assert node.connections == 0


async def good_set(address: str, key: str, value: bytes) -> None:
    async with dcache.connect(address) as client:
        await client.set(key, value)


async def test_a_bug_while_serving_one_connection_costs_only_that_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, bound = await start_node(nursery)
    place = node.router.place

    def buggy(session, payloads):  # type: ignore[no-untyped-def]
        if any(b"boom" in payload for payload in payloads):
            raise RuntimeError("a bug")
        return place(session, payloads)

    monkeypatch.setattr(node.router, "place", buggy)
    with trio.fail_after(TIMEOUT):
        victim = await greeted(bound.client_address)
        bystander = await greeted(bound.client_address)
        assert isinstance(victim.proto, protocol.ClientConnection)
        await victim.send_raw(victim.proto.request_frame([[1, "get", {"key": b"boom"}]]))
        with pytest.raises(transport.ConnectionClosed):
            await victim.receive()
        assert (await call(bystander, [2, "set", {"key": b"k", "value": b"v"}]))[0][:2] == [2, 0]


async def test_requests_in_the_same_packet_as_the_upgrade_are_answered(nursery: trio.Nursery) -> None:
    _, bound = await start_node(nursery)
    host, port = bound.client
    hello = codec.encode_frame([[0, "hello", protocol.hello_args("test")], [1, "set", {"key": b"k", "value": b"early"}]])
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(wsframe.ClientHandshake(f"{host}:{port}").request + wsframe.build_frame(hello, masked=True))
        received = b""
        replies: list = []
        while len(replies) < 2:
            received += await stream.receive_some(65536)
            head, found, rest = received.partition(b"\r\n\r\n")
            if found:
                assert head.startswith(b"HTTP/1.1 101 ")
                parser = wsframe.FrameParser(expect_masked=False, max_message=1 << 20)
                replies = [reply for payload in parser.feed(rest) for reply in cbor2.loads(payload)]  # type: ignore[arg-type]
        assert [r[:2] for r in replies] == [[0, 0], [1, 0]]
        await stream.aclose()


async def test_a_node_without_the_reactor_serves_alike(nursery: trio.Nursery) -> None:
    """reactor=False: a task per connection, as before the reactor (and as
    for connections it cannot serve)."""
    node, bound = await start_node(nursery, reactor=False)
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(bound.client_address) as client:
            await client.set("k", "v")
            assert await client.get("k") == b"v"
        assert len(node.reactor) == 0


async def test_a_close_while_replies_wait_to_be_written_costs_only_that_connection(nursery: trio.Nursery) -> None:
    """A client with a small receive window asks for big values, reads none,
    then sends a close frame: the reactor closes it while its unsent replies
    still wait for the socket, and serves on (found by a review: the task
    writing them was woken by the close with an error that stopped the node)."""
    import socket

    node, bound = await start_node(nursery)
    host, port = bound.client
    with trio.fail_after(TIMEOUT):
        await good_set(bound.client_address, "big", b"x" * (256 << 10))
        for _ in range(3):
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect((host, port))
            stream = trio.SocketStream(sock)
            await stream.send_all(wsframe.ClientHandshake(f"{host}:{port}").request)
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(4096)
            hello = codec.encode_frame([[0, "hello", protocol.hello_args("test")]])
            await stream.send_all(wsframe.build_frame(hello, masked=True))
            for rid in range(1, 4):
                await stream.send_all(wsframe.build_frame(codec.encode_frame([[rid, "get", {"key": b"big"}]]), masked=True))
            while not any(entry.unsent for entry in node.reactor._entries.values()):
                await trio.sleep(0.01)
            await stream.send_all(wsframe.build_close(1000, "bye", masked=True))
            while len(node.reactor):
                await trio.sleep(0.01)
            await stream.aclose()
        async with dcache.connect(bound.client_address) as client:
            assert len(await client.get("big")) == 256 << 10


async def test_a_bug_while_waiting_for_other_nodes_costs_only_that_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, bound = await start_node(nursery)

    async def broken() -> dict:
        raise RuntimeError("a bug in the members fan-out")

    monkeypatch.setattr(node.router, "_members", broken)
    with trio.fail_after(TIMEOUT):
        victim = await greeted(bound.client_address)
        bystander = await greeted(bound.client_address)
        assert isinstance(victim.proto, protocol.ClientConnection)
        await victim.send_raw(victim.proto.request_frame([[1, "members", {}]]))
        with pytest.raises(transport.ConnectionClosed):
            await victim.receive()
        assert (await call(bystander, [2, "set", {"key": b"k", "value": b"v"}]))[0][:2] == [2, 0]


async def test_what_the_reactor_serves_does_not_make_busy_polls_give_way(nursery: trio.Nursery) -> None:
    """Busy polls (peer links) give way when a socket of the process's watch
    set has data; a connection the reactor serves leaves that set."""
    import select

    node, bound = await start_node(nursery, busy_poll=0.001)
    with trio.fail_after(TIMEOUT):
        conn = await greeted(bound.client_address)
        [entry] = node.reactor._entries.values()
        watch = transport._WATCH.get()
        with pytest.raises(FileNotFoundError):
            watch.modify(entry.fd, select.EPOLLIN)
        await conn.aclose()


async def test_the_reactors_busy_poll_holds_up_no_other_task(nursery: trio.Nursery) -> None:
    """While the reactor polls its connections before sleeping, the rest of
    the process runs: here the client is a task of the same process (as a
    peer link waiting for another node's reply is), and a poll window far
    longer than the test's deadline must not keep its reply from it."""
    window = 10.0
    _, bound = await start_node(nursery, busy_poll=window)
    with trio.fail_after(window / 2):
        conn = await greeted(bound.client_address)
        for rid in range(5):
            [(got, status, _)] = await call(conn, [rid, "get", {"key": b"k"}])
            assert (got, status) == (rid, 0)
            await trio.sleep(0.01)  # a timer, too, fires while the reactor polls
        await conn.aclose()


async def test_a_bug_while_handing_a_frame_to_other_nodes_costs_only_that_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the router hands back to wait for other nodes fails as the
    reactor takes it on: that connection is closed, what it waited for is
    given up, and the node serves everyone else."""
    from dcache import router

    node, bound = await start_node(nursery)
    released = []

    def broken_notify(self: router.Waiting, done: object) -> None:
        raise RuntimeError("a bug in taking on a waiting frame")

    def release(self: router.Waiting) -> None:
        released.append(self)

    monkeypatch.setattr(router.Waiting, "notify", broken_notify)
    monkeypatch.setattr(router.Waiting, "release", release)
    with trio.fail_after(TIMEOUT):
        victim = await greeted(bound.client_address)
        bystander = await greeted(bound.client_address)
        assert isinstance(victim.proto, protocol.ClientConnection)
        await victim.send_raw(victim.proto.request_frame([[1, "members", {}]]))
        with pytest.raises(transport.ConnectionClosed):
            await victim.receive()
        assert (await call(bystander, [2, "set", {"key": b"k", "value": b"v"}]))[0][:2] == [2, 0]
    assert len(released) == 1
