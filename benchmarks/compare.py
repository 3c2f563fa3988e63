"""dcache next to Redis on the same machine and workloads, in one run.

    pip install -e '.[bench]'          # redis-py and matplotlib
    apt-get install redis-server       # the server to compare with
    python benchmarks/compare.py       # about five minutes; --quick for a smoke run

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
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

import dcache
from dcache import codec, wsframe
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
    def __init__(self, etcd: str | None = None, cluster: str = "default") -> None:
        self.client_address = f"127.0.0.1:{free_port()}"
        self.peer_address = f"127.0.0.1:{free_port()}"
        self.etcd, self.cluster = etcd, cluster
        self.proc = subprocess.Popen(self.command())
        if not wait_until_serving(self.client_address, 15):
            raise RuntimeError("dcache node did not start")

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "dcache", "serve", "--client-listen", self.client_address,
               "--listen", self.peer_address, "--log-level", "warning"]  # fmt: skip
        if self.etcd:
            cmd += ["--etcd", self.etcd, "--cluster", self.cluster]
        return cmd

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
    """Median latency of a local and a forwarded GET through ``SyncClient``,
    alternating request by request; then the same with a client that
    sleeps while it waits instead of polling (``busy_poll=0``)."""
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
                samples: dict[str, list[float]] = {}
                with dcache.SyncClient(a.client_address, busy_poll=0) as sleeper:
                    for client, prefix in ((c, ""), (sleeper, "sleeping_")):
                        for _ in range(n):
                            for name, key in (("local", local), ("forwarded", remote)):
                                started = time.perf_counter()
                                client.get(key)
                                samples.setdefault(prefix + name, []).append(time.perf_counter() - started)
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


def _raw_connection(address: str) -> socket.socket:
    """A greeted dcache connection as a plain blocking socket."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    handshake = wsframe.ClientHandshake(address)
    sock.sendall(handshake.request)
    leftover = None
    while leftover is None:
        leftover = handshake.feed(sock.recv(65536))
    hello = [[0, "hello", {"version": codec.PROTOCOL_VERSION, "client": "compare.py"}]]
    sock.sendall(wsframe.build_frame(codec.encode_frame(hello), masked=True))
    parser = wsframe.FrameParser(expect_masked=False, max_message=1 << 20)
    got = parser.feed(leftover)
    while not got:
        got = parser.feed(sock.recv(65536))
    return sock


def _reply_count(payload: memoryview) -> int:
    """How many replies a reply frame holds, read off its CBOR array header."""
    first = payload[0]
    if first < 0x98:
        return first - 0x80
    return int.from_bytes(payload[1 : 2 if first == 0x98 else 3], "big")


LEAN_DEPTH = 2  # frames in flight per node


