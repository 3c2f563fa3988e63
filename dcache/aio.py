"""The async Python API on trio: :class:`Client`, :class:`Pipeline` and :class:`ClusterClient`.

:class:`Client` is pipelined: any number of tasks may share one connection.
It has no background tasks; see :mod:`dcache.mux` for how callers share
the connection. The operations are :class:`dcache.client.Operations`, the
same as the blocking client's.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import codec, transport
from .client import (
    CLIENT_NAME,
    DEFAULT_ADDRESS,
    DEFAULT_PORT,
    DEFAULT_SCAN_PAGE,
    DEFAULT_TIMEOUT,
    IDLE_CHECK,
    WATCH_RETRIED,
    WATCH_RETRY_FOR,
    Access,
    Key,
    Operations,
    QueuedOperations,
    WatchEvent,
    WatchRetry,
    _identity,
    _outcome,
    access_for,
    check_timeout,
    is_leaving,
)
from .codec import Limits
from .errors import (
    ClosedError,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RequestError,
    RequestTimeout,
)
from .mux import Channel
from .ops import OPS, Keys
from .protocol import ConnectionClosed, hello_args, limits_from
from .shard import ShardMap


class Client(Operations):
    """An async client for one node; share it between tasks freely.

    Open it with ``async with dcache.connect(address) as client`` or
    ``await Client.connect(address)`` and ``await client.aclose()``. Every
    operation times out after ``timeout`` seconds with :class:`RequestTimeout`.
    """

    def __init__(self, channel: Channel, *, address: str, access: Access | None = None) -> None:
        self._channel = channel
        self.address = address
        self.access = access or Access()
        self.limits = Limits()
        self.server_info: dict[str, Any] = {}
        self._used_at = trio.current_time()
        self._reviving = trio.Lock()

    @property
    def timeout(self) -> float:
        return self._channel.timeout

    @classmethod
    async def connect(
        cls,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Client:
        """Connect to the node at ``address`` (``host:port``, or
        ``wss://host:port`` for TLS), saying hello with ``token`` if the node
        wants one; ``tls`` checks the node's certificate (see
        :func:`dcache.tls_context`; the system's CAs by default)."""
        check_timeout(timeout)
        dial, access = access_for(address, token=token, tls=tls)
        client = cls(await cls._open(dial, timeout, access), address=dial, access=access)
        await client._greet()
        return client

    @staticmethod
    async def _open(address: str, timeout: float, access: Access) -> Channel:
        conn = await transport.connect(
            address, max_message=codec.DEFAULT_MAX_FRAME_BYTES, default_port=DEFAULT_PORT, timeout=timeout, tls=access.tls
        )
        return Channel(conn, name=address, timeout=timeout)

    async def _greet(self) -> None:
        try:
            status, body = await self._channel.request("hello", hello_args(CLIENT_NAME, token=self.access.token))
            self.server_info = _outcome(status, body, _identity)
            self.limits = limits_from(self.server_info)
        except BaseException:
            await self._channel.aclose()
            raise

    async def _live_channel(self) -> Channel:
        """The channel: a new one if the last broke (the node restarted, say),
        and checked first after a pause (see :meth:`SyncClient._revive`): a
        node closes a connection idle too long, and a request must not be
        lost to that."""
        now = trio.current_time()
        broken = self._channel.broken
        if broken is not None and not isinstance(broken, ClosedError):  # lost, not closed by our user: a new one
            async with self._reviving:
                channel = self._channel
                if channel.broken is not None and not isinstance(channel.broken, ClosedError):
                    self._channel = await self._open(self.address, channel.timeout, self.access)
                    await self._greet()
                    await channel.aclose()
        elif now - self._used_at > IDLE_CHECK and not self._channel.in_flight:
            async with self._reviving:
                channel = self._channel
                try:
                    if not channel.in_flight:  # still: another task may have started meanwhile
                        await channel.take_waiting()
                except ConnectionClosed:
                    self._channel = await self._open(self.address, channel.timeout, self.access)
                    await self._greet()
                    await channel.aclose()
        self._used_at = now
        return self._channel

    async def aclose(self) -> None:
        await self._channel.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _call(self, op: str, args: dict[str, Any], decode: Callable[[Any], Any]) -> Any:
        status, body = await (await self._live_channel()).request(op, args)
        return _outcome(status, body, decode)

    def pipeline(self) -> Pipeline:
        """Queue operations and send them in one frame: ``p = client.pipeline();
        p.get("a"); p.set("b", "x"); results = await p.execute()``."""
        return Pipeline(self)

    def scan(self, prefix: Key = "", *, ns: str = "", page: int = DEFAULT_SCAN_PAGE) -> AsyncIterator[bytes]:
        """Every key of ``ns`` that starts with ``prefix``, across the cluster:
        ``async for key in client.scan("user:")`` (see :meth:`scan_page`)."""
        return _scan(self, prefix, ns, page)

    def watch(self, prefix: Key = "", *, ns: str = "", retry_for: float = WATCH_RETRY_FOR) -> AsyncIterator[WatchEvent]:
        """The changes to keys of ``ns`` that start with ``prefix``, from every
        node, as they happen: ``async for event in client.watch("user:")``
        (see :meth:`dcache.SyncClient.watch`)."""
        return _watch(self, prefix, ns, retry_for)


async def _watch(client: Operations, prefix: Key, ns: str, retry_for: float) -> AsyncIterator[WatchEvent]:
    cursor = None
    retry = WatchRetry(retry_for)
    while True:
        try:
            events, cursor = await client.watch_page(cursor, prefix=prefix, ns=ns)
        except WATCH_RETRIED as exc:
            await trio.sleep(retry.after(exc, trio.current_time()))
            continue
        retry.answered()
        for event in events:
            yield event


async def _scan(client: Operations, prefix: Key, ns: str, page: int) -> AsyncIterator[bytes]:
    cursor = None
    while True:
        keys, cursor = await client.scan_page(cursor, prefix=prefix, ns=ns, limit=page)
        for key in keys:
            yield key
        if cursor is None:
            return


class Pipeline(QueuedOperations):
    """Operations queued on a :class:`Client`, sent in one frame by :meth:`execute`."""

    def __init__(self, client: Client) -> None:
        super().__init__(client.limits)
        self._client = client

    async def execute(self, *, raise_on_error: bool = True) -> list[Any]:
        """Send everything queued; return the results in order.

        With ``raise_on_error=False`` a refused operation's place holds its
        :class:`RequestError` instead of raising the first one.
        """
        queued = self._take()
        if not queued:
            return []
        replies = await (await self._client._live_channel()).request_many([(op, args) for op, args, _ in queued])
        return self._results(queued, replies, raise_on_error)


CLUSTER_REFRESH_INTERVAL = 5.0
SEED_ATTEMPTS = 3  # tries through a seed that keeps being replaced, before giving up


class ClusterClient(Operations):
    """An async client that sends each request straight to the node owning its key.

    It learns the members from any node (``members``) and places keys with
    the same shard module the nodes use. A stale map costs nothing worse
    than a hop, as any node forwards what it does not own; the map is
    refreshed every :data:`CLUSTER_REFRESH_INTERVAL` seconds and whenever a
    member cannot be reached. Multi-key requests are split by owner and
    sent concurrently.
    """

    def __init__(self, seed: Client, *, timeout: float) -> None:
        self._seed = seed
        self.timeout = timeout
        self.limits = seed.limits
        self.server_info = seed.server_info
        self.shard_map = ShardMap.build(0, ())
        self._addresses: dict[str, str] = {}
        self._clients: dict[str, Client] = {}
        self._refreshed_at = -math.inf
        self._replacing = trio.Lock()  # one seed replacement at a time
        self._closed = False

    @classmethod
    async def connect(
        cls,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> ClusterClient:
        """Connect through the node at ``address``; ``token`` and ``tls`` as for
        :meth:`Client.connect`, used for every member."""
        client = cls(await Client.connect(address, timeout=timeout, token=token, tls=tls), timeout=timeout)
        try:
            await client.refresh()
        except BaseException:
            await client.aclose()
            raise
        return client

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        for client in [self._seed, *self._clients.values()]:
            await client.aclose()
        self._clients.clear()

    async def refresh(self) -> None:
        """Fetch the members and their addresses again."""
        self._refreshed_at = trio.current_time()
        status, view = await self._via_seed("members", {})
        view = _outcome(status, view, _identity)
        up = {m["node"]: m["client"] for m in view["members"] if m["state"] == "up" and m["client"] and not is_leaving(m)}
        # A change costs milliseconds; a first view of hundreds of members a second: off the loop.
        self.shard_map = await trio.to_thread.run_sync(self.shard_map.changed, view["epoch"], up)
        self._addresses = up
        for node_id in list(self._clients):
            if node_id not in up:
                await self._clients.pop(node_id).aclose()

    async def _member(self, address: str) -> Client:
        access = self._seed.access
        return await Client.connect(address, timeout=self.timeout, token=access.token, tls=access.tls)

    async def _client_for(self, node_id: str) -> Client:
        client = self._clients.get(node_id)
        if client is not None and client._channel.broken is None:
            return client
        address = self._addresses.get(node_id)
        if address is None:
            return self._seed
        try:
            client = await self._member(address)
        except ConnectError:
            return self._seed  # it forwards; the next refresh will tell more
        existing = self._clients.get(node_id)
        if existing is not None and existing._channel.broken is None:  # another task connected meanwhile
            await client.aclose()
            return existing
        self._clients[node_id] = client
        if existing is not None:
            await existing.aclose()  # broken: whatever was waiting on it has failed already
        return client

    async def _request(self, node_id: str, op: str, args: dict[str, Any]) -> tuple[int, Any]:
        client = await self._client_for(node_id)
        if client is self._seed:
            return await self._via_seed(op, args)
        try:
            return await (await client._live_channel()).request(op, args)
        except (ConnectionLost, RequestTimeout, ClosedError, ConnectError):
            # That node is gone or stuck, or a refresh closed its connection
            # meanwhile: the seed forwards, and the map is redone.
            self._refreshed_at = -math.inf
            return await self._via_seed(op, args)

    async def _via_seed(self, op: str, args: dict[str, Any]) -> tuple[int, Any]:
        """Send through the seed; if it is gone, through the member that
        replaces it (one replacement, shared by every task that saw it fail)."""
        for _ in range(SEED_ATTEMPTS):
            seed = self._seed
            try:
                return await (await seed._live_channel()).request(op, args)
            except ClosedError:
                if self._closed:  # closed by our user
                    raise
                # Another task replaced the seed and closed this one: use the new one.
            except (ConnectionLost, RequestTimeout, ConnectError):
                await self._replace_seed(seed)
        raise ConnectionLost("the cluster's members keep going away; no request got through")

    async def _replace_seed(self, broken: Client) -> None:
        """The node this client first reached is gone: carry on through another member."""
        async with self._replacing:
            if self._seed is not broken or self._closed:  # replaced while we waited
                return
            for address in self._addresses.values():
                if address == broken.address:
                    continue
                try:
                    client = await self._member(address)
                except ConnectError:
                    continue
                self._seed = client
                self._refreshed_at = -math.inf
                await broken.aclose()
                return
        raise ConnectionLost("no member of the cluster answers")

    async def _call(self, op: str, args: dict[str, Any], decode: Callable[[Any], Any]) -> Any:
        if trio.current_time() - self._refreshed_at > CLUSTER_REFRESH_INTERVAL:
            await self.refresh()
        spec = OPS[op]
        ns = args.get("ns", "")
        if not self.shard_map.members or spec.keys is Keys.NONE:
            return _outcome(*await self._via_seed(op, args), decode)
        if spec.keys is Keys.ONE:
            return _outcome(*await self._request(self.shard_map.owner(ns, args["key"]), op, args), decode)
        elements = spec.elements(args)
        groups = self.shard_map.group_by_owner(ns, spec.keys_of(args))
        if len(groups) <= 1:
            owner = next(iter(groups), "")
            return _outcome(*await self._request(owner, op, args), decode)
        parts: list[tuple[list[int], Any]] = []
        errors: list[Exception] = []

        async def part(owner: str, positions: list[int]) -> None:
            try:
                reply = await self._request(owner, op, spec.part(args, [elements[i] for i in positions]))
                parts.append((positions, _outcome(*reply, _identity)))
            except (RequestError, ConnectionLost, RequestTimeout, ProtocolError) as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for owner, positions in groups.items():
                nursery.start_soon(part, owner, positions)
        if errors:
            raise errors[0]
        return decode(spec.merged(len(elements), parts))

    def scan(self, prefix: Key = "", *, ns: str = "", page: int = DEFAULT_SCAN_PAGE) -> AsyncIterator[bytes]:
        """Every key of ``ns`` that starts with ``prefix``, across the cluster (see :meth:`Client.scan`)."""
        return _scan(self, prefix, ns, page)

    def watch(self, prefix: Key = "", *, ns: str = "", retry_for: float = WATCH_RETRY_FOR) -> AsyncIterator[WatchEvent]:
        """The changes to keys that start with ``prefix``, from every node (see :meth:`Client.watch`)."""
        return _watch(self, prefix, ns, retry_for)


@asynccontextmanager
async def connect(
    address: str = DEFAULT_ADDRESS,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Client]:
    """``async with dcache.connect("localhost:48000") as client: ...``; see :meth:`Client.connect`."""
    client = await Client.connect(address, timeout=timeout, token=token, tls=tls)
    try:
        yield client
    finally:
        await client.aclose()
