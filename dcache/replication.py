"""Replicas: copies of each shard on the next nodes in its rendezvous order,
kept up to date by its owner, so that a node's crash loses no entry.

With ``--replicas N`` each shard has an owner and ``N - 1`` replicas: the
members ranked next for it (:meth:`ShardMap.replicas_of`). Only the owner
writes; each write it applies goes, as the entries of the keys it wrote
(value, remaining TTL, version, or gone), to every replica over the peer
link, and with ``--replication sync`` (the default) the client is answered
only once every replica has applied it. A replica refuses what it does not
take itself to be the replica of (views disagree for a moment): the owner
copies the shard and sends the write again, and answers ``unavailable`` if
it is refused still, as it does a write while a replica in the view is
unreachable; an acknowledged write is on every copy the owner's view
knows of. With ``--replication async`` the owner
answers at once and sends on; a crash loses what was still on its way.

A replica first needs the shard's entries: the owner copies a shard to a
replica before the first write that needs it there, and a task copies the
rest in the background, in batches with a rest between them, as handoff
does. A copy and the writes after it go over one link connection in order;
a copy counts only on the connection it went over, so after a reconnect
the shard is copied again. The owner asks each replica which copies it
keeps (``copies``) after each view change and every :data:`AUDIT_INTERVAL`,
and copies again what a replica dropped without its knowing. When the
owner dies, the first replica becomes the owner by the same rendezvous
order and serves the shard at once from its copy (see
:meth:`handoff.Placement.apply`); copies are then made anew to restore
``N``.

While a shard moves (handoff), its holder's writes go only to the node it
moves to, and only if that node keeps the holder's copy (a leaving owner
hands each shard to its first replica); otherwise they are not
replicated, and the new owner copies the shard to its replicas once it
has arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio

from . import codec
from .codec import Status, WireError
from .errors import PeerUnavailable
from .handoff import REST, RETRY_DELAY, Placement, Signal, shard_messages
from .shard import NUM_SHARDS, shard_of

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between looks for copies to make, besides view changes
AUDIT_INTERVAL = 2.0  # seconds between asking each replica which copies it keeps
AUDIT_DELAY = 0.3  # seconds after a view change before asking (so that the change has reached the replicas)
REFUSAL_RETRY_DELAYS = (0.005, 0.05)  # before sending a write a replica refused (with its shard's copy) again
MAX_ASYNC_BACKLOG = 4096  # replications on their way (async) before more are dropped (and copied again later)
SYNC, ASYNC = "sync", "async"


class _Copies:
    """What one replica keeps for this node, as far as this node knows: the
    shards copied over the link connection as it is now (``current``: their
    writes go there), and those it may keep from an earlier connection
    (``maybe``, a superset: a copy that missed a write lost on the way)."""

    __slots__ = ("session", "current", "maybe")

    def __init__(self, session: object) -> None:
        self.session = session
        self.current: set[int] = set()
        self.maybe: set[int] = set()


class Replicator:
    """The owner's side: which of its shards are copied to which replica
    (over which link connection), the write path's sending, the counters.

    ``peers`` is the node's :class:`PeerLinks` (``session``, ``submit``,
    ``submit_raw``, ``forward``, ``crowded``).
    """

    def __init__(self, placement: Placement, store: Any, peers: Any, *, mode: str = SYNC) -> None:
        self.placement = placement
        self.store = store
        self.peers = peers
        self.sync = mode == SYNC
        self._copied: dict[str, _Copies] = {}
        self._moving: dict[int, str] = {}  # shards this node hands over to a node that keeps a copy of them: to whom
        self._audit_at = 0.0  # when to ask the replicas next which copies they keep (see _audit)
        self.audit_due = False  # a view changed since the last audit: copies taken for made may be gone
        self._changes = 0  # views seen (by prune)
        self.wake = Signal()  # there may be copies to make
        self._backlog: trio.MemorySendChannel[tuple[str, list[int], Any]] | None = None
        self.writes = 0  # writes sent to replicas
        self.refused = 0  # writes answered unavailable for want of a replica
        self.shards_copied = 0
        self.entries_copied = 0

    # -- who keeps what --------------------------------------------------------------

    def replicas(self, shard: int) -> tuple[str, ...]:
        """Where this node's writes of ``shard`` go: its replicas if this node
        is its settled owner (it serves it, and no move is under way); while
        it hands the shard to a node that kept a copy of it (its first
        replica, when this node leaves), that node; else nowhere."""
        placement, me = self.placement, self.placement.node_id
        owners, want = placement.owners, placement.target.shard_owners
        if placement.fresh or not want or owners[shard] != me:
            return ()
        if want[shard] == me:
            return placement.target.replicas_of(shard)
        moving = self._moving.get(shard)
        return (moving,) if moving == want[shard] else ()

    def reset(self) -> None:
        """This node lost its entries (its lease lapsed): it keeps no shard's
        replicas up to date until it owns shards again, and copies them anew."""
        self._copied.clear()
        self._moving.clear()

    def kept_by(self, replica: str) -> set[int]:
        """The shards this node takes ``replica`` to keep a copy of, from any link connection."""
        copies = self._copied.get(replica)
        return set() if copies is None else set(copies.maybe)

    def audited(self, replica: str, session: object, sent: set[int], held: Any) -> int:
        """``replica`` said which shards it keeps a copy of for this node
        (``held``), asked over ``session`` when this node took it to keep
        ``sent``: forget those it does not keep (it dropped them since, or
        never took them, and nobody read its refusal); how many."""
        copies = self._copied.get(replica)
        if copies is None or copies.session is not session or not isinstance(held, list):
            return 0
        lost = sent - set(held)
        self.forget(replica, lost)
        if lost:
            self.wake.set()
        return len(lost)

    def copied_to(self, replica: str) -> set[int] | None:
        """The shards copied to ``replica`` over its link as it is now (to
        which its writes go); None if the link is down. Add to it with
        :meth:`_copied_now`."""
        session = self.peers.session(replica)
        if session is None:
            return None
        copies = self._copied.get(replica)
        if copies is None:
            copies = self._copied[replica] = _Copies(session)
        elif copies.session is not session:
            copies.session, copies.current = session, set()
        return copies.current

    def _copied_now(self, replica: str, shards: Iterable[int]) -> None:
        copies = self._copied[replica]
        copies.current.update(shards)
        copies.maybe.update(shards)

    def current_at(self, replica: str, shard: int) -> bool:
        """Whether ``replica``'s copy of ``shard`` has every write this node
        acknowledged, so that a handoff to it may skip the entries (see
        :func:`handoff.shard_messages`): the shard moves to it, its writes
        went there synchronously, over the link connection as it is now."""
        copied = self.copied_to(replica)
        return self.sync and self._moving.get(shard) == replica and copied is not None and shard in copied

    def unsent(self, replica: str, shards: Iterable[int]) -> None:
        """What went to ``replica`` for ``shards`` may not have arrived (the link failed)."""
        copies = self._copied.get(replica)
        if copies is not None:
            copies.current.difference_update(shards)

    def forget(self, replica: str, shards: Iterable[int]) -> None:
        """``replica`` keeps no copy of ``shards`` (it said so): copy them
        again, and a move of one to it is no longer replicated."""
        copies = self._copied.get(replica)
        if copies is not None:
            shards = set(shards)
            copies.current -= shards
            copies.maybe -= shards
            moving = [shard for shard in shards if self._moving.get(shard) == replica]
            for shard in moving:
                del self._moving[shard]
            if moving:
                # Its writes go there no more: have it drop the copy it keeps
                # for this shard's move, which would be served stale if this
                # node went before handing the shard over.
                self._withdraw(replica, moving)

    def _withdraw(self, replica: str, shards: list[int]) -> None:
        """Tell ``replica`` to drop the copies of ``shards`` it keeps for this
        node (a ``replicate`` that begins them and never completes them)."""
        withdraw = {"entries": [], "begin": sorted(shards), "done": [], "epoch": self.placement.target.epoch}
        self._queue_async((replica, [], self.peers.submit(replica, [("replicate", withdraw)])))

    def missing(self) -> dict[str, list[int]]:
        """The copies to make, by replica: shards this node owns whose replica
        lacks them (over a link that is up; the others wait for it)."""
        out: dict[str, list[int]] = {}
        for shard in range(NUM_SHARDS):
            if shard in self._moving:
                continue  # (it goes by handoff)
            for replica in self.replicas(shard):
                copied = self.copied_to(replica)
                if copied is not None and shard not in copied:
                    out.setdefault(replica, []).append(shard)
        return out

    def under_replicated(self) -> int:
        """Shards this node owns with a replica that lacks their entries."""
        count = 0
        for shard in range(NUM_SHARDS):
            if shard in self._moving:
                continue
            for replica in self.replicas(shard):
                copied = self.copied_to(replica)
                if copied is None or shard not in copied:
                    count += 1
                    break
        return count

    def prune(self) -> None:
        """After a view change: note the shards this node now hands over to a
        node that keeps an up-to-date copy of them (their writes keep going
        there until the handoff), and forget copies on nodes that are no
        longer replicas of those shards (should they become so again, their
        copy will have been dropped there)."""
        placement, me = self.placement, self.placement.node_id
        owners, want = placement.owners, placement.target.shard_owners
        moving = self._moving
        for shard, to in list(moving.items()):
            if not want or owners[shard] != me or want[shard] != to:
                del moving[shard]
        if want and not placement.fresh:
            for shard, owner in enumerate(owners):
                new = want[shard]
                if owner == me and new != me and shard not in moving:
                    copies = self._copied.get(new)
                    if copies is not None and shard in copies.maybe:  # (it may keep a copy: keep it current, or refuse)
                        moving[shard] = new
        members = set(placement.members)
        for replica in [r for r in self._copied if r not in members]:
            del self._copied[replica]
        for replica, copies in self._copied.items():
            dropped = [s for s in copies.maybe if replica not in self.replicas(s)]
            if not dropped:
                continue
            copies.current.difference_update(dropped)
            copies.maybe.difference_update(dropped)
            if copies.session is self.peers.session(replica):
                # Tell it to drop them too: should its view skip this change,
                # it would take the copies for current, and serve them if this
                # node died. (A copy begun and not done is not served.)
                self._withdraw(replica, dropped)
        # A replica whose view passed through one this node skipped may have
        # dropped copies this node takes for made: ask soon (once the change
        # has reached it too), and say "replicating" until then.
        self.audit_due = True
        self._changes += 1
        self._audit_at = min(self._audit_at, trio.current_time() + AUDIT_DELAY)
        self.wake.set()

    # -- the write path ---------------------------------------------------------------

    def check(self, ns: str, keys: Iterable[bytes]) -> str | None:
        """Before a write: why it must be refused (synchronous replication,
        and a replica of one of its keys is unreachable), or None."""
        if not self.sync:
            return None
        for key in keys:
            shard = shard_of(ns, key)
            for replica in self.replicas(shard):
                copied = self.copied_to(replica)
                if copied is None:
                    self.refused += 1
                    return f"{replica}, which keeps a copy of this key, is unreachable; try again"
                if shard in self._moving and shard not in copied:  # (its copy there may lack a write lost on the way)
                    self.refused += 1
                    return f"this key's shard is moving to {replica}, and the link to it was broken; try again"
        return None

    def send(self, ns: str, keys: list[bytes]) -> Replicated | None:
        """After a write of ``keys``: send their entries as they are now to
        the replicas of their shards (a shard not yet copied to one goes
        whole first). Returns what to await before answering (synchronous
        replication), or None if there is nothing to wait for."""
        store, epoch = self.store, self.placement.target.epoch
        plans: dict[str, tuple[list[int], list[list[Any]]]] = {}
        for key in keys:
            shard = shard_of(ns, key)
            replicas = self.replicas(shard)
            if not replicas:
                continue
            entry = store.entry(ns, key)
            item = [ns, key, None, 0, 0] if entry is None else [ns, key, *entry]
            for replica in replicas:
                copied = self.copied_to(replica)
                if copied is None:  # (async: skipped; it gets a copy once its link is back)
                    continue
                plan = plans.get(replica)
                if plan is None:
                    plan = plans[replica] = ([], [])
                if shard not in copied and shard not in plan[0]:
                    plan[0].append(shard)
                plan[1].append(item)
        if not plans:
            return None
        self.writes += 1
        sent: list[tuple[str, list[int], Any]] = []
        for replica, (to_copy, items) in plans.items():
            copied = self.copied_to(replica)
            assert copied is not None
            shards = sorted({shard_of(item[0], item[1]) for item in items})
            if not self.sync and self.peers.crowded([replica]) is not None:
                self.forget(replica, shards)  # too much on its way: copy these again later
                continue
            write = {"entries": items, "begin": [], "done": [], "epoch": epoch}
            if to_copy:
                messages = self._copy_messages(to_copy, epoch)
                self._copied_now(replica, to_copy)
                messages.append(write)
                pending = self.peers.submit(replica, [("replicate", m) for m in messages])
            else:  # (the usual case: sent encoded, so that its reply can be read with no task waiting; see notify)
                pending = self.peers.submit_raw(replica, codec.request_rest("replicate", write))
            sent.append((replica, shards, pending))
        if self.sync:
            return Replicated(self, sent, ns, keys)
        for replication in sent:
            self._queue_async(replication)
        return None

    def _copy_messages(self, shards: list[int], epoch: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        while shards:
            batch, completed, count = shard_messages(self.store, shards, epoch)
            messages += batch
            self.shards_copied += len(completed)
            self.entries_copied += count
            shards = shards[len(completed) :]
        return messages

    def _queue_async(self, item: tuple[str, list[int], Any]) -> None:
        try:
            assert self._backlog is not None
            self._backlog.send_nowait(item)
        except (trio.WouldBlock, AssertionError):
            item[2].release()
            self.forget(item[0], item[1])  # (not known to have arrived: copy again)

    # -- tasks -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Make missing copies for as long as the node runs (and, with
        asynchronous replication, see its writes answered)."""
        send, receive = trio.open_memory_channel[tuple[str, list[int], Any]](MAX_ASYNC_BACKLOG)
        self._backlog = send
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._collect, receive)
            task_status.started()
            await self._copy_missing()

    async def _collect(self, backlog: trio.MemoryReceiveChannel[tuple[str, list[int], Any]]) -> None:
        async for replica, shards, pending in backlog:
            try:
                await _answered(self, replica, shards, pending)
            except Exception:  # a bug: log it, and go on (the node serves on)
                log.exception("reading a replica's answer failed")
                self.forget(replica, shards)

    async def _copy_missing(self) -> None:
        """Copy shards to the replicas that lack them: a batch (about
        :data:`handoff.BATCH_BYTES`) at a time, acknowledged before the
        next and followed by a rest as long as it took. Every
        :data:`AUDIT_INTERVAL`, ask each replica which copies it keeps."""
        self._audit_at = trio.current_time() + AUDIT_INTERVAL
        while True:
            try:
                if trio.current_time() >= self._audit_at:
                    self._audit_at = trio.current_time() + AUDIT_INTERVAL
                    changes = self._changes
                    if await self._audit() and changes == self._changes:
                        self.audit_due = False  # (every replica answered, and no view came meanwhile)
                await self._copy_some()
            except Exception:  # a bug: log it, and go on (the node serves on)
                log.exception("making copies for replicas failed")
                await trio.sleep(RETRY_DELAY)

    async def _audit(self) -> bool:
        """Ask every replica which shards it keeps a copy of for this node,
        and forget the others (see :meth:`audited`); whether all answered."""
        answered = True
        for replica in list(self._copied):
            session = self.peers.session(replica)
            if session is None:
                answered = False
                continue
            sent = self.kept_by(replica)
            try:
                [(status, body)] = await self.peers.forward(replica, [("copies", {})])
            except PeerUnavailable:
                answered = False
                continue
            if status == Status.OK and isinstance(body, dict):
                lost = self.audited(replica, session, sent, body.get("held"))
                if lost:  # (usual around a view change: it dropped copies this node now forgets too)
                    log.info("%s lacks %d shard copies this node had sent it; copying them again", replica, lost)
            else:
                answered = False
        return answered

    async def _copy_some(self) -> None:
        """One round: the copies missing now, replica by replica, batch by batch."""
        work = self.missing()
        if not work:
            with trio.move_on_after(max(0.0, min(CHECK_INTERVAL, self._audit_at - trio.current_time()))):
                await self.wake.event().wait()
            return
        for replica, shards in work.items():
            while shards:
                copied = self.copied_to(replica)
                if copied is None:
                    break
                shards = [s for s in shards if s not in copied and replica in self.replicas(s)]
                if not shards:
                    break
                started = trio.current_time()
                messages, completed, count = shard_messages(self.store, shards, self.placement.target.epoch)
                self._copied_now(replica, completed)
                pending = self.peers.submit(replica, [("replicate", m) for m in messages])
                shards = shards[len(completed) :]
                self.shards_copied += len(completed)
                self.entries_copied += count
                if (await _answered(self, replica, completed, pending))[0] is not None:
                    await trio.sleep(RETRY_DELAY)
                    break
                await trio.sleep((trio.current_time() - started) * REST)