def lean_frames(keys_by_address: dict[str, list[str]], in_flight: int = 50) -> tuple[int, dict[str, bytes]]:
    """The lean load's plan: ``in_flight`` GETs outstanding at all times (as
    50 tasks on one connection), split evenly over the nodes, each key sent
    to its owner, in pre-encoded frames of half a node's share. Returns the
    GETs per frame and each node's frame."""
    batch = max(1, in_flight // len(keys_by_address) // LEAN_DEPTH)
    frames = {
        address: wsframe.build_frame(
            codec.encode_frame([[i + 1, "get", {"key": keys[i % len(keys)]}] for i in range(batch)]), masked=True
        )
        for address, keys in keys_by_address.items()
    }
    return batch, frames


def lean_load(keys_by_address: dict[str, list[str]], seconds: float) -> float:
    """GET ops/s a node or cluster serves to the lean load (see
    :func:`lean_frames`), replies counted off their headers, not decoded;
    Python's stand-in for leanload.c where no C compiler is at hand."""
    conns = []
    depth = LEAN_DEPTH
    batch, frames = lean_frames(keys_by_address)
    for address, frame in frames.items():
        sock = _raw_connection(address)
        sock.setblocking(False)
        conns.append([sock, frame, bytearray()])
    done = 0
    poller = select.epoll()
    for sock, frame, _ in conns:
        poller.register(sock.fileno(), select.EPOLLIN)
        sock.sendall(frame * depth)
    by_fd = {conn[0].fileno(): conn for conn in conns}
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for fd, _ in poller.poll(0.1):
            sock, frame, buf = by_fd[fd]
            buf += sock.recv(1 << 20)
            frames = 0
            while len(buf) >= 2:  # replies are unmasked, unfragmented binary frames
                n = buf[1] & 0x7F
                start = 2 if n < 126 else 4 if n == 126 else 10
                if n >= 126:
                    n = int.from_bytes(buf[2:start], "big")
                if len(buf) < start + n:
                    break
                replies = _reply_count(memoryview(buf)[start : start + n])
                done += replies
                frames += -(-replies // batch)
                del buf[: start + n]
            if frames:
                sock.sendall(frame * frames)
    rate = done / (time.perf_counter() - started)
    for sock, _, _ in conns:
        sock.close()
    return rate


def key_plan(address: str, keys: list[str]) -> dict[str, list[str]]:
    """Store ``keys`` through ``address``; return them grouped by their owner's client address."""
    with dcache.SyncClient(address) as c:
        c.mset({k: VALUE for k in keys})
        view = c.members()
    shard_map = ShardMap.build(view["epoch"], [m["node"] for m in view["members"]])
    client_of = {m["node"]: m["client"] for m in view["members"]}
    plan: dict[str, list[str]] = {}
    for key in keys:
        plan.setdefault(client_of[shard_map.owner("", key.encode())], []).append(key)
    return plan


def in_processes(code: str, processes: int) -> float:
    """Run ``code`` (which prints a rate) in ``processes`` processes at once; the summed rate."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import benchmarks.compare as b; " + code], stdout=subprocess.PIPE, cwd=HERE.parent
        )
        for _ in range(processes)
    ]
    return sum(float(p.communicate()[0]) for p in procs)


def build_leanload() -> Path | None:
    """Compile leanload.c, the lean load in C, if a C compiler is at hand."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = Path(tempfile.mkdtemp(prefix="dcache-bench-")) / "leanload"
    done = subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "leanload.c")], capture_output=True)
    return exe if done.returncode == 0 else None


def c_lean_load(exe: Path, keys_by_address: dict[str, list[str]], seconds: float, processes: int) -> float:
    """The lean load from ``processes`` leanload processes at once; the summed rate."""
    batch, frames = lean_frames(keys_by_address)
    hello = wsframe.build_frame(
        codec.encode_frame([[0, "hello", {"version": codec.PROTOCOL_VERSION, "client": "leanload"}]]), masked=True
    )
    args = [str(seconds), str(LEAN_DEPTH)]
    for address, frame in frames.items():
        host, port = address.rsplit(":", 1)
        args += [host, port, hello.hex(), frame.hex(), str(batch)]
    procs = [subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE) for _ in range(processes)]
    return sum(float(p.communicate()[0].split()[0]) for p in procs)


