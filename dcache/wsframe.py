"""WebSocket framing (RFC 6455) without I/O, tuned for many small binary messages.

The opening handshake is wsproto's on the server side and a few lines of
ours on the client side (see :class:`ClientHandshake`, :class:`ServerHandshake`);
after it, this module parses and builds frames. It
is small on purpose: per-message cost decides dcache's speed, and a general
WebSocket library spends most of its time in layers we do not need (no
extensions are negotiated, so RSV bits are always zero).

Complete binary messages come out of :meth:`FrameParser.feed` as ``bytes``;
everything else (text messages, ping, pong, close) as :class:`Control`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_KNOWN_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008  # a token refused, a limit reached
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_INTERNAL_ERROR = 1011
# Codes a peer may put in a close frame (RFC 6455 §7.4.1 and the IANA
# registry): 1004 is reserved, 1005, 1006 and 1015 are only ever reported
# locally, never sent; 1016-2999 are unassigned; 3000-4999 are for applications.
_PEER_CLOSE_CODES = frozenset((*range(1000, 1004), *range(1007, 1015)))
_APPLICATION_CLOSE_CODES = range(3000, 5000)

_HEADER_SHORT = struct.Struct("!BB")
_HEADER_MEDIUM = struct.Struct("!BBH")
_HEADER_LONG = struct.Struct("!BBQ")


class FrameError(Exception):
    """The peer broke the WebSocket protocol; close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Control:
    """A non-binary message: ``opcode`` is OP_TEXT, OP_PING, OP_PONG or OP_CLOSE."""

    opcode: int
    payload: bytes

    def close_info(self) -> tuple[int, str]:
        """Code and reason of a close frame (1005 when it carries none)."""
        if len(self.payload) < 2:
            return 1005, ""
        code = int.from_bytes(self.payload[:2], "big")
        return code, self.payload[2:].decode("utf-8", "replace")


def mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte masking ``key`` (masking and unmasking are the same)."""
    n = len(data)
    if n == 0 or key == b"\0\0\0\0":
        return data
    repeated = (key * ((n >> 2) + 1))[:n]
    return (_from_bytes(data, "little") ^ _from_bytes(repeated, "little")).to_bytes(n, "little")


_from_bytes = int.from_bytes  # looked up once: a third of the cost of masking a small frame


# Masking protects HTTP intermediaries from payloads a hostile script in a
# browser chose. Links between dcache nodes involve no browser, so they mask
# with this key, which makes masking and unmasking free.
NULL_MASK = b"\0\0\0\0"


def build_frame(payload: bytes, *, opcode: int = OP_BINARY, masked: bool, key: bytes | None = None) -> bytes:
    """One final frame carrying ``payload``; clients must send ``masked=True``
    (with a fresh random ``key`` unless one is given)."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    first = 0x80 | opcode
    if n < 126:
        header = _HEADER_SHORT.pack(first, mask_bit | n)
    elif n < 65536:
        header = _HEADER_MEDIUM.pack(first, mask_bit | 126, n)
    else:
        header = _HEADER_LONG.pack(first, mask_bit | 127, n)
    if not masked:
        return header + payload
    if key is None:
        key = _masking_key()
    return b"".join((header, key, mask(payload, key)))


# The header of an unmasked final binary frame of each length up to 125 bytes.
SHORT_BINARY_HEADS = [bytes((0x80 | OP_BINARY, n)) for n in range(126)]

_key_pool = b""
_key_offset = 0


def _masking_key() -> bytes:
    """Four fresh bytes from the OS's random source, fetched a page at a time
    (one system call per frame is a measurable part of a small request)."""
    global _key_pool, _key_offset
    if _key_offset >= len(_key_pool):
        _key_pool, _key_offset = os.urandom(4096), 0
    key = _key_pool[_key_offset : _key_offset + 4]
    _key_offset += 4
    return key


