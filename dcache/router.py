"""From received frames to replies: placement now, and waiting apart.

A connection handler gives :meth:`Router.place` every frame it received in
one read. Placement is synchronous and keeps arrival order: each request is
checked against the op table and either answered at once (this node owns
its key, or it names no key) or handed at once to the peer link of the
node that owns it, and a link sends what it is handed in that order. The
replies placement could give go back in one frame at once; what waits for
other nodes comes back as a :class:`Waiting`, which the handler awaits
apart (:meth:`Waiting.finish` gives the rest of the replies, in another
frame). So requests for a slow or hung owner's keys never hold up the other
requests on the same connection, and the requests for one key still reach
its owner in the order they came.

A many-key request is split by owner and its parts merged back in order
(the op table says how). A keyed request that comes alone in its frame, the
usual case, takes a short way: a forwarding node passes it on as it came and
the owner's reply back as it came, rewriting only the rids, so a value it
only carries is never decoded or encoded on the way.

Requests that arrive over a peer link (their hello named a ``peer``) are
not forwarded again: if this node does not own the key by its own view it
answers ``moved`` with its epoch, and the sender retries with a fresher map,
a bounded number of times. The one exception is a shard this node is to
serve once its entries arrive (:attr:`Router.arriving`): it passes requests
for it to the node holding them, whoever sent them; that node answers them,
or ``moved`` once it has handed the shard over, and passes them on only if
the shard is arriving there too, which happens only while views disagree.
A node that cannot vouch for its view (its lease may have lapsed) answers
requests for keys ``unavailable`` instead.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from . import codec
from .codec import ErrorCode, Limits, Status, WireError
from .errors import PeerUnavailable
from .events import EventLog
from .ops import KEYED, OPS, Keys, Op, Request, check_request, parse_request
from .protocol import ServerSession
from .shard import NUM_SHARDS, ShardMap, shard_of
from .stats import RequestCounters
from .store import StoreError
from .watching import WatchesFull, WatchHub

if TYPE_CHECKING:
    from .replication import Replicated, Replicator

log = logging.getLogger(__name__)

# Retries of a request bounced with "moved" while views disagree, or while
# its shard is being handed over (then the entries are already on their way:
# the first retry comes soon); the waits add up to under a second.
MOVED_RETRY_DELAYS = (0.005, 0.025, 0.1, 0.25, 0.5)
SCAN_BLOCK = 64  # shards a page of a scan asks their owners about at once
SCAN_BUDGET = 0.01  # seconds: a page past it ends after its block, with fewer keys if need be
MAX_SCAN_BYTES = 1024 * 1024  # of keys in one page of a scan
UNVOUCHED_MESSAGE = "this node lost contact with etcd for longer than its lease and is rejoining the cluster; try again"
CHANGING_MESSAGE = "the cluster's membership is changing; try again"


class Pending(Protocol):
    """Requests handed to a peer link; their replies once awaited."""

    async def wait(self) -> Any: ...

    def release(self) -> None: ...

    def notify(self, callback: Callable[[bytes | None], None]) -> Any | None:
        """For one request handed over encoded: call ``callback`` with the rest
        of its reply when it comes (None: it failed, ``wait`` says how), and
        return what will read it (see :meth:`peers.Forward.notify`); None if
        it cannot be done without a task waiting."""
        ...


class Forwarder(Protocol):
    """Carries requests to other nodes (see :class:`dcache.peers.PeerLinks`);
    raises or returns PeerUnavailable when it cannot."""

    def submit(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> Pending:
        """Hand requests over now, in order; the Pending's wait gives their (status, body) replies."""
        ...

    def submit_raw(self, node_id: str, rest: bytes) -> Pending:
        """One request encoded but for its rid (see :func:`codec.split_single`); its reply likewise."""
        ...

    async def forward(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]: ...

    def crowded(self, node_ids: Iterable[str]) -> str | None:
        """One of ``node_ids`` whose link has all it may hold in flight, if any."""
        ...

    async def room(self, node_id: str) -> None:
        """Return once the link to ``node_id`` may take more."""
        ...


# -- work that waits for other nodes --------------------------------------------------


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
    """Collects the per-owner parts of one many-key request into one reply."""

    __slots__ = ("slot", "op", "parts", "remaining", "size", "failed")

    def __init__(self, slot: _Reply, op: Op, size: int) -> None:
        self.slot = slot
        self.op = op
        self.parts: list[tuple[list[int], Any]] = []
        self.size = size
        self.remaining = size
        self.failed = False

    def deliver_part(self, indexes: list[int], status: int, body: Any) -> None:
        if self.failed:
            return
        if status != Status.OK:
            self.failed = True
            self.slot.deliver(status, body)
            return
        self.parts.append((indexes, body))
        self.remaining -= len(indexes)
        if self.remaining == 0:
            self.slot.deliver(Status.OK, self.op.merged(self.size, self.parts))


