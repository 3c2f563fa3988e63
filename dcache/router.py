"""Turns received frames into replies: validate, run locally or forward, merge.

The router is what a connection handler calls with every frame it received
in one read; it answers them all in one reply frame. It knows the shard map
and the store, not sockets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from . import codec
from .codec import ErrorCode, Limits, Request, WireError
from .shard import ShardMap
from .store import Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Session:
    """Per-connection protocol state."""

    peer: str = ""
    greeted: bool = False
    client: str = ""
    requests: int = field(default=0)


def _get(store: Store, a: dict[str, Any]) -> Any:
    return store.get(a["ns"], a["key"])


def _set(store: Store, a: dict[str, Any]) -> Any:
    return store.set(a["ns"], a["key"], a["value"], a["ttl_ms"])


def _delete(store: Store, a: dict[str, Any]) -> Any:
    return store.delete(a["ns"], a["key"])


def _ttl(store: Store, a: dict[str, Any]) -> Any:
    return store.ttl_ms(a["ns"], a["key"])


def _mget(store: Store, a: dict[str, Any]) -> Any:
    ns = a["ns"]
    return [store.get(ns, key) for key in a["keys"]]


def _mset(store: Store, a: dict[str, Any]) -> Any:
    ns, ttl = a["ns"], a["ttl_ms"]
    return [store.set(ns, key, value, ttl) for key, value in a["items"]]


def _mdelete(store: Store, a: dict[str, Any]) -> Any:
    ns = a["ns"]
    return sum(store.delete(ns, key) for key in a["keys"])


def _ping(store: Store, a: dict[str, Any]) -> Any:
    return None


_LOCAL_OPS: dict[str, Callable[[Store, dict[str, Any]], Any]] = {
    "get": _get,
    "set": _set,
    "delete": _delete,
    "ttl": _ttl,
    "mget": _mget,
    "mset": _mset,
    "mdelete": _mdelete,
    "ping": _ping,
}


class Router:
    """Serves requests against ``store`` for the shards this node owns.

    ``node_info`` returns node-level fields merged into ``stats`` replies
    (address, uptime, process memory, connection count).
    """

    def __init__(
        self,
        *,
        store: Store,
        node_id: str,
        limits: Limits,
        shard_map: ShardMap,
        node_info: Callable[[], dict[str, Any]],
        server_name: str,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.limits = limits
        self.shard_map = shard_map
        self._node_info = node_info
        self._server_name = server_name
        self.op_counts: dict[tuple[str, str], int] = {}

    async def handle(self, session: Session, payloads: list[bytes]) -> bytes:
        """Answer every request in ``payloads``; return one encoded reply frame."""
        replies: list[list[Any]] = []
        for payload in payloads:
            try:
                messages = codec.decode_frame(payload, self.limits)
            except WireError as exc:
                replies.append(codec.error_from(exc))
                continue
            for message in messages:
                replies.append(self._answer(session, message))
        return codec.encode_frame(replies)

    def _answer(self, session: Session, message: Any) -> list[Any]:
        try:
            req = codec.parse_request(message, self.limits)
        except WireError as exc:
            self._count("invalid", "error")
            return codec.error_from(exc)
        session.requests += 1
        if not session.greeted:
            if req.op != "hello":
                self._count(req.op, "error")
                return codec.error(req.rid, ErrorCode.HELLO_REQUIRED, "the first request on a connection must be hello")
            return self._hello(session, req)
        handler = _LOCAL_OPS.get(req.op)
        try:
            if handler is not None:
                body = handler(self.store, req.args)
            elif req.op == "stats":
                body = self.stats()
            else:  # hello again
                return self._hello(session, req)
        except Exception:
            log.exception("internal error serving %s", req.op)
            self._count(req.op, "error")
            return codec.error(req.rid, ErrorCode.INTERNAL, "internal error; see the node's log")
        self._count(req.op, "ok")
        return codec.ok(req.rid, body)

    def _hello(self, session: Session, req: Request) -> list[Any]:
        version = req.args["version"]
        if version != codec.PROTOCOL_VERSION:
            self._count("hello", "error")
            return codec.error(
                req.rid,
                ErrorCode.UNSUPPORTED_VERSION,
                f"this node speaks protocol version {codec.PROTOCOL_VERSION}, not {version}",
            )
        session.greeted = True
        session.client = req.args["client"]
        self._count("hello", "ok")
        return codec.ok(
            req.rid,
            {
                "version": codec.PROTOCOL_VERSION,
                "server": self._server_name,
                "node": self.node_id,
                "epoch": self.shard_map.epoch,
                "limits": self.limits.as_dict(),
            },
        )

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.store.stats()
        stats.update(self._node_info())
        stats["node"] = self.node_id
        stats["shards"] = self.shard_map.shards_owned(self.node_id)
        stats["members"] = len(self.shard_map.members)
        stats["epoch"] = self.shard_map.epoch
        return stats

    def _count(self, op: str, result: str) -> None:
        key = (op, result)
        self.op_counts[key] = self.op_counts.get(key, 0) + 1
