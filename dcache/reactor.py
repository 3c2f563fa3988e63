"""Many connections served by one task: a wake-up per batch of ready connections, not one per request.

On a virtual machine, waking a task costs more than a loopback round trip,
and a trio task per connection pays that for every request. The
:class:`Reactor` instead waits on one epoll set holding every connection it
serves; when it wakes, it reads each ready connection once, hands what it
read to the connection's :class:`protocol.Connection` and the router's
:meth:`Router.place`, and writes the replies straight to the socket. So a
wake-up is shared by every connection that was ready, however many.

What must wait does not hold the reactor up:

* Requests for other nodes' keys: the router hands them to peer links at
  once. A keyed request that came alone in its frame (the usual case) is
  completed from the reactor's own loop: it sends the peer link's outbox
  after the pass, holds the link's socket in its epoll set, reads the
  owner's reply when it comes and writes it to the client, so a forwarded
  request costs no task and no wake-up of its own. Anything else (a batch,
  a reply that needs more than passing on, a link not up) is awaited by a
  task of the reactor's nursery, which writes the reply.
* A write the socket cannot take whole: the rest goes to the connection's
  own buffer, which a task drains as the socket allows; meanwhile the
  reactor appends that connection's replies to the buffer, in order, and
  reads no more from it once the buffer holds :data:`MAX_UNSENT` bytes.

A connection with ``max_waiting`` frames (:data:`MAX_WAITING` by default) waiting for other nodes, or
whose last frame went to a peer link that is full, is not read until there
is room. An idle connection costs nothing but its memory: it gets a ping
after ``idle_timeout`` without traffic and is closed if another passes
without even a pong. The reactor is a task of the node's nursery; when it
stops, it tells its clients (a close frame, 1001) where that can be said at
once, and closes their sockets.

Connections over TLS are served the same way: the handshake is run by a
:class:`dcache.security.TlsLayer` (an :class:`ssl.SSLObject` over memory
buffers) when the connection is accepted, and the reactor decrypts what it
reads and encrypts what it sends, in order, around the plain socket. Other
streams (tests' memory streams; TLS when the reactor is off) keep a task
each (see :meth:`Reactor.can_serve`).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import trio

from . import wsframe
from .errors import ConnectionLost
from .net import RECEIVE_SIZE
from .protocol import Connection as Proto
from .protocol import ConnectionClosed, ProtocolViolation, ServerSession, violation
from .protocol import State as ProtoState
from .router import Router, Waiting
from .security import TlsLayer
from .transport import Connection, plain_socket, tasks_runnable, watch_set

log = logging.getLogger(__name__)

MAX_WAITING = 256  # frames of one connection waiting for other nodes at once
MAX_UNSENT = 1 << 20  # bytes of replies a connection has not taken before it is read no more
POLL_BACKOFF_MAX = 64
IDLE_CHECKS = 4  # looks at every connection per idle timeout
SPIN_SLICE = 50e-6  # seconds the reactor's poll runs between trips through trio's scheduler
PASSES_PER_YIELD = 16  # passes over ready connections between trips through trio's scheduler, at most
_yield_cpu = getattr(os, "sched_yield", lambda: None)


class _Entry:
    """One connection the reactor serves."""

    __slots__ = (
        "fd",
        "sock",
        "trio_sock",
        "proto",
        "session",
        "unsent",
        "draining",
        "waiting",
        "paused",
        "closed",
        "reads_seen",
        "quiet_since",
        "pinged_at",
        "later",
        "crowded",
        "relays",
        "on_close",
        "tls",
    )

    def __init__(
        self, sock: socket.socket, trio_sock: Any, proto: Proto, session: ServerSession, on_close: Callable[[], None] | None
    ) -> None:
        self.fd = sock.fileno()
        self.sock = sock
        self.trio_sock = trio_sock  # closed through trio, so that any task waiting on it wakes
        self.proto = proto
        self.session = session
        self.unsent = bytearray()  # replies the socket has not taken yet, in order
        self.draining = False  # a task is writing ``unsent`` as the socket allows
        self.waiting = 0  # frames waiting for other nodes
        self.paused = False  # not read, for now (see Reactor._pause)
        self.closed = False
        self.reads_seen = -1  # proto.reads at the last idle check
        self.quiet_since = 0.0  # when the idle checks last saw it read
        self.pinged_at: float | None = None
        self.later: set[trio.CancelScope] = set()  # of the tasks sending its waiting frames' replies
        self.crowded = 0  # tasks waiting for room on a peer link it sent to
        self.relays: set[Waiting] = set()  # relayed requests the reactor completes (see Reactor._relayed)
        self.on_close = on_close
        self.tls: TlsLayer | None = None  # TLS around the socket: bytes are decrypted after recv, encrypted before send


class Reactor:
    """Serves connections handed over by :meth:`adopt` from one task; see the module docstring.

    ``on_close`` is called once per connection when it is done (the node
    counts its connections). ``poll`` is how long the reactor spins on its
    epoll set for more work before sleeping, as :class:`net.BusyPoll` does
    for one socket (0: never).
    """

    def __init__(
        self,
        *,
        router: Router,
        idle_timeout: float,
        on_close: Callable[[], None],
        poll: float = 0.0,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._router = router
        self._max_waiting = max_waiting
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self._poll = poll
        self._skip = 0
        self._penalty = 1
        self._entries: dict[int, _Entry] = {}
        self._replies: list[tuple[_Entry, bytes]] = []  # this pass's, sent at its end
        self._in_pass = False
        self._links: dict[int, Any] = {}  # peer links' channels by socket, read when ready
        self._outgoing: dict[Any, None] = {}  # peer links' channels with requests to send after the pass
        self._yield_soon = False  # a task reads a link that is ready: let it run
        self._epoll: Any = None
        self._nursery: trio.Nursery | None = None
        self._hellos: list[tuple[float, int, _Entry]] = []  # a heap of connections not greeted yet, by deadline
        self._adopted = 0  # (ties in the heap go by adoption)
        self._hello_due = trio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def available() -> bool:
        """Whether this system lets a reactor serve connections (it needs epoll)."""
        return hasattr(select, "epoll")

    @staticmethod
    def can_serve(conn: Connection) -> bool:
        return Reactor.available() and plain_socket(conn.stream) is not None

    def adopt(
        self, conn: Connection, session: ServerSession, *, on_close: Callable[[], None] | None = None, hello_by: float = math.inf
    ) -> None:
        """Serve ``conn`` from now on (it passed its handshake); the reactor
        owns it. ``on_close`` is called when it is closed; it is closed at
        ``hello_by`` (trio's clock) if it has not said hello by then."""
        assert self._epoll is not None, "Reactor.run must be started first"
        sock = plain_socket(conn.stream)
        assert sock is not None
        stream = conn.stream
        assert isinstance(stream, trio.SocketStream)
        entry = _Entry(sock, stream.socket, conn.proto, session, on_close)
        entry.tls = conn.tls
        self._epoll.register(entry.fd, select.EPOLLIN)  # first: if it fails, nothing is left half done
        self._entries[entry.fd] = entry
        if hello_by < math.inf:
            self._adopted += 1
            heapq.heappush(self._hellos, (hello_by, self._adopted, entry))
            self._hello_due.set()
        self._links.pop(entry.fd, None)  # a closed link's, if its number is reused
        conn.stop_watching()  # busy polls of peer links need not give way to what the reactor reads
        ready = conn.take_ready()
        if ready:  # requests that came with the handshake
            self._place(entry, ready)
            self._send_replies()

    def _send_replies(self) -> None:
        """Send the peer links' outboxes (the owners start on them at once), then the pass's replies."""
        while self._outgoing or self._replies:
            if self._outgoing:
                channels, self._outgoing = self._outgoing, {}
                for channel in channels:
                    channel.send_nowait()
            replies, self._replies = self._replies, []
            self._send(replies)

    # -- the loop ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._epoll = epoll = select.epoll()
        # In the set busy polls give way to: a peer link's task polling for
        # a reply while the reactor sleeps stops as soon as a client sends.
        watch = watch_set() if self._poll else None
        if watch is not None:
            watch.register(epoll.fileno(), select.EPOLLIN)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_idle)
                nursery.start_soon(self._watch_hellos)
                task_status.started()
                passes = 0
                while True:
                    events = epoll.poll(0)
                    if not events and self._poll and self._wanted():
                        events = await self._spin(epoll)
                    if not events:
                        passes = 0
                        await trio.lowlevel.wait_readable(epoll)
                        continue
                    entries = self._entries
                    self._in_pass = True
                    for fd, _ in events:
                        entry = entries.get(fd)
                        if entry is None:
                            channel = self._links.get(fd)
                            if channel is not None:
                                self._read_link(fd, channel)
                            continue
                        if entry.paused:  # reported only for a hang-up or an error: the other side is gone
                            self._close(entry)
                        else:
                            self._serve(entry)
                    # The replies go out together, after the pass: the first send may
                    # wake a client that waits; the rest then mostly find theirs awake,
                    # where a send each as soon as it is ready wakes a sleeper each.
                    self._send_replies()
                    self._in_pass = False
                    # Let the tasks this pass woke (replies from peers, writers) run
                    # before the next, and trio look at the sockets it watches now
                    # and then; else go straight on: a trip through the scheduler
                    # costs more than a pass.
                    passes += 1
                    if passes >= PASSES_PER_YIELD or tasks_runnable() or self._yield_soon:
                        passes = 0
                        self._yield_soon = False
                        await trio.lowlevel.checkpoint()
        finally:
            self.close_all()
            if watch is not None:
                try:
                    watch.unregister(epoll.fileno())
                except (OSError, ValueError):  # the run's set is closed already
                    pass
            self._nursery = None
            epoll.close()

    def close_all(self) -> None:
        """Close every connection, saying the node is going away: what they
        wait for is given up, and their clients try elsewhere."""
        for entry in list(self._entries.values()):
            self._close(entry, wsframe.CLOSE_GOING_AWAY, "the node is shutting down")

    def _wanted(self) -> bool:
        if self._skip:
            self._skip -= 1
            return False
        return True

    async def _spin(self, epoll: Any) -> list[tuple[int, int]]:
        """Poll the epoll set for up to the poll window before sleeping; back
        off after a window that found nothing.

        Each turn yields the CPU (other processes, such as the clients, may
        need it), and every :data:`SPIN_SLICE` the poll passes through trio's
        scheduler, so that tasks woken meanwhile (by a timer, or I/O trio
        watches) and tasks due later in the same scheduler pass as this one
        get their turn: a spin that waited for trio to report runnable tasks
        would hold those up for the whole window. A pass costs as much as a
        turn, so not on every turn."""
        now = time.perf_counter()
        until = now + self._poll
        while True:
            await trio.lowlevel.checkpoint()
            slice_ends = min(until, time.perf_counter() + SPIN_SLICE)
            while True:
                events: list[tuple[int, int]] = epoll.poll(0)
                if events:
                    self._penalty = 1
                    return events
                now = time.perf_counter()
                if now >= slice_ends or tasks_runnable():
                    break
                _yield_cpu()
            if now >= until:
                self._skip = self._penalty
                self._penalty = min(2 * self._penalty, POLL_BACKOFF_MAX)
                return []

    def _serve(self, entry: _Entry) -> None:
        """Read ``entry`` once; answer what it brought."""
        try:
            data = entry.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._close(entry)
            return
        if entry.tls is not None and data:
            try:
                data = entry.tls.receive(data)
            except EOFError:  # its close_notify: the connection is over
                self._close(entry)
                return
            except ssl.SSLError as exc:
                log.debug("TLS from %s failed: %s", entry.session.remote, exc)
                self._close(entry)
                return
            if not data:  # part of a record
                return
        try:
            messages = entry.proto.receive_data(data)
        except ConnectionClosed as exc:
            log.debug("connection from %s closed: %s", entry.session.remote, exc)
            if isinstance(exc, ProtocolViolation):
                self._router.counters.refuse(violation(exc))
            self._close(entry, last=entry.proto.data_to_send())
            return
        except Exception:  # a bug must cost one connection, never the node
            log.exception("connection handler failed; closing that connection")
            self._close(entry)
            return
        if entry.proto.state is ProtoState.CLOSED:
            # A close frame came after these messages: answer them, then close
            # (our close frame last: nothing may follow it).
            last = entry.proto.data_to_send()
            if messages:
                self._place(entry, messages)
                mine = [reply for reply in self._replies if reply[0] is entry]
                self._replies = [reply for reply in self._replies if reply[0] is not entry]
                self._send(mine)
            self._close(entry, last=last)
            return
        if entry.proto.has_data_to_send:  # pongs
            self._replies.append((entry, entry.proto.data_to_send()))
        if messages:
            self._place(entry, messages)

    def _place(self, entry: _Entry, messages: list[bytes]) -> None:
        waiting: Waiting | None = None
        handed = False  # to the reactor's relays or a task, which release it when done
        try:
            reply, waiting = self._router.place(entry.session, messages)
            if entry.proto.restricted and entry.session.greeted:
                entry.proto.unrestrict()
            if waiting is not None:
                entry.waiting += 1
                channel = waiting.notify(partial(self._relayed, entry, waiting))
                if channel is not None:
                    entry.relays.add(waiting)
                    handed = True
                    self._watch_link(channel)
                    self._outgoing[channel] = None
                else:
                    self._later(entry, waiting)
                    handed = True
        except Exception:
            log.exception("connection handler failed; closing that connection")
            if waiting is not None and not handed:
                with contextlib.suppress(Exception):
                    waiting.release()
            self._close(entry)
            return
        if reply is not None:
            if entry.session.refused:  # its token: the refusal goes out now, then the connection is closed
                self._write(entry, entry.proto.frame(reply))
                self._close(entry, wsframe.CLOSE_POLICY_VIOLATION, "unauthorized")
                return
            self._replies.append((entry, entry.proto.frame(reply)))
        if waiting is not None:
            if entry.waiting >= self._max_waiting:
                self._pause(entry, "in_flight")
            peers = self._router.peers
            crowded = peers.crowded(waiting.owners()) if peers is not None else None
            if crowded is not None:
                self._pause(entry)
                assert self._nursery is not None
                self._nursery.start_soon(self._resume_when_room, entry, crowded)

    # -- writing ----------------------------------------------------------------------------

    def _write(self, entry: _Entry, data: bytes) -> None:
        """Send ``data`` now if the socket takes it, else keep it for the entry's drain task."""
        self._send(((entry, data),))

    def _send(self, replies: Iterable[tuple[_Entry, bytes]]) -> None:
        for entry, data in replies:
            if entry.closed:
                continue
            if entry.tls is not None:  # (in the order sent: records are numbered)
                data = entry.tls.wrap(data)
            if entry.unsent:  # a drain is under way: after what waits, in order
                self._keep(entry, data)
                continue
            try:
                sent = entry.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(entry)
                continue
            if sent < len(data):
                self._keep(entry, data[sent:])

    def _keep(self, entry: _Entry, data: bytes) -> None:
        """Keep what the socket did not take for the entry's drain task, which is started if need be."""
        entry.unsent += data
        if len(entry.unsent) > MAX_UNSENT:
            self._pause(entry, "unread_replies")
        if not entry.draining:
            entry.draining = True
            assert self._nursery is not None
            self._nursery.start_soon(self._drain, entry)

    async def _drain(self, entry: _Entry) -> None:
        """Write what the socket would not take at once, as it takes it."""
        try:
            while entry.unsent and not entry.closed:
                with trio.move_on_after(self._idle_timeout) as scope:
                    await trio.lowlevel.wait_writable(entry.sock)
                if scope.cancelled_caught:
                    log.info("closing connection from %s: it stopped reading replies", entry.session.remote)
                    self._close(entry)
                    return
                try:
                    sent = entry.sock.send(entry.unsent)
                except BlockingIOError:
                    continue
                except OSError:
                    self._close(entry)
                    return
                del entry.unsent[:sent]
            self._resume_if_room(entry)
        except (trio.ClosedResourceError, ValueError):  # the connection was closed meanwhile
            self._close(entry)
        finally:
            entry.draining = False

    # -- what waits for other nodes ------------------------------------------------------------

    def _relayed(self, entry: _Entry, waiting: Waiting, frame: bytes | None) -> None:
        """A relayed request's reply came (see :meth:`Waiting.notify`): send it
        with the pass's replies, or at once when a task read it. None: a task
        finishes it, as any frame that waits for other nodes."""
        entry.relays.discard(waiting)
        if entry.closed:
            return
        try:
            if frame is None:
                self._later(entry, waiting)
                return
            entry.waiting -= 1
            reply = entry.proto.frame(frame)
            if self._in_pass:
                self._replies.append((entry, reply))
            else:
                self._write(entry, reply)
            self._resume_if_room(entry)
        except Exception:  # a bug must cost one connection, never the node
            log.exception("connection handler failed; closing that connection")
            self._close(entry)

    def _later(self, entry: _Entry, waiting: Waiting) -> None:
        if self._nursery is None:  # the reactor has stopped: nobody to answer
            waiting.release()
            return
        self._nursery.start_soon(self._send_later, entry, waiting)

    def _watch_link(self, channel: Any) -> None:
        """Read ``channel``'s socket from the loop when it is ready, from now on."""
        fd = channel.fileno()
        if self._links.get(fd) is channel:
            return
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # a closed link's number, reused
            self._epoll.modify(fd, select.EPOLLIN)
        self._links[fd] = channel

    def _read_link(self, fd: int, channel: Any) -> None:
        if channel.broken is not None or channel.fileno() != fd:  # it failed, or was closed
            del self._links[fd]
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            return
        try:
            if not channel.read_nowait():
                self._yield_soon = True
        except Exception:  # a bug must cost that link, never the node
            log.exception("reading a peer link failed; closing it")
            channel.fail(ConnectionLost(f"reading {channel.name} failed"))

    async def _send_later(self, entry: _Entry, waiting: Waiting) -> None:
        with trio.CancelScope() as scope:
            entry.later.add(scope)  # cancelled if the connection closes first: nobody to reply to
            try:
                reply = await waiting.finish()
                self._write(entry, entry.proto.frame(reply))
            except Exception:  # a bug must cost one connection, never the node
                log.exception("connection handler failed; closing that connection")
                self._close(entry)
            finally:
                entry.later.discard(scope)
                entry.waiting -= 1
                self._resume_if_room(entry)

    async def _resume_when_room(self, entry: _Entry, node_id: str) -> None:
        peers = self._router.peers
        assert peers is not None
        entry.crowded += 1
        try:
            await peers.room(node_id)
        finally:
            entry.crowded -= 1
        self._resume_if_room(entry)

    def _resume_if_room(self, entry: _Entry) -> None:
        if entry.paused and entry.waiting < self._max_waiting and len(entry.unsent) <= MAX_UNSENT and not entry.crowded:
            self._resume(entry)

    def _pause(self, entry: _Entry, reason: str = "") -> None:
        """Read ``entry`` no more for now: it has too much waiting (``reason``
        counted), or sent to a peer link that is full."""
        if not entry.paused and not entry.closed:
            if reason:
                self._router.counters.refuse(reason)
            entry.paused = True
            self._epoll.modify(entry.fd, 0)

    def _resume(self, entry: _Entry) -> None:
        if entry.paused and not entry.closed:
            entry.paused = False
            self._epoll.modify(entry.fd, select.EPOLLIN)

    # -- idle connections and the end ------------------------------------------------------------

    async def _watch_idle(self) -> None:
        """Look at every connection four times per ``idle_timeout``: one that
        sent nothing for ``idle_timeout`` gets a ping, and one that sent
        nothing, not even a pong, for another ``idle_timeout`` is closed. It
        costs the requests nothing: each connection counts its reads anyway."""
        idle = self._idle_timeout
        while True:
            await trio.sleep(idle / IDLE_CHECKS)
            now = trio.current_time()
            for entry in list(self._entries.values()):
                reads = entry.proto.reads
                if reads != entry.reads_seen or entry.waiting or entry.unsent:  # busy, on either side
                    entry.reads_seen = reads
                    entry.quiet_since = now
                    entry.pinged_at = None
                elif entry.pinged_at is not None:
                    if now - entry.pinged_at >= idle:
                        log.debug("closing idle connection from %s", entry.session.remote)
                        self._router.counters.refuse("idle")
                        self._close(entry, wsframe.CLOSE_GOING_AWAY, "idle")
                elif now - entry.quiet_since >= idle:
                    entry.pinged_at = now
                    self._write(entry, entry.proto.ping())

    async def _watch_hellos(self) -> None:
        """Close connections that have not said hello by their deadline."""
        hellos = self._hellos
        while True:
            if not hellos:
                self._hello_due = trio.Event()
                await self._hello_due.wait()
                continue
            due, _, entry = hellos[0]
            if entry.closed or entry.session.greeted:
                heapq.heappop(hellos)
                continue
            with trio.move_on_at(due):
                self._hello_due = trio.Event()
                await self._hello_due.wait()  # (an earlier deadline may come meanwhile)
                continue
            heapq.heappop(hellos)
            if not (entry.closed or entry.session.greeted):
                self._router.counters.refuse("hello_timeout")
                log.debug("closing connection from %s: no hello in time", entry.session.remote)
                self._close(entry, wsframe.CLOSE_POLICY_VIOLATION, "no hello in time")

    def _close(self, entry: _Entry, code: int | None = None, reason: str = "", *, last: bytes = b"") -> None:
        """Stop serving ``entry``: a close frame first (``code``, or ``last``
        as the protocol made it) if it goes out at once, then the socket."""
        if entry.closed:
            return
        entry.closed = True
        if code is not None:
            last = entry.proto.close(code, reason)
        if last and not entry.unsent:
            try:
                entry.sock.send(last if entry.tls is None else entry.tls.wrap(last))
            except (OSError, ValueError):  # (ssl.SSLError is an OSError)
                pass
        del self._entries[entry.fd]
        try:
            self._epoll.unregister(entry.fd)
        except (OSError, ValueError):
            pass
        for scope in entry.later:
            scope.cancel()
        for waiting in entry.relays:
            waiting.release()
        entry.relays.clear()
        entry.proto.release()
        entry.trio_sock.close()
        self._on_close()
        if entry.on_close is not None:
            entry.on_close()
