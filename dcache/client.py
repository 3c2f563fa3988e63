"""The Python API's common part and its blocking client, :class:`SyncClient`.

Both clients speak the same operations, defined once in :class:`Operations`;
each operation builds a request and a reply decoder and hands them to the
client's ``_call``, a plain blocking call in :class:`SyncClient` and a
coroutine in the async :class:`dcache.aio.Client`.

This module imports no trio: a one-shot command or a plain script that uses
:class:`SyncClient` never loads an event loop.
"""

from __future__ import annotations

import math
import select
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from . import __version__, codec, protocol
from .codec import Limits, Status
from .errors import (
    ClosedError,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RequestError,
    RequestTimeout,
)
from .net import RECEIVE_SIZE, BusyPoll, busy_poll_from_env, connect_error_text, split_address
from .protocol import hello_args, limits_from

if TYPE_CHECKING:
    import ssl

from .security import MAX_TOKEN_BYTES, TlsLayer, client_context, describe_tls_error, split_scheme

DEFAULT_ADDRESS = "localhost:48000"
DEFAULT_PORT = 48000
DEFAULT_TIMEOUT = 10.0
CLIENT_NAME = f"dcache-python/{__version__}"


class _Readiness:
    """Blocks until a non-blocking socket is ready, or raises socket.timeout."""

    def __init__(self, sock: socket.socket, *, writable: bool) -> None:
        self._fd = sock.fileno()
        self._writable = writable
        self._poll = None
        if hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLOUT if writable else select.POLLIN)

    def wait(self, timeout: float) -> None:
        if self._poll is not None:
            ready = bool(self._poll.poll(timeout * 1000))
        else:  # Windows: no poll, and no descriptor limit on select
            fds = [self._fd]
            ready = any(select.select([] if self._writable else fds, fds if self._writable else [], [], timeout)[:2])
        if not ready:
            raise TimeoutError("timed out")


Key = str | bytes
Value = str | bytes


def _as_bytes(data: Key | Value, what: str) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        try:
            return data.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{what} {data!r} is not valid text; pass it as bytes") from None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what} must be str or bytes, not {type(data).__name__}")


MAX_TTL = codec.MAX_TTL_MS // 1000  # seconds: 100 years
IDLE_CHECK = 1.0  # seconds: a SyncClient unused this long checks its connection before a request
MAX_TIMEOUT = 24 * 3600.0  # seconds


def _ttl_ms(ttl: float | None) -> int:
    if ttl is None:
        return 0
    if not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be a positive number of seconds up to {MAX_TTL} (100 years), not {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def check_timeout(timeout: float) -> float:
    """``timeout`` if it is a usable number of seconds, else ValueError."""
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"timeout must be a positive number of seconds up to {MAX_TIMEOUT:g} (a day), not {timeout!r}")
    return timeout


@dataclass(frozen=True, slots=True)
class Access:
    """How a client reaches its nodes: over TLS with ``tls`` (None: plain)
    and saying hello with ``token`` (None: the node wants none)."""

    tls: ssl.SSLContext | None = None
    token: str | None = field(default=None, repr=False)


def access_for(address: str, *, token: str | None, tls: ssl.SSLContext | None) -> tuple[str, Access]:
    """``address`` without its scheme, and the :class:`Access` the scheme and
    arguments ask for: ``wss://`` means TLS (with the system's trusted CAs
    unless ``tls`` says otherwise); ``ws://`` means plain."""
    secure, bare = split_scheme(address)
    if secure is False and tls is not None:
        raise ValueError(f"{address}: ws:// is plain WebSocket; use wss:// (or no scheme) with a TLS context")
    if secure and tls is None:
        tls = client_context()
    if token is not None and (not isinstance(token, str) or not token or len(token.encode()) > MAX_TOKEN_BYTES):
        raise ValueError(f"token must be non-empty text of at most {MAX_TOKEN_BYTES} bytes")
    return bare, Access(tls=tls, token=token)


def is_leaving(member: dict[str, Any]) -> bool:
    """Whether a ``members`` row is a node that is leaving: it owns no shard
    (it hands its own over), so keys are placed over the others."""
    return (member.get("stats") or {}).get("state") == "leaving"


