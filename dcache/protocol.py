"""The dcache connection without I/O, for every role: bytes in, messages and bytes out.

A :class:`Connection` is one end of a dcache WebSocket connection, in the
manner of h11 and wsproto: a driver feeds it what the socket received
(:meth:`Connection.receive_data`), gets back the complete messages, and
sends whatever :meth:`Connection.data_to_send` holds. The object owns the
opening handshake, framing (:mod:`dcache.wsframe`), the answers to control
frames (a ping's pong, a close's close), the close codes, the limits on
message size and, on a node, its share of the budget for unfinished
messages. It never blocks, sleeps or touches a socket: the trio transport
(:mod:`dcache.transport`, for nodes, peer links and the async client) and
the blocking client (:class:`dcache.client.SyncClient`) are thin loops
around it, and tests drive it with no event loop at all.

Above the framing, :class:`ClientConnection` pairs replies with requests by
rid and builds the hello; :class:`ServerSession` answers a hello and keeps
what it said (client name, peer id).

Importing this module loads no trio.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from . import codec, wsframe
from .codec import ErrorCode, Limits, Status
from .errors import ProtocolError
from .ops import Request
from .security import Role, Tokens


class ConnectionClosed(Exception):
    """The connection is over (the peer closed it, cleanly or not, or broke
    the protocol); ``code`` as in RFC 6455. Anything to send back (our close
    frame) is waiting in :meth:`Connection.data_to_send`."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


class ProtocolViolation(ConnectionClosed):
    """The connection is over because the peer broke the protocol (bad
    framing, a text message) or a limit; our close frame with ``code`` waits
    in :meth:`Connection.data_to_send`."""


def violation(exc: ProtocolViolation) -> str:
    """A word for counters: which limit or rule a closed connection broke."""
    return _VIOLATIONS.get(exc.code, "protocol_error")


_VIOLATIONS = {
    wsframe.CLOSE_TOO_BIG: "frame_too_large",
    wsframe.CLOSE_TRY_AGAIN_LATER: "unfinished_bytes",
    wsframe.CLOSE_UNSUPPORTED_DATA: "text_frame",
}


class HandshakeFailed(Exception):
    """The opening handshake failed; the reason is for a log or the user, and
    the response to send back (if any) waits in :meth:`Connection.data_to_send`."""


