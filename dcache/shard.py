"""Key → shard → node placement. Pure functions, the same in every process.

A key's shard is the CRC-32 of (namespace, key) modulo :data:`NUM_SHARDS`.
A shard's owner is chosen by rendezvous (highest random weight) hashing over
the member ids, so a membership change moves only the shards of the nodes
that joined or left. Never Python's ``hash()``: it differs per process.
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


def _weight(member: bytes, shard: int) -> bytes:
    return hashlib.blake2b(shard.to_bytes(4, "big"), digest_size=8, key=member[:64]).digest()


def rank(shard: int, members: Iterable[str]) -> list[str]:
    """Members ordered by preference for ``shard``: owner first, then replicas."""
    return sorted(members, key=lambda m: (_weight(m.encode(), shard), m), reverse=True)


def owners(members: Sequence[str]) -> tuple[str, ...]:
    """The owner of every shard, indexed by shard number."""
    if not members:
        return ()
    encoded = [(m.encode(), m) for m in sorted(set(members))]
    result = []
    for shard in range(NUM_SHARDS):
        result.append(max(encoded, key=lambda e: (_weight(e[0], shard), e[1]))[1])
    return tuple(result)


@dataclass(frozen=True, slots=True)
class ShardMap:
    """Who owns what at one membership epoch (the etcd revision, or 0 standalone)."""

    epoch: int
    members: tuple[str, ...]
    shard_owners: tuple[str, ...] = field(repr=False)

    @classmethod
    def build(cls, epoch: int, members: Iterable[str]) -> ShardMap:
        ordered = tuple(sorted(set(members)))
        return cls(epoch, ordered, owners(ordered))

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
