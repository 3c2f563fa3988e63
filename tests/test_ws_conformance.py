"""RFC 6455 strictness of a real node (and of SyncClient) over real loopback sockets.

The node's replies are read with wsproto's frame layer, not ours, so that a
test does not take our parser's word for what the node sent.
"""

from __future__ import annotations

import socket
import threading

import pytest
import trio
from support import node_address
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

import dcache
from dcache import wsframe
from dcache.errors import ProtocolError
from dcache.node import BoundAddresses

TIMEOUT = 10


async def read_to_end(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def node_answer_to(bound: BoundAddresses, frame: bytes) -> tuple[int, str]:
    """Open a WebSocket to the node, send ``frame``, and return the code and
    reason of the close frame the node answers with before it hangs up."""
    host, port = bound.client
    stream = await trio.open_tcp_stream(host, port)
    handshake = wsframe.ClientHandshake(f"{host}:{port}")
    await stream.send_all(handshake.request)
    leftover = None
    while leftover is None:
        leftover = handshake.feed(await stream.receive_some(65536))
    await stream.send_all(frame)
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(leftover + await read_to_end(stream))
    await stream.aclose()
    [close] = [f for f in reader.received_frames() if f.opcode == Opcode.CLOSE]
    assert isinstance(close.payload, tuple)  # wsproto parses a close body into (code, reason)
    return close.payload


def close_frame(body: bytes) -> bytes:
    return wsframe.build_frame(body, opcode=wsframe.OP_CLOSE, masked=True)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x03", CloseReason.PROTOCOL_ERROR),  # a 1-byte body
        ((999).to_bytes(2, "big"), CloseReason.PROTOCOL_ERROR),
        ((1005).to_bytes(2, "big") + b"none", CloseReason.PROTOCOL_ERROR),  # only ever meant locally
        ((2000).to_bytes(2, "big"), CloseReason.PROTOCOL_ERROR),
        ((5000).to_bytes(2, "big"), CloseReason.PROTOCOL_ERROR),
        ((1000).to_bytes(2, "big") + b"bye \xff", CloseReason.INVALID_FRAME_PAYLOAD_DATA),
        ((1000).to_bytes(2, "big") + "bye ✓".encode(), CloseReason.NORMAL_CLOSURE),
        ((4000).to_bytes(2, "big"), CloseReason.NORMAL_CLOSURE),
        (b"", CloseReason.NORMAL_CLOSURE),
    ],
)
async def test_the_node_answers_a_close_frame_as_rfc_6455_says(nursery: trio.Nursery, body: bytes, expected: CloseReason) -> None:
    with trio.fail_after(TIMEOUT):
        bound = await node_address(nursery)
        code, _ = await node_answer_to(bound, close_frame(body))
        assert code == expected
        async with dcache.connect(bound.client_address) as client:  # still serving
            await client.set("k", "v")
            assert await client.get("k") == b"v"


async def test_another_websocket_version_gets_426_from_the_node(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        bound = await node_address(nursery)
        host, port = bound.client
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
        )
        response = await read_to_end(stream)
        await stream.aclose()
        head = response.split(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0] == b"HTTP/1.1 426 Upgrade Required"
        assert b"Sec-WebSocket-Version: 13" in head[1:]


def test_sync_client_refuses_a_close_frame_with_an_invalid_code() -> None:
    """A server that answers the hello with a close frame carrying 1005 (a code
    no endpoint may send) breaks the protocol: ProtocolError, not a lost connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            handshake = wsframe.ServerHandshake()
            done = None
            while done is None:
                done = handshake.feed(conn.recv(65536))
            conn.sendall(done[0])
            if not done[1]:
                conn.recv(65536)  # the hello
            conn.sendall(wsframe.build_frame((1005).to_bytes(2, "big"), opcode=wsframe.OP_CLOSE, masked=False))
            conn.recv(65536)  # until the client hangs up

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with pytest.raises(ProtocolError, match="invalid code 1005"):
            dcache.SyncClient(f"127.0.0.1:{port}", timeout=TIMEOUT)
    finally:
        server.join(TIMEOUT)
        listener.close()
    assert not server.is_alive()


# -- against the independent `websockets` implementation ---------------------------


async def test_a_websockets_client_talks_to_the_node(nursery: trio.Nursery) -> None:
    """Handshake and framing of the node, as another implementation of RFC 6455 sees them."""
    import cbor2
    from websockets.sync.client import connect

    from dcache import codec

    bound = await node_address(nursery)

    def talk() -> list:
        with connect(f"ws://{bound.client_address}", compression=None, open_timeout=TIMEOUT) as ws:
            ws.send(
                cbor2.dumps(
                    [[1, "hello", {"version": codec.PROTOCOL_VERSION}], [2, "set", {"key": b"k", "value": b"v" * 70_000}]]
                )
            )
            first = cbor2.loads(ws.recv(timeout=TIMEOUT))
            ws.send(cbor2.dumps([[3, "get", {"key": b"k"}]]))
            return first + cbor2.loads(ws.recv(timeout=TIMEOUT))

    with trio.fail_after(TIMEOUT):
        replies = await trio.to_thread.run_sync(talk)
    assert [r[:2] for r in replies] == [[1, 0], [2, 0], [3, 0]]
    assert replies[2][2] == b"v" * 70_000


async def test_sync_client_talks_to_a_websockets_server() -> None:
    """SyncClient's own client handshake and framing, against a server of
    another implementation that answers the way a node does."""
    import cbor2
    from websockets.sync.server import serve

    from dcache import codec

    def handler(ws) -> None:  # type: ignore[no-untyped-def]
        for message in ws:
            replies = []
            for rid, op, args in cbor2.loads(message):
                body = (
                    {"version": codec.PROTOCOL_VERSION, "node": "ws", "limits": codec.Limits().as_dict()}
                    if op == "hello"
                    else args.get("value")
                )
                replies.append([rid, 0, body])
            ws.send(cbor2.dumps(replies))

    with serve(handler, "127.0.0.1", 0, compression=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.socket.getsockname()[1]
        try:
            with trio.fail_after(TIMEOUT):

                def use_it() -> bytes:
                    with dcache.SyncClient(f"127.0.0.1:{port}", timeout=TIMEOUT) as client:
                        return client.set("k", b"x" * 100_000)  # type: ignore[no-any-return]

                echoed = await trio.to_thread.run_sync(use_it)
        finally:
            server.shutdown()
            thread.join(TIMEOUT)
    assert echoed == b"x" * 100_000  # the server sent back the value it received
