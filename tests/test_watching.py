"""What a node's watch feed keeps of one member's events, without I/O."""

from __future__ import annotations

from typing import Any

from dcache import watching
from dcache.watching import UNKNOWN, _MemberFeed


def answer(
    incarnation: int, events: list[tuple[int, str, bytes]], next_: int, *, missed: int = 0, restarted: bool = False
) -> dict[str, Any]:
    return {
        "incarnation": incarnation,
        "events": [list(e) for e in events],
        "next": next_,
        "missed": missed,
        "restarted": restarted,
    }


def test_a_feed_starts_from_now_and_gives_each_watcher_what_follows_its_cursor() -> None:
    feed = _MemberFeed(None, 0)
    feed.take(answer(7, [], 40))
    _, cursor, missed, restarted = feed.read(None, 100)
    assert cursor == [7, 40] and not missed and not restarted
    feed.take(answer(7, [(41, "set", b"a"), (45, "delete", b"b")], 50))
    events, later, missed, restarted = feed.read((7, 40), 100)
    assert events == [("set", b"a"), ("delete", b"b")] and later == [7, 50] and not missed and not restarted
    events, page, _, _ = feed.read((7, 40), 1)
    assert events == [("set", b"a")] and page == [7, 41]  # a page, and where it stopped
    assert feed.read((7, 50), 100)[0] == []


def test_a_watcher_behind_the_feed_is_told_how_many_it_missed(monkeypatch: Any) -> None:
    monkeypatch.setattr(watching, "FEED_EVENTS", 10)
    feed = _MemberFeed(7, 0)
    feed.take(answer(7, [(i, "set", b"k%d" % i) for i in range(1, 31)], 30))
    events, _, missed, _ = feed.read((7, 0), 100)
    assert missed + len(events) == 30 and missed > 0 and events[-1] == ("set", b"k30")


def test_losses_the_member_reported_are_passed_on_and_an_unknown_one_stays_unknown() -> None:
    feed = _MemberFeed(7, 10)
    feed.take(answer(7, [(20, "set", b"a")], 20, missed=9))
    assert feed.read((7, 10), 100)[2] == 9
    assert feed.read((7, 20), 100)[2] == 0  # (a watcher past the loss saw all there was)
    feed.take(answer(7, [(30, "set", b"b")], 30, missed=UNKNOWN))
    assert feed.read((7, 10), 100)[2] == UNKNOWN  # (not 9 + -1)


def test_a_member_that_restarted_starts_over_and_says_so() -> None:
    feed = _MemberFeed(7, 100)
    feed.take(answer(7, [(101, "set", b"a")], 101))
    feed.take(answer(8, [(1, "set", b"b")], 1, restarted=True))
    events, cursor, _, restarted = feed.read((7, 101), 100)
    assert restarted and events == [("set", b"b")] and cursor == [8, 1]