def build_close(code: int = CLOSE_NORMAL, reason: str = "", *, masked: bool, key: bytes | None = None) -> bytes:
    """A close frame; a ``reason`` too long for a control frame is cut short,
    between characters (the peer refuses a reason that is not UTF-8)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123].decode("utf-8", "ignore").encode()
    return build_frame(payload, opcode=OP_CLOSE, masked=masked, key=key)


class FrameParser:
    """Turns received bytes into messages.

    ``expect_masked`` is True on the server side (clients must mask) and False
    on the client side (servers must not). ``max_message`` bounds a message,
    fragments included, so a peer cannot make us buffer without limit.
    """

    def __init__(self, *, expect_masked: bool, max_message: int) -> None:
        self._expect_masked = expect_masked
        self._max_message = max_message
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._fragments_size = 0
        self._fragment_opcode = 0

    def drop(self) -> None:
        """Forget what is buffered (the connection is over)."""
        self._buffer = bytearray()
        self._fragments = []
        self._fragments_size = 0

    def limit(self, max_message: int) -> None:
        """Bound messages to ``max_message`` bytes from now on."""
        self._max_message = max_message

    @property
    def buffered(self) -> int:
        return len(self._buffer) + self._fragments_size

    def feed(self, data: bytes) -> list[bytes | Control]:
        """Add received bytes; return the messages they complete, in order.

        Raises FrameError when the peer breaks the protocol; the parser is
        then unusable and the connection must be closed with ``exc.code``.
        """
        buf = self._buffer
        if not buf and not self._fragment_opcode and len(data) > 1:
            # The usual case: the data is one whole, final binary frame.
            b1 = data[1]
            length = b1 & 0x7F
            if data[0] == 0x82 and length < 126 and length <= self._max_message and bool(b1 & 0x80) == self._expect_masked:
                if len(data) == 6 + length and b1 & 0x80:
                    return [mask(data[6:], data[2:6])]
                if len(data) == 2 + length and not b1 & 0x80:
                    return [data[2:]]
        buf += data
        out: list[bytes | Control] = []
        pos = 0
        end_of_data = len(buf)
        while end_of_data - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            header_end = pos + 2
            if length == 126:
                header_end += 2
                if end_of_data < header_end:
                    break
                length = int.from_bytes(buf[pos + 2 : header_end], "big")
            elif length == 127:
                header_end += 8
                if end_of_data < header_end:
                    break
                length = int.from_bytes(buf[pos + 2 : header_end], "big")
            masked = b1 & 0x80
            if masked:
                header_end += 4
            opcode = b0 & 0x0F
            self._check_header(b0, opcode, bool(masked), length)
            frame_end = header_end + length
            if end_of_data < frame_end:
                break
            payload = bytes(buf[header_end:frame_end])
            if masked:
                payload = mask(payload, bytes(buf[header_end - 4 : header_end]))
            pos = frame_end
            if b0 & 0x80:  # FIN
                if opcode == OP_BINARY:
                    out.append(payload)
                elif opcode >= OP_CLOSE:
                    if opcode == OP_CLOSE:
                        _check_close(payload)
                    out.append(Control(opcode, payload))
                else:
                    message = self._finish(opcode, payload)
                    if self._fragment_opcode == OP_BINARY or opcode == OP_BINARY:
                        out.append(message)
                    else:
                        out.append(Control(OP_TEXT, message))
                    self._fragment_opcode = 0
            else:
                self._add_fragment(opcode, payload)
        if pos:
            del buf[:pos]
        return out

    def _check_header(self, b0: int, opcode: int, masked: bool, length: int) -> None:
        if b0 & 0x70:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        if opcode not in _KNOWN_OPCODES:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if masked != self._expect_masked:
            raise FrameError(
                CLOSE_PROTOCOL_ERROR,
                "client frames must be masked" if self._expect_masked else "server frames must not be masked",
            )
        if opcode >= OP_CLOSE:
            if length > 125 or not b0 & 0x80:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frames must be final and at most 125 bytes")
        elif opcode == OP_CONTINUATION:
            if not self._fragment_opcode:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
        elif self._fragment_opcode:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "new message started inside a fragmented one")
        if opcode < OP_CLOSE and self._fragments_size + length > self._max_message:
            raise FrameError(
                CLOSE_TOO_BIG,
                f"message of more than {self._max_message} bytes",
            )

    def _add_fragment(self, opcode: int, payload: bytes) -> None:
        if opcode != OP_CONTINUATION:
            self._fragment_opcode = opcode
        self._fragments.append(payload)
        self._fragments_size += len(payload)

    def _finish(self, opcode: int, payload: bytes) -> bytes:
        if opcode != OP_CONTINUATION:  # an unfragmented text message
            return payload
        self._fragments.append(payload)
        message = b"".join(self._fragments)
        self._fragments.clear()
        self._fragments_size = 0
        return message


def _check_close(payload: bytes) -> None:
    """RFC 6455 §5.5.1: a close body is empty, or a valid code and a UTF-8 reason."""
    if not payload:
        return
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte body")
    code = int.from_bytes(payload[:2], "big")
    if code not in _PEER_CLOSE_CODES and code not in _APPLICATION_CLOSE_CODES:
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"close frame with invalid code {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None


# -- opening handshake ----------------------------------------------------------
#
# The server side is wsproto's. The client side is the few lines below: it
# sends one fixed request and checks one reply, and importing wsproto (with
# h11) is a quarter of a one-shot command's start-up. Tests check each side
# against the other implementation.

MAX_HANDSHAKE_BYTES = 16 * 1024  # an HTTP head larger than this is not a handshake we answer
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


class HandshakeError(Exception):
    """The opening handshake failed; ``response`` is what to send back, if anything."""

    def __init__(self, reason: str, response: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


def accept_token(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server answers to ``key`` with."""
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())


