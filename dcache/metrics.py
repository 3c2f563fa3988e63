"""Prometheus metrics at ``/metrics``, read from the node's own counters at scrape time;
``/healthz`` and ``/readyz`` for probes.

Nothing is recorded per request here: the router and store keep plain
counters, and a collector turns them into metric families when Prometheus
asks. Each node has its own registry, so several nodes can share a process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HELP = b"dcache node: /metrics (Prometheus), /healthz (alive), /readyz (200 when ready to serve, else 503 and why)\n"
REQUEST_TIMEOUT = 10.0
MAX_REQUEST_BYTES = 16 * 1024


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node
        router = node.router
        stats = node.store.stats()

        ops = CounterMetricFamily("dcache_ops", "Requests served, by op and result.", labels=["op", "result"])
        for (op, result), count in sorted(router.counters.ops.items()):
            ops.add_metric([op, result], count)
        yield ops
        for name, doc in (
            ("hits", "Gets that found their key."),
            ("misses", "Gets that did not."),
            ("sets", "Entries written."),
            ("deletes", "Entries deleted."),
            ("expired", "Entries dropped because their TTL ran out."),
            ("evicted", "Entries evicted to stay within --max-memory."),
        ):
            yield CounterMetricFamily(f"dcache_{name}", doc, value=stats[name])
        yield GaugeMetricFamily("dcache_keys", "Entries held by this node.", value=stats["keys"])
        yield GaugeMetricFamily(
            "dcache_data_bytes", "Bytes of keys and values held (values as stored).", value=stats["data_bytes"]
        )
        yield GaugeMetricFamily(
            "dcache_memory_bytes", "Memory the entries take, as estimated for --max-memory.", value=stats["memory_bytes"]
        )
        yield GaugeMetricFamily("dcache_max_memory_bytes", "--max-memory (0: no limit).", value=stats["max_memory_bytes"])
        yield GaugeMetricFamily(
            "dcache_compression_saved_bytes",
            "Bytes saved by keeping large values compressed.",
            value=stats["compression_saved_bytes"],
        )
        yield CounterMetricFamily(
            "dcache_forwarded_requests", "Requests forwarded to the owning node.", value=router.counters.forwarded
        )
        yield CounterMetricFamily(
            "dcache_moved_retries", "Forwarded requests retried after a moved reply.", value=router.counters.moved_retries
        )
        links = GaugeMetricFamily("dcache_peer_link_up", "1 while the link to a peer is up.", labels=["peer"])
        for peer, state in sorted(node.peers.states().items()):
            links.add_metric([peer], 1 if state == "up" else 0)
        yield links
        yield GaugeMetricFamily("dcache_members", "Members in this node's view.", value=len(router.shard_map.members))
        yield GaugeMetricFamily(
            "dcache_membership_epoch", "Epoch (etcd revision) of this node's membership view.", value=router.shard_map.epoch
        )
        yield GaugeMetricFamily("dcache_connections", "Open client and peer connections.", value=node.connections)
        refused = CounterMetricFamily(
            "dcache_refused",
            "Connections and requests refused or closed, by reason: a token (token_missing, token_wrong, peer_token, "
            "read_only, peer_op, …) or a limit (max_connections, max_connections_per_address, hello_timeout, idle, "
            "frame_too_large, …).",
            labels=["reason"],
        )
        for reason, count in sorted(router.counters.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        replicator = node.replicator
        if replicator is not None:
            yield GaugeMetricFamily(
                "dcache_shards_under_replicated",
                "Shards this node owns that lack a copy on one of their replicas.",
                value=replicator.under_replicated(),
            )
            yield GaugeMetricFamily(
                "dcache_shard_copies", "Shards this node keeps a copy of for their owner.", value=len(node.placement.copies_kept)
            )
            yield CounterMetricFamily("dcache_replicated_writes", "Writes sent to replicas.", value=replicator.writes)
            yield CounterMetricFamily(
                "dcache_replica_refusals", "Writes answered unavailable for want of a replica.", value=replicator.refused
            )
            yield CounterMetricFamily(
                "dcache_shards_failed_over",
                "Shards served from a copy here when their owner went.",
                value=node.placement.failed_over,
            )
        hist = router.counters.latency
        buckets = [("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in hist.cumulative()]
        yield HistogramMetricFamily(
            "dcache_request_latency_seconds",
            "Time from receiving a batch of requests to having its replies, per request.",
            buckets=buckets,
            sum_value=hist.total,
        )


def registry_for(node: Node) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


async def serve_metrics(
    registry: CollectorRegistry,
    listeners: list[trio.SocketListener],
    readiness: Callable[[], tuple[str, str]] = lambda: ("ready", "serving"),
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer on ``listeners`` until cancelled: ``GET /metrics``; ``/healthz``
    (200 while the node's event loop answers); ``/readyz``, 200 when
    ``readiness`` says ``ready`` and 503 otherwise, with its state and why
    in the body, for a probe to tell when the next node of a rolling
    restart may go."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, registry, readiness)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started()


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry, readiness: Callable[[], tuple[str, str]]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
            continue
        break
    if not isinstance(event, h11.Request):
        return
    path = event.target.split(b"?")[0]
    if event.method not in (b"GET", b"HEAD"):
        status, body, ctype = 405, b"only GET\n", "text/plain"
    elif path == b"/metrics":
        status, body, ctype = 200, generate_latest(registry), CONTENT_TYPE
    elif path == b"/healthz":
        status, body, ctype = 200, b"ok\n", "text/plain"
    elif path == b"/readyz":
        state, why = readiness()
        status, body, ctype = (200 if state == "ready" else 503), f"{state}: {why}\n".encode(), "text/plain"
    elif path == b"/":
        status, body, ctype = 200, HELP, "text/plain"
    else:
        status, body, ctype = 404, b"not found\n" + HELP, "text/plain"
    headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close")]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    if event.method == b"GET":
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
