"""Entries move with their shards: who serves each shard while shards move,
and the task that hands a node's shards to their new owners.

Every node places shards by rendezvous over the members that are not
leaving (the *target*). A shard whose target owner changes does not change
hands at once: the node holding its entries keeps serving it, and the new
owner forwards requests for it to that node, until the holder hands the
entries over. The holder does so in one step with no checkpoint inside:
it reads the shard's live entries, puts them on the peer link to the new
owner, and from then on forwards requests for that shard to the new owner
over the same link, so they arrive after the entries. The new owner serves
the shard from the moment the entries arrive. So during a move a read sees
the latest acknowledged write, and no acknowledged write is lost, as long
as both nodes live; a request that crosses the flip on the way is answered
``moved`` and retried (bounded) by the node that sent it.

A shard whose holder has left the cluster (its lease lapsed) is served at
once, empty: without replicas, its entries are gone with it.

:class:`Placement` is the bookkeeping (no I/O); :func:`hand_over` the task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from .codec import Status
from .errors import PeerUnavailable
from .shard import NUM_SHARDS, ShardMap, shard_of

log = logging.getLogger(__name__)

BATCH_BYTES = 256 * 1024  # entries per handoff message, about; one shard may take several
ARRIVAL_TIMEOUT = 60.0  # seconds a new owner waits for a shard's entries before serving it empty
RETRY_DELAY = 0.5  # seconds before a handoff the new owner did not acknowledge is tried again
CLAIM_INTERVAL = 1.0  # seconds between claims while shards are on their way here
ENTRY_OVERHEAD = 24  # wire bytes per entry besides its namespace, key and value, about


class Placement:
    """Which node serves each shard here, while shards move.

    ``owners`` is the serving owner of every shard, which the router routes
    by; ``incoming`` maps the shards this node will serve once their entries
    arrive to the node that holds them (requests for them are forwarded
    there, even those from peers); ``outgoing`` maps the shards this node
    holds and must hand over to their new owner. ``sending`` holds the
    shards handed over and not yet acknowledged.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.target = ShardMap(0, (), ())
        self.members: tuple[str, ...] = ()
        self.owners: list[str] = []
        self.incoming: dict[int, str] = {}
        self.outgoing: dict[int, str] = {}
        self.sending: set[int] = set()
        self._fresh = True  # the next view is taken as a first one
        self.incoming_since = 0.0
        self.moved_in = 0  # shards whose entries arrived
        self.moved_out = 0  # shards handed over and acknowledged
        self.entries_in = 0
        self.entries_out = 0

    def reset(self) -> None:
        """Forget what this node serves (it lost its entries): the next view
        is taken as a first one, its shards to arrive from their holders."""
        self._fresh = True
        self.incoming.clear()
        self.outgoing.clear()
        self.sending.clear()

    def apply(
        self, epoch: int, members: tuple[str, ...], active: tuple[str, ...], now: float, target: ShardMap | None = None
    ) -> ShardMap:
        """Take a new view: ``members`` all of it, ``active`` those not
        leaving (``target``: their placement, if built already). Returns the
        map to route by. Shards this node gains wait for their holders (the
        serving owner so far, or for a first view, the owner without this
        node); shards it loses are to be handed over."""
        me = self.node_id
        if target is None:
            target = self.target.changed(epoch, active) if self.target.members else ShardMap.build(epoch, active)
        self.target, self.members = target, members
        present = set(members)
        want = target.shard_owners
        if not want:  # nobody to serve anything (every member is leaving): keep serving as is
            return self.serving(epoch)
        incoming, outgoing = self.incoming, self.outgoing
        if self._fresh:
            self._fresh = False
            before = target.changed(epoch, [m for m in active if m != me]).shard_owners if me in target.members else want
            self.owners = list(want)
            for shard, owner in enumerate(want):
                if owner == me and before and before[shard] != me:
                    incoming[shard] = self.owners[shard] = before[shard]
        else:
            owners = self.owners
            for shard in range(NUM_SHARDS):
                new, current = want[shard], owners[shard]
                if current == me:
                    if new == me:
                        outgoing.pop(shard, None)
                    else:
                        outgoing[shard] = new
                elif shard in incoming:
                    if new != me:
                        del incoming[shard]
                        owners[shard] = new
                    elif incoming[shard] not in present:  # its holder is gone
                        del incoming[shard]
                        owners[shard] = me
                elif new == me:
                    if current in present:
                        incoming[shard] = current
                    else:
                        owners[shard] = me
                else:
                    owners[shard] = new
        if incoming and not self.incoming_since:
            self.incoming_since = now
        return self.serving(epoch)

    def serving(self, epoch: int | None = None) -> ShardMap:
        """The map the router routes by: the serving owners, over every member.
        It shares ``owners``, so a shard that arrives or is handed over
        changes it in place."""
        return ShardMap(self.target.epoch if epoch is None else epoch, self.members, self.owners)  # type: ignore[arg-type]

    def give_up_waiting(self, now: float) -> list[int]:
        """Serve, empty, the shards that have waited :data:`ARRIVAL_TIMEOUT`
        for their entries; which they were."""
        if not self.incoming or now - self.incoming_since < ARRIVAL_TIMEOUT:
            return []
        late = list(self.incoming)
        for shard in late:
            self.owners[shard] = self.node_id
        self.incoming.clear()
        self.incoming_since = 0.0
        return late

    def accepts(self, shard: int) -> bool:
        """Whether entries handed over for ``shard`` are taken: not if this
        node serves it already (they would overwrite newer writes)."""
        return not self._fresh and self.owners[shard] != self.node_id

    def arrived(self, shards: list[int]) -> list[int]:
        """The entries of ``shards`` have arrived: serve them. Returns those
        this node must pass on at once (its view gives them to another)."""
        me, owners, want = self.node_id, self.owners, self.target.shard_owners
        onward = []
        for shard in shards:
            if not self.accepts(shard):
                continue
            owners[shard] = me
            self.moved_in += 1
            self.incoming.pop(shard, None)
            if want and want[shard] != me:
                self.outgoing[shard] = want[shard]
                onward.append(shard)
        if not self.incoming:
            self.incoming_since = 0.0
        return onward

    def next_batch(self) -> tuple[str, list[int]] | None:
        """A new owner and some of the shards to hand it, or None."""
        for shard, owner in self.outgoing.items():
            if shard not in self.sending:
                return owner, [s for s, o in self.outgoing.items() if o == owner and s not in self.sending]
        return None

    def handed(self, owner: str, shards: list[int]) -> None:
        """``shards`` were put on the link to ``owner``: it serves them now."""
        for shard in shards:
            if self.outgoing.get(shard) == owner:
                del self.outgoing[shard]
            self.owners[shard] = owner
            self.sending.add(shard)

    def acknowledged(self, shards: list[int]) -> list[int]:
        """The new owner took ``shards``; those whose entries may go from here."""
        self.sending.difference_update(shards)
        self.moved_out += len(shards)
        return [s for s in shards if self.owners[s] != self.node_id and s not in self.incoming]

    def refused(self, owner: str, shards: list[int]) -> None:
        """Handing ``shards`` to ``owner`` failed. If it is still a member, hand
        them again (it takes them if it still waits for them); if it left,
        serve them here again, or hand them to their owner now."""
        self.sending.difference_update(shards)
        me, want = self.node_id, self.target.shard_owners
        for shard in shards:
            if self.owners[shard] != owner:
                continue  # a newer view moved it since
            if owner in self.members:
                self.outgoing[shard] = owner
            else:
                self.owners[shard] = me
                if want[shard] != me:
                    self.outgoing[shard] = want[shard]

    def answer_claim(self, claimant: str, shards: list[int]) -> dict[str, Any]:
        """What this node says to ``claimant``, which waits for the entries of
        ``shards`` from it: nothing of the shards it serves or will (they
        come when its view gives them to the claimant), ``absent`` those it
        takes the claimant to serve already (nobody holds them: nodes that
        started together), ``elsewhere`` [shard, node] for those it takes
        another node to serve."""
        if self._fresh:
            return {"absent": [], "elsewhere": []}
        me, owners, incoming, sending = self.node_id, self.owners, self.incoming, self.sending
        absent, elsewhere = [], []
        for shard in shards:
            owner = owners[shard]
            if owner == me or shard in incoming or shard in sending:
                continue
            if owner == claimant:
                absent.append(shard)
            else:
                elsewhere.append([shard, owner])
        return {"absent": absent, "elsewhere": elsewhere}

    def claim_answered(self, source: str, answer: dict[str, Any]) -> None:
        """Take ``source``'s answer to a claim (see :meth:`answer_claim`):
        serve at once, empty, the shards nobody holds; wait for the others
        from the node said to hold them."""
        me, incoming, owners = self.node_id, self.incoming, self.owners
        for shard in answer.get("absent", ()):
            if incoming.get(shard) == source:
                del incoming[shard]
                owners[shard] = me
        for shard, holder in answer.get("elsewhere", ()):
            if incoming.get(shard) == source:
                if holder == me or holder not in self.members:
                    del incoming[shard]
                    owners[shard] = me
                else:
                    incoming[shard] = owners[shard] = holder
        if not incoming:
            self.incoming_since = 0.0

    def claims(self) -> dict[str, list[int]]:
        """The shards this node waits for, by the node it waits on."""
        by_source: dict[str, list[int]] = {}
        for shard, source in self.incoming.items():
            by_source.setdefault(source, []).append(shard)
        return by_source

    def state(self) -> dict[str, int]:
        return {
            "shards_arriving": len(self.incoming),
            "shards_leaving": len(self.outgoing) + len(self.sending),
            "shards_moved_in": self.moved_in,
            "shards_moved_out": self.moved_out,
            "entries_moved_in": self.entries_in,
            "entries_moved_out": self.entries_out,
        }


