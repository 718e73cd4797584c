"""The history checker catches fabricated violations of each promise, says what went
wrong in words, and stays quiet on correct (including overlapping) histories."""

from __future__ import annotations

import pytest

from service.cache.checker import CoherenceViolation, HistoryChecker


def test_a_correct_history_passes():
    c = HistoryChecker()
    c.record_states(0, {"n1": {"k": "S"}, "n2": {"k": "S"}, "n3": {"k": "I"}})
    c.record_write("n1", "k", "a", 1, 0, 10)
    c.record_states(10, {"n1": {"k": "M"}, "n2": {"k": "I"}, "n3": {}})
    c.record_read("n2", "k", "a", 1, 11, 20)
    c.record_read("n3", "k", None, 0, 0, 5)  # began before the write: the initial value
    c.record_states(20, {"n1": {"k": "S"}, "n2": {"k": "S"}, "n3": {"k": "S"}})
    c.record_states(21, {"n1": {"k": "S"}, "n2": {"k": "S"}, "n3": {"k": "S"}})
    c.assert_ok()
    assert (c.reads, c.writes, c.steps) == (2, 1, 4)
    assert [at for at, _ in c.states] == [0, 10, 20]  # kept when something changed


def test_two_exclusive_copies_are_reported():
    c = HistoryChecker()
    [v] = c.record_states(7, {"n1": {"k": "M"}, "n2": {"k": "E"}})
    assert v.kind == "single-writer" and v.at_ms == 7
    assert "'k' has 2 exclusive copies (n1=M, n2=E)" in v.description


@pytest.mark.parametrize("owner_state", ["M", "E"])
def test_an_owner_alongside_a_sharer_is_reported(owner_state):
    c = HistoryChecker()
    [v] = c.record_states(3, {"n1": {"k": owner_state}, "n2": {"k": "S"}, "n3": {"k": "S"}})
    assert v.description == f"key 'k' is {owner_state} at n1 while S copies remain at n2, n3"


def test_keys_are_checked_separately():
    c = HistoryChecker()
    assert c.record_states(0, {"n1": {"a": "M", "b": "S"}, "n2": {"a": "I", "b": "M"}})
    assert len(c.violations) == 1 and "'b'" in c.violations[0].description


def test_a_stale_read_is_reported_with_both_operations():
    c = HistoryChecker()
    c.record_write("n1", "k", "old", 1, 0, 5)
    c.record_write("n1", "k", "new", 2, 6, 10)
    [v] = c.record_read("n2", "k", "old", 1, 11, 12)
    assert v.kind == "stale-read"
    assert "read by n2 of 'k' = 'old' (version 1) during [11, 12]" in v.description
    assert "write by n1 of 'k' = 'new' (version 2) during [6, 10]" in v.description
    assert "acknowledged before the read began" in v.description


def test_a_stale_read_is_found_whatever_order_things_are_recorded_in():
    c = HistoryChecker()
    c.record_read("n2", "k", "old", 1, 11, 12)
    c.record_write("n1", "k", "old", 1, 0, 5)
    [v] = c.record_write("n1", "k", "new", 2, 6, 10)
    assert v.kind == "stale-read"


def test_a_read_overlapping_a_write_may_return_either_value():
    c = HistoryChecker()
    c.record_write("n1", "k", "a", 1, 0, 5)
    c.record_write("n1", "k", "b", 2, 6, 10)
    c.record_read("n2", "k", "a", 1, 10, 12)  # began as the write ended: not before
    c.record_read("n3", "k", "a", 1, 7, 20)
    c.assert_ok()


def test_returning_the_initial_value_after_an_acknowledged_write_is_stale():
    c = HistoryChecker()
    c.record_write("n1", "k", "a", 1, 0, 5)
    [v] = c.record_read("n2", "k", None, 0, 6, 7)
    assert v.kind == "stale-read"


def test_a_read_whose_value_does_not_match_its_version_is_reported():
    c = HistoryChecker()
    c.record_write("n1", "k", "a", 1, 0, 5)
    [v] = c.record_read("n2", "k", "zzz", 1, 6, 7)
    assert v.kind == "version-mismatch"
    assert "but version 1 was written as 'a'" in v.description
    [v] = c.record_read("n2", "k", "junk", 0, 0, 1)
    assert "version 0 is the initial value None" in v.description


def test_two_writes_with_one_version_are_reported():
    c = HistoryChecker()
    c.record_write("n1", "k", "a", 1, 0, 5)
    [v] = c.record_write("n2", "k", "b", 1, 0, 6)
    assert v.kind == "duplicate-version" and "two writers" in v.description
    [v] = c.record_write("n2", "k", "c", 0, 0, 6)
    assert v.kind == "duplicate-version"


def test_assert_ok_raises_listing_every_violation():
    c = HistoryChecker()
    c.record_states(1, {"n1": {"k": "M"}, "n2": {"k": "M"}})
    c.record_write("n1", "k", "a", 1, 0, 5)
    c.record_read("n2", "k", None, 0, 6, 7)
    with pytest.raises(CoherenceViolation) as err:
        c.assert_ok("seed=42")
    text = str(err.value)
    assert text.startswith("2 coherence violation(s) (seed=42)")
    assert "[single-writer @ 1]" in text and "[stale-read @ 7]" in text
    assert len(err.value.violations) == 2
