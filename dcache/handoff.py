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
once, empty: without replicas, its entries are gone with it. A new owner
asks the node it waits on (a claim) whether it holds the shard: nodes
that started together each take the other for the holder, and the answer
says that nobody holds it, or who does; a node that kept a replica's copy
of it for the claimant (which lost its entries: it restarted) holds it
from then on and hands it over.

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

BATCH_BYTES = 64 * 1024  # entries per handoff message, about (a few ms to read or take in); one shard may take several
# After each batch, rest this many times as long as the batch took, so that a
# move takes at most about half of each node's time from its clients.
REST = 1.0
ARRIVAL_TIMEOUT = 30.0  # seconds without any entries arriving before a new owner serves what it waits for, empty
RETRY_DELAY = 0.5  # seconds before a handoff the new owner did not take is tried again
CLAIM_INTERVAL = 1.0  # seconds between claims while shards are on their way here
ENTRY_OVERHEAD = 24  # wire bytes per entry besides its namespace, key and value, about


class Signal:
    """A wake-up that can be given again and again: :meth:`set` wakes whoever
    waits on the event :meth:`event` gave last (a fresh one once it is set)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    def event(self) -> trio.Event:
        if self._event.is_set():
            self._event = trio.Event()
        return self._event


class Placement:
    """Which node serves each shard here, while shards move.

    ``owners`` is the serving owner of every shard, which the router routes
    by: this node for the shards it holds (and hands over, ``outgoing``, to
    their new owner), the holder for the shards this node waits for
    (``incoming``: requests for them are passed there, even peers'), and the
    target owner for the rest. ``sending`` holds the shards handed over and
    not yet acknowledged (their owner is the new one already).
    """

    def __init__(self, node_id: str, copies: int = 1) -> None:
        self.node_id = node_id
        self.target = ShardMap(0, (), (), copies=copies)
        self.members: tuple[str, ...] = ()
        self.owners: list[str] = []
        self.incoming: dict[int, str] = {}
        self.outgoing: dict[int, str] = {}
        self.sending: set[int] = set()
        self._holders: dict[int, str] = {}  # shards a view moved on while this node waited: who held them
        self._asked: dict[int, set[str]] = {}  # incoming shards: the nodes asked about them, said elsewhere
        self._fresh = True  # the next view is taken as a first one
        self._progress = 0.0  # when entries last arrived, or the wait began
        self.moved_in = 0  # shards whose entries arrived
        self.moved_out = 0  # shards handed over and acknowledged
        self.entries_in = 0
        self.entries_out = 0
        self.entries_dropped = 0  # handed to a node that served the shard already: lost
        # Replicas (see dcache.replication): shards whose copy this node keeps
        # for their owner (or for their holder, while they move here),
        # complete and kept up to date by it; and those whose copy is on its
        # way (not counted). A shard whose holder is gone is served at once
        # from a copy kept for that holder; any other, empty.
        self.copies_kept: dict[int, str] = {}
        self.copies_begun: dict[int, str] = {}
        self.emptied: list[int] = []  # by the last apply: shards served now with nothing from their holder
        self.failed_over = 0  # shards served from a copy here when their owner went

    @property
    def fresh(self) -> bool:
        """No view applied since start or since :meth:`reset`: nothing is known."""
        return self._fresh

    def reset(self) -> None:
        """Forget what this node serves (it lost its entries): the next view
        is taken as a first one, its shards to arrive from their holders."""
        self._fresh = True
        self.incoming.clear()
        self.outgoing.clear()
        self.sending.clear()
        self._holders.clear()
        self._asked.clear()
        self._progress = 0.0
        self.copies_kept.clear()
        self.copies_begun.clear()

    def apply(
        self, epoch: int, members: tuple[str, ...], active: tuple[str, ...], now: float, target: ShardMap | None = None
    ) -> ShardMap:
        """Take a new view: ``members`` all of it, ``active`` those not
        leaving (``target``: their placement, if built already). Returns the
        map to route by. Shards this node gains wait for their holders (the
        serving owner so far, or for a first view, the owner without this
        node); shards it holds and loses are to be handed over."""
        me = self.node_id
        if target is None:
            target = (
                self.target.changed(epoch, active) if self.target.members else ShardMap.build(epoch, active, self.target.copies)
            )
        self.target, self.members = target, members
        self.emptied = []
        present = set(members)
        want = target.shard_owners
        if not want:  # nobody to serve anything (every member is leaving): keep serving as is, hand nothing over
            self.outgoing.clear()
            return self.serving(epoch)
        incoming, outgoing, holders = self.incoming, self.outgoing, self._holders
        added = False
        if self._fresh:
            self._fresh = False
            # Who held each shard before this node came: the owner over every
            # other member, leaving ones too (a leaving node holds its shards).
            others = [m for m in members if m != me]
            before = target.changed(epoch, others).shard_owners if me in target.members and others else ()
            self.owners = list(want)
            for shard, owner in enumerate(want):
                if owner == me and before:
                    incoming[shard] = self.owners[shard] = before[shard]
                    added = True
        else:
            owners = self.owners
            for shard in range(NUM_SHARDS):
                new, current = want[shard], owners[shard]
                if current == me:  # held here
                    if new == me:
                        outgoing.pop(shard, None)
                    else:
                        outgoing[shard] = new
                elif shard in self.sending:
                    if new == me:  # coming back from the node it was handed to
                        incoming[shard] = current
                        added = True
                    else:
                        incoming.pop(shard, None)
                elif shard in incoming:
                    if new != me:
                        holders[shard] = incoming.pop(shard)  # (to answer claims for it)
                        self._asked.pop(shard, None)
                        owners[shard] = new
                    elif incoming[shard] not in present:  # its holder is gone: serve what arrived, or the copy
                        if self.copies_kept.get(shard) == incoming[shard]:
                            self.failed_over += 1
                        del incoming[shard]
                        owners[shard] = me
                elif new == me:
                    if current in present:
                        incoming[shard] = current
                        holders.pop(shard, None)
                        added = True
                    else:  # its owner is gone: serve it now, from the copy kept here if there is one
                        owners[shard] = me
                        if self.copies_kept.get(shard) == current:
                            self.failed_over += 1
                        else:
                            self.emptied.append(shard)
                else:
                    if current != new and current in present:
                        holders[shard] = current  # (it served it: a claim for it is sent there)
                    owners[shard] = new
        if added:  # (a new wait: its holders get their time)
            self._progress = now
        self._check_copies()
        return self.serving(epoch)

    def _check_copies(self) -> None:
        """Forget the copies this node is no longer sent the writes of (the
        purge then drops their entries): their owner is no longer the
        shard's settled owner, nor its holder moving it here, or this node
        no longer one of its replicas. A copy whose owner left while another
        replica took the shard over from its own copy is as good as that
        one: it is kept for the new owner (two crashes in a row with three
        copies lose nothing)."""
        me, want, present = self.node_id, self.target.shard_owners, self.members
        for held in (self.copies_kept, self.copies_begun):
            for shard, owner in list(held.items()):
                if self.keeps_copy(shard, owner) or self.incoming.get(shard) == owner:
                    continue
                new = want[shard] if want else ""
                if (
                    self.target.copies > 2  # (with two, no other replica can have taken it over from a copy)
                    and held is self.copies_kept
                    and owner not in present
                    and new not in (me, "")
                    and self.keeps_copy(shard, new)
                ):
                    held[shard] = new
                else:
                    del held[shard]

    def keeps_copy(self, shard: int, sender: str) -> bool:
        """Whether this node is to keep a copy of ``shard`` for ``sender``:
        the settled owner of the shard, of which this node is a replica."""
        want = self.target.shard_owners
        return (
            not self._fresh
            and bool(want)
            and want[shard] == sender
            and self.owners[shard] == sender
            and self.node_id in self.target.replicas_of(shard)
        )

    def takes_writes(self, shard: int, sender: str) -> bool:
        """Whether this node applies ``sender``'s writes of ``shard`` to the
        copy it keeps: as a replica of the settled owner, or as the new
        owner it is moving to while its copy from that holder stays current."""
        return self.copies_kept.get(shard) == sender and (
            self.keeps_copy(shard, sender) or (not self._fresh and self.incoming.get(shard) == sender)
        )

    def serving(self, epoch: int | None = None) -> ShardMap:
        """The map the router routes by: the serving owners, over every member.
        It shares ``owners``, so a shard that arrives or is handed over
        changes it in place."""
        return ShardMap(self.target.epoch if epoch is None else epoch, self.members, self.owners)  # type: ignore[arg-type]

    def give_up_waiting(self, now: float) -> list[int]:
        """Serve, empty, the shards still awaited when no entries have
        arrived for :data:`ARRIVAL_TIMEOUT` (and no new wait began); which
        they were. (Their holder is silent: its handoff, if it ever comes,
        is refused, and what it holds is dropped.)"""
        if not self.incoming or now - self._progress < ARRIVAL_TIMEOUT:
            return []
        late = list(self.incoming)
        for shard in late:
            self.owners[shard] = self.node_id
            self._unlabel(shard)
        self.incoming.clear()
        self._asked.clear()
        return late

    def _unlabel(self, shard: int) -> None:
        """``shard`` is served here now: what is held of it is no copy kept for another node."""
        self.copies_kept.pop(shard, None)
        self.copies_begun.pop(shard, None)

    def accepts(self, shard: int, sender: str) -> bool:
        """Whether entries ``sender`` hands over for ``shard`` are taken: if
        this node waits for them (from whoever holds them), or its view has
        not caught up and still takes the sender for the shard's server;
        never if it serves the shard already (they would overwrite newer
        writes)."""
        if self._fresh:
            return False
        return shard in self.incoming or self.owners[shard] == sender != self.node_id

    def arrived(self, shards: list[int], epoch: int, now: float) -> list[int]:
        """The entries of ``shards`` (taken: see :meth:`accepts`) have
        arrived, sent from a view at ``epoch``: serve them. Returns those this
        node must pass on at once: its view, as new as the sender's or
        newer, gives them to another. (If the sender's view is newer, this
        node's own is behind: it serves them, and its next view decides.)"""
        me, owners = self.node_id, self.owners
        want = self.target.shard_owners if epoch <= self.target.epoch else ()
        onward = []
        for shard in shards:
            owners[shard] = me
            self.moved_in += 1
            self.incoming.pop(shard, None)
            self.copies_kept.pop(shard, None)
            self._asked.pop(shard, None)
            self._holders.pop(shard, None)
            if want and want[shard] != me:
                self.outgoing[shard] = want[shard]
                onward.append(shard)
        self._progress = now
        return onward

    def next_batch(self, resting: dict[str, float] | None = None) -> tuple[str, list[int]] | None:
        """A new owner and some of the shards to hand it, or None; not one of
        ``resting`` (owners whose links are down), and taking owners in turn."""
        for shard, owner in self.outgoing.items():
            if shard not in self.sending and not (resting and owner in resting):
                shards = [s for s, o in self.outgoing.items() if o == owner and s not in self.sending]
                for s in shards:  # (to the end of the line: the next call starts with another owner's)
                    self.outgoing[s] = self.outgoing.pop(s)
                return owner, shards
        return None

    def handed(self, owner: str, shards: list[int]) -> None:
        """``shards`` were put on the link to ``owner``: it serves them now."""
        for shard in shards:
            if self.outgoing.get(shard) == owner:
                del self.outgoing[shard]
            self.owners[shard] = owner
            self.sending.add(shard)

    def acknowledged(self, shards: list[int]) -> list[int]:
        """The new owner took ``shards``; those whose entries go from here
        (all but those that came back already: those came whole)."""
        self.sending.difference_update(shards)
        self.moved_out += len(shards)
        me, owners, want = self.node_id, self.owners, self.target.shard_owners
        for shard in shards:
            # A view that came meanwhile gave it to a third node: route there (the new owner passes it on).
            if want and owners[shard] != me and shard not in self.incoming and want[shard] != me:
                owners[shard] = want[shard]
        return [s for s in shards if owners[s] != me]

    def refused(self, owner: str, shards: list[int]) -> None:
        """Handing ``shards`` to ``owner`` failed (the link broke, or it was
        not ready for them): serve them here again, from the entries still
        held, and hand them to their owner by the current view later."""
        self.sending.difference_update(shards)
        me, want = self.node_id, self.target.shard_owners
        for shard in shards:
            if self.owners[shard] != owner:
                continue  # (taken by a newer arrival meanwhile)
            self.owners[shard] = me
            self.incoming.pop(shard, None)
            if want and want[shard] != me:
                self.outgoing[shard] = want[shard]

    def answer_claim(self, claimant: str, shards: list[int]) -> dict[str, Any]:
        """What this node says to ``claimant``, which waits for the entries of
        ``shards`` from it: nothing of the shards it holds, hands over or
        waits for (they come in time), nor of those it keeps a copy of for
        the claimant (it hands the copy over); ``elsewhere`` [shard, node] for those
        it knows or takes another node to hold; ``absent`` those nobody else
        can hold (the claimant and this node started together, or it
        received them already)."""
        if self._fresh:
            return {"absent": [], "elsewhere": []}
        me, owners = self.node_id, self.owners
        busy = (self.incoming, self.outgoing, self.sending)
        absent: list[int] = []
        elsewhere: list[list[Any]] = []
        without: tuple[str, ...] | None = None
        for shard in shards:
            if owners[shard] == me or any(shard in b for b in busy):
                continue
            if self.copies_kept.get(shard) == claimant:
                # It owned the shard, and waits for it: it lost its entries
                # (it restarted, or its lease lapsed) before this node saw it
                # go. The copy kept here is the shard: hand it over.
                del self.copies_kept[shard]
                owners[shard] = me
                self.outgoing[shard] = claimant
                continue
            holder = self._holders.get(shard)
            if holder is None or holder == claimant or holder not in self.members:
                # Never held here: the owner were neither of us there, if anyone.
                if without is None:
                    others = [m for m in self.target.members if m not in (me, claimant)]
                    without = self.target.changed(self.target.epoch, others).shard_owners if others else ()
                holder = without[shard] if without else ""
            if holder:
                elsewhere.append([shard, holder])
            else:
                absent.append(shard)
        return {"absent": absent, "elsewhere": elsewhere}

    def claim_answered(self, source: str, answer: Any, claimed: list[int] | None = None, now: float = 0.0) -> bool:
        """Take ``source``'s answer to a claim on ``claimed`` (see
        :meth:`answer_claim`): serve at once, empty, the shards nobody
        holds; wait for the others from the node said to hold them, unless
        it was asked already; and for those it holds, as long as it does
        (an answer is a sign of life: the wait is not given up). Returns
        whether there are nodes to ask now."""
        me, incoming, owners = self.node_id, self.incoming, self.owners
        if not isinstance(answer, dict):
            return False
        absent, elsewhere = answer.get("absent"), answer.get("elsewhere")
        named = len(absent) if isinstance(absent, list) else 0
        named += len(elsewhere) if isinstance(elsewhere, list) else 0
        if claimed is not None and len(claimed) > named:
            self._progress = now
        again = False
        for shard in absent if isinstance(absent, list) else ():
            if type(shard) is int and incoming.get(shard) == source:
                del incoming[shard]
                self._asked.pop(shard, None)
                owners[shard] = me
                self._unlabel(shard)
        for item in elsewhere if isinstance(elsewhere, list) else ():
            if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and isinstance(item[1], str)):
                continue
            shard, holder = item
            if incoming.get(shard) != source:
                continue
            asked = self._asked.setdefault(shard, set())
            asked.add(source)
            if holder == me or holder in asked or holder not in self.members:
                del incoming[shard]  # nobody to ask that was not asked: nobody holds it
                self._asked.pop(shard, None)
                owners[shard] = me
                self._unlabel(shard)
            else:
                incoming[shard] = owners[shard] = holder
                again = True
        return again

    def claims(self) -> dict[str, list[int]]:
        """The shards this node waits for, by the node it waits on; not those
        it handed to that node itself and has no answer about yet (it
        learns their fate from the handoff's answer, and a claim could make
        that node adopt a copy of one while the handoff failed on the way)."""
        by_source: dict[str, list[int]] = {}
        for shard, source in self.incoming.items():
            if shard not in self.sending:
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
            "entries_dropped_in_moves": self.entries_dropped,
        }