def _identity(body: Any) -> Any:
    return body


def _ttl_seconds(body: Any) -> float | None:
    if body is None:
        return None
    return math.inf if body < 0 else body / 1000


def _count(body: Any) -> int:
    return int(body)


class Entry(NamedTuple):
    """An entry as :meth:`Operations.get_meta` returns it: ``ttl`` in seconds,
    ``math.inf`` without one; ``version`` is what :meth:`Operations.cas` takes."""

    value: bytes
    version: int
    ttl: float


class CasResult(NamedTuple):
    """What :meth:`Operations.cas` did: ``stored`` and the entry's version now
    (the new one if stored; None if the key is missing)."""

    stored: bool
    version: int | None


def _entry(body: Any) -> Entry | None:
    if body is None:
        return None
    value, version, ttl_ms = body
    return Entry(value, version, math.inf if ttl_ms < 0 else ttl_ms / 1000)


def _cas(body: Any) -> CasResult:
    return CasResult(bool(body[0]), body[1])


MAX_INCR = 2**63 - 1
DEFAULT_SCAN_PAGE = 100
MAX_SCAN_PAGE = 1000  # the node's limit per page


class WatchEvent(NamedTuple):
    """One change seen by :meth:`SyncClient.watch`: ``kind`` is ``set``,
    ``delete``, ``expire`` or ``evict`` for a key; ``lagged`` when the
    watcher fell so far behind ``node`` that ``missed`` events were dropped
    before it read them (-1: how many is not known); ``restarted`` when
    ``node`` restarted (what changed on it meanwhile is unknown)."""

    kind: str
    key: bytes
    ns: str
    node: str
    missed: int = 0


DEFAULT_WATCH_WAIT = 0.1  # seconds each node holds a watch request while it has nothing to say
WATCH_RETRY_FOR = 30.0  # seconds a watch keeps trying to reach its node before it gives up
WATCH_BACKOFF = (0.1, 0.25, 0.5, 1.0)


WATCH_RETRIED = (ConnectError, ConnectionLost, RequestTimeout)  # what a watch retries, for a while


class WatchRetry:
    """When a watch that lost its node asks again: :meth:`after` gives the
    wait before the next attempt, or raises ConnectError once the node has
    been gone ``retry_for`` seconds; :meth:`answered` starts afresh."""

    def __init__(self, retry_for: float) -> None:
        self.retry_for = retry_for
        self.failing_since: float | None = None
        self.attempt = 0

    def after(self, exc: Exception, now: float) -> float:
        if self.failing_since is None:
            self.failing_since = now
        if now - self.failing_since > self.retry_for:
            raise ConnectError(f"the watch lost its node for more than {self.retry_for:g} s: {exc}") from exc
        self.attempt += 1
        return WATCH_BACKOFF[min(self.attempt - 1, len(WATCH_BACKOFF) - 1)]

    def answered(self) -> None:
        self.failing_since, self.attempt = None, 0


def _watch_events(body: dict[str, Any], ns: str) -> list[WatchEvent]:
    events = [
        WatchEvent("restarted" if restarted else "lagged", b"", ns, node, missed) for node, missed, restarted in body["lost"]
    ]
    events.extend(WatchEvent(kind, key, ns, node) for node, kind, key in body["events"])
    return events


def _flushed(body: Any) -> int:
    return int(body["flushed"])


def _page(body: Any) -> tuple[list[bytes], Any]:
    return body["keys"], body["cursor"]


def _by(by: int) -> int:
    if isinstance(by, bool) or not isinstance(by, int) or not -MAX_INCR <= by <= MAX_INCR:
        raise ValueError(f"by must be an integer that fits in 64 bits, not {by!r}")
    return by


