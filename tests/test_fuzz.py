"""Fuzzing: the sans-IO connection, the router's decode path and a running node, fed random and hostile input.

Three layers, each with the properties it must keep whatever it is sent:

1. :class:`protocol.Connection`, server side, no event loop. Random byte
   streams (junk or a handshake, then frames broken in every way the RFC
   names, cut at random points) and the streams the brief names
   (:data:`NAMED_STREAMS`): it raises only :class:`ConnectionClosed`
   (``ProtocolViolation`` included) or :class:`HandshakeFailed`; then it is
   closed, and a violation's close frame, with its code, waits in
   ``data_to_send``; a call returns within :data:`CALL_TIME_BOUND`; between
   calls the parser holds at most :data:`BUFFER_BOUND` bytes and the shared
   budget no more than its limit; no message is over the limit; what it sends
   back is at most what came in plus :data:`OUT_SLACK`; the budget is 0 once
   its connections ``release()``. And it agrees with :func:`judge`, a plain
   reference reading of RFC 6455 and dcache's rules: the same messages, the
   same close code. Valid streams, cut anywhere, give back exactly what was sent.
2. The node's decode path: :meth:`Router.place` over a real :class:`Store`
   (codec, the op table's checks, the store). Random frames of random
   requests, hostile CBOR (deep nesting, 2^60-item lengths, bad UTF-8, tags,
   truncation) and a wrong value in every field of every op: one typed reply
   per message (a known error code; a message at most :data:`ERROR_ECHO_RATIO`
   times the frame plus :data:`ERROR_ECHO_SLACK`), within
   :data:`CALL_TIME_BOUND`, and no exception.
3. A running node: :data:`HOSTILE_CONNECTIONS` hostile clients at once
   (:data:`SCENARIOS`: bytes before the handshake, garbage after it, a
   2^62-byte frame declared then nothing, deep CBOR, a trickle of one byte at
   a time, hostile requests and frames, unfinished messages, silence, pings)
   while a good client's set/get/delete/mget get right answers, each within
   :data:`OP_TIME_BOUND`. Afterwards new clients are served, the connection
   count and the unfinished-bytes budget are back where they were, and
   ``process_memory_bytes`` grew at most :data:`MEMORY_GROWTH_BOUND` (and, in
   a long run, at most :data:`LATE_GROWTH_BOUND` in its second half).

The default run takes ~10 s. The long runs are marked ``fuzz`` and skipped
unless selected: ``python -m pytest tests/test_fuzz.py -m fuzz`` (100,000
inputs for each sans-IO property; :data:`LONG_NODE_SECONDS` against a node,
or ``DCACHE_FUZZ_SECONDS``; ``DCACHE_FUZZ_SEED`` repeats a node run, whose
seed a failure prints).

Bugs found are pinned by strict xfail tests (``test_known_bug_*``, each naming
the exception it fails with), and stay as tests once fixed (``test_was_bug_*``).
The random strategies leave out what triggers a known bug (``KNOWN BUG``
below), so that the general properties stay green meanwhile; a fix makes its
xfail pass, which fails the run: then drop the mark and the exclusion together.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import cbor2
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import start_node

import dcache
from dcache import codec, ops, protocol, wsframe
from dcache.codec import ErrorCode, Limits
from dcache.errors import ProtocolError
from dcache.node import BoundAddresses
from dcache.protocol import Budget, ClientConnection, Connection, ConnectionClosed, HandshakeFailed, ServerSession, State
from dcache.router import Router
from dcache.shard import ShardMap
from dcache.store import Store

# -- bounds ------------------------------------------------------------------------------

MAX_MESSAGE = 4096  # the sans-IO connection's message limit: small, so that fuzzing reaches it
MAX_FRAME_HEADER = 14  # 2 bytes, a 64-bit length, a masking key
MAX_CONTROL_PAYLOAD = 125
# Between calls the parser holds at most one unfinished message (up to the
# limit) and one partial frame: a data frame's header, or a control frame
# (which may come between fragments, with a 64-bit length) less a byte. So
# 138 bytes more than the limit can be held: the limit and a header is not a bound.
BUFFER_BOUND = MAX_MESSAGE + MAX_FRAME_HEADER + MAX_CONTROL_PAYLOAD
OUT_SLACK = 1024  # what a call may send beyond what came in: an HTTP response, a close frame
CALL_TIME_BOUND = 2.0  # seconds for one receive_data or one place(); all take milliseconds
# An error message may quote what it refuses, but not grow faster than the
# frame: repr() of a CBOR item is at most ~34 times its encoding (tag 1 with 0
# is 2 bytes, and a 66-character datetime).
ERROR_ECHO_RATIO = 64
ERROR_ECHO_SLACK = 1024
ERROR_CODES = frozenset(code.value for code in ErrorCode)

NODE_MAX_FRAME = 1 << 20
NODE_UNFINISHED = 8 << 20
OP_TIME_BOUND = 2.0  # seconds for each of the good client's requests while hostile connections run
# process_memory_bytes is the RSS of this whole test process (the node and its
# clients); measured: ~40 MiB more after 4 s, ~90 MiB from 30 s on, flat after.
MEMORY_GROWTH_BOUND = 128 << 20  # the most, over the run, above where it started
LATE_GROWTH_BOUND = 32 << 20  # the most in the run's second half above the first half's most (a leak)
LATE_GROWTH_AFTER = 60.0  # seconds a run must last for that second check
HOSTILE_CONNECTIONS = 8
DEFAULT_NODE_SECONDS = 4.0
LONG_NODE_SECONDS = 180.0
LONG_EXAMPLES = 100_000

DEFAULT_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
LONG_SETTINGS = settings(DEFAULT_SETTINGS, max_examples=LONG_EXAMPLES)


@pytest.fixture(autouse=True)
def _long_runs_only_when_selected(request: pytest.FixtureRequest) -> None:
    """Tests marked ``fuzz`` run only when ``-m`` names that mark."""
    if request.node.get_closest_marker("fuzz") and "fuzz" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a long fuzz run: select it with -m fuzz")


# -- bytes, built by hand (no encoder would build these) ------------------------------------


def cbor_head(major: int, n: int) -> bytes:
    """The head of a CBOR item of major type ``major`` (0..7) claiming length or value ``n`` (< 2^64)."""
    top = major << 5
    if n < 24:
        return bytes((top | n,))
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes((top | info,)) + n.to_bytes(size, "big")
    raise ValueError(n)


def ws_frame(
    payload: bytes,
    *,
    opcode: int = wsframe.OP_BINARY,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    long_form: bool = False,
    key: bytes = b"\x37\xfa\x21\x3d",
) -> bytes:
    """A WebSocket frame as a client sends it, or not: any bits, any declared
    ``length`` (up to 2^64 - 1), the 64-bit form where a shorter one would do."""
    n = len(payload) if length is None else length
    head = bytes(((0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF),))
    mask_bit = 0x80 if masked else 0
    if n < 126 and not long_form:
        head += bytes((mask_bit | n,))
    elif n < 65536 and not long_form:
        head += bytes((mask_bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((mask_bit | 127,)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + key + wsframe.mask(payload, key)


def close_body(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def hello_frame() -> bytes:
    return cbor2.dumps([[0, "hello", protocol.hello_args("fuzz")]])


def deep_nesting(depth: int, opener: bytes = b"\x81") -> bytes:
    """``depth`` nested containers (or tags) around a 0."""
    return opener * depth + b"\x00"


def shared_dag(levels: int, width: int) -> bytes:
    """A CBOR array of ``levels`` shareable values (tag 28), each an array of
    ``width`` references (tag 29) to the one before: a few hundred bytes that
    stand for width^(levels-1) leaves."""
    items = [b"\xd8\x1c\x81\x00"]
    for level in range(1, levels):
        items.append(b"\xd8\x1c" + cbor_head(4, width) + (b"\xd8\x1d" + cbor_head(0, level - 1)) * width)
    return cbor_head(4, levels) + b"".join(items)


def string_refs(length: int, count: int) -> bytes:
    """A stringref namespace (tag 256) holding one ``length``-character text and ``count`` references (tag 25) to it."""
    return b"\xd9\x01\x00" + cbor_head(4, count + 1) + cbor_head(3, length) + b"a" * length + b"\xd8\x19\x00" * count


def request_with(op: bytes = b"\x63get", args: bytes = b"\xa0", rid: bytes = b"\x01") -> bytes:
    """A frame of one request whose parts are given encoded (or not encodable otherwise)."""
    return b"\x81\x83" + rid + op + args


# Starts of frames that a declared length or a broken item may follow.
PREFIXES = [
    b"",
    b"\x81",
    b"\x81\x83\x01",
    b"\x81\x83\x01\x63get",
    b"\x81\x83\x01\x63get\xa1\x63key",
    b"\x81\x83\x01\x63set\xa2\x63key\x41k\x65value",
    b"\x81\x83\x01\x64mset\xa1\x65items",
    b"\x81\x83\x01\x64mget\xa1\x64keys",
    b"\x81\x83\x00\x65hello\xa1\x67version",
]
HUGE_LENGTHS = [2**31, 2**32, 2**60, 2**62, 2**63, 2**64 - 1]


# -- strategies ----------------------------------------------------------------------------------

FIELDS = [
    "version", "client", "peer", "token", "ns", "key", "value", "ttl_ms", "by", "keys", "items", "cursor", "prefix",
    "limit", "wait_ms", "all", "here", "shards", "after", "incarnation", "entries", "begin", "done", "epoch", "kept",
]  # fmt: skip
OP_NAMES = sorted(ops.OPS)
_KEYED = ("ns", "key")
_WRITE = ("ns", "key", "value", "ttl_ms")
_ENTRIES = ("entries", "begin", "done", "epoch", "kept")
OP_FIELDS: dict[str, tuple[str, ...]] = {  # each op's fields, as ops.py checks them
    "hello": ("version", "client", "peer", "token"),
    **dict.fromkeys(("get", "getmeta", "getdel", "persist", "delete", "ttl"), _KEYED),
    **dict.fromkeys(("set", "add", "replace"), _WRITE),
    "cas": (*_WRITE, "version"),
    "incr": ("ns", "key", "by"),
    "expire": ("ns", "key", "ttl_ms"),
    **dict.fromkeys(("mget", "mdelete"), ("ns", "keys")),
    "mset": ("ns", "items", "ttl_ms"),
    "scan": ("ns", "prefix", "cursor", "limit"),
    "scanshards": ("ns", "prefix", "shards", "after", "limit"),
    "flush": ("ns", "here", "all"),
    "nsstats": ("ns", "here"),
    "watch": ("ns", "prefix", "cursor", "wait_ms", "limit"),
    "events": ("ns", "prefix", "incarnation", "after", "wait_ms", "limit"),
    "claim": ("shards",),
    **dict.fromkeys(("handoff", "replicate"), _ENTRIES),
}
INT_EDGES = [
    0, 1, 23, 24, 255, 256, 65535, 65536, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
    -1, -24, -25, -(2**63), -(2**63) - 1, -(2**64), -(2**64) - 1, codec.MAX_TTL_MS, codec.MAX_TTL_MS + 1, 8191, 8192,
]  # fmt: skip
BIGNUM = 2**20000  # past the 4,300 digits Python refuses to print (test_was_bug_huge_integers_in_error_messages)
SEMANTIC_TAGS = [0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 33, 34, 35, 36, 37, 100, 256, 258, 260, 261, 1004, 55799]

ints = st.one_of(st.integers(-(2**64) - 1, 2**64), st.sampled_from(INT_EDGES), st.integers(-BIGNUM, BIGNUM))
texts = st.one_of(st.text(max_size=24), st.sampled_from(FIELDS + OP_NAMES + ["", "default", "ns"]))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    texts,
    st.binary(max_size=24),
    st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(0), cbor2.CBORSimpleValue(19), cbor2.CBORSimpleValue(255)]),
)
hashables = st.one_of(texts, ints, st.binary(max_size=8), st.booleans(), st.none())
tag_numbers = st.one_of(st.sampled_from(SEMANTIC_TAGS), st.integers(0, 2**64 - 1))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(hashables, children, max_size=5),
        st.builds(cbor2.CBORTag, tag_numbers, children),
    ),
    max_leaves=12,
)


def plausible(field: str) -> st.SearchStrategy[Any]:
    """Values a field might be given: mostly right, near the edges, or anything."""
    keys = st.binary(min_size=0, max_size=12)
    right = {
        "version": st.sampled_from([codec.PROTOCOL_VERSION, 0, 2, -1]),
        "key": keys,
        "value": st.binary(max_size=64),
        "ns": st.sampled_from(["", "ns", "x" * 256, "é" * 64]),
        "keys": st.lists(keys, max_size=6),
        "items": st.lists(st.lists(keys, min_size=0, max_size=3), max_size=4),
        "ttl_ms": st.sampled_from([0, 1, None, -1, codec.MAX_TTL_MS, codec.MAX_TTL_MS + 1]),
        "by": ints,
        "limit": st.integers(-1, ops.MAX_SCAN_LIMIT + 1),
        "wait_ms": st.integers(-1, 10),  # (waits are handed to a Waiting, never awaited here)
        "cursor": st.one_of(
            st.none(), st.lists(st.integers(-1, 8192), max_size=3), st.dictionaries(texts, st.lists(ints, max_size=3))
        ),
        "shards": st.lists(st.integers(-1, 8192), max_size=4),
    }
    return st.one_of(right.get(field, values), values)


@st.composite
def requests(draw: st.DrawFn) -> Any:
    """One message for a request frame: mostly [rid, op, args], with any part wrong."""
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(values)
    if shape == 1:
        return draw(st.lists(values, max_size=5))
    rid = draw(st.one_of(st.integers(0, codec.MAX_RID), st.integers(0, codec.MAX_RID), values))
    op = draw(st.one_of(st.sampled_from(OP_NAMES), st.sampled_from(OP_NAMES), values))
    if draw(st.integers(0, 5)) == 0:
        args = draw(values)
    else:  # mostly the op's own fields, near right; now and then another
        own = OP_FIELDS.get(op, ()) if type(op) is str else ()
        names = [name for name in own if draw(st.integers(0, 3))]
        names += draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)) if draw(st.integers(0, 2)) == 0 else []
        args = {name: draw(plausible(name)) for name in names}
        if draw(st.integers(0, 3)) == 0:
            args.update(draw(st.dictionaries(hashables, values, max_size=2)))
    return [rid, op, args]


def _dumps(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except Exception:  # (a value the encoder will not take: send something else)
        return b"\x80"


request_frames = st.lists(requests(), max_size=6).map(_dumps)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` cut short, with bytes changed or put in."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(data)))
        if what == 0:
            del data[at:]
        elif what == 1 and at < len(data):
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


hostile_payloads = st.one_of(
    st.builds(
        deep_nesting, st.integers(17, 10_000), st.sampled_from([b"\x81", b"\x9f", b"\xa1\x00", b"\xc6", b"\xd8\x64", b"\xbf\x00"])
    ),
    st.builds(
        lambda prefix, major, n, tail: prefix + cbor_head(major, n) + tail,
        st.sampled_from(PREFIXES),
        st.sampled_from([2, 3, 4, 5]),
        st.one_of(st.sampled_from(HUGE_LENGTHS), st.integers(0, 2**64 - 1)),
        st.binary(max_size=16),
    ),
    st.builds(  # text strings that are not UTF-8
        lambda prefix, junk: prefix + cbor_head(3, len(junk)) + junk + b"\xa0",
        st.sampled_from(PREFIXES[:4]),
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b", b"\xc0\xaf"]),
    ),
    st.builds(lambda value: b"\xd9\xd9\xf7" + _dumps(value), st.lists(requests(), max_size=3)),  # a self-described frame
    st.binary(max_size=64),
    mutated(request_frames),
)
payloads = st.one_of(request_frames, request_frames, hostile_payloads)

# Payloads of about the message limit (alone, or two fragments of them, go over it).
near_the_limit = st.integers(MAX_MESSAGE - 16, MAX_MESSAGE + 16).map(bytes)
EDGE_LENGTHS = [125, 126, 127, MAX_MESSAGE - 1, MAX_MESSAGE, MAX_MESSAGE + 1, 65535, 65536]

# Opcodes: mostly binary, sometimes the others, sometimes reserved ones.
opcodes = st.one_of(
    st.just(wsframe.OP_BINARY), st.just(wsframe.OP_BINARY), st.sampled_from([0x0, 0x1, 0x8, 0x9, 0xA]), st.integers(0, 15)
)


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """One frame, valid or broken in any of the ways a hostile client might."""
    opcode = draw(opcodes)
    if opcode == wsframe.OP_CLOSE:
        body = draw(
            st.one_of(
                st.builds(
                    close_body, st.sampled_from([1000, 1001, 1002, 1004, 1005, 1006, 1015, 2999, 3000, 4999, 5000, 0, 65535])
                ),
                st.builds(close_body, st.just(1000), st.sampled_from([b"\xff", b"bye", b"\xc3", b"x" * 124])),
                st.binary(max_size=3),
            )
        )
    elif opcode >= 0x8:
        body = draw(st.one_of(st.binary(max_size=MAX_CONTROL_PAYLOAD), st.binary(min_size=124, max_size=130)))
    else:
        body = draw(st.one_of(payloads, st.binary(max_size=MAX_MESSAGE + 50), near_the_limit))
    broken = draw(st.integers(0, 19))  # a quarter of the time, something odd about the head
    return ws_frame(
        body,
        opcode=opcode,
        fin=draw(st.integers(0, 2)) > 0 if opcode in (0x0, 0x1, 0x2) else broken != 1,
        rsv=draw(st.integers(1, 7)) if broken == 2 else 0,
        masked=broken != 3,
        length=draw(st.one_of(st.sampled_from(HUGE_LENGTHS + EDGE_LENGTHS), st.integers(0, MAX_MESSAGE + 200)))
        if broken == 4
        else None,
        long_form=broken == 5,
        key=draw(st.binary(min_size=4, max_size=4)),
    )


@st.composite
def fragmented(draw: st.DrawFn) -> bytes:
    """A message in fragments, about the limit in all, mostly valid: control
    frames between them, now and then a frame out of place."""
    body = draw(
        st.one_of(near_the_limit, st.binary(max_size=300), st.integers(MAX_MESSAGE // 2 - 8, MAX_MESSAGE // 2 + 8).map(bytes))
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), min_size=1, max_size=3)))
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    if draw(st.booleans()):
        parts.append(draw(st.integers(MAX_MESSAGE // 2 - 8, MAX_MESSAGE // 2 + 8).map(bytes)))
    first = draw(st.sampled_from([wsframe.OP_BINARY, wsframe.OP_BINARY, wsframe.OP_TEXT]))
    out = b""
    for i, part in enumerate(parts):
        out += ws_frame(part, opcode=first if i == 0 else wsframe.OP_CONTINUATION, fin=i == len(parts) - 1)
        if draw(st.integers(0, 3)) == 0:
            out += draw(raw_frames())  # a ping, a close, or a frame out of place
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length)."""
    if not data:
        return [data]
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@st.composite
def byte_streams(draw: st.DrawFn) -> tuple[list[bytes], int]:
    """What a client sends, in pieces as the socket gives them, and how much of
    the shared budget another connection holds already."""
    start = draw(st.integers(0, 9))
    if start == 0:  # not a handshake at all
        head = draw(st.one_of(st.binary(max_size=200), mutated(st.just(HANDSHAKE))))
    elif start == 1:
        head = draw(mutated(st.just(HANDSHAKE)))
    else:
        head = HANDSHAKE
    frames = b"".join(draw(st.lists(st.one_of(raw_frames(), raw_frames(), fragmented()), min_size=1, max_size=6)))
    if draw(st.integers(0, 3)) == 0:
        frames += ws_frame(close_body(draw(st.sampled_from([1000, 1001, 3000, 4999]))), opcode=wsframe.OP_CLOSE)
    if draw(st.integers(0, 3)) == 0:
        frames = frames[: draw(st.integers(0, len(frames)))]
    data = head + frames
    pieces = split(data, draw(st.lists(st.integers(0, 2**32), max_size=12)))
    if draw(st.integers(0, 5)) == 0:
        pieces.append(b"")  # the peer goes away
    return pieces, draw(st.sampled_from([0, 0, 1000, MAX_MESSAGE]))


