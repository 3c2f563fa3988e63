"""Watches served by one node: a feed per (namespace, prefix) that follows
every member's event log (see :mod:`dcache.events`) and that all of this
node's watchers with that filter read.

However many watchers a node serves, it asks each member about one filter
with one request at a time (a long poll, answered when the member has
events or after :data:`POLL_WAIT`), so watchers cost the peer links nothing
more: a request per watcher and member would fill a link with waiting
requests, and hold up the forwards behind them. A feed keeps, per member,
the last :data:`FEED_EVENTS` matching events (and at most
:data:`FEED_KEY_BYTES` of their keys); a watcher's cursor holds, per member,
the member's incarnation and the sequence number of the last event it saw,
so it may go on at any node. A feed nobody reads for :data:`FEED_IDLE`
stops; at most :data:`MAX_FEEDS` run at once.
"""

from __future__ import annotations

import bisect
import logging
from array import array
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .codec import Status
from .errors import PeerUnavailable

log = logging.getLogger(__name__)

FEED_EVENTS = 10_000  # per member, per feed
FEED_KEY_BYTES = 4 * 1024 * 1024  # per member, per feed
TRIMMED_KEPT = 10_000  # sequence numbers of trimmed events kept, to count what a late watcher missed
POLL_WAIT = 1.0  # seconds a member holds a feed's request while it has nothing new
FEED_IDLE = 30.0
MAX_FEEDS = 64
READY_WAIT = 1.0  # seconds a watcher's first read waits for the members' first answers
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0)  # between polls of a member that did not answer
UNKNOWN = -1  # "missed" when how many is not known
MAX_GAPS = 1000  # losses a member reported that a feed remembers

Poll = Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]


class WatchesFull(Exception):
    """This node follows :data:`MAX_FEEDS` filters already."""