class Operations:
    """The cache operations both clients offer.

    Keys and values are ``bytes``; ``str`` is accepted and sent as UTF-8.
    ``ns`` selects a namespace (default ``""``); the same key in two
    namespaces names two entries. ``ttl`` is in seconds; ``None`` keeps the
    entry until it is deleted.
    """

    limits: Limits

    def _call(self, op: str, args: dict[str, Any], decode: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def _key(self, key: Key) -> bytes:
        data = _as_bytes(key, "key")
        if not data:
            raise ValueError("key must not be empty")
        if len(data) > self.limits.max_key_bytes:
            raise RequestError(
                codec.ErrorCode.KEY_TOO_LARGE,
                f"key of {len(data)} bytes exceeds the limit of {self.limits.max_key_bytes}",
            )
        return data

    def _value(self, value: Value) -> bytes:
        data = _as_bytes(value, "value")
        if len(data) > self.limits.max_value_bytes:
            raise RequestError(
                codec.ErrorCode.VALUE_TOO_LARGE,
                f"value of {len(data)} bytes exceeds the limit of {self.limits.max_value_bytes}",
            )
        return data

    def _keyed(self, key: Key, ns: str) -> dict[str, Any]:
        return {"ns": ns, "key": self._key(key)} if ns else {"key": self._key(key)}

    def get(self, key: Key, *, ns: str = "") -> Any:
        """The value of ``key``, or None if it is missing or expired."""
        return self._call("get", self._keyed(key, ns), _identity)

    def set(self, key: Key, value: Value, *, ttl: float | None = None, ns: str = "") -> Any:
        """Store ``value`` under ``key``; returns the entry's new version number."""
        return self._call("set", self._entry_args(key, value, ttl, ns), _identity)

    def delete(self, key: Key, *, ns: str = "") -> Any:
        """Remove ``key``; True if it existed."""
        return self._call("delete", self._keyed(key, ns), bool)

    def get_meta(self, key: Key, *, ns: str = "") -> Any:
        """``key``'s :class:`Entry` (value, version, ttl), or None if it is missing."""
        return self._call("getmeta", self._keyed(key, ns), _entry)

    def add(self, key: Key, value: Value, *, ttl: float | None = None, ns: str = "") -> Any:
        """Store ``value`` only if ``key`` is missing; its new version, or None if the key was there."""
        return self._call("add", self._entry_args(key, value, ttl, ns), _identity)

    def replace(self, key: Key, value: Value, *, ttl: float | None = None, ns: str = "") -> Any:
        """Store ``value`` only if ``key`` is there; its new version, or None if the key was missing."""
        return self._call("replace", self._entry_args(key, value, ttl, ns), _identity)

    def cas(self, key: Key, value: Value, *, version: int, ttl: float | None = None, ns: str = "") -> Any:
        """Store ``value`` only if ``key``'s version is still ``version`` (from
        :meth:`get_meta` or a write's return); a :class:`CasResult`."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an entry's version (an integer from 0), not {version!r}")
        args = self._entry_args(key, value, ttl, ns)
        args["version"] = version
        return self._call("cas", args, _cas)

    def incr(self, key: Key, by: int = 1, *, ns: str = "") -> Any:
        """Add ``by`` to the integer at ``key`` (a missing key counts as 0) and
        return the result; the entry keeps its TTL. RequestError
        ``not_integer`` if the value is not an integer."""
        args = self._keyed(key, ns)
        args["by"] = _by(by)
        return self._call("incr", args, _identity)

    def decr(self, key: Key, by: int = 1, *, ns: str = "") -> Any:
        """:meth:`incr` by ``-by``."""
        return self.incr(key, -_by(by), ns=ns)

    def getdel(self, key: Key, *, ns: str = "") -> Any:
        """Remove ``key`` and return its value, or None if it was missing."""
        return self._call("getdel", self._keyed(key, ns), _identity)

    def expire(self, key: Key, ttl: float, *, ns: str = "") -> Any:
        """Let ``key`` live ``ttl`` more seconds; False if it is missing."""
        args = self._keyed(key, ns)
        args["ttl_ms"] = _ttl_ms(ttl)
        return self._call("expire", args, bool)

    def persist(self, key: Key, *, ns: str = "") -> Any:
        """Remove ``key``'s TTL; False if it is missing."""
        return self._call("persist", self._keyed(key, ns), bool)

    def scan_page(self, cursor: Any = None, *, prefix: Key = "", ns: str = "", limit: int = DEFAULT_SCAN_PAGE) -> Any:
        """One page of a walk over the keys of ``ns`` that start with
        ``prefix``, across the cluster: ``(keys, cursor)``; pass the cursor
        back for the next page, until it is None. A key present for the whole
        walk is listed once, unless shards move meanwhile (nodes join or
        leave). ``scan()`` walks every page for you."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SCAN_PAGE:
            raise ValueError(f"limit must be an integer from 1 to {MAX_SCAN_PAGE}, not {limit!r}")
        args: dict[str, Any] = {"cursor": cursor, "limit": limit}
        if prefix:
            args["prefix"] = _as_bytes(prefix, "prefix")
        if ns:
            args["ns"] = ns
        return self._call("scan", args, _page)

    def watch_page(self, cursor: Any = None, *, prefix: Key = "", ns: str = "", wait: float = DEFAULT_WATCH_WAIT) -> Any:
        """One round of a watch: ``(events, cursor)``, the :class:`WatchEvent`
        list since ``cursor`` (None: from now), from every node, waiting up
        to ``wait`` seconds for some. ``watch()`` loops on it for you."""
        args: dict[str, Any] = {"cursor": cursor, "wait_ms": round(wait * 1000), "limit": MAX_SCAN_PAGE}
        if prefix:
            args["prefix"] = _as_bytes(prefix, "prefix")
        if ns:
            args["ns"] = ns
        return self._call("watch", args, lambda body: (_watch_events(body, ns), body["cursor"]))

    def _entry_args(self, key: Key, value: Value, ttl: float | None, ns: str) -> dict[str, Any]:
        args = self._keyed(key, ns)
        args["value"] = self._value(value)
        if ttl is not None:
            args["ttl_ms"] = _ttl_ms(ttl)
        return args

    def ttl(self, key: Key, *, ns: str = "") -> Any:
        """Seconds left to live: ``math.inf`` without a TTL, None if the key is missing."""
        return self._call("ttl", self._keyed(key, ns), _ttl_seconds)

    def mget(self, keys: Iterable[Key], *, ns: str = "") -> Any:
        """Values of many keys in one round trip, None for each missing one."""
        return self._call("mget", self._multi(keys, ns), _identity)

    def mset(self, items: Mapping[Key, Value] | Iterable[tuple[Key, Value]], *, ttl: float | None = None, ns: str = "") -> Any:
        """Store many entries in one round trip; returns their versions in order."""
        pairs = items.items() if isinstance(items, Mapping) else items
        args: dict[str, Any] = {"items": [[self._key(k), self._value(v)] for k, v in pairs]}
        self._fits(sum(len(k) + len(v) + 16 for k, v in args["items"]))
        if ns:
            args["ns"] = ns
        if ttl is not None:
            args["ttl_ms"] = _ttl_ms(ttl)
        return self._call("mset", args, _identity)

    def mdelete(self, keys: Iterable[Key], *, ns: str = "") -> Any:
        """Remove many keys; returns how many existed."""
        return self._call("mdelete", self._multi(keys, ns), _count)

    def stats(self) -> Any:
        """Counters of the node this client is connected to."""
        return self._call("stats", {}, _identity)

    def namespace_stats(self, ns: str) -> Any:
        """Keys and bytes of namespace ``ns`` across the cluster:
        ``{"keys", "data_bytes", "nodes": {node: {"keys", "data_bytes"}}}``."""
        return self._call("nsstats", {"ns": ns}, _identity)

    def flush(self, ns: str) -> Any:
        """Delete every key of namespace ``ns`` on every node; how many there were."""
        return self._call("flush", {"ns": ns}, _flushed)

    def flush_all(self) -> Any:
        """Delete every key of every namespace on every node; how many there were."""
        return self._call("flush", {"all": True}, _flushed)

    def ping(self) -> Any:
        return self._call("ping", {}, _identity)

    def members(self) -> Any:
        """The cluster as the connected node sees it: ``{"epoch", "members": [...]}``,
        each member with its ``node`` id, ``client`` address, ``state``,
        ``shards`` owned and its ``stats``."""
        return self._call("members", {}, _identity)

    def drain(self) -> Any:
        """Have the connected node hand every shard with its entries to the
        other nodes, leave the cluster and stop; returns what it moved
        (``shards_moved``, ``entries_moved``) and what it could not
        (``shards_left_behind``, ``entries_left_behind``). Takes up to the
        node's ``--drain-timeout``: give the client a timeout longer than that."""
        return self._call("drain", {}, _identity)

    def _multi(self, keys: Iterable[Key], ns: str) -> dict[str, Any]:
        args: dict[str, Any] = {"keys": [self._key(k) for k in keys]}
        self._fits(sum(len(k) + 8 for k in args["keys"]))
        if ns:
            args["ns"] = ns
        return args

    def _fits(self, size: int) -> None:
        """Refuse a request of about ``size`` bytes the node would not take in
        one frame, before sending it (the node could only close the connection)."""
        limit = self.limits.max_frame_bytes
        if size > limit:
            raise RequestError(
                codec.ErrorCode.FRAME_TOO_LARGE,
                f"the request is about {size:,} bytes, over the node's limit of {limit:,} per frame; send it in parts",
            )


def _outcome(status: int, body: Any, decode: Callable[[Any], Any]) -> Any:
    if status == Status.ERROR:
        raise RequestError(*body)
    return decode(body)


class QueuedOperations(Operations):
    """Operations queued to go out together; each queued method returns the
    queue, so calls can be chained. The async and the blocking pipeline
    differ only in how they send."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._queued: list[tuple[str, dict[str, Any], Callable[[Any], Any]]] = []

    def __len__(self) -> int:
        return len(self._queued)

    def _call(self, op: str, args: dict[str, Any], decode: Callable[[Any], Any]) -> Any:
        self._queued.append((op, args, decode))
        return self

    def _take(self) -> list[tuple[str, dict[str, Any], Callable[[Any], Any]]]:
        queued, self._queued = self._queued, []
        return queued

    @staticmethod
    def _results(
        queued: list[tuple[str, dict[str, Any], Callable[[Any], Any]]],
        replies: list[tuple[int, Any]],
        raise_on_error: bool,
    ) -> list[Any]:
        results: list[Any] = []
        for (_, _, decode), (status, body) in zip(queued, replies):
            try:
                results.append(_outcome(status, body, decode))
            except RequestError as exc:
                if raise_on_error:
                    raise
                results.append(exc)
        return results


class SyncPipeline(QueuedOperations):
    """Operations queued on a :class:`SyncClient`, sent in one frame by :meth:`execute`."""

    def __init__(self, client: SyncClient) -> None:
        super().__init__(client.limits)
        self._client = client

    def execute(self, *, raise_on_error: bool = True) -> list[Any]:
        """Send everything queued; return the results in order.

        With ``raise_on_error=False`` a refused operation's place holds its
        :class:`RequestError` instead of raising the first one.
        """
        queued = self._take()
        if not queued:
            return []
        replies = self._client._exchange([(op, args) for op, args, _ in queued])
        return self._results(queued, replies, raise_on_error)


class SyncClient(Operations):
    """A blocking client for scripts and the one-shot CLI; one caller at a time.

    ``with SyncClient("localhost:48000") as client: client.set("k", "v")``

    While it waits for a reply it spins on the socket for up to
    ``busy_poll`` seconds before sleeping (``DCACHE_BUSY_POLL_US`` by
    default; 0 turns it off): about twice the requests per second, for a
    busy CPU while they run. In a threaded program, 0 also spares the other
    threads a longer wait for the interpreter lock while one spins.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        busy_poll: float | None = None,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self._dial, self._access = access_for(address, token=token, tls=tls)
        self.timeout = check_timeout(timeout)
        self.limits = Limits()
        self._poller = BusyPoll(busy_poll_from_env() if busy_poll is None else busy_poll)
        self._closed = False
        self._connect()

    def _connect(self) -> None:
        self._ready: list[bytes] = []
        self._sock, self._proto = self._open(self._dial, self.timeout)
        self._used_at = time.monotonic()
        try:
            self.server_info = self._call("hello", hello_args(CLIENT_NAME, token=self._access.token), _identity)
            self.limits = limits_from(self.server_info)
        except BaseException:
            self._sock.close()
            raise

    def _revive(self) -> None:
        """Before the first request after a pause: take in what the node sent
        meanwhile (answering its pings), and if it has closed the connection,
        as a node does with one idle too long, open a new one. Nothing of the
        request is sent yet, so nothing can be lost or done twice."""
        try:
            while True:
                self._absorb(self._sock.recv(RECEIVE_SIZE))
        except BlockingIOError:
            return
        except (ConnectionLost, ProtocolError, OSError):
            self._sock.close()
            self._connect()

    def _open(self, address: str, timeout: float) -> tuple[socket.socket, protocol.ClientConnection]:
        host, port = split_address(address, DEFAULT_PORT)
        try:
            # An ASCII name as bytes: the socket module would load the IDNA codec for text.
            sock = socket.create_connection((host.encode() if host.isascii() else host, port), timeout=timeout)  # type: ignore[arg-type]
        except TimeoutError:
            raise ConnectError(f"cannot connect to {host}:{port}: timed out after {timeout:g} s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {connect_error_text(exc)}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = protocol.ClientConnection(host=f"{host}:{port}", max_message=codec.DEFAULT_MAX_FRAME_BYTES)
        self._tls = None
        try:
            if self._access.tls is not None:
                self._tls = self._tls_handshake(sock, host)
            sock.sendall(self._wrap(proto.data_to_send()))
            while proto.state is protocol.State.HANDSHAKE:
                plain = self._unwrap(sock.recv(RECEIVE_SIZE))
                if plain is not None:
                    self._ready += proto.receive_data(plain)
            # Non-blocking from here on, so that polling for a reply really
            # spins; waits that block go through poll with ``timeout``.
            sock.setblocking(False)
            self._readable = _Readiness(sock, writable=False)
            self._writable = _Readiness(sock, writable=True)
            self._sock = sock
            self._send(proto.data_to_send())  # pongs to pings that came with the upgrade
        except (protocol.HandshakeFailed, protocol.ConnectionClosed) as exc:
            sock.close()
            raise ConnectError(f"{host}:{port}: {exc}") from None
        except EOFError:
            sock.close()
            raise ConnectError(f"{host}:{port}: the node closed the connection during the TLS handshake") from None
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            import ssl

            if isinstance(exc, ssl.SSLError):
                raise ConnectError(f"{host}:{port}: {describe_tls_error(exc)}") from None
            raise ConnectError(f"{host}:{port}: handshake failed: {exc}") from None
        return sock, proto

    def _tls_handshake(self, sock: socket.socket, host: str) -> TlsLayer:
        assert self._access.tls is not None
        layer = TlsLayer(self._access.tls, host)
        try:
            while not layer.handshake_step():
                sock.sendall(layer.outgoing())
                data = sock.recv(RECEIVE_SIZE)
                if not data:
                    raise EOFError
                layer.feed(data)
            sock.sendall(layer.outgoing())
        except OSError as exc:
            import ssl

            if not isinstance(exc, ssl.SSLError):  # the socket's, not TLS's
                raise
            raise ConnectError(f"{self._dial}: {describe_tls_error(exc)}") from None
        return layer

    def _wrap(self, data: bytes) -> bytes:
        return data if self._tls is None else self._tls.wrap(data)

    def _unwrap(self, data: bytes) -> bytes | None:
        """Received bytes as the protocol takes them: decrypted, b"" for the
        end; None if they complete nothing yet (part of a TLS record)."""
        if self._tls is None or not data:
            return data
        try:
            return self._tls.receive(data) or None
        except EOFError:
            return b""

    def close(self) -> None:
        self._closed = True
        try:
            self._send(self._proto.close())
        except OSError:  # socket.timeout included
            pass
        self._sock.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, op: str, args: dict[str, Any], decode: Callable[[Any], Any]) -> Any:
        [(status, body)] = self._exchange([(op, args)])
        return _outcome(status, body, decode)

    def scan(self, prefix: Key = "", *, ns: str = "", page: int = DEFAULT_SCAN_PAGE) -> Iterator[bytes]:
        """Every key of ``ns`` that starts with ``prefix``, across the cluster,
        a page of ``page`` keys per request (see :meth:`scan_page`)."""
        cursor = None
        while True:
            keys, cursor = self.scan_page(cursor, prefix=prefix, ns=ns, limit=page)
            yield from keys
            if cursor is None:
                return

    def watch(self, prefix: Key = "", *, ns: str = "", retry_for: float = WATCH_RETRY_FOR) -> Iterator[WatchEvent]:
        """The changes to keys of ``ns`` that start with ``prefix``, from every
        node, as they happen, until the loop stops. A node restart or a
        connection lost is retried for up to ``retry_for`` seconds (then the
        error is raised); events lost meanwhile are reported as ``lagged`` or
        ``restarted`` events."""
        cursor = None
        retry = WatchRetry(retry_for)
        while True:
            try:
                events, cursor = self.watch_page(cursor, prefix=prefix, ns=ns)
            except WATCH_RETRIED as exc:
                time.sleep(retry.after(exc, time.monotonic()))
                continue
            retry.answered()
            yield from events

    def pipeline(self) -> SyncPipeline:
        """Queue operations and send them in one frame: ``p = client.pipeline();
        p.get("a"); p.set("b", "x"); results = p.execute()``."""
        return SyncPipeline(self)

    def _exchange(self, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
        """Send ``requests`` in one frame; their (status, body) replies in order."""
        if self._sock.fileno() < 0:
            if self._closed:
                raise ClosedError("the client was closed")
            self._connect()  # a reconnection failed last time: try again
        now = time.monotonic()
        if now - self._used_at > IDLE_CHECK:
            self._revive()
        self._used_at = now
        proto = self._proto
        first = proto.new_rids(len(requests))
        replies: dict[int, tuple[int, Any]] = {}
        frame = proto.request_frame([[first + i, op, args] for i, (op, args) in enumerate(requests)])
        what = requests[0][0] if len(requests) == 1 else f"{len(requests)} requests"
        try:
            self._send(frame)
            while True:
                for payload in self._take_ready():
                    for rid, status, body in proto.replies(payload, self.address):
                        if first <= rid < first + len(requests):
                            replies[rid] = (status, body)
                    if len(replies) == len(requests):
                        return [replies[first + i] for i in range(len(requests))]
                self._absorb(self._receive())
        except TimeoutError:
            raise RequestTimeout(f"{what}: no reply from {self.address} within {self.timeout:g} s") from None
        except (ConnectionLost, ProtocolError):
            self._sock.close()  # the next request opens a new connection
            raise
        except OSError as exc:
            self._sock.close()
            raise ConnectionLost(f"lost the connection to {self.address}: {exc}") from None

    def _receive(self) -> bytes:
        """Poll briefly for a quick reply before blocking (see net.BusyPoll)."""
        poller = self._poller
        if poller.wanted():
            data = poller.spin(self._sock, time.perf_counter() + poller.window)
            if data is not None:
                return data  # type: ignore[return-value]
            poller.missed()
        while True:
            self._readable.wait(self.timeout)
            try:
                return self._sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue

    def _send(self, data: bytes) -> None:
        view = memoryview(self._wrap(data))
        while view:
            try:
                view = view[self._sock.send(view) :]
            except BlockingIOError:
                self._writable.wait(self.timeout)

    def _take_ready(self) -> list[bytes]:
        ready, self._ready = self._ready, []
        return ready

    def _absorb(self, data: bytes) -> None:
        """Take in received bytes: keep the messages, send the protocol's answers (pongs, a close)."""
        plain = self._unwrap(data)
        if plain is None:
            return
        try:
            messages = self._proto.receive_data(plain)
        except protocol.ProtocolViolation as exc:
            self._send_quietly(self._proto.data_to_send())
            raise ProtocolError(f"bad WebSocket data from {self.address}: {exc.reason}") from None
        except protocol.ConnectionClosed as exc:
            self._send_quietly(self._proto.data_to_send())
            raise ConnectionLost(f"{self.address} closed the connection ({exc.code} {exc.reason})".strip()) from None
        self._ready += messages
        if self._proto.has_data_to_send:
            self._send(self._proto.data_to_send())

    def _send_quietly(self, data: bytes) -> None:
        try:
            self._send(data)
        except OSError:
            pass