# -- 1. the sans-IO connection ---------------------------------------------------------------


# Close codes a client may send (RFC 6455 7.4 and the IANA registry): 1004-1006
# and 1015 are reserved or only ever reported locally.
VALID_CLOSE_CODES = frozenset((*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)))


class Verdict(NamedTuple):
    messages: list[bytes]
    code: int | None  # how the connection ends: None, it has not
    violation: bool  # the client broke the protocol (else: it closed cleanly, or has not ended)
    # After a close or a text message: the code of a violation in what follows.
    # The connection parses all it read before it acts on either, so it may
    # find that first.
    later: int | None


def judge(data: bytes) -> Verdict:
    """What RFC 6455 and dcache's rules (binary messages only, at most
    MAX_MESSAGE bytes, no extensions) make of ``data``, the bytes after the
    handshake, read slowly and plainly as a reference."""
    messages: list[bytes] = []
    fragments: list[bytes] | None = None  # of the message under way
    text = False
    ended: tuple[int, bool] | None = None  # a close frame or a text message came: (code, violation)
    pos = 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        fin, opcode, n, at = b0 & 0x80, b0 & 0x0F, b1 & 0x7F, pos + 2
        if n >= 126:
            size = 2 if n == 126 else 8
            if len(data) < at + size:
                break
            n, at = int.from_bytes(data[at : at + size], "big"), at + size
        control = opcode >= 0x8
        broken = 0
        if (
            b0 & 0x70  # reserved bits
            or opcode not in (0x0, 0x1, 0x2, 0x8, 0x9, 0xA)
            or not b1 & 0x80  # unmasked
            or (control and (n > 125 or not fin))
            or (opcode == 0x0 and fragments is None)
            or (opcode in (0x1, 0x2) and fragments is not None)
        ):
            broken = wsframe.CLOSE_PROTOCOL_ERROR
        elif not control and sum(map(len, fragments or ())) + n > MAX_MESSAGE:
            broken = wsframe.CLOSE_TOO_BIG
        elif len(data) < at + 4 + n:
            break
        else:
            payload = wsframe.mask(data[at + 4 : at + 4 + n], data[at : at + 4])
            pos = at + 4 + n
            if opcode == 0x8 and payload:
                code = int.from_bytes(payload[:2], "big")
                if len(payload) == 1 or code not in VALID_CLOSE_CODES:
                    broken = wsframe.CLOSE_PROTOCOL_ERROR
                else:
                    try:
                        payload[2:].decode("utf-8")
                    except UnicodeDecodeError:
                        broken = wsframe.CLOSE_INVALID_DATA
        if broken:
            return Verdict(messages, *ended, broken) if ended else Verdict(messages, broken, True, None)
        if opcode in (0x9, 0xA):
            continue
        if opcode == 0x8:
            ended = ended or (int.from_bytes(payload[:2], "big") if payload else 1005, False)
            continue
        if opcode != 0x0:
            fragments, text = [], opcode == 0x1
        assert fragments is not None
        fragments.append(payload)
        if fin:
            if text:
                ended = ended or (wsframe.CLOSE_UNSUPPORTED_DATA, True)
            elif not ended:
                messages.append(b"".join(fragments))
            fragments = None
    return Verdict(messages, *ended, None) if ended else Verdict(messages, None, False, None)


