"""The checker itself must be able to say no, or the real-process tests prove nothing."""

from tests.helpers.linearizability import Op, check


def w(client, value, start, end, ok=True):
    return Op(client, "write", value, start, end, ok)


def r(client, value, start, end):
    return Op(client, "read", value, start, end)


def test_sequential_history_is_linearizable():
    assert check([w(1, "a", 0, 1), r(2, "a", 2, 3)])[0]


def test_read_of_overwritten_value_after_ack_is_rejected():
    ok, why = check([w(1, "a", 0, 1), w(1, "b", 2, 3), r(2, "a", 4, 5)])
    assert not ok and "NOT linearizable" in why


def test_read_of_nothing_after_acknowledged_write_is_rejected():
    assert not check([w(1, "a", 0, 1), r(2, None, 2, 3)])[0]


def test_concurrent_read_may_see_either_value():
    assert check([w(1, "a", 0, 1), w(1, "b", 2, 5), r(2, "a", 3, 4)])[0]
    assert check([w(1, "a", 0, 1), w(1, "b", 2, 5), r(2, "b", 3, 4)])[0]


def test_unknown_write_may_apply_late_or_never():
    unknown = Op(1, "write", "x", 0, None)
    assert check([unknown, r(2, None, 1, 2)])[0]
    assert check([unknown, r(2, None, 1, 2), r(2, "x", 3, 4)])[0]
    # ...but once seen it cannot un-happen.
    assert not check([unknown, r(2, "x", 1, 2), r(2, None, 3, 4)])[0]


def test_failed_write_has_no_effect():
    assert not check([w(1, "a", 0, 1, ok=False), r(2, "a", 2, 3)])[0]