class Replicated:
    """A write's replications on their way: :meth:`wait` returns None once
    every replica applied it, else why not (it is then to be answered
    ``unavailable``)."""

    __slots__ = ("_replicator", "_sent", "_ns", "_keys")

    def __init__(self, replicator: Replicator, sent: list[tuple[str, list[int], Any]], ns: str, keys: list[bytes]) -> None:
        self._replicator = replicator
        self._sent = sent
        self._ns = ns
        self._keys = keys

    def replicas(self) -> list[str]:
        return [replica for replica, _, _ in self._sent]

    def notify(self, callback: Callable[[bool], None]) -> Any | None:
        """For a write sent to one replica as a lone encoded request (the
        usual case with ``--replicas 2``): have ``callback(True)`` called as
        soon as the replica's confirmation is read, with no task waiting,
        or ``callback(False)`` if it did not confirm (then :meth:`wait`
        says why); return what will read it (the peer link's channel, see
        :meth:`peers.Forward.notify`). None, and no call, if this cannot
        be done: :meth:`wait` as usual."""
        if len(self._sent) != 1:
            return None
        _, _, pending = self._sent[0]

        def read(rest: bytes | None) -> None:
            callback(rest is not None and _confirmed(rest))

        return pending.notify(read)

    async def wait(self) -> str | None:
        """None once every replica has applied the write. A replica that
        refused it (it did not keep the shard's copy: its view and this
        node's disagreed for a moment) is sent the shard's copy and the
        write's entries again, after :data:`REFUSAL_RETRY_DELAYS`."""
        replicator = self._replicator
        problem, refused = await self._answers()
        for delay in REFUSAL_RETRY_DELAYS:
            if problem is None or not refused:
                break
            await trio.sleep(delay)
            unreachable = replicator.check(self._ns, self._keys)  # (counts its refusal)
            if unreachable is not None:
                return unreachable
            again = replicator.send(self._ns, self._keys)
            if again is None:  # (no replica to send it to now, as when this node lapsed: not acknowledged)
                break
            problem, refused = await again._answers()
        if problem is not None:
            replicator.refused += 1
        return problem

    async def _answers(self) -> tuple[str | None, bool]:
        """Why not every replica applied the write, if so, and whether only for refusals."""
        problems: list[str] = []
        refusals = True
        try:
            for replica, shards, pending in self._sent:
                problem, refused = await _answered(self._replicator, replica, shards, pending)
                if problem is not None:
                    problems.append(problem)
                    refusals = refusals and refused
        finally:
            self.release()
        return (problems[0] if problems else None), refusals

    def release(self) -> None:
        for _, _, pending in self._sent:
            pending.release()