def absorb(placement: Placement, store: Any, sender: str, args: dict[str, Any], now: float) -> tuple[dict[str, Any], list[int]]:
    """Take a ``handoff`` message from ``sender`` into ``store``: for each
    shard it begins, what is held here of it goes first (it is stale); then
    its entries and the shards it completes, for the shards this node takes
    (see :meth:`Placement.accepts`). Returns the reply (entries taken, the
    completed shards not taken: ``serving`` those this node serves already,
    ``refused`` the others, to be sent again) and the shards to pass on."""
    accepts = placement.accepts
    entries = args["entries"]
    shards = [shard_of(e[0], e[1]) for e in entries]
    taken_shards = {shard for shard in {*args["begin"], *args["done"], *shards} if accepts(shard, sender)}
    # Shards whose copy here the sender kept current (see Replicator.current_at): no entries come, the copy is the shard.
    kept = args.get("kept", [])
    taken_shards.update(s for s in kept if accepts(s, sender) and placement.copies_kept.get(s) == sender)
    for shard in args["begin"]:
        if shard in taken_shards:
            store.drop_shard(shard)
            placement.copies_kept.pop(shard, None)  # (what the entries replace)
            placement.copies_begun.pop(shard, None)
    taken = store.absorb(e for e, shard in zip(entries, shards) if shard in taken_shards)
    placement.entries_in += taken
    done = [s for s in (*args["done"], *kept) if s in taken_shards]
    refused = [s for s in (*args["done"], *kept) if s not in taken_shards]
    me, owners = placement.node_id, placement.owners
    serving = [] if placement.fresh else [s for s in refused if owners[s] == me]
    reply = {"taken": taken, "serving": serving, "refused": [s for s in refused if s not in serving]}
    return reply, placement.arrived(done, args["epoch"], now) if done else []