def server_pair(held: int) -> tuple[Connection, Connection, Budget]:
    """A server connection to fuzz and another one holding ``held`` bytes of
    their shared budget, an unfinished message of its own."""
    budget = Budget(2 * MAX_MESSAGE)
    other = Connection(client_side=False, max_message=MAX_MESSAGE, budget=budget, upgraded=True)
    if held:
        partial = ws_frame(b"\x00" * held)[:-1]
        assert other.receive_data(partial) == []
        assert budget.used == len(partial)
    server = Connection(client_side=False, max_message=MAX_MESSAGE, budget=budget)
    return server, other, budget


def check_connection(pieces: list[bytes], held: int) -> None:
    server, other, budget = server_pair(held)
    received: list[bytes] = []
    error: Exception | None = None
    for piece in pieces:
        started = time.perf_counter()
        try:
            messages = server.receive_data(piece)
        except (ConnectionClosed, HandshakeFailed) as exc:  # ProtocolViolation is a ConnectionClosed
            error, messages = exc, []
        received += messages
        assert time.perf_counter() - started < CALL_TIME_BOUND
        assert error is not None or server._parser.buffered <= BUFFER_BOUND  # (a broken parser keeps what it had)
        assert 0 <= budget.used and (error is not None or budget.used <= budget.limit)
        assert all(type(m) is bytes and len(m) <= MAX_MESSAGE for m in messages)
        out = server.data_to_send()
        assert len(out) <= len(piece) + OUT_SLACK
        if error is None:
            continue
        assert server.state is State.CLOSED
        if isinstance(error, protocol.ProtocolViolation):  # our close frame says why
            head = out.find(b"\r\n\r\n") + 4 if out.startswith(b"HTTP/") else 0
            *_, close = wsframe.FrameParser(expect_masked=False, max_message=MAX_MESSAGE).feed(out[head:])
            assert isinstance(close, wsframe.Control) and close.opcode == wsframe.OP_CLOSE
            assert close.close_info()[0] == error.code
        with pytest.raises(ConnectionClosed):
            server.receive_data(b"more")
        break
    if error is None and server.state is State.CLOSED:  # a close that came with messages, told on the next call
        with pytest.raises(ConnectionClosed) as closed:
            server.receive_data(b"")
        error = closed.value
    server.release()
    other.release()
    assert budget.used == 0
    data = b"".join(pieces)
    if data.startswith(HANDSHAKE):
        agrees_with_the_reference(received, error, judge(data[len(HANDSHAKE) :]))