def _confirmed(rest: bytes) -> bool:
    """Whether a replica's encoded reply to a write says it applied all of it."""
    if rest[0] != Status.OK:
        return False
    try:
        _, body = codec.decode_rest(rest)
    except WireError:
        return False
    return isinstance(body, dict) and not body.get("refused")


async def _answered(replicator: Replicator, replica: str, shards: list[int], pending: Any) -> tuple[str | None, bool]:
    """Wait for ``replica``'s answers to what was sent to it for ``shards``:
    None if it applied all of it; else why not (what it did not take is to
    be copied again), and whether it refused (rather than not answering)."""
    try:
        replies = await pending.wait()
    except PeerUnavailable as exc:
        replicator.unsent(replica, shards)
        return f"{replica}, which keeps a copy of this key, did not confirm the write: {exc}; try again", False
    if isinstance(replies, bytes):  # one request sent encoded: its reply likewise
        try:
            replies = [codec.decode_rest(replies)]
        except WireError:
            replies = [(Status.ERROR, None)]
    refused: set[int] = set()
    for status, body in replies:
        if status != Status.OK or not isinstance(body, dict):
            refused.update(shards)
        else:
            refused.update(s for s in body.get("refused", ()) if type(s) is int)
    if refused:
        replicator.forget(replica, refused)
        return f"{replica} does not keep a copy of this key yet (the cluster's membership is changing); try again", True
    return None, False


