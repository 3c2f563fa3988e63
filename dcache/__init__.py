"""dcache: a distributed in-memory key-value cache on trio.

The names below load on first use: ``import dcache`` alone loads no event
loop, and a script that only uses :class:`SyncClient` never imports trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ClosedError,
    ConnectError,
    ConnectionLost,
    DcacheError,
    ProtocolError,
    RequestError,
    RequestTimeout,
)

__version__ = "0.1.0"

_LAZY = {
    "Client": "aio",
    "ClusterClient": "aio",
    "Pipeline": "aio",
    "connect": "aio",
    "SyncClient": "client",
    "SyncPipeline": "client",
    "Entry": "client",
    "CasResult": "client",
    "WatchEvent": "client",
    "tls_context": "security",
}

_RENAMED = {"tls_context": "client_context"}

if TYPE_CHECKING:
    from .aio import Client, ClusterClient, Pipeline, connect
    from .client import CasResult, Entry, SyncClient, SyncPipeline, WatchEvent
    from .security import client_context as tls_context


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dcache' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), _RENAMED.get(name, name))
    globals()[name] = value
    return value


__all__ = [
    "Client",
    "ClusterClient",
    "Pipeline",
    "SyncClient",
    "SyncPipeline",
    "Entry",
    "CasResult",
    "WatchEvent",
    "connect",
    "tls_context",
    "DcacheError",
    "ConnectError",
    "ConnectionLost",
    "ClosedError",
    "ProtocolError",
    "RequestError",
    "RequestTimeout",
    "__version__",
]
