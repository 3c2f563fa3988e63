"""Who may connect: tokens, roles and TLS settings, without I/O.

A node knows three kinds of token, each from its own file: client tokens
(read and write), read-only tokens (read, scan and watch) and peer tokens
(node-to-node links). A file holds one token per line; several may be valid
at once, so that an operator can roll a new one out before taking the old
one away. Tokens are compared in constant time and never logged.

TLS: :func:`server_context` and :func:`client_context` build the
:class:`ssl.SSLContext` objects for a node's listeners, its peer links and
clients; :class:`TlsLayer` is TLS as bytes in and bytes out
(:class:`ssl.SSLObject` over memory buffers), for the blocking client.

Importing this module loads no trio, and not ssl either (a one-shot
command that does not use TLS does not pay for it).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import ssl

# Connection limits: a node's defaults (see ``dcache serve --help``).
IDLE_TIMEOUT = 30.0  # seconds without traffic before a ping; as long again without a pong, and it is closed
HELLO_TIMEOUT = 10.0  # seconds from accepting a connection to its hello (TLS and WebSocket handshakes included)
MAX_CONNECTIONS = 10_000
MAX_CONNECTIONS_PER_ADDRESS = 2_500  # from one remote address: one host cannot take every connection
MAX_IN_FLIGHT = 256  # frames of one connection waiting for other nodes before it is read no more

MAX_HELLO_MESSAGE = 64 * 1024  # bytes a message may have until its connection has said hello
MAX_TOKEN_BYTES = 4096  # a hello's token longer than this is refused unread
MIN_TOKEN_CHARS = 16  # a shorter token in a file is refused at start: it could be guessed


class Role(enum.Enum):
    """What a connection may do, decided by its hello."""

    PEER = "peer"  # another node: everything, including node-to-node ops
    CLIENT = "client"  # reads and writes
    READ = "read"  # reads, scans and watches; no write


class TokenError(ValueError):
    """A token file is missing, unreadable or holds a token unfit for use."""


def read_tokens(path: str, what: str) -> tuple[str, ...]:
    """The tokens in the file at ``path``: one per line; blank lines and lines
    starting with ``#`` are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"{what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    tokens = parse_tokens(text)
    if not tokens:
        raise TokenError(f"{what} {path} holds no token (one per line; # starts a comment)")
    for token in tokens:
        check_token(token, f"{what} {path}")
    return tokens


def parse_tokens(text: str) -> tuple[str, ...]:
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def check_token(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters (try: openssl rand -hex 32)")
    if len(token.encode()) > MAX_TOKEN_BYTES:
        raise TokenError(f"{where}: a token may have at most {MAX_TOKEN_BYTES} bytes")
    if not token.isprintable() or " " in token:
        raise TokenError(f"{where}: a token may hold no spaces or control characters")


def _matches(token: bytes, valid: Iterable[bytes]) -> bool:
    # Every valid token is compared, whichever matches: the time taken
    # tells nothing of which one (or how many) there are to guess at.
    import hmac

    found = False
    for candidate in valid:
        found |= hmac.compare_digest(token, candidate)
    return found


@dataclass(frozen=True, slots=True)
class Tokens:
    """The tokens a node accepts. Empty ``client`` and ``read``: clients need
    none; empty ``peer``: nodes need none."""

    client: tuple[bytes, ...] = field(default=(), repr=False)
    read: tuple[bytes, ...] = field(default=(), repr=False)
    peer: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def clients_need_one(self) -> bool:
        return bool(self.client or self.read)

    def client_role(self, token: bytes | None) -> Role | None:
        """A client's role for its hello's ``token``, None if it is refused."""
        if not self.clients_need_one:
            return Role.CLIENT
        if token is None:
            return None
        if _matches(token, self.client):
            return Role.CLIENT
        if _matches(token, self.read):
            return Role.READ
        return None

    def peer_accepted(self, token: bytes | None) -> bool:
        if not self.peer:
            return True
        return token is not None and _matches(token, self.peer)

    @classmethod
    def from_files(cls, *, client: str | None = None, read: str | None = None, peer: str | None = None) -> Tokens:
        def load(path: str | None, what: str) -> tuple[bytes, ...]:
            return tuple(t.encode() for t in read_tokens(path, what)) if path else ()

        return cls(
            client=load(client, "--auth-token-file"), read=load(read, "--read-token-file"), peer=load(peer, "--peer-token-file")
        )


def file_stamp(*paths: str | None) -> tuple[tuple[float, int], ...]:
    """What changes when any of ``paths`` is rewritten (modification time and size)."""
    stamps = []
    for path in paths:
        if path:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime, st.st_size))
            except OSError:
                stamps.append((-1.0, -1))
    return tuple(stamps)


# -- TLS -------------------------------------------------------------------------------