def take(placement: Placement, store: Any, sender: str, args: dict[str, Any]) -> dict[str, Any]:
    """Take a ``replicate`` message from ``sender`` into ``store``: the
    shards it begins (a copy: what is held here of them goes first), their
    entries, and the writes of shards whose copy this node keeps for
    ``sender`` (see :meth:`Placement.keeps_copy` and
    :meth:`Placement.takes_writes`). Entries of other shards are refused,
    and named in the reply: the sender copies them again once views agree."""
    copies, begun = placement.copies_kept, placement.copies_begun
    refused: set[int] = set()
    for shard in args["begin"]:
        if placement.keeps_copy(shard, sender):
            store.drop_shard(shard)
            copies.pop(shard, None)
            begun[shard] = sender
        elif copies.get(shard) == sender and placement.incoming.get(shard) == sender:
            # The shard moves here from the sender, which stopped keeping this
            # copy current: it is no copy to serve should the sender go.
            store.drop_shard(shard)
            del copies[shard]
            refused.add(shard)
        else:
            refused.add(shard)
    taken = []
    gone = []
    for item in args["entries"]:
        ns, key, value = item[0], item[1], item[2]
        shard = shard_of(ns, key)
        if shard in refused:
            continue
        if not (placement.takes_writes(shard, sender) or (begun.get(shard) == sender and placement.keeps_copy(shard, sender))):
            refused.add(shard)
            continue
        if value is None:
            gone.append((ns, key))
        else:
            taken.append(item)
    store.absorb(taken)
    for ns, key in gone:
        store.discard(ns, key)
    for shard in args["done"]:
        if begun.get(shard) == sender and shard not in refused:
            del begun[shard]
            copies[shard] = sender
    return {"refused": sorted(refused)}


def held_for(placement: Placement, sender: str) -> dict[str, Any]:
    """The answer to ``sender``'s ``copies``: the shards whose copy this node keeps for it."""
    return {"held": [shard for shard, owner in placement.copies_kept.items() if owner == sender]}


def replica_summary(placement: Placement, replicator: Replicator | None) -> dict[str, int]:
    """A node's replica counters, for ``stats`` and metrics."""
    if replicator is None:
        return {"replicas": placement.target.copies}
    return {
        "replicas": placement.target.copies,
        "shards_under_replicated": replicator.under_replicated(),
        "shard_copies_held": len(placement.copies_kept),
        "shards_failed_over": placement.failed_over,
        "replicated_writes": replicator.writes,
        "writes_refused_for_replicas": replicator.refused,
        "shards_copied_to_replicas": replicator.shards_copied,
    }