class Budget:
    """Bytes of unfinished messages that all the connections sharing it may
    hold together: each connection's frame limit alone would let a few
    hundred slow or hostile senders exhaust a node's memory."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"  # a close frame went out or came in, or the connection broke


TEXT_REFUSED = "dcache speaks binary CBOR messages, not text"
OVER_BUDGET = "the node holds too much unfinished data from its clients; send again later"


class Connection:
    """One end of a dcache WebSocket connection; see the module docstring.

    ``client_side`` decides the handshake's role and the masking of frames
    (``mask_key`` fixes the key: :data:`wsframe.NULL_MASK` between nodes;
    by default every frame gets a random one). ``host`` is the client's
    Host header. ``max_message`` bounds a message; ``budget``, on a node,
    bounds unfinished messages over all connections together. ``upgraded``
    starts it past the opening handshake (tests pipe two ends together so).
    """

    def __init__(
        self,
        *,
        client_side: bool,
        max_message: int,
        host: str = "",
        mask_key: bytes | None = None,
        budget: Budget | None = None,
        upgraded: bool = False,
    ) -> None:
        self.client_side = client_side
        self.state = State.OPEN if upgraded else State.HANDSHAKE
        self._mask_key = mask_key
        self._parser = wsframe.FrameParser(expect_masked=not client_side, max_message=max_message)
        self.max_message = max_message
        self.restricted = False  # messages bounded lower for now (see restrict)
        self._budget = budget
        self._held = 0  # of the budget, in unfinished messages
        self._out = bytearray()
        self._handshake: wsframe.ClientHandshake | wsframe.ServerHandshake | None = None
        if upgraded:
            pass
        elif client_side:
            client = wsframe.ClientHandshake(host)
            self._out += client.request
            self._handshake = client
        else:
            self._handshake = wsframe.ServerHandshake()
        self.reads = 0  # how many receive_data calls brought data: tells a silent peer from a quiet one
        self._ended: ConnectionClosed | None = None  # a close that came with messages, raised on the next call

    # -- bytes in -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[bytes]:
        """Take in received bytes (``b""``: the peer closed the socket); return
        the binary messages they complete, in order.

        Raises :class:`HandshakeFailed` if the opening handshake fails, and
        :class:`ConnectionClosed` when the connection is over: a close frame
        came (our answer waits in :meth:`data_to_send`), the peer broke the
        protocol (so does the close frame with its code), or it went away.
        """
        if self.state is not State.OPEN:
            if self.state is State.CLOSED:
                if self._ended is not None:  # (a fresh exception: this one may be raised again and again)
                    raise ConnectionClosed(self._ended.code, self._ended.reason)
                raise ConnectionClosed(1006, "the connection is closed")
            data = self._shake(data)
            if not data:
                return []
        elif not data:
            self.state = State.CLOSED
            raise ConnectionClosed(1006, "the peer went away without a close frame")
        self.reads += 1
        try:
            items = self._parser.feed(data)
            if self._budget is not None and (self._held or self._parser.buffered):
                self._account()
        except wsframe.FrameError as exc:
            self._out += self.close(exc.code, exc.reason)
            raise ProtocolViolation(exc.code, exc.reason) from None
        if len(items) == 1 and type(items[0]) is bytes:  # the usual case: one message
            return items  # type: ignore[return-value]
        messages: list[bytes] = []
        for item in items:
            if type(item) is bytes:
                messages.append(item)
                continue
            try:
                self._on_control(item)  # type: ignore[arg-type]
            except ConnectionClosed as exc:
                if not messages or isinstance(exc, ProtocolViolation):
                    raise
                # A close that came after messages (a refusal, then the close, say):
                # the messages first; the close is raised on the next call.
                self._ended = exc
                break
        return messages

    def _shake(self, data: bytes) -> bytes:
        """Feed the opening handshake; the bytes that came after it, once it is done."""
        assert self._handshake is not None
        try:
            if isinstance(self._handshake, wsframe.ClientHandshake):
                leftover = self._handshake.feed(data)
            else:
                done = self._handshake.feed(data)
                leftover = None
                if done is not None:
                    response, leftover = done
                    self._out += response
        except wsframe.HandshakeError as exc:
            self.state = State.CLOSED
            self._out += exc.response
            raise HandshakeFailed(exc.reason) from None
        if leftover is None:
            return b""
        self.state = State.OPEN
        return leftover

    def _account(self) -> None:
        budget = self._budget
        assert budget is not None
        if (held := self._parser.buffered) != self._held:
            grew = held > self._held
            budget.used += held - self._held
            self._held = held
            if grew and budget.used > budget.limit:
                raise wsframe.FrameError(wsframe.CLOSE_TRY_AGAIN_LATER, OVER_BUDGET)

    def _on_control(self, control: wsframe.Control) -> None:
        if control.opcode == wsframe.OP_PING:
            self._out += self.frame(control.payload, wsframe.OP_PONG)
        elif control.opcode == wsframe.OP_CLOSE:
            code, reason = control.close_info()
            self._out += self.close(wsframe.CLOSE_NORMAL)
            raise ConnectionClosed(code, reason)
        elif control.opcode == wsframe.OP_TEXT:
            self._out += self.close(wsframe.CLOSE_UNSUPPORTED_DATA, TEXT_REFUSED)
            raise ProtocolViolation(wsframe.CLOSE_UNSUPPORTED_DATA, TEXT_REFUSED)
        # Pongs need nothing: that something came is what counts (``reads``).

    # -- bytes out ------------------------------------------------------------------------

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """What waits to be sent: the handshake, answers to control frames, a close."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def frame(self, payload: bytes, opcode: int = wsframe.OP_BINARY) -> bytes:
        """``payload`` as a frame this side may send."""
        if opcode == wsframe.OP_BINARY and not self.client_side and len(payload) < 126:  # most replies
            return wsframe.SHORT_BINARY_HEADS[len(payload)] + payload
        return wsframe.build_frame(payload, opcode=opcode, masked=self.client_side, key=self._mask_key)

    def ping(self, payload: bytes = b"") -> bytes:
        return self.frame(payload, wsframe.OP_PING)

    def close(self, code: int = wsframe.CLOSE_NORMAL, reason: str = "") -> bytes:
        """Our close frame, once (b"" when the connection is closed already)."""
        if self.state is State.CLOSED:
            return b""
        self.state = State.CLOSED
        return wsframe.build_close(code, reason, masked=self.client_side, key=self._mask_key)

    def restrict(self, max_message: int) -> None:
        """Bound messages lower than ``max_message`` until :meth:`unrestrict`:
        a node takes only small messages until a connection has said hello,
        so a stranger cannot make it decode a large one."""
        self._parser.limit(min(max_message, self.max_message))
        self.restricted = True

    def unrestrict(self) -> None:
        self._parser.limit(self.max_message)
        self.restricted = False

    def release(self) -> None:
        """Give back this connection's share of its budget, once it is done."""
        if self._budget is not None:
            self._budget.used -= self._held
            self._held = 0
        self._parser.drop()


