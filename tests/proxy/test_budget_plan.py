"""The budget's decision (``app.proxy.budget.plan``): no window ever holds more than the limit,
waits are bounded, the queue is fair between callers, a lockout refuses everything."""

from __future__ import annotations

import random

import pytest

from app.proxy import budget
from app.proxy.budget import BudgetRules, Ledger, plan

RULES = BudgetRules(limit=60, window=61.0, max_wait=10.0, lockout=60.0, burst=60)  # no pacing: the window alone
PACED = BudgetRules(limit=60, window=61.0, max_wait=10.0, lockout=60.0, burst=10)  # the default
T0 = 1_780_000_000.0  # a realistic epoch: float sums at this size must not cost a slot


def _tightest(sends: list[float], limit: int) -> float:
    """The shortest time in which ``limit + 1`` calls went: at least a window, or one window held
    more than the limit (open, closed or half-open: this is the strict test)."""
    sends = sorted(sends)
    return min((b - a for a, b in zip(sends, sends[limit:])), default=float("inf"))


def test_a_burst_up_to_the_limit_goes_at_once_and_the_next_call_queues():
    ledger = Ledger()
    verdicts = [plan(ledger, rules=RULES, now=T0 + i * 0.001, caller="a") for i in range(60)]
    assert all(v.at is not None and v.at == T0 + i * 0.001 for i, v in enumerate(verdicts))
    refused = plan(ledger, rules=RULES, now=T0 + 1, caller="b")
    # the oldest grant leaves the window at T0 + 61: too far ahead to wait for; come back when it is 10 s away
    assert refused.at is None and refused.reason == "full"
    assert refused.retry_after == pytest.approx(61 - 10 - 1)


def test_past_the_limit_a_call_waits_at_most_max_wait_then_is_refused_with_when_to_come_back():
    ledger = Ledger()
    for i in range(60):
        assert plan(ledger, rules=RULES, now=T0 + i, caller=f"c{i % 7}").at == T0 + i
    now = T0 + 60.5  # the first grant (T0) leaves the window at T0 + 61
    first = plan(ledger, rules=RULES, now=now, caller="x")
    assert first.at == pytest.approx(T0 + 61.0)
    refused = None
    for n in range(30):
        verdict = plan(ledger, rules=RULES, now=now, caller=f"y{n}")
        if verdict.at is None:
            refused = verdict
            break
        assert verdict.at - now <= RULES.max_wait
    assert refused is not None and refused.reason == "full"
    assert 0 < refused.retry_after <= 61.0


@pytest.mark.parametrize("rules", [RULES, PACED], ids=["window", "paced"])
@pytest.mark.parametrize("seed", [7, 8, 9])
def test_no_window_ever_holds_more_than_the_limit_under_random_arrivals(rules, seed):
    rng = random.Random(seed)
    ledger, sent, now = Ledger(), [], T0 + rng.random()
    for _ in range(20_000):
        now += rng.expovariate(3.0)  # three callers a second against a budget of one a second
        verdict = plan(ledger, rules=rules, now=now, caller=f"k{rng.randrange(10)}")
        if verdict.at is not None:
            assert verdict.at - now <= rules.max_wait + 1e-9
            sent.append(verdict.at)
    assert _tightest(sent, rules.limit) >= rules.window
    minutes = (sent[-1] - sent[0]) / 60
    steady = len(sent) - rules.limit  # past the first burst, one window's worth each 61 s
    assert steady / minutes == pytest.approx(60 * 60 / 61, rel=0.02)  # the whole budget is used
    assert len(ledger.slots) < 700  # the ledger stays small


def _large_budget_run(seed: int) -> tuple[list[float], int]:
    large = BudgetRules(limit=3000, window=61.0, max_wait=10.0, lockout=60.0, burst=3000)
    rng = random.Random(seed)
    ledger, sent, now, most = Ledger(), [], T0 + rng.random(), 0
    for _ in range(40_000):
        now += rng.expovariate(100.0)  # a hundred callers a second against fifty
        verdict = plan(ledger, rules=large, now=now, caller=f"k{rng.randrange(10)}")
        if verdict.at is not None:
            sent.append(verdict.at)
        most = max(most, sum(1 for _, c, _ in ledger.slots if not c))  # entries of grants that went
    return sent, most


@pytest.mark.parametrize("seed", [7, 8])
def test_a_large_budget_keeps_a_small_ledger_and_still_never_exceeds_its_window(seed, monkeypatch):
    """Past 600 a minute grants are recorded at the end of their second: about 62 entries instead
    of 610 (each call reads and writes the ledger), no window holds more than the limit, and the
    budget used is within 1/61 of what tenths of a second allow."""
    sent, most = _large_budget_run(seed)
    assert _tightest(sent, 3000) >= 61.0
    assert most <= 63
    monkeypatch.setattr(budget, "WIDE_BUCKET_LIMIT", 10**9)  # the same arrivals, recorded by the tenth
    fine, most_fine = _large_budget_run(seed)
    assert most_fine > 200  # (by the tenth: a few hundred)
    assert len(sent) >= len(fine) * (1 - 1 / 61)


