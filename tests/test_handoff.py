"""Shards moving with their entries, without sockets: two nodes' placements
and stores, and the handing-over task over a fake link that delivers to the
other node's store in order, on virtual time."""

from __future__ import annotations

from typing import Any

import trio

from dcache import handoff
from dcache.handoff import Placement, Signal, absorb, claim, hand_over
from dcache.shard import NUM_SHARDS, ShardMap, shard_of
from dcache.store import Store

A, B, C, X = "a:1", "b:1", "c:1", "x:1"


class Node:
    """What hand_over and claim need of a node: a placement, a store, peer links."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.placement = Placement(node_id)
        self.store = Store(clock=trio.current_time)
        self.wake = Signal()
        self.claims = Signal()

    def view(self, epoch: int, members: tuple[str, ...], active: tuple[str, ...] | None = None) -> ShardMap:
        serving = self.placement.apply(epoch, members, members if active is None else active, trio.current_time())
        self.wake.set()
        self.claims.set()
        return serving

    def waker(self) -> trio.Event:
        return self.wake.event()

    def claim_waker(self) -> trio.Event:
        return self.claims.event()


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

    def session(self, node_id: str) -> object | None:
        return self if node_id in self.nodes else None

    def submit(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> Reply:
        [(op, args)] = requests
        if op == "claim":
            return Reply([(0, self.nodes[node_id].placement.answer_claim(self.sender.id, args["shards"]))])
        assert op == "handoff"
        self.handed.append(args)
        reply, onward = absorb(
            self.nodes[node_id].placement, self.nodes[node_id].store, self.sender.id, args, trio.current_time()
        )
        return Reply([(0, reply)])

    async def forward(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
        [(op, args)] = requests
        assert op == "claim"
        return [(0, self.nodes[node_id].placement.answer_claim(self.sender.id, args["shards"]))]


def settle(nodes: dict[str, Node]) -> None:
    """Nodes that started together: their claims answered (see claim()) until none is left."""
    for _ in range(len(nodes) + 1):
        for node in nodes.values():
            for source, shards in node.placement.claims().items():
                node.placement.claim_answered(source, nodes[source].placement.answer_claim(node.id, shards))
    assert not any(node.placement.incoming for node in nodes.values())


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
    assert b.give_up_waiting(handoff.ARRIVAL_TIMEOUT - 1) == []  # (nothing came since the wait began at 0)
    assert shard in b.give_up_waiting(handoff.ARRIVAL_TIMEOUT)
    store = Store(clock=lambda: 0.0)
    key = next(b"k%d" % i for i in range(100_000) if shard_of("", b"k%d" % i) == shard)
    store.set("", key, b"new")
    reply, _ = absorb(b, store, A, {"entries": [["", key, b"old", 0, 1]], "begin": [shard], "done": [shard], "epoch": 2}, 0.0)
    assert reply == {"taken": 0, "serving": [shard], "refused": []} and store.get("", key) == b"new"


def test_one_large_shard_goes_in_parts_and_a_batch_stops_near_its_size() -> None:
    store = Store(clock=lambda: 0.0)
    big = [b"k%d" % i for i in range(400_000) if shard_of("", b"k%d" % i) == 7][:40]
    for key in big:
        store.set("", key, b"x" * 20_000)
    small = [s for s in range(100, 140)]
    for shard in small:
        key = next(b"s%d" % i for i in range(100_000) if shard_of("", b"s%d" % i) == shard)
        store.set("", key, b"y")
    messages, done, count = handoff.shard_messages(store, [7, *small], 1)
    assert done == [7] and count == len(big) and len(messages) >= 3  # 800 KB in parts of about 256 KiB
    assert [m["done"] for m in messages[:-1]] == [[]] * (len(messages) - 1) and messages[-1]["done"] == [7]
    assert messages[0]["begin"] == [7] and all(m["begin"] == [] for m in messages[1:])
    messages, done, count = handoff.shard_messages(store, small, 1)
    assert done == small and len(messages) == 1 and count == 40


def test_entries_from_a_newer_view_are_kept_not_sent_back() -> None:
    """b leaves and hands its shards to a before a has seen it leaving: a
    serves them and does not send them back by its older view; a node whose
    view is the newer one passes such shards on to their owner by it."""
    a = Placement(A)
    a.apply(1, (A, B), (A, B), 0.0)
    a.claim_answered(B, {"absent": list(a.incoming), "elsewhere": []})
    theirs = [s for s, owner in enumerate(a.owners) if owner == B][:10]
    assert a.arrived(theirs, 2, 0.0) == [] and all(a.owners[s] == A for s in theirs)
    assert not a.outgoing
    a.apply(2, (A, B), (A,), 0.0)  # a's view catches up: nothing to move of those
    assert not a.outgoing and not set(theirs) & set(a.incoming) and all(a.owners[s] == A for s in theirs)
    c = Placement(C)
    c.apply(5, (A, C), (A, C), 0.0)
    c.claim_answered(A, {"absent": list(c.incoming), "elsewhere": []})
    others = [s for s, owner in enumerate(c.owners) if owner == A][:10]
    assert sorted(c.arrived(others, 4, 0.0)) == sorted(others) and all(c.outgoing[s] == A for s in others)


# -- found by review: each failed before ------------------------------------------------------


class LossyLinks(Links):
    """A link that may not deliver, or may lose the reply (the link broke)."""

    def __init__(self, sender: Node, nodes: dict[str, Node], *, deliver: bool = True, lose_reply: bool = False) -> None:
        super().__init__(sender, nodes)
        self.deliver, self.lose_reply = deliver, lose_reply

    def submit(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> Reply:
        reply = super().submit(node_id, requests) if self.deliver else Reply([(0, {})])
        return LostReply(reply.reply) if self.lose_reply else reply


class LostReply(Reply):
    async def wait(self) -> Any:
        from dcache.errors import PeerUnavailable

        await trio.sleep(0.001)
        raise PeerUnavailable("the link broke before the reply came")


def fill(node: Node, n: int = 2000) -> None:
    for i in range(n):
        node.store.set("", b"k%d" % i, b"v%d" % i)


def present(nodes: list[Node], n: int = 2000) -> int:
    """Keys readable from the node serving their shard."""
    found = 0
    for i in range(n):
        key = b"k%d" % i
        shard = shard_of("", key)
        found += any(node.store.get("", key) is not None and node.placement.owners[shard] == node.id for node in nodes)
    return found


def claim_once(node: Node, nodes: dict[str, Node]) -> None:
    for source, shards in node.placement.claims().items():
        node.placement.claim_answered(source, nodes[source].placement.answer_claim(node.id, shards))


async def hand_all(node: Node, links: Links) -> None:
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hand_over, node.placement, node.store, links, node.waker)
            while node.placement.outgoing or node.placement.sending:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_a_claim_while_a_failed_handoff_waits_to_be_sent_again_loses_nothing(autojump_clock: Any) -> None:
    a, b = Node(A), Node(B)
    a.view(1, (A,))
    fill(a)
    a.view(2, (A, B))
    b.view(2, (A, B))
    await handoff._hand(
        a.placement, a.store, LossyLinks(a, {B: b}, deliver=False, lose_reply=True).submit, B, list(a.placement.outgoing)
    )
    assert a.placement.outgoing and mine(a) == NUM_SHARDS  # it serves them again, from what it holds
    claim_once(b, {A: a})
    assert b.placement.incoming  # still waiting: a holds them
    await hand_all(a, Links(a, {B: b}))
    assert present([a, b]) == 2000


async def test_two_nodes_joining_one_after_the_other_find_the_holder(autojump_clock: Any) -> None:
    x, a, b = Node(X), Node(A), Node(B)
    x.view(1, (X,))
    fill(x)
    x.view(2, (X, A))
    a.view(2, (X, A))
    for node in (x, a, b):
        node.view(3, (X, A, B))
    for _ in range(3):
        claim_once(b, {X: x, A: a})
    await hand_all(x, Links(x, {A: a, B: b}))
    await hand_all(a, Links(a, {B: b, X: x}))
    assert present([x, a, b]) == 2000


async def test_a_new_wait_gets_its_own_time_before_shards_are_served_empty(autojump_clock: Any) -> None:
    b = Node(B)
    b.view(1, (A, B, C))
    await trio.sleep(handoff.ARRIVAL_TIMEOUT - 1)
    before = set(b.placement.incoming)
    b.view(2, (A, B, C), active=(A, B))  # c leaving: more shards, to come from c
    assert set(b.placement.incoming) - before
    await trio.sleep(1)
    assert b.placement.give_up_waiting(trio.current_time()) == []


async def test_a_shard_that_comes_back_mid_handoff_brings_no_deleted_key_back(autojump_clock: Any) -> None:
    a, b = Node(A), Node(B)
    a.view(1, (A,))
    b.placement.apply(1, (A,), (A,), 0.0)
    b.placement.apply(2, (A, B), (A, B), 0.0)
    a.view(2, (A, B))
    shard = next(iter(a.placement.outgoing))
    key = next(b"k%d" % i for i in range(10**6) if shard_of("", b"k%d" % i) == shard)
    a.store.set("", key, b"old")
    messages, sent, _ = handoff.shard_messages(a.store, [shard], 2)
    a.placement.handed(B, sent)
    for message in messages:
        absorb(b.placement, b.store, A, message, 0.0)
    assert b.store.delete("", key)
    a.placement.apply(3, (A, B), (A,), 0.0)  # b leaving before a read its ack: the shard comes back
    a.placement.acknowledged([shard])
    b.placement.apply(3, (A, B), (A,), 0.0)
    messages, sent, _ = handoff.shard_messages(b.store, [shard], 3)
    b.placement.handed(A, sent)
    for message in messages:
        absorb(a.placement, a.store, B, message, 0.0)
    assert a.placement.owners[shard] == A and a.store.get("", key) is None


async def test_a_node_that_serves_a_shard_already_takes_no_old_copy(autojump_clock: Any) -> None:
    a, b, c = Node(A), Node(B), Node(C)
    for node in (a, b):
        node.placement.apply(1, (A,), (A,), 0.0)
    a.view(2, (A, B))
    b.view(2, (A, B))
    t3 = ShardMap.build(3, (A, B, C))
    shard = next(s for s in a.placement.outgoing if t3.shard_owners[s] == C)
    key = next(b"k%d" % i for i in range(10**6) if shard_of("", b"k%d" % i) == shard)
    a.store.set("", key, b"old")
    await handoff._hand(a.placement, a.store, LossyLinks(a, {B: b}, lose_reply=True).submit, B, [shard])  # b got it
    b.store.set("", key, b"new")
    c.placement.apply(3, (A, B, C), (A, B, C), 0.0)
    b.view(3, (A, B, C))
    await hand_all(b, Links(b, {C: c}))
    a.view(3, (A, B, C))
    await hand_all(a, Links(a, {B: b, C: c}))  # its old copy: refused, and dropped
    assert c.store.get("", key) == b"new" and c.placement.owners[shard] == C
    assert a.store.get("", key) is None and a.placement.owners[shard] == C and a.placement.entries_dropped == 1


async def test_a_malformed_claim_answer_is_ignored(autojump_clock: Any) -> None:
    b = Node(B)
    b.view(1, (A, B))
    waiting = dict(b.placement.incoming)
    for answer in ({"absent": [[1]], "elsewhere": 5}, {"elsewhere": [[1, 2, 3], ["x", A]]}, None, [1]):
        b.placement.claim_answered(A, answer)
    assert b.placement.incoming == waiting


# -- found by the second review: each failed before -----------------------------------------

L = "l:1"


async def test_a_view_change_while_a_shard_is_in_flight_leaves_it_routed_to_a_node_that_passed_it_on(autojump_clock: Any) -> None:
    a, b, c = Node(A), Node(B), Node(C)
    a.view(1, (A,))
    b.placement.apply(1, (A,), (A,), 0.0)
    fill(a)
    a.view(2, (A, B))
    b.view(2, (A, B))
    t3 = ShardMap.build(3, (A, B, C))
    shard = next(s for s in a.placement.outgoing if t3.shard_owners[s] == C)
    messages, sent, _ = handoff.shard_messages(a.store, [shard], 2)
    a.placement.handed(B, sent)  # on the link to b ...
    a.view(3, (A, B, C))  # ... when c joins (a's view changes while it waits for b's ack)
    for message in messages:
        reply, _ = absorb(b.placement, b.store, A, message, 0.0)  # b's view is 2: it takes it
    for s in a.placement.acknowledged(sent):
        a.store.drop_shard(s)
    c.view(3, (A, B, C))
    b.view(3, (A, B, C))
    await hand_all(b, Links(b, {C: c}))  # b passes it on to c, its owner at epoch 3
    assert c.placement.owners[shard] == C and b.placement.owners[shard] == C and shard not in b.placement.incoming
    # a still forwards the shard to b, which answers every peer request for it `moved`
    # (not arriving there); a retries by the same map: UNAVAILABLE until the next view.
    assert a.placement.owners[shard] != B, "a routes the shard to b for good"


async def test_a_node_joining_while_another_leaves_serves_the_leavers_shards_empty(autojump_clock: Any) -> None:
    a, b, leaver = Node(A), Node(B), Node(L)
    nodes = {A: a, B: b, L: leaver}
    for node in nodes.values():
        node.view(1, (A, B, L))
    settle(nodes)
    t1 = ShardMap.build(1, (A, B, L))
    for i in range(2000):
        key = b"k%d" % i
        nodes[t1.owner("", key)].store.set("", key, b"v%d" % i)
    c = Node(C)
    nodes[C] = c
    members, active = (A, B, C, L), (A, B, C)  # one view: c joined, l is leaving (a drain, a rolling replace)
    for node in nodes.values():
        node.view(2, members, active)
    for _ in range(4):
        claim_once(c, nodes)  # c waits on a or b for l's shards; they name each other: 'nobody holds it'
    await hand_all(leaver, Links(leaver, {A: a, B: b, C: c}))
    assert leaver.placement.entries_dropped == 0, f"{leaver.placement.entries_dropped} entries of the leaver dropped"
    assert present([a, b, c]) == 2000


async def test_one_unreachable_new_owner_holds_up_every_other_handoff(autojump_clock: Any) -> None:
    a, b, leaver = Node(A), Node(B), Node(L)
    nodes = {A: a, B: b, L: leaver}
    for node in nodes.values():
        node.view(1, (A, B, L))
    settle(nodes)
    for node in nodes.values():
        node.view(2, (A, B, L), active=(A, B))  # l leaving; its link to a is down (a alive, its lease held)
    for_b = sum(1 for owner in leaver.placement.outgoing.values() if owner == B)
    links = Links(leaver, {B: b})  # linked(A) is False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handoff.hand_over, leaver.placement, leaver.store, links, leaver.waker)
        await trio.sleep(handoff.ARRIVAL_TIMEOUT)
        nursery.cancel_scope.cancel()
    left_for_b = sum(1 for owner in leaver.placement.outgoing.values() if owner == B)
    assert left_for_b == 0, f"{left_for_b} of {for_b} shards for b never handed over in 30 s (b now serves them empty)"


async def test_a_shard_that_comes_back_and_goes_again_while_in_flight_is_waited_for_then_served_empty(
    autojump_clock: Any,
) -> None:
    a, b = Node(A), Node(B)
    a.view(1, (A,))
    b.placement.apply(1, (A,), (A,), 0.0)
    fill(a)
    a.view(2, (A, B))
    b.view(2, (A, B))
    t4 = ShardMap.build(4, (A, C))
    shard = next(s for s in a.placement.outgoing if t4.shard_owners[s] == C)
    messages, sent, _ = handoff.shard_messages(a.store, [shard], 2)
    a.placement.handed(B, sent)  # on its way to b, when ...
    a.view(3, (A, B), active=(A,))  # ... b is marked leaving: the shard comes back (a waits for it from b)
    a.view(4, (A, B, C), active=(A, C))  # ... and c joins: it goes to c now
    for message in messages:
        absorb(b.placement, b.store, A, message, 0.0)
    for s in a.placement.acknowledged(sent):
        a.store.drop_shard(s)
    assert shard not in a.placement.incoming, "a still waits for a shard its view gives c (and says 'joining')"


async def test_and_after_30_s_a_serves_it_empty_beside_its_real_owner(autojump_clock: Any) -> None:
    a = Node(A)
    a.view(1, (A,))
    a.view(2, (A, B))
    t4 = ShardMap.build(4, (A, C))
    shard = next(s for s in a.placement.outgoing if t4.shard_owners[s] == C)
    a.placement.handed(B, [shard])
    a.view(3, (A, B), active=(A,))
    a.view(4, (A, B, C), active=(A, C))
    a.placement.acknowledged([shard])
    late = a.placement.give_up_waiting(trio.current_time() + handoff.ARRIVAL_TIMEOUT)
    assert shard not in late and a.placement.owners[shard] != A, "a serves c's shard, empty: writes to it through a are lost"


def test_when_every_node_leaves_there_is_nobody_to_hand_shards_to() -> None:
    """A whole cluster stopping (cluster up, Ctrl-C): once no member stays, a
    node hands nothing over, so its leave does not wait out the drain timeout."""
    a = Placement(A)
    a.apply(1, (A, B), (A, B), 0.0)
    a.claim_answered(B, {"absent": list(a.incoming), "elsewhere": []})
    a.apply(2, (A, B), (B,), 0.0)  # a leaving: its shards go to b
    assert a.outgoing
    a.apply(3, (A, B), (), 0.0)  # b leaving too
    assert not a.outgoing and not a.target.members


async def test_a_claim_names_only_the_shards_still_awaited_when_it_is_sent(autojump_clock: Any) -> None:
    """x joins and waits on a and on b. While its claim to the first of
    them is out, b's shards arrive (and, with replicas, x copies them back
    to b): the claim then sent to b must not name them, or b would take x
    for a node that lost them and hand them over again (as the copy it
    keeps), serving them itself meanwhile."""
    a, b, x = Node(A), Node(B), Node(X)
    for node in (a, b):
        node.view(1, (A, B))
    settle({A: a, B: b})
    x.view(2, (A, B, X))
    assert {*x.placement.incoming.values()} == {A, B}
    nodes = {A: a, B: b}
    sent: list[tuple[str, list[int]]] = []

    class Recording(Links):
        def submit(self, node_id: str, requests: list[tuple[str, dict[str, Any]]]) -> Reply:
            [(op, args)] = requests
            if op == "claim":
                sent.append((node_id, list(args["shards"])))
                if len(sent) == 1:  # while the first claim is out, the other holder's shards arrive
                    other = B if node_id == A else A
                    arriving = [s for s, holder in x.placement.incoming.items() if holder == other]
                    x.placement.arrived(arriving, 2, trio.current_time())
            return super().submit(node_id, requests)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, x.placement, Recording(x, nodes), x.claim_waker)
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    first = sent[0][0]
    assert all(node == first for node, _ in sent), sent  # nothing claimed from the other: it has handed all over


def test_a_shard_handed_over_and_coming_back_is_not_claimed_before_the_handoff_is_answered() -> None:
    """a hands a shard to b, and a view gives it back to a before b's answer:
    a waits for it from b, but claims it only once the handoff is answered
    (b keeping a's copy would take the claim for a lost shard and adopt it,
    while a, if the handoff failed on the way, serves it again)."""
    a = Placement(A)
    a.apply(1, (A, B), (A, B), 0.0)
    a.incoming.clear()
    shard = next(s for s in range(NUM_SHARDS) if a.target.shard_owners[s] == A)
    a.owners = [A] * NUM_SHARDS
    a.apply(2, (A, B), (B,), 0.0)  # a is leaving: it hands its shards to b
    a.handed(B, [shard])
    a.apply(3, (A, B), (A, B), 0.0)  # and stays after all
    assert a.incoming.get(shard) == B and shard in a.sending
    assert shard not in a.claims().get(B, [])
    a.refused(B, [shard])  # the handoff failed on the way: a serves it again
    assert a.owners[shard] == A and shard not in a.incoming
