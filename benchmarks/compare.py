"""dcache next to Redis on the same machine and workloads, in one run.

    pip install -e '.[bench]'          # redis-py and matplotlib
    apt-get install redis-server       # the server to compare with
    python benchmarks/compare.py       # about two minutes; --quick for a smoke run

Starts its own redis-server, dcache nodes and etcd on free loopback ports,
prints a table of figures against the targets, and writes
benchmarks/results.json and benchmarks/throughput.png (throughput against
concurrent clients). Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import trio

import dcache
from dcache.localcluster import EtcdServer, free_port, wait_until_serving
from dcache.shard import ShardMap

HERE = Path(__file__).resolve().parent
VALUE = b"v" * 100


# -- servers ------------------------------------------------------------------------


class Redis:
    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("redis-server not found: apt-get install redis-server")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        import redis

        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Node:
    def __init__(self, etcd: str | None = None) -> None:
        self.client_address = f"127.0.0.1:{free_port()}"
        self.peer_address = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "dcache", "serve", "--client-listen", self.client_address,
               "--listen", self.peer_address, "--log-level", "warning"]  # fmt: skip
        if etcd:
            cmd += ["--etcd", etcd]
        self.proc = subprocess.Popen(cmd)
        if not wait_until_serving(self.client_address, 15):
            raise RuntimeError("dcache node did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def wait_for_members(address: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with dcache.SyncClient(address) as c:
            if len(c.members()["members"]) == count:
                return
        time.sleep(0.1)
    raise RuntimeError(f"cluster did not reach {count} members")


# -- workloads --------------------------------------------------------------------


def timed(n: int, fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - started)


def sequential(node: Node, redis_: Redis, n: int, rounds: int = 3) -> dict[str, float]:
    """Median of ``rounds`` interleaved runs: this machine's speed drifts."""
    runs: dict[str, list[float]] = {}

    def record(name: str, rate: float) -> None:
        runs.setdefault(name, []).append(rate)

    async def async_seq(client: dcache.Client) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await client.get("seq")
        return n / (time.perf_counter() - started)

    async def async_round() -> float:
        async with dcache.connect(node.client_address) as client:
            return await async_seq(client)

    r = redis_.client
    r.set("seq", VALUE)
    with dcache.SyncClient(node.client_address) as c:
        c.set("seq", VALUE)
        for _ in range(rounds):
            record("dcache_sync_get", timed(n, lambda: c.get("seq")))
            record("redis_get", timed(n, lambda: r.get("seq")))
            record("dcache_sync_set", timed(n, lambda: c.set("seq", VALUE)))
            record("redis_set", timed(n, lambda: r.set("seq", VALUE)))
            record("dcache_async_get", trio.run(async_round))
    return {name: statistics.median(rates) for name, rates in runs.items()}


CONCURRENT_KEYS = [f"c{i}" for i in range(1000)]


def task_keys(task: int, count: int) -> list[str]:
    """The keys one task reads, the same for dcache and Redis."""
    return [CONCURRENT_KEYS[(task * 7919 + i) % len(CONCURRENT_KEYS)] for i in range(count)]


def dcache_concurrent(address: str, tasks: int, per_task: int, *, cluster: bool = False) -> float:
    async def run() -> float:
        client: Any = await (dcache.ClusterClient if cluster else dcache.Client).connect(address)
        await client.mset({k: VALUE for k in CONCURRENT_KEYS})
        work = [task_keys(n, per_task) for n in range(tasks)]

        async def worker(keys: list[str]) -> None:
            for key in keys:
                await client.get(key)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for keys in work:
                nursery.start_soon(worker, keys)
        rate = tasks * per_task / (time.perf_counter() - started)
        await client.aclose()
        return rate

    return trio.run(run)


def redis_concurrent(port: int, tasks: int, per_task: int) -> float:
    import redis.asyncio as aioredis

    async def run() -> float:
        client = aioredis.Redis(port=port, max_connections=tasks)
        await client.mset({k: VALUE for k in CONCURRENT_KEYS})
        work = [task_keys(n, per_task) for n in range(tasks)]

        async def worker(keys: list[str]) -> None:
            for key in keys:
                await client.get(key)

        started = time.perf_counter()
        await asyncio.gather(*(worker(keys) for keys in work))
        rate = tasks * per_task / (time.perf_counter() - started)
        await client.aclose()
        return rate

    return asyncio.run(run())


