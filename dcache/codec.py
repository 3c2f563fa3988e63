"""The dcache wire format, shared by clients and nodes.

One WebSocket binary message carries one *frame*: a CBOR array of messages.

* request: ``[rid, op, args]``: ``rid`` an unsigned int chosen by the sender,
  ``op`` a name from :data:`dcache.ops.OPS`, ``args`` a map whose fields the
  op defines (the op table checks them).
* reply: ``[rid, status, body]``: ``status`` is :class:`Status`; an error's body
  is ``[code, message]`` or ``[code, message, details]``, ``code`` from
  :class:`ErrorCode` and ``details`` a map (``moved`` carries ``epoch``).

Replies may arrive in any order and in other frames than their requests; the
rid pairs them. The first request on a connection must be ``hello``, which
carries the protocol version.

This module is sans-IO: plain functions over bytes and Python values.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass
from typing import Any

import cbor2

PROTOCOL_VERSION = 1

DEFAULT_MAX_KEY_BYTES = 64 * 1024
DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH = 10_000
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_NAMESPACE_BYTES = 255
MAX_TTL_MS = 100 * 365 * 24 * 3600 * 1000
MAX_RID = 2**63 - 1
# Deep enough for every message we define; CBOR nesting beyond it is hostile.
MAX_DEPTH = 16


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    KEY_TOO_LARGE = "key_too_large"
    VALUE_TOO_LARGE = "value_too_large"
    BATCH_TOO_LARGE = "batch_too_large"
    FRAME_TOO_LARGE = "frame_too_large"
    HELLO_REQUIRED = "hello_required"
    UNSUPPORTED_VERSION = "unsupported_version"
    MOVED = "moved"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    OUT_OF_MEMORY = "out_of_memory"  # the node is at --max-memory and evicts nothing
    NOT_INTEGER = "not_integer"  # incr on a value that is not an integer
    UNAUTHORIZED = "unauthorized"  # the hello's token is missing or wrong (the connection is closed after)
    FORBIDDEN = "forbidden"  # not for this connection's role (a write with a read-only token, a node's op)


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits a node enforces; sent to clients in the hello reply."""

    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES

    def as_dict(self) -> dict[str, int]:
        return {
            "max_key_bytes": self.max_key_bytes,
            "max_value_bytes": self.max_value_bytes,
            "max_batch": self.max_batch,
            "max_frame_bytes": self.max_frame_bytes,
        }


SHOWN_CHARS = 60  # of a client's value quoted in an error message: a reply never grows with what was sent


def shown(value: Any) -> str:
    """``value`` (sent by the other side) for an error message: short, whatever it is.

    Only text, bytes and integers are quoted, cut to :data:`SHOWN_CHARS`;
    anything else is named by its type (a structure's repr may be far larger
    than its encoding: CBOR's shared references make it exponential)."""
    if type(value) is str:
        text = repr(value[:SHOWN_CHARS])
    elif type(value) is bytes:
        text = repr(value[:SHOWN_CHARS])
    elif type(value) is int:
        text = str(value) if -(10**SHOWN_CHARS) < value < 10**SHOWN_CHARS else "a very large integer"
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}…"


