"""The op table, without I/O: what each op names, and how many-key requests split and merge."""

from __future__ import annotations

from dcache import ops
from dcache.codec import Limits
from dcache.ops import OPS, Keys
from dcache.store import Store


def test_every_op_says_where_it_runs() -> None:
    keyed_writes = {"set", "add", "replace", "cas", "incr", "getdel", "expire", "persist", "delete"}
    assert {name for name, op in OPS.items() if op.keys is Keys.ONE} == {"get", "getmeta", "ttl", *keyed_writes} == ops.KEYED
    assert {name for name, op in OPS.items() if op.keys is Keys.MANY} == {"mget", "mset", "mdelete"}
    assert {name for name, op in OPS.items() if op.write} == {*keyed_writes, "mset", "mdelete", "flush"}
    for op in OPS.values():
        assert op.keys is Keys.NONE or op.apply is not None, op.name
        assert (op.keys is Keys.MANY) == bool(op.field), op.name


def test_a_many_key_request_splits_by_position_and_merges_back() -> None:
    mset = OPS["mset"]
    args = mset.check({"items": [["a", "1"], ["b", "2"], ["c", "3"]], "ttl_ms": 5}, Limits())
    assert list(mset.keys_of(args)) == [b"a", b"b", b"c"]
    part = mset.part(args, [mset.elements(args)[i] for i in (0, 2)])
    assert part == {"ns": "", "items": [(b"a", b"1"), (b"c", b"3")], "ttl_ms": 5}
    assert mset.wire(part)["items"] == [[b"a", b"1"], [b"c", b"3"]]  # as a client would send it
    assert mset.merged(3, [([0, 2], [10, 12]), ([1], [11])]) == [10, 11, 12]
    assert OPS["mdelete"].merged(3, [([0, 2], 2), ([1], 0)]) == 2


def test_ops_apply_to_a_store() -> None:
    store = Store(clock=lambda: 0.0)
    limits = Limits()

    def run(name: str, args: dict) -> object:
        op = OPS[name]
        assert op.apply is not None
        return op.apply(store, op.check(args, limits))

    assert run("mset", {"items": [["a", "1"], ["b", "2"]]}) == [1, 2]
    assert run("mget", {"keys": ["a", "x", "b"]}) == [b"1", None, b"2"]
    assert run("ttl", {"key": "a"}) == -1
    assert run("mdelete", {"keys": ["a", "b", "x"]}) == 2
    assert run("get", {"key": "a"}) is None
