"""Many concurrent requests over one WebSocket connection, without background tasks.

A :class:`Channel` pairs replies with requests by rid (the rids and the
frames are its :class:`protocol.ClientConnection`'s). It is what both the
public :class:`dcache.Client` and the node-to-node peer links are made of.

There is no reader task and no writer task: a caller appends its request to
the outbox and, if nobody is writing, writes the whole outbox as one frame
itself; then, if nobody is reading, it reads and hands every reply it finds
to its waiter until its own arrives, and passes the reading on to another
waiter when it leaves. A lone caller thus never waits for another task to
be scheduled, and concurrent callers' requests share frames and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from . import codec, protocol, transport
from .errors import ClosedError, ConnectionLost, DcacheError, ProtocolError, RequestTimeout
from .protocol import ConnectionClosed


class _Waiter:
    __slots__ = ("event", "status", "body", "since", "raw", "callback")

    def __init__(self, raw: bool = False) -> None:
        self.event: trio.Event | None = None  # made only if the caller has to wait
        self.status: int | None = None
        self.body: Any = None  # with ``raw``: the reply's rest, encoded (see Channel.relay)
        self.since: float | None = None  # when expire_overdue first saw it waiting
        self.raw = raw
        self.callback: Callable[[bytes | None], None] | None = None  # see Channel.notify

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        callback = self.callback
        if callback is not None:
            self.callback = None
            callback(None if self.status == _FAILED else self.body)


_FAILED = -1  # waiter.status when the channel broke; body is the exception
_OK = codec.Status.OK.value
FLUSH_PASSES = 3


class Ticket:
    """Requests a channel took, with consecutive rids from ``rid``; see :meth:`Channel.enqueue`."""

    __slots__ = ("rid", "waiters", "what")

    def __init__(self, rid: int, waiters: list[_Waiter], what: str) -> None:
        self.rid = rid
        self.waiters = waiters
        self.what = what  # for errors


class Channel:
    """Request/reply multiplexing over ``conn``; ``name`` appears in errors.

    :meth:`request` returns ``(status, body)`` exactly as the other side
    answered; interpreting error replies is the caller's business. Broken
    connections, timeouts and garbage raise :class:`ConnectionLost`,
    :class:`RequestTimeout` and :class:`ProtocolError`; once broken, the
    channel fails every later request at once.

    Each exchange carries its own ``timeout`` deadline, unless ``watched``:
    then its owner calls :meth:`expire_overdue` now and then instead, which
    saves a cancel scope per request (several microseconds each) on
    channels that have an owner task anyway, as peer links do.

    A relayed request may also be completed without a task: see
    :meth:`notify`, :meth:`send_nowait` and :meth:`read_nowait`, through
    which a node's reactor drives a peer link from its own loop. What those
    leave to be written waits in a task of ``nursery``.
    """

    def __init__(
        self,
        conn: transport.Connection,
        *,
        name: str,
        timeout: float,
        watched: bool = False,
        nursery: trio.Nursery | None = None,
    ) -> None:
        self._conn = conn
        assert isinstance(conn.proto, protocol.ClientConnection), "a channel is the client side of its connection"
        self._proto = conn.proto
        self.name = name
        self.timeout = timeout
        self._watched = watched
        self._pending: dict[int, _Waiter] = {}
        self._outbox: list[list[Any] | bytes] = []  # messages, or messages encoded already (relayed)
        self._flushing = False
        self._reading = False
        self._nursery = nursery
        self.broken: DcacheError | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def request(self, op: str, args: dict[str, Any]) -> tuple[int, Any]:
        [reply] = await self.complete(self.enqueue([(op, args)]))
        return reply

    async def request_many(self, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
        """Send several requests in one frame; their replies in the same order."""
        return await self.complete(self.enqueue(requests))

    async def relay(self, rest: bytes) -> bytes:
        """Send one request given as the rest of its message after the rid
        (op and args, encoded: see :func:`codec.split_single`); return the
        rest of its reply the same way (status and body, encoded).

        An OK reply's body is passed on as the other side encoded it,
        unchecked, when it comes alone in its frame: the node relaying it
        saves decoding and re-encoding a value it only carries. Anything
        else is checked as :meth:`request` checks it."""
        [(_, rest)] = await self.complete(self.enqueue_raw(rest))
        return rest

    def enqueue(self, requests: list[tuple[str, dict[str, Any]]]) -> Ticket:
        """Put requests in the outbox, without waiting: requests enqueued one
        after the other go out in that order. :meth:`complete` sends them (if
        nobody has yet) and waits for their replies."""
        if self.broken is not None:
            raise self._broken_error()
        rid = self._proto.new_rids(len(requests))
        waiters = []
        for i, (op, args) in enumerate(requests):
            waiter = _Waiter()
            self._pending[rid + i] = waiter
            self._outbox.append([rid + i, op, args])
            waiters.append(waiter)
        return Ticket(rid, waiters, requests[0][0] if len(requests) == 1 else f"{len(requests)} requests")

    def enqueue_raw(self, rest: bytes) -> Ticket:
        """:meth:`enqueue` for one request encoded but for its rid (see :meth:`relay`)."""
        if self.broken is not None:
            raise self._broken_error()
        rid = self._proto.new_rids()
        waiter = _Waiter(raw=True)
        self._pending[rid] = waiter
        self._outbox.append(codec.message(rid, rest))
        return Ticket(rid, [waiter], "relayed request")

    async def complete(self, ticket: Ticket) -> list[tuple[int, Any]]:
        """Send what waits in the outbox, wait for ``ticket``'s replies and
        return them in order: (status, body), or for a relayed request (OK,
        the rest of the reply, encoded). Raises as :meth:`request` does."""
        try:
            await self._exchange(ticket.waiters, ticket.what)
        finally:
            self.release(ticket)
        results: list[tuple[int, Any]] = []
        for waiter in ticket.waiters:
            if waiter.status == _FAILED:
                raise self._broken_error()
            results.append((waiter.status, waiter.body))  # type: ignore[arg-type]
        return results

    # -- completion without a task (a node's reactor drives these) ------------------------

    def notify(self, ticket: Ticket, callback: Callable[[bytes | None], None]) -> bool:
        """Have ``callback`` called with the reply to ``ticket``, a lone relayed
        request (see :meth:`enqueue_raw`), as soon as it is read, by whoever
        reads: the rest of the reply, encoded, or None if the channel broke.
        The caller then releases the ticket. False (and no call) if replies
        cannot be read without a task here (no plain socket, or no nursery
        for what :meth:`send_nowait` leaves)."""
        if self._nursery is None or self._conn.fileno() < 0 or len(ticket.waiters) != 1:
            return False
        [waiter] = ticket.waiters
        assert waiter.raw and waiter.status is None
        waiter.callback = callback
        return True

    def fileno(self) -> int:
        """The connection's socket, for a loop that reads it with :meth:`read_nowait` when it is ready."""
        return self._conn.fileno()

    def send_nowait(self) -> None:
        """Send what waits in the outbox now, unless a write is under way (it
        takes the outbox along); what the socket does not take at once is
        written by a task of the channel's nursery."""
        if self._flushing or not self._outbox or self.broken is not None:
            return
        batch, self._outbox = self._outbox, []
        frames = self._frames(batch)
        try:
            left = self._conn.send_nowait(frames[0])
        except ConnectionClosed as exc:
            self.fail(ConnectionLost(f"lost the connection to {self.name}: {exc}"))
            return
        if left is not None or len(frames) > 1:
            assert self._nursery is not None
            self._flushing = True
            self._nursery.start_soon(self._send_rest, left, frames[1:])

    def _frames(self, batch: list[Any]) -> list[bytes]:
        """``batch`` as frames the other side takes: one, unless it would be
        over the message limit (a node handing a large shard over queues
        several large messages at once): then in halves, in order."""
        payload = codec.encode_frame(batch)
        if len(payload) <= self._proto.max_message or len(batch) == 1:
            return [self._proto.frame(payload)]
        half = len(batch) // 2
        return self._frames(batch[:half]) + self._frames(batch[half:])

    async def _send_rest(self, left: tuple[bytes, bool] | None, frames: list[bytes]) -> None:
        try:
            if left is not None:
                await self._conn.send_rest(*left)
            for frame in frames:
                await self._conn.send_raw(frame, shield=True)
            while self._outbox:
                batch, self._outbox = self._outbox, []
                for frame in self._frames(batch):
                    await self._conn.send_raw(frame, shield=True)
        except ConnectionClosed as exc:
            self.fail(ConnectionLost(f"lost the connection to {self.name}: {exc}"))
        finally:
            self._flushing = False

    def read_nowait(self) -> bool:
        """Read what the socket holds now and hand the replies to their
        waiters, unless a task is reading (then say so: False). A broken
        connection or a bad reply fails the channel."""
        if self._reading:
            return False
        if self.broken is not None:
            return True
        try:
            payloads, answer = self._conn.receive_nowait()
        except ConnectionClosed as exc:
            self.fail(ConnectionLost(f"lost the connection to {self.name}: {exc}"))
            return True
        if answer:  # a pong: rare (only an idle link is pinged), so a task may write it
            assert self._nursery is not None
            self._nursery.start_soon(self._send_rest, (answer, False), [])
        try:
            self._dispatch(payloads)
        except ProtocolError as exc:
            self.fail(exc)
        return True

    def release(self, ticket: Ticket) -> None:
        """Stop waiting for ``ticket``'s replies (done, or given up): a late reply is dropped."""
        for i in range(len(ticket.waiters)):
            self._pending.pop(ticket.rid + i, None)
        if not self._reading and self._pending:
            self._hand_over_reading()

    async def _exchange(self, waiters: list[_Waiter], what: str) -> None:
        if self._watched:
            await self._send_and_wait(waiters)
            return
        try:
            with trio.fail_after(self.timeout):
                await self._send_and_wait(waiters)
        except trio.TooSlowError:
            raise RequestTimeout(f"{what}: no reply from {self.name} within {self.timeout:g} s") from None

    async def _send_and_wait(self, waiters: list[_Waiter]) -> None:
        """Send the outbox if nobody else is, then wait for ``waiters``' replies,
        reading for everyone when nobody else is."""
        if not self._flushing:
            await self._flush(others_in_flight=len(self._pending) > len(waiters))
        for waiter in waiters:
            while waiter.status is None:
                if self._reading:
                    waiter.event = event = trio.Event()
                    await event.wait()
                else:
                    await self._read()

    def expire_overdue(self) -> bool:
        """Fail the channel if a request is still waiting more than ``timeout``
        after a call first saw it waiting; say if it did. Called every
        ``interval``, this fails a silent peer's requests between ``timeout``
        and ``timeout + 2 * interval`` after they were sent, and costs the
        requests themselves nothing (not even reading the clock)."""
        now = trio.current_time()
        for waiter in self._pending.values():
            if waiter.status is None:
                if waiter.since is None:
                    waiter.since = now
                elif now - waiter.since > self.timeout:
                    self.fail(RequestTimeout(f"no reply from {self.name} within {self.timeout:g} s"))
                    return True
        return False

    async def take_waiting(self) -> None:
        """See :meth:`transport.Connection.take_waiting`; only while nothing is in flight."""
        assert not self._pending
        await self._conn.take_waiting()

    async def aclose(self) -> None:
        self.fail(ClosedError(f"the connection to {self.name} was closed"))
        await self._conn.aclose()

    def _broken_error(self) -> DcacheError:
        """A fresh error saying why the channel broke, chained to the first one:
        one exception object is never raised in several tasks at once."""
        broken = self.broken
        assert broken is not None
        fresh = type(broken)(str(broken))
        fresh.__cause__ = broken
        return fresh

    def fail(self, exc: DcacheError) -> None:
        """Mark the channel broken and wake every waiter with ``exc``."""
        if self.broken is None:
            self.broken = exc
        for waiter in list(self._pending.values()):  # a waiter's callback may release others
            if waiter.status is None:
                waiter.status = _FAILED
                waiter.body = self.broken
                waiter.wake()

    async def _flush(self, *, others_in_flight: bool) -> None:
        self._flushing = True
        try:
            if others_in_flight:
                # Callers woken by the same read are about to queue requests:
                # let them, so they share this frame and this write. Nothing
                # may cancel a flush: the outbox holds other callers' requests.
                await trio.lowlevel.cancel_shielded_checkpoint()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                for frame in self._frames(batch):
                    await self._conn.send_raw(frame, shield=True)
        except ConnectionClosed as exc:
            self.fail(ConnectionLost(f"lost the connection to {self.name}: {exc}"))
            raise self._broken_error() from None
        finally:
            self._flushing = False

    async def _read(self) -> None:
        self._reading = True
        try:
            # Requests we wait for may still be in the outbox: give the
            # writer a few scheduler passes (trio may run us first), and do
            # not busy-poll while it is still writing, since the replies
            # cannot come before it is done. Never wait for it, though: it
            # may be blocked on a full socket until we read.
            if self._flushing:
                for _ in range(FLUSH_PASSES):
                    await trio.lowlevel.checkpoint()
                    if not self._flushing:
                        break
            payloads = await self._conn.receive(poll=not self._flushing)
        except ConnectionClosed as exc:
            self.fail(ConnectionLost(f"lost the connection to {self.name}: {exc}"))
            raise self._broken_error() from None
        finally:
            self._reading = False
        try:
            self._dispatch(payloads)
        except ProtocolError as exc:
            self.fail(exc)
            raise self._broken_error() from None

    def _dispatch(self, payloads: list[bytes]) -> None:
        """Hand each reply in ``payloads`` to its waiter; ProtocolError for garbage."""
        pending = self._pending
        for payload in payloads:
            split = codec.split_single(payload)
            if split is not None:
                rid, at = split
                waiter = pending.get(rid)
                if waiter is not None and waiter.raw and payload[at] == _OK:
                    waiter.status = _OK
                    waiter.body = payload[at:]
                    waiter.wake()
                    continue
            replies = self._proto.replies(payload, self.name)
            for rid, status, body in replies:
                waiter = pending.get(rid)
                if waiter is not None:
                    waiter.status = status
                    waiter.body = codec.encode_rest(status, body) if waiter.raw else body
                    waiter.wake()

    def _hand_over_reading(self) -> None:
        for waiter in self._pending.values():
            if waiter.status is None and waiter.event is not None:
                waiter.event.set()
                return
