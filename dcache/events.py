"""What happened to keys lately on one node, for watchers: a bounded log.

A node appends an event (set, delete, expire, evict) for each key it owns
while someone watches, and a watcher reads the log from where it stopped:
its cursor is the log's ``incarnation`` (new at each start of the node) and
the sequence number of the last event it saw. The log keeps the last
:data:`MAX_EVENTS` events and at most :data:`MAX_KEY_BYTES` of their keys;
a watcher that falls further behind is told how many it missed, and one
whose cursor names another incarnation is told the node restarted. Nothing
is kept per watcher, so a slow or vanished watcher costs a node nothing.

Sans-IO: the node wakes its waiting readers itself (see ``on_append``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

MAX_EVENTS = 100_000
MAX_KEY_BYTES = 16 * 1024 * 1024
ACTIVE_FOR = 30.0  # seconds a read keeps the log recording
UNKNOWN = -1  # "missed" when how many is not known
KINDS = ("set", "delete", "expire", "evict")


@dataclass(frozen=True, slots=True)
class Read:
    """What a read of the log gives: the events after the cursor that match,
    as (seq, kind, ns, key); the cursor to read from next; how many events
    were dropped before the reader saw them (:data:`UNKNOWN`: the log was
    not recording for a while); and whether its cursor was of an earlier
    incarnation of the node (events between were lost)."""

    events: list[tuple[int, str, str, bytes]]
    incarnation: int
    next: int
    missed: int = 0
    restarted: bool = False


class EventLog:
    def __init__(self, clock: Callable[[], float], *, max_events: int = MAX_EVENTS, max_key_bytes: int = MAX_KEY_BYTES) -> None:
        self._clock = clock
        self.incarnation = random.getrandbits(62) + 1
        self._events: list[tuple[int, str, str, bytes]] = []
        self._first = 1  # the seq of _events[0]
        self._next = 1
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_key_bytes
        self._active_until = -1.0
        self._resumed = 1  # the seq from which events are recorded (before it, the log was off)
        self.on_append: Callable[[], None] = lambda: None

    @property
    def active(self) -> bool:
        """Whether someone read the log lately (else nothing needs recording)."""
        return self._clock() < self._active_until

    def resume(self) -> None:
        """Recording starts again after a pause: a reader from before it is
        told it missed an unknown number of events."""
        self._resumed = self._next

    def append(self, kind: str, ns: str, key: bytes) -> None:
        events = self._events
        events.append((self._next, kind, ns, key))
        self._next += 1
        self._bytes += len(key)
        if len(events) > self._max_events or self._bytes > self._max_bytes:
            self._trim()
        self.on_append()

    def _trim(self) -> None:
        """Drop the oldest events, a quarter of the log at least (trimming one
        at a time would move the whole list for each event)."""
        events = self._events
        drop = max(len(events) - self._max_events, len(events) // 4)
        size = self._bytes - sum(len(event[3]) for event in events[:drop])
        while size > self._max_bytes and drop < len(events):
            size -= len(events[drop][3])
            drop += 1
        del events[:drop]
        self._bytes = size
        self._first += drop

    def read(self, incarnation: int | None, after: int, ns: str, prefix: bytes, limit: int) -> Read:
        """The events after seq ``after`` of ``incarnation`` (None: a new
        reader, who starts from now) in ``ns`` whose key starts with
        ``prefix``, at most ``limit``; reading keeps the log recording."""
        self._active_until = self._clock() + ACTIVE_FOR
        if incarnation is None:
            return Read([], self.incarnation, self._next - 1)
        restarted = incarnation != self.incarnation
        if restarted:
            after = 0
        missed = max(0, self._first - after - 1) if not restarted else 0
        if not restarted and after < self._resumed - 1:
            missed, after = UNKNOWN, self._resumed - 1
        start = max(after + 1, self._first) - self._first
        found: list[tuple[int, str, str, bytes]] = []
        last = self._next - 1
        for i in range(start, len(self._events)):
            event = self._events[i]
            if event[2] == ns and event[3].startswith(prefix):
                found.append(event)
                if len(found) == limit:
                    last = event[0]
                    break
        return Read(found, self.incarnation, last, missed, restarted)
