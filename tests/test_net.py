"""Address parsing and busy polling, without trio."""

from __future__ import annotations

import socket
import time

import pytest

from dcache import net


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(None, 0.001), ("", 0.001), ("250", 0.00025), (" 0 ", 0.0), ("fast", 0.001), ("-5", 0.001), ("nan", 0.001), ("1e9", 0.001)],
)
def test_busy_poll_setting_from_the_environment(raw: str | None, seconds: float) -> None:
    environ = {} if raw is None else {"DCACHE_BUSY_POLL_US": raw}
    assert net.busy_poll_from_env(environ) == pytest.approx(seconds)


def test_misses_back_off_and_a_hit_resets() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        poller = net.BusyPoll(0.001)
        penalties = []
        for _ in range(10):
            while not poller.wanted():
                pass
            assert poller.spin(a, time.perf_counter() + poller.window) is None
            poller.missed()
            penalties.append(poller.penalty)
        assert penalties == [2, 4, 8, 16, 32, 64, 64, 64, 64, 64]
        assert poller.skip == net.POLL_BACKOFF_MAX
        skipped = 0
        while not poller.wanted():
            skipped += 1
        assert skipped == net.POLL_BACKOFF_MAX
        b.send(b"data")
        assert poller.spin(a, time.perf_counter() + poller.window) == b"data"
        assert poller.penalty == 1 and poller.skip == 0


def test_addresses_parse_or_say_what_is_wrong() -> None:
    assert net.split_address("localhost:48000", 1) == ("localhost", 48000)
    assert net.split_address("localhost", 1) == ("localhost", 1)
    assert net.split_address("[::1]:48000", 1) == ("::1", 48000)
    assert net.split_address("::1", 1) == ("::1", 1)
    assert net.split_address(":48000", 1) == ("localhost", 48000)
    for bad, why in [
        ("http://localhost:48000", "without a scheme"),
        ("localhost:48000:1", "give HOST:PORT"),
        ("localhost:x", "port must be a number"),
        ("localhost:70000", "port must be 0-65535"),
    ]:
        with pytest.raises(ValueError, match=why):
            net.split_address(bad, 1)
