"""A dcache node: listeners, membership, peer links, the router and its store.

:meth:`Node.run` owns one nursery with everything the node runs; cancelling
it (Ctrl-C, SIGTERM, a test leaving its nursery) stops the node at once,
revoking its etcd lease on the way out so peers see it leave.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import __version__, transport, wsframe
from .codec import ErrorCode, Limits, Status
from .errors import DcacheError
from .events import EventLog
from .handoff import Placement, Signal, absorb, claim, hand_over
from .membership import EtcdMembership, EtcdSecurity, MembershipError, StandaloneMembership, View
from .net import busy_poll_from_env, split_address
from .peers import PeerLinks
from .protocol import Budget, ConnectionClosed, ProtocolViolation, ServerSession, violation
from .reactor import Reactor
from .replication import SYNC, Replicator, held_for, replica_summary, take
from .router import Forwarder, Router, Waiting
from .security import (
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    MAX_HELLO_MESSAGE,
    MAX_IN_FLIGHT,
    TlsSetupError,
    TokenError,
    Tokens,
    client_context,
    file_stamp,
    server_context,
)
from .shard import ShardMap
from .store import DEFAULT_COMPRESS_MIN, Store
from .watching import WatchHub

log = logging.getLogger(__name__)

DEFAULT_CLIENT_PORT = 48000
DEFAULT_PEER_PORT = 47000
DEFAULT_METRICS_PORT = 9100
DEFAULT_LEASE_TTL = 5.0
SWEEP_INTERVAL = 0.1
SWEEP_BATCH = 1000
REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused connections of one kind
TOKEN_RELOAD_INTERVAL = 2.0  # seconds between looks at the token files (rewritten: read again)
MAX_UNFINISHED_BYTES = 256 * 1024 * 1024  # in messages still arriving, over all connections
ADVERTISE_CHECK_TIMEOUT = 2.0
ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)  # out of something: wait, then go on
ACCEPT_BACKOFF = 0.1
MEMBER_STATS_TIMEOUT = 2.0  # seconds a member may take to send its counters for `members`
LEAVE_DRAIN = 0.3  # seconds a stopping node still answers after leaving the view
DRAIN_TIMEOUT = 30.0  # seconds a leaving node may take to hand its shards over
STOP_AFTER_DRAIN = 0.2  # seconds between answering a drain and stopping, for the reply to go out


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node is told at start; passed down, never mutated."""

    client_listen: str = f"localhost:{DEFAULT_CLIENT_PORT}"
    listen: str = f"localhost:{DEFAULT_PEER_PORT}"
    advertise: str | None = None
    etcd: str | None = None
    cluster: str = "default"
    lease_ttl: float = DEFAULT_LEASE_TTL
    metrics_listen: str | None = None
    limits: Limits = field(default_factory=Limits)
    sweep_interval: float = SWEEP_INTERVAL
    idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_unfinished_bytes: int = MAX_UNFINISHED_BYTES
    busy_poll: float | None = None  # seconds a reader spins before sleeping (see net.BusyPoll); None: DCACHE_BUSY_POLL_US
    reactor: bool = True  # serve connections from one task (see reactor.py); False: a task each
    drain_timeout: float = DRAIN_TIMEOUT
    replicas: int = 1  # copies of each shard, the owner's included (cluster-wide: recorded in etcd)
    replication: str = SYNC  # sync: a write is answered once every replica has it; async: at once
    max_memory: int = 0  # bytes the entries may take (the store's estimate); 0: no limit
    eviction: str = "lru"  # at the limit: lru, lfu or noeviction (writes refused)
    compress_min: int = DEFAULT_COMPRESS_MIN  # values this large or larger are kept compressed; 0: never
    hello_timeout: float = HELLO_TIMEOUT
    max_in_flight: int = MAX_IN_FLIGHT  # frames of one connection waiting for other nodes, before it is read no more
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    auth_token_file: str | None = None  # client tokens (read and write); none: clients need no token
    read_token_file: str | None = None  # read-only client tokens
    peer_token_file: str | None = None  # node-to-node tokens; the first line is the one this node sends
    tls_cert: str | None = None  # with tls_key: both listeners speak TLS (wss), and peer links too
    tls_key: str | None = None
    tls_ca: str | None = None  # peers' certificates are checked against it, both ways (else the system's CAs)
    tls_client_ca: str | None = None  # clients must show a certificate it signed (mutual TLS)
    etcd_security: EtcdSecurity | None = None  # etcd's TLS and user (an https:// --etcd)


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    """Where a started node actually listens (ports resolved when 0 was asked)."""

    client: tuple[str, int]
    peer: tuple[str, int]
    metrics: tuple[str, int] | None = None
    node_id: str = ""

    @property
    def client_address(self) -> str:
        return join_address(*self.client)

    @property
    def peer_address(self) -> str:
        return join_address(*self.peer)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_WILDCARDS = ("", "0.0.0.0", "::")


