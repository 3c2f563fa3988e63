"""The cost of the memory limit and of compression, incr against Redis's INCR,
how soon expired keys leave memory, and watch fan-out, in one run.

    pip install -e '.[bench]' && apt-get install redis-server
    python benchmarks/ops.py          # about two minutes; --quick for a smoke run

Starts its own redis-server and dcache nodes on free loopback ports, prints
the figures, and writes benchmarks/ops.json. Sequential figures are one
client doing one request at a time (bound by round trips); "50 tasks" is 50
trio tasks sharing one dcache client, against 50 asyncio tasks on redis-py's
pool. Each figure is the median of interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import trio
from compare import Node, Redis, rss_bytes, timed

import dcache

HERE = Path(__file__).resolve().parent
VALUE = b"v" * 100
LIMIT = "64MiB"


class LimitedNode(Node):
    def __init__(self, *extra: str) -> None:
        self.extra = list(extra)
        super().__init__()

    def command(self) -> list[str]:
        return super().command() + self.extra


def fill(address: str, count: int, value: bytes, prefix: str) -> None:
    with dcache.SyncClient(address) as c:
        for start in range(0, count, 1000):
            c.mset({f"{prefix}{i}": value for i in range(start, min(start + 1000, count))})


def sequential_sets(address: str, n: int, prefix: str) -> float:
    """New keys each time, so that at the limit every SET evicts."""
    with dcache.SyncClient(address) as c:
        keys = iter(range(10**9))
        return timed(n, lambda: c.set(f"{prefix}{next(keys)}", VALUE))


def redis_sequential_sets(r: Any, n: int, prefix: str) -> float:
    keys = iter(range(10**9))
    return timed(n, lambda: r.set(f"{prefix}{next(keys)}", VALUE))


async def load(client: Any, task: int, per_task: int, op: str) -> None:
    """One task's requests, the same for dcache's client and redis-py's: incr
    on one of ten counters, or a SET of a new key."""
    for i in range(per_task):
        if op == "incr":
            await client.incr(f"counter:{task % 10}")
        else:
            await client.set(f"t{task}:{i}:{time.monotonic_ns()}", VALUE)


def dcache_tasks(address: str, tasks: int, per_task: int, op: str) -> float:
    async def run() -> float:
        client = await dcache.Client.connect(address)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                nursery.start_soon(load, client, task, per_task, op)
        rate = tasks * per_task / (time.perf_counter() - started)
        await client.aclose()
        return rate

    return trio.run(run)


def redis_tasks(port: int, tasks: int, per_task: int, op: str) -> float:
    import redis.asyncio as aioredis

    async def run() -> float:
        client = aioredis.Redis(port=port, max_connections=tasks)

        started = time.perf_counter()
        await asyncio.gather(*(load(client, task, per_task, op) for task in range(tasks)))
        rate = tasks * per_task / (time.perf_counter() - started)
        await client.aclose()
        return rate

    return asyncio.run(run())


def expiry(n: int) -> dict[str, float]:
    """``n`` keys due at the same moment: how long after it until the node
    holds none, and the longest GET meanwhile."""
    node = LimitedNode()
    try:
        with dcache.SyncClient(node.client_address) as c:
            ttl = 2.0
            started = time.monotonic()
            for start in range(0, n, 1000):
                c.mset({f"e{i}": VALUE for i in range(start, min(start + 1000, n))}, ttl=ttl)
            due = started + ttl  # (the last ones are due a little later)
            c.set("probe", "x")
            while time.monotonic() < due:
                time.sleep(0.01)
            longest = 0.0
            while True:
                t = time.perf_counter()
                c.get("probe")
                longest = max(longest, time.perf_counter() - t)
                if c.stats()["keys"] <= 1:
                    break
            gone_after = time.monotonic() - due
        return {"keys": n, "all_gone_after_s": gone_after, "longest_get_ms": longest * 1000}
    finally:
        node.stop()


def watch_fan_out(watchers: int, count: int) -> dict[str, float]:
    """``watchers`` clients, each on its own connection, watch a prefix while
    one client writes ``count`` keys under it (msets of 100): events
    delivered per second to all of them together, until each saw every key."""
    node = LimitedNode()

    async def run() -> dict[str, float]:
        clients = [await dcache.Client.connect(node.client_address) for _ in range(watchers)]
        writer = await dcache.Client.connect(node.client_address)
        cursors = [(await c.watch_page(prefix="f:"))[1] for c in clients]
        seen = [0] * watchers

        async def watch(i: int) -> None:
            cursor = cursors[i]
            while seen[i] < count:
                events, cursor = await clients[i].watch_page(cursor, prefix="f:")
                seen[i] += sum(1 for event in events if event.kind == "set")

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(watchers):
                nursery.start_soon(watch, i)
            for start in range(0, count, 100):
                await writer.mset({f"f:{j}": VALUE for j in range(start, start + 100)})
        elapsed = time.perf_counter() - started
        for c in [*clients, writer]:
            await c.aclose()
        return {"watchers": watchers, "events_each": count, "delivered_per_s": watchers * count / elapsed, "seconds": elapsed}

    try:
        return trio.run(run)
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke run")
    args = parser.parse_args()
    n = 2000 if args.quick else 10000
    rounds = 1 if args.quick else 3
    tasks, per_task = 50, 40 if args.quick else 200

    redis_ = Redis()
    plain = LimitedNode()
    limited = LimitedNode("--max-memory", LIMIT)
    noeviction = LimitedNode("--max-memory", LIMIT, "--eviction", "noeviction")
    runs: dict[str, list[float]] = {}

    def record(name: str, rate: float) -> None:
        runs.setdefault(name, []).append(rate)

    try:
        # The limited node and Redis (maxmemory, allkeys-lru) are filled past their limit first.
        redis_.client.config_set("maxmemory", "64mb")
        redis_.client.config_set("maxmemory-policy", "allkeys-lru")
        fill(limited.client_address, 400_000, VALUE, "fill")
        for start in range(0, 800_000, 1000):
            redis_.client.mset({f"fill{i}": VALUE for i in range(start, start + 1000)})
        with dcache.SyncClient(limited.client_address) as c:
            at_limit = c.stats()
        for r in range(rounds):
            record("set_no_limit", sequential_sets(plain.client_address, n, f"s{r}:"))
            record("set_at_limit", sequential_sets(limited.client_address, n, f"s{r}:"))
            record("redis_set_at_limit", redis_sequential_sets(redis_.client, n, f"s{r}:"))
            record("set_no_limit_50", dcache_tasks(plain.client_address, tasks, per_task, "set"))
            record("set_at_limit_50", dcache_tasks(limited.client_address, tasks, per_task, "set"))
            record("redis_set_at_limit_50", redis_tasks(redis_.port, tasks, per_task, "set"))
            with dcache.SyncClient(plain.client_address) as c:
                record("incr", timed(n, lambda: c.incr("counter")))
            record("redis_incr", timed(n, lambda: redis_.client.incr("counter")))
            record("incr_50", dcache_tasks(plain.client_address, tasks, per_task, "incr"))
            record("redis_incr_50", redis_tasks(redis_.port, tasks, per_task, "incr"))
        with dcache.SyncClient(limited.client_address) as c:
            after = c.stats()
        refused = 0
        fill(noeviction.client_address, 1000, VALUE, "n")
        with dcache.SyncClient(noeviction.client_address) as c:
            try:
                fill(noeviction.client_address, 2_000_000, VALUE, "m")
            except dcache.RequestError as exc:
                refused = exc.code == "out_of_memory"
            refused_at = c.stats()
        figures = {name: statistics.median(rates) for name, rates in runs.items()}
        memory = {
            "limit_bytes": after["max_memory_bytes"],
            "estimate_bytes": after["memory_bytes"],
            "keys_at_limit": after["keys"],
            "evicted": after["evicted"],
            "node_rss_bytes": rss_bytes(limited.proc.pid),
            "idle_node_rss_bytes": rss_bytes(plain.proc.pid),
            "filled_before": at_limit["keys"],
            "noeviction_refused": bool(refused),
            "noeviction_keys": refused_at["keys"],
            "noeviction_estimate_bytes": refused_at["memory_bytes"],
        }
    finally:
        for server in (plain, limited, noeviction, redis_):
            server.stop()
    compression = compressed_values(n // 5)
    expired = expiry(50_000 if args.quick else 200_000)
    fan_out = watch_fan_out(10, 5_000 if args.quick else 20_000)
    ratio = {
        "set_at_limit / set_no_limit": figures["set_at_limit"] / figures["set_no_limit"],
        "set_at_limit / redis_set_at_limit": figures["set_at_limit"] / figures["redis_set_at_limit"],
        "set_at_limit_50 / set_no_limit_50": figures["set_at_limit_50"] / figures["set_no_limit_50"],
        "set_at_limit_50 / redis_set_at_limit_50": figures["set_at_limit_50"] / figures["redis_set_at_limit_50"],
        "incr / redis_incr": figures["incr"] / figures["redis_incr"],
        "incr_50 / redis_incr_50": figures["incr_50"] / figures["redis_incr_50"],
    }
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "rates_per_s": figures,
        "ratios": ratio,
        "memory": memory,
        "compression": compression,
        "expiry": expired,
        "watch": fan_out,
    }
    (HERE / "ops.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def compressed_values(n: int) -> dict[str, Any]:
    """A 4 KiB JSON document stored and read with compression (the default) and without."""
    doc = json.dumps(
        [{"id": i, "name": f"user {i}", "email": f"user{i}@example.com", "active": i % 3 == 0} for i in range(50)]
    ).encode()
    out: dict[str, Any] = {"value_bytes": len(doc)}
    for label, extra in (("compressed", ()), ("plain", ("--compress-min", "0"))):
        node = LimitedNode(*extra)
        try:
            with dcache.SyncClient(node.client_address) as c:
                keys = iter(range(10**9))
                out[f"{label}_set_per_s"] = timed(n, lambda c=c, keys=keys: c.set(f"d{next(keys)}", doc))
                out[f"{label}_get_per_s"] = timed(n, lambda c=c: c.get("d1"))
                stats = c.stats()
                out[f"{label}_data_bytes"] = stats["data_bytes"]
                out[f"{label}_saved_bytes"] = stats["compression_saved_bytes"]
                out[f"{label}_rss_bytes"] = rss_bytes(node.proc.pid)
        finally:
            node.stop()
    return out


if __name__ == "__main__":
    main()