# -- the tasks ----------------------------------------------------------------------------


async def claim(placement: Placement, peers: Any, wake: Callable[[], trio.Event]) -> None:
    """While shards are on their way to this node, ask each node it waits on
    about them (at once after a view change or an answer naming another
    node, then every :data:`CLAIM_INTERVAL`): shards nobody holds are
    served at once rather than after :data:`ARRIVAL_TIMEOUT`.

    A claim names the shards still awaited from that node when it is put
    on the link, never earlier: a node keeping a replica's copy of a shard
    for this one hands that copy over when claimed (this node lost its
    entries), so a claim must not reach it after the shard arrived here
    and was copied back to it."""
    while True:
        again = False
        for source in list(placement.claims()):
            shards = placement.claims().get(source)  # (now: see above)
            if not shards or peers.session(source) is None:
                continue  # (a claim queued for a link that reconnects would go out later than it names its shards)
            pending = peers.submit(source, [("claim", {"shards": shards})])
            try:
                [(status, body)] = await pending.wait()
            except PeerUnavailable:
                continue  # its lease lapses, or the link comes back: either way, later
            if status == Status.OK:
                again |= placement.claim_answered(source, body, shards, trio.current_time())
        if not again:
            with trio.move_on_after(CLAIM_INTERVAL if placement.incoming else math.inf):
                await wake().wait()


