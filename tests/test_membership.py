"""Membership against a real etcd: leases, views, and until when a node can vouch for its view."""

from __future__ import annotations

import math

import trio

from dcache.localcluster import EtcdServer
from dcache.membership import EtcdMembership, View

TIMEOUT = 30


async def test_after_a_lapse_a_node_vouches_only_from_a_view_read_since_its_return(
    nursery: trio.Nursery, etcd_server: EtcdServer
) -> None:
    import etcd3  # type: ignore[import-untyped]

    vouches: list[tuple[float, int]] = []  # (until, epoch of the view then) per call
    membership = EtcdMembership(
        endpoint=etcd_server.endpoint,
        cluster="vouch",
        node_id="n:1",
        client_address="n:2",
        lease_ttl=2,
        on_vouch=lambda until: vouches.append((until, membership.current().epoch)),
    )
    etcd = etcd3.client("127.0.0.1", etcd_server.client_port)
    key = membership.prefix + "n:1"
    with trio.fail_after(TIMEOUT):
        before = trio.current_time()
        view = await nursery.start(membership.run)
        # Vouched from the lease's grant, which came after `before`, for its TTL.
        granted = membership._lease.ttl
        assert before + granted <= membership.vouched_until <= trio.current_time() + granted
        assert vouches and vouches[-1][0] == membership.vouched_until and vouches[-1][1] == view.epoch

        # From now on views are read only when the test lets them.
        gate, waiting = trio.Event(), trio.Event()
        read = membership._read

        async def gated_read() -> View:
            waiting.set()
            await gate.wait()
            return await read()

        membership._read = gated_read  # type: ignore[method-assign]
        await waiting.wait()

        # The lease goes (as when it lapses while the node is paused): no vouching at once.
        await trio.to_thread.run_sync(etcd.revoke_lease, membership._lease.id)
        while not vouches or vouches[-1][0] != -math.inf:
            await trio.sleep(0.05)
        assert membership.vouched_until == -math.inf
        # It registers again, and keeps its new lease alive...
        while (await trio.to_thread.run_sync(etcd.get, key))[0] is None:
            await trio.sleep(0.05)
        bound = membership._lease_bound
        while membership._lease_bound == bound:
            await trio.sleep(0.05)
        # ...but has read no view since it returned: still no vouching.
        assert membership.vouched_until == -math.inf
        assert vouches[-1][0] == -math.inf

        gate.set()
        while membership.vouched_until == -math.inf:
            await trio.sleep(0.05)
        _, meta = await trio.to_thread.run_sync(etcd.get, key)
        until, epoch = vouches[-1]
        assert epoch >= meta.mod_revision  # the view it vouches from is no older than its return
        assert until == membership.vouched_until == membership._lease_bound > trio.current_time()
        nursery.cancel_scope.cancel()
