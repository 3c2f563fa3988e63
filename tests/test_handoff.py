"""Shards moving with their entries, without sockets: two nodes' placements
and stores, and the handing-over task over a fake link that delivers to the
other node's store in order, on virtual time."""

from __future__ import annotations

from typing import Any

import trio

from dcache import handoff
from dcache.handoff import Placement, absorb, claim, hand_over
from dcache.shard import NUM_SHARDS, ShardMap, shard_of
from dcache.store import Store

A, B, C = "a:1", "b:1", "c:1"


class Node:
    """What hand_over and claim need of a node: a placement, a store, peer links."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.placement = Placement(node_id)
        self.store = Store(clock=trio.current_time)
        self.wake = trio.Event()
        self.claims = trio.Event()

    def view(self, epoch: int, members: tuple[str, ...], active: tuple[str, ...] | None = None) -> ShardMap:
        serving = self.placement.apply(epoch, members, members if active is None else active, trio.current_time())
        self.wake.set()
        self.claims.set()
        return serving

    def waker(self) -> trio.Event:
        if self.wake.is_set():
            self.wake = trio.Event()
        return self.wake

    def claim_waker(self) -> trio.Event:
        if self.claims.is_set():
            self.claims = trio.Event()
        return self.claims


class Reply:
    def __init__(self, reply: Any) -> None:
        self.reply = reply

    async def wait(self) -> Any:
        await trio.sleep(0.001)  # a round trip
        return self.reply

    def release(self) -> None:
        pass


class Links:
    """Delivers a message to the other node's handler at once, in order."""

    def __init__(self, sender: Node, nodes: dict[str, Node]) -> None:
        self.sender = sender
        self.nodes = nodes
        self.handed: list[dict[str, Any]] = []

    async def linked(self, node_id: str) -> bool:
        return node_id in self.nodes

    def submit(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> Reply:
        [(op, args)] = requests
        assert op == "handoff"
        self.handed.append(args)
        taken, onward = absorb(self.nodes[node_id].placement, self.nodes[node_id].store, args)
        return Reply([(0, taken)])

    async def forward(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
        [(op, args)] = requests
        assert op == "claim"
        return [(0, self.nodes[node_id].placement.answer_claim(self.sender.id, args["shards"]))]


def settle(nodes: dict[str, Node]) -> None:
    """Nodes that started together: their claims answered (see claim())."""
    for node in nodes.values():
        for source, shards in node.placement.claims().items():
            node.placement.claim_answered(source, nodes[source].placement.answer_claim(node.id, shards))


def mine(node: Node) -> int:
    return sum(1 for owner in node.placement.owners if owner == node.id)


async def test_a_joining_node_gets_its_shards_with_their_entries(autojump_clock: Any) -> None:
    a, b = Node(A), Node(B)
    a.view(1, (A,))
    for i in range(3000):
        a.store.set("", b"k%d" % i, b"v%d" % i + b"." * 200, ttl_ms=60_000 if i % 2 else 0)
    await trio.sleep(10)
    b.view(2, (A, B))  # b first: it waits for a's shards, and forwards to a meanwhile
    assert b.placement.incoming and set(b.placement.incoming.values()) == {A} and mine(b) == 0
    a.view(2, (A, B))
    assert mine(a) == NUM_SHARDS and len(a.placement.outgoing) == len(b.placement.incoming)  # a serves until it hands over
    links = Links(a, {B: b})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hand_over, a.placement, a.store, links, a.waker)
        while a.placement.outgoing or a.placement.sending:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    target = ShardMap.build(2, (A, B))
    assert a.placement.owners == b.placement.owners == list(target.shard_owners)
    assert not b.placement.incoming and len(links.handed) > 1  # several messages, each about BATCH_BYTES or less
    assert len(a.store) + len(b.store) == 3000
    for i in range(3000):
        owner = b if target.owner("", b"k%d" % i) == B else a
        assert owner.store.get("", b"k%d" % i) == b"v%d" % i + b"." * 200
        if i % 2:
            left = owner.store.ttl_ms("", b"k%d" % i)
            assert left is not None and abs(left - (60 - trio.current_time()) * 1000) <= 1  # the deadline kept
    assert b.placement.state()["entries_moved_in"] == len(b.store)


async def test_a_leaving_node_hands_everything_over(autojump_clock: Any) -> None:
    a, b, c = Node(A), Node(B), Node(C)
    for node in (a, b, c):
        node.view(1, (A, B, C))
    settle({A: a, B: b, C: c})
    for i in range(500):
        key = b"k%d" % i
        {A: a, B: b, C: c}[ShardMap.build(1, (A, B, C)).owner("", key)].store.set("", key, b"v")
    held = len(c.store)
    for node in (a, b, c):
        node.view(2, (A, B, C), active=(A, B))  # c is leaving
    assert set(c.placement.outgoing.values()) == {A, B} and mine(c) == NUM_SHARDS - mine(a) - mine(b)
    links = Links(c, {A: a, B: b})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hand_over, c.placement, c.store, links, c.waker)
        while c.placement.outgoing or c.placement.sending:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert len(c.store) == 0 and len(a.store) + len(b.store) == 500 and held > 0
    assert mine(a) + mine(b) == NUM_SHARDS and not a.placement.incoming and not b.placement.incoming


