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


def _join_top(tops: list[list[tuple[bytes, str]]], member: str, weights: list[bytes], copies: int) -> None:
    """Rank ``member`` into every shard's top ``copies`` (highest weight first;
    ties: the greater id). A top it enters is replaced, not changed: other
    maps may share it."""
    for shard, weight in enumerate(weights):
        top = tops[shard]
        item = (weight, member)
        if len(top) < copies or item > top[-1]:
            top = tops[shard] = list(top)
            i = len(top)
            while i and item > top[i - 1]:
                i -= 1
            top.insert(i, item)
            if len(top) > copies:
                top.pop()


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
    are not that many members.
    """

    epoch: int
    members: tuple[str, ...]
    shard_owners: tuple[str, ...] = field(repr=False)
    weights: tuple[bytes, ...] = field(default=(), repr=False, compare=False)  # each owner's, for changed()
    copies: int = 1
    backups: tuple[tuple[str, ...], ...] = field(default=(), repr=False)  # with copies > 1: each shard's replicas, ranked
    tops: tuple[list[tuple[bytes, str]], ...] = field(default=(), repr=False, compare=False)  # ranks and weights

    @classmethod
    def build(cls, epoch: int, members: Iterable[str], copies: int = 1) -> ShardMap:
        ordered = tuple(sorted(set(members)))
        if not ordered:
            return cls(epoch, (), (), copies=copies)
        if copies > 1:
            tops: list[list[tuple[bytes, str]]] = [[] for _ in range(NUM_SHARDS)]
            for member in ordered:
                _join_top(tops, member, _weights(member), copies)
            return cls._ranked(epoch, ordered, tops, copies)
        owners, weights = _place(ordered)
        return cls(epoch, ordered, tuple(owners), tuple(weights))

    @classmethod
    def _ranked(cls, epoch: int, ordered: tuple[str, ...], tops: list[list[tuple[bytes, str]]], copies: int) -> ShardMap:
        return cls(
            epoch,
            ordered,
            tuple(top[0][1] for top in tops),
            tuple(top[0][0] for top in tops),
            copies,
            tuple([tuple([member for _, member in top[1:]]) for top in tops]),
            tuple(tops),  # (lists, never changed: changed() copies those it changes)
        )

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
            return ShardMap(epoch, self.members, self.shard_owners, self.weights, copies, self.backups, self.tops)
        joined = sorted(set(ordered) - set(self.members))
        left = set(self.members) - set(ordered)
        if not self.weights or not ordered or len(joined) + len(left) >= len(ordered):
            return ShardMap.build(epoch, ordered, copies)
        weighers = [(member, _weigher(member).copy) for member in ordered if member not in joined] if left else []
        if copies > 1:
            tops = list(self.tops)
            if left:
                for shard, top in enumerate(tops):
                    for _, member in top:
                        if member in left:
                            tops[shard] = _top(shard, weighers, copies)
                            break
            for member in joined:
                _join_top(tops, member, _weights(member), copies)
            return ShardMap._ranked(epoch, ordered, tops, copies)
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
        return self.backups[shard] if self.backups else ()

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
