"""The event log watchers read, without I/O: cursors, filters, bounds, restarts."""

from __future__ import annotations

from dcache.events import UNKNOWN, EventLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_new_reader_starts_from_now_and_reads_on_from_its_cursor() -> None:
    log = EventLog(Clock())
    log.append("set", "", b"before")
    start = log.read(None, 0, "", b"", 100)
    assert start.events == [] and start.next == 1
    log.append("set", "", b"user:1")
    log.append("delete", "", b"other")
    log.append("expire", "app", b"user:2")  # another namespace
    log.append("evict", "", b"user:3")
    read = log.read(start.incarnation, start.next, "", b"user:", 100)
    assert [(kind, key) for _, kind, _, key in read.events] == [("set", b"user:1"), ("evict", b"user:3")]
    assert read.next == 5 and not read.missed and not read.restarted
    assert log.read(read.incarnation, read.next, "", b"user:", 100).events == []  # nothing twice
    first = log.read(start.incarnation, start.next, "", b"", 1)
    assert [key for *_, key in first.events] == [b"user:1"] and first.next == 2  # a page, and where it stopped


def test_a_reader_that_fell_behind_is_told_how_many_it_missed_and_memory_stays_bounded() -> None:
    log = EventLog(Clock(), max_events=100)
    start = log.read(None, 0, "", b"", 10)
    for i in range(1000):
        log.append("set", "", b"k%d" % i)
        assert len(log._events) <= 100
    read = log.read(start.incarnation, start.next, "", b"", 1000)
    assert read.missed == 1000 - len(read.events) > 0
    assert [key for *_, key in read.events] == [b"k%d" % i for i in range(1000 - len(read.events), 1000)]


def test_the_log_is_bounded_by_the_bytes_of_its_keys_too() -> None:
    log = EventLog(Clock(), max_key_bytes=10_000)
    for i in range(100):
        log.append("set", "", b"%04d" % i + b"k" * 996)
    assert log._bytes <= 10_000 and sum(len(e[3]) for e in log._events) == log._bytes


def test_a_cursor_of_an_earlier_incarnation_reads_everything_kept_and_says_so() -> None:
    earlier = EventLog(Clock())
    cursor = earlier.read(None, 0, "", b"", 10)
    log = EventLog(Clock())  # the node, restarted
    assert log.incarnation != earlier.incarnation
    log.append("set", "", b"k")
    read = log.read(cursor.incarnation, 50, "", b"", 10)
    assert read.restarted and [key for *_, key in read.events] == [b"k"]


def test_the_log_records_only_while_someone_reads_it() -> None:
    clock = Clock()
    log = EventLog(clock)
    assert not log.active
    log.read(None, 0, "", b"", 1)
    assert log.active
    clock.now += 31.0
    assert not log.active


def test_a_reader_from_before_a_pause_in_recording_is_told_it_missed_some() -> None:
    clock = Clock()
    log = EventLog(clock)
    cursor = log.read(None, 0, "", b"", 10)
    log.append("set", "", b"a")
    clock.now += 31.0  # nobody read: the node stops recording (and misses changes) ...
    log.resume()  # ... until someone reads again
    log.append("set", "", b"c")
    read = log.read(cursor.incarnation, cursor.next, "", b"", 10)
    assert read.missed == UNKNOWN and [key for *_, key in read.events] == [b"c"]
    fresh = log.read(None, 0, "", b"", 10)
    log.append("set", "", b"d")
    assert log.read(fresh.incarnation, fresh.next, "", b"", 10).missed == 0
