"""Where a forwarded GET's time goes, hop by hop, across the three processes.

    python benchmarks/forward_trace.py [PAIRS]     # under a minute

Starts etcd and two `dcache serve` nodes, A and B, that stamp the time
(CLOCK_MONOTONIC, which every process shares) when a socket read returns
("read"), when a read's messages are ready ("messages"), around the router's
work ("route"…"routed") and around each socket write ("write"…"written").
A `SyncClient` connected to A then alternates GETs of a key A owns and of
a key B owns, and the script prints, for each order of stamps that at
least a fifth of the GETs of a kind came in (at most two), the median time
between one stamp and the next. The stamps cost well under a microsecond
each, so read the figures as shares, not as exact times.
"""

from __future__ import annotations

import bisect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import VALUE, Node, wait_for_members  # noqa: E402

import dcache  # noqa: E402
from dcache.localcluster import EtcdServer  # noqa: E402
from dcache.shard import ShardMap  # noqa: E402


def run_stamped_node(out: str, argv: list[str]) -> None:
    """Run ``dcache`` with ``argv``, stamping reads, writes and routing; write the stamps to ``out`` at exit."""
    from dcache import cli, router, transport

    stamps: list[tuple[float, str]] = []
    clock = time.perf_counter

    receive_some = transport.Connection._receive_some
    receive = transport.Connection.receive
    send_raw = transport.Connection.send_raw
    handle = router.Router.handle

    async def stamped_receive_some(self: Any, poll: bool) -> bytes:
        data = await receive_some(self, poll)
        stamps.append((clock(), "read"))
        return data

    async def stamped_receive(self: Any, *, poll: bool = True) -> list[bytes]:
        payloads = await receive(self, poll=poll)
        stamps.append((clock(), "messages"))
        return payloads

    async def stamped_send_raw(self: Any, data: bytes, *, shield: bool = False) -> None:
        stamps.append((clock(), "write"))
        await send_raw(self, data, shield=shield)
        stamps.append((clock(), "written"))

    async def stamped_handle(self: Any, session: Any, payloads: list[bytes]) -> bytes:
        stamps.append((clock(), "route"))
        reply = await handle(self, session, payloads)
        stamps.append((clock(), "routed"))
        return reply

    transport.Connection._receive_some = stamped_receive_some  # type: ignore[method-assign]
    transport.Connection.receive = stamped_receive  # type: ignore[method-assign]
    transport.Connection.send_raw = stamped_send_raw  # type: ignore[method-assign]
    router.Router.handle = stamped_handle  # type: ignore[method-assign]
    sys.argv = ["dcache", *argv]
    try:
        cli.main()
    except SystemExit:
        pass
    finally:
        Path(out).write_text(json.dumps(stamps))


class StampedNode(Node):
    """A `dcache serve` node of compare.py whose process stamps its work (see :func:`run_stamped_node`)."""

    def __init__(self, etcd: str, out: Path) -> None:
        self.out = out
        super().__init__(etcd)

    def command(self) -> list[str]:
        return [sys.executable, __file__, "--node", str(self.out), *super().command()[3:]]


def trace(pairs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="dcache-trace-"))
    windows: list[tuple[str, float, float]] = []
    with EtcdServer() as etcd:
        a, b = StampedNode(etcd.endpoint, work / "a.json"), StampedNode(etcd.endpoint, work / "b.json")
        try:
            wait_for_members(a.client_address, 2)
            with dcache.SyncClient(a.client_address) as client:
                view = client.members()
                shard_map = ShardMap.build(view["epoch"], [m["node"] for m in view["members"]])
                keys = {
                    owner: next(
                        k for k in (f"k{i}" for i in range(10_000)) if shard_map.owner("", k.encode()) == node.peer_address
                    )
                    for owner, node in (("local", a), ("forwarded", b))
                }
                for key in keys.values():
                    client.set(key, VALUE)
                clock = time.perf_counter
                for _ in range(pairs):
                    for kind, key in keys.items():
                        started = clock()
                        client.get(key)
                        windows.append((kind, started, clock()))
        finally:
            a.stop()  # SIGTERM: each writes its stamps as it exits
            b.stop()
    stamps = sorted((t, f"{name} {what}") for name, node in (("A", a), ("B", b)) for t, what in json.loads(node.out.read_text()))
    times = [t for t, _ in stamps]
    sequences: dict[tuple[str, tuple[str, ...]], list[list[float]]] = {}
    for kind, started, ended in windows[len(windows) // 10 :]:  # past the warm-up
        inside = stamps[bisect.bisect_left(times, started) : bisect.bisect_right(times, ended)]
        points = [(started, "client sends"), *inside, (ended, "client has the reply")]
        steps = tuple(what for _, what in points)
        sequences.setdefault((kind, steps), []).append([b[0] - a[0] for a, b in zip(points, points[1:])])
    for kind in ("local", "forwarded"):
        orders = sorted(((key[1], rows) for key, rows in sequences.items() if key[0] == kind), key=lambda kv: -len(kv[1]))
        seen = sum(len(rows) for _, rows in orders)
        for steps, rows in orders[:2]:
            if len(rows) < seen / 5:
                break
            total = statistics.median(sum(r) for r in rows) * 1e6
            print(f"\n{kind} GET: {total:.0f} µs (median of the {len(rows)} of {seen} GETs whose stamps came in this order)")
            for (start, end), column in zip(zip(steps, steps[1:]), zip(*rows)):
                print(f"  {start:>22} → {end:<22} {statistics.median(column) * 1e6:6.1f} µs")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--node"]:
        run_stamped_node(sys.argv[2], sys.argv[3:])
    else:
        trace(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
