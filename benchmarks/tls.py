"""What TLS costs: GETs over wss:// against plain connections, dcache and Redis, in one run.

    pip install -e '.[test,bench]'     # redis-py, trustme
    apt-get install redis-server       # built with TLS on Debian
    python benchmarks/tls.py           # about a minute; --quick for a smoke run

Makes a throwaway CA and certificate, starts a plain and a TLS `dcache serve`
and a redis-server with a plain and a TLS port, and measures, alternating,
sequential GETs (one client, one request at a time: SyncClient against
redis-py) and GETs from 50 tasks sharing one client (the async Client against
redis-py's asyncio client). Prints each as TLS/plain and writes
benchmarks/tls.json. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trustme

import dcache
from dcache.localcluster import free_port

HERE = Path(__file__).resolve().parent
VALUE = b"v" * 100
KEYS = [f"k{i}" for i in range(1000)]
TASKS = 50


def certificates(folder: Path) -> dict[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    with open(paths["cert"], "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    return {name: str(path) for name, path in paths.items()}


def start_dcache(tls: ssl.SSLContext | None, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcache", "serve", "--client-listen", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{free_port()}",
         "--log-level", "warning", *extra],
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while True:
        try:
            with dcache.SyncClient(f"127.0.0.1:{port}", tls=tls, timeout=1) as client:
                client.ping()
            return proc, f"127.0.0.1:{port}"
        except dcache.DcacheError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def start_redis(certs: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, int]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server not found: apt-get install redis-server")
    port, tls_port = free_port(), free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--tls-port", str(tls_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--tls-cert-file", certs["cert"], "--tls-key-file", certs["key"], "--tls-ca-cert-file", certs["ca"],
         "--tls-auth-clients", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc, port, tls_port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def sequential_dcache(address: str, tls: ssl.SSLContext | None, n: int) -> float:
    with dcache.SyncClient(address, tls=tls) as client:
        client.set("seq", VALUE)
        started = time.perf_counter()
        for _ in range(n):
            client.get("seq")
        return n / (time.perf_counter() - started)


def sequential_redis(port: int, ca: str | None, n: int) -> float:
    import redis

    r = redis.Redis(port=port, ssl=ca is not None, ssl_ca_certs=ca)
    r.set("seq", VALUE)
    started = time.perf_counter()
    for _ in range(n):
        r.get("seq")
    r.close()
    return n / (time.perf_counter() - started)


def tasks_dcache(address: str, tls: ssl.SSLContext | None, per_task: int) -> float:
    async def run() -> float:
        async with dcache.connect(address, tls=tls) as client:
            await client.mset({k: VALUE for k in KEYS})

            async def worker(task: int) -> None:
                for i in range(per_task):
                    await client.get(KEYS[(task * 7919 + i) % len(KEYS)])

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for task in range(TASKS):
                    nursery.start_soon(worker, task)
            return TASKS * per_task / (time.perf_counter() - started)

    return trio.run(run)


def tasks_redis(port: int, ca: str | None, per_task: int) -> float:
    import redis.asyncio as aioredis

    async def run() -> float:
        client = aioredis.Redis(port=port, max_connections=TASKS, ssl=ca is not None, ssl_ca_certs=ca)
        await client.mset({k: VALUE for k in KEYS})

        async def worker(task: int) -> None:
            for i in range(per_task):
                await client.get(KEYS[(task * 7919 + i) % len(KEYS)])

        started = time.perf_counter()
        await asyncio.gather(*(worker(task) for task in range(TASKS)))
        rate = TASKS * per_task / (time.perf_counter() - started)
        await client.aclose()
        return rate

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, one round")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    n, per_task, rounds = (500, 20, 1) if options.quick else (20_000, 400, options.rounds)
    os.environ.setdefault("DCACHE_BUSY_POLL_US", "1000")  # the default, for both servers' clients alike
    with tempfile.TemporaryDirectory() as folder:
        certs = certificates(Path(folder))
        tls = dcache.tls_context(ca=certs["ca"])
        plain_proc, plain = start_dcache(None)
        tls_proc, secure = start_dcache(tls, "--tls-cert", certs["cert"], "--tls-key", certs["key"])
        redis_proc, redis_port, redis_tls_port = start_redis(certs)
        runs: dict[str, list[float]] = {}
        try:
            for _ in range(rounds):
                for name, measure in (
                    ("dcache sequential GET, plain", lambda: sequential_dcache(plain, None, n)),
                    ("dcache sequential GET, TLS", lambda: sequential_dcache(secure, tls, n)),
                    ("Redis sequential GET, plain", lambda: sequential_redis(redis_port, None, n)),
                    ("Redis sequential GET, TLS", lambda: sequential_redis(redis_tls_port, certs["ca"], n)),
                    ("dcache 50-task GET, plain", lambda: tasks_dcache(plain, None, per_task)),
                    ("dcache 50-task GET, TLS", lambda: tasks_dcache(secure, tls, per_task)),
                    ("Redis 50-task GET, plain", lambda: tasks_redis(redis_port, None, per_task)),
                    ("Redis 50-task GET, TLS", lambda: tasks_redis(redis_tls_port, certs["ca"], per_task)),
                ):
                    runs.setdefault(name, []).append(measure())
        finally:
            for proc in (plain_proc, tls_proc, redis_proc):
                proc.terminate()
                proc.wait(10)
    rates = {name: statistics.median(values) for name, values in runs.items()}
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M"), "rounds": rounds, "rates": rates, "ratios": {}}
    print(f"{'':32} {'plain/s':>10} {'TLS/s':>10} {'TLS/plain':>10}")
    for server in ("dcache", "Redis"):
        for load in ("sequential GET", "50-task GET"):
            plain_rate, tls_rate = rates[f"{server} {load}, plain"], rates[f"{server} {load}, TLS"]
            results["ratios"][f"{server} {load}"] = round(tls_rate / plain_rate, 3)
            print(f"{server + ' ' + load:32} {plain_rate:>10,.0f} {tls_rate:>10,.0f} {tls_rate / plain_rate:>10.2f}")
    for load in ("sequential GET", "50-task GET"):
        ratio = rates[f"dcache {load}, TLS"] / rates[f"Redis {load}, TLS"]
        results["ratios"][f"dcache/Redis {load}, both TLS"] = round(ratio, 3)
        print(f"dcache/Redis {load}, both over TLS: {ratio:.2f}")
    if not options.quick:
        (HERE / "tls.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
