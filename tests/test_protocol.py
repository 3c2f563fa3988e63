"""The sans-IO connection: both ends piped together with no socket and no event loop."""

from __future__ import annotations

import cbor2
import pytest

from dcache import codec, ops, protocol, wsframe
from dcache.errors import ProtocolError
from dcache.protocol import ClientConnection, Connection, ConnectionClosed, ProtocolViolation, ServerSession, State


def pair(*, max_message: int = 1 << 20, budget: protocol.Budget | None = None) -> tuple[ClientConnection, Connection]:
    """A client and a server end, past the opening handshake."""
    client = ClientConnection(host="localhost:48000", max_message=max_message)
    server = Connection(client_side=False, max_message=max_message, budget=budget)
    assert server.receive_data(client.data_to_send()) == []
    assert client.receive_data(server.data_to_send()) == []
    assert client.state is server.state is State.OPEN
    return client, server


def test_requests_and_replies_pass_and_pair_by_rid() -> None:
    client, server = pair()
    first = client.new_rids(2)
    [payload] = server.receive_data(client.request_frame([[first, "get", {"key": b"a"}], [first + 1, "ping", {}]]))
    requests = [ops.parse_request(m, codec.Limits()) for m in codec.decode_frame(payload, codec.Limits())]
    assert [(r.rid, r.op) for r in requests] == [(first, "get"), (first + 1, "ping")]
    reply = server.frame(codec.encode_frame([codec.ok(first + 1), codec.ok(first, b"v")]))  # any order
    [frame] = client.receive_data(reply)
    assert sorted(ClientConnection.replies(frame, "node")) == [(first, 0, b"v"), (first + 1, 0, None)]
    assert client.new_rids() == first + 2


def test_the_upgrade_and_the_first_frames_may_arrive_together() -> None:
    client = ClientConnection(host="localhost", max_message=1 << 20)
    server = Connection(client_side=False, max_message=1 << 20)
    request = client.data_to_send()
    assert server.receive_data(request + client.frame(b"early") + client.ping(b"p")) == [b"early"]
    answer = server.data_to_send()
    assert answer.startswith(b"HTTP/1.1 101 ")
    # The client gets the upgrade and the pong in one piece, and a message after them.
    assert client.receive_data(answer + server.frame(b"reply")) == [b"reply"]


def test_a_ping_is_answered_with_its_payload_and_counts_as_a_read() -> None:
    client, server = pair()
    reads = server.reads
    assert server.receive_data(client.ping(b"are you there")) == []
    assert server.reads == reads + 1
    parsed = wsframe.FrameParser(expect_masked=False, max_message=1 << 20).feed(server.data_to_send())
    assert [(c.opcode, c.payload) for c in parsed] == [(wsframe.OP_PONG, b"are you there")]
    assert server.data_to_send() == b""


def test_a_close_is_answered_and_ends_the_connection() -> None:
    client, server = pair()
    with pytest.raises(ConnectionClosed) as closed:
        server.receive_data(client.close(wsframe.CLOSE_GOING_AWAY, "bye"))
    assert (closed.value.code, closed.value.reason) == (1001, "bye")
    assert not isinstance(closed.value, ProtocolViolation)  # the peer did nothing wrong
    [answer] = wsframe.FrameParser(expect_masked=False, max_message=1 << 20).feed(server.data_to_send())
    assert answer.close_info() == (wsframe.CLOSE_NORMAL, "")
    assert server.state is State.CLOSED and server.close() == b""  # one close frame, never two
    with pytest.raises(ConnectionClosed):
        server.receive_data(b"more")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (wsframe.build_frame(b"unmasked", masked=False), wsframe.CLOSE_PROTOCOL_ERROR),
        (wsframe.build_frame(b"x" * 2000, masked=True), wsframe.CLOSE_TOO_BIG),
        (wsframe.build_frame(b"text", opcode=wsframe.OP_TEXT, masked=True), wsframe.CLOSE_UNSUPPORTED_DATA),
        (b"\x8a\xff" + b"\x00" * 20, wsframe.CLOSE_PROTOCOL_ERROR),  # a pong longer than a control frame may be
    ],
)
def test_what_breaks_the_protocol_is_refused_with_its_close_code(data: bytes, code: int) -> None:
    client, server = pair(max_message=1000)
    with pytest.raises(ProtocolViolation) as closed:
        server.receive_data(data)
    assert closed.value.code == code
    [close] = wsframe.FrameParser(expect_masked=False, max_message=1 << 20).feed(server.data_to_send())
    assert close.opcode == wsframe.OP_CLOSE and close.close_info()[0] == code


