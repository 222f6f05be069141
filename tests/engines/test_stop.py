"""Stop strings over streamed pieces: held-back prefixes, cuts at the earliest stop, nothing after a stop."""

from __future__ import annotations

from collections.abc import Sequence

from engines.text import StopMatcher, StopResult


def feed(matcher: StopMatcher, pieces: Sequence[str]) -> tuple[list[str], bool]:
    """Push pieces until a stop; return the emitted texts (per push) and whether it stopped."""
    out: list[str] = []
    for piece in pieces:
        result = matcher.push(piece)
        out.append(result.text)
        if result.stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_no_stops_passes_text_through() -> None:
    m = StopMatcher([])
    assert m.push("Hello") == StopResult("Hello", False)
    assert m.flush() == ""


def test_stop_split_across_pieces_is_held_then_cut() -> None:
    m = StopMatcher(["###"])
    assert m.push("Answer: 42 #") == StopResult("Answer: 42 ", False)
    assert m.push("#") == StopResult("", False)  # "##" could still become "###"
    assert m.push("# trailing") == StopResult("", True)
    assert m.stopped
    assert m.matched == "###"


def test_nothing_after_stop_is_emitted() -> None:
    m = StopMatcher(["STOP"])
    assert m.push("abcSTOPdef") == StopResult("abc", True)
    assert m.push("more text") == StopResult("", True)
    assert m.flush() == ""


def test_stop_at_very_start() -> None:
    out, stopped = feed(StopMatcher(["<end>"]), ["<e", "nd>", "never"])
    assert stopped
    assert "".join(out) == ""


def test_partial_prefix_then_divergence_releases_held_text() -> None:
    m = StopMatcher(["\nUser:"])
    assert m.push("Sure.\nUs") == StopResult("Sure.", False)
    assert m.push("ually") == StopResult("\nUsually", False)
    assert m.flush() == ""


def test_flush_releases_held_prefix_when_no_stop_matched() -> None:
    m = StopMatcher(["</s>"])
    assert m.push("end </") == StopResult("end ", False)
    assert m.flush() == "</"
    assert not m.stopped


def test_multiple_stops_cut_at_earliest_occurrence() -> None:
    out, stopped = feed(StopMatcher(["world", "lo w"]), ["hel", "lo wor", "ld!"])
    assert stopped
    assert "".join(out) == "hel"


def test_multiple_stops_first_completed_ends_generation() -> None:
    m = StopMatcher(["abcd", "bc"])
    assert m.push("xa") == StopResult("x", False)  # "a" may start "abcd"
    # "bc" completes first; the held "a" precedes it, so it is released and the cut is at "bc".
    assert m.push("bc") == StopResult("a", True)
    assert m.matched == "bc"


def test_longest_possible_prefix_over_all_stops_is_held() -> None:
    m = StopMatcher(["xyz", "yz!"])
    assert m.push("..xy") == StopResult("..", False)  # "xy" starts "xyz" (and "y" would start "yz!")
    assert m.push("q") == StopResult("xyq", False)


def test_empty_and_duplicate_stop_strings_are_ignored() -> None:
    m = StopMatcher(["", "ab", "ab"])
    assert m.push("xyz") == StopResult("xyz", False)
    assert m.push("cab") == StopResult("c", True)


def test_unicode_stop_split_across_pieces() -> None:
    out, stopped = feed(StopMatcher(["東京"]), ["Tokyo = ", "東", "京 is big"])
    assert stopped
    assert "".join(out) == "Tokyo = "
