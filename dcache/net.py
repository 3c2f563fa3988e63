"""Socket helpers without trio, shared by the blocking client and the trio transport:
address parsing and busy polling.

Importing this module loads no event loop, so one-shot commands stay quick.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

RECEIVE_SIZE = 64 * 1024
DEFAULT_BUSY_POLL_US = 1000.0
MAX_BUSY_POLL_US = 1_000_000


def busy_poll_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """``DCACHE_BUSY_POLL_US`` in seconds; the default if unset or unusable."""
    raw = environ.get("DCACHE_BUSY_POLL_US", "").strip()
    if not raw:
        return DEFAULT_BUSY_POLL_US / 1e6
    try:
        us = float(raw)
    except ValueError:
        us = math.nan
    if not 0 <= us <= MAX_BUSY_POLL_US:
        import logging  # only now: a one-shot command never loads it otherwise

        logging.getLogger(__name__).warning(
            "ignoring DCACHE_BUSY_POLL_US=%r: expected microseconds from 0 to %d", raw, MAX_BUSY_POLL_US
        )
        return DEFAULT_BUSY_POLL_US / 1e6
    return us / 1e6


POLL_BACKOFF_MAX = 64  # after repeated misses, poll on only one wait in this many
# A trio task polls in slices, with a scheduler pass between them: trio
# cannot tell it about tasks that are due to run later in the same pass.
POLL_SLICE = 200e-6
_yield_cpu = getattr(os, "sched_yield", lambda: None)


class BusyPoll:
    """Whether to poll a socket before sleeping on it, and the polling itself.

    On virtual machines waking a sleeping process costs more than a whole
    loopback round trip, so a reader that expects data soon does better to
    spin on its socket for a short ``window``. The spin yields the CPU on
    every turn, so a poller never starves the process it waits for on a
    machine with fewer cores than busy processes, and it stops as soon as
    another socket in ``watch`` (every connection of this trio run) has
    data, so it never keeps a node deaf to its other connections.

    A poll that finds nothing makes the next ``penalty`` waits sleep at
    once, and doubles the penalty; one that finds data resets it. A quiet or
    slow peer therefore costs one wasted window in :data:`POLL_BACKOFF_MAX`
    waits at most.
    """

    __slots__ = ("window", "skip", "penalty")

    def __init__(self, window: float) -> None:
        self.window = window
        self.skip = 0
        self.penalty = 1

    def wanted(self) -> bool:
        if not self.window:
            return False
        if self.skip:
            self.skip -= 1
            return False
        return True

    def spin(self, sock: socket.socket, until: float, watch: Any = None) -> bytes | object | None:
        """Data from ``sock`` before ``until``; :data:`GAVE_WAY` if another
        socket in ``watch`` got data first; None if nothing came. OSError as
        ``recv`` raises it."""
        fd = sock.fileno()
        while True:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                if watch is not None:
                    for ready, _ in watch.poll(0):
                        if ready != fd:
                            return GAVE_WAY
                if time.perf_counter() >= until:
                    return None
                _yield_cpu()
            else:
                self.penalty = 1
                return data

    def missed(self) -> None:
        self.skip = self.penalty
        self.penalty = min(2 * self.penalty, POLL_BACKOFF_MAX)


GAVE_WAY = object()


def connect_error_text(exc: OSError) -> str:
    """Why a connection failed, in the system's words ("Connection refused"),
    whether the error came from the socket module or from trio (which wraps
    one error per address it tried in a group)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None and cause.errno > 0:
            return os.strerror(cause.errno)  # trio puts the address into strerror
        if isinstance(cause, OSError) and cause.strerror:  # name lookups (negative codes)
            return cause.strerror
        cause = cause.exceptions[0] if isinstance(cause, BaseExceptionGroup) else cause.__cause__
    return str(exc)


def split_address(address: str, default_port: int) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port``, or just ``host``) with a clear error."""
    if "://" in address:
        raise ValueError(f"bad address {address!r}: give HOST:PORT, without a scheme")
    host, sep, port = address.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            if sep:
                raise ValueError(f"bad address {address!r}: give HOST:PORT ([ADDRESS]:PORT for IPv6)") from None
        host, port = address, str(default_port)
    host = host.strip("[]") or "localhost"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad address {address!r}: port must be a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"bad address {address!r}: port must be 0-65535")
    return host, number