# -- requests and replies -----------------------------------------------------------------


class ClientConnection(Connection):
    """A client's (or a node's peer link's) end: rids for requests, replies paired with them.

    Replies may come in any order and in other frames than their requests;
    :meth:`replies` decodes a reply frame and raises :class:`ProtocolError`
    for one that is not, or that rejects a whole frame (rid null).
    """

    def __init__(self, *, host: str = "", max_message: int, mask_key: bytes | None = None, upgraded: bool = False) -> None:
        super().__init__(client_side=True, host=host, max_message=max_message, mask_key=mask_key, upgraded=upgraded)
        self._next_rid = 1

    def new_rids(self, count: int = 1) -> int:
        """The first of ``count`` fresh request ids."""
        rid = self._next_rid
        self._next_rid = rid + count
        return rid

    def request_frame(self, messages: list[Any]) -> bytes:
        """A frame of request messages (each ``[rid, op, args]``, or one encoded already)."""
        return self.frame(codec.encode_frame(messages))

    @staticmethod
    def replies(payload: bytes, name: str) -> list[tuple[int, int, Any]]:
        """The (rid, status, body) replies in a reply frame from ``name``."""
        try:
            replies = codec.decode_replies(payload)
        except codec.WireError as exc:
            raise ProtocolError(f"{name}: bad reply: {exc.message}") from None
        for rid, status, body in replies:
            if rid is None:
                raise ProtocolError(f"{name} rejected a frame: {body[1] if status else body}")
        return replies  # type: ignore[return-value]


def hello_args(client: str, *, peer: str = "", token: str | None = None) -> dict[str, Any]:
    """A hello's arguments: the protocol version, who is asking, a node's id
    on a peer link, and the token that lets it in (if the node wants one)."""
    args: dict[str, Any] = {"version": codec.PROTOCOL_VERSION, "client": client}
    if peer:
        args["peer"] = peer
    if token is not None:
        args["token"] = token
    return args


def limits_from(hello: Any) -> Limits:
    """The limits a node's hello reply announces."""
    try:
        fields = {k: int(v) for k, v in hello["limits"].items() if k in Limits.__dataclass_fields__}
        return Limits(**fields)
    except (TypeError, KeyError, ValueError, AttributeError):
        raise ProtocolError("the node's hello reply has no usable limits") from None