def test_a_lowered_limit_holds_from_the_next_call():
    ledger = Ledger()
    for i in range(60):
        plan(ledger, rules=RULES, now=T0 + i * 0.5, caller="a")
    lower = BudgetRules(limit=20, window=61.0, max_wait=100.0, lockout=60.0, burst=20)
    verdict = plan(ledger, rules=lower, now=T0 + 30, caller="a")
    # 60 grants in the window: 41 must leave it before a 21st may go; the 41st left at T0 + 20 (+ the tenth)
    assert verdict.at == pytest.approx(T0 + 20 + 61, abs=0.11)
    assert ledger.used(T0 + 30, 61.0) + ledger.waiting(T0 + 30) == 20


@pytest.mark.parametrize("t", [1780088797.7000003, 1780088797.7, T0 + 0.1, T0 + 1e-7, T0 + 0.0999999])
def test_a_grant_is_never_recorded_before_it_happens(t):
    ledger = Ledger()
    ledger._add(t, "")
    (recorded, _, _), = ledger.slots
    assert t <= recorded <= t + 0.1 + 1e-6  # at the end of its tenth: leaving the window late, never early


@pytest.mark.parametrize("rules", [RULES, PACED], ids=["window", "paced"])
def test_one_greedy_caller_cannot_take_every_place_in_the_queue(rules):
    ledger = Ledger()
    for i in range(60):  # a full window whose grants leave it from T0 + 6 on, one every 0.1 s
        plan(ledger, rules=rules, now=T0 - 55 + i * 0.1, caller="warm")
    now = T0 + 1
    greedy = [plan(ledger, rules=rules, now=now, caller="greedy") for _ in range(3 * rules.queue_places)]
    held = sum(v.at is not None and v.at > now for v in greedy)  # reservations, not calls that went at once
    assert 1 <= held <= -(-rules.queue_places // 2)  # half the places while it waits alone: room for one more
    refused = [v for v in greedy if v.at is None]
    assert refused[0].reason == "fair_share" and refused[0].retry_after > 0
    for n in range(3):  # newcomers, one call each, still find a place
        other = plan(ledger, rules=rules, now=now, caller=f"light{n}")
        assert other.at is not None and other.at - now <= rules.max_wait


@pytest.mark.parametrize("rules", [RULES, PACED], ids=["window", "paced"])
def test_callers_waiting_in_turn_share_the_budget_evenly(rules):
    ledger, now = Ledger(), T0
    ready = {f"caller{i}": now for i in range(10)}
    served = dict.fromkeys(ready, 0)
    for _ in range(3000):
        caller, at = min(ready.items(), key=lambda item: item[1])
        now = max(now, at)
        verdict = plan(ledger, rules=rules, now=now, caller=caller)
        if verdict.at is None:
            ready[caller] = now + verdict.retry_after
        else:
            served[caller] += 1
            ready[caller] = verdict.at + 0.2  # the call takes 200 ms, then the caller asks again
    counts = sorted(served.values())
    assert counts[0] >= 0.95 * counts[-1]


def test_a_lockout_refuses_every_call_until_it_ends():
    ledger = Ledger(locked_until=T0 + 60)
    verdict = plan(ledger, rules=RULES, now=T0 + 1, caller="a")
    assert verdict.at is None and verdict.reason == "locked" and verdict.retry_after == pytest.approx(59)
    assert plan(ledger, rules=RULES, now=T0 + 60.001, caller="a").at == T0 + 60.001


def test_the_ledger_round_trips_through_its_stored_form():
    ledger = Ledger()
    for i in range(5):
        plan(ledger, rules=RULES, now=T0 + i / 3, caller=f"k{i}")
    ledger.locked_until = 12.5
    again = Ledger.decode(ledger.encode())
    assert again.slots == ledger.slots
    assert again.locked_until == 12.5 and again.tat == pytest.approx(ledger.tat)
    assert Ledger.decode(None) == Ledger()
    assert again.used(T0 + 2, RULES.window) == 5 and again.waiting(T0 + 2) == 0
    full = Ledger()
    for i in range(60):
        plan(full, rules=RULES, now=T0 - 55, caller="burst")
    reserved = plan(full, rules=RULES, now=T0, caller="waiter")
    assert reserved.at == pytest.approx(T0 + 6, abs=0.11)  # the burst leaves the window (recorded a tenth late at most)
    assert full.used(T0, RULES.window) == 59 and full.waiting(T0) == 1


def test_past_a_burst_calls_are_paced_over_the_minute_and_the_window_still_holds():
    ledger = Ledger()
    first = [plan(ledger, rules=PACED, now=T0, caller=f"k{i}") for i in range(12)]
    assert [v.at for v in first[:10]] == [T0] * 10  # a burst goes at once
    assert first[10].at == pytest.approx(T0 + PACED.spacing) and first[11].at == pytest.approx(T0 + 2 * PACED.spacing)
    # callers that keep asking get one slot every window/limit, never more than the limit in any window
    sent, now = [v.at for v in first], T0
    for step in range(400):
        now += 0.3
        verdict = plan(ledger, rules=PACED, now=now, caller=f"k{step % 10}")
        if verdict.at is not None:
            assert verdict.at - now <= PACED.max_wait + 1e-9
            sent.append(verdict.at)
    assert _tightest(sent, PACED.limit) >= PACED.window
    paced = sorted(sent)[9:60]  # from the burst's last call until the window is full
    assert all(b - a >= PACED.spacing - 1e-6 for a, b in zip(paced, paced[1:]))
    assert paced[-1] - paced[0] == pytest.approx(50 * PACED.spacing, abs=0.31)