class _Job:
    """A single-key request, or one owner's share of a many-key request."""

    __slots__ = ("op", "args", "slot", "merge", "indexes")

    def __init__(
        self,
        op: Op,
        args: dict[str, Any],
        slot: _Reply | None = None,
        merge: _Merge | None = None,
        indexes: list[int] | None = None,
    ) -> None:
        self.op = op
        self.args = args
        self.slot = slot  # single-key: where the reply goes
        self.merge = merge  # many-key part: where the part goes
        self.indexes = indexes  # many-key part: positions in the original request

    def deliver(self, status: int, body: Any) -> None:
        if self.merge is not None:
            assert self.indexes is not None
            self.merge.deliver_part(self.indexes, status, body)
        else:
            assert self.slot is not None
            self.slot.deliver(status, body)

    def owner(self, shard_map: ShardMap) -> str:
        if self.merge is None:
            return shard_map.owner(self.args["ns"], self.args["key"])
        return shard_map.owner(self.args["ns"], self.op.key_of(self.op.elements(self.args)[0]))


async def _deliver(slot: _Reply, gather: Callable[[], Awaitable[tuple[int, Any]]]) -> None:
    slot.deliver(*await gather())


class Waiting:
    """The part of a frame's replies that waits for other nodes: requests
    handed to their owners' links, a relayed lone request, ``members``.
    :meth:`finish` waits for them and returns their reply frame;
    :meth:`release` gives up on them (the connection went away)."""

    __slots__ = ("_router", "_replies", "_forwards", "_relay", "_members", "_drains", "_gathers", "_replicated", "_started")

    def __init__(self, router: Router, started: float) -> None:
        self._router = router
        self._replies: list[Any] = []
        self._forwards: list[tuple[str, list[_Job], Pending]] = []
        self._relay: tuple[int, Request, str, Pending] | None = None
        self._members: list[_Reply] = []
        self._drains: list[_Reply] = []
        self._gathers: list[tuple[_Reply, Callable[[], Awaitable[tuple[int, Any]]]]] = []  # scan, flush, nsstats
        self._replicated: list[tuple[Callable[[int, Any], None], str, int, Any, Replicated]] = []  # writes done here
        self._started = started

    def slot(self, rid: int) -> _Reply:
        slot = _Reply(self._replies, len(self._replies), rid)
        self._replies.append(None)
        return slot

    async def finish(self) -> bytes:
        router = self._router
        try:
            if self._relay is not None:
                frame = await self._finish_relay(*self._relay)
                router.counters.latency.observe(router._clock() - self._started)
                return frame
            bounced: list[_Job] = []
            if len(self._forwards) == 1:
                owner, jobs, pending = self._forwards[0]
                await router._collect(owner, jobs, pending.wait, bounced)
            elif self._forwards:
                async with trio.open_nursery() as nursery:
                    for owner, jobs, pending in self._forwards:
                        nursery.start_soon(router._collect, owner, jobs, pending.wait, bounced)
            await router._retry(bounced)
            for deliver, op, status, body, replicated in self._replicated:
                deliver(*await router._replicated(op, status, body, replicated))
            for slot in self._members:
                slot.deliver(Status.OK, await router._members())
                router.counters.count("members", "ok")
            if len(self._gathers) == 1:
                slot, gather = self._gathers[0]
                slot.deliver(*await gather())
            elif self._gathers:  # (at once: watches in one frame each wait up to their wait_ms)
                async with trio.open_nursery() as nursery:
                    for slot, gather in self._gathers:
                        nursery.start_soon(_deliver, slot, gather)
            for slot in self._drains:
                assert router._drain is not None
                status, body = await router._drain()
                slot.deliver(status, body)
                router.counters.count("drain", "ok" if status == Status.OK else "error")
        finally:
            self.release()
        router.counters.latency.observe(router._clock() - self._started, len(self._replies))
        return codec.encode_frame(self._replies)

    async def _finish_relay(self, rid: int, req: Request, owner: str, pending: Pending) -> bytes:
        router = self._router
        try:
            rest = await pending.wait()
        except PeerUnavailable as exc:
            if owner not in router.shard_map.members:  # it left meanwhile: place it again
                return await router._forward_alone(req, bounced=True)
            return codec.encode_frame([[rid, Status.ERROR, router._unavailable(req.op, exc)]])
        if rest[0] == Status.ERROR:
            _, body = codec.decode_rest(rest)
            if body[0] == ErrorCode.MOVED:  # the owner's view is newer: retry as any forward would
                return await router._forward_alone(req, bounced=True)
        return codec.single_frame(rid, rest)

    def notify(self, done: Callable[[bytes | None], None]) -> Any | None:
        """When this waits for a lone relayed request only: have ``done`` called
        with the reply frame as soon as the owner's reply is read, with no
        task waiting for it, and return what will read it (the peer link's
        channel, see :meth:`Pending.notify`). ``done(None)`` means the reply
        may need more than passing on (it is an error, which may be `moved`,
        or the link failed): :meth:`finish` then completes it from what
        came. None, and no call, if this cannot be done: :meth:`finish` as
        usual."""
        if self._forwards or self._members or self._drains or self._gathers:
            return None
        if self._relay is None:
            return self._notify_replicated(done)
        if self._replicated:
            return None
        rid, _, _, pending = self._relay
        router = self._router

        def relayed(rest: bytes | None) -> None:
            if rest is None or rest[0] == Status.ERROR:  # (rare) finish() retries a `moved`, passes on the rest
                done(None)
                return
            self.release()
            router.counters.latency.observe(router._clock() - self._started)
            done(codec.single_frame(rid, rest))

        return pending.notify(relayed)

    def _notify_replicated(self, done: Callable[[bytes | None], None]) -> Any | None:
        """:meth:`notify` for a frame whose one request is a write done here
        that waits for its replica's confirmation only."""
        if len(self._replicated) != 1:
            return None
        deliver, _, status, body, replicated = self._replicated[0]
        router = self._router

        def confirmed(ok: bool) -> None:
            if not ok:  # (rare) finish() answers it
                done(None)
                return
            self.release()
            deliver(status, body)
            router.counters.latency.observe(router._clock() - self._started)
            done(codec.encode_frame(self._replies))

        return replicated.notify(confirmed)

    def release(self) -> None:
        for _, _, pending in self._forwards:
            pending.release()
        if self._relay is not None:
            self._relay[3].release()
        for *_, replicated in self._replicated:
            replicated.release()

    def owners(self) -> Iterable[str]:
        """The nodes this waits for."""
        if self._relay is not None:
            yield self._relay[2]
        for owner, _, _ in self._forwards:
            yield owner
        for *_, replicated in self._replicated:
            yield from replicated.replicas()