T = TypeVar("T")


class TlsSetupError(ValueError):
    """A certificate, key or CA file is missing or unusable; the message says which."""


def _load(action: str, call: Callable[..., T], *args: str) -> T:
    """``call(*args)`` (files to load), its errors told in one line that names the files."""
    import ssl

    for path in args:
        if isinstance(path, str) and not os.path.isfile(path):  # (ssl's own error names no file)
            raise TlsSetupError(f"{action}: no such file: {path}")
    try:
        return call(*args)
    except ssl.SSLError as exc:
        if exc.reason in ("PEM_LIB", "KEY_VALUES_MISMATCH", "NO_START_LINE") or "PEM lib" in str(exc):
            raise TlsSetupError(f"{action}: not a PEM certificate and its key, or they do not match") from None
        raise TlsSetupError(f"{action}: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsSetupError(f"{action}: {exc.strerror or exc}") from None


def server_context(*, cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A listener's context: its certificate, and with ``client_ca`` the CA
    every connecting side's certificate must be signed by (mutual TLS)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(f"--tls-cert {cert} / --tls-key {key}", context.load_cert_chain, cert, key)
    if client_ca:
        _load(f"CA file {client_ca}", context.load_verify_locations, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(*, ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A connecting side's context: the node's certificate is checked against
    ``ca`` (the system's trusted CAs without it) and its host name; ``cert``
    and ``key`` are this side's own certificate, for a node that asks for one."""
    import ssl

    if (cert is None) != (key is None):
        raise TlsSetupError("a client certificate needs both a certificate file and its key file")
    if ca:  # in place of the system's CAs, not beside them
        context = _load(f"CA file {ca}", lambda path: ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=path), ca)
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        _load(f"certificate {cert} / key {key}", context.load_cert_chain, cert, key)
    return context


def split_scheme(address: str) -> tuple[bool | None, str]:
    """``wss://host:port`` → (True, ``host:port``); ``ws://…`` → (False, …);
    no scheme → (None, the address): TLS as the caller's settings say."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        return None, address
    scheme = scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(f"bad address {address!r}: the scheme must be ws:// or wss://")
    return scheme == "wss", rest.rstrip("/")


def describe_tls_error(exc: BaseException) -> str:
    """A one-line reason for a failed TLS handshake."""
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the node's certificate was not accepted ({exc.verify_message}); check the CA given (--ca for clients, --tls-ca between nodes)"
    if isinstance(exc, ssl.SSLError):
        if "CERTIFICATE_REQUIRED" in str(exc.reason):
            return "TLS: the node asks for a client certificate: give --client-cert and --client-key (cert= and key= in Python)"
        if "UNKNOWN_CA" in str(exc.reason) or "BAD_CERTIFICATE" in str(exc.reason):
            return f"TLS: the node did not accept this client's certificate ({exc.reason})"
        return f"TLS handshake failed ({exc.reason or exc})"
    return f"TLS handshake failed ({exc})"


class TlsLayer:
    """TLS as bytes in and bytes out, over an :class:`ssl.SSLObject`: the
    blocking client and the node's reactor drive it as they drive
    :class:`dcache.protocol.Connection`, with no task or stream of its own.

    :meth:`feed` received bytes and call :meth:`handshake_step` until it
    returns True, sending :meth:`outgoing` after each step; then
    :meth:`receive` turns received bytes into plaintext and :meth:`wrap`
    plaintext into bytes to send.
    """

    __slots__ = ("_in", "_out", "_tls", "_ended")

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None = None, *, server_side: bool = False) -> None:
        import ssl

        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._ended = False  # the other side ended TLS (close_notify)

    def feed(self, data: bytes) -> None:
        """Take in received bytes (during the handshake)."""
        self._in.write(data)

    def handshake_step(self) -> bool:
        """Go on with the handshake: True once it is done. Raises ssl.SSLError if it fails."""
        import ssl

        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def outgoing(self) -> bytes:
        return self._out.read()

    def receive(self, data: bytes) -> bytes:
        """The plaintext in ``data`` (b"" if it completes nothing yet). Raises
        EOFError when the other side ended TLS (or the socket: ``data`` b"")."""
        if not data:
            raise EOFError("the connection was closed")
        self._in.write(data)
        return self.read()

    def read(self) -> bytes:
        """The plaintext taken in and not read yet. EOFError once the other side ended TLS."""
        import ssl

        if self._ended:
            raise EOFError("the other side ended TLS")
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._tls.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:  # (its close_notify: what came before it first, the end next time)
                self._ended = True
                if not chunks:
                    raise EOFError("the other side ended TLS")
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def wrap(self, data: bytes) -> bytes:
        """``data`` encrypted, with anything else TLS has to send first."""
        if data:
            self._tls.write(data)
        return self._out.read()
