"""The trio side of a connection: busy polling backs off when idle and gives way to other connections."""

from __future__ import annotations

import socket
from typing import Any

import cbor2
import pytest
import trio
import trio.testing

from dcache import codec, protocol, transport, wsframe
from dcache.errors import RequestTimeout
from dcache.mux import Channel


async def pair(poll: float | None = None) -> tuple[transport.Connection, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    ours = transport.Connection(trio.SocketStream(a), protocol.ClientConnection(max_message=1 << 20, upgraded=True), poll=poll)
    return ours, trio.SocketStream(b)


async def test_a_missed_poll_makes_the_next_wait_sleep() -> None:
    conn, peer = await pair(poll=0.002)
    reply = wsframe.build_frame(b"reply", masked=False)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def late() -> None:
                await trio.sleep(0.05)  # longer than the poll window
                await peer.send_all(reply)

            nursery.start_soon(late)
            assert await conn.receive() == [b"reply"]
        assert (conn._poller.skip, conn._poller.penalty) == (1, 2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(late)
            assert await conn.receive() == [b"reply"]
        assert conn._poller.skip == 0  # that wait slept without polling
        await peer.send_all(reply)
        assert await conn.receive() == [b"reply"]  # found by polling
        assert conn._poller.penalty == 1


async def test_polling_gives_way_to_another_connection_with_data() -> None:
    # A window far longer than the test's deadline: only giving way ends the poll in time.
    first, first_peer = await pair(poll=30.0)
    second, second_peer = await pair(poll=30.0)
    await second_peer.send_all(wsframe.build_frame(b"waiting", masked=False))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def answer_later() -> None:
                await trio.sleep(0.01)
                await first_peer.send_all(wsframe.build_frame(b"first", masked=False))

            nursery.start_soon(answer_later)
            assert await first.receive() == [b"first"]
        assert (first._poller.skip, first._poller.penalty) == (0, 1)  # not counted as a miss
        assert await second.receive() == [b"waiting"]


async def test_heavy_traffic_reads_speculatively() -> None:
    conn, peer = await pair()
    with trio.fail_after(5):
        await peer.send_all(wsframe.build_frame(b"x" * 10_000, masked=False))
        assert await conn.receive() == [b"x" * 10_000]
        assert conn._busy  # a big read: the next one is tried before asking epoll
        await peer.send_all(wsframe.build_frame(b"small", masked=False))
        assert await conn.receive() == [b"small"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.receive)
            await trio.testing.wait_all_tasks_blocked()
            assert not conn._busy  # the speculative read found nothing
            await peer.send_all(wsframe.build_frame(b"later", masked=False))


async def test_a_watched_channel_times_out_only_when_its_owner_checks(autojump_clock: trio.abc.Clock) -> None:
    conn, peer = await pair(poll=0)
    channel = Channel(conn, name="silent peer", timeout=5.0, watched=True)
    outcome: list[BaseException] = []

    async def ask() -> None:
        try:
            await channel.request("get", {"key": b"k"})
        except RequestTimeout as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.sleep(4.9)
        assert not channel.expire_overdue()
        await trio.sleep(60)  # no deadline of its own: still waiting
        assert not outcome
        assert channel.expire_overdue()
        await conn.aclose()  # as the owner does, to stop the reader
    assert len(outcome) == 1 and "silent peer" in str(outcome[0])
    assert isinstance(channel.broken, RequestTimeout)


@pytest.mark.parametrize("internals", [True, False])
async def test_tasks_runnable_counts_ready_tasks(monkeypatch, internals: bool) -> None:
    if not internals:
        monkeypatch.setattr(transport, "_RUN_CONTEXT", None)  # trio's internals moved: the public path
    assert transport.tasks_runnable() == 0
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(trio.sleep, 0)
        assert transport.tasks_runnable() == 3


async def test_polling_never_holds_up_tasks_of_the_same_process() -> None:
    # Client and server in one process, with poll windows far beyond the
    # deadline: one poll that kept the other side from running (a request
    # still in the outbox, a task trio has not counted as ready yet) would
    # blow the deadline.
    a, b = trio.socket.socketpair()
    client = transport.Connection(trio.SocketStream(a), protocol.ClientConnection(max_message=1 << 20, upgraded=True), poll=30.0)
    server = transport.Connection(
        trio.SocketStream(b), protocol.Connection(client_side=False, max_message=1 << 20, upgraded=True), poll=30.0
    )
    channel = Channel(client, name="test", timeout=10.0)

    async def serve() -> None:
        while True:
            for payload in await server.receive():
                replies = [[rid, 0, args["n"]] for rid, _, args in cbor2.loads(payload)]
                await server.send(cbor2.dumps(replies))

    async def caller(first: int) -> None:
        for n in range(first, first + 20):
            assert await channel.request("ping", {"n": n}) == (0, n)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with trio.open_nursery() as callers:
                callers.start_soon(caller, 0)
                callers.start_soon(caller, 100)
            nursery.cancel_scope.cancel()


async def test_a_poll_lets_other_tasks_run_between_slices(monkeypatch) -> None:
    # trio does not count tasks due later in the same scheduler pass as
    # ready; pretend it counts none, so only slicing lets the sender run.
    monkeypatch.setattr(transport, "tasks_runnable", lambda: 0)
    conn, peer = await pair(poll=30.0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_all, wsframe.build_frame(b"from a task", masked=False))
            assert await conn.receive() == [b"from a task"]


async def test_concurrent_writers_send_whole_frames_in_turn() -> None:
    a, b = trio.socket.socketpair()
    conn = transport.Connection(trio.SocketStream(a), protocol.ClientConnection(max_message=1 << 24, upgraded=True), poll=0)
    peer = trio.SocketStream(b)
    messages = [bytes([i]) * (1 << 20) for i in range(4)]  # far more than a socket buffer holds
    parser = wsframe.FrameParser(expect_masked=True, max_message=1 << 24)
    received: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for message in messages:
                nursery.start_soon(conn.send, message)
                await trio.testing.wait_all_tasks_blocked()  # each writer queues behind the one before
            while len(received) < len(messages):
                received += parser.feed(await peer.receive_some(1 << 16))
    assert received == messages
    assert not conn._sending and not conn._send_queue


async def test_bytes_that_arrive_with_the_handshake_are_served_like_any_other(nursery: trio.Nursery) -> None:
    """A client that sends its first frames in the same packet as its upgrade
    request: a ping among them is answered, a message kept for the first receive."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    accepted: list[transport.Connection | None] = []

    async def serve(stream: trio.SocketStream) -> None:
        accepted.append(await transport.accept(stream, max_message=1 << 20))

    nursery.start_soon(trio.serve_listeners, serve, listeners)
    port = listeners[0].socket.getsockname()[1]
    request = wsframe.ClientHandshake(f"127.0.0.1:{port}").request
    leftover = wsframe.build_frame(b"ping me", opcode=wsframe.OP_PING, masked=True) + wsframe.build_frame(b"hi", masked=True)
    with trio.fail_after(5):
        peer = await trio.open_tcp_stream("127.0.0.1", port)
        await peer.send_all(request + leftover)
        received = b""
        while b"ping me" not in received:
            received += await peer.receive_some(4096)
        assert received.startswith(b"HTTP/1.1 101 ")
        pong = wsframe.FrameParser(expect_masked=False, max_message=1 << 20).feed(received.split(b"\r\n\r\n", 1)[1])
        assert [(c.opcode, c.payload) for c in pong] == [(wsframe.OP_PONG, b"ping me")]
        while not accepted:
            await trio.sleep(0.01)
        conn = accepted[0]
        assert conn is not None and await conn.receive() == [b"hi"]


def test_garbage_that_arrives_with_the_handshake_is_refused_like_garbage_later() -> None:
    proto = protocol.Connection(client_side=False, max_message=1 << 20)
    request = wsframe.ClientHandshake("localhost").request
    with pytest.raises(protocol.ConnectionClosed) as closed:
        proto.receive_data(request + b"\x82\x05hello")  # clients must mask
    assert closed.value.code == wsframe.CLOSE_PROTOCOL_ERROR
    answer = proto.data_to_send()
    assert answer.startswith(b"HTTP/1.1 101 ")
    [close] = wsframe.FrameParser(expect_masked=False, max_message=1 << 20).feed(answer.split(b"\r\n\r\n", 1)[1])
    assert close.close_info()[0] == wsframe.CLOSE_PROTOCOL_ERROR


async def test_a_shielded_write_keeps_its_turn_when_its_caller_is_cancelled() -> None:
    # A channel's flush writes other callers' requests too: cancelling the
    # caller that happens to flush must not drop them while it waits its turn.
    a, b = trio.socket.socketpair()
    conn = transport.Connection(trio.SocketStream(a), protocol.ClientConnection(max_message=1 << 24, upgraded=True), poll=0)
    peer = trio.SocketStream(b)
    big, small = b"b" * (8 << 20), b"everyone's requests"
    parser = wsframe.FrameParser(expect_masked=True, max_message=1 << 24)
    received: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.send, big)  # fills the socket: holds the turn
            await trio.testing.wait_all_tasks_blocked()
            flusher = trio.CancelScope()

            async def flush() -> None:
                with flusher:
                    await conn.send_raw(conn.frame(small), shield=True)

            nursery.start_soon(flush)
            await trio.testing.wait_all_tasks_blocked()
            flusher.cancel()
            while len(received) < 2:
                received += parser.feed(await peer.receive_some(1 << 16))
    assert received == [big, small]


async def test_a_relayed_reply_that_comes_alone_passes_through_as_encoded() -> None:
    conn, peer = await pair(poll=0)
    channel = Channel(conn, name="owner", timeout=5.0, watched=True)
    parser = wsframe.FrameParser(expect_masked=True, max_message=1 << 20)
    # A byte string with a longer length head than needed: decoding and
    # re-encoding would shorten it, passing it on keeps it as it is.
    loose_value = b"\x59\x00\x03abc"

    async def owner() -> None:
        asked: list[tuple[int, Any]] = []
        while len(asked) < 3:
            for payload in parser.feed(await peer.receive_some(1 << 16)):
                asked += [(rid, op) for rid, op, _ in cbor2.loads(payload)]
        (first, op), (second, _), (third, _) = asked
        assert op == "get"
        await peer.send_all(wsframe.build_frame(codec.single_frame(first, b"\x00" + loose_value), masked=False))
        # Two replies in one frame are decoded, and handed on re-encoded.
        both = [[second, 0, b"abc"], [third, 1, ["moved", "not here", {"epoch": 2}]]]
        await peer.send_all(wsframe.build_frame(cbor2.dumps(both), masked=False))

    rest = cbor2.dumps("get") + cbor2.dumps({"key": b"k"})  # a request but for its rid
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner)
            replies: dict[int, bytes] = {}

            async def relay(i: int) -> None:
                replies[i] = await channel.relay(rest)

            for i in range(3):
                nursery.start_soon(relay, i)
                await trio.testing.wait_all_tasks_blocked()
    assert replies[0] == b"\x00" + loose_value
    assert replies[1] == codec.encode_rest(0, b"abc")
    assert codec.decode_rest(replies[2]) == (1, ["moved", "not here", {"epoch": 2}])


async def test_a_connection_another_task_closed_is_closed_not_a_value_error() -> None:
    """A task that starts to read or write after another closed the
    connection gets ConnectionClosed, not trio's ValueError about a
    descriptor of -1 (ClusterClient's tasks close each other's connections)."""
    conn, peer = await pair(poll=0)
    with trio.fail_after(5):
        await conn.stream.aclose()
        with pytest.raises(transport.ConnectionClosed):
            await conn.receive()
        with pytest.raises(transport.ConnectionClosed):
            await conn.send(b"x" * (8 << 20))  # more than the socket takes at once


async def test_the_trio_internals_dcache_reads_are_still_there() -> None:
    """transport.py reads two of trio's internals for speed, each with a
    public fallback; if a trio release moves them, this fails loudly rather
    than every busy poll quietly taking the slow path."""
    assert transport._RUN_CONTEXT is not None, "trio._core._run.GLOBAL_RUN_CONTEXT is gone"
    before = transport.tasks_runnable()
    assert before == len(transport._RUN_CONTEXT.runner.runq)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
        assert transport.tasks_runnable() == before + 1  # a new task waits in the run queue
    a, b = trio.socket.socketpair()
    with a, b:
        plain = transport.plain_socket(trio.SocketStream(a))
        assert isinstance(plain, socket.socket) and plain.fileno() == a.fileno(), "trio's socket no longer keeps _sock"


async def test_requests_queued_together_go_in_frames_the_other_side_takes() -> None:
    """Several large requests queued at once (a node handing a large shard
    over) went out as one frame over the other side's message limit, which
    closed the link every time (found by review): they go in frames within it."""
    limit = 64 * 1024
    a, b = trio.socket.socketpair()
    client = transport.Connection(trio.SocketStream(a), protocol.ClientConnection(max_message=limit, upgraded=True))
    server = transport.Connection(trio.SocketStream(b), protocol.Connection(client_side=False, max_message=limit, upgraded=True))
    channel = Channel(client, name="test", timeout=10.0)
    frames: list[int] = []

    async def serve() -> None:
        while True:
            for payload in await server.receive():
                frames.append(len(payload))
                await server.send(cbor2.dumps([[rid, 0, len(args["blob"])] for rid, _, args in cbor2.loads(payload)]))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            tickets = [channel.enqueue([("handoff", {"blob": bytes(20_000)})]) for _ in range(8)]  # 160 KB in all
            for ticket in tickets:
                assert await channel.complete(ticket) == [(0, 20_000)]
            nursery.cancel_scope.cancel()
    assert len(frames) >= 3 and max(frames) <= limit