def steal_seconds() -> float:
    """CPU time the hypervisor has taken from this machine so far (steal time in /proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scaling(
    tasks: int, per_task: int, seconds: float, processes: int = 2, pairs: int = 12, client_rounds: int = 3
) -> dict[str, Any]:
    """GET throughput of a one-node and a two-node cluster.

    Each is driven by ``processes`` load processes two ways: the lean load
    (what the cluster can serve; leanload.c, or its Python stand-in without
    a C compiler) and ClusterClient with ``tasks`` tasks each (what Python
    clients get out of it; bound by the clients' own CPU on a small
    machine). This machine's speed drifts from one second to the next, so
    the lean load runs in ``pairs`` pairs, one cluster right after the
    other in alternating order, and the ratio is the median of the pairs'
    ratios. Each lean run also records the CPU share its nodes used, the
    GETs a node served per CPU-second it used, and the steal time (CPU the
    hypervisor took from this machine)."""
    exe = build_leanload()
    with EtcdServer() as etcd:
        clusters = {"one": [Node(etcd.endpoint, "one")], "two": [Node(etcd.endpoint, "two"), Node(etcd.endpoint, "two")]}
        try:
            plans = {}
            for name, nodes in clusters.items():
                wait_for_members(nodes[0].client_address, len(nodes))
                plans[name] = key_plan(nodes[0].client_address, CONCURRENT_KEYS)
            runs: dict[str, list[float]] = {}
            ratios = []
            for pair in range(pairs):
                rates = {}
                for name in ("one", "two") if pair % 2 == 0 else ("two", "one"):
                    nodes = clusters[name]
                    cpu0, steal0, started = [cpu_seconds(n.proc.pid) for n in nodes], steal_seconds(), time.perf_counter()
                    if exe is not None:
                        rates[name] = c_lean_load(exe, plans[name], seconds, processes)
                    else:
                        rates[name] = in_processes(f"print(b.lean_load({plans[name]!r}, {seconds}))", processes)
                    elapsed = time.perf_counter() - started
                    runs.setdefault(f"{name}_lean", []).append(rates[name])
                    runs.setdefault(f"{name}_steal", []).append((steal_seconds() - steal0) / elapsed)
                    node_cpu = statistics.mean(cpu_seconds(n.proc.pid) - c for n, c in zip(nodes, cpu0)) / elapsed
                    runs.setdefault(f"{name}_node_cpu", []).append(node_cpu)
                    runs.setdefault(f"{name}_per_cpu", []).append(rates[name] / len(nodes) / node_cpu if node_cpu else 0.0)
                ratios.append(rates["two"] / rates["one"])
            for _ in range(client_rounds):
                for name, nodes in clusters.items():
                    address = nodes[0].client_address
                    client = in_processes(
                        f"print(b.dcache_concurrent({address!r}, {tasks}, {per_task}, cluster=True))", processes
                    )
                    runs.setdefault(f"{name}_client", []).append(client)
        finally:
            for nodes in clusters.values():
                for node in nodes:
                    node.stop()
    result: dict[str, Any] = {name: statistics.median(values) for name, values in runs.items()}
    result["lean_ratio"] = statistics.median(ratios)
    result["lean_ratios"] = ratios
    result["lean_load"] = "leanload.c" if exe is not None else "Python (no C compiler found)"
    return result


def _echo_server(port: Any, upstream: int | None) -> None:
    """A plain TCP server for :func:`raw_relay_latency`: answers at once, or,
    for messages starting with F, asks ``upstream`` first. Polls like dcache."""
    listener = socket.create_server(("127.0.0.1", 0))
    port.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = None
    if upstream is not None:
        up = socket.create_connection(("127.0.0.1", upstream))
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := _poll_recv(conn):
        if up is not None and data[:1] == b"F":
            up.sendall(data)
            data = _poll_recv(up)
        conn.sendall(data)


def _poll_recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            os.sched_yield()


def raw_relay_latency(n: int) -> dict[str, float]:
    """The floor under the forwarded/local ratio on this machine: the same
    request/reply over plain sockets between three processes that do no work
    at all, answered by the first server or relayed to a second one."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    port = ctx.Queue()
    owner = ctx.Process(target=_echo_server, args=(port, None), daemon=True)
    owner.start()
    relay = ctx.Process(target=_echo_server, args=(port, port.get()), daemon=True)
    relay.start()
    sock = socket.create_connection(("127.0.0.1", port.get()))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples: dict[str, list[float]] = {"local": [], "forwarded": []}
    with sock:
        for _ in range(n):
            for name, message in (("local", b"L" * 120), ("forwarded", b"F" * 120)):
                started = time.perf_counter()
                sock.sendall(message)
                _poll_recv(sock)
                samples[name].append(time.perf_counter() - started)
    relay.join(5)
    owner.join(5)
    return {f"{name}_p50_us": statistics.median(s) * 1e6 for name, s in samples.items()}


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