async def hand_over(placement: Placement, store: Any, peers: Any, wake: Callable[[], trio.Event], copies: Any = None) -> None:
    """Hand shards to their new owners for as long as the node runs: one
    batch (about :data:`BATCH_BYTES`, or one larger shard in parts) in
    flight at a time, acknowledged before the next and followed by a rest
    (:data:`REST`), so a large move neither floods the link, nor holds more
    than a batch's worth of entries twice, nor takes the nodes from their
    clients. ``peers`` is the node's :class:`PeerLinks`; ``wake()`` gives
    the event set when there may be more to hand over. ``copies`` (the
    node's :class:`Replicator`, with replicas) says which new owners keep
    a current copy of a shard already: those get no entries."""
    resting: dict[str, float] = {}  # new owners whose link is down or who were not ready: until when
    while True:
        now = trio.current_time()
        for owner, until in list(resting.items()):
            if until <= now:
                del resting[owner]
        batch = placement.next_batch(resting)
        if batch is None:
            with trio.move_on_after(min(resting.values()) - now if resting else math.inf):
                await wake().wait()
            continue
        owner, shards = batch
        try:
            # A shard is handed over only on a link that is up; one owner out
            # of reach holds up no other.
            if not await peers.linked(owner):
                resting[owner] = trio.current_time() + RETRY_DELAY
                continue
            started = trio.current_time()
            if await _hand(placement, store, peers.submit, owner, shards, copies):
                await trio.sleep((trio.current_time() - started) * REST)
            else:
                resting[owner] = trio.current_time() + RETRY_DELAY
        except Exception:  # a bug: log it, and go on (the node serves on)
            log.exception("handing shards over failed")
            resting[owner] = trio.current_time() + RETRY_DELAY


