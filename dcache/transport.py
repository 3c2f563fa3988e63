"""WebSocket connections over trio streams, for clients, nodes and peer links.

Thin I/O around :mod:`dcache.wsframe`: the handshake, then whole binary
messages in and out. Pings are answered and close frames completed here, so
callers only ever see their own messages.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, NoReturn

import trio

from . import protocol, wsframe
from .errors import ConnectError
from .net import (
    GAVE_WAY,
    POLL_SLICE,
    RECEIVE_SIZE,
    BusyPoll,
    busy_poll_from_env,
    connect_error_text,
    split_address,
)
from .protocol import Budget, ConnectionClosed
from .security import TlsLayer, describe_tls_error

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 1.0
WRITE_TIMEOUT = 30.0  # to finish a message once it is partly written
BUSY_READ_BYTES = 4096


# -- trio's internals: this module is the only one that reads them ---------------
#
# Each is read where the public API costs too much per request, and each has
# a public fallback; tests/test_transport.py checks that they are still
# there, so a trio release that changes them fails a test instead of
# slowing dcache down in silence. pyproject.toml bounds trio to the
# releases these were checked with.

_RUN_CONTEXT: Any
try:
    from trio._core._run import GLOBAL_RUN_CONTEXT as _RUN_CONTEXT
except ImportError:  # pragma: no cover - a trio without it takes the public path
    _RUN_CONTEXT = None


def tasks_runnable() -> int:
    """How many tasks are ready to run, besides the caller.

    trio's public ``current_statistics()`` counts every registered socket
    too, which costs microseconds per call and grows with the number of
    connections; this is called before every busy poll, so read the run
    queue directly, falling back to the public call if trio's internals
    ever change shape.
    """
    try:
        return len(_RUN_CONTEXT.runner.runq)
    except AttributeError:
        return trio.lowlevel.current_statistics().tasks_runnable


def plain_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The standard socket under a trio SocketStream (trio keeps it as
    ``_sock``): writes that need no wait, and busy polling, use it directly."""
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = getattr(stream.socket, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


_WATCH: trio.lowlevel.RunVar[Any] = trio.lowlevel.RunVar("dcache_watch")


def watch_set() -> Any:
    """This trio run's level-triggered epoll set of the sockets busy polls
    give way to (None off Linux): connections that poll, and the reactor's
    own epoll set. It closes when the run's variables go, with the run."""
    try:
        return _WATCH.get()
    except LookupError:
        pass
    watch = select.epoll() if hasattr(select, "epoll") else None
    _WATCH.set(watch)
    return watch


async def _wait_readable(sock: socket.socket) -> None:
    # A socket another task closed has no descriptor (-1), and trio refuses
    # it with ValueError: report it as the closed connection it is.
    try:
        await trio.lowlevel.wait_readable(sock)
    except ValueError:
        raise trio.ClosedResourceError("the connection was closed") from None


async def _wait_writable(sock: socket.socket) -> None:
    try:
        await trio.lowlevel.wait_writable(sock)
    except ValueError:
        raise trio.ClosedResourceError("the connection was closed") from None


class Connection:
    """An open WebSocket connection: a :class:`protocol.Connection` driven over a trio stream.

    ``send`` may be called from several tasks (frames are written whole, one
    writer at a time); ``receive`` from one task at a time. ``ready`` holds
    messages that came with the handshake. ``poll`` is the busy-poll window
    (see :class:`BusyPoll`), ``DCACHE_BUSY_POLL_US`` by default.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        proto: protocol.Connection,
        *,
        ready: list[bytes] | None = None,
        poll: float | None = None,
        tls: TlsLayer | None = None,
    ) -> None:
        self.stream = stream
        self.proto = proto
        self.tls = tls  # TLS run around the socket by its user (the reactor); this object's own I/O is plain
        self._ready: list[bytes] = ready or []
        # Whole frames, one writer at a time, first come first served: a flag
        # and a parking lot cost less than trio's locks on every write.
        self._sending = False
        self._send_queue = trio.lowlevel.ParkingLot()
        # The plain socket under a trio SocketStream, for writes that need no wait.
        self._busy = False
        self._poller = BusyPoll(busy_poll_from_env() if poll is None else poll)
        self._socket = plain_socket(stream)
        self._watch = None
        if self._socket is not None and self._poller.window:
            self._watch = watch_set()
            if self._watch is not None:
                try:
                    self._watch.register(self._socket.fileno(), select.EPOLLIN)
                except OSError:
                    self._watch = None
        self._closed = False
        self._last: bytes | None = None  # our close frame, held back until the messages before it are answered

    @property
    def reads(self) -> int:
        """How many reads brought data: tells a silent peer from a quiet one."""
        return self.proto.reads

    def frame(self, payload: bytes, opcode: int = wsframe.OP_BINARY) -> bytes:
        """``payload`` as a frame this side may send."""
        return self.proto.frame(payload, opcode)

    async def send(self, payload: bytes) -> None:
        await self.send_raw(self.frame(payload))

    async def send_raw(self, data: bytes, *, shield: bool = False) -> None:
        """Write ``data`` whole, or close the connection.

        A frame cut short would corrupt the stream, so once its first byte
        is out the rest is written even if the caller is cancelled, within
        :data:`WRITE_TIMEOUT`; with ``shield`` that holds from the start.
        Most writes fit the socket buffer and finish at once, without a trip
        through the scheduler.
        """
        await self._start_sending(shield)
        try:
            if self._socket is None:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + WRITE_TIMEOUT) as scope:
                    await self.stream.send_all(data)
                if scope.cancelled_caught:
                    await self._abort("write timed out")
                return
            await self._write(memoryview(data), wrote=False, shield=shield)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(1006, "the connection broke") from exc
        finally:
            self._done_sending()

    def send_nowait(self, data: bytes) -> tuple[bytes, bool] | None:
        """Write what the socket takes of ``data`` now, if no other write is
        under way: None if it all went. Otherwise what is left, and whether
        this connection is reserved for it (part of the frame is out, so
        nothing else may be written before the rest); hand both to
        :meth:`send_rest`. Raises ConnectionClosed if the socket is broken."""
        if self._sending or self._socket is None or self._closed:
            return data, False
        try:
            sent = self._socket.send(data)
        except BlockingIOError:
            return data, False
        except OSError as exc:
            raise ConnectionClosed(1006, f"the connection broke: {exc}") from None
        if sent == len(data):
            return None
        self._sending = True
        return data[sent:], True

    async def send_rest(self, rest: bytes, reserved: bool) -> None:
        """Write what :meth:`send_nowait` left, whole (the caller may not cancel it)."""
        if not reserved:
            await self.send_raw(rest, shield=True)
            return
        try:
            await self._write(memoryview(rest), wrote=True, shield=True)
        finally:
            self._done_sending()

    async def _write(self, view: memoryview, *, wrote: bool, shield: bool) -> None:
        assert self._socket is not None
        try:
            while view:
                try:
                    sent = self._socket.send(view)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    await self._abort(str(exc))
                if sent:
                    view = view[sent:]
                    wrote = True
                elif not (wrote or shield):
                    await _wait_writable(self._socket)
                else:
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + WRITE_TIMEOUT) as scope:
                        await _wait_writable(self._socket)
                    if scope.cancelled_caught:
                        await self._abort("write timed out")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(1006, "the connection broke") from exc

    async def _start_sending(self, shield: bool = False) -> None:
        if not self._sending:
            self._sending = True
        elif not shield:
            await self._send_queue.park()  # the writer before us hands over
        else:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + WRITE_TIMEOUT) as scope:
                await self._send_queue.park()
            if scope.cancelled_caught:
                await self._abort("write timed out")

    def _done_sending(self) -> None:
        if self._send_queue:
            self._send_queue.unpark()
        else:
            self._sending = False

    async def _abort(self, reason: str) -> NoReturn:
        self._closed = True
        await trio.aclose_forcefully(self.stream)
        raise ConnectionClosed(1006, reason)

    async def receive(self, *, poll: bool = True) -> list[bytes]:
        """Wait for at least one message; return every complete message received so far.
        ``poll=False`` sleeps at once rather than busy-polling."""
        while not self._ready:
            if self._last is not None:  # a close frame came after the messages taken: ours goes after their replies
                last, self._last = self._last, None
                await self._finish(last)
                raise ConnectionClosed(wsframe.CLOSE_NORMAL, "the other side closed the connection")
            try:
                data = await self._receive_some(poll)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed(1006, "the connection broke") from exc
            await self._take_in(data)
        ready, self._ready = self._ready, []
        return ready

    async def _take_in(self, data: bytes) -> None:
        """Keep the messages in ``data``; send what the protocol answers (pongs,
        a close); on a close or broken framing, finish the connection and raise."""
        try:
            messages = self.proto.receive_data(data)
        except ConnectionClosed:
            await self._finish(self.proto.data_to_send())
            raise
        if messages:
            self._ready += messages
            if self.proto.state is protocol.State.CLOSED:  # a close came after them
                self._last = self.proto.data_to_send()
                return
        if self.proto.has_data_to_send:
            await self.send_raw(self.proto.data_to_send())

    async def _receive_some(self, poll: bool) -> bytes:
        """trio's receive_some, tuned for request/reply traffic on plain sockets.

        * While traffic is heavy, data is usually queued already: read it
          first and pass a checkpoint, so a peer that never stops sending
          cannot starve other tasks.
        * Otherwise, once no other task is ready to run (they may be about
          to send what we wait for), poll as :class:`BusyPoll` decides.
        """
        sock = self._socket
        if sock is None:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        if self._busy:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                self._busy = False
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            else:
                await trio.lowlevel.checkpoint()
                return data
        poller = self._poller
        if poll and poller.wanted():
            polled = await self._poll(sock, poller)
            if polled is not None:
                self._busy = len(polled) >= BUSY_READ_BYTES
                return polled
        while True:
            await _wait_readable(sock)
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            # One request at a time (the usual small read) means the next
            # one is not queued yet either: no speculative read next time.
            self._busy = len(data) >= BUSY_READ_BYTES
            return data

    async def _poll(self, sock: socket.socket, poller: BusyPoll) -> bytes | None:
        """Poll ``sock`` as :class:`BusyPoll` describes, once no other task
        is ready to run (they may be about to send what we wait for)."""
        until = time.perf_counter() + poller.window
        while True:
            if tasks_runnable():
                await trio.lowlevel.checkpoint()
                if tasks_runnable():
                    return None  # a busy process: its other tasks come first
            try:
                data = poller.spin(sock, min(until, time.perf_counter() + POLL_SLICE), self._watch)
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if data is GAVE_WAY:
                return None
            if data is not None:
                return data  # type: ignore[return-value]
            if time.perf_counter() >= until:
                poller.missed()
                return None
            await trio.lowlevel.checkpoint()

    def release(self) -> None:
        """Give back this connection's share of its budget, once it is closed."""
        self.proto.release()

    def stop_watching(self) -> None:
        """Leave the set of sockets busy polls give way to (another task serves this one now)."""
        if self._watch is not None and self._socket is not None:
            try:
                self._watch.unregister(self._socket.fileno())
            except (OSError, ValueError):
                pass
            self._watch = None

    def take_ready(self) -> list[bytes]:
        """The messages received and not yet taken by :meth:`receive`."""
        ready, self._ready = self._ready, []
        return ready

    async def take_waiting(self) -> None:
        """Take in whatever has arrived, without waiting: answer pings, keep
        messages for the next :meth:`receive`; raise ConnectionClosed if the
        other side has closed the connection."""
        if self._socket is None:
            return
        while True:
            try:
                data = self._socket.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                raise ConnectionClosed(1006, f"the connection broke: {exc}") from None
            await self._take_in(data)

    def fileno(self) -> int:
        """The plain socket's file descriptor (-1 if there is none, or it is closed)."""
        return self._socket.fileno() if self._socket is not None else -1

    def receive_nowait(self) -> tuple[list[bytes], bytes]:
        """What :meth:`receive` would return, without waiting: every complete
        message received so far, after one read of what the socket holds (a
        plain socket only), and what the protocol answers (pongs) for the
        caller to send. Raises ConnectionClosed when the connection is over."""
        if not self._ready:
            assert self._socket is not None
            try:
                data = self._socket.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return [], b""
            except OSError as exc:
                raise ConnectionClosed(1006, f"the connection broke: {exc}") from None
            messages = self.proto.receive_data(data)
            if messages:
                self._ready += messages
        ready, self._ready = self._ready, []
        return ready, self.proto.data_to_send() if self.proto.has_data_to_send else b""

    async def ping(self, payload: bytes = b"") -> None:
        await self.send_raw(self.proto.ping(payload))

    def close_now(self, code: int, reason: str) -> None:
        """Send a close frame if it goes out without waiting (and no other
        frame is half written); the caller closes the stream."""
        if self._closed or self._sending or self._socket is None:
            return
        self._closed = True
        try:
            self._socket.send(self.proto.close(code, reason))
        except OSError:
            pass

    async def aclose(self, code: int = wsframe.CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame (best effort, briefly) and close the stream."""
        await self._finish(self.proto.close(code, reason))

    async def _finish(self, last: bytes) -> None:
        """Send ``last`` (a close frame; best effort, briefly) and close the stream."""
        if self._closed:
            return
        self._closed = True
        if last:
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                try:
                    await self._start_sending()
                    try:
                        await self.stream.send_all(last)
                    finally:
                        self._done_sending()
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    pass
        await trio.aclose_forcefully(self.stream)


async def accept(
    stream: trio.abc.Stream,
    *,
    max_message: int,
    timeout: float = HANDSHAKE_TIMEOUT,
    budget: Budget | None = None,
    poll: float | None = None,
    tls: ssl.SSLContext | None = None,
    on_refused: Callable[[str], None] | None = None,
) -> Connection | None:
    """Run the server side of the handshake on ``stream``; ``poll`` as for :class:`Connection`.

    With ``tls``, TLS comes first, run by a :class:`TlsLayer` over the plain
    stream: the connection it returns carries the layer (``tls``), for the
    reactor, which encrypts and decrypts around the socket itself.

    Returns the connection, or None (after answering and closing the stream)
    if the peer does not complete the handshakes within ``timeout``; then
    ``on_refused`` hears why: ``hello_timeout``, or ``handshake`` for a
    failed one (a connection closed before it sent anything, as a port
    check does, is not counted).
    """
    proto = protocol.Connection(client_side=False, max_message=max_message, budget=budget)
    layer = None if tls is None else TlsLayer(tls, server_side=True)
    heard = False

    async def send(data: bytes) -> None:
        await stream.send_all(data if layer is None else layer.wrap(data))

    async def receive() -> bytes:
        nonlocal heard
        data = bytes(await stream.receive_some(RECEIVE_SIZE))
        heard = heard or bool(data)
        return data

    with trio.move_on_after(timeout) as scope:
        try:
            if layer is not None:
                while not layer.handshake_step():
                    await stream.send_all(layer.outgoing())
                    data = await receive()
                    if not data:
                        raise trio.BrokenResourceError("closed during the TLS handshake")
                    layer.feed(data)
                await stream.send_all(layer.outgoing())
            plain = b"" if layer is None else layer.read()  # (what came with the handshake's end)
            while True:
                if not plain:
                    data = await receive()
                    plain = data if layer is None or not data else layer.receive(data)
                    if not plain and data:
                        continue  # part of a TLS record
                messages, plain = proto.receive_data(plain), b""
                if proto.state is protocol.State.OPEN:
                    await send(proto.data_to_send())
                    return Connection(stream, proto, ready=messages, poll=poll, tls=layer)
        except (protocol.HandshakeFailed, ConnectionClosed) as exc:
            log.debug("handshake failed: %s", exc)
            answer = proto.data_to_send()  # an HTTP error, or the upgrade and a close frame
            if answer:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    try:
                        await send(answer)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as exc:
            heard = heard or isinstance(exc.__cause__, ssl.SSLError)  # (TLS that a trio SSLStream runs)
        except ssl.SSLError as exc:
            log.debug("TLS handshake failed: %s", exc)
            assert layer is not None
            with trio.move_on_after(CLOSE_TIMEOUT):  # the alert, so that the other side learns why
                try:
                    await stream.send_all(layer.outgoing())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
    if on_refused is not None and (heard or scope.cancelled_caught):
        on_refused("hello_timeout" if scope.cancelled_caught else "handshake")
    proto.release()
    await trio.aclose_forcefully(stream)
    return None


async def connect(
    address: str,
    *,
    max_message: int,
    default_port: int,
    timeout: float = HANDSHAKE_TIMEOUT,
    mask_key: bytes | None = None,
    poll: float | None = None,
    tls: ssl.SSLContext | None = None,
) -> Connection:
    """Open a client connection to ``host:port``; raise ConnectError on any failure.
    ``mask_key`` as for :class:`protocol.Connection`, ``poll`` as for
    :class:`Connection`; with ``tls``, over TLS (the node's certificate checked
    against ``host``)."""
    host, port = split_address(address, default_port)
    stream: trio.abc.Stream | None = None
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {connect_error_text(exc)}") from None
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname=host, https_compatible=True)
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(stream)
                raise ConnectError(f"{host}:{port}: {describe_tls_error(exc.__cause__ or exc)}") from None
        proto = protocol.ClientConnection(host=f"{host}:{port}", max_message=max_message, mask_key=mask_key)
        try:
            await stream.send_all(proto.data_to_send())
            while True:
                messages = proto.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
                if proto.state is protocol.State.OPEN:
                    conn = Connection(stream, proto, ready=messages, poll=poll)
                    answer = proto.data_to_send()  # pongs to pings that came with the upgrade
                    if answer:
                        await conn.send_raw(answer)
                    return conn
        except (protocol.HandshakeFailed, ConnectionClosed) as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectError(f"{host}:{port}: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(stream)
            if isinstance(exc.__cause__, ssl.SSLError):
                raise ConnectError(f"{host}:{port}: {describe_tls_error(exc.__cause__)}") from None
            raise ConnectError(f"{host}:{port}: connection lost during the handshake") from None
    if stream is not None:
        await trio.aclose_forcefully(stream)
    raise ConnectError(f"cannot connect to {host}:{port}: timed out after {timeout:g} s")
