"""The open-loop schedule of the load drivers (benchmarks/common.py)."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.common import Schedule


def test_clients_together_offer_the_rate_staggered_evenly() -> None:
    schedules = Schedule.spread(100.0, requests_per_second=40, clients=4)
    # Each client every 4/40 = 0.1 s; the four start 25 ms apart.
    assert [s.interval for s in schedules] == [pytest.approx(0.1)] * 4
    assert [s.due(0) for s in schedules] == pytest.approx([100.0, 100.025, 100.05, 100.075])
    due = sorted(s.due(n) for s in schedules for n in range(10))
    assert len(due) == 40 and due[-1] - due[0] < 1.0
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(due)}
    assert gaps == {0.025}


def test_a_request_falls_due_on_schedule_however_late_the_last_one_was() -> None:
    schedule = Schedule(origin=10.0, interval=0.5)
    assert schedule.due(0) == 10.0 and schedule.due(7) == 13.5


@pytest.mark.parametrize(("rate", "clients"), [(0, 4), (-1, 4), (10, 0)])
def test_a_rate_or_client_count_that_cannot_be_scheduled_is_refused(
    rate: float, clients: int
) -> None:
    with pytest.raises(ValueError):
        Schedule.spread(0.0, rate, clients)
