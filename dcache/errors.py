"""The exceptions dcache raises to its users.

One root, :class:`DcacheError`, and a few subclasses with precise meanings, so
that callers can tell "the node said no" from "the node is not there".
"""

from __future__ import annotations


class DcacheError(Exception):
    """Root of every error dcache raises on purpose."""


class ConnectError(DcacheError):
    """The node could not be reached, or refused the connection."""


class ConnectionLost(DcacheError):
    """The connection broke while a request was in flight; its outcome is unknown."""


class ClosedError(DcacheError):
    """The client was closed by its owner."""


class ProtocolError(DcacheError):
    """The other side sent something that is not the dcache protocol."""


class RequestTimeout(DcacheError):
    """No reply arrived within the operation's timeout."""


class RequestError(DcacheError):
    """The node refused a request and said why.

    ``code`` is one of :class:`dcache.codec.ErrorCode`'s values, stable for
    scripts; ``message`` is meant for people.
    """

    def __init__(self, code: str, message: str, details: dict | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class PeerUnavailable(DcacheError):
    """A node could not reach the peer that owns a key."""
