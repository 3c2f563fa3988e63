"""The op table: every request a node understands, declared once.

Each :class:`Op` says how its arguments are checked, which field holds its
key or keys, whether it writes, what it does to the owning node's store, and
how a request on many keys splits by owner and merges back. Codec
validation (:func:`parse_request`), the router and the cluster-aware client
all read it: adding an op is one entry here, one store method and one
command in :mod:`dcache.commands`.

Replies: hello → {"version", "server", "node", "epoch", "limits"}; ping → null;
get → value or null; getmeta → [value, version, remaining ms or -1] or null;
set → the entry's new version; add → version, or null if the key is there;
replace → version, or null if it is missing; cas → [true, new version] or
[false, current version or null]; incr → the new number; getdel → the value
removed or null; expire and persist → true if the key is there; delete → true
if it existed; ttl → remaining ms, -1 for no TTL, null if missing; mget →
[value or null, ...]; mset → [version, ...]; mdelete → number deleted; scan →
{"keys": [key, ...], "cursor": the next page's cursor, null at the end};
scanshards → [[shard, key], ...]; flush → {"flushed": total, "nodes": {node:
count}}; nsstats → {"keys", "data_bytes", "nodes": {node: {"keys",
"data_bytes"}}}; watch → {"events": [[node, kind, key], ...], "cursor": {node:
[incarnation, seq]}, "lost": [[node, missed, restarted], ...]}; events →
{"incarnation", "events": [[seq, kind, key], ...], "next", "missed",
"restarted"}; stats → map of
counters; members → {"epoch", "members": [{"node", "client", "state",
"stats"}, ...]}; drain → what the node handed over
({"shards_moved", "entries_moved", "shards_left_behind", "entries_left_behind"}),
after which it stops; handoff (from a node handing entries over) →
{"taken", "serving", "refused"}; claim (from a node waiting for shards) →
{"absent", "elsewhere"}; replicate (from a shard's owner to its replicas) →
{"refused"}; copies (from an owner to a replica) → {"held": [shard, ...]}.

A hello with ``peer`` (the sender's node id) opens a node-to-node link: its
keyed requests are served only if the receiving node owns the key, else
answered ``moved``, so a request is never forwarded twice.

Sans-IO: no trio, no sockets; the store is whatever object has the methods
an op's ``apply`` calls.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .codec import MAX_NAMESPACE_BYTES, MAX_RID, MAX_TTL_MS, ErrorCode, Limits, WireError, shown
from .security import MAX_TOKEN_BYTES
from .shard import NUM_SHARDS
from .store import MAX_INCR, MIN_INCR


class Request(NamedTuple):  # a tuple: made for every request, at half a frozen dataclass's cost
    """A validated request. ``args`` holds normalized fields: keys are bytes,
    ``ns`` is always present for keyed ops, ``ttl_ms`` is 0 for "no TTL"."""

    rid: int
    op: str
    args: dict[str, Any]


class Keys(enum.Enum):
    """Which keys an op names, which decides where it runs."""

    NONE = "none"  # answered by the node it reaches (hello, ping, stats, members)
    ONE = "one"  # ``args["key"]``: runs on the key's owner
    MANY = "many"  # a list in ``args[op.field]``: split by owner, merged back


@dataclass(frozen=True, slots=True)
class Op:
    """One op. ``check`` validates and normalizes its args (raising WireError);
    ``apply`` runs it on the owning node's store (None: the node answers it
    itself); for many keys, ``field`` holds them (or ``[key, value]`` pairs
    when ``pairs``) and ``merge`` says how the owners' answers join:
    ``"positional"`` (one result per key, in order) or ``"sum"``."""

    name: str
    check: Callable[[dict[str, Any], Limits], dict[str, Any]]
    keys: Keys = Keys.NONE
    write: bool = False
    apply: Callable[[Any, dict[str, Any]], Any] | None = None
    field: str = ""
    pairs: bool = False
    merge: str = "positional"
    peer_only: bool = False  # node-to-node: refused on a client's connection

    def elements(self, args: dict[str, Any]) -> list[Any]:
        """A many-key request's keys (or pairs), in order."""
        return args[self.field]  # type: ignore[no-any-return]

    def key_of(self, element: Any) -> bytes:
        return element[0] if self.pairs else element  # type: ignore[no-any-return]

    def keys_of(self, args: dict[str, Any]) -> Iterable[bytes]:
        elements = args[self.field]
        keys: Iterable[bytes] = (e[0] for e in elements) if self.pairs else elements
        return keys

    def part(self, args: dict[str, Any], elements: list[Any]) -> dict[str, Any]:
        """The args of the part of a many-key request that holds ``elements``."""
        part = dict(args)
        part[self.field] = elements
        return part

    def wire(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validated args back in wire form (pairs as [key, value] lists), to forward."""
        if self.pairs:
            return {**args, self.field: [list(item) for item in args[self.field]]}
        return args

    def merged(self, size: int, parts: Iterable[tuple[list[int], Any]]) -> Any:
        """The answer to the whole request from its parts' answers, each with
        the positions of its elements in the original request."""
        if self.merge == "sum":
            return sum(body for _, body in parts)
        results: list[Any] = [None] * size
        for positions, body in parts:
            for i, value in zip(positions, body):
                results[i] = value
        return results


def parse_request(message: Any, limits: Limits) -> Request:
    """Validate one raw request message; raise WireError with its rid if it is bad."""
    rid, op, args = check_request(message, limits)
    return Request(rid, op.name, args)


def check_request(message: Any, limits: Limits) -> tuple[int, Op, dict[str, Any]]:
    """:func:`parse_request` as a plain tuple of the rid, the op and its
    normalized args (the router's way for a lone request, which needs no more)."""
    if type(message) is not list or len(message) != 3:
        raise WireError(ErrorCode.BAD_REQUEST, "a request is [rid, op, args]")
    rid, name, args = message
    if type(rid) is not int or not 0 <= rid <= MAX_RID:
        raise WireError(ErrorCode.BAD_REQUEST, "rid must be an unsigned 63-bit integer")
    op = OPS.get(name) if type(name) is str else None
    if op is None:
        raise WireError(ErrorCode.UNKNOWN_OP, f"unknown op {shown(name)}", rid)
    if type(args) is not dict:
        raise WireError(ErrorCode.BAD_REQUEST, f"{name}: args must be a map", rid)
    try:
        return rid, op, op.check(args, limits)
    except WireError as exc:
        exc.rid = rid
        raise


# -- argument checks ------------------------------------------------------------------


def _fields(args: dict[str, Any], allowed: frozenset[str], op: str) -> None:
    if not allowed.issuperset(args):
        extra = [shown(name) for name in args if name not in allowed][:5]
        raise WireError(ErrorCode.BAD_REQUEST, f"{op}: unknown field(s) {', '.join(sorted(extra))}")


def _sized(value: Any, limit: int, code: ErrorCode, what: str) -> bytes:
    """Bytes (text is taken as UTF-8) of at most ``limit`` bytes."""
    if type(value) is str:
        value = value.encode()
    elif type(value) is not bytes:
        raise WireError(ErrorCode.BAD_REQUEST, f"{what} must be bytes or text")
    if len(value) > limit:
        raise WireError(code, f"{what} of {len(value)} bytes exceeds the limit of {limit}")
    return value  # type: ignore[no-any-return]  # bytes by now


def _key(value: Any, limits: Limits) -> bytes:
    key = _sized(value, limits.max_key_bytes, ErrorCode.KEY_TOO_LARGE, "key")
    if not key:
        raise WireError(ErrorCode.BAD_REQUEST, "key must not be empty")
    return key


def _value(value: Any, limits: Limits) -> bytes:
    return _sized(value, limits.max_value_bytes, ErrorCode.VALUE_TOO_LARGE, "value")


def _ns(args: dict[str, Any]) -> str:
    ns = args.get("ns", "")
    if type(ns) is not str or len(ns.encode()) > MAX_NAMESPACE_BYTES:
        raise WireError(ErrorCode.BAD_REQUEST, f"ns must be text of at most {MAX_NAMESPACE_BYTES} bytes")
    return ns


def _ttl(args: dict[str, Any]) -> int:
    ttl = args.get("ttl_ms", 0)
    if ttl is None:
        return 0
    if type(ttl) is not int or not 0 <= ttl <= MAX_TTL_MS:
        raise WireError(ErrorCode.BAD_REQUEST, f"ttl_ms must be an integer from 0 (none) to {MAX_TTL_MS}")
    return ttl


def _batch(items: Any, limits: Limits, what: str) -> list[Any]:
    if type(items) is not list:
        raise WireError(ErrorCode.BAD_REQUEST, f"{what} must be an array")
    if len(items) > limits.max_batch:
        raise WireError(
            ErrorCode.BATCH_TOO_LARGE,
            f"{len(items)} {what} exceeds the limit of {limits.max_batch}",
        )
    return items


def _no_args(op: str) -> Callable[[dict[str, Any], Limits], dict[str, Any]]:
    def check(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
        _fields(args, frozenset(), op)
        return {}

    return check


_HELLO = frozenset({"version", "client", "peer", "token"})
_KEYED = frozenset({"ns", "key"})
_SET = frozenset({"ns", "key", "value", "ttl_ms"})
_CAS = frozenset({"ns", "key", "value", "ttl_ms", "version"})
_INCR = frozenset({"ns", "key", "by"})
_EXPIRE = frozenset({"ns", "key", "ttl_ms"})
_MULTI = frozenset({"ns", "keys"})
_MSET = frozenset({"ns", "items", "ttl_ms"})


def _hello(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    _fields(args, _HELLO, "hello")
    version = args.get("version")
    if type(version) is not int:
        raise WireError(ErrorCode.BAD_REQUEST, "hello: version must be an integer")
    client = args.get("client", "")
    if type(client) is not str or len(client) > 256:
        raise WireError(ErrorCode.BAD_REQUEST, "hello: client must be short text")
    peer = args.get("peer", "")
    if type(peer) is not str or len(peer) > 256:
        raise WireError(ErrorCode.BAD_REQUEST, "hello: peer must be a node id")
    token = args.get("token")
    if token is not None and (type(token) is not str or len(token) > MAX_TOKEN_BYTES):
        raise WireError(ErrorCode.BAD_REQUEST, f"hello: token must be text of at most {MAX_TOKEN_BYTES} bytes")
    return {"version": version, "client": client, "peer": peer, "token": token}


# A namespace of at most this many characters is within MAX_NAMESPACE_BYTES
# whatever they are (UTF-8 takes at most four bytes for one).
_NS_CHARS_SURELY_SHORT = MAX_NAMESPACE_BYTES // 4


def _keyed(op: str) -> Callable[[dict[str, Any], Limits], dict[str, Any]]:
    def check(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
        # The usual request first, in one test: every request takes this path.
        key = args.get("key")
        ns = args.get("ns", "")
        if (
            type(key) is bytes
            and 0 < len(key) <= limits.max_key_bytes
            and type(ns) is str
            and len(ns) <= _NS_CHARS_SURELY_SHORT
            and len(args) == 1 + ("ns" in args)
        ):
            return {"ns": ns, "key": key}
        _fields(args, _KEYED, op)
        if "key" not in args:
            raise WireError(ErrorCode.BAD_REQUEST, f"{op}: key is required")
        return {"ns": _ns(args), "key": _key(args["key"], limits)}

    return check


def _set_like(op: str) -> Callable[[dict[str, Any], Limits], dict[str, Any]]:
    """The check of set and its conditional forms (add, replace, cas)."""
    allowed = _CAS if op == "cas" else _SET

    def check(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
        _fields(args, allowed, op)
        if "key" not in args or "value" not in args:
            raise WireError(ErrorCode.BAD_REQUEST, f"{op}: key and value are required")
        checked = {
            "ns": _ns(args),
            "key": _key(args["key"], limits),
            "value": _value(args["value"], limits),
            "ttl_ms": _ttl(args),
        }
        if op == "cas":
            version = args.get("version")
            if type(version) is not int or not 0 <= version <= MAX_RID:
                raise WireError(ErrorCode.BAD_REQUEST, "cas: version must be an entry's version (an integer from 0)")
            checked["version"] = version
        return checked

    return check


_set = _set_like("set")


def _incr(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    _fields(args, _INCR, "incr")
    if "key" not in args:
        raise WireError(ErrorCode.BAD_REQUEST, "incr: key is required")
    by = args.get("by", 1)
    if type(by) is not int or not MIN_INCR <= by <= MAX_INCR:
        raise WireError(ErrorCode.BAD_REQUEST, "incr: by must be a signed 64-bit integer")
    return {"ns": _ns(args), "key": _key(args["key"], limits), "by": by}


def _expire(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    _fields(args, _EXPIRE, "expire")
    if "key" not in args or "ttl_ms" not in args:
        raise WireError(ErrorCode.BAD_REQUEST, "expire: key and ttl_ms are required")
    ttl = args["ttl_ms"]
    if type(ttl) is not int or not 0 < ttl <= MAX_TTL_MS:
        raise WireError(ErrorCode.BAD_REQUEST, f"expire: ttl_ms must be an integer from 1 to {MAX_TTL_MS}")
    return {"ns": _ns(args), "key": _key(args["key"], limits), "ttl_ms": ttl}


def _multi(op: str) -> Callable[[dict[str, Any], Limits], dict[str, Any]]:
    def check(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
        _fields(args, _MULTI, op)
        keys = _batch(args.get("keys"), limits, "keys")
        return {"ns": _ns(args), "keys": [_key(k, limits) for k in keys]}

    return check


def _mset(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    _fields(args, _MSET, "mset")
    items = _batch(args.get("items"), limits, "items")
    pairs = []
    for item in items:
        if type(item) is not list or len(item) != 2:
            raise WireError(ErrorCode.BAD_REQUEST, "mset: each item is [key, value]")
        pairs.append((_key(item[0], limits), _value(item[1], limits)))
    return {"ns": _ns(args), "items": pairs, "ttl_ms": _ttl(args)}


# -- what ops do to the owning node's store ---------------------------------------------


def _get(store: Any, a: dict[str, Any]) -> Any:
    return store.get(a["ns"], a["key"])


def _set_in(store: Any, a: dict[str, Any]) -> Any:
    return store.set(a["ns"], a["key"], a["value"], a["ttl_ms"])


def _delete(store: Any, a: dict[str, Any]) -> Any:
    return store.delete(a["ns"], a["key"])


def _getmeta(store: Any, a: dict[str, Any]) -> Any:
    entry = store.meta(a["ns"], a["key"])
    return None if entry is None else list(entry)


def _add(store: Any, a: dict[str, Any]) -> Any:
    return store.add(a["ns"], a["key"], a["value"], a["ttl_ms"])


def _replace(store: Any, a: dict[str, Any]) -> Any:
    return store.replace(a["ns"], a["key"], a["value"], a["ttl_ms"])


def _cas(store: Any, a: dict[str, Any]) -> Any:
    return list(store.cas(a["ns"], a["key"], a["value"], a["version"], a["ttl_ms"]))


def _incr_in(store: Any, a: dict[str, Any]) -> Any:
    return store.incr(a["ns"], a["key"], a["by"])


def _getdel(store: Any, a: dict[str, Any]) -> Any:
    return store.getdel(a["ns"], a["key"])


def _expire_in(store: Any, a: dict[str, Any]) -> Any:
    return store.expire(a["ns"], a["key"], a["ttl_ms"])


def _persist(store: Any, a: dict[str, Any]) -> Any:
    return store.expire(a["ns"], a["key"], 0)


def _ttl_of(store: Any, a: dict[str, Any]) -> Any:
    return store.ttl_ms(a["ns"], a["key"])


def _mget(store: Any, a: dict[str, Any]) -> Any:
    ns = a["ns"]
    return [store.get(ns, key) for key in a["keys"]]


def _mset_in(store: Any, a: dict[str, Any]) -> Any:
    return store.set_many(a["ns"], a["items"], a["ttl_ms"])  # (all or none: a refusal changes nothing)


def _mdelete(store: Any, a: dict[str, Any]) -> Any:
    ns = a["ns"]
    return sum(store.delete(ns, key) for key in a["keys"])


def _entries(op: str, *, gone: bool) -> Callable[[dict[str, Any], Limits], dict[str, Any]]:
    """The check of a message that carries entries between nodes: ``entries``
    as [ns, key, value, ttl_ms, version] lists (value null: the key is gone,
    where ``gone``), ``begin`` the shards whose entries start with this
    message, ``done`` those whose entries are all sent with it or before it,
    the ``epoch`` of the sender's view, and for a handoff, optionally,
    ``kept``: shards whose copy at the receiver the sender kept current,
    which come with no entries."""
    shape = f"{op}: each entry is [ns, key, value{' or null' if gone else ''}, ttl_ms, version]"
    fields = {"entries", "begin", "done", "epoch"}

    def check(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
        entries, begin, done, epoch = args.get("entries"), args.get("begin"), args.get("done"), args.get("epoch")
        kept = args.get("kept", []) if not gone else []  # (handoff: shards whose copy at the receiver is current)
        if (
            args.keys() - {"kept"} != fields
            or (gone and "kept" in args)
            or type(kept) is not list
            or type(entries) is not list
            or type(begin) is not list
            or type(done) is not list
            or type(epoch) is not int
            or epoch < 0
        ):
            raise WireError(ErrorCode.BAD_REQUEST, f"{op}: args are {{entries, begin, done, epoch}}")
        for item in entries:
            if not (
                type(item) is list
                and len(item) == 5
                and type(item[0]) is str
                and type(item[1]) is bytes
                and item[1]
                and (type(item[2]) is bytes or (gone and item[2] is None))
                and type(item[3]) is int
                and 0 <= item[3] <= MAX_TTL_MS
                and type(item[4]) is int
                and item[4] >= 0
            ):
                raise WireError(ErrorCode.BAD_REQUEST, shape)
        for shard in (*begin, *done, *kept):
            if type(shard) is not int or not 0 <= shard < NUM_SHARDS:
                raise WireError(ErrorCode.BAD_REQUEST, f"{op}: begin, done and kept hold shard numbers")
        checked = {"entries": entries, "begin": begin, "done": done, "epoch": epoch}
        if kept:
            checked["kept"] = kept
        return checked

    return check


MAX_SCAN_LIMIT = 1000  # keys in one page of a scan
DEFAULT_SCAN_LIMIT = 100
_SCAN = frozenset({"ns", "prefix", "cursor", "limit"})
_SCAN_SHARDS = frozenset({"ns", "prefix", "shards", "after", "limit"})


def _scan_common(args: dict[str, Any], limits: Limits, op: str) -> dict[str, Any]:
    prefix = args.get("prefix", b"")
    if type(prefix) is str:
        prefix = prefix.encode()
    if type(prefix) is not bytes or len(prefix) > limits.max_key_bytes:
        raise WireError(ErrorCode.BAD_REQUEST, f"{op}: prefix must be bytes or text no longer than a key")
    limit = args.get("limit", DEFAULT_SCAN_LIMIT)
    if type(limit) is not int or not 1 <= limit <= MAX_SCAN_LIMIT:
        raise WireError(ErrorCode.BAD_REQUEST, f"{op}: limit must be an integer from 1 to {MAX_SCAN_LIMIT}")
    return {"ns": _ns(args), "prefix": prefix, "limit": limit}


def _after(value: Any, limits: Limits, op: str) -> bytes | None:
    if value is None:
        return None
    if type(value) is not bytes or len(value) > limits.max_key_bytes:
        raise WireError(ErrorCode.BAD_REQUEST, f"{op}: a cursor's key must be bytes no longer than a key")
    return value


def _scan(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """A page of a walk over every key of a namespace (see :meth:`Router._scan`):
    ``cursor`` is null to start, else the ``cursor`` of the page before."""
    _fields(args, _SCAN, "scan")
    checked = _scan_common(args, limits, "scan")
    cursor = args.get("cursor")
    if cursor is None:
        checked["cursor"] = (0, None)
    elif type(cursor) is list and len(cursor) == 2 and type(cursor[0]) is int and 0 <= cursor[0] < NUM_SHARDS:
        checked["cursor"] = (cursor[0], _after(cursor[1], limits, "scan"))
    else:
        raise WireError(ErrorCode.BAD_REQUEST, "scan: cursor must be null or the cursor a page of the scan gave")
    return checked


def _scan_shards(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """One owner's share of a page of a scan (from the node serving it)."""
    _fields(args, _SCAN_SHARDS, "scanshards")
    checked = _scan_common(args, limits, "scanshards")
    shards = args.get("shards")
    if type(shards) is not list or len(shards) > NUM_SHARDS or not all(type(s) is int and 0 <= s < NUM_SHARDS for s in shards):
        raise WireError(ErrorCode.BAD_REQUEST, "scanshards: shards must be shard numbers")
    checked["shards"] = shards
    checked["after"] = _after(args.get("after"), limits, "scanshards")
    return checked


def _namespace_op(op: str) -> Callable[[dict[str, Any], Limits], dict[str, Any]]:
    """``flush`` and ``nsstats``: run on every node of the cluster by the node
    a client asks (``here``: on this node only, as that node asks the
    others). ``flush`` takes ``ns``, or ``all`` for every namespace."""
    allowed = frozenset({"ns", "here"} | ({"all"} if op == "flush" else set()))

    def check(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
        _fields(args, allowed, op)
        every, here = args.get("all", False), args.get("here", False)
        if type(every) is not bool or type(here) is not bool:
            raise WireError(ErrorCode.BAD_REQUEST, f"{op}: all and here are true or false")
        if every == ("ns" in args):
            what = "ns, or all: true" if op == "flush" else "ns"
            raise WireError(ErrorCode.BAD_REQUEST, f"{op}: give {what}")
        return {"ns": None if every else _ns(args), "here": here}

    return check


MAX_WATCH_WAIT_MS = 2000  # well within a peer link's request timeout
DEFAULT_WATCH_WAIT_MS = 100
_EVENTS = frozenset({"ns", "prefix", "incarnation", "after", "wait_ms", "limit"})
_WATCH = frozenset({"ns", "prefix", "cursor", "wait_ms", "limit"})


def _wait_ms(args: dict[str, Any], op: str) -> int:
    wait = args.get("wait_ms", DEFAULT_WATCH_WAIT_MS)
    if type(wait) is not int or not 0 <= wait <= MAX_WATCH_WAIT_MS:
        raise WireError(ErrorCode.BAD_REQUEST, f"{op}: wait_ms must be an integer from 0 to {MAX_WATCH_WAIT_MS}")
    return wait


def _position(incarnation: Any, after: Any, op: str) -> tuple[int | None, int]:
    if not ((incarnation is None or (type(incarnation) is int and incarnation > 0)) and type(after) is int and after >= 0):
        raise WireError(ErrorCode.BAD_REQUEST, f"{op}: a position is an incarnation (or null) and a sequence number")
    return incarnation, after


def _events(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """A read of a node's event log (see :mod:`dcache.events`), from the node serving a ``watch``."""
    _fields(args, _EVENTS, "events")
    checked = _scan_common(args, limits, "events")
    checked["incarnation"], checked["after"] = _position(args.get("incarnation"), args.get("after", 0), "events")
    checked["wait_ms"] = _wait_ms(args, "events")
    return checked


def _watch(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The changes to keys of ``ns`` that start with ``prefix`` on every node
    since ``cursor`` (null: from now), waiting up to ``wait_ms`` for some."""
    _fields(args, _WATCH, "watch")
    checked = _scan_common(args, limits, "watch")
    checked["wait_ms"] = _wait_ms(args, "watch")
    cursor = args.get("cursor") or {}
    if type(cursor) is not dict or len(cursor) > 10_000:
        raise WireError(ErrorCode.BAD_REQUEST, "watch: cursor must be null or the cursor the last watch reply gave")
    positions = {}
    for node, position in cursor.items():
        if type(node) is not str or type(position) is not list or len(position) != 2:
            raise WireError(ErrorCode.BAD_REQUEST, "watch: cursor must be null or the cursor the last watch reply gave")
        positions[node] = _position(position[0], position[1], "watch")
    checked["cursor"] = positions
    return checked


def _claim(args: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """A node asking about shards it waits for (see :mod:`dcache.handoff`)."""
    shards = args.get("shards")
    if args.keys() != {"shards"} or type(shards) is not list or not all(type(s) is int and 0 <= s < NUM_SHARDS for s in shards):
        raise WireError(ErrorCode.BAD_REQUEST, "claim: args are {shards: [shard number, ...]}")
    return {"shards": shards}


def _ping(store: Any, a: dict[str, Any]) -> Any:
    return None


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("hello", _hello),
        Op("ping", _no_args("ping"), apply=_ping),
        Op("stats", _no_args("stats")),
        Op("members", _no_args("members")),
        Op("drain", _no_args("drain")),
        Op("handoff", _entries("handoff", gone=False), peer_only=True),
        Op("claim", _claim, peer_only=True),
        Op("replicate", _entries("replicate", gone=True), peer_only=True),
        Op("copies", _no_args("copies"), peer_only=True),
        Op("scan", _scan),
        Op("flush", _namespace_op("flush"), write=True),
        Op("nsstats", _namespace_op("nsstats")),
        Op("watch", _watch),
        Op("events", _events, peer_only=True),
        Op("scanshards", _scan_shards, peer_only=True),
        Op("get", _keyed("get"), Keys.ONE, apply=_get),
        Op("getmeta", _keyed("getmeta"), Keys.ONE, apply=_getmeta),
        Op("set", _set, Keys.ONE, write=True, apply=_set_in),
        Op("add", _set_like("add"), Keys.ONE, write=True, apply=_add),
        Op("replace", _set_like("replace"), Keys.ONE, write=True, apply=_replace),
        Op("cas", _set_like("cas"), Keys.ONE, write=True, apply=_cas),
        Op("incr", _incr, Keys.ONE, write=True, apply=_incr_in),
        Op("getdel", _keyed("getdel"), Keys.ONE, write=True, apply=_getdel),
        Op("expire", _expire, Keys.ONE, write=True, apply=_expire_in),
        Op("persist", _keyed("persist"), Keys.ONE, write=True, apply=_persist),
        Op("delete", _keyed("delete"), Keys.ONE, write=True, apply=_delete),
        Op("ttl", _keyed("ttl"), Keys.ONE, apply=_ttl_of),
        Op("mget", _multi("mget"), Keys.MANY, apply=_mget, field="keys"),
        Op("mset", _mset, Keys.MANY, write=True, apply=_mset_in, field="items", pairs=True),
        Op("mdelete", _multi("mdelete"), Keys.MANY, write=True, apply=_mdelete, field="keys", merge="sum"),
    )
}
KEYED = frozenset(name for name, op in OPS.items() if op.keys is Keys.ONE)  # what a lone request may be relayed as
