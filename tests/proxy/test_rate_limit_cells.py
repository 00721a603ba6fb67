"""The in-process rate limiter (GCRA): a burst of N, then one call per period/N, per identity."""

from __future__ import annotations

import pytest
from limits import parse

from app.proxy.rate_limits import CellRate


def test_a_burst_of_n_then_one_call_per_interval():
    cells = CellRate(parse("6/minute"))  # one call every 10 s once the burst is spent
    now = 1000.0
    assert [cells.allow("key-a", now) for _ in range(6)] == [None] * 6
    wait = cells.allow("key-a", now)
    assert wait is not None and 9.9 < wait <= 10.0
    assert cells.allow("key-a", now + 5) is not None  # still too early
    assert cells.allow("key-a", now + 10) is None  # one cell has drained
    assert cells.allow("key-a", now + 10) is not None
    assert cells.allow("key-b", now) is None  # another identity has its own budget
    assert all(cells.allow("key-a", now + 70 + i / 100) is None for i in range(6))  # whole again after a minute


@pytest.mark.parametrize("rate", ["600/minute", "100/minute", "1000/hour", "7/minute", "3/second"])
@pytest.mark.parametrize("now", [0.0, 123456.789, 9_876_543.21])
def test_the_whole_burst_is_allowed_whatever_the_clock_reads(rate, now):
    item = parse(rate)
    cells = CellRate(item)
    assert all(cells.allow("k", now) is None for _ in range(item.amount))  # float sums must not cost the N-th
    assert cells.allow("k", now) is not None


def test_refused_calls_do_not_spend_the_budget():
    cells = CellRate(parse("2/second"))
    assert cells.allow("t", 0.0) is None and cells.allow("t", 0.0) is None
    for _ in range(100):
        assert cells.allow("t", 0.1) is not None
    assert cells.allow("t", 0.5) is None  # the refusals did not push the next slot out


def test_identities_with_a_whole_budget_are_forgotten_when_the_table_is_full():
    cells = CellRate(parse("10/second"), max_entries=100)
    for i in range(100):
        assert cells.allow(i, 0.0) is None
    assert cells.allow("late", 5.0) is None  # every earlier entry has drained by now: pruned
    assert len(cells.tat) == 1
    for i in range(100):
        assert cells.allow(i, 5.0) is None
    assert cells.allow("one-more", 5.0) is None  # nothing drained yet: kept, never wrongly reset
    assert len(cells.tat) == 102
