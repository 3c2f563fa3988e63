"""The trio side of a connection: busy polling turns itself off when idle and on when busy."""

from __future__ import annotations

import trio
import trio.testing

from dcache import transport, wsframe


async def pair() -> tuple[transport.Connection, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    ours = transport.Connection(trio.SocketStream(a), client_side=True, max_message=1 << 20)
    return ours, trio.SocketStream(b)


async def test_polling_stops_after_a_miss_and_resumes_on_quick_replies(monkeypatch) -> None:
    monkeypatch.setattr(transport, "BUSY_POLL", 0.002)
    monkeypatch.setattr(transport, "BUSY_POLL_REARM", 0.004)
    conn, peer = await pair()
    reply = wsframe.build_frame(b"reply", masked=False)
    with trio.fail_after(5):
        assert conn._poll
        async with trio.open_nursery() as nursery:

            async def late() -> None:
                await trio.sleep(0.05)  # longer than the poll window
                await peer.send_all(reply)

            nursery.start_soon(late)
            assert await conn.receive() == [b"reply"]
        assert not conn._poll  # the poll missed, and the reply was slow
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_all, reply)
            assert await conn.receive() == [b"reply"]
        assert conn._poll  # a quick reply turns polling back on
        await peer.send_all(reply)
        assert await conn.receive() == [b"reply"]  # found by polling


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
