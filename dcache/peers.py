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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from . import __version__, codec, transport, wsframe
from .errors import (
    ConnectionLost,
    DcacheError,
    PeerUnavailable,
    ProtocolError,
    RequestTimeout,
)
from .mux import Channel
from .protocol import hello_args

log = logging.getLogger(__name__)
A = TypeVar("A")
T = TypeVar("T")

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


class PeerLinks:
    """Links to the current peers; call :meth:`update` with each new member set.

    :meth:`run` owns the nursery the link tasks live in.
    """

    def __init__(self, *, node_id: str, max_frame_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.node_id = node_id
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
        for node_id in sorted(wanted - self._links.keys()):
            link = _Link(node_id, up=trio.Event(), queue=trio.lowlevel.ParkingLot())
            self._links[node_id] = link
            self._nursery.start_soon(self._maintain, link)

    def states(self) -> dict[str, str]:
        return {node_id: link.state for node_id, link in self._links.items()}

    def forwarded_counts(self) -> dict[str, int]:
        return {node_id: link.forwarded for node_id, link in self._links.items()}

    async def forward(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
        """Send requests to ``node_id`` in one frame; return its replies in order.

        Raises PeerUnavailable if the link is down and does not come up
        within :data:`WAIT_FOR_LINK`, or breaks while the requests are out.
        """
        return await self._send(node_id, len(requests), Channel.request_many, requests)

    async def relay(self, node_id: str, rest: bytes) -> bytes:
        """Send one request, encoded but for its rid, to ``node_id``; return
        its reply the same way (see :meth:`Channel.relay`). Raises as
        :meth:`forward` does."""
        return await self._send(node_id, 1, Channel.relay, rest)

    async def _send(self, node_id: str, count: int, call: Callable[[Channel, A], Awaitable[T]], arg: A) -> T:
        link = self._links.get(node_id)
        if link is None:
            raise PeerUnavailable(f"{node_id} is not a member")
        channel = link.channel
        if channel is None or channel.broken is not None:
            if link.failures:  # it was tried since and did not answer: down, not reconnecting
                raise PeerUnavailable(f"{node_id} does not answer")
            assert link.up is not None
            with trio.move_on_after(WAIT_FOR_LINK):
                await link.up.wait()
            channel = link.channel
            if channel is None or channel.broken is not None:
                raise PeerUnavailable(f"no link to {node_id}")
        queue = link.queue
        assert queue is not None
        # Room is the rule; a counter costs less than a semaphore per forward.
        while link.in_flight >= MAX_IN_FLIGHT:
            await queue.park()
        link.in_flight += 1
        try:
            try:
                result = await call(channel, arg)
            except RequestTimeout as exc:
                # A peer silent this long is gone; reconnect rather than wait on it.
                channel.fail(ConnectionLost(str(exc)))
                raise PeerUnavailable(f"{node_id}: {exc}") from None
            except DcacheError as exc:
                raise PeerUnavailable(f"{node_id}: {exc}") from None
        finally:
            link.in_flight -= 1
            if queue:
                queue.unpark()
        link.forwarded += count
        return result

    async def _maintain(self, link: _Link) -> None:
        backoff = BACKOFF_INITIAL
        with trio.CancelScope() as scope:
            link.cancel = scope
            while not link.removed:
                try:
                    channel = await self._connect(link.node_id)
                except DcacheError as exc:
                    link.failures += 1
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
        )
        # The link's keep-alive task times requests out (see _keep_alive).
        channel = Channel(conn, name=f"peer {node_id}", timeout=REQUEST_TIMEOUT, watched=True)
        hello = hello_args(f"dcache-node/{__version__}", peer=self.node_id)
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