class Router:
    """Serves requests against ``store`` for the shards this node owns and
    hands the rest to their owners through ``peers``.

    ``stats`` gives a ``stats`` reply (this node's counters), ``members`` a
    ``members`` reply (every member's, gathered by the node);
    ``client_addresses`` maps member ids to their client addresses.
    ``vouched_until`` is the time on ``clock`` from which this node no longer
    answers keyed requests (``math.inf``: always answers); its owner moves it.
    ``server_info`` is the node's part of a hello reply. ``drain`` hands the
    node's shards over and stops it (the ``drain`` op). ``handoff(peer, op,
    args)`` serves what other nodes say about moving shards (see
    :mod:`dcache.handoff`).
    """

    def __init__(
        self,
        *,
        store: Any,
        node_id: str,
        limits: Limits,
        shard_map: ShardMap,
        stats: Callable[[], dict[str, Any]],
        members: Callable[[], Awaitable[dict[str, Any]]],
        server_name: str,
        peers: Forwarder | None = None,
        handoff: Callable[[str, str, dict[str, Any]], Any] | None = None,
        drain: Callable[[], Awaitable[tuple[int, Any]]] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.limits = limits
        self.shard_map = shard_map
        self.peers = peers
        self.client_addresses: dict[str, str] = {}
        self._stats = stats
        self._members = members
        self._server_name = server_name
        self.counters = RequestCounters()
        self.vouched_until = math.inf
        self.arriving: dict[int, str] = {}  # shard → the node holding its entries, until they arrive here
        self.replicator: Replicator | None = None  # with replicas: sends this node's writes to them
        self._handoff = handoff
        self._drain = drain
        # Watching (set by the node): its event log, the wake-up for readers
        # waiting on it, and what to call when someone reads it.
        self.event_log: EventLog | None = None
        self.event_arrived: Callable[[], trio.Event] = trio.Event
        self.watched: Callable[[], None] = lambda: None
        self.watch_hub: WatchHub | None = None
        self._clock = clock

    # -- entry points -------------------------------------------------------------

    async def handle(self, session: ServerSession, payloads: list[bytes]) -> bytes:
        """Answer every request in ``payloads`` in one frame, waiting for
        other nodes as needed (for tools and tests; a node's connections
        use :meth:`place`, and send what waits apart)."""
        now, waiting = self.place(session, payloads)
        if waiting is None:
            return now if now is not None else codec.encode_frame([])  # (a frame of no requests)
        later = await waiting.finish()
        if now is None:
            return later
        # One frame, the replies in the order of their requests, as a reader of it may expect.
        order: dict[Any, int] = {}
        for payload in payloads:
            try:
                for message in codec.decode_frame(payload, self.limits):
                    if type(message) is list and message and type(message[0]) is int:  # (a bad rid is answered with null)
                        order.setdefault(message[0], len(order))
            except WireError:
                pass
        replies = [*codec.decode_frame(now, _ANY), *codec.decode_frame(later, _ANY)]
        replies.sort(key=lambda reply: order.get(reply[0], len(order)))
        return codec.encode_frame(replies)

    def place(self, session: ServerSession, payloads: list[bytes]) -> tuple[bytes | None, Waiting | None]:
        """Answer what can be answered now, in one frame (None if nothing
        can), and hand what waits for other nodes to their links, in order,
        returning it as a :class:`Waiting` (None if nothing waits)."""
        started = self._clock()
        vouched = started < self.vouched_until
        if len(payloads) == 1 and session.greeted and vouched:
            placed = self._place_alone(session, payloads[0], started)
            if placed is not None:
                return placed
        replies: list[Any] = []
        remote: list[_Job] = []
        waiting: Waiting | None = None
        for payload in payloads:
            if session.refused:
                break
            try:
                # (A peer's frame joins messages as other nodes received them: taken whole.)
                messages = codec.decode_frame(payload, self.limits, whole=bool(session.peer_id))
            except WireError as exc:
                replies.append(codec.error_from(exc))
                continue
            for message in messages:
                try:
                    req = parse_request(message, self.limits)
                except WireError as exc:
                    replies.append(self._invalid(exc))
                    continue
                if not session.greeted or req.op == "hello":
                    replies.append(self._hello(session, req))
                    if session.refused:
                        break  # the connection is closed after this reply: nothing more is read
                    continue
                op = OPS[req.op]
                if (op.peer_only and not session.peer_id) or (session.read_only and (op.write or req.op == "drain")):
                    replies.append(self._forbidden(req, op))
                    continue
                if op.keys is not Keys.NONE and not vouched:
                    self.counters.count(req.op, "unavailable")
                    replies.append(codec.error(req.rid, ErrorCode.UNAVAILABLE, UNVOUCHED_MESSAGE))
                elif op.keys is Keys.ONE:
                    owner = self.shard_map.owner(req.args["ns"], req.args["key"])
                    if owner == self.node_id and op.write and self.replicator is not None:
                        status, body, replicated = self._write(op, req.args)
                        if replicated is None:
                            replies.append([req.rid, status, body])
                        else:
                            waiting = waiting or Waiting(self, started)
                            waiting._replicated.append((waiting.slot(req.rid).deliver, op.name, status, body, replicated))
                        continue
                    reply = self._answer_here(session, req, owner)
                    if reply is not None:
                        replies.append(reply)
                    else:
                        waiting = waiting or Waiting(self, started)
                        remote.append(_Job(op, req.args, slot=waiting.slot(req.rid)))
                elif op.keys is Keys.MANY:
                    waiting = self._place_many(session, req, op, replies, remote, waiting, started)
                elif req.op == "members":
                    waiting = waiting or Waiting(self, started)
                    waiting._members.append(waiting.slot(req.rid))
                elif req.op == "drain":
                    if self._drain is None or session.peer_id:
                        self.counters.count("drain", "error")
                        replies.append(codec.error(req.rid, ErrorCode.BAD_REQUEST, "drain is for clients of a node"))
                    else:
                        waiting = waiting or Waiting(self, started)
                        waiting._drains.append(waiting.slot(req.rid))
                elif req.op in ("handoff", "claim", "replicate", "copies"):
                    replies.append(self._take_handoff(session, req))
                elif req.op == "scan":
                    waiting = waiting or Waiting(self, started)
                    waiting._gathers.append((waiting.slot(req.rid), functools.partial(self._scan, req.args)))
                elif req.op == "scanshards":
                    replies.append(self._scan_here(req))
                elif req.op in ("watch", "events"):
                    waiting = waiting or Waiting(self, started)
                    gather = functools.partial(self._watch if req.op == "watch" else self.read_events, req.args)
                    waiting._gathers.append((waiting.slot(req.rid), gather))
                elif req.op in ("flush", "nsstats"):
                    if req.args["here"]:
                        self.counters.count(req.op, "ok")
                        replies.append(codec.ok(req.rid, self._namespace_here(req.op, req.args["ns"])))
                    else:
                        waiting = waiting or Waiting(self, started)
                        gather = functools.partial(self._on_every_node, req.op, req.args["ns"])
                        waiting._gathers.append((waiting.slot(req.rid), gather))
                else:
                    replies.append(self._local(req))
        if remote:
            assert waiting is not None
            self._hand_over(remote, waiting)
        if replies:
            self.counters.latency.observe(self._clock() - started, len(replies))
        return (codec.encode_frame(replies) if replies else None), waiting

    def _place_alone(self, session: ServerSession, payload: bytes, started: float) -> tuple[bytes | None, Waiting | None] | None:
        """A keyed request that came alone in its frame (the usual case), the
        short way: served here if this node owns the key, else handed on as
        it came, its owner's reply to be returned as it comes but for the rid
        (see :func:`codec.split_single`). None for any other frame."""
        try:
            messages = codec.decode_frame(payload, self.limits, whole=bool(session.peer_id))
        except WireError:
            return None
        if len(messages) != 1:
            return None
        message = messages[0]
        if type(message) is not list or len(message) != 3 or type(message[1]) is not str or message[1] not in KEYED:
            return None
        try:
            rid, op, args = check_request(message, self.limits)
        except WireError as exc:
            return codec.encode_frame([self._invalid(exc)]), None
        if op.write and session.read_only:
            return codec.encode_frame([self._forbidden(Request(rid, op.name, args), op)]), None
        owner = self.shard_map.owner(args["ns"], args["key"])
        if owner == self.node_id:
            if op.write and self.replicator is not None:
                status, body, replicated = self._write(op, args)
                if replicated is not None:
                    waiting = Waiting(self, started)
                    waiting._replicated.append((waiting.slot(rid).deliver, op.name, status, body, replicated))
                    return None, waiting
            else:
                status, body = self._execute(op, args)
            self.counters.latency.observe(self._clock() - started)
            return codec.reply_frame(rid, status, body), None
        if session.peer_id and not self._passes_on(args):
            self.counters.latency.observe(self._clock() - started)
            return codec.encode_frame([self._moved(rid, owner)]), None
        split = codec.split_single(payload)
        if self.peers is None or split is None:
            return None
        try:  # its bytes go on as they came: nothing may hide after the message
            codec.decode_frame(payload, self.limits, whole=True)
        except WireError:
            return None  # (placed the long way, which sends on only the message it decoded)
        self.counters.forwarded += 1
        waiting = Waiting(self, started)
        waiting._relay = (rid, Request(rid, op.name, args), owner, self.peers.submit_raw(owner, payload[split[1] :]))
        return None, waiting

    def _place_many(
        self,
        session: ServerSession,
        req: Request,
        op: Op,
        replies: list[Any],
        remote: list[_Job],
        waiting: Waiting | None,
        started: float,
    ) -> Waiting | None:
        args = req.args
        elements = op.elements(args)
        by_owner = self.shard_map.group_by_owner(args["ns"], op.keys_of(args))
        if not by_owner or by_owner.keys() == {self.node_id}:
            if op.write and self.replicator is not None and by_owner:
                status, body, replicated = self._write(op, args)
                if replicated is None:
                    replies.append([req.rid, status, body])
                    return waiting
                waiting = waiting or Waiting(self, started)
                waiting._replicated.append((waiting.slot(req.rid).deliver, op.name, status, body, replicated))
                return waiting
            replies.append(self._local(req))
            return waiting
        if session.peer_id and not self._passes_on_all(args["ns"], by_owner, op.keys_of(args)):
            other = next(o for o in by_owner if o != self.node_id)
            replies.append(self._moved(req.rid, other))
            return waiting
        waiting = waiting or Waiting(self, started)
        merge = _Merge(waiting.slot(req.rid), op, len(elements))
        for owner, indexes in by_owner.items():
            part = _Job(op, op.part(args, [elements[i] for i in indexes]), merge=merge, indexes=indexes)
            if owner == self.node_id:
                if op.write and self.replicator is not None:
                    status, body, replicated = self._write(op, part.args)
                    if replicated is not None:
                        waiting._replicated.append((part.deliver, op.name, status, body, replicated))
                        continue
                    part.deliver(status, body)
                else:
                    part.deliver(*self._execute(op, part.args))
            else:
                remote.append(part)
        return waiting

    def _hand_over(self, jobs: list[_Job], waiting: Waiting) -> None:
        """Hand placed jobs to their owners' links now, one batch per owner."""
        assert self.peers is not None
        by_owner: dict[str, list[_Job]] = {}
        for job in jobs:
            by_owner.setdefault(job.owner(self.shard_map), []).append(job)
        for owner, owned in by_owner.items():
            self.counters.forwarded += len(owned)
            pending = self.peers.submit(owner, [(job.op.name, job.op.wire(job.args)) for job in owned])
            waiting._forwards.append((owner, owned, pending))

    # -- here ----------------------------------------------------------------------

    def _answer_here(self, session: ServerSession, req: Request, owner: str) -> list[Any] | None:
        """The reply to a keyed request if this node gives it: it owns the
        key, or the request came over a peer link (never forwarded twice)."""
        if owner == self.node_id:
            return self._local(req)
        if session.peer_id and not self._passes_on(req.args):
            return self._moved(req.rid, owner)
        return None

    def _passes_on(self, args: dict[str, Any]) -> bool:
        """Whether a peer's request for this key is passed on, not bounced:
        its shard is arriving here, and the node holding it answers."""
        return bool(self.arriving) and shard_of(args["ns"], args["key"]) in self.arriving

    def _passes_on_all(self, ns: str, by_owner: dict[str, list[int]], keys: Iterable[bytes]) -> bool:
        """Whether a peer's many-key request is passed on, not bounced: every
        key it names that this node does not serve is in an arriving shard."""
        if not self.arriving:
            return False
        keys = list(keys)
        return all(
            shard_of(ns, keys[i]) in self.arriving
            for owner, positions in by_owner.items()
            if owner != self.node_id
            for i in positions
        )

    def _take_handoff(self, session: ServerSession, req: Request) -> list[Any]:
        """A ``handoff`` or ``claim`` from another node (see :mod:`dcache.handoff`),
        or a ``replicate`` or ``copies`` (see :mod:`dcache.replication`)."""
        if not session.peer_id or self._handoff is None:
            self.counters.count(req.op, "error")
            return codec.error(req.rid, ErrorCode.BAD_REQUEST, f"{req.op} is for nodes of the cluster only")
        try:
            body = self._handoff(session.peer_id, req.op, req.args)
        except Exception:
            log.exception("internal error serving %s", req.op)
            self.counters.count(req.op, "error")
            return codec.error(req.rid, ErrorCode.INTERNAL, "internal error; see the node's log")
        self.counters.count(req.op, "ok")
        return codec.ok(req.rid, body)

    def _local(self, req: Request) -> list[Any]:
        if req.op == "stats":
            self.counters.count("stats", "ok")
            return codec.ok(req.rid, self._stats())
        status, body = self._execute(OPS[req.op], req.args)
        return [req.rid, status, body]

    def _execute(self, op: Op, args: dict[str, Any]) -> tuple[int, Any]:
        assert op.apply is not None
        try:
            body = op.apply(self.store, args)
        except StoreError as exc:  # (refused, and nothing changed)
            self.counters.count(op.name, "error")
            return Status.ERROR, [exc.code, str(exc)]
        except Exception:
            log.exception("internal error serving %s", op.name)
            self.counters.count(op.name, "error")
            return Status.ERROR, [ErrorCode.INTERNAL.value, "internal error; see the node's log"]
        self.counters.count(op.name, "ok")
        return Status.OK, body

    def _write(self, op: Op, args: dict[str, Any]) -> tuple[int, Any, Replicated | None]:
        """A write this node owns the keys of, with replicas: refused if one
        of them is unreachable (synchronous replication), else applied here
        and sent to them; the reply, and what to await before giving it (None:
        nothing)."""
        replicator = self.replicator
        assert replicator is not None
        keys = [args["key"]] if op.keys is Keys.ONE else list(op.keys_of(args))
        problem = replicator.check(args["ns"], keys)
        if problem is not None:
            self.counters.count(op.name, "unavailable")
            return Status.ERROR, [ErrorCode.UNAVAILABLE.value, problem], None
        status, body = self._execute(op, args)
        if status != Status.OK:
            return status, body, None
        return status, body, replicator.send(args["ns"], keys)

    async def _replicated(self, op: str, status: int, body: Any, replicated: Replicated) -> tuple[int, Any]:
        """The reply to a write once its replicas have it (see :meth:`_write`)."""
        problem = await replicated.wait()
        if problem is None:
            return status, body
        self.counters.count(op, "ok", -1)  # (counted when it was applied here; it is answered unavailable)
        self.counters.count(op, "unavailable")
        return Status.ERROR, [ErrorCode.UNAVAILABLE.value, problem]

    async def _scan(self, args: dict[str, Any]) -> tuple[int, Any]:
        """A page of a scan: the keys after the cursor, in the order of their
        shards and by key within a shard, from whichever nodes own them, a
        block of shards at a time. A key present from the first page to the
        last is listed once, if the shards do not move meanwhile."""
        ns, prefix, limit = args["ns"], args["prefix"], args["limit"]
        shard, after = args["cursor"]
        started = self._clock()
        owners = self.shard_map.shard_owners
        keys: list[bytes] = []
        size = 0
        while shard < NUM_SHARDS:
            by_owner: dict[str, list[int]] = {}
            for s in range(shard, min(shard + SCAN_BLOCK, NUM_SHARDS)):
                by_owner.setdefault(owners[s] if owners else self.node_id, []).append(s)
            want = limit - len(keys)
            found: list[tuple[int, bytes]] = []
            problems: list[str] = []
            async with trio.open_nursery() as nursery:
                for owner, shards in by_owner.items():
                    part = {"ns": ns, "prefix": prefix, "shards": shards, "after": after if shards[0] == shard else None}
                    nursery.start_soon(self._scan_part, owner, {**part, "limit": want}, found, problems)
            if problems:
                self.counters.count("scan", "unavailable")
                return Status.ERROR, [ErrorCode.UNAVAILABLE.value, f"{problems[0]}; the scan can go on from the same cursor"]
            found.sort()
            taken = 0
            for _, key in found:
                if taken == want or size >= MAX_SCAN_BYTES:
                    break
                keys.append(key)
                size += len(key)
                taken += 1
            if taken < len(found) or len(keys) == limit or size >= MAX_SCAN_BYTES:
                last = found[taken - 1] if taken else (shard, after)
                self.counters.count("scan", "ok")
                return Status.OK, {"keys": keys, "cursor": [last[0], last[1]]}
            shard, after = shard + SCAN_BLOCK, None
            if shard < NUM_SHARDS and self._clock() - started > SCAN_BUDGET:  # (a sparse prefix: the rest next time)
                self.counters.count("scan", "ok")
                return Status.OK, {"keys": keys, "cursor": [shard, None]}
        self.counters.count("scan", "ok")
        return Status.OK, {"keys": keys, "cursor": None}

    async def _scan_part(self, owner: str, args: dict[str, Any], found: list[tuple[int, bytes]], problems: list[str]) -> None:
        """One owner's keys for a page of a scan, into ``found``; what went wrong, into ``problems``."""
        if owner == self.node_id or self.peers is None:
            found.extend(self._scan_shards(args))
            return
        body = await self._ask(owner, "scanshards", args, problems)
        if body is not None:
            found.extend((shard, key) for shard, key in body)

    async def _ask(self, member: str, op: str, args: dict[str, Any], problems: list[str]) -> Any:
        """``member``'s answer to one request of a fan-out, or None, with
        what went wrong added to ``problems``."""
        assert self.peers is not None
        try:
            [(status, body)] = await self.peers.forward(member, [(op, args)])
        except PeerUnavailable as exc:
            problems.append(str(exc))
            return None
        if status != Status.OK:
            problems.append(f"{member} could not answer {op}: {body[1] if isinstance(body, list) else body}")
            return None
        return body

    def _scan_shards(self, args: dict[str, Any]) -> list[tuple[int, bytes]]:
        return self.store.scan(args["shards"], args["ns"], args["prefix"], args["after"], args["limit"], MAX_SCAN_BYTES)

    def _scan_here(self, req: Request) -> list[Any]:
        """A ``scanshards`` from the node serving a page of a scan."""
        self.counters.count("scanshards", "ok")
        return codec.ok(req.rid, [list(item) for item in self._scan_shards(req.args)])

    async def read_events(self, args: dict[str, Any]) -> tuple[int, Any]:
        """A read of this node's event log, waiting up to ``wait_ms`` for an event to say."""
        log = self.event_log
        if log is None:
            return Status.ERROR, [ErrorCode.BAD_REQUEST.value, "this node keeps no event log"]
        self.watched()
        incarnation, after = args["incarnation"], args["after"]
        read = log.read(incarnation, after, args["ns"], args["prefix"], args["limit"])
        if not (read.events or read.missed or read.restarted) and incarnation is not None and args["wait_ms"]:
            with trio.move_on_after(args["wait_ms"] / 1000):
                while not (read.events or read.missed or read.restarted):
                    await self.event_arrived().wait()
                    # From where the last read ended: what did not match is not looked at again.
                    read = log.read(incarnation, read.next, args["ns"], args["prefix"], args["limit"])
        self.counters.count("events", "ok")
        return Status.OK, {
            "incarnation": read.incarnation,
            "events": [[seq, kind, key] for seq, kind, _, key in read.events],
            "next": read.next,
            "missed": read.missed,
            "restarted": read.restarted,
        }

    async def _watch(self, args: dict[str, Any]) -> tuple[int, Any]:
        """A ``watch``: every member's events since the cursor, from this node's feed for its filter."""
        if self.watch_hub is None:
            return Status.ERROR, [ErrorCode.BAD_REQUEST.value, "this node serves no watches"]
        try:
            body = await self.watch_hub.read(args)
        except WatchesFull as exc:
            self.counters.count("watch", "unavailable")
            return Status.ERROR, [ErrorCode.UNAVAILABLE.value, str(exc)]
        self.counters.count("watch", "ok")
        return Status.OK, body

    def _namespace_here(self, op: str, ns: str | None) -> dict[str, Any]:
        if op == "flush":
            count = self.store.flush(ns)
            return {"flushed": count, "nodes": {self.node_id: count}}
        found = self.store.namespace_stats(ns)
        return {**found, "nodes": {self.node_id: found}}

    async def _on_every_node(self, op: str, ns: str | None) -> tuple[int, Any]:
        """A ``flush`` or ``nsstats`` on every member, the answers summed."""
        here = {"here": True, **({"all": True} if ns is None else {"ns": ns})}
        nodes: dict[str, Any] = {}
        problems: list[str] = []

        async def ask(member: str) -> None:
            if member == self.node_id or self.peers is None:
                nodes.update(self._namespace_here(op, ns)["nodes"])
                return
            body = await self._ask(member, op, here, problems)
            if body is not None:
                nodes.update(body["nodes"])

        async with trio.open_nursery() as nursery:
            for member in self.shard_map.members or (self.node_id,):
                nursery.start_soon(ask, member)
        if problems:
            self.counters.count(op, "unavailable")
            done = f"; flushed {sum(nodes.values()):,} key(s) on {len(nodes)} node(s), run it again" if op == "flush" else ""
            return Status.ERROR, [ErrorCode.UNAVAILABLE.value, f"{problems[0]}{done}"]
        self.counters.count(op, "ok")
        if op == "flush":
            return Status.OK, {"flushed": sum(nodes.values()), "nodes": nodes}
        total = {name: sum(found[name] for found in nodes.values()) for name in ("keys", "data_bytes")}
        return Status.OK, {**total, "nodes": nodes}

    def _moved(self, rid: int, owner: str) -> list[Any]:
        self.counters.count("moved", "error")
        return codec.error(
            rid,
            ErrorCode.MOVED,
            f"{self.node_id} does not own this key at epoch {self.shard_map.epoch}; {owner} does",
            {"epoch": self.shard_map.epoch, "owner": owner},
        )

    def _hello(self, session: ServerSession, req: Request) -> list[Any]:
        info = {"server": self._server_name, "node": self.node_id, "epoch": self.shard_map.epoch, "limits": self.limits.as_dict()}
        reply, outcome = session.hello(req, info)
        self.counters.count(req.op, "ok" if outcome == "ok" else "error")
        if outcome != "ok":
            self.counters.refuse(outcome)
        return reply

    def _forbidden(self, req: Request, op: Op) -> list[Any]:
        self.counters.count(req.op, "error")
        if op.peer_only:
            self.counters.refuse("peer_op")
            return codec.error(req.rid, ErrorCode.FORBIDDEN, f"{req.op} is for nodes of the cluster only")
        self.counters.refuse("read_only")
        return codec.error(req.rid, ErrorCode.FORBIDDEN, f"{req.op}: this connection's token may read, not write")

    def _invalid(self, exc: WireError) -> list[Any]:
        self.counters.count("invalid", "error")
        return codec.error_from(exc)

    def _unavailable(self, op: str, exc: PeerUnavailable) -> list[str]:
        """Count an ``op`` whose owner is unreachable; the error body for it."""
        self.counters.count(op, "unavailable")
        return [ErrorCode.UNAVAILABLE.value, f"the owner of this key is unreachable: {exc}"]

    # -- waiting for other nodes ---------------------------------------------------------

    async def _collect(self, owner: str, jobs: list[_Job], replies: Callable[[], Awaitable[Any]], bounced: list[_Job]) -> None:
        """Deliver the ``replies()`` to ``jobs``, sent to ``owner``; keep those bounced as moved."""
        try:
            results = await replies()
        except PeerUnavailable as exc:
            if owner not in self.shard_map.members:  # it left meanwhile: place them again
                bounced.extend(jobs)
                return
            for job in jobs:
                job.deliver(Status.ERROR, self._unavailable(job.op.name, exc))
            return
        for job, (status, body) in zip(jobs, results):
            if status == Status.ERROR and body[0] == ErrorCode.MOVED:
                bounced.append(job)
            else:
                job.deliver(status, body)

    async def _forward_alone(self, req: Request, *, bounced: bool = False) -> bytes:
        replies: list[Any] = [None]
        job = _Job(OPS[req.op], req.args, slot=_Reply(replies, 0, req.rid))
        if bounced:
            await self._retry([job])
        else:
            await self._retry(await self._attempt([job]))
        return codec.encode_frame(replies)

    async def _retry(self, bounced: list[_Job]) -> None:
        for delay in MOVED_RETRY_DELAYS:
            if not bounced:
                return
            self.counters.moved_retries += len(bounced)
            await trio.sleep(delay)
            bounced = await self._attempt(bounced)
        for job in bounced:
            self.counters.count(job.op.name, "unavailable")
            job.deliver(Status.ERROR, [ErrorCode.UNAVAILABLE.value, CHANGING_MESSAGE])

    async def _attempt(self, jobs: list[_Job]) -> list[_Job]:
        """Send each job to its owner as the map says now; return those bounced as moved."""
        bounced: list[_Job] = []
        by_owner: dict[str, list[_Job]] = {}
        for job in self._reroute(jobs):
            owner = job.owner(self.shard_map)
            if owner == self.node_id:
                await self._execute_job(job)
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

    async def _forward(self, owner: str, jobs: list[_Job], bounced: list[_Job]) -> None:
        assert self.peers is not None
        self.counters.forwarded += len(jobs)
        requests = [(job.op.name, job.op.wire(job.args)) for job in jobs]
        peers = self.peers
        await self._collect(owner, jobs, lambda: peers.forward(owner, requests), bounced)

    async def _execute_job(self, job: _Job) -> None:
        """Run a job placed here on a second look (its owner changed, or it
        was bounced): time has passed since the batch's check, so check again."""
        if self._clock() >= self.vouched_until:
            self.counters.count(job.op.name, "unavailable")
            job.deliver(Status.ERROR, [ErrorCode.UNAVAILABLE.value, UNVOUCHED_MESSAGE])
        elif job.op.write and self.replicator is not None:
            status, body, replicated = self._write(job.op, job.args)
            job.deliver(*(await self._replicated(job.op.name, status, body, replicated) if replicated else (status, body)))
        else:
            job.deliver(*self._execute(job.op, job.args))

    def _reroute(self, jobs: list[_Job]) -> list[_Job]:
        """Split many-key parts whose keys no longer share one owner."""
        out = []
        for job in jobs:
            if job.merge is None:
                out.append(job)
                continue
            assert job.indexes is not None
            op = job.op
            elements = op.elements(job.args)
            groups = self.shard_map.group_by_owner(job.args["ns"], op.keys_of(job.args))
            for positions in groups.values():
                parts = [elements[i] for i in positions]
                indexes = [job.indexes[i] for i in positions]
                out.append(_Job(op, op.part(job.args, parts), merge=job.merge, indexes=indexes))
        return out


# Decoding our own reply frames again (Router.handle joins two): no limits apply.
_ANY = Limits(max_frame_bytes=2**62, max_batch=2**62)