# -- the wire form ------------------------------------------------------------------------


def absorb(placement: Placement, store: Any, args: dict[str, Any]) -> tuple[int, list[int]]:
    """Take a ``handoff`` message into ``store``: entries of shards this node
    does not serve yet, then serve the shards it says are done. Returns how
    many entries were taken and the shards to pass on (see :meth:`Placement.arrived`)."""
    accepts = placement.accepts
    taken = store.absorb(e for e in args["entries"] if accepts(shard_of(e[0], e[1])))
    placement.entries_in += taken
    return taken, placement.arrived(args["done"])


# -- the tasks ----------------------------------------------------------------------------


async def claim(placement: Placement, peers: Any, wake: Callable[[], trio.Event]) -> None:
    """While shards are on their way to this node, ask each node it waits on
    about them (at once after a view change, then every
    :data:`CLAIM_INTERVAL`): shards nobody holds are served at once rather
    than after :data:`ARRIVAL_TIMEOUT`."""
    while True:
        for source, shards in placement.claims().items():
            try:
                [(status, body)] = await peers.forward(source, [("claim", {"shards": shards})])
            except PeerUnavailable:
                continue  # its lease lapses, or the link comes back: either way, later
            if status == Status.OK and isinstance(body, dict):
                placement.claim_answered(source, body)
        with trio.move_on_after(CLAIM_INTERVAL if placement.incoming else math.inf):
            await wake().wait()


