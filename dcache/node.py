"""A dcache node: listeners, the router and its store, background upkeep.

:meth:`Node.run` owns one nursery with everything the node runs; cancelling
it (Ctrl-C, SIGTERM, a test leaving its nursery) stops the node at once, and
every connection is closed on the way out.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from . import __version__, transport
from .codec import Limits
from .router import Router, Session
from .shard import ShardMap
from .store import Store

log = logging.getLogger(__name__)

DEFAULT_CLIENT_PORT = 48000
DEFAULT_PEER_PORT = 47000
SWEEP_INTERVAL = 0.1
SWEEP_BATCH = 1000
IDLE_TIMEOUT = 30.0
SEND_TIMEOUT = 30.0
MAX_CONNECTIONS = 10_000


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node is told at start; passed down, never mutated."""

    client_listen: str = f"localhost:{DEFAULT_CLIENT_PORT}"
    listen: str = f"localhost:{DEFAULT_PEER_PORT}"
    advertise: str | None = None
    limits: Limits = field(default_factory=Limits)
    sweep_interval: float = SWEEP_INTERVAL
    idle_timeout: float = IDLE_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    max_connections: int = MAX_CONNECTIONS

    @property
    def node_id(self) -> str:
        return self.advertise or self.listen


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    """Where a started node actually listens (ports resolved when 0 was asked)."""

    client: tuple[str, int]
    peer: tuple[str, int]

    @property
    def client_address(self) -> str:
        return _join(*self.client)

    @property
    def peer_address(self) -> str:
        return _join(*self.peer)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def process_memory_bytes() -> int:
    """Resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = Store(clock=trio.current_time)
        self.router = Router(
            store=self.store,
            node_id=config.node_id,
            limits=config.limits,
            shard_map=ShardMap.build(0, [config.node_id]),
            node_info=self._node_info,
            server_name=f"dcache {__version__}",
        )
        self.connections = 0
        self._started_at = 0.0

    def _node_info(self) -> dict[str, Any]:
        return {
            "uptime_s": round(trio.current_time() - self._started_at, 3),
            "process_memory_bytes": process_memory_bytes(),
            "connections": self.connections,
            "version": __version__,
        }

    async def run(self, *, task_status: trio.TaskStatus[BoundAddresses] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. ``task_status.started`` gets the bound addresses."""
        config = self.config
        self._started_at = trio.current_time()
        client_host, client_port = transport.split_address(config.client_listen, DEFAULT_CLIENT_PORT)
        peer_host, peer_port = transport.split_address(config.listen, DEFAULT_PEER_PORT)
        client_listeners = await _open_listeners(client_host, client_port, "--client-listen")
        peer_listeners = await _open_listeners(peer_host, peer_port, "--listen")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep)
            nursery.start_soon(trio.serve_listeners, self._serve_connection, client_listeners)
            nursery.start_soon(trio.serve_listeners, self._serve_connection, peer_listeners)
            bound = BoundAddresses(
                client=(client_host, client_listeners[0].socket.getsockname()[1]),
                peer=(peer_host, peer_listeners[0].socket.getsockname()[1]),
            )
            log.info(
                "dcache %s ready: clients on %s, peers on %s, node id %s, standalone",
                __version__,
                bound.client_address,
                bound.peer_address,
                config.node_id,
            )
            task_status.started(bound)

    async def _sweep(self) -> None:
        while True:
            if self.store.sweep(SWEEP_BATCH) < SWEEP_BATCH:
                await trio.sleep(self.config.sweep_interval)
            else:
                await trio.sleep(0)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        config = self.config
        if self.connections >= config.max_connections:
            log.warning("refusing a connection: %d connections already open", self.connections)
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            conn = await transport.accept(stream, max_message=config.limits.max_frame_bytes)
            if conn is not None:
                await self._serve_messages(conn, Session(peer=_peer_name(stream)))
        except Exception:
            # A bug must cost one connection, never the node.
            log.exception("connection handler failed; closing that connection")
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_messages(self, conn: transport.Connection, session: Session) -> None:
        config = self.config
        pinged = False
        while True:
            payloads = None
            try:
                with trio.move_on_after(config.idle_timeout):
                    payloads = await conn.receive()
                if payloads is None:
                    # Idle: ask once whether the peer is still there, then give up.
                    if pinged and trio.current_time() - conn.last_received >= config.idle_timeout:
                        log.debug("closing idle connection from %s", session.peer)
                        await conn.aclose(1001, "idle")
                        return
                    pinged = True
                    await conn.ping()
                    continue
                pinged = False
                reply = await self.router.handle(session, payloads)
                with trio.move_on_after(config.send_timeout) as scope:
                    await conn.send(reply)
                if scope.cancelled_caught:
                    log.info("closing connection from %s: it stopped reading replies", session.peer)
                    return
            except transport.ConnectionClosed as exc:
                log.debug("connection from %s closed: %s", session.peer, exc)
                return


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return _join(host, port)
    except (OSError, AttributeError):
        return "?"


async def _open_listeners(host: str, port: int, flag: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise NodeStartError(f"{flag} {_join(host, port)}: {exc.strerror or exc}") from None


class NodeStartError(Exception):
    """The node could not start (a port in use, a bad address); the message says which."""
