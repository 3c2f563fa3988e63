"""Peer links without a cluster: a link bounds what it has in flight."""

from __future__ import annotations

import cbor2
import pytest
import trio
import trio.testing

from dcache import codec, peers, protocol, transport, wsframe
from dcache.errors import PeerUnavailable
from dcache.mux import Channel
from dcache.peers import PeerLinks, _Link


async def test_a_link_holds_at_most_max_in_flight_forwards(monkeypatch) -> None:
    monkeypatch.setattr(peers, "MAX_IN_FLIGHT", 2)
    a, b = trio.socket.socketpair()
    conn = transport.Connection(
        trio.SocketStream(a), protocol.ClientConnection(max_message=1 << 20, upgraded=True, mask_key=wsframe.NULL_MASK), poll=0
    )
    owner = trio.SocketStream(b)
    links = PeerLinks(node_id="a")
    link = _Link(
        "b", channel=Channel(conn, name="b", timeout=5.0, watched=True), up=trio.Event(), queue=trio.lowlevel.ParkingLot()
    )
    links._links["b"] = link
    parser = wsframe.FrameParser(expect_masked=True, max_message=1 << 20)
    asked: list[int] = []
    answers: list[bytes] = []

    async def forward(i: int) -> None:
        rest = await links.relay("b", cbor2.dumps("get") + cbor2.dumps({"key": f"k{i}"}))
        answers.append(rest)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(forward, i)
            while len(answers) < 5:
                await trio.testing.wait_all_tasks_blocked()
                assert link.in_flight <= 2
                if len(asked) == len(answers):  # everything sent is answered: wait for more
                    for payload in parser.feed(await owner.receive_some(1 << 16)):
                        asked += [rid for rid, _, _ in cbor2.loads(payload)]
                assert len(asked) - len(answers) <= 2  # never more unanswered than the bound
                rid = asked[len(answers)]
                await owner.send_all(wsframe.build_frame(codec.single_frame(rid, codec.encode_rest(0, b"v")), masked=False))
                await trio.testing.wait_all_tasks_blocked()
    assert len(asked) == 5 and answers == [codec.encode_rest(0, b"v")] * 5
    assert link.in_flight == 0 and link.forwarded == 5


async def test_a_forward_to_a_peer_known_down_fails_at_once(autojump_clock: trio.abc.Clock) -> None:
    links = PeerLinks(node_id="a")
    links._links["b"] = _Link("b", up=trio.Event(), queue=trio.lowlevel.ParkingLot(), state="down", failures=1)
    links._links["c"] = _Link("c", up=trio.Event(), queue=trio.lowlevel.ParkingLot(), state="connecting")
    started = trio.current_time()
    with pytest.raises(PeerUnavailable, match="does not answer"):
        await links.relay("b", b"")
    assert trio.current_time() == started  # no wait for a link that is down
    # One that is (re)connecting for the first time gets its grace period.
    with pytest.raises(PeerUnavailable, match="no link"):
        await links.relay("c", b"")
    assert trio.current_time() - started == pytest.approx(peers.WAIT_FOR_LINK)
