"""ClusterClient against real `dcache serve` subprocesses over a real etcd, under faults."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import trio
from support import kill_all, serve

import dcache
from dcache.localcluster import EtcdServer, wait_until_serving

TIMEOUT = 60


def _members(address: str) -> int:
    r = subprocess.run(
        [sys.executable, "-m", "dcache", "members", "--json", "--server", address], capture_output=True, timeout=20
    )
    return len(json.loads(r.stdout)["members"]) if r.returncode == 0 else 0


async def test_tasks_sharing_a_cluster_client_outlive_its_first_node_leaving(etcd_server: EtcdServer) -> None:
    """Eight tasks share one ClusterClient; the node it first reached stops
    (SIGTERM). Every request of every task still gets its answer: the seed is
    replaced once, for all of them, and no error other than a DcacheError
    (not even trio's ValueError about a closed socket) may reach them."""
    nodes = [serve(etcd_server.endpoint) for _ in range(3)]
    try:
        for _, address, _ in nodes:
            assert await trio.to_thread.run_sync(wait_until_serving, address, 15)
        deadline = time.monotonic() + 15
        while await trio.to_thread.run_sync(_members, nodes[0][1]) != 3:
            assert time.monotonic() < deadline
            await trio.sleep(0.1)
        seed = nodes[0][0]
        done = [0] * 8
        with trio.fail_after(TIMEOUT):
            async with await dcache.ClusterClient.connect(nodes[0][1], timeout=10) as cache:

                async def work(n: int) -> None:
                    for i in range(400):
                        key = f"task{n}:{i % 50}"
                        await cache.set(key, f"{n}-{i}")
                        # (None: the entry went with the leaving node's shard, as entries do until they move with shards.)
                        assert await cache.get(key) in (f"{n}-{i}".encode(), None)
                        assert await cache.mget([key, f"task{(n + 1) % 8}:{i % 50}"]) is not None
                        done[n] += 1
                        if n == 0 and i == 40:
                            seed.send_signal(signal.SIGTERM)
                        await trio.sleep(0.002)

                async with trio.open_nursery() as nursery:
                    for n in range(8):
                        nursery.start_soon(work, n)
        assert seed.wait(10) == 0
        assert done == [400] * 8
    finally:
        kill_all(nodes)
