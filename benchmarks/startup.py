"""How long a one-shot command takes from start to exit, against `python -c pass`.

    python benchmarks/startup.py [--runs 21] [--json FILE]

Starts a node, stores a key, then times `dcache get KEY` and `python -c pass`
(and `redis-cli get` when redis-cli and a redis-server are on PATH) in
alternation, so that both see the same machine; reports each one's median
and the ratio of the medians. Bytecode caching is on for the children, as it
is after any ordinary install (a first, unmeasured run writes the caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    dcache = str(Path(sys.executable).parent / "dcache")
    port = free_port()
    node = subprocess.Popen(
        [
            dcache,
            "serve",
            "--client-listen",
            f"127.0.0.1:{port}",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--log-level",
            "warning",
        ],
        env=env,
    )
    redis = None
    try:
        server = f"127.0.0.1:{port}"
        for _ in range(100):
            if (
                subprocess.run(
                    [dcache, "set", "startup:key", "hello", "--server", server], env=env, capture_output=True
                ).returncode
                == 0
            ):
                break
            time.sleep(0.1)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "dcache get": [dcache, "get", "startup:key", "--server", server],
        }
        if shutil.which("redis-server") and shutil.which("redis-cli"):
            redis_port = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
            )
            time.sleep(0.3)
            commands["redis-cli get"] = ["redis-cli", "-p", str(redis_port), "get", "startup:key"]
        for command in commands.values():  # warm: bytecode caches, page cache
            timed(command, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                times[name].append(timed(command, env))
        medians = {name: statistics.median(values) for name, values in times.items()}
        ratio = medians["dcache get"] / medians["python -c pass"]
        for name, value in medians.items():
            spread = f"{min(times[name]) * 1000:.0f}-{max(times[name]) * 1000:.0f} ms"
            print(f"{name:16} median {value * 1000:6.1f} ms  ({spread}, {args.runs} runs)")
        print(f"dcache get / python -c pass: {ratio:.2f} (target <= 5)")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": args.runs, "median_s": medians, "ratio": ratio}, indent=2) + "\n")
    finally:
        node.terminate()
        node.wait(10)
        if redis is not None:
            redis.terminate()
            redis.wait(10)


if __name__ == "__main__":
    main()