class ClientHandshake:
    """Client side of the opening handshake: ``request`` bytes out, then feed replies."""

    def __init__(self, host: str, path: str = "/") -> None:
        import base64

        self._key = base64.b64encode(os.urandom(16))
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self._received = bytearray()

    def feed(self, data: bytes) -> bytes | None:
        """Feed response bytes; once the upgrade is accepted, return the bytes
        received past it (b"" if none). Raise HandshakeError for anything else."""
        if not data:
            raise HandshakeError("the node closed the connection during the handshake (if it serves TLS: use wss:// or --ca)")
        self._received += data
        end = self._received.find(b"\r\n\r\n")
        if end < 0:
            if len(self._received) > MAX_HANDSHAKE_BYTES or not b"HTTP/".startswith(bytes(self._received[:5])):
                raise HandshakeError("not a dcache node: its reply is not HTTP")
            return None
        head = bytes(self._received[:end]).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        status = rest[:3]
        if not version.startswith("HTTP/1.") or not status.isdigit():
            raise HandshakeError("not a dcache node: its reply is not HTTP")
        if status != "101":
            raise HandshakeError(f"the server rejected the WebSocket upgrade (HTTP {status})")
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise HandshakeError("not a dcache node: a malformed header in its reply")
            name = name.lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in _tokens(headers.get("connection", "")):
            raise HandshakeError("not a dcache node: it did not upgrade the connection to WebSocket")
        if headers.get("sec-websocket-accept", "").encode() != accept_token(self._key):
            raise HandshakeError("not a dcache node: a wrong Sec-WebSocket-Accept in its reply")
        if "sec-websocket-extensions" in headers or "sec-websocket-protocol" in headers:
            raise HandshakeError("not a dcache node: it chose an extension or subprotocol nobody asked for")
        return bytes(self._received[end + 4 :])


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


_NOT_HTTP = "This is a dcache port: it speaks WebSocket. Use the dcache CLI or client.\n"


class ServerHandshake:
    """Server side of the opening handshake (wsproto's): feed request bytes, get the response."""

    def __init__(self) -> None:
        from wsproto.connection import ConnectionType
        from wsproto.handshake import H11Handshake

        self._hs = H11Handshake(ConnectionType.SERVER)
        self._received = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """Feed request bytes. Once a valid upgrade request is complete, return
        (response bytes to send, bytes received past the request). Raise
        HandshakeError (with a response to send) for anything else."""
        from wsproto.events import AcceptConnection, RejectConnection, Request
        from wsproto.handshake import WEBSOCKET_VERSION
        from wsproto.utilities import LocalProtocolError, RemoteProtocolError

        if not data:
            raise HandshakeError("the peer closed the connection during the handshake")
        # wsproto gets the request's head only: what follows it is WebSocket
        # data, ours to parse (wsproto would keep it for a frame layer we do not use).
        self._received += data
        end = self._received.find(b"\r\n\r\n")
        if end < 0:
            if len(self._received) > MAX_HANDSHAKE_BYTES:
                raise HandshakeError("bad opening handshake: no end to the request's head", _plain_response(400, _NOT_HTTP))
            return None
        head, leftover = bytes(self._received[: end + 4]), bytes(self._received[end + 4 :])
        try:
            self._hs.receive_data(head)
            for event in self._hs.events():
                if isinstance(event, Request):
                    return self._hs.send(AcceptConnection()), leftover
        except RemoteProtocolError as exc:
            response = b""
            hint = exc.event_hint
            if isinstance(hint, RejectConnection):
                # wsproto's hint carries the status and headers RFC 6455 asks
                # for, e.g. 426 and Sec-WebSocket-Version for another version.
                if hint.status_code == 426:
                    text = f"dcache speaks WebSocket version {WEBSOCKET_VERSION.decode()} only.\n"
                else:
                    text = _NOT_HTTP
                response = _plain_response(hint.status_code, text, hint.headers)
            raise HandshakeError(f"bad opening handshake: {exc}", response) from None
        except LocalProtocolError as exc:
            raise HandshakeError(f"bad opening handshake: {exc}") from None
        except UnicodeError:  # (wsproto decodes some headers as ASCII or IDNA, and lets that error out)
            raise HandshakeError("bad opening handshake: a header is not ASCII", _plain_response(400, _NOT_HTTP)) from None
        return None


def _plain_response(status: int, text: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    body = text.encode()
    reason = {400: "Bad Request", 426: "Upgrade Required"}.get(status, "Error")
    extra = "".join(f"{name.decode()}: {value.decode()}\r\n" for name, value in headers)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\n{extra}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body