async def hand_over(placement: Placement, store: Any, peers: Any, wake: Callable[[], trio.Event]) -> None:
    """Hand shards to their new owners for as long as the node runs: one
    message in flight at a time, each acknowledged before the next, so a
    large move neither floods the link nor holds more than a message's
    worth of entries twice. ``peers`` is the node's :class:`PeerLinks`;
    ``wake()`` gives the event set when there may be more to hand over."""
    while True:
        batch = placement.next_batch()
        if batch is None:
            await wake().wait()
            continue
        owner, shards = batch
        try:
            if not await peers.linked(owner):  # (a shard is handed over only on a link that is up)
                await trio.sleep(RETRY_DELAY)
                continue
            await _hand(placement, store, peers.submit, owner, shards)
        except Exception:  # a bug: log it, and go on (the node serves on)
            log.exception("handing shards over failed")
            await trio.sleep(RETRY_DELAY)


async def _hand(
    placement: Placement,
    store: Any,
    submit: Callable[[str, list[tuple[str, dict[str, Any]]]], Any],
    owner: str,
    shards: list[int],
) -> None:
    """Hand ``owner`` the first of ``shards`` (see :func:`_messages`), and wait for it to take them."""
    shards = [s for s in shards if placement.outgoing.get(s) == owner and s not in placement.sending]  # (views change)
    if not shards:
        return
    messages, sent, count = _messages(store, shards)
    # From here to handed() with no checkpoint: no write comes between
    # the entries read and the requests forwarded after them.
    pendings = [submit(owner, [("handoff", message)]) for message in messages]
    placement.handed(owner, sent)
    try:
        for pending in pendings:
            [(status, body)] = await pending.wait()
            if status != Status.OK:
                raise PeerUnavailable(f"{owner} refused entries handed to it: {body[1]}")
    except PeerUnavailable as exc:
        log.warning("handing %d shard(s) to %s failed (%s); trying again", len(sent), owner, exc)
        for pending in pendings:
            pending.release()
        placement.refused(owner, sent)
        await trio.sleep(RETRY_DELAY)
        return
    placement.entries_out += count
    for shard in placement.acknowledged(sent):
        store.drop_shard(shard)
    log.debug("handed %d shard(s), %d entries, to %s", len(sent), count, owner)


def _messages(store: Any, shards: list[int]) -> tuple[list[dict[str, Any]], list[int], int]:
    """Handoff messages for as many of ``shards`` as fit in about
    :data:`BATCH_BYTES` (at least one shard, whatever its size: a large
    shard is split over messages, in order); the shards they complete; how
    many entries they carry."""
    messages: list[dict[str, Any]] = []
    entries: list[list[Any]] = []
    done: list[int] = []  # completed by the message being filled
    completed: list[int] = []
    size = count = 0
    for shard in shards:
        if completed and (size >= BATCH_BYTES or messages):
            break
        for ns, key, value, ttl_ms, version in store.shard_entries(shard):
            entries.append([ns, key, value, ttl_ms, version])
            size += len(ns) + len(key) + len(value) + ENTRY_OVERHEAD
            count += 1
            if size >= BATCH_BYTES:
                messages.append({"entries": entries, "done": done})
                entries, done, size = [], [], 0
        done.append(shard)
        completed.append(shard)
    messages.append({"entries": entries, "done": done})
    return messages, completed, count
