"""Who is in the cluster: etcd leases and a watch, turned into a stream of views.

Every node puts ``/dcache/<cluster>/members/<node id>`` under a lease it
keeps alive, and watches that prefix. Each change yields a :class:`View`
whose epoch is the etcd revision it was read at, so epochs from different
nodes compare. When etcd is unreachable the last view stands (the node keeps
serving) and the node re-registers when etcd returns. A node that dies stops
refreshing its lease and drops out after the lease TTL; one that stops
cleanly revokes its lease and drops out at once.

A node also says until when it can vouch for its view (``vouched_until``,
on trio's clock): a lease refreshed at time t cannot expire at etcd before
t + TTL, so until then no other node can have taken this node's shards.
Past that bound (paused, or cut off from etcd for longer than its lease)
it must not answer from its view; after a lapse it vouches again only once
it has registered anew and read a view at or after that registration.

The etcd3 client (the ``python3-etcd3`` distribution) is blocking: its calls
run in worker threads, and watch callbacks come back into trio through
:func:`trio.from_thread.run_sync`. :class:`StandaloneMembership` has the same
interface for a node without etcd.

etcd may serve TLS (an ``https://`` endpoint) and have authentication
enabled: :class:`EtcdSecurity` says how to check its certificate, which
client certificate to show, and which user to log in as.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import cbor2
import trio

from . import __version__
from .errors import DcacheError

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 5.0
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 2.0
# Re-read the member list this often even without watch events: an event can
# be lost while a watch is re-established, and python3-etcd3's watcher does
# not report a broken stream to its callbacks.
RESYNC_INTERVAL = 1.0
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 2.0
REVOKE_TIMEOUT = 1.0
CALL_GRACE = 1.0  # seconds past an etcd call's own deadline before it is given up (see _in_thread)
DUPLICATE_GRACE = 1.0  # seconds past a lease's TTL before a registered id is taken as in use
DUPLICATE_POLL = 0.25  # seconds between looks at a registered id's lease


class MembershipError(DcacheError):
    """Membership could not start (etcd unreachable, bad endpoint, TLS or
    authentication refused)."""


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """TLS and authentication for the connection to etcd; every field is optional.

    ``ca``: the CA file (PEM) to check etcd's certificate with. Without it an
    ``https://`` endpoint is checked against the system's default trust: the
    CA bundle OpenSSL uses (``SSL_CERT_FILE``, else the file
    :func:`ssl.get_default_verify_paths` names), not gRPC's own bundled roots.
    ``cert`` and ``key``: a client certificate and its unencrypted key (PEM),
    for an etcd run with ``--client-cert-auth``; one needs the other.
    ``user`` and ``password``: an etcd user, for an etcd with authentication
    enabled; one needs the other. The password is never logged, shown in
    errors, nor in this object's repr.

    Each needs an ``https://`` endpoint: the TLS options make no sense
    without TLS, and a password must not cross the network in the clear
    (nor would gRPC send the token etcd hands back over a plain connection).
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    client_address: str
    info: dict[str, Any] = field(default_factory=dict, compare=False)
    leaving: bool = False  # handing its shards over before it goes: owns none


@dataclass(frozen=True, slots=True)
class View:
    """The members at one epoch, sorted by node id."""

    epoch: int
    members: tuple[Member, ...]

    def ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)


def members_prefix(cluster: str) -> str:
    return f"/dcache/{cluster}/members/"


def settings_key(cluster: str) -> str:
    return f"/dcache/{cluster}/settings"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``http://host:port``, ``https://host:port`` or ``host:port`` (plain
    http) → (host, port); default port 2379. :func:`is_tls_endpoint` tells
    the two schemes apart."""
    try:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        hostname = parts.hostname
    except ValueError as exc:  # a malformed [IPv6] host, among others
        raise MembershipError(f"bad etcd endpoint {endpoint!r}: expected http(s)://HOST:PORT ({exc})") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise MembershipError(f"bad etcd endpoint {endpoint!r}: expected http(s)://HOST:PORT")
    try:
        port = parts.port or 2379
    except ValueError:
        raise MembershipError(f"bad etcd endpoint {endpoint!r}: bad port") from None
    return hostname, port


def is_tls_endpoint(endpoint: str) -> bool:
    """Whether ``endpoint`` (checked by :func:`parse_endpoint`) is ``https://``."""
    return endpoint.lower().startswith("https://")