def agrees_with_the_reference(received: list[bytes], error: Exception | None, verdict: Verdict) -> None:
    """The connection gave the messages the reference finds and ended as it
    says; but the budget may end it sooner, messages that came in the same read
    as a violation may be dropped (a broken client's last words), and bytes
    that came with a close frame or a text message may be judged first."""
    expected, code, violation, later = verdict
    if isinstance(error, ConnectionClosed) and error.code == wsframe.CLOSE_TRY_AGAIN_LATER:
        assert received == expected[: len(received)]
    elif isinstance(error, protocol.ProtocolViolation):
        assert (violation and error.code == code) or error.code == later, (error, verdict)
        assert received == expected[: len(received)]
    elif isinstance(error, ConnectionClosed):
        assert (error.code, violation) == (code or 1006, False), (error, verdict)
        assert received == expected
    else:
        assert error is None and code is None, (error, verdict)
        assert received == expected


def one_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


CLOSE = ws_frame(close_body(1000), opcode=wsframe.OP_CLOSE)
# The streams the brief names, run first every time (the random ones may miss some).
NAMED_STREAMS: dict[str, tuple[list[bytes], int]] = {
    "reserved bits": ([HANDSHAKE + ws_frame(b"x", rsv=4)], 0),
    "an unknown opcode": ([HANDSHAKE + ws_frame(b"x", opcode=0x3)], 0),
    "an unknown control opcode": ([HANDSHAKE + ws_frame(b"x", opcode=0xB)], 0),
    "an unmasked frame": ([HANDSHAKE + ws_frame(b"x", masked=False)], 0),
    "a continuation without a start": ([HANDSHAKE + ws_frame(b"x", opcode=wsframe.OP_CONTINUATION)], 0),
    "a new start inside a fragmented message": ([HANDSHAKE + ws_frame(b"a", fin=False) + ws_frame(b"b")], 0),
    "a fragmented ping": ([HANDSHAKE + ws_frame(b"p", opcode=wsframe.OP_PING, fin=False)], 0),
    "a ping of 126 bytes": ([HANDSHAKE + ws_frame(bytes(126), opcode=wsframe.OP_PING)], 0),
    "a close of 126 bytes": ([HANDSHAKE + ws_frame(close_body(1000, b"x" * 124), opcode=wsframe.OP_CLOSE)], 0),
    "a text frame": ([HANDSHAKE + ws_frame(b"hi", opcode=wsframe.OP_TEXT)], 0),
    "a fragmented text message": ([HANDSHAKE + ws_frame(b"h", opcode=wsframe.OP_TEXT, fin=False) + ws_frame(b"i", opcode=0)], 0),
    "2^62 bytes declared, then nothing": ([HANDSHAKE + ws_frame(b"", length=2**62)[:14]], 0),
    "2^64 - 1 bytes declared": ([HANDSHAKE + ws_frame(b"", length=2**64 - 1)], 0),
    "a 64-bit length cut short": ([HANDSHAKE + b"\x82\xff\x00\x00"], 0),
    "a message a byte over the limit": ([HANDSHAKE + ws_frame(bytes(MAX_MESSAGE + 1))], 0),
    "fragments over the limit together": ([HANDSHAKE + ws_frame(bytes(3000), fin=False) + ws_frame(bytes(3000), opcode=0)], 0),
    "a message at the limit, a byte at a time": (one_at_a_time(HANDSHAKE + ws_frame(bytes(MAX_MESSAGE))), 0),
    "a ping between fragments": (
        [HANDSHAKE + ws_frame(b"a", fin=False) + ws_frame(b"p", opcode=9) + ws_frame(b"b", opcode=0)],
        0,
    ),
    "a close with code 1005": ([HANDSHAKE + ws_frame(close_body(1005), opcode=wsframe.OP_CLOSE)], 0),
    "a close with code 5000": ([HANDSHAKE + ws_frame(close_body(5000), opcode=wsframe.OP_CLOSE)], 0),
    "a close whose reason is not UTF-8": ([HANDSHAKE + ws_frame(close_body(1000, b"\xff"), opcode=wsframe.OP_CLOSE)], 0),
    "a close of 1 byte": ([HANDSHAKE + ws_frame(b"\x03", opcode=wsframe.OP_CLOSE)], 0),
    "messages and a close in one read": ([HANDSHAKE + ws_frame(b"a") + ws_frame(b"b") + CLOSE], 0),
    "messages and a violation in one read": ([HANDSHAKE + ws_frame(b"a") + ws_frame(b"b", rsv=1)], 0),
    "a violation after a close": ([HANDSHAKE + CLOSE + ws_frame(b"b", rsv=1)], 0),
    "the peer goes away mid-frame": ([HANDSHAKE + ws_frame(b"abc")[:4], b""], 0),
    "the peer goes away before the handshake ends": ([HANDSHAKE[:20], b""], 0),
    "not HTTP": ([b"\x00\x01garbage\r\n\r\n"], 0),
    "an unfinished message over the shared budget": ([HANDSHAKE + ws_frame(bytes(MAX_MESSAGE))[:-1]], MAX_MESSAGE),
}


