"""Key → shard → node placement. Pure functions, the same in every process.

A key's shard is the CRC-32 of (namespace, key) modulo :data:`NUM_SHARDS`.
A shard's owner is chosen by rendezvous (highest random weight) hashing over
the member ids, so a membership change moves only the shards of the nodes
that joined or left. Never Python's ``hash()``: it differs per process.

Placing every shard weighs every member for it: 8192 weights per member.
A membership change therefore costs a node only the weights of what
changed (:meth:`ShardMap.changed`): a member that joins is weighed once
per shard against the owner, and only the shards of a member that left are
ranked again. A full placement is left for a node's first view.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

NUM_SHARDS = 8192


def key_hash(ns: str, key: bytes) -> int:
    """A 32-bit hash of a namespaced key, stable across processes and versions.

    CRC-32, as Redis Cluster uses CRC-16: it spreads keys evenly over shards
    and costs a tenth of a cryptographic hash on the per-request path.
    """
    return zlib.crc32(ns.encode() + b"\0" + key if ns else key)


def shard_of(ns: str, key: bytes) -> int:
    return key_hash(ns, key) % NUM_SHARDS


_SHARD_BYTES = tuple(shard.to_bytes(4, "big") for shard in range(NUM_SHARDS))


def _weigher(member: str) -> hashlib.blake2b:
    """A keyed BLAKE2b state for ``member``: a shard's weight is a copy of it
    fed the shard number. The same digests as hashing with the key each
    time, at less than half the cost: the key's block is compressed once."""
    return hashlib.blake2b(digest_size=8, key=member.encode()[:64])


def _weights(member: str) -> list[bytes]:
    """``member``'s weight for every shard, by shard number."""
    copy = _weigher(member).copy
    out = []
    for shard_bytes in _SHARD_BYTES:
        h = copy()
        h.update(shard_bytes)
        out.append(h.digest())
    return out


def _weight(member: str, shard: int) -> bytes:
    h = _weigher(member)
    h.update(_SHARD_BYTES[shard])
    return h.digest()


def rank(shard: int, members: Iterable[str]) -> list[str]:
    """Members ordered by preference for ``shard``: owner first, then replicas."""
    return sorted(members, key=lambda m: (_weight(m, shard), m), reverse=True)


def _place(members: Sequence[str]) -> tuple[list[str], list[bytes]]:
    """The owner of every shard and its weight, by shard number, over ``members`` (distinct)."""
    owners: list[str] = [""] * NUM_SHARDS
    best: list[bytes] = [b""] * NUM_SHARDS
    for member in members:
        _join(owners, best, member, _weights(member))
    return owners, best


def _join(owners: list[str], best: list[bytes], member: str, weights: list[bytes]) -> None:
    """Make ``member`` the owner of the shards it outweighs the owner for (ties: the greater id)."""
    for shard, weight in enumerate(weights):
        top = best[shard]
        if weight > top or (weight == top and member > owners[shard]):
            best[shard] = weight
            owners[shard] = member


def owners(members: Sequence[str]) -> tuple[str, ...]:
    """The owner of every shard, indexed by shard number."""
    if not members:
        return ()
    return tuple(_place(sorted(set(members)))[0])


def _join_ranks(ranked: list[str], weights: list[bytes], member: str, member_weights: list[bytes], copies: int) -> None:
    """Rank ``member`` into every shard's top ``copies`` (highest weight first;
    ties: the greater id). ``ranked`` and ``weights`` hold ``copies`` slots
    per shard, in order, an empty slot being ""."""
    for shard, weight in enumerate(member_weights):
        base = shard * copies
        last = base + copies - 1
        held = ranked[last]
        if held and (weight < weights[last] or (weight == weights[last] and member < held)):
            continue  # (not above the last: the usual case, one test)
        i = last
        while i > base and (
            not ranked[i - 1] or weight > weights[i - 1] or (weight == weights[i - 1] and member > ranked[i - 1])
        ):
            i -= 1
        ranked[i + 1 : last + 1] = ranked[i:last]
        weights[i + 1 : last + 1] = weights[i:last]
        ranked[i], weights[i] = member, weight


def _top(shard: int, weighers: list[tuple[str, Callable[[], Any]]], copies: int) -> list[tuple[bytes, str]]:
    """``shard``'s top ``copies`` members of ``weighers``, ranked."""
    shard_bytes = _SHARD_BYTES[shard]
    items = []
    for member, copy in weighers:
        h = copy()
        h.update(shard_bytes)
        items.append((h.digest(), member))
    items.sort(reverse=True)
    return items[:copies]