def process_memory_bytes() -> int:
    """Resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class NodeStartError(DcacheError):
    """The node could not start (a port in use, etcd unreachable); the message says which."""


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = Store(
            clock=trio.current_time, max_bytes=config.max_memory, eviction=config.eviction, compress_min=config.compress_min
        )
        self.events = EventLog(trio.current_time)
        self.watch_hub = WatchHub(lambda: self.router.shard_map.members or (self.node_id,), self._poll_events)
        self._event_arrived = Signal()
        self.events.on_append = self._event_arrived.set
        self.node_id = ""
        self.connections = 0
        self.unfinished = Budget(config.max_unfinished_bytes)
        self.peers: PeerLinks
        self.router: Router
        self.reactor: Reactor
        self.replicator: Replicator | None = None
        self._started_at = 0.0
        self._purge_needed: trio.Event | None = None
        self.membership: EtcdMembership | StandaloneMembership | None = None
        self._leaving = False
        self._applied = View(0, ())  # the last view applied (or set aside, if empty)
        self.placement = Placement("", config.replicas)
        self._nursery: trio.Nursery | None = None
        self._drained: trio.Event | None = None  # set once a drain has handed everything over
        self._drain_report: dict[str, int] = {}
        self._more_to_hand = Signal()  # there may be shards to hand over
        self._new_claims = Signal()  # shards may have started on their way here
        self.tokens = Tokens()
        self._client_tls: ssl.SSLContext | None = None
        self._peer_tls: ssl.SSLContext | None = None  # the peer listener's
        self._by_address: dict[str, int] = {}  # open connections per remote host
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # per reason: when last logged, and how many since

    async def leave(self, drain: float = LEAVE_DRAIN, *, close: bool = True) -> dict[str, int]:
        """Step out of the cluster before stopping: say so in etcd, hand every
        shard with its entries to its new owner (within the config's
        ``drain_timeout``), leave the membership view, keep answering for
        ``drain`` seconds while the other nodes finish what they sent it,
        then close client connections (unless not ``close``). Returns what
        moved and what did not."""
        self._leaving = True
        membership = self.membership
        if membership is None:
            return {}
        placement = self.placement
        before = (placement.moved_out, placement.entries_out)
        if await membership.announce_leaving():
            with trio.move_on_after(self.config.drain_timeout):
                while self.node_id in placement.target.members or placement.outgoing or placement.sending:
                    await trio.sleep(0.05)
        report = {
            "shards_moved": placement.moved_out - before[0],
            "entries_moved": placement.entries_out - before[1],
            "shards_left_behind": len(placement.outgoing)
            + len(placement.sending)
            + (self.router.shard_map.shards_owned(self.node_id) if self.node_id in placement.target.members else 0),
            "entries_left_behind": sum(
                self.store.shard_size(shard)
                for shard in self.store.shards()
                if (placement.owners and placement.owners[shard] == self.node_id) or shard in placement.sending
            ),
        }
        if report["shards_moved"] or report["shards_left_behind"] or report["entries_left_behind"]:
            log.info(
                "handed %d shard(s) with %d entries to other nodes%s",
                report["shards_moved"],
                report["entries_moved"],
                f"; {report['entries_left_behind']} entries could not be handed over "
                f"(within {self.config.drain_timeout:g} s, or to nobody) and are lost"
                if report["entries_left_behind"]
                else "",
            )
        await membership.withdraw()
        if isinstance(membership, EtcdMembership):
            await trio.sleep(drain)
            if close:
                # Close client connections before the peer links go with the node:
                # a request still forwarded then is retried elsewhere, not failed.
                self.reactor.close_all()
        return report

    async def _drain(self) -> tuple[int, Any]:
        """The ``drain`` op: hand everything over, leave, and stop the node
        (soon after, so that the reply goes out first)."""
        if not isinstance(self.membership, EtcdMembership):
            return Status.ERROR, [ErrorCode.BAD_REQUEST.value, "this node is standalone: there is no node to hand its entries to"]
        if self._drained is None:
            if self._leaving:
                return Status.ERROR, [ErrorCode.UNAVAILABLE.value, "this node is leaving already"]
            log.info("drain requested: handing every shard over, then stopping")
            self._drained = trio.Event()
            assert self._nursery is not None
            # In the node's nursery: a client that goes away does not stop it half way.
            self._nursery.start_soon(self._drain_and_stop, self._drained)
        await self._drained.wait()
        return Status.OK, self._drain_report

    async def _drain_and_stop(self, done: trio.Event) -> None:
        try:
            self._drain_report = await self.leave(close=False)
        finally:
            done.set()
        await self._stop_after_reply()

    async def _stop_after_reply(self) -> None:
        await trio.sleep(STOP_AFTER_DRAIN)
        self.reactor.close_all()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    def readiness(self) -> tuple[str, str]:
        """Whether this node should be sent clients, for ``/readyz`` and
        ``members``: ``ready``, or ``joining`` (its view is not applied yet,
        or does not hold it), ``leaving`` (it is stepping out) or
        ``rejoining`` (it lost contact with etcd for longer than its lease),
        each with a sentence saying why."""
        placement = self.placement
        if self._leaving:
            moving = len(placement.outgoing) + len(placement.sending)
            return "leaving", "this node is leaving the cluster" + (f", handing {moving} shard(s) over" if moving else "")
        if not self._applied.members or self.node_id not in self.router.shard_map.members:
            return "joining", "this node is not in its membership view yet"
        if placement.incoming:
            return "joining", f"the entries of {len(placement.incoming)} shard(s) are still on their way to this node"
        if self.router.vouched_until <= trio.current_time():
            return "rejoining", "this node lost contact with etcd for longer than its lease"
        if self.replicator is not None:
            missing = self.replicator.under_replicated()
            if missing:
                return "replicating", f"{missing} shard(s) of this node lack a copy on one of their replicas; copying them"
            if self.replicator.audit_due:
                return "replicating", "the membership changed: checking that every replica keeps its copies"
        return "ready", "this node is in the cluster and serving its shards"

    def stats(self) -> dict[str, Any]:
        """This node's counters, as a ``stats`` request answers them."""
        router = self.router
        stats: dict[str, Any] = self.store.stats()
        stats.update(
            node=self.node_id,
            state=self.readiness()[0],
            shards=router.shard_map.shards_owned(self.node_id),
            **self.placement.state(),
            **replica_summary(self.placement, self.replicator),
            members=len(router.shard_map.members),
            epoch=router.shard_map.epoch,
            forwarded=router.counters.forwarded,
            uptime_s=round(trio.current_time() - self._started_at, 3),
            process_memory_bytes=process_memory_bytes(),
            connections=self.connections,
            refused=dict(router.counters.refused),
            peer_links={
                "up": sum(1 for state in self.peers.states().values() if state == "up"),
                "total": len(self.peers.states()),
            },
            version=__version__,
        )
        return stats

    async def members(self) -> dict[str, Any]:
        """Every member with its state and counters, as a ``members`` request answers them."""
        return await gather_members(
            node_id=self.node_id,
            shard_map=self.router.shard_map,
            client_addresses=self.router.client_addresses,
            own_stats=self.stats,
            peers=self.peers,
        )

    async def run(self, *, task_status: trio.TaskStatus[BoundAddresses] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. ``task_status.started`` gets the bound addresses."""
        config = self.config
        self._started_at = trio.current_time()
        link_tls = self._load_security()
        client_host, client_port = split_address(config.client_listen, DEFAULT_CLIENT_PORT)
        peer_host, peer_port = split_address(config.listen, DEFAULT_PEER_PORT)
        client_listeners = await _open_listeners(client_host, client_port, "--client-listen")
        peer_listeners = await _open_listeners(peer_host, peer_port, "--listen")
        bound_peer = (peer_host, peer_listeners[0].socket.getsockname()[1])
        bound_client = (client_host, client_listeners[0].socket.getsockname()[1])
        # With port 0 the node id can only be known now.
        self.node_id = config.advertise or join_address(*bound_peer)
        self.placement = Placement(self.node_id, config.replicas)
        advertised_host = split_address(self.node_id, DEFAULT_PEER_PORT)[0]
        client_address = join_address(advertised_host if client_host in _WILDCARDS else client_host, bound_client[1])
        metrics_listeners = None
        if config.metrics_listen:
            metrics_host, metrics_port = split_address(config.metrics_listen, DEFAULT_METRICS_PORT)
            metrics_listeners = await _open_listeners(metrics_host, metrics_port, "--metrics-listen")
        self.peers = PeerLinks(
            node_id=self.node_id,
            max_frame_bytes=config.limits.max_frame_bytes,
            poll=config.busy_poll,
            token=lambda: self.tokens.peer[0].decode() if self.tokens.peer else None,
            tls=link_tls,
        )
        self.router = Router(
            store=self.store,
            node_id=self.node_id,
            limits=config.limits,
            shard_map=ShardMap.build(0, [self.node_id]),
            stats=self.stats,
            members=self.members,
            server_name=f"dcache {__version__}",
            peers=self.peers,
            handoff=self._take_handoff,
            drain=self._drain,
            clock=trio.lowlevel.current_clock().current_time,  # the clock membership vouches on
        )
        self.router.arriving = self.placement.incoming
        self.router.event_log = self.events
        self.router.event_arrived = self._event_arrived.event
        self.router.watched = self._watched
        self.router.watch_hub = self.watch_hub
        if config.replicas > 1:
            self.replicator = Replicator(self.placement, self.store, self.peers, mode=config.replication)
            self.router.replicator = self.replicator
        self.reactor = Reactor(
            router=self.router,
            idle_timeout=config.idle_timeout,
            on_close=self._connection_closed,
            poll=busy_poll_from_env() if config.busy_poll is None else config.busy_poll,
            max_waiting=config.max_in_flight,
        )
        membership: EtcdMembership | StandaloneMembership
        if config.etcd:
            try:
                membership = EtcdMembership(
                    endpoint=config.etcd,
                    cluster=config.cluster,
                    node_id=self.node_id,
                    client_address=client_address,
                    lease_ttl=config.lease_ttl,
                    on_lapse=self._lapsed,
                    on_vouch=self._vouch,
                    settings={"replicas": config.replicas},
                    security=config.etcd_security,
                )
            except MembershipError as exc:  # a malformed --etcd
                raise NodeStartError(str(exc)) from None
            self.router.vouched_until = -math.inf  # until membership vouches for its first view
        else:
            if config.replicas > 1:
                raise NodeStartError("--replicas needs a cluster (--etcd): a standalone node has no other node to keep copies on")
            membership = StandaloneMembership(node_id=self.node_id, client_address=client_address)

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.peers.run)
            await nursery.start(self.reactor.run)
            await nursery.start(self.watch_hub.run)
            # Listeners are bound already; connections wait in the backlog
            # until the first view says what this node owns.
            try:
                view = await nursery.start(membership.run)
                self.membership = membership
            except MembershipError as exc:
                raise NodeStartError(str(exc)) from None
            self._purge_needed = trio.Event()
            views = membership.subscribe()
            # Placing every shard over a large first view takes a second or
            # more (300 members: about 1 s): off the event loop, which keeps
            # the membership's lease alive meanwhile. Later views cost
            # milliseconds each (ShardMap.changed).
            placed = await trio.to_thread.run_sync(ShardMap.build, view.epoch, _active(view), config.replicas)
            self._apply_view(view, placed)
            nursery.start_soon(self._follow_views, membership, views)
            nursery.start_soon(hand_over, self.placement, self.store, self.peers, self._more_to_hand.event, self.replicator)
            nursery.start_soon(claim, self.placement, self.peers, self._new_claims.event)
            if self.replicator is not None:
                await nursery.start(self.replicator.run)
            if config.etcd:
                nursery.start_soon(self._check_advertised)
            nursery.start_soon(self._purge_unowned)
            nursery.start_soon(self._sweep)
            if config.auth_token_file or config.read_token_file or config.peer_token_file:
                nursery.start_soon(self._reload_tokens)
            for listener in client_listeners:
                nursery.start_soon(self._accept, listener, nursery, False)
            for listener in peer_listeners:
                nursery.start_soon(self._accept, listener, nursery, True)
            bound_metrics = None
            if metrics_listeners is not None:
                from .metrics import registry_for, serve_metrics

                await nursery.start(serve_metrics, registry_for(self), metrics_listeners, self.readiness)
                bound_metrics = (metrics_host, metrics_listeners[0].socket.getsockname()[1])
            bound = BoundAddresses(client=bound_client, peer=bound_peer, metrics=bound_metrics, node_id=self.node_id)
            log.info(
                "dcache %s ready: clients on %s, peers on %s, node id %s, %s%s%s",
                __version__,
                bound.client_address,
                bound.peer_address,
                self.node_id,
                f"cluster {config.cluster!r} via etcd {config.etcd}" if config.etcd else "standalone",
                f", metrics on http://{join_address(*bound_metrics)}/metrics" if bound_metrics else "",
                self._security_summary(),
            )
            task_status.started(bound)

    # -- who may connect ----------------------------------------------------------

    def _load_security(self) -> ssl.SSLContext | None:
        """Read the token files and build the TLS contexts; NodeStartError if
        one is unusable. Returns the context this node's peer links dial with."""
        config = self.config
        try:
            self.tokens = Tokens.from_files(
                client=config.auth_token_file, read=config.read_token_file, peer=config.peer_token_file
            )
            if (config.tls_cert is None) != (config.tls_key is None):
                raise NodeStartError("--tls-cert and --tls-key go together: give both, or neither")
            if config.tls_cert is None or config.tls_key is None:
                if config.tls_ca or config.tls_client_ca:
                    raise NodeStartError("--tls-ca and --tls-client-ca need --tls-cert and --tls-key")
                link_tls = None
            else:
                self._client_tls = server_context(cert=config.tls_cert, key=config.tls_key, client_ca=config.tls_client_ca)
                self._peer_tls = server_context(cert=config.tls_cert, key=config.tls_key, client_ca=config.tls_ca)
                link_tls = client_context(ca=config.tls_ca, cert=config.tls_cert, key=config.tls_key)
        except (TokenError, TlsSetupError) as exc:
            raise NodeStartError(str(exc)) from None
        if not self.tokens.peer and not config.tls_ca:
            if config.tls_client_ca:
                raise NodeStartError(
                    "--tls-client-ca asks clients for a certificate, but the peer port (--listen) would let them in "
                    "without one: give --tls-ca (the nodes' CA) or --peer-token-file too"
                )
            if self.tokens.clients_need_one:
                log.warning(
                    "clients need a token, but the peer port (--listen) accepts any node: give --peer-token-file "
                    "(or --tls-ca), or keep that port on a network only the nodes reach"
                )
        return link_tls

    def _warn_refused(self, reason: str, what: str) -> None:
        """Log a refused connection: the first, then one line per
        :data:`REFUSAL_LOG_INTERVAL` with the count (a flood of them must not flood the log)."""
        now = trio.current_time()
        last, count = self._refusals_logged.get(reason, (-math.inf, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusals_logged[reason] = (last, count + 1)
            return
        more = f" (and {count} more since the last such line)" if count else ""
        log.warning("refusing a connection from %s%s", what, more)
        self._refusals_logged[reason] = (now, 0)

    def _current_tokens(self) -> Tokens:
        return self.tokens

    def _security_summary(self) -> str:
        parts = []
        if self._client_tls is not None:
            parts.append("TLS" + (" with client certificates" if self.config.tls_client_ca else ""))
        if self.tokens.clients_need_one:
            parts.append("client tokens" + (" (and read-only ones)" if self.tokens.read else ""))
        if self.tokens.peer:
            parts.append("peer tokens")
        return f"; {', '.join(parts)}" if parts else ""

    async def _reload_tokens(self) -> None:
        """Read the token files again whenever one is rewritten, so that tokens
        can be rotated without a restart: a bad file keeps the tokens in force."""
        config = self.config
        paths = (config.auth_token_file, config.read_token_file, config.peer_token_file)
        stamp = file_stamp(*paths)
        while True:
            await trio.sleep(TOKEN_RELOAD_INTERVAL)
            now = file_stamp(*paths)
            if now == stamp:
                continue
            stamp = now
            try:
                tokens = Tokens.from_files(client=paths[0], read=paths[1], peer=paths[2])
            except TokenError as exc:
                log.warning("keeping the tokens in force: %s", exc)
                continue
            if tokens != self.tokens:
                self.tokens = tokens
                log.info(
                    "token files read again: %d client, %d read-only and %d peer token(s) in force",
                    len(tokens.client),
                    len(tokens.read),
                    len(tokens.peer),
                )

    # -- membership ---------------------------------------------------------------

    def _apply_view(self, view: View, placed: ShardMap | None = None) -> None:
        """Route by ``view`` from now on (``placed``: its shard map, if built already)."""
        self._applied = view
        if not view.members:
            # etcd holds no member at all, not even this node (its data was
            # lost, or every lease lapsed at once): no key would have an
            # owner. Keep the last view until registrations come back, as
            # the keep-alive puts this node's back.
            if not self._leaving:
                log.warning("etcd lists no member, not even this node; keeping the last view")
            return
        old = self.router.shard_map
        arriving = set(self.placement.incoming)
        shard_map = self.placement.apply(view.epoch, view.ids(), _active(view), trio.current_time(), target=placed)
        self.router.shard_map = shard_map
        self.watch_hub.members_changed()
        self.router.client_addresses = {m.node_id: m.client_address for m in view.members}
        self.peers.update(shard_map.members)
        placement = self.placement
        for shard in placement.incoming.keys() - arriving - placement.sending:
            if placement.copies_kept.get(shard) != placement.incoming[shard]:  # (a copy kept for its holder stays current)
                self.store.drop_shard(shard)  # (what is left from when it was here before is stale)
        for shard in self.placement.emptied:
            self.store.drop_shard(shard)  # (its owner is gone, and no copy of it was kept here)
        if self.replicator is not None:
            self.replicator.prune()
        if self.placement.outgoing:
            self._more_to_hand.set()
        if self.placement.incoming:
            self._new_claims.set()
        if old.members != shard_map.members:
            log.info(
                "membership epoch %d: %d member(s) %s; this node owns %d of %d shards",
                view.epoch,
                len(shard_map.members),
                ", ".join(shard_map.members),
                shard_map.shards_owned(self.node_id),
                len(shard_map.shard_owners),
            )
            if self.node_id not in shard_map.members and not self._leaving:
                log.warning("this node is not in the membership view; forwarding every request")
            assert self._purge_needed is not None
            self._purge_needed.set()

    def _lapsed(self) -> None:
        """This node's lease ran out, so it was out of the cluster for a while:
        the others owned its shards and may have written its keys. Unless it
        was alone, what it holds may be stale; drop it all before it joins
        again (at once: a stale value must not be served meanwhile)."""
        if set(self.router.shard_map.members) - {self.node_id}:
            dropped = self.store.clear()
            # Take the next view as a first one: this node's shards come back from whoever served them meanwhile.
            self.placement.reset()
            if self.replicator is not None:
                self.replicator.reset()
            self._applied = View(0, ())
            log.warning("this node's lease lapsed; dropped its %d entries, which others may have changed meanwhile", dropped)

    async def _check_advertised(self) -> None:
        """Warn when this node's own --advertise address does not answer:
        the other nodes dial it, and would find every key this node owns
        unavailable."""
        host, port = split_address(self.node_id, DEFAULT_PEER_PORT)
        problem = f"no answer within {ADVERTISE_CHECK_TIMEOUT:g} s"
        with trio.move_on_after(ADVERTISE_CHECK_TIMEOUT):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                problem = str(exc)
            else:
                await stream.aclose()
                return
        log.warning("other nodes dial this node at %s (--advertise), which fails from here: %s", self.node_id, problem)

    def _vouch(self, until: float) -> None:
        """Membership vouches for its view until ``until`` (trio's clock), or
        no longer (``-math.inf``, the lease lapsed): the router answers keyed
        requests until then, from that view, so apply it first."""
        if self.membership is not None:
            self._catch_up(self.membership)
        self.router.vouched_until = until

    def _catch_up(self, membership: EtcdMembership | StandaloneMembership) -> None:
        """Apply membership's newest view unless its members are applied already.

        The newest, not each one published: a view queued for this node may
        be older than one the router was just told to vouch for.
        """
        view = membership.current()
        if view.members != self._applied.members:
            self._apply_view(view)

    async def _follow_views(
        self, membership: EtcdMembership | StandaloneMembership, views: trio.MemoryReceiveChannel[View]
    ) -> None:
        async with views:
            async for _ in views:
                self._catch_up(membership)

    async def _purge_unowned(self) -> None:
        """Drop entries of shards this node neither serves nor waits for, after
        each change (handed-over shards are dropped when acknowledged; this
        catches the rest, such as entries set aside when views disagreed).

        They would be stale if their shards came back to this node later,
        and they hold memory nobody can reach.
        """
        placement = self.placement
        while True:
            assert self._purge_needed is not None
            await self._purge_needed.wait()
            self._purge_needed = trio.Event()
            dropped = work = 0
            for shard in self.store.shards():
                owners = placement.owners  # the newest, shard by shard
                if (
                    owners
                    and owners[shard] != self.node_id
                    and shard not in placement.incoming
                    and shard not in placement.sending
                    and shard not in placement.copies_kept
                    and shard not in placement.copies_begun
                ):
                    dropped += self.store.drop_shard(shard)
                    work += 1
                    if work % 64 == 0:
                        await trio.sleep(0)
            if dropped:
                log.info("dropped %d entries of shards now owned by other nodes", dropped)

    def _take_handoff(self, peer: str, op: str, args: dict[str, Any]) -> Any:
        """Entries another node hands this one, its claim on shards, or the
        writes of a shard this node keeps a copy of (the router's ``handoff``)."""
        if op == "claim":
            answer = self.placement.answer_claim(peer, args["shards"])
            if self.placement.outgoing:  # (it may hand a copy kept here to the claimant)
                self._more_to_hand.set()
            return answer
        if op == "replicate":
            return take(self.placement, self.store, peer, args)
        if op == "copies":
            return held_for(self.placement, peer)
        reply, onward = absorb(self.placement, self.store, peer, args, trio.current_time())
        if onward:
            self._more_to_hand.set()
        if self.replicator is not None and args["done"]:
            self.replicator.wake.set()  # (shards arrived: copies to make)
        return reply

    # -- watchers -------------------------------------------------------------------

    def _watched(self) -> None:
        """Someone reads the event log: record the changes to this node's keys."""
        if self.store.on_change is None:
            self.events.resume()
            self.store.on_change = self._changed

    async def _poll_events(self, member: str, args: dict[str, Any]) -> tuple[int, Any]:
        """A read of ``member``'s event log for this node's watch feeds."""
        if member == self.node_id:
            return await self.router.read_events(args)
        [(status, body)] = await self.peers.forward(member, [("events", args)])
        return status, body

    def _changed(self, kind: str, ns: str, key: bytes) -> None:
        if not self.events.active:  # (no reader for a while: stop recording)
            self.store.on_change = None
            return
        if self.router.shard_map.owner(ns, key) == self.node_id:  # (a copy here changes as its owner's does)
            self.events.append(kind, ns, key)

    # -- upkeep ---------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            late = self.placement.give_up_waiting(trio.current_time())
            if late:
                log.warning("the entries of %d shard(s) did not arrive in time; serving them empty", len(late))
            if self.store.sweep(SWEEP_BATCH) < SWEEP_BATCH:
                await trio.sleep(self.config.sweep_interval)
            else:
                await trio.sleep(0)

    # -- connections ----------------------------------------------------------------

    def _connection_closed(self) -> None:
        self.connections -= 1

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery, peer_port: bool) -> None:
        """Accept connections for as long as the node runs, each handed to a
        task of its own for its handshake. (Not trio.serve_listeners: it closes
        a connection when its task ends, and a connection the reactor adopted
        outlives the task that adopted it.)"""
        async with listener:  # closed when the node stops, so that its port is free at once
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_ERRORS:
                        raise
                    log.warning("cannot accept a connection (%s); trying again in %g s", exc.strerror or exc, ACCEPT_BACKOFF)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                nursery.start_soon(self._serve_connection, stream, peer_port)

    async def _serve_connection(self, stream: trio.SocketStream, peer_port: bool = False) -> None:
        config = self.config
        refuse = self.router.counters.refuse
        remote = _remote_name(stream)
        host = split_address(remote, 0)[0] if remote != "?" else remote
        if self.connections >= config.max_connections:
            refuse("max_connections")
            self._warn_refused("max_connections", f"{remote}: {self.connections} connections already open (--max-connections)")
            await trio.aclose_forcefully(stream)
            return
        if self._by_address.get(host, 0) >= config.max_connections_per_address:
            refuse("max_connections_per_address")
            self._warn_refused(
                "max_connections_per_address",
                f"{remote}: {self._by_address[host]} already open from that address (--max-connections-per-address)",
            )
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        self._by_address[host] = self._by_address.get(host, 0) + 1
        conn = None
        adopted = False
        counted = _AddressCount(self._by_address, host)
        hello_by = trio.current_time() + config.hello_timeout
        try:
            tls = self._peer_tls if peer_port else self._client_tls
            # TLS: run by the reactor around the socket where it serves the
            # connection (one wake-up for many, as plain ones), else by a trio
            # SSLStream for the connection's own task.
            reactor_tls = tls is not None and config.reactor and self.reactor.available()
            wrapped: trio.abc.Stream = stream if tls is None or reactor_tls else trio.SSLStream(stream, tls, server_side=True)
            conn = await transport.accept(
                wrapped,
                max_message=config.limits.max_frame_bytes,
                budget=self.unfinished,
                poll=config.busy_poll,
                timeout=hello_by - trio.current_time(),
                tls=tls if reactor_tls else None,
                on_refused=refuse,
            )
            if conn is None:
                return
            session = ServerSession(remote, tokens=self._current_tokens, peer_port=peer_port)
            tokens = self.tokens
            if tokens.clients_need_one or (peer_port and tokens.peer):
                # A stranger cannot make the node decode a large message (lifted once it has said hello).
                conn.proto.restrict(MAX_HELLO_MESSAGE)
            if config.reactor and self.reactor.can_serve(conn):
                # The reactor serves it from now on, and closes it (and gives its address count back).
                self.reactor.adopt(conn, session, on_close=counted.release, hello_by=hello_by)
                adopted = True
                return
            await self._serve_messages(conn, session, hello_by)
        except Exception:
            # A bug must cost one connection, never the node.
            log.exception("connection handler failed; closing that connection")
        except BaseException as exc:  # trio.Cancelled, alone or grouped by the connection's nursery
            if conn is not None and _only_cancelled(exc):  # the node is stopping: say so, if it can be said at once
                conn.close_now(wsframe.CLOSE_GOING_AWAY, "the node is shutting down")
            raise
        finally:
            if not adopted:
                self.connections -= 1
                counted.release()
                if conn is not None:
                    conn.release()
                await trio.aclose_forcefully(stream)

    async def _serve_messages(self, conn: transport.Connection, session: ServerSession, hello_by: float = math.inf) -> None:
        """Answer requests until the connection closes.

        What the router answers at once goes back at once; what waits for
        other nodes is awaited by a task of its own, which sends its replies
        when they come, so a slow owner holds up no other request on the
        connection. At most ``max_in_flight`` frames wait at a time, and a
        frame sent to a peer link that has all it may hold in flight holds
        up the next read until the link has room.

        One deadline guards both a silent client (after ``idle_timeout`` it
        gets a ping, and is closed if another ``idle_timeout`` passes with
        nothing from it) and one that stops reading replies. It is one
        cancel scope whose deadline moves, and moves only when half of it
        is used up: this loop runs once per request.
        """
        idle = self.config.idle_timeout
        clock = trio.lowlevel.current_clock()
        pinged_at: int | None = None  # conn.reads when we pinged
        sending = False
        waits = _Waits()
        async with trio.open_nursery() as later:
            later.start_soon(self._hello_deadline, conn, session, hello_by)
            try:
                while True:
                    with trio.CancelScope(deadline=clock.current_time() + idle) as deadline:
                        try:
                            while True:
                                payloads = await conn.receive()
                                pinged_at = None
                                now = clock.current_time()
                                if deadline.deadline - now < idle / 2:
                                    deadline.deadline = now + idle
                                reply, waiting = self.router.place(session, payloads)
                                if conn.proto.restricted and session.greeted:
                                    conn.proto.unrestrict()
                                if waiting is not None:
                                    # Owned by its task before anything here can fail:
                                    # what placement handed to peer links is always released.
                                    waits.count += 1
                                    later.start_soon(self._send_later, conn, waiting, waits, session)
                                if reply is not None:
                                    sending = True
                                    await conn.send(reply)
                                    sending = False
                                    if session.refused:  # its token
                                        await conn.aclose(wsframe.CLOSE_POLICY_VIOLATION, "unauthorized")
                                        return
                                if waiting is not None:
                                    await self._make_room(waiting, waits)
                        except ConnectionClosed as exc:
                            log.debug("connection from %s closed: %s", session.remote, exc)
                            if isinstance(exc, ProtocolViolation):
                                self.router.counters.refuse(violation(exc))
                            return
                    if sending:
                        log.info("closing connection from %s: it stopped reading replies", session.remote)
                        return
                    # Idle: ask once whether the other side is still there, then give
                    # up if not even a pong came back.
                    if pinged_at == conn.reads:
                        log.debug("closing idle connection from %s", session.remote)
                        self.router.counters.refuse("idle")
                        await conn.aclose(1001, "idle")
                        return
                    pinged_at = conn.reads
                    try:
                        await conn.ping()
                    except ConnectionClosed:
                        return
            finally:
                later.cancel_scope.cancel()  # replies to a connection that is gone have nowhere to go

    async def _hello_deadline(self, conn: transport.Connection, session: ServerSession, hello_by: float) -> None:
        """Close ``conn`` if it has not said hello by ``hello_by``: a stranger may not hold a connection open for free."""
        await trio.sleep_until(hello_by)
        if not session.greeted:
            self.router.counters.refuse("hello_timeout")
            log.debug("closing connection from %s: no hello within %g s", session.remote, self.config.hello_timeout)
            await conn.aclose(wsframe.CLOSE_POLICY_VIOLATION, "no hello in time")

    async def _make_room(self, waiting: Waiting, waits: _Waits) -> None:
        """Read no more from a connection while it has too much waiting."""
        while waits.count >= self.config.max_in_flight:
            await waits.lot.park()
        crowded = self.peers.crowded(waiting.owners())
        if crowded is not None:
            await self.peers.room(crowded)

    async def _send_later(self, conn: transport.Connection, waiting: Waiting, waits: _Waits, session: ServerSession) -> None:
        try:
            reply = await waiting.finish()
            with trio.move_on_after(self.config.idle_timeout) as scope:
                await conn.send(reply)
            if scope.cancelled_caught:
                log.info("closing connection from %s: it stopped reading replies", session.remote)
                await conn.aclose(wsframe.CLOSE_GOING_AWAY, "replies were not read")
        except ConnectionClosed:
            pass  # the reading task sees it too, and ends the connection
        finally:
            waits.count -= 1
            waits.lot.unpark()


class _AddressCount:
    """A connection's place in the count of connections from its address, given back once."""

    __slots__ = ("_counts", "_host")

    def __init__(self, counts: dict[str, int], host: str) -> None:
        self._counts = counts
        self._host = host

    def release(self) -> None:
        if self._host:
            left = self._counts[self._host] - 1
            if left:
                self._counts[self._host] = left
            else:
                del self._counts[self._host]
            self._host = ""


class _Waits:
    """How many frames of one connection wait for other nodes, and who waits for room."""

    __slots__ = ("count", "lot")

    def __init__(self) -> None:
        self.count = 0
        self.lot = trio.lowlevel.ParkingLot()


async def gather_members(
    *,
    node_id: str,
    shard_map: ShardMap,
    client_addresses: dict[str, str],
    own_stats: Callable[[], dict[str, Any]],
    peers: Forwarder | None,
) -> dict[str, Any]:
    """Every member of ``shard_map`` with its client address, shards, state
    and counters (``own_stats`` for this node; asked of the others over
    ``peers``, concurrently, each within :data:`MEMBER_STATS_TIMEOUT`)."""
    rows: dict[str, dict[str, Any]] = {}

    async def ask(member: str) -> None:
        row: dict[str, Any] = {
            "node": member,
            "client": client_addresses.get(member, ""),
            "shards": shard_map.shards_owned(member),
            "state": "up",
            "stats": {},
        }
        rows[member] = row
        if member == node_id:
            row["stats"] = own_stats()
            return
        if peers is None:
            row["state"] = "unreachable"
            return
        with trio.move_on_after(MEMBER_STATS_TIMEOUT):
            try:
                [(status, body)] = await peers.forward(member, [("stats", {})])
            except Exception as exc:  # PeerUnavailable and anything odd from a peer
                row["state"] = "unreachable"
                row["error"] = str(exc)
                return
            if status == Status.OK and isinstance(body, dict):
                row["stats"] = body
                return
        row["state"] = "unreachable"

    async with trio.open_nursery() as nursery:
        for member in shard_map.members:
            nursery.start_soon(ask, member)
    return {"epoch": shard_map.epoch, "members": [rows[m] for m in shard_map.members]}


def _active(view: View) -> tuple[str, ...]:
    """The members that own shards: those not leaving."""
    return tuple(m.node_id for m in view.members if not m.leaving)


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


def _remote_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return join_address(host, port)
    except (OSError, AttributeError):
        return "?"


async def _open_listeners(host: str, port: int, flag: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise NodeStartError(f"{flag} {join_address(host, port)}: {exc.strerror or exc}") from None
