"""The trio side of a connection: busy polling backs off when idle and gives way to other connections."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from dcache import transport, wsframe
from dcache.errors import RequestTimeout
from dcache.mux import Channel


async def pair(poll: float | None = None) -> tuple[transport.Connection, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    ours = transport.Connection(trio.SocketStream(a), client_side=True, max_message=1 << 20, poll=poll)
    return ours, trio.SocketStream(b)


def test_misses_back_off_and_a_hit_resets() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        poller = transport.BusyPoll(0.001)
        penalties = []
        for _ in range(10):
            while not poller.wanted():
                pass
            assert poller.poll(a) is None
            penalties.append(poller.penalty)
        assert penalties == [2, 4, 8, 16, 32, 64, 64, 64, 64, 64]
        assert poller.skip == transport.POLL_BACKOFF_MAX
        skipped = 0
        while not poller.wanted():
            skipped += 1
        assert skipped == transport.POLL_BACKOFF_MAX
        b.send(b"data")
        assert poller.poll(a) == b"data"
        assert poller.penalty == 1 and poller.skip == 0


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
        monkeypatch.setattr(transport, "_run_context", None)  # trio's internals moved: the public path
    assert transport.tasks_runnable() == 0
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(trio.sleep, 0)
        assert transport.tasks_runnable() == 3
