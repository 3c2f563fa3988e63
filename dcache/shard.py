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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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


@dataclass(frozen=True, slots=True)
class ShardMap:
    """Who owns what at one membership epoch (the etcd revision, or 0 standalone)."""

    epoch: int
    members: tuple[str, ...]
    shard_owners: tuple[str, ...] = field(repr=False)
    weights: tuple[bytes, ...] = field(default=(), repr=False, compare=False)  # each owner's, for changed()

    @classmethod
    def build(cls, epoch: int, members: Iterable[str]) -> ShardMap:
        ordered = tuple(sorted(set(members)))
        if not ordered:
            return cls(epoch, (), ())
        owners, weights = _place(ordered)
        return cls(epoch, ordered, tuple(owners), tuple(weights))

    def changed(self, epoch: int, members: Iterable[str]) -> ShardMap:
        """The map for ``members`` at ``epoch``, the same as :meth:`build`
        gives, from this one: a member that joined is weighed once per
        shard against the owner, and only the shards of a member that left
        are ranked again, over every member. A change costs 8192 weights per
        member that joined or left, where a build costs 8192 per member;
        the cheaper of the two is done."""
        ordered = tuple(sorted(set(members)))
        if ordered == self.members:
            return ShardMap(epoch, self.members, self.shard_owners, self.weights)
        joined = sorted(set(ordered) - set(self.members))
        left = set(self.members) - set(ordered)
        if not self.weights or not ordered or len(joined) + len(left) >= len(ordered):
            return ShardMap.build(epoch, ordered)
        owners, best = list(self.shard_owners), list(self.weights)
        if left:
            orphans = [shard for shard, owner in enumerate(owners) if owner in left]
            weighers = [(member, _weigher(member).copy) for member in ordered]
            for shard in orphans:
                shard_bytes = _SHARD_BYTES[shard]
                top, owner = b"", ""
                for member, copy in weighers:
                    h = copy()
                    h.update(shard_bytes)
                    weight = h.digest()
                    if weight > top or (weight == top and member > owner):
                        top, owner = weight, member
                owners[shard], best[shard] = owner, top
        for member in joined:  # (shards ranked again above weighed it already: no change there)
            _join(owners, best, member, _weights(member))
        return ShardMap(epoch, ordered, tuple(owners), tuple(best))

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
