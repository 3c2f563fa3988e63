"""Turns received frames into replies: validate, run locally or forward, merge.

A connection handler hands the router every frame it received in one read;
the router answers them all in one reply frame. For each keyed request it
asks the shard map who owns the key: this node runs it against the store,
any other owner gets it over the peer link. A multi-key request is split by
owner and its parts merged back in order. A keyed request that comes alone
in its frame, the usual case, takes a short way: a forwarding node passes
it on as it came and the owner's reply back as it came, rewriting only the
rids, so a value it only carries is never decoded or encoded on the way.

Requests that arrive over a peer link (their hello named a ``peer``) are
never forwarded again: if this node does not own the key by its own view it
answers ``moved`` with its epoch, and the sender retries with a fresher map,
a bounded number of times.

A node answers keyed requests only while it can vouch for its view of the
cluster (``vouched_until``, see :mod:`dcache.membership`): past that, others
may own its shards and have written its keys since, so every keyed request
gets ``unavailable`` until it has rejoined. The check costs one comparison
per received batch, against the clock read there for the latency histogram.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from . import codec
from .codec import ErrorCode, Limits, Status, WireError
from .errors import PeerUnavailable
from .ops import KEYED, OPS, Keys, Request, parse_request
from .shard import ShardMap
from .store import Store

log = logging.getLogger(__name__)

# Retries of a request bounced with "moved" while views disagree; the waits
# between them add up to under a second.
MOVED_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4)
MEMBER_STATS_TIMEOUT = 2.0
# Request latency histogram bucket bounds, in seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UNVOUCHED_MESSAGE = "this node lost contact with etcd for longer than its lease and is rejoining the cluster; try again"


class Forwarder(Protocol):
    """Carries requests to another node; raises PeerUnavailable when it cannot."""

    async def forward(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]: ...

    async def relay(self, node_id: str, rest: bytes) -> bytes:
        """One request encoded but for its rid (see :func:`codec.split_single`); its reply likewise."""
        ...


@dataclass(slots=True)
class Session:
    """Per-connection protocol state."""

    remote: str = ""
    greeted: bool = False
    client: str = ""
    peer_id: str = ""


@dataclass(slots=True)
class Histogram:
    """Cumulative-free bucket counts; exported as a Prometheus histogram."""

    counts: list[int]
    total: float = 0.0
    count: int = 0

    @classmethod
    def empty(cls) -> Histogram:
        return cls([0] * (len(LATENCY_BUCKETS) + 1))

    def observe(self, seconds: float, n: int = 1) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += n
        self.total += seconds * n
        self.count += n


# -- local execution ----------------------------------------------------------


def _get(store: Store, a: dict[str, Any]) -> Any:
    return store.get(a["ns"], a["key"])


def _set(store: Store, a: dict[str, Any]) -> Any:
    return store.set(a["ns"], a["key"], a["value"], a["ttl_ms"])


def _delete(store: Store, a: dict[str, Any]) -> Any:
    return store.delete(a["ns"], a["key"])


def _ttl(store: Store, a: dict[str, Any]) -> Any:
    return store.ttl_ms(a["ns"], a["key"])


def _mget(store: Store, a: dict[str, Any]) -> Any:
    ns = a["ns"]
    return [store.get(ns, key) for key in a["keys"]]


def _mset(store: Store, a: dict[str, Any]) -> Any:
    ns, ttl = a["ns"], a["ttl_ms"]
    return [store.set(ns, key, value, ttl) for key, value in a["items"]]


def _mdelete(store: Store, a: dict[str, Any]) -> Any:
    ns = a["ns"]
    return sum(store.delete(ns, key) for key in a["keys"])


def _ping(store: Store, a: dict[str, Any]) -> Any:
    return None


_LOCAL_OPS: dict[str, Callable[[Store, dict[str, Any]], Any]] = {
    "get": _get,
    "set": _set,
    "delete": _delete,
    "ttl": _ttl,
    "mget": _mget,
    "mset": _mset,
    "mdelete": _mdelete,
    "ping": _ping,
}


# -- work that may travel -----------------------------------------------------


class _Reply:
    """The reply slot of one client request, filled once."""

    __slots__ = ("replies", "index", "rid")

    def __init__(self, replies: list[Any], index: int, rid: int) -> None:
        self.replies = replies
        self.index = index
        self.rid = rid

    def deliver(self, status: int, body: Any) -> None:
        self.replies[self.index] = [self.rid, status, body]


class _Merge:
    """Collects the per-owner parts of one multi-key request into one reply."""

    __slots__ = ("slot", "op", "results", "remaining", "failed")

    def __init__(self, slot: _Reply, op: str, size: int) -> None:
        self.slot = slot
        self.op = op
        self.results: list[Any] = [None] * size
        self.remaining = size
        self.failed = False

    def deliver_part(self, indexes: list[int], status: int, body: Any) -> None:
        if self.failed:
            return
        if status != Status.OK:
            self.failed = True
            self.slot.deliver(status, body)
            return
        if self.op == "mdelete":
            self.results[indexes[0]] = body  # a count; summed at the end
            for i in indexes[1:]:
                self.results[i] = 0
        else:
            for i, value in zip(indexes, body):
                self.results[i] = value
        self.remaining -= len(indexes)
        if self.remaining == 0:
            result = sum(self.results) if self.op == "mdelete" else self.results
            self.slot.deliver(Status.OK, result)


@dataclass(slots=True)
class _Job:
    """A single-key request, or one owner's share of a multi-key request."""

    op: str
    args: dict[str, Any]
    slot: _Reply | None = None  # single-key: where the reply goes
    merge: _Merge | None = None  # multi-key part: where the part goes
    indexes: list[int] | None = None  # multi-key part: positions in the original request

    def deliver(self, status: int, body: Any) -> None:
        if self.merge is not None:
            assert self.indexes is not None
            self.merge.deliver_part(self.indexes, status, body)
        else:
            assert self.slot is not None
            self.slot.deliver(status, body)


