"""A node's request counters and latency histogram, kept by the router and read
by ``stats`` replies and the Prometheus metrics at scrape time.

Plain integers and a fixed list of buckets: nothing here costs more than an
addition per request. Sans-IO.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Request latency histogram bucket bounds, in seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class Histogram:
    """Bucket counts, not cumulative; exported as a Prometheus histogram."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float, n: int = 1) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += n
        self.total += seconds * n
        self.count += n

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, requests at or under it) per bucket, the last bound infinite."""
        out = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class RequestCounters:
    """What a node's router did: requests by op and result, forwards, retries, latency, refusals."""

    ops: dict[tuple[str, str], int] = field(default_factory=dict)
    forwarded: int = 0
    moved_retries: int = 0
    latency: Histogram = field(default_factory=Histogram)
    refused: dict[str, int] = field(default_factory=dict)  # connections and requests refused, by reason

    def count(self, op: str, result: str, n: int = 1) -> None:
        key = (op, result)
        self.ops[key] = self.ops.get(key, 0) + n

    def refuse(self, reason: str) -> None:
        """Count a refusal: a token (``token_missing``, ``token_wrong``,
        ``peer_token``, …) or a limit (``max_connections``, ``hello_timeout``, …)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
