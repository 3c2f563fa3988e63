"""Persistent links from this node to every other member.

One WebSocket connection per peer, multiplexing every forwarded request (a
:class:`dcache.mux.Channel`), kept open by a task per peer that reconnects
with jittered exponential backoff and pings while idle so a dead peer is
noticed even when nobody is forwarding to it. What requests mean is the
router's business; this module only carries them.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import __version__, codec, transport, wsframe
from .errors import (
    ConnectionLost,
    DcacheError,
    PeerUnavailable,
    ProtocolError,
    RequestTimeout,
)
from .mux import Channel, Ticket
from .protocol import hello_args

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0
PING_INTERVAL = 1.0
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 2.0
WAIT_FOR_LINK = 1.0  # how long a forward waits for a link that is (re)connecting
MAX_IN_FLIGHT = 256  # forwarded batches in flight per link


@dataclass(slots=True)
class _Link:
    node_id: str
    channel: Channel | None = None
    up: trio.Event | None = None
    cancel: trio.CancelScope | None = None
    state: str = "connecting"
    removed: bool = False
    failures: int = 0
    forwarded: int = 0
    in_flight: int = 0  # batches sent and not yet answered
    queue: trio.lowlevel.ParkingLot | None = None  # forwards waiting for one of them to finish
    waiting: deque[Forward] = field(default_factory=deque)  # submitted while the link was down, in order


class PeerLinks:
    """Links to the current peers; call :meth:`update` with each new member set.

    :meth:`run` owns the nursery the link tasks live in.
    """

    def __init__(
        self,
        *,
        node_id: str,
        max_frame_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES,
        poll: float | None = None,
        token: Callable[[], str | None] = lambda: None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.node_id = node_id
        self._token = token  # the peer token to say hello with (read at each connection: tokens can be rotated)
        self._tls = tls
        self._poll = poll
        self._max_frame_bytes = max_frame_bytes
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def update(self, members: tuple[str, ...]) -> None:
        """Open links to new members and close links to members that left."""
        assert self._nursery is not None, "PeerLinks.run must be started first"
        wanted = set(members) - {self.node_id}
        for node_id in list(self._links):
            if node_id not in wanted:
                link = self._links.pop(node_id)
                link.removed = True
                if link.cancel is not None:
                    link.cancel.cancel()
                if link.channel is not None:
                    link.channel.fail(PeerUnavailable(f"{node_id} left the cluster"))
                _fail_waiting(link, f"{node_id} left the cluster")
        for node_id in sorted(wanted - self._links.keys()):
            link = _Link(node_id, up=trio.Event(), queue=trio.lowlevel.ParkingLot())
            self._links[node_id] = link
            self._nursery.start_soon(self._maintain, link)

    def states(self) -> dict[str, str]:
        return {node_id: link.state for node_id, link in self._links.items()}

    async def forward(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
        """Send requests to ``node_id`` in one frame; return its replies in order.

        Raises PeerUnavailable if the link is down and does not come up
        within :data:`WAIT_FOR_LINK`, or breaks while the requests are out.
        Waits its turn while the link has :data:`MAX_IN_FLIGHT` batches out.
        """
        await self.room(node_id)
        return await self.submit(node_id, requests).wait()  # type: ignore[return-value]

    async def relay(self, node_id: str, rest: bytes) -> bytes:
        """Send one request, encoded but for its rid, to ``node_id``; return
        its reply the same way (see :meth:`Channel.relay`). Raises as
        :meth:`forward` does."""
        await self.room(node_id)
        return await self.submit_raw(node_id, rest).wait()  # type: ignore[return-value]

    def submit(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> Forward:
        """Hand requests to the link to ``node_id`` now, without waiting:
        requests submitted one after the other reach the peer in that order.
        :meth:`Forward.wait` returns their replies."""
        return Forward(self, node_id, requests, None)

    def submit_raw(self, node_id: str, rest: bytes) -> Forward:
        """:meth:`submit` for one request encoded but for its rid; its reply likewise."""
        return Forward(self, node_id, None, rest)

    def session(self, node_id: str) -> object | None:
        """The link to ``node_id`` as it is now, if it is up: the same object
        for as long as that connection lasts, another once it reconnects
        (what went over one connection may not have reached the peer).
        None if the link is down."""
        link = self._links.get(node_id)
        if link is None or link.state != "up" or link.channel is None or link.channel.broken is not None:
            return None
        return link.channel

    async def linked(self, node_id: str) -> bool:
        """Whether the link to ``node_id`` is up, waiting up to
        :data:`WAIT_FOR_LINK` for it if it is (re)connecting."""
        link = self._links.get(node_id)
        if link is None:
            return False
        if link.state != "up":
            assert link.up is not None
            with trio.move_on_after(WAIT_FOR_LINK):
                await link.up.wait()
        return link.state == "up"

    async def room(self, node_id: str) -> None:
        """Wait while the link to ``node_id`` has :data:`MAX_IN_FLIGHT` batches out."""
        link = self._links.get(node_id)
        if link is not None:
            queue = link.queue
            assert queue is not None
            while link.in_flight >= MAX_IN_FLIGHT:
                await queue.park()

    def crowded(self, node_ids: Iterable[str]) -> str | None:
        """One of ``node_ids`` whose link has :data:`MAX_IN_FLIGHT` batches out, if any."""
        for node_id in node_ids:
            link = self._links.get(node_id)
            if link is not None and link.in_flight >= MAX_IN_FLIGHT:
                return node_id
        return None

    async def _maintain(self, link: _Link) -> None:
        backoff = BACKOFF_INITIAL
        with trio.CancelScope() as scope:
            link.cancel = scope
            while not link.removed:
                try:
                    channel = await self._connect(link.node_id)
                except DcacheError as exc:
                    link.failures += 1
                    _fail_waiting(link, f"{link.node_id} does not answer: {exc}")
                    if link.failures == 1 or link.failures % 50 == 0:
                        log.warning("peer %s unreachable (%s); retrying", link.node_id, exc)
                    link.state = "down"
                    await trio.sleep(backoff * random.uniform(0.5, 1.5))
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                if link.failures:
                    log.info("peer %s reachable again", link.node_id)
                else:
                    log.info("linked to peer %s", link.node_id)
                link.failures = 0
                backoff = BACKOFF_INITIAL
                link.channel = channel
                link.state = "up"
                while link.waiting:  # in the order they were submitted
                    link.waiting.popleft().attach(channel)
                assert link.up is not None
                link.up.set()
                try:
                    await self._keep_alive(channel)
                finally:
                    link.up = trio.Event()
                    link.state = "down"
                    with trio.CancelScope(shield=True):
                        await channel.aclose()
                log.warning("link to peer %s lost (%s); reconnecting", link.node_id, channel.broken)

    async def _connect(self, node_id: str) -> Channel:
        conn = await transport.connect(
            node_id,
            max_message=self._max_frame_bytes,
            default_port=0,
            timeout=CONNECT_TIMEOUT,
            mask_key=wsframe.NULL_MASK,
            poll=self._poll,
            tls=self._tls,
        )
        # The link's keep-alive task times requests out (see _keep_alive).
        channel = Channel(conn, name=f"peer {node_id}", timeout=REQUEST_TIMEOUT, watched=True, nursery=self._nursery)
        hello = hello_args(f"dcache-node/{__version__}", peer=self.node_id, token=self._token())
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                status, body = await channel.request("hello", hello)
        except trio.TooSlowError:
            await conn.aclose()
            raise RequestTimeout(f"{node_id} did not answer our hello within {CONNECT_TIMEOUT:g} s") from None
        except DcacheError:
            await conn.aclose()
            raise
        if status != codec.Status.OK:
            await conn.aclose()
            raise ProtocolError(f"{node_id} refused our hello: {body[1]}")
        if isinstance(body, dict) and body.get("node") not in (None, node_id):
            log.warning("peer at %s calls itself %s", node_id, body.get("node"))
        return channel

    async def _keep_alive(self, channel: Channel) -> None:
        """Return when the channel breaks or a request on it is overdue; ping it while it is idle."""
        while channel.broken is None:
            await trio.sleep(PING_INTERVAL)
            if channel.expire_overdue():
                return
            if channel.broken is None and channel.in_flight == 0:
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        await channel.request("ping", {})
                except trio.TooSlowError:
                    channel.fail(RequestTimeout(f"no reply to a ping from {channel.name} within {REQUEST_TIMEOUT:g} s"))
                    return
                except DcacheError:
                    return


def _fail_waiting(link: _Link, why: str) -> None:
    """Fail the forwards waiting for ``link`` to come up: it will not, soon."""
    while link.waiting:
        forward = link.waiting.popleft()
        forward._error = PeerUnavailable(why)
        assert forward._attached is not None
        forward._attached.set()


class Forward:
    """Requests handed to a peer link (see :meth:`PeerLinks.submit`), and the
    wait for their replies. Submitted while the link is down, they go out in
    order once it comes back (within :data:`WAIT_FOR_LINK`)."""

    __slots__ = (
        "_links",
        "_link",
        "node_id",
        "_requests",
        "_rest",
        "_channel",
        "_ticket",
        "_error",
        "_attached",
        "_counted",
        "_notified",
    )

    def __init__(
        self, links: PeerLinks, node_id: str, requests: list[tuple[str, dict[str, Any]]] | None, rest: bytes | None
    ) -> None:
        self._links = links
        self.node_id = node_id
        self._requests = requests
        self._rest = rest
        self._channel: Channel | None = None
        self._ticket: Ticket | None = None
        self._error: PeerUnavailable | None = None
        self._attached: trio.Event | None = None
        self._counted = False
        self._notified = False
        self._link = link = links._links.get(node_id)
        if link is None:
            self._error = PeerUnavailable(f"{node_id} is not a member")
            return
        channel = link.channel
        if channel is not None and channel.broken is None:
            self.attach(channel)
        elif link.failures:  # it was tried since and did not answer: down, not reconnecting
            self._error = PeerUnavailable(f"{node_id} does not answer")
        else:
            self._attached = trio.Event()
            link.waiting.append(self)

    def attach(self, channel: Channel) -> None:
        """Put the requests in ``channel``'s outbox (the link is up)."""
        link = self._link
        assert link is not None
        try:
            if self._rest is not None:
                self._ticket = channel.enqueue_raw(self._rest)
            else:
                assert self._requests is not None
                self._ticket = channel.enqueue(self._requests)
        except DcacheError as exc:
            self._error = PeerUnavailable(f"{self.node_id}: {exc}")
        else:
            self._channel = channel
            link.in_flight += 1
            self._counted = True
        if self._attached is not None:
            self._attached.set()

    def notify(self, callback: Callable[[bytes | None], None]) -> Channel | None:
        """For a request handed over encoded (:meth:`PeerLinks.submit_raw`) on a
        link that is up: have ``callback`` called with the rest of its reply
        as soon as whoever reads the link reads it, or with None if the link
        fails first (:meth:`wait` then says why, as it would have). Returns
        the link's channel: the caller sends its outbox
        (:meth:`Channel.send_nowait`) and reads it when its socket is ready
        (:meth:`Channel.read_nowait`). None, and no call, if the forward
        cannot be completed so (the link is not up, or not over a plain
        socket): then :meth:`wait` as usual."""
        channel, ticket, link = self._channel, self._ticket, self._link
        if self._rest is None or channel is None or ticket is None or link is None:
            return None
        if not channel.notify(ticket, callback):
            return None
        self._notified = True
        link.forwarded += 1
        return channel

    async def wait(self) -> list[tuple[int, Any]] | bytes:
        """The replies, in order ((status, body) each), or for a raw request
        the rest of its reply; raises PeerUnavailable."""
        try:
            if self._attached is not None and not self._attached.is_set():
                with trio.move_on_after(WAIT_FOR_LINK):
                    await self._attached.wait()
                if not self._attached.is_set():
                    raise PeerUnavailable(f"no link to {self.node_id}")
            if self._error is not None:
                raise PeerUnavailable(str(self._error)) from self._error
            channel, ticket = self._channel, self._ticket
            assert channel is not None and ticket is not None
            try:
                replies = await channel.complete(ticket)
            except RequestTimeout as exc:
                # A peer silent this long is gone; reconnect rather than wait on it.
                channel.fail(ConnectionLost(str(exc)))
                raise PeerUnavailable(f"{self.node_id}: {exc}") from None
            except DcacheError as exc:
                raise PeerUnavailable(f"{self.node_id}: {exc}") from None
            link = self._link
            assert link is not None
            if not self._notified:  # (counted then)
                link.forwarded += len(replies)
            return replies[0][1] if self._rest is not None else replies
        finally:
            self.release()

    def release(self) -> None:
        """Give up on the replies (done, or the asker went away): idempotent."""
        link = self._link
        if self._counted and link is not None:
            self._counted = False
            link.in_flight -= 1
            if link.queue:
                link.queue.unpark()
        if self._ticket is not None and self._channel is not None:
            self._channel.release(self._ticket)
            self._ticket = None
        if self._attached is not None and not self._attached.is_set() and link is not None:
            try:
                link.waiting.remove(self)
            except ValueError:
                pass