def _elements(op: str, args: dict[str, Any]) -> list[Any]:
    return args[OPS[op].field]


def _element_key(op: str, element: Any) -> bytes:
    return element[0] if op == "mset" else element


def _part_args(op: str, args: dict[str, Any], elements: list[Any]) -> dict[str, Any]:
    part = dict(args)
    part[OPS[op].field] = elements
    return part


def _wire_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validated args back in wire form (mset items as [key, value] pairs)."""
    if op == "mset":
        return {**args, "items": [list(item) for item in args["items"]]}
    return args


class Router:
    """Serves requests against ``store`` for the shards this node owns and
    forwards the rest through ``peers``.

    ``node_info`` returns node-level fields merged into ``stats`` replies;
    ``client_addresses`` maps member ids to their client addresses.
    ``vouched_until`` is the time on ``clock`` from which this node no longer
    answers keyed requests (``math.inf``: always answers); its owner moves it.
    """

    def __init__(
        self,
        *,
        store: Store,
        node_id: str,
        limits: Limits,
        shard_map: ShardMap,
        node_info: Callable[[], dict[str, Any]],
        server_name: str,
        peers: Forwarder | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.limits = limits
        self.shard_map = shard_map
        self.peers = peers
        self.client_addresses: dict[str, str] = {}
        self._node_info = node_info
        self._server_name = server_name
        self.op_counts: dict[tuple[str, str], int] = {}
        self.forwarded = 0
        self.moved_retries = 0
        self.latency = Histogram.empty()
        self.vouched_until = math.inf
        self._clock = clock

    # -- entry point -----------------------------------------------------------

    async def handle(self, session: Session, payloads: list[bytes]) -> bytes:
        """Answer every request in ``payloads``; return one encoded reply frame."""
        started = self._clock()
        vouched = started < self.vouched_until
        replies: list[Any] = []
        remote: list[_Job] = []
        members_slots: list[_Reply] = []
        for payload in payloads:
            try:
                messages = codec.decode_frame(payload, self.limits)
            except WireError as exc:
                replies.append(codec.error_from(exc))
                continue
            if len(messages) == 1 and len(payloads) == 1 and session.greeted and vouched:
                message = messages[0]
                op = message[1] if type(message) is list and len(message) == 3 else None
                if type(op) is str and op in KEYED:
                    frame = await self._keyed_alone(session, payload, message)
                    self.latency.observe(self._clock() - started)
                    return frame
            for message in messages:
                if vouched or not self._refused_unvouched(session, message, replies):
                    self._place(session, message, replies, remote, members_slots)
        if remote:
            await self._run_remote(remote)
        for slot in members_slots:
            slot.deliver(Status.OK, await self.members())
        self.latency.observe(self._clock() - started, len(replies))
        return codec.encode_frame(replies)

    def _refused_unvouched(self, session: Session, message: Any, replies: list[Any]) -> bool:
        """Answer ``message`` ``unavailable`` if it is a keyed request, as this
        node cannot vouch for its view; False for anything else (a malformed
        request, a hello, ping, stats, members), which is answered as usual."""
        if not session.greeted:
            return False
        try:
            req = parse_request(message, self.limits)
        except WireError:
            return False
        if OPS[req.op].keys is Keys.NONE:
            return False
        self._count(req.op, "unavailable")
        replies.append(codec.error(req.rid, ErrorCode.UNAVAILABLE, UNVOUCHED_MESSAGE))
        return True

    def _place(self, session: Session, message: Any, replies: list[Any], remote: list[_Job], members_slots: list[_Reply]) -> None:
        """Answer ``message`` now if it can be, else queue its jobs in ``remote``."""
        try:
            req = parse_request(message, self.limits)
        except WireError as exc:
            replies.append(self._invalid(exc))
            return
        if not session.greeted or req.op == "hello":
            replies.append(self._hello(session, req))
            return
        op = req.op
        if op in KEYED:
            reply = self._answer_here(session, req, self.shard_map.owner(req.args["ns"], req.args["key"]))
            if reply is not None:
                replies.append(reply)
            else:
                slot = _Reply(replies, len(replies), req.rid)
                replies.append(None)
                remote.append(_Job(op, req.args, slot=slot))
        elif OPS[op].keys is Keys.MANY:
            self._place_multi(session, req, replies, remote)
        elif op == "members":
            members_slots.append(_Reply(replies, len(replies), req.rid))
            replies.append(None)
        else:
            replies.append(self._local(req))

    def _place_multi(self, session: Session, req: Request, replies: list[Any], remote: list[_Job]) -> None:
        op, args = req.op, req.args
        elements = _elements(op, args)
        by_owner = self.shard_map.group_by_owner(args["ns"], (_element_key(op, e) for e in elements))
        if not by_owner or by_owner.keys() == {self.node_id}:
            replies.append(self._local(req))
            return
        if session.peer_id:
            other = next(o for o in by_owner if o != self.node_id)
            replies.append(self._moved(req.rid, other))
            return
        slot = _Reply(replies, len(replies), req.rid)
        replies.append(None)
        merge = _Merge(slot, op, len(elements))
        for owner, indexes in by_owner.items():
            part = _Job(op, _part_args(op, args, [elements[i] for i in indexes]), merge=merge, indexes=indexes)
            if owner == self.node_id:
                status, body = self._execute(op, part.args)
                part.deliver(status, body)
            else:
                remote.append(part)

    # -- local -------------------------------------------------------------------

    def _answer_here(self, session: Session, req: Request, owner: str) -> list[Any] | None:
        """The reply to a keyed request if this node gives it: it owns the
        key, or the request came over a peer link (never forwarded twice)."""
        if owner == self.node_id:
            return self._local(req)
        if session.peer_id:
            return self._moved(req.rid, owner)
        return None

    def _local(self, req: Request) -> list[Any]:
        if req.op == "stats":
            self._count("stats", "ok")
            return codec.ok(req.rid, self.stats())
        status, body = self._execute(req.op, req.args)
        return [req.rid, status, body]

    def _execute(self, op: str, args: dict[str, Any]) -> tuple[int, Any]:
        try:
            body = _LOCAL_OPS[op](self.store, args)
        except Exception:
            log.exception("internal error serving %s", op)
            self._count(op, "error")
            return Status.ERROR, [ErrorCode.INTERNAL.value, "internal error; see the node's log"]
        self._count(op, "ok")
        return Status.OK, body

    def _moved(self, rid: int, owner: str) -> list[Any]:
        self._count("moved", "error")
        return codec.error(
            rid,
            ErrorCode.MOVED,
            f"{self.node_id} does not own this key at epoch {self.shard_map.epoch}; {owner} does",
            {"epoch": self.shard_map.epoch, "owner": owner},
        )

    def _hello(self, session: Session, req: Request) -> list[Any]:
        if req.op != "hello":
            self._count(req.op, "error")
            return codec.error(req.rid, ErrorCode.HELLO_REQUIRED, "the first request on a connection must be hello")
        version = req.args["version"]
        if version != codec.PROTOCOL_VERSION:
            self._count("hello", "error")
            return codec.error(
                req.rid,
                ErrorCode.UNSUPPORTED_VERSION,
                f"this node speaks protocol version {codec.PROTOCOL_VERSION}, not {version}",
            )
        session.greeted = True
        session.client = req.args["client"]
        session.peer_id = req.args["peer"]
        self._count("hello", "ok")
        return codec.ok(
            req.rid,
            {
                "version": codec.PROTOCOL_VERSION,
                "server": self._server_name,
                "node": self.node_id,
                "epoch": self.shard_map.epoch,
                "limits": self.limits.as_dict(),
            },
        )

    # -- remote ------------------------------------------------------------------

    async def _keyed_alone(self, session: Session, payload: bytes, message: list[Any]) -> bytes:
        """A keyed request that came alone in its frame (the usual case), the
        short way: served here if this node owns the key, else forwarded as
        it came, with the owner's reply frame returned as it came but for the
        rids (see :func:`codec.split_single`)."""
        try:
            req = parse_request(message, self.limits)
        except WireError as exc:
            return codec.encode_frame([self._invalid(exc)])
        owner = self.shard_map.owner(req.args["ns"], req.args["key"])
        reply = self._answer_here(session, req, owner)
        if reply is not None:
            return codec.encode_frame([reply])
        split = codec.split_single(payload)
        if split is None or self.peers is None:
            return await self._forward_alone(req)
        rid, at = split
        self.forwarded += 1
        try:
            rest = await self.peers.relay(owner, payload[at:])
        except PeerUnavailable as exc:
            if owner not in self.shard_map.members:  # it left meanwhile: place it again
                return await self._forward_alone(req, bounced=True)
            return codec.encode_frame([[rid, Status.ERROR, self._unavailable(req.op, exc)]])
        if rest[0] == Status.ERROR:
            _, body = codec.decode_rest(rest)
            if body[0] == ErrorCode.MOVED:  # the owner's view is newer: retry as any forward would
                return await self._forward_alone(req, bounced=True)
        return codec.single_frame(rid, rest)

    async def _forward_alone(self, req: Request, *, bounced: bool = False) -> bytes:
        replies: list[Any] = [None]
        job = _Job(req.op, req.args, slot=_Reply(replies, 0, req.rid))
        if bounced:
            await self._retry([job])
        else:
            await self._run_remote([job])
        return codec.encode_frame(replies)

    async def _run_remote(self, jobs: list[_Job]) -> None:
        """Forward jobs to their owners; re-route those bounced as moved."""
        await self._retry(await self._attempt(jobs))

    async def _retry(self, bounced: list[_Job]) -> None:
        for delay in MOVED_RETRY_DELAYS:
            if not bounced:
                return
            self.moved_retries += len(bounced)
            await trio.sleep(delay)
            bounced = await self._attempt(bounced)
        for job in bounced:
            self._count(job.op, "unavailable")
            job.deliver(Status.ERROR, [ErrorCode.UNAVAILABLE.value, "the cluster's membership is changing; try again"])

    async def _attempt(self, jobs: list[_Job]) -> list[_Job]:
        """Send each job to its owner as the map says now; return those bounced as moved."""
        bounced: list[_Job] = []
        if len(jobs) == 1 and jobs[0].merge is None:  # the common case needs no regrouping
            owner = self._owner(jobs[0])
            if owner == self.node_id:
                self._execute_job(jobs[0])
            else:
                await self._forward(owner, jobs, bounced)
            return bounced
        by_owner: dict[str, list[_Job]] = {}
        for job in self._reroute(jobs):
            owner = self._owner(job)
            if owner == self.node_id:
                self._execute_job(job)
            else:
                by_owner.setdefault(owner, []).append(job)
        if len(by_owner) == 1:
            [(owner, owned)] = by_owner.items()
            await self._forward(owner, owned, bounced)
        elif by_owner:
            async with trio.open_nursery() as nursery:
                for owner, owned in by_owner.items():
                    nursery.start_soon(self._forward, owner, owned, bounced)
        return bounced

    def _execute_job(self, job: _Job) -> None:
        """Run a job placed here on a second look (its owner changed, or it
        was bounced): time has passed since the batch's check, so check again."""
        if self._clock() >= self.vouched_until:
            self._count(job.op, "unavailable")
            job.deliver(Status.ERROR, [ErrorCode.UNAVAILABLE.value, UNVOUCHED_MESSAGE])
        else:
            job.deliver(*self._execute(job.op, job.args))

    def _owner(self, job: _Job) -> str:
        if job.merge is None:
            return self.shard_map.owner(job.args["ns"], job.args["key"])
        key = _element_key(job.op, _elements(job.op, job.args)[0])
        return self.shard_map.owner(job.args["ns"], key)

    def _reroute(self, jobs: list[_Job]) -> list[_Job]:
        """Split multi-key parts whose keys no longer share one owner."""
        out = []
        for job in jobs:
            if job.merge is None:
                out.append(job)
                continue
            assert job.indexes is not None
            elements = _elements(job.op, job.args)
            groups = self.shard_map.group_by_owner(job.args["ns"], (_element_key(job.op, e) for e in elements))
            for positions in groups.values():
                parts = [elements[i] for i in positions]
                indexes = [job.indexes[i] for i in positions]
                out.append(_Job(job.op, _part_args(job.op, job.args, parts), merge=job.merge, indexes=indexes))
        return out

    async def _forward(self, owner: str, jobs: list[_Job], bounced: list[_Job]) -> None:
        assert self.peers is not None
        self.forwarded += len(jobs)
        try:
            results = await self.peers.forward(owner, [(job.op, _wire_args(job.op, job.args)) for job in jobs])
        except PeerUnavailable as exc:
            if owner not in self.shard_map.members:  # it left meanwhile: place them again
                bounced.extend(jobs)
                return
            for job in jobs:
                job.deliver(Status.ERROR, self._unavailable(job.op, exc))
            return
        for job, (status, body) in zip(jobs, results):
            if status == Status.ERROR and body[0] == ErrorCode.MOVED:
                bounced.append(job)
            else:
                job.deliver(status, body)

    def _invalid(self, exc: WireError) -> list[Any]:
        self._count("invalid", "error")
        return codec.error_from(exc)

    def _unavailable(self, op: str, exc: PeerUnavailable) -> list[str]:
        """Count an ``op`` whose owner is unreachable; the error body for it."""
        self._count(op, "unavailable")
        return [ErrorCode.UNAVAILABLE.value, f"the owner of this key is unreachable: {exc}"]

    # -- cluster-wide views -------------------------------------------------------

    async def members(self) -> dict[str, Any]:
        """Every member with its state and counters, asked concurrently."""
        shard_map = self.shard_map
        rows: dict[str, dict[str, Any]] = {}

        async def ask(node_id: str) -> None:
            row = {
                "node": node_id,
                "client": self.client_addresses.get(node_id, ""),
                "shards": shard_map.shards_owned(node_id),
                "state": "up",
                "stats": {},
            }
            rows[node_id] = row
            if node_id == self.node_id:
                row["stats"] = self.stats()
                return
            if self.peers is None:
                row["state"] = "unreachable"
                return
            with trio.move_on_after(MEMBER_STATS_TIMEOUT):
                try:
                    [(status, body)] = await self.peers.forward(node_id, [("stats", {})])
                except Exception as exc:  # PeerUnavailable and anything odd from a peer
                    row["state"] = "unreachable"
                    row["error"] = str(exc)
                    return
                if status == Status.OK and isinstance(body, dict):
                    row["stats"] = body
                    return
            row["state"] = "unreachable"

        async with trio.open_nursery() as nursery:
            for node_id in shard_map.members:
                nursery.start_soon(ask, node_id)
        self._count("members", "ok")
        return {"epoch": shard_map.epoch, "members": [rows[m] for m in shard_map.members]}

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.store.stats()
        stats.update(self._node_info())
        stats["node"] = self.node_id
        stats["shards"] = self.shard_map.shards_owned(self.node_id)
        stats["members"] = len(self.shard_map.members)
        stats["epoch"] = self.shard_map.epoch
        stats["forwarded"] = self.forwarded
        return stats

    def _count(self, op: str, result: str) -> None:
        key = (op, result)
        self.op_counts[key] = self.op_counts.get(key, 0) + 1