async def _hand(
    placement: Placement,
    store: Any,
    submit: Callable[[str, list[tuple[str, dict[str, Any]]]], Any],
    owner: str,
    shards: list[int],
    copies: Any = None,
) -> bool:
    """Hand ``owner`` the first of ``shards`` (see :func:`shard_messages`), and
    those whose copy it keeps current (named in ``kept``, with no entries),
    and wait for it to take them; False if it did not take them all (they
    are to be handed again)."""
    shards = [s for s in shards if placement.outgoing.get(s) == owner and s not in placement.sending]  # (views change)
    if not shards:
        return True
    kept = [s for s in shards if copies.current_at(owner, s)] if copies is not None else []
    rest = [s for s in shards if s not in kept] if kept else shards
    messages, sent, count = shard_messages(store, rest, placement.target.epoch) if rest else ([], [], 0)
    if kept:
        if not messages:
            messages = [{"entries": [], "begin": [], "done": [], "epoch": placement.target.epoch}]
        messages[0]["kept"] = kept
        sent = [*sent, *kept]
        count += sum(store.shard_size(s) for s in kept)  # (moved as well: its copy there serves them)
    # From here to handed() with no checkpoint: no write comes between
    # the entries read and the requests forwarded after them.
    pendings = [submit(owner, [("handoff", message)]) for message in messages]
    placement.handed(owner, sent)
    not_taken: list[int] = []
    try:
        for pending in pendings:
            [(status, body)] = await pending.wait()
            if status != Status.OK or not isinstance(body, dict):
                raise PeerUnavailable(f"{owner} did not take entries handed to it: {body!r:.200}")
            not_taken += body.get("refused", [])
            serving = set(body.get("serving", []))
            if serving:
                # It serves them already (it gave up waiting for them): what is here is lost.
                dropped = sum(
                    store.drop_shard(s) for s in serving if placement.owners[s] == owner and not _copy_here(placement, s)
                )
                placement.entries_dropped += dropped
                placement.sending.difference_update(serving)
                log.warning(
                    "%s serves %d shard(s) handed to it already; %d entries held here are dropped", owner, len(serving), dropped
                )
    except BaseException as exc:
        for pending in pendings:
            pending.release()
        placement.refused(owner, [s for s in sent if s in placement.sending])
        if isinstance(exc, PeerUnavailable):
            log.warning("handing %d shard(s) to %s failed (%s); trying again", len(sent), owner, exc)
            return False
        raise
    if not_taken:
        if kept and copies is not None:
            copies.forget(owner, [s for s in not_taken if s in kept])  # (its copy was not current: entries next time)
        placement.refused(owner, not_taken)
        log.info("%s was not ready for %d shard(s); handing them again later", owner, len(not_taken))
    done = [s for s in sent if s in placement.sending]
    placement.entries_out += count
    for shard in placement.acknowledged(done):
        if not _copy_here(placement, shard):
            store.drop_shard(shard)
    log.debug("handed %d shard(s), %d entries, to %s", len(done), count, owner)
    return not not_taken