def check_security(endpoint: str, security: EtcdSecurity) -> None:
    """Refuse options that do not go together, before any I/O."""
    tls = is_tls_endpoint(endpoint)
    for flag, value in (("--etcd-ca", security.ca), ("--etcd-cert", security.cert), ("--etcd-key", security.key)):
        if value is not None and not tls:
            raise MembershipError(f"{flag} needs an https:// endpoint (--etcd is {endpoint})")
    if (security.cert is None) != (security.key is None):
        given, missing = ("--etcd-cert", "--etcd-key") if security.key is None else ("--etcd-key", "--etcd-cert")
        raise MembershipError(f"{given} needs {missing}: a client certificate goes with its key")
    if security.user is not None or security.password is not None:
        if security.user == "":
            raise MembershipError("--etcd-user is empty")
        if security.user is None:
            raise MembershipError("an etcd password needs a user name (--etcd-user)")
        if security.password is None:
            raise MembershipError(f"--etcd-user {security.user} needs a password (--etcd-password-file or DCACHE_ETCD_PASSWORD)")
        if not tls:
            raise MembershipError(
                f"--etcd-user needs an https:// endpoint (--etcd is {endpoint}): the password would cross the network in the clear"
            )


def tls_credentials(endpoint: str, security: EtcdSecurity) -> Any:
    """gRPC channel credentials from ``security``'s files, each checked first
    (readable, PEM, a key that matches its certificate), so that a bad file is
    a clear error rather than a failed handshake later. Blocking: reads files."""
    import grpc

    if security.ca is not None:
        _check_file("--etcd-ca", security.ca, lambda: ssl.create_default_context(cafile=security.ca))
        ca = _read("--etcd-ca", security.ca)
    else:
        ca = _system_trust(endpoint)
    cert = key = None
    if security.cert is not None and security.key is not None:
        cert_file, key_file = security.cert, security.key
        cert = _read("--etcd-cert", cert_file)
        key = _read("--etcd-key", key_file)
        if b"ENCRYPTED" in key:
            raise MembershipError(f"--etcd-key {key_file} is encrypted; give an unencrypted key (readable by this user only)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _check_file("--etcd-cert", cert_file, lambda: context.load_cert_chain(cert_file, key_file))
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _system_trust(endpoint: str) -> bytes:
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            try:
                with open(path, "rb") as file:
                    return file.read()
            except OSError:
                continue
    raise MembershipError(
        f"no CA to check etcd's certificate at {endpoint} with: give --etcd-ca "
        f"(no system CA bundle at {paths.openssl_cafile}, nor in ${paths.openssl_cafile_env})"
    )


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise MembershipError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def _check_file(flag: str, path: str, load: Callable[[], object]) -> None:
    try:
        load()
    except OSError as exc:  # ssl.SSLError is one
        if isinstance(exc, ssl.SSLError):
            reason = exc.reason or str(exc)
            raise MembershipError(f"cannot use {flag} {path}: {reason} (not PEM, or a key that does not match)") from None
        raise MembershipError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


class _Token:
    """gRPC call credentials that send etcd's current auth token. python3-etcd3
    authenticates once, in its constructor, and bakes that token into its
    calls and its watcher for good; etcd drops a token on restart, after
    ``--auth-token-ttl`` (5 minutes) unused, or at its fixed expiry (JWT).
    With this in ``call_credentials`` every call, a watch stream opened
    later included, carries whatever token membership last obtained."""

    def __init__(self) -> None:
        self.value = ""

    def __call__(self, context: Any, callback: Callable[[Any, Any], None]) -> None:
        callback((("token", self.value),) if self.value else (), None)


def decode_member(node_id: str, value: bytes) -> Member | None:
    try:
        info = cbor2.loads(value)
        client = info["client"]
        if not isinstance(client, str):
            return None
    except Exception:
        return None
    return Member(node_id, client, info, leaving=info.get("leaving") is True)


class _Subscribers:
    """Fan-out of views to every subscriber's channel."""

    def __init__(self) -> None:
        self._channels: list[trio.MemorySendChannel[View]] = []

    def subscribe(self, current: View) -> trio.MemoryReceiveChannel[View]:
        # Unbounded, but views are small and rare, and the node applies each
        # one at once; a bounded channel could drop the newest view.
        send, receive = trio.open_memory_channel[View](math.inf)
        self._channels.append(send)
        return receive

    def publish(self, view: View) -> None:
        for channel in list(self._channels):
            try:
                channel.send_nowait(view)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._channels.remove(channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()


class StandaloneMembership:
    """A cluster of one: this node, epoch 0, forever."""

    def __init__(self, *, node_id: str, client_address: str) -> None:
        self._view = View(0, (Member(node_id, client_address, {"client": client_address, "peer": node_id}),))
        self._subscribers = _Subscribers()
        self.healthy = True
        self.vouched_until = math.inf  # nobody else can take its shards

    def current(self) -> View:
        return self._view

    def subscribe(self) -> trio.MemoryReceiveChannel[View]:
        return self._subscribers.subscribe(self._view)

    async def run(self, *, task_status: trio.TaskStatus[View] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self._view)
        try:
            await trio.sleep_forever()
        finally:
            self._subscribers.close()

    async def withdraw(self) -> None:
        """Nobody else to tell."""

    async def announce_leaving(self) -> bool:
        """Nobody else to tell."""
        return False


class EtcdMembership:
    """Membership through etcd; see the module docstring.

    ``run`` registers this node, reads the members and calls
    ``task_status.started(view)``; it raises :class:`MembershipError` if etcd
    does not answer within ``connect_timeout``, if TLS to it fails, or if it
    refuses ``security``'s user. The constructor raises it for a malformed
    endpoint or options that do not go together (see :class:`EtcdSecurity`).
    """

    def __init__(
        self,
        *,
        endpoint: str,
        cluster: str,
        node_id: str,
        client_address: str,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        connect_timeout: float = CONNECT_TIMEOUT,
        on_lapse: Callable[[], None] | None = None,
        on_vouch: Callable[[float], None] | None = None,
        settings: dict[str, Any] | None = None,
        security: EtcdSecurity | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.cluster = cluster
        self._settings = settings or {}
        self._on_lapse = on_lapse
        self._on_vouch = on_vouch
        self._host, self._port = parse_endpoint(endpoint)
        self._security = security or EtcdSecurity()
        check_security(endpoint, self._security)
        self._tls = is_tls_endpoint(endpoint)
        self._token: _Token | None = None  # with a user: the token calls carry
        self._auth_lock = trio.Lock()
        self.prefix = members_prefix(cluster)
        self.node_id = node_id
        self._key = self.prefix + node_id
        self._info = {"client": client_address, "peer": node_id, "started": time.time(), "version": __version__}
        self._value = cbor2.dumps(self._info)
        self._lease_ttl = max(1, math.ceil(lease_ttl))
        self._connect_timeout = connect_timeout
        self._client: Any = None
        self._lease: Any = None
        self._view = View(0, ())
        self._subscribers = _Subscribers()
        self._changed: trio.Event | None = None
        self._limiter = trio.CapacityLimiter(4)
        self.healthy = False
        self._withdrawn = False
        # Until when the view can be trusted (see the module docstring), and
        # until when the lease is known to live, on trio's clock.
        self.vouched_until = -math.inf
        self._lease_bound = -math.inf
        # Registered anew (or not yet): the etcd revision a view must be read
        # at or after before this node vouches again; math.inf until the put
        # is done, 0 when nothing is pending.
        self._vouch_from: float = math.inf
        self._said_unvouched = False

    def current(self) -> View:
        return self._view

    def subscribe(self) -> trio.MemoryReceiveChannel[View]:
        return self._subscribers.subscribe(self._view)

    # -- lifecycle ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[View] = trio.TASK_STATUS_IGNORED) -> None:
        import etcd3

        _patch_etcd3_watcher()
        # One endpoint that is never benched: etcd3's default sits out a
        # failed endpoint for five minutes, far longer than an etcd restart.
        # And gRPC's own reconnect backoff (up to 2 minutes) capped at a
        # second: after an etcd restart the lease must be refreshed within
        # its TTL, or every node drops out of the view at once.
        credentials = None
        if self._tls:
            credentials = await trio.to_thread.run_sync(tls_credentials, self.endpoint, self._security)
        endpoint = etcd3.Endpoint(
            self._host,
            self._port,
            secure=self._tls,
            creds=credentials,
            time_retry=0.0,
            opts=[("grpc.max_reconnect_backoff_ms", 1000)],
        )
        # The user (if any) logs in below, in a thread: etcd3's constructor
        # would do it here, blocking trio, and keep that token for good. etcd3
        # sends its call_credentials with every call and gives them to its
        # watcher: a _Token there always sends the newest token.
        self._client = etcd3.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=self._connect_timeout)
        try:
            with self._starting():
                if self._security.user is not None:
                    import grpc

                    self._token = _Token()
                    self._client.call_credentials = grpc.metadata_call_credentials(self._token)
                    await self._authenticate(stale="")
                await self._agree()
                value, meta = await self._call(self._client.get, self._key)
            if value is not None:
                await self._wait_until_free(meta.lease_id)
            with self._starting():
                await self._register()
                view = await self._read()
            self._client.timeout = REQUEST_TIMEOUT
            self.healthy = True
            self._set_view(view)
            task_status.started(view)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_alive)
                nursery.start_soon(self._follow)
        finally:
            self._subscribers.close()
            with trio.CancelScope(shield=True):
                await self._leave()

    @contextlib.contextmanager
    def _starting(self) -> Iterator[None]:
        """etcd's answer within the connect timeout, or MembershipError."""
        try:
            with trio.fail_after(self._connect_timeout + 1):
                yield
        except trio.TooSlowError:
            raise MembershipError(f"cannot reach etcd at {self.endpoint}: no answer within {self._connect_timeout:g} s") from None
        except self._etcd_errors() as exc:
            raise MembershipError(self._explain(exc)) from None

    def _explain(self, exc: BaseException) -> str:
        """One line on why etcd would not let us in."""
        details = _describe(exc)
        if self._tls and _is_tls_failure(details):
            if "CERTIFICATE_VERIFY_FAILED" in details:
                why = "etcd's certificate is not signed by the CA we trust (--etcd-ca), or is not for this host"
            elif "BAD_CERTIFICATE" in details or "CERTIFICATE_REQUIRED" in details:
                why = "etcd did not accept our client certificate (--etcd-cert), or wants one"
            else:
                why = "does etcd serve TLS there?"
            return f"TLS to etcd at {self.endpoint} failed: {why} ({_last_error(details)})"
        user = self._security.user
        if user is not None and "authentication failed" in details:
            return f"etcd refused user {user}: authentication failed"
        if "user name is empty" in details:
            return f"etcd at {self.endpoint} has authentication enabled: give a user and password (--etcd-user)"
        if "permission denied" in details:
            who = f"user {user}" if user is not None else "this node"
            return f"etcd denied {who} access to /dcache/{self.cluster}/: permission denied"
        return f"cannot reach etcd at {self.endpoint}: {details}"

    async def _agree(self) -> None:
        """Check this node's cluster-wide settings (``--replicas``) against
        those etcd records for the cluster; the first node records its own.
        A node started with other values would place copies where no other
        node looks for them: it refuses to join."""
        if not self._settings:
            return
        key = settings_key(self.cluster)
        if await self._call(self._client.put_if_not_exists, key, cbor2.dumps(self._settings)):
            log.info("recorded the cluster's settings in etcd: %s", _flags(self._settings))
            return
        value, _ = await self._call(self._client.get, key)
        try:
            recorded = cbor2.loads(value) if value is not None else {}
        except Exception:
            recorded = None
        if not isinstance(recorded, dict):
            raise MembershipError(f"etcd holds unreadable settings for cluster {self.cluster!r} at {key}; delete that key")
        for name, mine in self._settings.items():
            theirs = recorded.get(name, mine)
            if theirs != mine:
                raise MembershipError(
                    f"cluster {self.cluster!r} runs with --{name} {theirs} (recorded in etcd at {key}); "
                    f"this node was started with --{name} {mine}"
                )

    async def _wait_until_free(self, lease_id: int) -> None:
        """Our id is registered already: by a run of ours that died, whose
        lease lapses within its TTL, or by a live node that advertises the
        same address, which would split the shards of that id in two. A live
        node refreshes its lease every third of its TTL: once the lease's
        time to live goes up, the other node is alive, and this one stops."""
        log.info("%s is registered already; waiting for that entry to lapse (a previous run?)", self.node_id)
        left = math.inf
        with trio.move_on_after(self._lease_ttl + DUPLICATE_GRACE):
            while True:
                try:
                    if (await self._call(self._client.get, self._key))[0] is None:
                        return
                    ttl = (await self._call(self._client.get_lease_info, lease_id)).TTL
                    if ttl > left:
                        break  # refreshed: a live node holds it
                    left = ttl
                except self._etcd_errors():
                    pass
                await trio.sleep(DUPLICATE_POLL)
        raise MembershipError(
            f"another node is registered as {self.node_id} and keeps its entry alive; give each node its own --advertise address"
        )

    async def withdraw(self) -> None:
        """Leave the view before stopping: revoke the lease, so that peers
        place this node's shards elsewhere while it still answers what is
        under way, and never register again. Bounded."""
        self._withdrawn = True
        lease, self._lease = self._lease, None
        if lease is not None:
            with trio.move_on_after(REVOKE_TIMEOUT):
                try:
                    await self._call(self._client.revoke_lease, lease.id)
                except self._etcd_errors():
                    pass

    async def announce_leaving(self) -> bool:
        """Say in etcd that this node is leaving: every node (this one too)
        then places shards without it, and it hands its own over before it
        withdraws. Bounded; False if etcd did not take it (then the others
        learn it only when the node withdraws)."""
        self._value = cbor2.dumps({**self._info, "leaving": True})
        lease = self._lease
        if lease is None or self._withdrawn or not self.healthy:
            return False
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                await self._call(self._client.put, self._key, self._value, lease=lease)
                return True
            except self._etcd_errors() as exc:
                log.warning("could not tell etcd this node is leaving: %s", _describe(exc))
        return False

    async def _leave(self) -> None:
        """Revoke the lease (peers see us go at once) and close the client; bounded."""
        client, lease = self._client, self._lease
        if client is None:
            return

        def leave() -> None:
            try:
                if lease is not None:
                    client.revoke_lease(lease.id)
            except Exception:
                pass
            finally:
                client.close()

        with trio.move_on_after(REVOKE_TIMEOUT):
            await trio.to_thread.run_sync(leave, abandon_on_cancel=True)

    # -- etcd calls (blocking, in threads) -------------------------------------

    def _etcd_errors(self) -> tuple[type[BaseException], ...]:
        import etcd3.exceptions
        import grpc

        return (etcd3.exceptions.Etcd3Exception, grpc.RpcError, OSError)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            return fn(*args, **kwargs)

        token = self._token
        stale = token.value if token is not None else ""
        try:
            return await self._in_thread(call)
        except Exception as exc:
            if token is None or not _token_refused(exc):
                raise
        # python3-etcd3 never logs in again (see _Token): its token is gone
        # (etcd restarted, or it lay unused past --auth-token-ttl, or expired
        # as JWTs do), so log in again and retry once, as etcd's Go client does.
        await self._authenticate(stale=stale)
        return await self._in_thread(call)

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in a worker thread, given up on (as timed out) once past
        its gRPC deadline. grpc's Python streams can wait forever for a message
        of a call that has already failed (grpc/grpc#20562): seen with a lease
        keep-alive sent as an etcd serving TLS went down, which stalled the
        keep-alives for good. The thread left behind keeps its limiter token,
        so the limiter gets one more."""
        import etcd3.exceptions

        started = False

        def run() -> Any:
            nonlocal started
            started = True
            return fn()

        with trio.move_on_after(self._client.timeout + CALL_GRACE):
            return await trio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=self._limiter)
        if started:
            self._limiter.total_tokens += 1
        log.warning("an etcd call to %s outlived its deadline by %g s; gave it up", self.endpoint, CALL_GRACE)
        raise etcd3.exceptions.ConnectionTimeoutError()

    async def _authenticate(self, *, stale: str) -> None:
        """Log in as the user and have calls carry the new token, unless
        another task did so since its token ``stale`` was refused."""
        from etcd3 import etcdrpc

        assert self._token is not None
        token, user, password = self._token, self._security.user, self._security.password
        async with self._auth_lock:
            if token.value != stale:
                return
            client = self._client

            def authenticate() -> Any:
                request = etcdrpc.AuthenticateRequest(name=user, password=password)
                return client.authstub.Authenticate(request, client.timeout)

            try:
                response = await self._in_thread(authenticate)
            except self._etcd_errors() as exc:
                if "authentication is not enabled" not in _describe(exc):
                    raise
                # As etcd's Go client does: nothing to log in to, go on without a token.
                if not stale:
                    log.warning("etcd at %s has authentication disabled; connecting without user %s", self.endpoint, user)
                return
            token.value = response.token
            if stale:
                log.info("logged in to etcd at %s again as %s (its token had expired)", self.endpoint, user)

    async def _register(self) -> None:
        """Put our key under a live lease (a new lease if the old one is gone)."""
        if self._withdrawn:
            return
        client = self._client
        if self._lease is not None:
            await self._refresh()
        if self._lease is None:
            sent = trio.current_time()
            self._lease = await self._call(client.lease, self._lease_ttl)
            self._renewed(sent, self._lease.ttl)  # etcd may grant more than asked (its minimum TTL)
        response = await self._call(client.put, self._key, self._value, lease=self._lease)
        if self._vouch_from:
            self._vouch_from = response.header.revision

    async def _refresh(self) -> bool:
        """Refresh the lease; False (and the lease forgotten) if it had lapsed."""
        sent = trio.current_time()
        responses = await self._call(self._lease.refresh)
        if not responses or responses[0].TTL <= 0:
            self._lapsed()
            return False
        self._renewed(sent, responses[0].TTL)
        return True

    def _renewed(self, sent: float, ttl: float) -> None:
        """The lease lives ``ttl`` seconds from when etcd got the call, which
        was after ``sent``: it cannot expire before ``sent + ttl``."""
        self._lease_bound = sent + ttl
        if not self._vouch_from:
            self._vouch(self._lease_bound)

    def _vouch(self, until: float) -> None:
        self.vouched_until = until
        self._said_unvouched = until == -math.inf  # a lapse, which is logged as such
        if self._on_vouch is not None:
            self._on_vouch(until)

    def _lapsed(self) -> None:
        """Our lease ran out (or was revoked): for a while we were out of the
        cluster, whether or not we saw a view without us, and others may
        have written our keys. Stop vouching at once, until we are
        registered again and have read a view from after that; tell the
        node before registering again."""
        self._lease = None
        self._vouch_from = math.inf
        self._vouch(-math.inf)
        if self._on_lapse is not None:
            self._on_lapse()

    async def _read(self) -> View:
        response = await self._call(self._client.get_prefix_response, self.prefix)
        members = []
        for kv in response.kvs:
            node_id = kv.key.decode(errors="replace")[len(self.prefix) :]
            member = decode_member(node_id, kv.value)
            if member is None:
                log.warning("ignoring a malformed member entry for %r in etcd", node_id)
                continue
            members.append(member)
        members.sort(key=lambda m: m.node_id)
        return View(response.header.revision, tuple(members))

    def _set_view(self, view: View) -> None:
        old = self._view
        self._view = view
        if view.members != old.members:
            self._subscribers.publish(view)
        if self._vouch_from and view.epoch >= self._vouch_from:
            # The first view read since registering (again): vouch, now that
            # it is current() for on_vouch to apply before answering from it.
            self._vouch_from = 0
            self._vouch(self._lease_bound)

    # -- background loops -----------------------------------------------------------

    async def _keep_alive(self) -> None:
        """Refresh the lease every TTL/3; re-register when etcd comes back."""
        backoff = BACKOFF_INITIAL
        while True:
            if self._withdrawn:
                return
            try:
                if self._lease is None or not self.healthy:
                    # Back from an outage: refresh or replace the lease, put our key again.
                    await self._register()
                    self._wake()
                elif not await self._refresh():
                    log.warning("our etcd lease expired; registering again")
                    await self._register()
                    self._wake()
                elif all(m.node_id != self.node_id for m in self._view.members):
                    # Our key went while our lease lived (deleted by hand, or by
                    # another node that ran with our --advertise): put it back.
                    log.warning("our entry is missing from etcd; registering again")
                    await self._register()
                    self._wake()
                self._mark_healthy()
                backoff = BACKOFF_INITIAL
                await trio.sleep(self._lease_ttl / 3)
            except self._etcd_errors() as exc:
                self._mark_unhealthy(exc)
                if not self._said_unvouched and trio.current_time() >= self.vouched_until:
                    self._said_unvouched = True
                    log.warning("no word from etcd for longer than our lease: keyed requests get 'unavailable' until it answers")
                await trio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _follow(self) -> None:
        """Watch the prefix and re-read the members on every change."""
        token = trio.lowlevel.current_trio_token()
        backoff = BACKOFF_INITIAL
        while True:
            watch_id = None
            self._changed = trio.Event()
            try:
                view = await self._read()
                self._set_view(view)

                def on_event(_: Any) -> None:
                    try:
                        trio.from_thread.run_sync(self._wake, trio_token=token)
                    except trio.RunFinishedError:
                        pass

                watch_id = await self._call(
                    self._client.add_watch_prefix_callback, self.prefix, on_event, start_revision=view.epoch + 1
                )
                self._mark_healthy()
                backoff = BACKOFF_INITIAL
                while True:
                    with trio.move_on_after(RESYNC_INTERVAL):
                        await self._changed.wait()
                    self._changed = trio.Event()
                    self._set_view(await self._read())
            except self._etcd_errors() as exc:
                self._mark_unhealthy(exc)
                await trio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                if watch_id is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(REQUEST_TIMEOUT):
                        try:
                            await self._call(self._client.cancel_watch, watch_id)
                        except Exception:
                            pass

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _mark_unhealthy(self, exc: BaseException) -> None:
        if self.healthy:
            log.warning(
                "etcd at %s unreachable (%s); serving with the last view (epoch %d) while our lease lasts, and retrying",
                self.endpoint,
                _describe(exc),
                self._view.epoch,
            )
        self.healthy = False

    def _mark_healthy(self) -> None:
        if not self.healthy:
            log.info("etcd at %s reachable again", self.endpoint)
        self.healthy = True


def _patch_etcd3_watcher() -> None:
    """python3-etcd3 0.13's watcher uses ``six`` without importing it when its
    stream breaks, so the thread dies with a NameError instead of telling the
    callbacks. Give it the one function it needs."""
    import types

    import etcd3.watch

    if not hasattr(etcd3.watch, "six"):
        etcd3.watch.six = types.SimpleNamespace(itervalues=lambda d: iter(d.values()))


def _flags(settings: dict[str, Any]) -> str:
    return " ".join(f"--{name} {value}" for name, value in settings.items())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    # python3-etcd3 turns some gRPC errors into its own exceptions, raised
    # while handling them: gRPC's details (a TLS failure's reason) are there.
    for error in (exc, exc.__context__):
        details = getattr(error, "details", None)
        if callable(details):
            try:
                return " ".join(str(details()).split())
            except Exception:
                pass
    return str(exc) or type(exc).__name__


def _token_refused(exc: BaseException) -> bool:
    """etcd refused our token: the errors on which etcd's Go client logs in again."""
    details = _describe(exc)
    return any(reason in details for reason in ("invalid auth token", "revision of auth store is old", "user name is empty"))


def _is_tls_failure(details: str) -> bool:
    lowered = details.lower()
    return any(word in lowered for word in ("ssl", "tls", "handshake", "certificate"))


def _last_error(details: str) -> str:
    """gRPC's reason, without its preamble: 'failed to connect to all
    addresses; last error: UNKNOWN: ipv4:127.0.0.1:2379: Tls handshake…'."""
    reason = details.rsplit("last error: ", 1)[-1]
    return reason.split(": ", 2)[-1] if reason.count(": ") >= 2 else reason