def test_the_peer_going_away_ends_the_connection() -> None:
    client, server = pair()
    with pytest.raises(ConnectionClosed) as closed:
        server.receive_data(b"")
    assert closed.value.code == 1006 and server.data_to_send() == b""


def test_unfinished_messages_share_one_budget() -> None:
    budget = protocol.Budget(1000)
    one, first = pair(budget=budget)
    two, second = pair(budget=budget)
    message = one.frame(b"x" * 3000)
    assert first.receive_data(message[:700]) == []  # a message that has not finished arriving
    assert budget.used > 600
    with pytest.raises(ProtocolViolation) as closed:
        second.receive_data(two.frame(b"y" * 3000)[:700])
    assert closed.value.code == wsframe.CLOSE_TRY_AGAIN_LATER
    second.release()
    assert first.receive_data(message[700:]) == [b"x" * 3000]
    assert budget.used == 0  # a message that finished holds none of the budget
    assert first.receive_data(one.frame(b"z")) == [b"z"]
    first.release()
    assert budget.used == 0


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_a_node_frames_what_it_sends_as_the_framing_says(size: int) -> None:
    payload = bytes(size)
    server = Connection(client_side=False, max_message=1 << 20, upgraded=True)
    assert server.frame(payload) == wsframe.build_frame(payload, masked=False)
    assert server.frame(payload[:125], wsframe.OP_PING) == wsframe.build_frame(
        payload[:125], opcode=wsframe.OP_PING, masked=False
    )


def test_a_failed_handshake_answers_in_http() -> None:
    server = Connection(client_side=False, max_message=1 << 20)
    with pytest.raises(protocol.HandshakeFailed):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert server.data_to_send().startswith(b"HTTP/1.1 400 ")
    client = ClientConnection(host="x", max_message=1 << 20)
    with pytest.raises(protocol.HandshakeFailed, match="HTTP 404"):
        client.receive_data(b"HTTP/1.1 404 Not Found\r\n\r\n")


def test_reply_frames_that_are_not_replies_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="bad reply"):
        ClientConnection.replies(cbor2.dumps([[1, 9, None]]), "node")
    with pytest.raises(ProtocolError, match="rejected a frame: not a CBOR frame"):
        ClientConnection.replies(cbor2.dumps([codec.error(None, codec.ErrorCode.BAD_FRAME, "not a CBOR frame")]), "node")


def test_a_session_answers_hello_first_and_remembers_a_peer() -> None:
    info = {"node": "n1", "epoch": 3, "limits": codec.Limits().as_dict()}
    session = ServerSession("1.2.3.4:5", peer_port=True)

    def req(message: list) -> ops.Request:
        return ops.parse_request(message, codec.Limits())

    reply, outcome = session.hello(req([1, "get", {"key": b"k"}]), info)
    assert outcome == "hello_required" and reply[2][0] == "hello_required" and not session.greeted
    reply, outcome = session.hello(req([2, "hello", {"version": 99}]), info)
    assert outcome == "version" and reply[2][0] == "unsupported_version"
    reply, outcome = session.hello(req([3, "hello", protocol.hello_args("me", peer="n2")]), info)
    assert outcome == "ok" and session.greeted and session.peer_id == "n2" and session.client == "me"
    assert reply == [3, 0, {"version": codec.PROTOCOL_VERSION, "role": "peer", **info}]
    assert protocol.limits_from(reply[2]) == codec.Limits()
    with pytest.raises(ProtocolError):
        protocol.limits_from({"limits": "none"})