def mget_rates(node: Node, redis_: Redis, rounds: int) -> dict[str, float]:
    keys = [f"m{i}" for i in range(100)]
    with dcache.SyncClient(node.client_address) as c:
        c.mset({k: VALUE for k in keys})
        dcache_rate = timed(rounds, lambda: c.mget(keys)) * 100
    r = redis_.client
    r.mset({k: VALUE for k in keys})
    redis_rate = timed(rounds, lambda: r.mget(keys)) * 100
    return {"dcache_mget_keys": dcache_rate, "redis_mget_keys": redis_rate}


def forwarded_latency(n: int) -> dict[str, float]:
    with EtcdServer() as etcd:
        a, b = Node(etcd.endpoint), Node(etcd.endpoint)
        try:
            wait_for_members(a.client_address, 2)
            with dcache.SyncClient(a.client_address) as c:
                view = c.members()
                shard_map = ShardMap.build(view["epoch"], [m["node"] for m in view["members"]])
                local = next(k for k in (f"l{i}" for i in range(10_000)) if shard_map.owner("", k.encode()) == a.peer_address)
                remote = next(k for k in (f"r{i}" for i in range(10_000)) if shard_map.owner("", k.encode()) == b.peer_address)
                c.set(local, VALUE)
                c.set(remote, VALUE)
                samples: dict[str, list[float]] = {"local": [], "forwarded": []}
                for _ in range(n):
                    for name, key in (("local", local), ("forwarded", remote)):
                        started = time.perf_counter()
                        c.get(key)
                        samples[name].append(time.perf_counter() - started)
        finally:
            a.stop()
            b.stop()
    return {f"{name}_p50_us": statistics.median(s) * 1e6 for name, s in samples.items()}


def memory(keys: int) -> dict[str, float]:
    node, redis_ = Node(), Redis()
    try:
        batch = 1000
        with dcache.SyncClient(node.client_address) as c:
            for start in range(0, keys, batch):
                c.mset({f"key:{i:08d}": VALUE for i in range(start, min(keys, start + batch))})
            assert c.stats()["keys"] == keys
        pipe = redis_.client.pipeline(transaction=False)
        for start in range(0, keys, batch):
            pipe.mset({f"key:{i:08d}": VALUE for i in range(start, min(keys, start + batch))})
            pipe.execute()
        assert redis_.client.dbsize() == keys
        return {"dcache_rss": rss_bytes(node.proc.pid), "redis_rss": rss_bytes(redis_.proc.pid)}
    finally:
        node.stop()
        redis_.stop()


def scaling(tasks: int, per_task: int, processes: int) -> dict[str, float]:
    """Throughput of one node, then of a two-node cluster, each driven by
    ``processes`` client processes of ``tasks`` tasks (cluster-aware client)."""

    def drive(address: str, cluster: bool) -> float:
        code = (
            "import sys, benchmarks.compare as b; "
            f"print(b.dcache_concurrent({address!r}, {tasks}, {per_task}, cluster={cluster}))"
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=HERE.parent)
            for _ in range(processes)
        ]
        return sum(float(p.communicate()[0]) for p in procs)

    with EtcdServer() as etcd:
        one = Node(etcd.endpoint)
        try:
            wait_for_members(one.client_address, 1)
            single = drive(one.client_address, True)
            two = Node(etcd.endpoint)
            try:
                wait_for_members(one.client_address, 2)
                double = drive(one.client_address, True)
            finally:
                two.stop()
        finally:
            one.stop()
    return {"one_node_ops": single, "two_nodes_ops": double}


# -- report -----------------------------------------------------------------------