class WireError(Exception):
    """A message that cannot be served; becomes an error reply, never a crash."""

    def __init__(self, code: ErrorCode, message: str, rid: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.rid = rid


# -- encoding -----------------------------------------------------------------


def encode_frame(messages: list[Any]) -> bytes:
    """A frame of ``messages``; an item may be a message already encoded (``bytes``)."""
    if len(messages) == 1 and type(messages[0]) is bytes:
        return b"\x81" + messages[0]
    for message in messages:
        if type(message) is bytes:
            return _array_head(len(messages)) + b"".join(m if type(m) is bytes else cbor2.dumps(m) for m in messages)
    return cbor2.dumps(messages)


# -- messages passed on as they came ----------------------------------------------
#
# A node that forwards a lone request does not decode and re-encode what it
# only carries: it rewrites the rid and keeps the rest of the message (op and
# args one way, status and body the other) as bytes.


def split_single(payload: bytes) -> tuple[int, int] | None:
    """For a frame of one three-element message whose rid is an unsigned int:
    the rid and the offset of the rest of the message (never at the end of
    ``payload``). None for any other frame."""
    if payload[:2] != b"\x81\x83" or len(payload) < 4:
        return None
    info = payload[2]
    if info < 24:
        return info, 3
    at = _RID_ENDS.get(info)
    if at is None or len(payload) <= at:
        return None
    return int.from_bytes(payload[3:at], "big"), at


def message(rid: int, rest: bytes) -> bytes:
    """An encoded three-element message: ``rid``, then ``rest`` (its other two elements, encoded)."""
    return b"\x83" + _uint(rid) + rest


def reply_frame(rid: int, status: int, body: Any) -> bytes:
    """``encode_frame([[rid, status, body]])``, built by hand for the bodies
    most replies carry (bytes, null, a boolean, a count or version): a third
    of the encoder's cost, on the path every request takes."""
    kind = type(body)
    if kind is bytes:
        n = len(body)
        head = _BYTES_HEADS[n] if n < 256 else b"\x59" + n.to_bytes(2, "big") if n < 0x10000 else _head(0x40, n)
        return b"".join((b"\x81\x83", _uint(rid), _SMALL_UINTS[status], head, body))
    if body is None:
        tail = b"\xf6"
    elif kind is bool:
        tail = b"\xf5" if body else b"\xf4"
    elif kind is int and body >= 0:
        tail = _uint(body)
    else:
        return cbor2.dumps([[rid, status, body]])
    return b"".join((b"\x81\x83", _uint(rid), _SMALL_UINTS[status], tail))


def single_frame(rid: int, rest: bytes) -> bytes:
    """A frame of the one message :func:`message` makes."""
    return b"\x81\x83" + _uint(rid) + rest


def request_rest(op: str, args: Any) -> bytes:
    """The rest of a request after its rid (see :func:`message`), to send it raw."""
    return cbor2.dumps(op) + cbor2.dumps(args)


def encode_rest(status: int, body: Any) -> bytes:
    """The rest of a reply after its rid, as :func:`split_single` finds it."""
    return cbor2.dumps(status) + cbor2.dumps(body)


def decode_rest(rest: bytes) -> tuple[int, Any]:
    """(status, body) from the rest of a reply; raise WireError if it is not one."""
    _, status, body = parse_reply(_decode_any(b"\x83\x00" + rest))
    return status, body


# Where a rid ends, by the head byte that says how long it is.
_RID_ENDS = {24: 4, 25: 5, 26: 7, 27: 11}
_SMALL_UINTS = [bytes((n,)) for n in range(24)]


def _uint(n: int) -> bytes:
    if n < 24:
        return _SMALL_UINTS[n]
    if n < 0x100:
        return b"\x18" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\x19" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x1a" + n.to_bytes(4, "big")
    return b"\x1b" + n.to_bytes(8, "big")


def _head(major: int, n: int) -> bytes:
    """The head of a CBOR item of major type ``major`` (its top three bits, as a byte) and length ``n``."""
    head = bytearray(_uint(n))
    head[0] |= major
    return bytes(head)


def _array_head(n: int) -> bytes:
    return _head(0x80, n)


_BYTES_HEADS = [_head(0x40, n) for n in range(256)]


def ok(rid: int | None, body: Any = None) -> list[Any]:
    return [rid, Status.OK.value, body]


def error(rid: int | None, code: ErrorCode | str, message: str, details: dict[str, Any] | None = None) -> list[Any]:
    body: list[Any] = [str(code), message]
    if details:
        body.append(details)
    return [rid, Status.ERROR.value, body]


def error_from(exc: WireError) -> list[Any]:
    return error(exc.rid, exc.code, exc.message)


# -- decoding -----------------------------------------------------------------


def decode_frame(payload: bytes, limits: Limits, *, whole: bool = False) -> list[Any]:
    """Decode one frame into its list of raw messages, or raise WireError.
    With ``whole``, bytes after the frame's array are refused too (else they
    are ignored, as cbor2 does): where a frame's bytes are passed on as they
    came, a message hidden after the array must not become one elsewhere."""
    if len(payload) > limits.max_frame_bytes:
        raise WireError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {len(payload)} bytes exceeds the limit of {limits.max_frame_bytes}",
        )
    messages = _decode_whole(payload) if whole else _decode_any(payload)
    if type(messages) is not list:
        raise WireError(ErrorCode.BAD_FRAME, "a frame must be a CBOR array of messages")
    if len(messages) > limits.max_batch:
        raise WireError(
            ErrorCode.BATCH_TOO_LARGE,
            f"{len(messages)} messages in one frame exceeds the limit of {limits.max_batch}",
        )
    return messages


def _decode_whole(payload: bytes) -> Any:
    """:func:`_decode_any`, refusing bytes after the first item (about 0.6 µs more)."""
    stream = io.BytesIO(payload)
    try:
        item = cbor2.CBORDecoder(stream, max_depth=MAX_DEPTH).decode()
    except Exception as exc:  # cbor2 raises several types on hostile input
        raise WireError(ErrorCode.BAD_FRAME, f"not a CBOR frame: {exc}") from None
    if stream.tell() != len(payload):
        raise WireError(ErrorCode.BAD_FRAME, f"{len(payload) - stream.tell()} bytes after the frame's array")
    return item


def _decode_any(payload: bytes) -> Any:
    try:
        return cbor2.loads(payload, max_depth=MAX_DEPTH)
    except Exception as exc:  # cbor2 raises several types on hostile input
        raise WireError(ErrorCode.BAD_FRAME, f"not a CBOR frame: {exc}") from None


# The transport bounds message size; a reply frame may carry any number of replies.
_REPLY_LIMITS = Limits(max_frame_bytes=2**62, max_batch=2**62)


def decode_replies(payload: bytes) -> list[tuple[int | None, int, Any]]:
    """Decode a reply frame into (rid, status, body) triples, or raise WireError."""
    return [parse_reply(m) for m in decode_frame(payload, _REPLY_LIMITS)]


def parse_reply(message: Any) -> tuple[int | None, int, Any]:
    """Check a reply's shape; return (rid, status, body)."""
    if type(message) is not list or len(message) != 3:
        raise WireError(ErrorCode.BAD_FRAME, "a reply is [rid, status, body]")
    rid, status, body = message
    if rid is not None and type(rid) is not int:
        raise WireError(ErrorCode.BAD_FRAME, "reply rid must be an integer or null")
    if status not in (0, 1):
        raise WireError(ErrorCode.BAD_FRAME, f"unknown reply status {shown(status)}")
    if status == Status.ERROR and not (
        type(body) is list
        and len(body) in (2, 3)
        and type(body[0]) is str
        and type(body[1]) is str
        and (len(body) == 2 or type(body[2]) is dict)
    ):
        raise WireError(ErrorCode.BAD_FRAME, "an error body is [code, message] or [code, message, details]")
    return rid, status, body