class _MemberFeed:
    """What a feed knows of one member's events."""

    __slots__ = ("heard", "incarnation", "start", "next", "seqs", "events", "key_bytes", "trimmed", "gaps")

    def __init__(self, incarnation: int | None, after: int) -> None:
        self.heard = False  # whether the member answered yet
        self.incarnation = incarnation  # where to read from: None, from now
        self.start = after  # events after this are known (but for gaps)
        self.next = after  # every event up to this was read
        self.seqs: list[int] = []
        self.events: list[tuple[str, bytes]] = []  # (kind, key), in the order of seqs
        self.key_bytes = 0
        self.trimmed = array("q")  # seqs of events dropped from the feed, the latest TRIMMED_KEPT
        self.gaps: list[tuple[int, int]] = []  # (seq, events the member dropped before the feed read them)

    def take(self, body: dict[str, Any]) -> None:
        """A member's answer to a poll."""
        if self.incarnation is None:  # (the first answer, from now)
            self.incarnation, self.start = body["incarnation"], body["next"]
        elif body["restarted"] or self.incarnation != body["incarnation"]:
            self.incarnation, self.start = body["incarnation"], 0
            self.seqs, self.events, self.key_bytes, self.trimmed, self.gaps = [], [], 0, array("q"), []
        elif body["missed"]:
            self.gaps.append((self.next, body["missed"]))
            del self.gaps[:-MAX_GAPS]
        for seq, kind, key in body["events"]:
            self.seqs.append(seq)
            self.events.append((kind, key))
            self.key_bytes += len(key)
        self.next = body["next"]
        self.heard = True
        if len(self.seqs) > FEED_EVENTS or self.key_bytes > FEED_KEY_BYTES:
            self._trim()

    def _trim(self) -> None:
        drop = max(len(self.seqs) - FEED_EVENTS, len(self.seqs) // 4)
        while self.key_bytes - sum(len(key) for _, key in self.events[:drop]) > FEED_KEY_BYTES and drop < len(self.seqs):
            drop = min(len(self.seqs), drop * 2)
        self.key_bytes -= sum(len(key) for _, key in self.events[:drop])
        self.trimmed.extend(self.seqs[:drop])
        if len(self.trimmed) > TRIMMED_KEPT:
            del self.trimmed[: len(self.trimmed) - TRIMMED_KEPT]
        del self.seqs[:drop], self.events[:drop]

    def read(self, position: tuple[int | None, int] | None, limit: int) -> tuple[list[tuple[str, bytes]], list[Any], int, bool]:
        """For a watcher at ``position``: its events, its next position,
        how many it missed (:data:`UNKNOWN` if that is not known) and
        whether the member restarted since."""
        if position is None:  # (a watcher's first read: from now)
            return [], [self.incarnation, self.next], 0, False
        incarnation, after = position
        missed, restarted = 0, False
        if incarnation != self.incarnation:
            restarted, after = True, self.start
        elif after < self.start:
            missed, after = UNKNOWN, self.start
        else:
            if self.trimmed and after < self.trimmed[-1]:
                missed = len(self.trimmed) - bisect.bisect_right(self.trimmed, after)
            gaps = [count for seq, count in self.gaps if seq >= after]
            missed = UNKNOWN if UNKNOWN in gaps else missed + sum(gaps)
        first = bisect.bisect_right(self.seqs, after)
        events = self.events[first : first + limit]
        last = self.seqs[first + len(events) - 1] if first + len(events) < len(self.seqs) else self.next
        return events, [self.incarnation, last], missed, restarted


class Feed:
    """Every member's events for one filter, as this node follows them."""

    def __init__(self, ns: str, prefix: bytes) -> None:
        self.ns = ns
        self.prefix = prefix
        self.members: dict[str, _MemberFeed] = {}
        self.arrived = trio.Event()
        self.last_read = trio.current_time()
        self.scope = trio.CancelScope()

    def answered(self) -> bool:
        return all(member.heard for member in self.members.values())

    def read(self, cursor: dict[str, tuple[int | None, int]], limit: int) -> dict[str, Any]:
        events: list[list[Any]] = []
        lost: list[list[Any]] = []
        after: dict[str, list[Any]] = {}
        for node, member in self.members.items():
            if not member.heard:  # (the watcher keeps its place)
                if node in cursor:
                    after[node] = list(cursor[node])
                continue
            found, after[node], missed, restarted = member.read(cursor.get(node), limit)
            events.extend([node, kind, key] for kind, key in found)
            if missed or restarted:
                lost.append([node, missed, restarted])
        return {"events": events, "cursor": after, "lost": lost}

    def wake(self) -> None:
        self.arrived.set()
        self.arrived = trio.Event()


class WatchHub:
    """The feeds of one node. ``members()`` gives the members to follow;
    ``poll(member, args)`` reads a member's event log (an ``events``
    request, or this node's own log), returning (status, body)."""

    def __init__(self, members: Callable[[], Sequence[str]], poll: Poll) -> None:
        self._members = members
        self._poll = poll
        self.feeds: dict[tuple[str, bytes], Feed] = {}
        self._nursery: trio.Nursery | None = None
        self.changed = trio.Event()  # set when the members may have changed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def members_changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def read(self, args: dict[str, Any]) -> dict[str, Any]:
        """A ``watch`` request: the events after its cursor, waiting up to its ``wait_ms`` for some."""
        feed = self._feed(args["ns"], args["prefix"], args["cursor"])
        feed.last_read = trio.current_time()
        if not feed.answered():
            with trio.move_on_after(READY_WAIT):
                while not feed.answered():
                    await feed.arrived.wait()
        body = feed.read(args["cursor"], args["limit"])
        if not (body["events"] or body["lost"]) and args["wait_ms"]:
            with trio.move_on_after(args["wait_ms"] / 1000):
                while not (body["events"] or body["lost"]):
                    await feed.arrived.wait()
                    body = feed.read(args["cursor"], args["limit"])
        return body

    def _feed(self, ns: str, prefix: bytes, cursor: dict[str, tuple[int | None, int]]) -> Feed:
        feed = self.feeds.get((ns, prefix))
        if feed is None:
            if len(self.feeds) >= MAX_FEEDS:
                raise WatchesFull(
                    f"this node follows {MAX_FEEDS} different watches (namespace and prefix) already; "
                    "watch with a prefix another watcher uses, or through another node"
                )
            assert self._nursery is not None
            feed = self.feeds[(ns, prefix)] = Feed(ns, prefix)
            self._nursery.start_soon(self._follow, feed, cursor)
        return feed

    async def _follow(self, feed: Feed, cursor: dict[str, tuple[int | None, int]]) -> None:
        """Follow every member for ``feed`` until nobody reads it for a while.
        It starts from the cursor of the watcher it was made for, so that a
        watcher that comes over from another node misses nothing."""
        try:
            with feed.scope:
                async with trio.open_nursery() as nursery:
                    scopes: dict[str, trio.CancelScope] = {}
                    while trio.current_time() - feed.last_read < FEED_IDLE:
                        members = set(self._members())
                        for node in members - scopes.keys():
                            incarnation, after = cursor.get(node, (None, 0))
                            feed.members[node] = _MemberFeed(incarnation, after)
                            scopes[node] = trio.CancelScope()
                            nursery.start_soon(self._follow_member, feed, node, scopes[node])
                        for node in scopes.keys() - members:
                            scopes.pop(node).cancel()
                            del feed.members[node]
                        with trio.move_on_after(1.0):
                            await self.changed.wait()
                    nursery.cancel_scope.cancel()
        finally:
            del self.feeds[(feed.ns, feed.prefix)]
            feed.wake()

    async def _follow_member(self, feed: Feed, node: str, scope: trio.CancelScope) -> None:
        member = feed.members[node]
        failures = 0
        with scope:
            while True:
                args = {"ns": feed.ns, "prefix": feed.prefix, "incarnation": member.incarnation, "after": member.next}
                args.update(wait_ms=round(POLL_WAIT * 1000) if member.incarnation is not None else 0, limit=1000)
                try:
                    status, body = await self._poll(node, args)
                except PeerUnavailable as exc:
                    status, body = Status.ERROR, [None, str(exc)]
                if status != Status.OK:
                    if failures == 0:
                        log.info("watch: cannot read the events of %s: %s", node, body[1] if isinstance(body, list) else body)
                    await trio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
                    failures += 1
                    continue
                failures = 0
                member.take(body)
                feed.wake()