def row(
    what: str, a: float, b: float, *, at_least: float | None = None, at_most: float | None = None, ratio: float | None = None
) -> tuple[str, float, float, float, str, bool | None]:
    """A row of the report: the figures, their ratio (``a / b`` unless
    given), the target and whether the ratio meets it."""
    r = a / b if ratio is None else ratio
    if at_least is not None:
        return what, a, b, r, f"≥ {at_least}x", r >= at_least
    if at_most is not None:
        return what, a, b, r, f"≤ {at_most}x", r <= at_most
    return what, a, b, r, "", None


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
    results["latency"] = forwarded_latency(max(200, int(10_000 * scale)))
    print("memory for 1M keys…", flush=True)
    results["memory"] = memory(int(1_000_000 * scale))
    print("forwarding floor over plain sockets…", flush=True)
    results["raw_latency"] = raw_relay_latency(max(500, int(20_000 * scale)))
    print("scaling to two nodes…", flush=True)
    results["scaling"] = scaling(50, max(20, int(1000 * scale)), seconds=max(0.5, 1.5 * scale), pairs=max(2, int(12 * scale)))

    seq, conc, mg = results["sequential"], results["concurrent"], results["mget"]
    lat, mem, sc, raw = results["latency"], results["memory"], results["scaling"], results["raw_latency"]
    rows = [
        row("sequential GET, 1 client (sync)", seq["dcache_sync_get"], seq["redis_get"], at_least=0.7),
        row("sequential SET, 1 client (sync)", seq["dcache_sync_set"], seq["redis_set"], at_least=0.7),
        row("sequential GET, 1 client (async)", seq["dcache_async_get"], seq["redis_get"], at_least=0.7),
        row("50 tasks, GET ops/s", conc["dcache"], conc["redis"], at_least=1.0),
        row("mget of 100 keys, keys/s", mg["dcache_mget_keys"], mg["redis_mget_keys"], at_least=0.5),
        row("forwarded / local GET p50 (µs)", lat["forwarded_p50_us"], lat["local_p50_us"], at_most=2.0),
        row("  the same, client sleeps while it waits (µs)", lat["sleeping_forwarded_p50_us"], lat["sleeping_local_p50_us"]),
        row("  plain sockets, no work: relayed / direct (µs)", raw["forwarded_p50_us"], raw["local_p50_us"]),
        row("RSS for the keys (MiB), dcache / Redis", mem["dcache_rss"] / 2**20, mem["redis_rss"] / 2**20, at_most=2.5),
        row(
            "2 nodes / 1 node, GET ops/s served (lean load)", sc["two_lean"], sc["one_lean"], at_least=1.6, ratio=sc["lean_ratio"]
        ),
        row("  GETs per node CPU-second, a node of two / one node", sc["two_per_cpu"], sc["one_per_cpu"]),
        row("  same, driven by ClusterClient", sc["two_client"], sc["one_client"]),
    ]
    results["table"] = [
        {"what": w.strip(), "dcache": a, "reference": b, "ratio": r, "target": t or None, "met": ok} for w, a, b, r, t, ok in rows
    ]
    print()
    print(f"{'workload':48} {'dcache':>12} {'reference':>12} {'ratio':>7}  target  met")
    for w, a, b, r, t, ok in rows:
        met = "" if ok is None else "yes" if ok else "NO"
        print(f"{w:48} {a:12,.0f} {b:12,.0f} {r:7.2f}  {t:7} {met}")
    print(
        f"\n2 nodes / 1 node, pair by pair: {', '.join(f'{r:.2f}' for r in sc['lean_ratios'])}"
        f"\nnode CPU busy: one node {sc['one_node_cpu']:.0%}, two nodes {sc['two_node_cpu']:.0%} each;"
        f" steal time: {sc['one_steal']:.0%} / {sc['two_steal']:.0%} of a CPU (medians)"
    )
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(curve, args.plot)
    print(f"\nlean load: {sc['lean_load']}")
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