def _copy_here(placement: Placement, shard: int) -> bool:
    """Whether the new owner of ``shard`` has begun copying it back here
    (this node is its replica, and the copy may reach it before the
    acknowledgement of the handoff does): the entries here are that copy."""
    return shard in placement.copies_kept or shard in placement.copies_begun


def shard_messages(store: Any, shards: list[int], epoch: int) -> tuple[list[dict[str, Any]], list[int], int]:
    """Handoff messages for as many of ``shards`` as fit in about
    :data:`BATCH_BYTES` (at least one shard, whatever its size: a large
    shard is split over messages, in order); the shards they complete; how
    many entries they carry."""
    messages: list[dict[str, Any]] = []
    entries: list[list[Any]] = []
    begin: list[int] = []  # shards whose entries start in the message being filled
    done: list[int] = []  # completed by it
    completed: list[int] = []
    size = count = 0
    for shard in shards:
        if completed and (size >= BATCH_BYTES or messages):
            break
        begin.append(shard)
        for ns, key, value, ttl_ms, version in store.shard_entries(shard):
            entries.append([ns, key, value, ttl_ms, version])
            size += len(ns) + len(key) + len(value) + ENTRY_OVERHEAD
            count += 1
            if size >= BATCH_BYTES:
                messages.append({"entries": entries, "begin": begin, "done": done, "epoch": epoch})
                entries, begin, done, size = [], [], [], 0
        done.append(shard)
        completed.append(shard)
    messages.append({"entries": entries, "begin": begin, "done": done, "epoch": epoch})
    return messages, completed, count