def with_examples(examples: dict[str, Any]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        for value in reversed(examples.values()):
            test = example(value)(test)
        return test

    return decorate


@with_examples(NAMED_STREAMS)
@DEFAULT_SETTINGS
@given(byte_streams())
def test_a_server_connection_keeps_its_bounds_whatever_it_is_sent(stream: tuple[list[bytes], int]) -> None:
    check_connection(*stream)


@pytest.mark.fuzz
@LONG_SETTINGS
@given(byte_streams())
def test_long_a_server_connection_keeps_its_bounds_whatever_it_is_sent(stream: tuple[list[bytes], int]) -> None:
    check_connection(*stream)


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Messages, sent as valid frames (fragmented or not, pings between
    fragments), in pieces: (pieces, the messages, the pings)."""
    messages = draw(st.lists(st.binary(max_size=MAX_MESSAGE // 2), max_size=6))
    pings: list[bytes] = []
    data = bytearray(HANDSHAKE)
    for message in messages:
        cuts = sorted(draw(st.lists(st.integers(0, len(message)), max_size=3)))
        parts = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)])]
        for i, part in enumerate(parts):
            data += ws_frame(part, opcode=wsframe.OP_BINARY if i == 0 else wsframe.OP_CONTINUATION, fin=i == len(parts) - 1)
            if draw(st.integers(0, 3)) == 0:
                ping = draw(st.binary(max_size=MAX_CONTROL_PAYLOAD))
                pings.append(ping)
                data += ws_frame(ping, opcode=wsframe.OP_PING, long_form=draw(st.booleans()))
    return split(bytes(data), draw(st.lists(st.integers(0, 2**32), max_size=20))), messages, pings


def check_valid_stream(pieces: list[bytes], messages: list[bytes], pings: list[bytes]) -> None:
    server, _, budget = server_pair(0)
    received: list[bytes] = []
    out = b""
    for piece in pieces:
        received += server.receive_data(piece)
        assert server._parser.buffered <= BUFFER_BOUND
        out += server.data_to_send()
    assert received == messages
    assert out.startswith(b"HTTP/1.1 101 ")
    pongs = wsframe.FrameParser(expect_masked=False, max_message=MAX_MESSAGE).feed(out[out.find(b"\r\n\r\n") + 4 :])
    assert [(c.opcode, c.payload) for c in pongs] == [(wsframe.OP_PONG, p) for p in pings]  # type: ignore[union-attr]
    assert budget.used == 0  # nothing unfinished is held once every message is complete
    server.release()
    assert budget.used == 0


@DEFAULT_SETTINGS
@given(valid_streams())
def test_valid_frames_cut_anywhere_give_back_what_was_sent(stream: tuple[list[bytes], list[bytes], list[bytes]]) -> None:
    check_valid_stream(*stream)


@pytest.mark.fuzz
@LONG_SETTINGS
@given(valid_streams())
def test_long_valid_frames_cut_anywhere_give_back_what_was_sent(stream: tuple[list[bytes], list[bytes], list[bytes]]) -> None:
    check_valid_stream(*stream)


def test_messages_in_the_same_read_as_a_close_are_delivered() -> None:
    """Found by this fuzzing (the connection raised ConnectionClosed for the
    close and dropped what it had parsed before it); fixed in 2513c85."""
    server, _, _ = server_pair(0)
    assert server.receive_data(HANDSHAKE + ws_frame(b"request") + CLOSE) == [b"request"]
    with pytest.raises(ConnectionClosed) as closed:
        server.receive_data(b"")
    assert closed.value.code == wsframe.CLOSE_NORMAL


@settings(DEFAULT_SETTINGS, max_examples=60)
@given(payloads)
def test_a_client_reads_any_reply_frame_or_says_it_is_bad(payload: bytes) -> None:
    try:
        replies = ClientConnection.replies(payload, "node")
    except ProtocolError:
        return
    assert all(type(r) is tuple and len(r) == 3 and r[1] in (0, 1) for r in replies)


# -- 2. the node's decode path: codec, ops and the router over a real store ---------------------

_SHARD_MAP = ShardMap.build(1, ("a:1",))


def make_router() -> Router:
    store = Store(clock=lambda: 0.0)

    async def members() -> dict[str, Any]:
        return {}

    return Router(
        store=store,
        node_id="a:1",
        limits=Limits(),
        shard_map=_SHARD_MAP,
        stats=store.stats,
        members=members,
        server_name="fuzz",
        clock=lambda: 0.0,
    )


def expected_replies(payload: bytes) -> int:
    """How many replies a frame gets: one per message, or one for the whole frame if it is none."""
    try:
        decoded = cbor2.loads(payload, max_depth=codec.MAX_DEPTH)
    except Exception:
        return 1
    if type(decoded) is not list or len(decoded) > Limits().max_batch:
        return 1
    return len(decoded)


def check_error_body(body: Any, payload: bytes) -> None:
    assert type(body) is list and len(body) in (2, 3), body
    assert body[0] in ERROR_CODES, body
    assert type(body[1]) is str and len(body[1]) <= ERROR_ECHO_RATIO * len(payload) + ERROR_ECHO_SLACK
    assert len(body) == 2 or type(body[2]) is dict


def place(router: Router, session: ServerSession, payload: bytes) -> tuple[list[Any], int]:
    """The router's replies to ``payload`` now, and how many wait for later (given up at once)."""
    started = time.perf_counter()
    reply, waiting = router.place(session, [payload])
    assert time.perf_counter() - started < CALL_TIME_BOUND
    later = 0
    if waiting is not None:
        later = len(waiting._replies)
        waiting.release()
    return (cbor2.loads(reply) if reply is not None else []), later


def check_router(frames: list[bytes], greeted: bool) -> None:
    router = make_router()
    session = ServerSession("fuzz:1", greeted=greeted)
    for payload in frames:
        if getattr(session, "refused", False):
            break  # (a refused hello: the connection is closed after its reply)
        now, later = place(router, session, payload)
        assert type(now) is list
        for reply in now:
            assert type(reply) is list and len(reply) == 3, reply
            rid, status, body = reply
            assert rid is None or type(rid) is int
            assert status in (0, 1)
            if status == 1:
                check_error_body(body, payload)
        if not getattr(session, "refused", False):
            assert len(now) + later == expected_replies(payload)


greeting = st.sampled_from([b"", hello_frame()])


@DEFAULT_SETTINGS
@given(st.lists(payloads, min_size=1, max_size=4), st.booleans(), greeting)
def test_the_router_answers_any_frame_with_typed_replies(frames: list[bytes], greeted: bool, hello: bytes) -> None:
    check_router([hello, *frames] if hello else frames, greeted)


@pytest.mark.fuzz
@LONG_SETTINGS
@given(st.lists(payloads, min_size=1, max_size=4), st.booleans(), greeting)
def test_long_the_router_answers_any_frame_with_typed_replies(frames: list[bytes], greeted: bool, hello: bytes) -> None:
    check_router([hello, *frames] if hello else frames, greeted)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(deep_nesting(10_000), id="10,000 nested arrays"),
        pytest.param(request_with(args=deep_nesting(10_000, b"\xa1\x63key")), id="10,000 nested maps in args"),
        pytest.param(b"\x81\x83\x01\x63get" + deep_nesting(10_000, b"\xd8\x64"), id="10,000 nested tags"),
        *(pytest.param(prefix + cbor_head(major, 2**60), id=f"{prefix.hex()}+major {major} of 2^60")
          for prefix in PREFIXES for major in (2, 3, 4, 5)),
        pytest.param(request_with(op=b"\x63g\xffe"), id="an op that is not UTF-8"),
        pytest.param(request_with(op=b"\xd8\x20\x63get"), id="an op in a tag"),
        pytest.param(request_with(args=b"\xa1\x63key\xc2\x41\x01"), id="a bignum key"),
        pytest.param(request_with(args=b"\xa1\x63key\xd9\x01\x02\x80"), id="a set as key"),
        pytest.param(request_with(rid=b"\x3b" + b"\xff" * 8), id="rid -2^64"),
        pytest.param(request_with(rid=b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00"), id="rid NaN"),
        pytest.param(cbor2.dumps([[1, "get", {"key": b"k"}]] * 10_001), id="a batch over the limit"),
        pytest.param(cbor2.dumps([[i, op, {}] for i, op in enumerate(OP_NAMES)]), id="every op, no args"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("start", ["greeted", "hello first", "no hello"])
def test_hostile_frames_the_brief_names_get_typed_replies(payload: bytes, start: str) -> None:
    check_router([hello_frame(), payload] if start == "hello first" else [payload], greeted=start == "greeted")


# A valid request of each op, and what to put in each of its fields instead.
VALID_ARGS: dict[str, dict[str, Any]] = {
    "hello": {"version": codec.PROTOCOL_VERSION, "client": "fuzz"},
    **{op: {"ns": "", "key": b"k"} for op in ("get", "getmeta", "getdel", "persist", "delete", "ttl")},
    **{op: {"ns": "", "key": b"k", "value": b"v", "ttl_ms": 1000} for op in ("set", "add", "replace")},
    "cas": {"ns": "", "key": b"k", "value": b"v", "ttl_ms": 0, "version": 1},
    "incr": {"ns": "", "key": b"n", "by": 1},
    "expire": {"ns": "", "key": b"k", "ttl_ms": 1000},
    **{op: {"ns": "", "keys": [b"a", b"b"]} for op in ("mget", "mdelete")},
    "mset": {"ns": "", "items": [[b"a", b"1"]], "ttl_ms": 0},
    "scan": {"ns": "", "prefix": b"", "cursor": None, "limit": 10},
    "scanshards": {"ns": "", "prefix": b"", "shards": [0, 1], "after": None, "limit": 10},
    **{op: {"ns": "x", "here": True} for op in ("flush", "nsstats")},
    "watch": {"ns": "", "prefix": b"", "cursor": None, "wait_ms": 0, "limit": 10},
    "events": {"ns": "", "prefix": b"", "incarnation": None, "after": 0, "wait_ms": 0, "limit": 10},
    "claim": {"shards": [1]},
    **{op: {} for op in ("ping", "stats", "members", "drain", "copies")},
    **{op: {"entries": [["", b"k", b"v", 0, 1]], "begin": [1], "done": [1], "epoch": 1} for op in ("handoff", "replicate")},
}
WRONG_VALUES = [
    None, True, -1, 2**64, -(2**64) - 1, 1.5, math.nan, "text", "é" * 300, b"bytes", b"\x00" * 70_000, [], [None], [[]],
    [b"k", 1], [-1], [8192], {}, {"x": 1}, {"n": [0]}, cbor2.CBORTag(1, 0), cbor2.undefined, cbor2.CBORSimpleValue(99),
]  # fmt: skip
INNER_WRONG = {  # elements of list fields
    "keys": [[None], [1], [b""], [[b"k"]], [b"k" * 70_000]],
    "items": [[[b"k"]], [[1, b"v"]], [[b"k", 1]], [None], [[b"", b"v"]], [[b"k", b"v", b"x"]]],
    "shards": [[-1], [8192], ["1"], [1.0]],
    "begin": [[-1], [8192]],
    "entries": [[[1, b"k", b"v", 0, 1]], [["", b"", b"v", 0, 1]], [["", b"k", None, 0, 1]], [["", b"k", b"v", -1, 1]], [[]]],
    "cursor": [[-1, None], [0, 5], [8192, None], [0, b"k" * 70_000], {"n": [0, 0]}, {"n": [1]}, {1: [1, 1]}],
}


@pytest.mark.parametrize("op", sorted(VALID_ARGS))
def test_wrong_types_in_every_field_get_typed_replies(op: str) -> None:
    """One request of ``op`` as it should be, then one for each field and
    each wrong value put in it, and each field left out: each gets a typed
    reply (the router runs them all, through the ops' checks, on a real store)."""
    valid = VALID_ARGS[op]
    messages: list[Any] = [[0, op, valid]]
    for field in valid:
        for wrong in [*WRONG_VALUES, *INNER_WRONG.get(field, ())]:
            messages.append([len(messages), op, {**valid, field: wrong}])
        messages.append([len(messages), op, {k: v for k, v in valid.items() if k != field}])
    messages.append([len(messages), op, {**valid, "extra": 1}])
    check_router([cbor2.dumps(messages)], greeted=True)


# -- 3. a running node under hostile connections -------------------------------------------------


class Hostile:
    """One hostile client's raw connection: a TCP stream and a sans-IO client
    end to make its handshake and read the node's frames with."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.proto = ClientConnection(host="fuzz", max_message=1 << 26)
        self.pending: list[bytes] = []  # messages read, not yet taken
        self.closed: int | None = None  # the close code, once the node closed it

    @classmethod
    async def open(cls, host: str, port: int) -> Hostile:
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = self.closed or 1006

    async def upgrade(self) -> None:
        await self.send(self.proto.data_to_send())
        await self.upgraded()

    async def upgraded(self) -> None:
        with trio.fail_after(OP_TIME_BOUND):
            while self.proto.state is State.HANDSHAKE:
                await self._read()  # (HandshakeFailed fails the test: these handshakes are valid)

    async def greet(self) -> None:
        await self.upgrade()
        await self.send(self.proto.frame(hello_frame()))
        [[hello]] = await self.replies(1)
        assert hello[:2] == [0, 0], hello

    async def replies(self, count: int, within: float = OP_TIME_BOUND) -> list[list[Any]]:
        """At least ``count`` replies, in the frames they came in; fewer if the node closes first."""
        frames: list[list[Any]] = []
        with trio.fail_after(within):
            while True:
                frames += [cbor2.loads(m) for m in self.pending]
                self.pending.clear()
                if sum(map(len, frames)) >= count or self.closed is not None:
                    return frames
                await self._read()

    async def until_closed(self, within: float) -> int | None:
        with trio.move_on_after(within):
            while self.closed is None:
                await self._read()
        return self.closed

    async def _read(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        try:
            self.pending += self.proto.receive_data(data)
        except ConnectionClosed as exc:
            self.closed = exc.code

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# Ops that are not hostile input but real requests a client may make of a
# whole node (drain stops it, flush empties it): the node's fuzz sends neither.
NODE_WIDE = frozenset({"drain", "flush"})
SAFE_OP_NAMES = [name for name in OP_NAMES if name not in NODE_WIDE]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random CBOR value, as the strategies above make them (no amplifying tags, no huge bignums)."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return rng.choice([None, True, False, cbor2.undefined, math.nan, math.inf, -0.0, 1.5])
    if kind == 1:
        return rng.choice(INT_EDGES)
    if kind == 2:
        return rng.randrange(-(2**70), 2**70)
    if kind in (3, 4):
        return rng.choice(FIELDS + SAFE_OP_NAMES + ["", "é" * 100, "\x00"])
    if kind in (5, 6):
        return rng.randbytes(rng.randrange(0, 40))
    if kind == 7:
        return rng.randrange(-(2**4000), 2**4000)
    if kind == 8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if kind == 9:
        return {rng.choice(FIELDS): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    if kind == 10:
        tag = rng.choice([*SEMANTIC_TAGS, rng.randrange(2**64)])
        return cbor2.CBORTag(tag, random_value(rng, depth + 1))
    return [rng.randrange(2**63), rng.choice(SAFE_OP_NAMES), {}]


def random_request(rng: random.Random) -> Any:
    """A request, mostly of a real op with its own fields (each right or anything), or anything."""
    if rng.randrange(6) == 0:
        return random_value(rng)
    op = rng.choice([*SAFE_OP_NAMES, "explode", "", "GET"])
    fields = [f for f in OP_FIELDS.get(op, ()) if rng.randrange(4)] + rng.sample(FIELDS, rng.randrange(2))
    args = {field: VALID_ARGS.get(op, {}).get(field) if rng.randrange(2) else random_value(rng) for field in fields}
    if op in ("watch", "events"):
        args.pop("wait_ms", None)  # (no waits of up to 2 s)
    return [rng.choice([rng.randrange(2**63), random_value(rng)]), op, args]


def random_payload(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind < 3:
        return _dumps([random_request(rng) for _ in range(rng.randrange(1, 6))])
    if kind == 3:
        return deep_nesting(rng.choice([17, 100, 10_000]), rng.choice([b"\x81", b"\x9f", b"\xa1\x00", b"\xd8\x64"]))
    if kind == 4:
        return rng.choice(PREFIXES) + cbor_head(rng.choice([2, 3, 4, 5]), rng.choice(HUGE_LENGTHS))
    if kind == 5:
        return request_with(op=rng.choice([b"\x63g\xffe", b"\x62\xed\xa0", b"\x61\xc3"]))
    if kind == 6:
        return rng.randbytes(rng.randrange(1, 200))
    data = bytearray(_dumps([random_request(rng)]))
    del data[rng.randrange(len(data)) :]
    return bytes(data)


def random_frames(rng: random.Random) -> bytes:
    """A few frames, each broken one way or another, or none."""
    out = b""
    for _ in range(rng.randrange(1, 4)):
        opcode = rng.choice([2, 2, 2, 0, 1, 8, 9, 10, rng.randrange(16)])
        body = random_payload(rng) if opcode < 8 else rng.randbytes(rng.randrange(0, 130))
        broken = rng.randrange(7)
        out += ws_frame(
            body,
            opcode=opcode,
            fin=rng.randrange(2) == 0 if broken == 1 else True,
            rsv=rng.randrange(1, 8) if broken == 2 else 0,
            masked=broken != 3,
            length=rng.choice(HUGE_LENGTHS) if broken == 4 else None,
            long_form=broken == 5,
        )
    return out


async def garbage_before_handshake(rng: random.Random, host: str, port: int) -> None:
    conn = await Hostile.open(host, port)
    try:
        junk = rng.choice([b"", b"GET / HTTP/1.1\r\n", HANDSHAKE[: rng.randrange(len(HANDSHAKE))]]) + rng.randbytes(
            rng.randrange(1, 3000)
        )
        await conn.send(junk + rng.choice([b"", b"\r\n\r\n"]))
        with trio.move_on_after(0.3):
            while await conn.stream.receive_some(65536):
                pass
    finally:
        await conn.aclose()


async def garbage_after_handshake(rng: random.Random, host: str, port: int) -> None:
    conn = await Hostile.open(host, port)
    try:
        await conn.upgrade()
        await conn.send(rng.randbytes(rng.randrange(1, 5000)))
        await conn.until_closed(0.3)
    finally:
        await conn.aclose()


async def huge_frame_then_nothing(rng: random.Random, host: str, port: int) -> None:
    conn = await Hostile.open(host, port)
    try:
        await conn.upgrade()
        await conn.send(ws_frame(b"", length=2**62)[:14])  # the head, with its masking key; no payload
        assert await conn.until_closed(OP_TIME_BOUND) == wsframe.CLOSE_TOO_BIG
    finally:
        await conn.aclose()


async def deep_cbor(rng: random.Random, host: str, port: int) -> None:
    conn = await Hostile.open(host, port)
    try:
        await conn.greet()
        await conn.send(conn.proto.frame(deep_nesting(10_000, rng.choice([b"\x81", b"\x9f", b"\xa1\x00"]))))
        [[reply]] = await conn.replies(1)
        assert reply[:2] == [None, 1] and reply[2][0] == ErrorCode.BAD_FRAME, reply
    finally:
        await conn.aclose()


async def trickle(rng: random.Random, host: str, port: int) -> None:
    """A handshake, a hello and a set sent one byte at a time; then the set's answer."""
    conn = await Hostile.open(host, port)
    try:
        key = rng.randbytes(8)
        data = conn.proto.data_to_send()
        data += conn.proto.frame(hello_frame())
        data += conn.proto.frame(
            cbor2.dumps([[1, "set", {"ns": "trickle", "key": key, "value": b"v"}], [2, "get", {"ns": "trickle", "key": key}]])
        )
        for i in range(len(data)):
            await conn.send(data[i : i + 1])
            await trio.sleep(rng.choice([0, 0.001, 0.003]))
        await conn.upgraded()
        replies = [r for frame in await conn.replies(3) for r in frame]
        assert [r[:2] for r in replies] == [[0, 0], [1, 0], [2, 0]] and replies[2][2] == b"v", replies
    finally:
        await conn.aclose()


async def hostile_requests(rng: random.Random, host: str, port: int) -> None:
    """Frames of random requests: each message gets a typed reply, or the node closes the connection."""
    conn = await Hostile.open(host, port)
    try:
        await conn.greet()
        for _ in range(rng.randrange(1, 6)):
            payload = random_payload(rng)
            await conn.send(conn.proto.frame(payload))
            frames = await conn.replies(expected_replies(payload))
            for reply in (r for frame in frames for r in frame):
                if reply[1] == 1:
                    check_error_body(reply[2], payload)
            if conn.closed is not None:
                # Only a hello the node refuses (a peer's on the client port, a token) may end it.
                assert has_hello(payload), (conn.closed, payload)
                break
    finally:
        await conn.aclose()


def has_hello(payload: bytes) -> bool:
    try:
        messages = cbor2.loads(payload, max_depth=codec.MAX_DEPTH)
    except Exception:
        return False
    return type(messages) is list and any(type(m) is list and len(m) == 3 and m[1] == "hello" for m in messages)


async def hostile_frames(rng: random.Random, host: str, port: int) -> None:
    conn = await Hostile.open(host, port)
    try:
        await conn.greet()
        await conn.send(random_frames(rng))
        await conn.until_closed(0.3)
    finally:
        await conn.aclose()


async def unfinished_then_gone(rng: random.Random, host: str, port: int) -> None:
    """Part of a large message, then the connection drops: its share of the budget comes back."""
    conn = await Hostile.open(host, port)
    try:
        await conn.upgrade()
        frame = ws_frame(b"\x00" * (NODE_MAX_FRAME - 16))
        await conn.send(frame[: rng.randrange(16, len(frame))])
        await trio.sleep(rng.choice([0, 0.05]))
    finally:
        await conn.aclose()


async def silent(rng: random.Random, host: str, port: int) -> None:
    conn = await Hostile.open(host, port)
    try:
        await trio.sleep(rng.choice([0.1, 0.5]))
    finally:
        await conn.aclose()


async def ping_flood(rng: random.Random, host: str, port: int) -> None:
    conn = await Hostile.open(host, port)
    try:
        await conn.greet()
        await conn.send(b"".join(ws_frame(rng.randbytes(125), opcode=wsframe.OP_PING) for _ in range(500)))
        await trio.sleep(0.05)
    finally:
        await conn.aclose()


SCENARIOS = [
    garbage_before_handshake,
    garbage_after_handshake,
    huge_frame_then_nothing,
    deep_cbor,
    trickle,
    hostile_requests,
    hostile_requests,
    hostile_frames,
    unfinished_then_gone,
    silent,
    ping_flood,
]


async def good_client(address: str, seconds: float, rng: random.Random) -> int:
    """set, get, delete and mget against a model of what the node holds; returns how many requests it made."""
    model: dict[str, bytes] = {}
    done = 0
    async with dcache.connect(address, timeout=OP_TIME_BOUND * 2) as client:
        until = trio.current_time() + seconds
        while trio.current_time() < until:
            key = f"k{rng.randrange(40)}"
            what = rng.randrange(10)
            with trio.fail_after(OP_TIME_BOUND):
                if what < 4:
                    value = rng.randbytes(rng.randrange(0, 2000))
                    await client.set(key, value, ns="good")
                    model[key] = value
                elif what < 8:
                    assert await client.get(key, ns="good") == model.get(key), key
                elif what == 8:
                    assert await client.delete(key, ns="good") == (key in model)
                    model.pop(key, None)
                else:
                    keys = [f"k{rng.randrange(40)}" for _ in range(5)]
                    assert await client.mget(keys, ns="good") == [model.get(k) for k in keys]
            done += 1
    return done


async def settled(node: Any, connections: int, within: float = 10) -> None:
    """Wait for the node's connection count to come back to ``connections`` and its unfinished budget to 0."""
    with trio.move_on_after(within):
        while node.connections != connections or node.unfinished.used:
            await trio.sleep(0.01)
    state = {"connections": node.connections, "served by the reactor": len(node.reactor), "unfinished": node.unfinished.used}
    assert state == {"connections": connections, "served by the reactor": connections, "unfinished": 0}, state


async def fuzz_a_node(nursery: trio.Nursery, seconds: float, seed: int) -> dict[str, Any]:
    """Hostile connections and a good client against a new node for ``seconds``;
    then the checks of the module docstring. Returns what happened."""
    node, bound = await start_node(nursery, limits=Limits(max_frame_bytes=NODE_MAX_FRAME), max_unfinished_bytes=NODE_UNFINISHED)
    host, port = bound.client
    address = bound.client_address
    log: list[str] = []  # the scenarios run, for a failure's report
    done: list[int] = []
    rss: list[int] = []  # the node's process_memory_bytes, once a second
    async with dcache.connect(address, timeout=OP_TIME_BOUND) as watcher:
        before = (await watcher.stats())["process_memory_bytes"]
        connections = node.connections

        async def hostile(n: int) -> None:
            rng = random.Random(f"{seed}:{n}")
            until = trio.current_time() + seconds
            while trio.current_time() < until:
                scenario = rng.choice(SCENARIOS)
                log.append(f"{n}: {scenario.__name__}")
                with trio.fail_after(10):
                    await scenario(rng, host, port)

        async def good() -> None:
            done.append(await good_client(address, seconds, random.Random(seed)))

        async def watch() -> None:  # (which also keeps the watcher's connection from going idle)
            until = trio.current_time() + seconds
            while trio.current_time() < until:
                with trio.fail_after(OP_TIME_BOUND):
                    rss.append((await watcher.stats())["process_memory_bytes"])
                await trio.sleep(1)

        try:
            with trio.fail_after(seconds + 60):
                async with trio.open_nursery() as attackers:
                    for n in range(HOSTILE_CONNECTIONS):
                        attackers.start_soon(hostile, n)
                    attackers.start_soon(good)
                    attackers.start_soon(watch)
        except BaseException:
            print(f"seed {seed}; the last scenarios: {log[-3 * HOSTILE_CONNECTIONS :]}")
            raise
        # Afterwards: every hostile connection is gone, nothing unfinished is held, new clients are served.
        await settled(node, connections)
        async with dcache.connect(address, timeout=OP_TIME_BOUND) as fresh:
            with trio.fail_after(OP_TIME_BOUND):
                await fresh.set("after", "ok")
                assert await fresh.get("after") == b"ok"
        await settled(node, connections)
        rss.append((await watcher.stats())["process_memory_bytes"])
    growth = max(rss) - before
    assert growth <= MEMORY_GROWTH_BOUND, f"RSS grew by {growth:,} bytes"
    half = len(rss) // 2
    late_growth = max(rss[half:]) - max(rss[:half]) if seconds >= LATE_GROWTH_AFTER else 0
    assert late_growth <= LATE_GROWTH_BOUND, f"RSS grew by {late_growth:,} bytes in the second half of the run"
    return {
        "good requests": done[0],
        "scenarios": len(log),
        "rss growth MiB": round(growth / 2**20, 1),
        "rss growth in the second half MiB": round(late_growth / 2**20, 1),
        "seed": seed,
    }


async def test_a_node_serves_a_good_client_through_hostile_connections(nursery: trio.Nursery) -> None:
    seed = int(os.environ.get("DCACHE_FUZZ_SEED", 1))  # (the same scenarios each default run; the long run draws a seed)
    report = await fuzz_a_node(nursery, DEFAULT_NODE_SECONDS, seed)
    assert report["good requests"] > 50 and report["scenarios"] > 2 * HOSTILE_CONNECTIONS, report


@pytest.mark.fuzz
async def test_long_a_node_serves_a_good_client_through_hostile_connections(nursery: trio.Nursery) -> None:
    seconds = float(os.environ.get("DCACHE_FUZZ_SECONDS", LONG_NODE_SECONDS))
    seed = int(os.environ.get("DCACHE_FUZZ_SEED", random.randrange(2**32)))
    started = time.perf_counter()
    report = await fuzz_a_node(nursery, seconds, seed)
    print(f"\nnode fuzz: {report} in {time.perf_counter() - started:.0f} s")
    assert report["good requests"] > 50 * seconds / DEFAULT_NODE_SECONDS


async def test_a_node_serves_a_request_sent_with_a_close(nursery: trio.Nursery) -> None:
    """A set and a close frame in one write: the set is done (found by this
    fuzzing, fixed in 2513c85)."""
    _, bound = await start_node(nursery)
    with trio.fail_after(OP_TIME_BOUND * 2):
        conn = await Hostile.open(*bound.client)
        await conn.greet()
        request = conn.proto.frame(cbor2.dumps([[1, "set", {"key": b"last words", "value": b"v"}]]))
        await conn.send(request + conn.proto.close())
        await conn.until_closed(OP_TIME_BOUND)
        await conn.aclose()
        async with dcache.connect(bound.client_address) as client:
            assert await client.get("last words") == b"v"


# -- known bugs: each is a strict xfail until it is fixed ---------------------------------------
#
# Each names the exception it fails with today (``raises``), so that a test
# broken some other way is reported, not taken for the bug. Those that need
# trio are sync tests that call trio.run and assert outside it: pytest-trio's
# nursery would wrap the exception in an ExceptionGroup.

T = TypeVar("T")


def on_a_node(body: Callable[[BoundAddresses], Awaitable[T]]) -> T:
    """``body``'s result, run in trio against a node of its own that stops after it."""

    async def main() -> T:
        async with trio.open_nursery() as nursery:
            _, bound = await start_node(nursery)
            result = await body(bound)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def handshake_with(name: bytes, value: bytes) -> bytes:
    """HANDSHAKE with a header ``name: value`` (in place of the one of that name, if any)."""
    lines = [line for line in HANDSHAKE.split(b"\r\n") if not line.lower().startswith(name.lower() + b":")]
    return b"\r\n".join([*lines[:-2], name + b": " + value, b"", b""])


@settings(DEFAULT_SETTINGS, max_examples=30, report_multiple_bugs=False)  # (one exception, not a group of them)
@given(st.sampled_from([b"Host", b"Connection", b"Sec-WebSocket-Extensions"]), st.binary(min_size=1, max_size=8))
@example(b"Host", b"\x81")
@example(b"Connection", b"Upgrade, \xff")
@example(b"Sec-WebSocket-Extensions", b"\xff")
def test_was_bug_non_ascii_header_bytes_fail_the_handshake_cleanly(name: bytes, value: bytes) -> None:
    """wsproto decodes Host as IDNA and Connection and Sec-WebSocket-Extensions
    as ASCII; the UnicodeDecodeError escapes Connection.receive_data (not
    HandshakeFailed, no 400 response). A node's transport.accept does not
    catch it either: _serve_connection's catch-all logs a traceback for each
    such connection and drops it unanswered."""
    value = value.replace(b"\r", b"").replace(b"\n", b"")
    server = Connection(client_side=False, max_message=MAX_MESSAGE)
    try:
        server.receive_data(handshake_with(name, value))
    except HandshakeFailed:
        assert server.data_to_send().startswith(b"HTTP/1.1 4")
    else:
        assert server.state is State.OPEN


def test_was_bug_non_ascii_header_bytes_get_an_http_error_from_a_node() -> None:
    async def answer(bound: BoundAddresses) -> bytes:
        with trio.fail_after(OP_TIME_BOUND * 2):
            stream = await trio.open_tcp_stream(*bound.client)
            await stream.send_all(handshake_with(b"Sec-WebSocket-Extensions", b"\xff"))
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
            await stream.aclose()
        return response

    response = on_a_node(answer)
    assert response.startswith(b"HTTP/1.1 400 "), response


BIGNUM = b"\xc2\x59\x08\x00" + b"\xff" * 0x800  # tag 2: a 2 KiB positive bignum, 4,933 digits


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x81\x83\x00\x65hello\xa1\x67version" + BIGNUM, id="hello version"),
        pytest.param(request_with(op=BIGNUM), id="op"),
        pytest.param(request_with(args=b"\xa2\x63key\x41k" + BIGNUM + b"\x00"), id="unknown field"),
    ],
)
def test_was_bug_huge_integers_in_error_messages(payload: bytes) -> None:
    """ServerSession.hello's "not {version}", check_request's "unknown op
    {name!r}" and _fields' "unknown field(s)" format the value, and Python
    refuses int→str past 4,300 digits. The ValueError escapes Router.place;
    a node's reactor logs a traceback and closes the connection with no reply."""
    check_router([payload], greeted=True)


def test_was_bug_a_node_answers_a_hello_with_a_huge_version() -> None:
    async def replies(bound: BoundAddresses) -> tuple[list[list[Any]], int | None]:
        conn = await Hostile.open(*bound.client)
        with trio.fail_after(OP_TIME_BOUND * 2):
            await conn.upgrade()
            await conn.send(conn.proto.frame(b"\x81\x83\x00\x65hello\xa1\x67version" + BIGNUM))
            frames = await conn.replies(1)
        await conn.aclose()
        return frames, conn.closed

    frames, closed = on_a_node(replies)
    assert frames and frames[0][0][2][0] == ErrorCode.UNSUPPORTED_VERSION, (frames, closed)


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(shared_dag(4, 50), id="shared values, 4 levels of 50"),
        pytest.param(string_refs(1000, 1000), id="1,000 string references"),
        pytest.param(cbor_head(4, 20_000) + b"\xc1\x00" * 20_000, id="20,000 datetimes"),
    ],
)
def test_was_bug_error_messages_echo_without_bound(op: bytes) -> None:
    """``unknown op {name!r}`` (and ``unknown field(s)``) put repr() of any
    value in the reply. Shared values (tags 28/29) make it exponential: the
    first case is a 471-byte frame and a 643 KB message; 8 levels of 50 (under
    1 KB) would take the node's one reactor task and all its memory. String
    references (tags 256/25) repeat a text: 4 KB, 1 MB. Plain items repr to up
    to ~34 times their size (a 40 KB frame of datetimes, 1.3 MB)."""
    payload = request_with(op=op)
    [[_, status, body]], _ = place(make_router(), ServerSession(greeted=True), payload)
    assert status == 1
    assert len(body[1]) <= 4096, f"a {len(payload):,}-byte frame got a {len(body[1]):,}-character error message"