async def test_nodes_that_start_together_serve_at_once_what_nobody_holds(autojump_clock: Any) -> None:
    """Each takes the other for the holder of its shards; a claim tells
    them nobody holds them, and each serves its own."""
    a, b = Node(A), Node(B)
    a.view(1, (A, B))
    b.view(1, (A, B))
    assert mine(a) == mine(b) == 0  # each waits on the other
    nodes = {A: a, B: b}
    async with trio.open_nursery() as nursery:
        for node in (a, b):
            nursery.start_soon(claim, node.placement, Links(node, nodes), node.claim_waker)
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert mine(a) + mine(b) == NUM_SHARDS and a.placement.owners == b.placement.owners


async def test_a_claim_on_a_node_that_serves_the_shard_waits_for_it(autojump_clock: Any) -> None:
    a, b = Node(A), Node(B)
    a.view(1, (A,))
    b.view(2, (A, B))  # a has not seen b yet: it serves everything, and says so by saying nothing
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, b.placement, Links(b, {A: a}), b.claim_waker)
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert b.placement.incoming and mine(b) == 0


def test_a_shard_whose_holder_is_gone_is_served_at_once_empty() -> None:
    b = Placement(B)
    b.apply(2, (A, B), (A, B), 0.0)
    waiting = dict(b.incoming)
    b.apply(3, (B,), (B,), 0.0)  # a's lease lapsed: its entries are gone with it
    assert not b.incoming and all(b.owners[s] == B for s in waiting)


def test_late_entries_never_overwrite_a_shard_served_already() -> None:
    b = Placement(B)
    b.apply(2, (A, B), (A, B), 0.0)
    [shard, *_] = b.incoming
    assert b.give_up_waiting(handoff.ARRIVAL_TIMEOUT - 1) == []
    assert shard in b.give_up_waiting(handoff.ARRIVAL_TIMEOUT)
    store = Store(clock=lambda: 0.0)
    key = next(b"k%d" % i for i in range(100_000) if shard_of("", b"k%d" % i) == shard)
    store.set("", key, b"new")
    taken, _ = absorb(b, store, {"entries": [["", key, b"old", 0, 1]], "done": [shard]})
    assert taken == 0 and store.get("", key) == b"new"


def test_one_large_shard_goes_in_parts_and_a_batch_stops_near_its_size() -> None:
    store = Store(clock=lambda: 0.0)
    big = [b"k%d" % i for i in range(400_000) if shard_of("", b"k%d" % i) == 7][:40]
    for key in big:
        store.set("", key, b"x" * 20_000)
    small = [s for s in range(100, 140)]
    for shard in small:
        key = next(b"s%d" % i for i in range(100_000) if shard_of("", b"s%d" % i) == shard)
        store.set("", key, b"y")
    messages, done, count = handoff._messages(store, [7, *small])
    assert done == [7] and count == len(big) and len(messages) >= 3  # 800 KB in parts of about 256 KiB
    assert [m["done"] for m in messages[:-1]] == [[]] * (len(messages) - 1) and messages[-1]["done"] == [7]
    messages, done, count = handoff._messages(store, small)
    assert done == small and len(messages) == 1 and count == 40
