"""WebSocket framing without I/O, checked against RFC 6455 and against wsproto."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from dcache import wsframe
from dcache.wsframe import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    Control,
    FrameError,
    FrameParser,
    build_frame,
)

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 1 << 20]


def server_parser(max_message: int = 1 << 24) -> FrameParser:
    return FrameParser(expect_masked=True, max_message=max_message)


def client_parser(max_message: int = 1 << 24) -> FrameParser:
    return FrameParser(expect_masked=False, max_message=max_message)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("masked", [True, False])
def test_round_trip(size: int, masked: bool) -> None:
    payload = os.urandom(size)
    parser = server_parser() if masked else client_parser()
    assert parser.feed(build_frame(payload, masked=masked)) == [payload]
    assert parser.buffered == 0


def test_one_byte_at_a_time_and_many_at_once() -> None:
    payloads = [b"a", b"", os.urandom(300), os.urandom(70000)]
    stream = b"".join(build_frame(p, masked=True) for p in payloads)
    parser = server_parser()
    got: list[bytes | Control] = []
    for i in range(len(stream)):
        got += parser.feed(stream[i : i + 1])
    assert got == payloads
    assert server_parser().feed(stream) == payloads


def fragment(payload: bytes, opcode: int, pieces: int, *, masked: bool, interleave_ping: bool = False) -> bytes:
    size = max(1, len(payload) // pieces)
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        op = opcode if i == 0 else wsframe.OP_CONTINUATION
        frame = bytearray(build_frame(chunk, opcode=op, masked=masked))
        if i != len(chunks) - 1:
            frame[0] &= 0x7F  # clear FIN
        out.append(bytes(frame))
        if interleave_ping and i == 0:
            out.append(build_frame(b"are you there", opcode=wsframe.OP_PING, masked=masked))
    return b"".join(out)


def test_fragmented_messages_with_a_ping_between() -> None:
    payload = os.urandom(1000)
    got = server_parser().feed(fragment(payload, wsframe.OP_BINARY, 4, masked=True, interleave_ping=True))
    assert got == [Control(wsframe.OP_PING, b"are you there"), payload]


def test_text_and_control_messages() -> None:
    parser = server_parser()
    frames = [
        build_frame("héllo".encode(), opcode=wsframe.OP_TEXT, masked=True),
        fragment(b"split text", wsframe.OP_TEXT, 3, masked=True),
        build_frame(b"p", opcode=wsframe.OP_PING, masked=True),
        build_frame(b"", opcode=wsframe.OP_PONG, masked=True),
        wsframe.build_close(1001, "going away", masked=True),
    ]
    got = parser.feed(b"".join(frames))
    assert got[:4] == [
        Control(wsframe.OP_TEXT, "héllo".encode()),
        Control(wsframe.OP_TEXT, b"split text"),
        Control(wsframe.OP_PING, b"p"),
        Control(wsframe.OP_PONG, b""),
    ]
    assert got[4].close_info() == (1001, "going away")
    assert Control(wsframe.OP_CLOSE, b"").close_info() == (1005, "")


def set_bits(frame: bytes, first: int | None = None, second: int | None = None) -> bytes:
    data = bytearray(frame)
    if first is not None:
        data[0] = first
    if second is not None:
        data[1] = second
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (set_bits(build_frame(b"x", masked=True), first=0x80 | 0x40 | 0x2), CLOSE_PROTOCOL_ERROR),  # RSV1
        (set_bits(build_frame(b"x", masked=True), first=0x80 | 0x3), CLOSE_PROTOCOL_ERROR),  # opcode 3
        (build_frame(b"x", masked=False), CLOSE_PROTOCOL_ERROR),  # unmasked client frame
        (build_frame(b"x" * 126, opcode=wsframe.OP_PING, masked=True), CLOSE_PROTOCOL_ERROR),
        (set_bits(build_frame(b"x", opcode=wsframe.OP_PING, masked=True), first=0x09), CLOSE_PROTOCOL_ERROR),
        (build_frame(b"x", opcode=wsframe.OP_CONTINUATION, masked=True), CLOSE_PROTOCOL_ERROR),
        (set_bits(build_frame(b"x", masked=True), first=0x02) + build_frame(b"y", masked=True), CLOSE_PROTOCOL_ERROR),
    ],
)
def test_protocol_violations(data: bytes, code: int) -> None:
    with pytest.raises(FrameError) as info:
        server_parser().feed(data)
    assert info.value.code == code


def test_server_frames_must_not_be_masked() -> None:
    with pytest.raises(FrameError) as info:
        client_parser().feed(build_frame(b"x", masked=True))
    assert info.value.code == CLOSE_PROTOCOL_ERROR


def test_oversize_message_is_refused_before_it_arrives() -> None:
    parser = server_parser(max_message=1000)
    header_only = build_frame(b"x" * 5000, masked=True)[:8]  # 2 + 2 length + 4 mask
    with pytest.raises(FrameError) as info:
        parser.feed(header_only)
    assert info.value.code == CLOSE_TOO_BIG
    # A small frame that arrives whole is held to the limit too.
    with pytest.raises(FrameError) as info:
        server_parser(max_message=10).feed(build_frame(b"x" * 11, masked=True))
    assert info.value.code == CLOSE_TOO_BIG
    # Fragments count together.
    with pytest.raises(FrameError):
        server_parser(max_message=1000).feed(fragment(b"x" * 1500, wsframe.OP_BINARY, 3, masked=True))


def close_frame(body: bytes, *, masked: bool = True) -> bytes:
    return build_frame(body, opcode=wsframe.OP_CLOSE, masked=masked)


VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000, 4999]
INVALID_CLOSE_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_close_frames_with_a_valid_code_are_taken(code: int, masked: bool) -> None:
    parser = server_parser() if masked else client_parser()
    [got] = parser.feed(close_frame(code.to_bytes(2, "big") + "fin ✓".encode(), masked=masked))
    assert isinstance(got, Control) and got.close_info() == (code, "fin ✓")
    [empty] = (server_parser() if masked else client_parser()).feed(close_frame(b"", masked=masked))
    assert isinstance(empty, Control) and empty.close_info() == (1005, "")


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_close_frames_with_an_invalid_code_are_refused(code: int, masked: bool) -> None:
    parser = server_parser() if masked else client_parser()
    with pytest.raises(FrameError) as info:
        parser.feed(close_frame(code.to_bytes(2, "big"), masked=masked))
    assert info.value.code == CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize("masked", [True, False])
def test_a_close_frame_with_a_one_byte_body_is_refused(masked: bool) -> None:
    parser = server_parser() if masked else client_parser()
    with pytest.raises(FrameError) as info:
        parser.feed(close_frame(b"\x03", masked=masked))
    assert info.value.code == CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize(
    "reason",
    [
        b"\xff",  # never valid
        b"ok \xc3",  # cut inside a character
        b"\xc0\xaf",  # overlong encoding of "/"
        b"\xed\xa0\x80",  # a UTF-16 surrogate
        b"\xf4\x90\x80\x80",  # past U+10FFFF
    ],
)
@pytest.mark.parametrize("masked", [True, False])
def test_a_close_reason_that_is_not_utf8_is_refused(reason: bytes, masked: bool) -> None:
    parser = server_parser() if masked else client_parser()
    with pytest.raises(FrameError) as info:
        parser.feed(close_frame(b"\x03\xe8" + reason, masked=masked))
    assert info.value.code == CLOSE_INVALID_DATA == 1007


def test_a_bad_close_frame_is_refused_after_the_messages_before_it_and_in_pieces() -> None:
    parser = server_parser()
    stream = build_frame(b"first", masked=True) + close_frame(b"\x03\xe8\xff")
    assert parser.feed(stream[:11]) == [b"first"]
    with pytest.raises(FrameError) as info:
        for i in range(11, len(stream)):
            parser.feed(stream[i : i + 1])
    assert info.value.code == CLOSE_INVALID_DATA


def test_build_close_cuts_a_long_reason_between_characters() -> None:
    reason = "a" + "é" * 100  # 201 bytes; a close frame holds at most 123
    [got] = client_parser().feed(wsframe.build_close(1000, reason, masked=False))
    assert isinstance(got, Control)
    code, kept = got.close_info()
    assert code == 1000 and reason.startswith(kept) and len(kept.encode()) > 110


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6), st.lists(st.integers(min_value=1, max_value=50), max_size=40))
def test_any_split_gives_the_same_messages(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(build_frame(p, masked=True) for p in payloads)
    parser = server_parser()
    got: list[bytes | Control] = []
    pos = 0
    for cut in cuts:
        got += parser.feed(stream[pos : pos + cut])
        pos += cut
    got += parser.feed(stream[pos:])
    assert got == payloads


def test_masking_keys_are_fresh_unless_fixed() -> None:
    payload = b"same payload"
    keys = {build_frame(payload, masked=True)[2:6] for _ in range(2000)}  # the pool refills past 1024 frames
    assert len(keys) > 1990
    fixed = build_frame(payload, masked=True, key=wsframe.NULL_MASK)
    assert fixed == bytes([0x82, 0x80 | len(payload)]) + wsframe.NULL_MASK + payload  # masking is a no-op
    assert server_parser().feed(fixed) == [payload]
    # wsproto accepts it as an ordinary masked frame.
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(fixed)
    [frame] = list(server.received_frames())
    assert bytes(frame.payload) == payload


@pytest.mark.parametrize("size", [0, 5, 200, 70000])
def test_compatible_with_wsproto_both_ways(size: int) -> None:
    payload = os.urandom(size)
    # Our client frame, read by wsproto's server side.
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(build_frame(payload, masked=True))
    [frame] = list(server.received_frames())
    assert frame.opcode == Opcode.BINARY and bytes(frame.payload) == payload and frame.frame_finished
    # wsproto's server frame, read by our client side.
    data = server.send_data(payload, fin=True)
    assert client_parser().feed(data) == [payload]
    # wsproto's client frame (masked), read by our server side.
    client = FrameProtocol(client=True, extensions=[])
    assert server_parser().feed(client.send_data(payload, fin=True)) == [payload]


def test_handshake_pipes_into_itself_with_trailing_bytes() -> None:
    client = wsframe.ClientHandshake("localhost:48000")
    server = wsframe.ServerHandshake()
    first_frame = build_frame(b"hello", masked=True)
    result = server.feed(client.request + first_frame)
    assert result is not None
    response, leftover = result
    assert leftover == first_frame
    assert response.startswith(b"HTTP/1.1 101 ")
    reply = build_frame(b"welcome", masked=False)
    assert client.feed(response + reply) == reply


def test_plain_http_gets_a_400() -> None:
    server = wsframe.ServerHandshake()
    with pytest.raises(wsframe.HandshakeError) as info:
        server.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert info.value.response.startswith(b"HTTP/1.1 400 ")
    assert b"dcache" in info.value.response


def upgrade_request(version: bytes | None) -> bytes:
    lines = [
        b"GET / HTTP/1.1",
        b"Host: localhost",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ]
    if version is not None:
        lines.append(b"Sec-WebSocket-Version: " + version)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize("version", [b"8", b"12", b"14", b"13, 8"])
def test_another_websocket_version_gets_426_naming_13(version: bytes) -> None:
    with pytest.raises(wsframe.HandshakeError) as info:
        wsframe.ServerHandshake().feed(upgrade_request(version))
    head = info.value.response.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 426 Upgrade Required"
    assert b"Sec-WebSocket-Version: 13" in head[1:]
    assert b"connection: close" in head[1:]


def test_a_missing_websocket_version_gets_400_naming_13() -> None:
    with pytest.raises(wsframe.HandshakeError) as info:
        wsframe.ServerHandshake().feed(upgrade_request(None))
    assert info.value.response.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in info.value.response
    assert wsframe.ServerHandshake().feed(upgrade_request(b"13")) is not None


def test_client_refuses_a_non_websocket_answer() -> None:
    client = wsframe.ClientHandshake("localhost:48000")
    with pytest.raises(wsframe.HandshakeError):
        client.feed(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
    with pytest.raises(wsframe.HandshakeError):
        wsframe.ClientHandshake("x").feed(b"")


def test_client_handshake_against_wsproto_in_pieces_of_any_size() -> None:
    """Our client side of the handshake, against wsproto's server, whatever
    the pieces its reply arrives in; the bytes after the reply are kept."""
    from wsproto.connection import ConnectionType
    from wsproto.events import AcceptConnection, Request
    from wsproto.handshake import H11Handshake

    for piece in (1, 2, 7, 1000):
        client = wsframe.ClientHandshake("localhost:48000")
        server = H11Handshake(ConnectionType.SERVER)
        server.receive_data(client.request)
        assert isinstance(next(server.events()), Request)
        response = server.send(AcceptConnection())
        data = response + build_frame(b"first", masked=False)
        pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
        for n, chunk in enumerate(pieces):
            past = client.feed(chunk)
            if past is not None:
                assert past + b"".join(pieces[n + 1 :]) == data[len(response) :]
                break
        else:
            raise AssertionError("the handshake never completed")


def test_server_handshake_keeps_what_follows_a_head_split_anywhere() -> None:
    request = wsframe.ClientHandshake("localhost:48000").request
    first_frame = build_frame(b"hello", masked=True)
    data = request + first_frame
    for cut in range(1, len(data)):
        server = wsframe.ServerHandshake()
        result = server.feed(data[:cut])
        if cut < len(request):
            assert result is None
            result = server.feed(data[cut:])
            assert result is not None and result[1] == first_frame
        else:
            assert result is not None and result[1] + data[cut:] == first_frame


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", r"rejected the WebSocket upgrade \(HTTP 200\)"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not HTTP"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bm9wZQ==\r\n\r\n",
            "wrong Sec-WebSocket-Accept",
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", "did not upgrade"),
        (b"HTTP/1.1 101 Switching Protocols\r\nbroken header\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Padding: " + b"x" * 20000, "not HTTP"),
    ],
)
def test_client_handshake_refuses_what_is_not_an_upgrade(reply: bytes, why: str) -> None:
    with pytest.raises(wsframe.HandshakeError, match=why):
        wsframe.ClientHandshake("localhost:48000").feed(reply)


def test_client_handshake_refuses_an_extension_nobody_asked_for() -> None:
    client = wsframe.ClientHandshake("localhost:48000")
    key = client.request.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
    reply = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + wsframe.accept_token(key) + b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    with pytest.raises(wsframe.HandshakeError, match="extension"):
        client.feed(reply)


def test_accept_token_is_rfc_6455s_example() -> None:
    assert wsframe.accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
