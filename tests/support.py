"""Helpers the tests share: nodes in-process and as `dcache serve` processes, the CLI, process checks.

Fixtures (a real etcd) are in conftest.py; these are plain functions, imported
by the test modules that need them.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading

import trio

from dcache.localcluster import free_port, port_is_free
from dcache.node import BoundAddresses, Node, NodeConfig

LEASE_TTL = 2.0  # short, so that tests see a dead node leave the view within seconds
READY = re.compile(r"ready: clients on (\S+), peers on (\S+)")


class ServeProcess:
    """A standalone `dcache serve` process on loopback ports of its choosing.
    A thread reads its log to the end, so that it can never block on a full
    pipe (``log`` holds the lines so far)."""

    def __init__(self, *extra: str, start_timeout: float = 15) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dcache", "serve", "--client-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.client_address = self.peer_address = ""
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                match = READY.search(line)
                if match:
                    self.client_address, self.peer_address = match.groups()
                    ready.set()
            ready.set()  # (it exited)

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(start_timeout) or not self.client_address:
            self.stop()
            raise AssertionError("dcache serve did not get ready; its log:\n" + "".join(self.log))

    def cli(self, *args: str, stdin: bytes | None = None, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
        """A one-shot `dcache` command against this node."""
        env = {**os.environ, "DCACHE_SERVER": self.client_address}
        return subprocess.run([sys.executable, "-m", "dcache", *args], input=stdin, capture_output=True, timeout=timeout, env=env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def output(self) -> str:
        """Its whole log, once it has exited."""
        self._reader.join(10)
        return "".join(self.log)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def http_get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    """A node's metrics endpoint asked for ``path``: the status and the body."""
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = b""
    while chunk := await stream.receive_some(65536):
        response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def start_node(nursery: trio.Nursery, **config: object) -> tuple[Node, BoundAddresses]:
    """A node in this process on loopback ports, living as long as ``nursery``."""
    node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", **config))  # type: ignore[arg-type]
    bound = await nursery.start(node.run)
    return node, bound


async def node_address(nursery: trio.Nursery, **config: object) -> BoundAddresses:
    """Where a node started as :func:`start_node` does listens."""
    return (await start_node(nursery, **config))[1]


def serve(etcd: str, *extra: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """A `dcache serve` process in the cluster at ``etcd``: the process, its client and its peer address."""
    client_port, peer_port = free_port(), free_port()
    client, peer = f"127.0.0.1:{client_port}", f"127.0.0.1:{peer_port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcache", "serve", "--etcd", etcd, "--listen", peer, "--client-listen", client,
         "--lease-ttl", str(LEASE_TTL), "--log-level", "warning", *extra],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, client, peer


def kill_all(nodes: list[tuple[subprocess.Popen[bytes], str, str]]) -> None:
    """Kill what :func:`serve` started and is still running, and reap it all."""
    for proc, _, _ in nodes:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def dcache_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "dcache", *args], capture_output=True, timeout=20)


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` free ports in a row."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise AssertionError("no free port range")


def children(pid: int) -> dict[int, bytes]:
    """The live child processes of ``pid``, with their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in "ZX":
                found[int(entry)] = cmdline
    return found


def alive(pid: int, cmdline: bytes) -> bool:
    """Whether ``pid`` still runs ``cmdline`` (not another process that took its pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return state not in "ZX" and f.read() == cmdline
    except OSError:
        return False