def plot(curve: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in curve.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("concurrent client tasks")
    ax.set_ylabel("GET ops/s")
    ax.set_title("GET throughput, 100-byte values, one process each (loopback)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run, not figures")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--plot", type=Path, default=HERE / "throughput.png")
    args = parser.parse_args()
    scale = 0.05 if args.quick else 1.0
    n = max(200, int(20_000 * scale))

    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "dcache": dcache.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    node, redis_ = Node(), Redis()
    try:
        print("sequential…", flush=True)
        results["sequential"] = sequential(node, redis_, n)
        print("50 concurrent tasks…", flush=True)
        per_task = max(20, int(800 * scale))
        results["concurrent"] = {
            "dcache": dcache_concurrent(node.client_address, 50, per_task),
            "redis": redis_concurrent(redis_.port, 50, per_task),
        }
        print("mget of 100 keys…", flush=True)
        results["mget"] = mget_rates(node, redis_, max(50, int(2000 * scale)))
        print("throughput against clients…", flush=True)
        curve: dict[str, dict[int, float]] = {"dcache (one connection)": {}, "redis-py asyncio (pool)": {}}
        for tasks in (1, 2, 5, 10, 20, 50, 100):
            ops = max(10, int(20_000 * scale) // tasks)
            curve["dcache (one connection)"][tasks] = dcache_concurrent(node.client_address, tasks, ops)
            curve["redis-py asyncio (pool)"][tasks] = redis_concurrent(redis_.port, tasks, ops)
        results["curve"] = {name: {str(k): v for k, v in points.items()} for name, points in curve.items()}
    finally:
        node.stop()
        redis_.stop()
    print("forwarded GET latency…", flush=True)
    results["latency"] = forwarded_latency(max(200, int(5000 * scale)))
    print("memory for 1M keys…", flush=True)
    results["memory"] = memory(int(1_000_000 * scale))
    print("scaling to two nodes…", flush=True)
    results["scaling"] = scaling(50, max(20, int(1000 * scale)), processes=2)

    seq, conc, mg = results["sequential"], results["concurrent"], results["mget"]
    lat, mem, sc = results["latency"], results["memory"], results["scaling"]
    rows = [
        ("sequential GET, 1 client (sync)", seq["dcache_sync_get"], seq["redis_get"], "≥ 0.7x", seq["dcache_sync_get"] / seq["redis_get"] >= 0.7),
        ("sequential SET, 1 client (sync)", seq["dcache_sync_set"], seq["redis_set"], "≥ 0.7x", seq["dcache_sync_set"] / seq["redis_set"] >= 0.7),
        ("sequential GET, 1 client (async)", seq["dcache_async_get"], seq["redis_get"], "≥ 0.7x", seq["dcache_async_get"] / seq["redis_get"] >= 0.7),
        ("50 tasks, GET ops/s", conc["dcache"], conc["redis"], "≥ 1.0x", conc["dcache"] / conc["redis"] >= 1.0),
        ("mget of 100 keys, keys/s", mg["dcache_mget_keys"], mg["redis_mget_keys"], "≥ 0.5x", mg["dcache_mget_keys"] / mg["redis_mget_keys"] >= 0.5),
        ("forwarded / local GET p50 (µs)", lat["forwarded_p50_us"], lat["local_p50_us"], "≤ 2.0x", lat["forwarded_p50_us"] / lat["local_p50_us"] <= 2.0),
        ("RSS for the keys (MiB), dcache / Redis", mem["dcache_rss"] / 2**20, mem["redis_rss"] / 2**20, "≤ 2.5x", mem["dcache_rss"] / mem["redis_rss"] <= 2.5),
        ("2 nodes / 1 node, ops/s", sc["two_nodes_ops"], sc["one_node_ops"], "≥ 1.6x", sc["two_nodes_ops"] / sc["one_node_ops"] >= 1.6),
    ]  # fmt: skip
    results["table"] = [
        {"what": w, "dcache": a, "reference": b, "ratio": a / b, "target": t, "met": bool(ok)} for w, a, b, t, ok in rows
    ]
    print()
    print(f"{'workload':42} {'dcache':>12} {'reference':>12} {'ratio':>7}  target  met")
    for w, a, b, t, ok in rows:
        print(f"{w:42} {a:12,.0f} {b:12,.0f} {a / b:7.2f}  {t:7} {'yes' if ok else 'NO'}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(curve, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
