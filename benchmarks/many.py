"""Many clients at once: a dcache node and Redis under the same light load, by connection count.

    apt-get install redis-server gcc
    python benchmarks/many.py                  # about two minutes; --quick for a smoke run
    python benchmarks/many.py --connections 48 --seconds 5

For each number of connections (1, 16, 48, 200, 1000 by default) a small C
program (manyconn.c, compiled here) opens that many connections, keeps one
GET of a 100-byte value in flight on each, and records every request's
latency; it speaks dcache's protocol or Redis's, so both servers get the
same load, one after the other, in alternating order. The server's CPU time
is read from /proc around each run. Redis is also driven by its own
`redis-benchmark` (``get key`` on as many connections), the load the
many-connections issue first compared against: a heavier generator than
manyconn, so Redis's figure under it is lower, and both ratios are shown.
Prints a table, writes benchmarks/many.json and benchmarks/many.png
(throughput by connections).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dcache import codec, wsframe
from dcache.client import SyncClient

HERE = Path(__file__).resolve().parent
VALUE = b"v" * 100
CONNECTIONS = (1, 16, 48, 200, 1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 20_000):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20_000), hard))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build(out: Path) -> Path:
    binary = out / "manyconn"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "manyconn.c")], check=True)
    return binary


def run_load(binary: Path, kind: str, port: int, connections: int, seconds: float, server_pid: int) -> dict[str, float]:
    args = [str(binary), kind, "127.0.0.1", str(port), str(connections), str(seconds)]
    if kind == "dcache":
        hello = codec.encode_frame([[0, "hello", {"version": codec.PROTOCOL_VERSION, "client": "manyconn"}]])
        get = codec.encode_frame([[1, "get", {"key": b"key"}]])
        args += [wsframe.build_frame(hello, masked=True).hex(), wsframe.build_frame(get, masked=True).hex()]
    cpu = cpu_seconds(server_pid)
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=True).stdout.split()
    cpu = cpu_seconds(server_pid) - cpu
    rate, done, p50, p99 = float(out[0]), int(out[1]), float(out[2]), float(out[3])
    return {
        "ops_per_s": rate,
        "requests": done,
        "p50_us": p50,
        "p99_us": p99,
        "server_cpu_us_per_request": cpu / done * 1e6 if done else 0.0,
    }


def run_redis_benchmark(port: int, connections: int, seconds: float, expected_rate: float, server_pid: int) -> dict[str, float]:
    """``redis-benchmark`` on ``connections`` connections, sized to take about ``seconds``."""
    requests = max(10_000, int(expected_rate * seconds))
    args = ["redis-benchmark", "-p", str(port), "-c", str(connections), "-n", str(requests), "--csv", "get", "key"]
    cpu = cpu_seconds(server_pid)
    started = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds * 10 + 120, check=True).stdout
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(server_pid) - cpu
    fields = [f.strip('"') for f in out.strip().splitlines()[-1].split(",")]
    return {
        "ops_per_s": float(fields[1]),
        "requests": requests,
        "p50_us": float(fields[4]) * 1000,
        "p99_us": float(fields[6]) * 1000,
        "server_cpu_us_per_request": cpu / requests * 1e6,
        "elapsed_s": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, nargs="*", default=list(CONNECTIONS))
    parser.add_argument("--seconds", type=float, default=4.0, help="per run")
    parser.add_argument("--quick", action="store_true", help="1 s runs: a smoke run, not figures")
    parser.add_argument("--out", type=Path, default=HERE / "many.json")
    parser.add_argument("--plot", type=Path, default=HERE / "many.png")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    for tool in ("gcc", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install redis-server redis-tools gcc")
    raise_fd_limit()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory(prefix="dcache-many-") as tmp:
        binary = build(Path(tmp))
        redis_port, client_port = free_port(), free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no", "--maxclients", "10000"],
            stdout=subprocess.DEVNULL,
        )
        node = subprocess.Popen(
            [sys.executable, "-m", "dcache", "serve", "--client-listen", f"127.0.0.1:{client_port}",
             "--listen", f"127.0.0.1:{free_port()}", "--log-level", "warning"],
            env=env,
        )  # fmt: skip
        try:
            for _ in range(100):
                try:
                    with SyncClient(f"127.0.0.1:{client_port}") as client:
                        client.set("key", VALUE)
                    break
                except Exception:
                    time.sleep(0.1)
            subprocess.run(["redis-cli", "-p", str(redis_port), "set", "key", VALUE.decode()], check=True, capture_output=True)
            rows: list[dict[str, Any]] = []
            for i, connections in enumerate(args.connections):
                order = [("dcache", client_port, node.pid), ("redis", redis_port, redis.pid)]
                if i % 2:
                    order.reverse()
                results = {kind: run_load(binary, kind, port, connections, seconds, pid) for kind, port, pid in order}
                results["redis_benchmark"] = run_redis_benchmark(
                    redis_port, connections, seconds, results["redis"]["ops_per_s"], redis.pid
                )
                row = {"connections": connections, **results}
                row["ratio"] = row["dcache"]["ops_per_s"] / row["redis"]["ops_per_s"]
                row["ratio_redis_benchmark"] = row["dcache"]["ops_per_s"] / row["redis_benchmark"]["ops_per_s"]
                rows.append(row)
                d, r, b = row["dcache"], row["redis"], row["redis_benchmark"]
                print(
                    f"{connections:5} conns  dcache {d['ops_per_s']:9,.0f}/s p50 {d['p50_us']:7.0f} µs p99 {d['p99_us']:7.0f} µs"
                    f" cpu {d['server_cpu_us_per_request']:5.1f} µs/req   redis {r['ops_per_s']:9,.0f}/s p50 {r['p50_us']:7.0f}"
                    f" p99 {r['p99_us']:7.0f} cpu {r['server_cpu_us_per_request']:5.1f}  ratio {row['ratio']:.2f}"
                    f"   redis-benchmark {b['ops_per_s']:9,.0f}/s p50 {b['p50_us']:7.0f} p99 {b['p99_us']:7.0f}"
                    f"  ratio {row['ratio_redis_benchmark']:.2f}",
                    flush=True,
                )
        finally:
            for proc in (node, redis):
                proc.terminate()
                proc.wait(10)
    args.out.write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {args.out} (no matplotlib: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [row["connections"] for row in rows]
    for kind, label in (("dcache", "dcache"), ("redis", "Redis"), ("redis_benchmark", "Redis under redis-benchmark")):
        ax.plot(xs, [row[kind]["ops_per_s"] for row in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("connections, one GET in flight on each")
    ax.set_ylabel("GETs per second")
    ax.set_title("One node, many clients (C load on both)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
