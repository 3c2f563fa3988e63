"""The wire format, without I/O: round trips, and every kind of bad input rejected with its code."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache import codec, ops
from dcache.codec import ErrorCode, Limits, Status, WireError

LIMITS = Limits(max_key_bytes=16, max_value_bytes=64, max_batch=8, max_frame_bytes=4096)


def parse(message: Any, limits: Limits = LIMITS) -> ops.Request:
    return ops.parse_request(message, limits)


def rejects(message: Any, code: ErrorCode, limits: Limits = LIMITS) -> WireError:
    with pytest.raises(WireError) as info:
        parse(message, limits)
    assert info.value.code == code, info.value
    return info.value


VALID = [
    ([1, "hello", {"version": 1, "client": "x"}], {"version": 1, "client": "x", "peer": "", "token": None}),
    (
        [1, "hello", {"version": 1, "client": "x", "token": "t" * 16}],
        {"version": 1, "client": "x", "peer": "", "token": "t" * 16},
    ),
    ([2, "ping", {}], {}),
    ([3, "get", {"key": b"k"}], {"ns": "", "key": b"k"}),
    ([4, "get", {"key": "text", "ns": "users"}], {"ns": "users", "key": b"text"}),
    ([5, "set", {"key": b"k", "value": b"v"}], {"ns": "", "key": b"k", "value": b"v", "ttl_ms": 0}),
    ([6, "set", {"key": b"k", "value": "é", "ttl_ms": 1500}], {"ns": "", "key": b"k", "value": "é".encode(), "ttl_ms": 1500}),
    ([7, "delete", {"key": b"k"}], {"ns": "", "key": b"k"}),
    ([8, "ttl", {"key": b"k"}], {"ns": "", "key": b"k"}),
    ([9, "mget", {"keys": [b"a", "b"]}], {"ns": "", "keys": [b"a", b"b"]}),
    ([10, "mset", {"items": [[b"a", b"1"]], "ttl_ms": 5}], {"ns": "", "items": [(b"a", b"1")], "ttl_ms": 5}),
    ([11, "mdelete", {"keys": [b"a"]}], {"ns": "", "keys": [b"a"]}),
    ([12, "stats", {}], {}),
    ([13, "members", {}], {}),
    (
        [14, "handoff", {"entries": [["ns", b"k", b"v", 0, 7]], "begin": [5], "done": [5], "epoch": 9}],
        {"entries": [["ns", b"k", b"v", 0, 7]], "begin": [5], "done": [5], "epoch": 9},
    ),
    ([15, "claim", {"shards": [0, 8191]}], {"shards": [0, 8191]}),
    ([16, "drain", {}], {}),
    (
        [17, "replicate", {"entries": [["", b"k", b"v", 5, 7], ["", b"g", None, 0, 0]], "begin": [], "done": [], "epoch": 2}],
        {"entries": [["", b"k", b"v", 5, 7], ["", b"g", None, 0, 0]], "begin": [], "done": [], "epoch": 2},
    ),
    ([18, "copies", {}], {}),
    ([19, "getmeta", {"key": b"k"}], {"ns": "", "key": b"k"}),
    ([20, "add", {"key": b"k", "value": b"v"}], {"ns": "", "key": b"k", "value": b"v", "ttl_ms": 0}),
    ([21, "replace", {"key": b"k", "value": b"v", "ttl_ms": 9}], {"ns": "", "key": b"k", "value": b"v", "ttl_ms": 9}),
    (
        [22, "cas", {"key": b"k", "value": b"v", "version": 4}],
        {"ns": "", "key": b"k", "value": b"v", "ttl_ms": 0, "version": 4},
    ),
    ([23, "incr", {"key": b"k"}], {"ns": "", "key": b"k", "by": 1}),
    ([24, "incr", {"key": b"k", "by": -(2**63)}], {"ns": "", "key": b"k", "by": -(2**63)}),
    ([25, "getdel", {"key": b"k"}], {"ns": "", "key": b"k"}),
    ([26, "expire", {"key": b"k", "ttl_ms": 1500}], {"ns": "", "key": b"k", "ttl_ms": 1500}),
    ([27, "persist", {"key": b"k", "ns": "a"}], {"ns": "a", "key": b"k"}),
    ([28, "scan", {}], {"ns": "", "prefix": b"", "limit": 100, "cursor": (0, None)}),
    (
        [29, "scan", {"ns": "a", "prefix": "user:", "limit": 1000, "cursor": [17, b"user:9"]}],
        {"ns": "a", "prefix": b"user:", "limit": 1000, "cursor": (17, b"user:9")},
    ),
    (
        [30, "scanshards", {"shards": [1, 5], "after": None, "limit": 3}],
        {"ns": "", "prefix": b"", "limit": 3, "shards": [1, 5], "after": None},
    ),
    ([31, "flush", {"ns": "a"}], {"ns": "a", "here": False}),
    ([32, "flush", {"all": True, "here": True}], {"ns": None, "here": True}),
    ([33, "nsstats", {"ns": ""}], {"ns": "", "here": False}),
    (
        [34, "watch", {"prefix": b"u", "cursor": {"a:1": [7, 12]}, "wait_ms": 0}],
        {"ns": "", "prefix": b"u", "limit": 100, "wait_ms": 0, "cursor": {"a:1": (7, 12)}},
    ),
    ([35, "watch", {}], {"ns": "", "prefix": b"", "limit": 100, "wait_ms": 100, "cursor": {}}),
    (
        [36, "events", {"incarnation": None, "after": 0, "limit": 5}],
        {"ns": "", "prefix": b"", "limit": 5, "incarnation": None, "after": 0, "wait_ms": 100},
    ),
]


@pytest.mark.parametrize(("message", "args"), VALID)
def test_every_op_round_trips_through_a_frame(message: list[Any], args: dict[str, Any]) -> None:
    frame = codec.encode_frame([message])
    [decoded] = codec.decode_frame(frame, LIMITS)
    request = parse(decoded)
    assert (request.rid, request.op, request.args) == (message[0], message[1], args)


def test_every_op_is_covered() -> None:
    assert {m[1] for m, _ in VALID} == set(ops.OPS)


def test_replies_round_trip() -> None:
    replies = [codec.ok(1, b"v"), codec.ok(2), codec.error(3, ErrorCode.MOVED, "elsewhere", {"epoch": 9})]
    decoded = codec.decode_frame(codec.encode_frame(replies), LIMITS)
    assert [codec.parse_reply(r) for r in decoded] == [
        (1, 0, b"v"),
        (2, 0, None),
        (3, 1, ["moved", "elsewhere", {"epoch": 9}]),
    ]


@pytest.mark.parametrize(
    "reply",
    [
        [1, 0],
        "x",
        [1, 7, None],
        [1, 2, None],
        [1, 1, "oops"],
        [1, 1, ["code"]],
        [1, 1, ["code", 5]],
        [1, 1, ["c", "m", "d"]],
        ["1", 0, None],
    ],
)
def test_malformed_replies_are_refused(reply: Any) -> None:
    with pytest.raises(WireError) as info:
        codec.parse_reply(reply)
    assert info.value.code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xff\xff", ErrorCode.BAD_FRAME),
        (b"", ErrorCode.BAD_FRAME),
        (cbor2.dumps({"a": 1}), ErrorCode.BAD_FRAME),
        (cbor2.dumps("text"), ErrorCode.BAD_FRAME),
        (cbor2.dumps([[i, "ping", {}] for i in range(9)]), ErrorCode.BATCH_TOO_LARGE),
        (b"\x81" * 100_000 + b"\x00", ErrorCode.BAD_FRAME),  # nested 100k deep
        (b"\x5b" + (2**62).to_bytes(8, "big") + b"abc", ErrorCode.BAD_FRAME),  # huge declared length
        (b"\x9f" * 50 + b"\xff" * 50, ErrorCode.BAD_FRAME),  # deep indefinite arrays
        (b"\x81\x63\xff\xfe\xfd", ErrorCode.BAD_FRAME),  # invalid UTF-8 text
    ],
)
def test_bad_frames(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(WireError) as info:
        codec.decode_frame(payload, Limits(max_batch=8))
    assert info.value.code == code
    assert info.value.rid is None


def test_frame_over_the_limit() -> None:
    with pytest.raises(WireError) as info:
        codec.decode_frame(b"\x00" * 5000, LIMITS)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_bad_requests_keep_their_rid() -> None:
    assert rejects([7, "explode", {}], ErrorCode.UNKNOWN_OP).rid == 7
    assert rejects([7, 42, {}], ErrorCode.UNKNOWN_OP).rid == 7
    assert rejects([7, "get", []], ErrorCode.BAD_REQUEST).rid == 7
    assert rejects([7, "get", {}], ErrorCode.BAD_REQUEST).rid == 7
    assert rejects([7, "get", {"key": b"k", "extra": 1}], ErrorCode.BAD_REQUEST).rid == 7


@pytest.mark.parametrize(
    "message",
    [[], [1, "get"], [1, "get", {}, 4], "get", [-1, "ping", {}], [2**63, "ping", {}], [1.5, "ping", {}], [None, "ping", {}]],
)
def test_unusable_shapes_have_no_rid(message: Any) -> None:
    assert rejects(message, ErrorCode.BAD_REQUEST).rid is None


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"key": 5}, ErrorCode.BAD_REQUEST),
        ({"key": b""}, ErrorCode.BAD_REQUEST),
        ({"key": None}, ErrorCode.BAD_REQUEST),
        ({"key": [b"k"]}, ErrorCode.BAD_REQUEST),
        ({"key": b"k" * 17}, ErrorCode.KEY_TOO_LARGE),
        ({"key": "é" * 9}, ErrorCode.KEY_TOO_LARGE),  # 18 bytes of UTF-8
        ({"key": b"k", "ns": 5}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "ns": "n" * 256}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "ns": "\U0001f600" * 64}, ErrorCode.BAD_REQUEST),  # 64 characters, 256 bytes
        ({"key": b"k", "ns": "", "x": 1}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "x": 1}, ErrorCode.BAD_REQUEST),
    ],
)
def test_key_validation(args: dict[str, Any], code: ErrorCode) -> None:
    rejects([1, "get", args], code)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"key": b"k"}, ErrorCode.BAD_REQUEST),
        ({"value": b"v"}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "value": 3}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "value": b"v" * 65}, ErrorCode.VALUE_TOO_LARGE),
        ({"key": b"k", "value": b"v", "ttl_ms": -1}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "value": b"v", "ttl_ms": 1.5}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "value": b"v", "ttl_ms": "60"}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "value": b"v", "ttl_ms": codec.MAX_TTL_MS + 1}, ErrorCode.BAD_REQUEST),
        ({"key": b"k", "value": b"v", "ttl_ms": True}, ErrorCode.BAD_REQUEST),
    ],
)
def test_set_validation(args: dict[str, Any], code: ErrorCode) -> None:
    rejects([1, "set", args], code)


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("cas", {"key": b"k", "value": b"v"}),  # no version
        ("cas", {"key": b"k", "value": b"v", "version": -1}),
        ("cas", {"key": b"k", "value": b"v", "version": "3"}),
        ("add", {"key": b"k", "value": b"v", "version": 3}),  # only cas takes a version
        ("incr", {"key": b"k", "by": 2**63}),
        ("incr", {"key": b"k", "by": 1.5}),
        ("incr", {"key": b"k", "by": "1"}),
        ("incr", {"by": 1}),
        ("expire", {"key": b"k"}),
        ("expire", {"key": b"k", "ttl_ms": 0}),  # persist removes a TTL
        ("expire", {"key": b"k", "ttl_ms": codec.MAX_TTL_MS + 1}),
        ("persist", {"key": b"k", "ttl_ms": 5}),
        ("scan", {"limit": 0}),
        ("scan", {"limit": 1001}),
        ("scan", {"cursor": [8192, None]}),
        ("scan", {"cursor": [1, "text"]}),
        ("scan", {"cursor": 5}),
        ("scan", {"prefix": 5}),
        ("scanshards", {"shards": [8192]}),
        ("flush", {}),  # a namespace, or all: never by default
        ("flush", {"ns": "a", "all": True}),
        ("flush", {"all": 1}),
        ("nsstats", {"all": True}),
        ("watch", {"wait_ms": 2001}),
        ("watch", {"cursor": [1, 2]}),
        ("watch", {"cursor": {"a": [0, 1]}}),  # incarnations start at 1
        ("watch", {"cursor": {"a": [1, -1]}}),
        ("events", {"after": "1"}),
    ],
)
def test_the_other_writes_check_their_arguments(op: str, args: dict[str, Any]) -> None:
    rejects([1, op, args], ErrorCode.BAD_REQUEST)


def test_a_namespace_of_up_to_255_bytes_is_taken_whatever_its_characters() -> None:
    assert parse([1, "get", {"key": b"k", "ns": "\U0001f600" * 63}]).args["ns"] == "\U0001f600" * 63
    assert parse([1, "get", {"key": b"k", "ns": "n" * 255}]).args["ns"] == "n" * 255
    assert parse([1, "get", {"key": "k"}]).args == {"ns": "", "key": b"k"}  # text keys become bytes


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"v" * 23,
        b"v" * 24,
        b"v" * 255,
        b"v" * 256,
        b"v" * 65535,
        b"v" * 65536,
        None,
        True,
        False,
        0,
        23,
        24,
        2**40,
        -1,
        "text",
        [b"a", None],
        {"n": 1},
    ],
)
@pytest.mark.parametrize("rid", [0, 23, 24, 255, 256, 65536, 2**32, codec.MAX_RID])
def test_reply_frames_built_by_hand_are_what_the_encoder_makes(rid: int, body: Any) -> None:
    for status in (Status.OK, Status.ERROR, 0):
        assert codec.reply_frame(rid, status, body) == codec.encode_frame([[rid, int(status), body]])


def test_batch_validation() -> None:
    rejects([1, "mget", {"keys": b"k"}], ErrorCode.BAD_REQUEST)
    rejects([1, "mget", {"keys": [b"k"] * 9}], ErrorCode.BATCH_TOO_LARGE)
    rejects([1, "mget", {"keys": [b"k", 5]}], ErrorCode.BAD_REQUEST)
    rejects([1, "mset", {"items": [[b"k"]]}], ErrorCode.BAD_REQUEST)
    rejects([1, "mset", {"items": [b"k", b"v"]}], ErrorCode.BAD_REQUEST)
    rejects([1, "mset", {"items": [[b"k", b"v" * 65]]}], ErrorCode.VALUE_TOO_LARGE)
    rejects([1, "hello", {}], ErrorCode.BAD_REQUEST)
    rejects([1, "hello", {"version": "1"}], ErrorCode.BAD_REQUEST)
    rejects([1, "hello", {"version": 1, "token": 12345}], ErrorCode.BAD_REQUEST)
    rejects([1, "hello", {"version": 1, "token": "t" * 5000}], ErrorCode.BAD_REQUEST)
    rejects([1, "ping", {"x": 1}], ErrorCode.BAD_REQUEST)


def test_tagged_values_are_not_mistaken_for_bytes() -> None:
    # A CBOR bignum tag decodes to an int, a datetime tag to a datetime: neither is a key.
    rejects(cbor2.loads(cbor2.dumps([1, "get", {"key": 2**70}])), ErrorCode.BAD_REQUEST)
    payload = cbor2.dumps([[1, "get", {"key": cbor2.CBORTag(1, 0)}]])
    [message] = codec.decode_frame(payload, LIMITS)
    rejects(message, ErrorCode.BAD_REQUEST)


# -- fuzzing: nothing but WireError may come out ----------------------------------------

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.binary(max_size=40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
op_names = st.sampled_from([*ops.OPS, "nope"])
messages = st.tuples(
    st.integers(min_value=-2, max_value=2**64),
    op_names,
    cbor_values
    | st.dictionaries(
        st.sampled_from(["key", "keys", "value", "items", "ns", "ttl_ms", "version", "client", "peer", "x"]),
        cbor_values,
        max_size=4,
    ),
).map(list)


def serve(payload: bytes) -> None:
    try:
        frame = codec.decode_frame(payload, LIMITS)
    except WireError:
        return
    for message in frame:
        try:
            ops.parse_request(message, LIMITS)
        except WireError as exc:
            assert isinstance(exc.code, ErrorCode)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(payload: bytes) -> None:
    serve(payload)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages | cbor_values, max_size=10))
def test_fuzz_cbor_structures(frame: list[Any]) -> None:
    serve(cbor2.dumps(frame))


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=3), st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=3))
def test_fuzz_mutated_valid_frames(frame: list[Any], position: int, garbage: bytes) -> None:
    payload = bytearray(cbor2.dumps(frame))
    position %= len(payload)
    payload[position : position + len(garbage)] = garbage
    serve(bytes(payload))


# -- messages passed on as they came ------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=codec.MAX_RID),
    st.tuples(st.just(0), cbor_values) | st.just((1, ["moved", "elsewhere", {"epoch": 3}])),
)
def test_a_single_message_splits_at_its_rid_and_rejoins(rid: int, reply: tuple[int, Any]) -> None:
    status, body = reply
    payload = codec.encode_frame([[rid, status, body]])
    split = codec.split_single(payload)
    assert split is not None and split[0] == rid
    rest = payload[split[1] :]
    assert rest == codec.encode_rest(status, body)
    assert codec.decode_rest(rest) == (status, body)
    for other in (0, 23, 24, 255, 256, 2**32, codec.MAX_RID):
        assert cbor2.loads(codec.single_frame(other, rest)) == [[other, status, body]]
    assert cbor2.loads(codec.encode_frame([codec.message(9, rest), [10, "get", {}]])) == [[9, status, body], [10, "get", {}]]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x81",
        b"\x81\x83",
        b"\x81\x83\x05",  # nothing after the rid
        b"\x81\x83\x19\x01",  # rid cut short
        b"\x81\x83\x19\x01\x00",  # nothing after a two-byte rid
        b"\x81\x83\xf6\x00\xf6",  # null rid
        b"\x81\x83\x1c\x00\x00",  # reserved head
        b"\x81\x83\x20\x00\xf6",  # negative rid
        b"\x82\x83\x01\x00\xf6\x83\x02\x00\xf6",  # two messages
        b"\x81\x82\x01\x00",  # two elements
    ],
)
def test_only_a_single_three_element_message_with_a_rid_splits(payload: bytes) -> None:
    assert codec.split_single(payload) is None


def test_a_malformed_rest_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        codec.decode_rest(b"\x01\x82")  # an error whose body is cut short
    with pytest.raises(WireError):
        codec.decode_rest(codec.encode_rest(1, "not [code, message]"))


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("handoff", {"entries": [], "begin": [], "done": [], "epoch": 1, "extra": 1}),
        ("handoff", {"entries": [["", b"k", b"v", 0]], "begin": [], "done": [], "epoch": 1}),
        ("handoff", {"entries": [["", b"", b"v", 0, 1]], "begin": [], "done": [], "epoch": 1}),
        ("handoff", {"entries": [["", b"k", b"v", -1, 1]], "begin": [], "done": [], "epoch": 1}),
        ("handoff", {"entries": [["", "k", b"v", 0, 1]], "begin": [], "done": [], "epoch": 1}),
        ("handoff", {"entries": [], "begin": [], "done": [8192], "epoch": 1}),
        ("handoff", {"entries": [], "begin": [-1], "done": [], "epoch": 1}),
        ("handoff", {"entries": [], "begin": [], "done": []}),
        ("handoff", {"entries": [], "begin": [], "done": [], "epoch": -1}),
        (
            "handoff",
            {"entries": [["", b"k", None, 0, 1]], "begin": [], "done": [], "epoch": 1},
        ),  # (only replicas hear of deletes)
        ("replicate", {"entries": [["", b"k", 1, 0, 1]], "begin": [], "done": [], "epoch": 1}),
        ("replicate", {"entries": [], "begin": [8192], "done": [], "epoch": 1}),
        ("replicate", {"entries": []}),
        ("claim", {"shards": [-1]}),
        ("claim", {"shards": 3}),
        ("claim", {}),
    ],
)
def test_moving_shards_takes_only_well_formed_messages(op: str, args: dict[str, Any]) -> None:
    rejects([1, op, args], ErrorCode.BAD_REQUEST)
