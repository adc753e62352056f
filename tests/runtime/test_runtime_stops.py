"""StopMatcher: text is emitted as soon as it cannot start a stop string, and a stop string is never emitted."""

from __future__ import annotations

import pytest

from clowder_runtime.stops import StopMatcher

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "stopped"),
    [
        # No stop strings: everything passes straight through.
        ((), ["Hello", " world"], ["Hello", " world"], False),
        # A stop string inside one piece: text before it, nothing after.
        (("END",), ["abcENDdef"], ["abc"], True),
        # A stop string split over three pieces: the partial "E", "EN" is held, then dropped.
        (("END",), ["abc E", "N", "D tail"], ["abc ", "", ""], True),
        # A false start: "EN" is held until "X" shows it is not "END", then released.
        (("END",), ["abEN", "X!"], ["ab", "ENX!"], False),
        # Two stop strings: the earliest occurrence wins.
        (("world", "lo"), ["Hello world"], ["Hel"], True),
        # Held text that could start either stop string waits for the longer one to be ruled out.
        (("\n\n", "\nUser:"), ["line\n", "Us", "er:"], ["line", "", ""], True),
        # The held prefix of one stop string turns out to begin another.
        (("abc", "bd"), ["ab", "d"], ["", "a"], True),
    ],
)
def test_feed_emits_only_what_cannot_start_a_stop(stops, pieces, emitted, stopped):
    matcher = StopMatcher(stops)
    results = [matcher.feed(piece) for piece in pieces]
    assert [text for text, _ in results] == emitted
    assert results[-1][1] is stopped
    assert matcher.stopped is stopped


def test_flush_releases_a_held_prefix_when_generation_ends_without_the_stop():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("the end ST") == ("the end ", False)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_nothing_is_emitted_after_a_stop():
    matcher = StopMatcher(["x"])
    assert matcher.feed("ax") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_concatenated_output_is_the_text_before_the_first_stop_for_any_split():
    text = "It was a dark and stormy night; the rain fell in torrents."
    stop = "stormy"
    expected = text[: text.index(stop)]
    for size in range(1, 8):
        matcher = StopMatcher([stop, "rainbow"])
        out = []
        for start in range(0, len(text), size):
            emitted, hit = matcher.feed(text[start : start + size])
            out.append(emitted)
            if hit:
                break
        assert "".join(out) == expected, f"piece size {size}"
