"""dcache: a distributed in-memory key-value cache on trio."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Client, ClusterClient, Pipeline, SyncClient, connect  # noqa: E402
from .errors import (  # noqa: E402
    ClosedError,
    ConnectError,
    ConnectionLost,
    DcacheError,
    ProtocolError,
    RequestError,
    RequestTimeout,
)

__all__ = [
    "Client",
    "ClusterClient",
    "Pipeline",
    "SyncClient",
    "connect",
    "DcacheError",
    "ConnectError",
    "ConnectionLost",
    "ClosedError",
    "ProtocolError",
    "RequestError",
    "RequestTimeout",
    "__version__",
]