def test_was_bug_a_small_frame_gets_a_huge_error_reply_from_a_node() -> None:
    payload = request_with(op=shared_dag(4, 60))

    async def reply(bound: BoundAddresses) -> Any:
        conn = await Hostile.open(*bound.client)
        with trio.fail_after(20):
            await conn.greet()
            await conn.send(conn.proto.frame(payload))
            [[reply]] = await conn.replies(1, within=20)
        await conn.aclose()
        return reply

    size = len(cbor2.dumps(on_a_node(reply)))
    assert size <= 65536, f"a {len(payload)}-byte frame got a {size:,}-byte reply"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="bug: a 1 MB frame of small CBOR items takes the router a second")
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(cbor_head(4, 1_000_000) + b"\x80" * 1_000_000, id="a frame of 10^6 empty arrays"),
        pytest.param(
            request_with(b"\x64mget", b"\xa1\x64keys" + cbor_head(4, 1_000_000) + b"\xf0" * 1_000_000),
            id="mget of 10^6 simple values",
        ),
    ],
)
def test_known_bug_small_items_make_decoding_slow(payload: bytes) -> None:
    """cbor2 makes an object of each 1-byte ``\\x80`` (an empty array) or
    ``\\xf0`` (a simple value): ~1 µs and ~57 bytes of memory per byte of frame,
    and the whole frame is decoded before max_batch is looked at. A frame
    within the default 64 MiB limit holds the node's reactor (so every
    connection) for most of a minute and takes ~3.6 GB. 10^6 small ints take 50 ms."""
    started = time.perf_counter()
    now, _ = place(make_router(), ServerSession(greeted=True), payload)
    elapsed = time.perf_counter() - started
    assert now[0][1] == 1
    assert elapsed < 0.25, f"{elapsed:.2f} s for a {len(payload):,}-byte frame"