class ServerSession:
    """What a node knows of one connection: whether it said hello, who it is
    (a client's name, or a peer node's id), where it comes from, what it may
    do (its :class:`Role`) and whether it came through the node's peer port.
    A hello must come first; :meth:`hello` answers it, checking its token
    against ``tokens`` (or what ``tokens()`` returns then)."""

    __slots__ = ("remote", "greeted", "client", "peer_id", "tokens", "peer_port", "role", "read_only", "refused")

    def __init__(
        self,
        remote: str = "",
        *,
        greeted: bool = False,
        peer_id: str = "",
        tokens: Tokens | Callable[[], Tokens] | None = None,
        peer_port: bool = False,
    ) -> None:
        self.remote = remote
        self.greeted = greeted  # (True from the start only where a test or tool skips the hello)
        self.client = ""
        self.peer_id = peer_id  # set: a node's peer link, whose keyed requests are never forwarded again
        # The node's tokens as they are at the hello (they may be rotated meanwhile).
        self.tokens: Callable[[], Tokens] = tokens if callable(tokens) else _fixed(tokens or _NO_TOKENS)
        self.peer_port = peer_port
        self.role = Role.PEER if peer_id else Role.CLIENT
        self.read_only = False  # (the router's hot path reads this, not the role)
        self.refused = False  # its hello's token was refused: close it once the reply is out

    def hello(self, req: Request, info: dict[str, Any]) -> tuple[list[Any], str]:
        """The reply to ``req``, the first request (hello, or anything else,
        refused), and what came of it: ``"ok"``, or why it was refused (a
        word for counters: ``hello_required``, ``version``, ``token_missing``,
        ``token_wrong``, ``peer_token``, ``peer_on_client_port``). ``info``
        is the node's part of the reply (server, node id, epoch, limits).
        After a refused token (or, on a node that wants tokens, a first
        request that is not a hello) the connection is to be closed
        (``refused``)."""
        if req.op != "hello":
            tokens = self.tokens()
            if tokens.clients_need_one or (self.peer_port and tokens.peer):
                self.refused = True  # (a stranger gets one answer, not one per message it sends)
            return codec.error(
                req.rid, ErrorCode.HELLO_REQUIRED, "the first request on a connection must be hello"
            ), "hello_required"
        version = req.args["version"]
        if version != codec.PROTOCOL_VERSION:
            return (
                codec.error(
                    req.rid,
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"this node speaks protocol version {codec.PROTOCOL_VERSION}, not {codec.shown(version)}",
                ),
                "version",
            )
        token: str | None = req.args["token"]
        given = token.encode() if token is not None else None
        peer: str = req.args["peer"]
        tokens = self.tokens()
        refused = ""
        role = Role.CLIENT
        if peer and not self.peer_port:
            refused = "peer_on_client_port"
        elif self.peer_port and tokens.peer:
            if not tokens.peer_accepted(given):
                refused = "peer_token"
            role = Role.PEER if peer else Role.CLIENT
        elif peer:
            role = Role.PEER
        else:
            found = tokens.client_role(given)
            if found is None:
                refused = "token_missing" if given is None else "token_wrong"
            else:
                role = found
        if refused:
            self.refused = True
            return codec.error(req.rid, ErrorCode.UNAUTHORIZED, _REFUSALS[refused]), refused
        self.greeted = True
        self.client = req.args["client"]
        self.peer_id = peer
        self.role = role
        self.read_only = role is Role.READ
        return [req.rid, Status.OK.value, {"version": codec.PROTOCOL_VERSION, "role": role.value, **info}], "ok"


_NO_TOKENS = Tokens()


def _fixed(tokens: Tokens) -> Callable[[], Tokens]:
    return lambda: tokens


_REFUSALS = {
    "peer_on_client_port": "node-to-node links go to a node's peer port (--listen), not its client port",
    "peer_token": "this port is for dcache nodes: the peer token is missing or wrong",
    "token_missing": "this node needs a token: give --token-file FILE or DCACHE_TOKEN (token= in Python)",
    "token_wrong": "the token was not accepted",
}