@dataclass(frozen=True, slots=True)
class ShardMap:
    """Who owns what at one membership epoch (the etcd revision, or 0 standalone).

    With ``copies`` above one, each shard also has ``copies - 1`` replicas:
    the members ranked next for it (:meth:`replicas_of`), fewer when there
    are not that many members. The ranks are kept flat (``copies`` slots
    per shard in one tuple of ids, one of weights): a view change makes two
    objects, not one per shard, so it gives the garbage collector nothing
    to walk (a list per shard cost a node 30-70 ms of collection per change
    at 300 members).
    """

    epoch: int
    members: tuple[str, ...]
    shard_owners: tuple[str, ...] = field(repr=False)
    weights: tuple[bytes, ...] = field(default=(), repr=False, compare=False)  # each owner's, for changed()
    copies: int = 1
    ranked: tuple[str, ...] = field(default=(), repr=False)  # with copies > 1: each shard's top members, "" for none
    ranked_weights: tuple[bytes, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def build(cls, epoch: int, members: Iterable[str], copies: int = 1) -> ShardMap:
        ordered = tuple(sorted(set(members)))
        if not ordered:
            return cls(epoch, (), (), copies=copies)
        if copies > 1:
            ranked, weights = [""] * (NUM_SHARDS * copies), [b""] * (NUM_SHARDS * copies)
            for member in ordered:
                _join_ranks(ranked, weights, member, _weights(member), copies)
            return cls._ranked(epoch, ordered, ranked, weights, copies)
        owners, weights = _place(ordered)
        return cls(epoch, ordered, tuple(owners), tuple(weights))

    @classmethod
    def _ranked(cls, epoch: int, ordered: tuple[str, ...], ranked: list[str], weights: list[bytes], copies: int) -> ShardMap:
        return cls(epoch, ordered, tuple(ranked[::copies]), tuple(weights[::copies]), copies, tuple(ranked), tuple(weights))

    def changed(self, epoch: int, members: Iterable[str]) -> ShardMap:
        """The map for ``members`` at ``epoch``, the same as :meth:`build`
        gives, from this one: a member that joined is weighed once per
        shard against the owner (and replicas), and only the shards of a
        member that left are ranked again, over every member. A change costs
        8192 weights per member that joined or left (times the copies, for
        one that left), where a build costs 8192 per member; the cheaper of
        the two is done."""
        ordered = tuple(sorted(set(members)))
        copies = self.copies
        if ordered == self.members:
            return ShardMap(epoch, self.members, self.shard_owners, self.weights, copies, self.ranked, self.ranked_weights)
        joined = sorted(set(ordered) - set(self.members))
        left = set(self.members) - set(ordered)
        if not self.weights or not ordered or len(joined) + len(left) >= len(ordered):
            return ShardMap.build(epoch, ordered, copies)
        weighers = [(member, _weigher(member).copy) for member in ordered if member not in joined] if left else []
        if copies > 1:
            ranked, weights = list(self.ranked), list(self.ranked_weights)
            if left:
                for shard in sorted({i // copies for i, member in enumerate(ranked) if member in left}):
                    base = shard * copies
                    top = _top(shard, weighers, copies)
                    top += [(b"", "")] * (copies - len(top))
                    weights[base : base + copies] = [w for w, _ in top]
                    ranked[base : base + copies] = [m for _, m in top]
            for member in joined:
                _join_ranks(ranked, weights, member, _weights(member), copies)
            return ShardMap._ranked(epoch, ordered, ranked, weights, copies)
        owners, best = list(self.shard_owners), list(self.weights)
        if left:
            for shard, owner in enumerate(owners):
                if owner in left:
                    [(best[shard], owners[shard])] = _top(shard, weighers, 1)
        for member in joined:
            _join(owners, best, member, _weights(member))
        return ShardMap(epoch, ordered, tuple(owners), tuple(best))

    def replicas_of(self, shard: int) -> tuple[str, ...]:
        """The members that keep copies of ``shard`` besides its owner, ranked."""
        if not self.ranked:
            return ()
        base = shard * self.copies
        replicas = self.ranked[base + 1 : base + self.copies]
        return replicas if replicas[-1] else tuple(m for m in replicas if m)

    def owner(self, ns: str, key: bytes) -> str:
        return self.shard_owners[key_hash(ns, key) % NUM_SHARDS]  # (shard_of, without a call)

    def owner_of_shard(self, shard: int) -> str:
        return self.shard_owners[shard]

    def shards_owned(self, member: str) -> int:
        return sum(1 for owner in self.shard_owners if owner == member)

    def group_by_owner(self, ns: str, keys: Iterable[bytes]) -> dict[str, list[int]]:
        """Positions of ``keys`` grouped by the member that owns each."""
        groups: dict[str, list[int]] = {}
        owners = self.shard_owners
        for i, key in enumerate(keys):
            groups.setdefault(owners[shard_of(ns, key)], []).append(i)
        return groups