def test_was_bug_a_node_answers_after_its_close_frame() -> None:
    """Since 2513c85 a request that comes with a close frame is served, but the
    reactor queues its answering close frame (with the pongs) before the
    request's reply: a data frame after a Close (RFC 6455 5.5.1 forbids it),
    and the node then waits for the client to hang up (until its idle timeout)
    where it used to close the TCP connection at once (RFC 6455 7.1.1)."""

    async def answer(bound: BoundAddresses) -> tuple[list[Any], bool]:
        conn = await Hostile.open(*bound.client)
        with trio.fail_after(OP_TIME_BOUND * 2):
            await conn.greet()
            request = conn.proto.frame(cbor2.dumps([[1, "set", {"key": b"k", "value": b"v"}]]))
            await conn.send(request + conn.proto.close())
        raw, hung_up = b"", False
        with trio.move_on_after(1):
            while chunk := await conn.stream.receive_some(65536):
                raw += chunk
            hung_up = True
        await conn.aclose()
        frames = wsframe.FrameParser(expect_masked=False, max_message=1 << 20).feed(raw)
        return [f if type(f) is bytes else f.opcode for f in frames], hung_up

    frames, hung_up = on_a_node(answer)
    assert [type(f) for f in frames] == [bytes, int] and frames[1] == wsframe.OP_CLOSE, frames
    assert hung_up


def test_was_bug_router_handle_with_an_unhashable_rid() -> None:
    """Router.handle (for tools and tests) orders replies through a dict keyed
    by each message's rid: a list as rid raises TypeError when another
    request in the frame waits (members)."""
    frame = cbor2.dumps([[[1], "get", {}], [2, "members", {}]])
    reply = trio.run(make_router().handle, ServerSession(greeted=True), [frame])
    assert [r[:2] for r in cbor2.loads(reply)] == [[2, 0], [None, 1]]  # (a reply with no rid goes last)
