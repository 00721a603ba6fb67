"""Salesmsg's request budget, held for every caller of a connection by every process and replica.

Salesmsg allows about 60 requests a minute and, past that, answers 429 for the next 60 s with no
rate-limit headers. Whether it counts per token, per org or per OAuth app is not published, so the
budget's key is a setting (``SMC_UPSTREAM_BUDGET_SCOPE``: one per connection, the default, or one
per OAuth app). The gateway keeps every budget under its limit itself:

- A ledger per budget holds the times of its last ``limit`` grants (``plan``): a call may go at
  ``now`` while fewer than ``limit`` grants fall in the last window; otherwise it reserves the
  earliest time one of them leaves the window. Any window of that length then holds at most
  ``limit`` calls, whether Salesmsg counts a rolling or a fixed minute. The window is Salesmsg's
  minute plus a guard (``SMC_UPSTREAM_BUDGET_GUARD_SECONDS``, 1 s) for the time a request takes to
  reach Salesmsg and for clocks: 60 calls per 61 s, 98.4 % of the budget.
- Grants are also paced (GCRA, the generic cell rate algorithm): a burst of
  ``SMC_UPSTREAM_BUDGET_BURST`` (10) goes at once, then one call per window/limit. A dashboard
  page's few calls never wait; under load the budget is spread over the minute instead of spent in
  its first second, so the queue moves a place a second and stays short.
- A reservation is at most ``SMC_UPSTREAM_BUDGET_MAX_WAIT_SECONDS`` (10 s) ahead: the queue is
  short and bounded; a call that would wait longer gets our 429 with ``Retry-After`` at once.
- The queue is fair between callers (each API key, each dashboard user): while calls wait, a
  caller may hold at most places / (callers waiting + 1) of the queue's places, so there is always
  room for one more caller: a key sending 50 calls at once cannot push a key sending one out of
  the queue. Callers that wait in turn are served in arrival order, round-robin.
- A 429 from Salesmsg locks the budget for ``SMC_UPSTREAM_LOCKOUT_SECONDS`` (60 s) in the ledger:
  every process refuses calls to that connection with our 429 and sends nothing until it ends. A
  call that waited for its slot reads the ledger again before it goes.
- Time is read where the decision is made (inside the store's lock), and a call that would leave
  more than half the guard after its slot (a slow store, a busy process) takes a new one.

The ledger lives in PostgreSQL (one row, locked for the update) or in Redis when
``SMC_REDIS_URL`` is set; on SQLite, one process by design, in the process (``budget_stores``).
A call costs at most one transaction on it (concurrent calls of a process share one:
``budget_stores``). A store that cannot be reached refuses calls (503): nothing goes to Salesmsg
unbudgeted.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from app.connections.view import PAT, ConnectionView
from app.core.errors import Refusal
from app.core.logs import get_logger
from app.core.metrics import BUDGET_CALLS, BUDGET_LOCKOUTS, BUDGET_QUEUED, BUDGET_WAIT_SECONDS, child
from app.core.settings import Settings

log = get_logger(__name__)

SALESMSG_WINDOW_SECONDS = 60.0
_MAX_LOCKOUT_SECONDS = 3600.0
_TAKES = 3  # slots one call may take when it keeps missing them


@dataclass(frozen=True, slots=True)
class BudgetRules:
    limit: int  # calls per window; 0: no budget
    window: float  # seconds: Salesmsg's minute plus the guard
    max_wait: float  # how far ahead a call may reserve its slot
    lockout: float  # seconds a Salesmsg 429 stops every call
    burst: int = 10  # calls that may go at once before pacing starts
    guard: float = 1.0  # the part of ``window`` beyond Salesmsg's minute

    @classmethod
    def of(cls, settings: Settings) -> BudgetRules:
        guard = settings.upstream_budget_guard_seconds
        return cls(limit=settings.upstream_budget_per_minute, window=SALESMSG_WINDOW_SECONDS + guard,
                   max_wait=settings.upstream_budget_max_wait_seconds, lockout=float(settings.upstream_lockout_seconds),
                   burst=settings.upstream_budget_burst, guard=guard)

    @property
    def bucket(self) -> float:
        """How finely grants are recorded: a tenth of a second, a second past 600 a minute."""
        return WIDE_BUCKET_SECONDS if self.limit > WIDE_BUCKET_LIMIT else BUCKET_SECONDS

    @property
    def spacing(self) -> float:
        return self.window / self.limit

    @property
    def tolerance(self) -> float:
        """How far ahead of the paced schedule a call may go: a burst's worth."""
        return (min(self.burst, self.limit) - 1) * self.spacing

    @property
    def queue_places(self) -> int:
        """How many calls can be waiting at once: the paced slots within ``max_wait``."""
        return max(1, int(self.max_wait // self.spacing))

    @property
    def lateness(self) -> float:
        """How long after its slot a call may still go: half the guard."""
        return self.guard / 2


BUCKET_SECONDS = 0.1  # a grant is recorded at the end of its tenth of a second ...
WIDE_BUCKET_SECONDS = 1.0  # ... or of its second, when the limit is past WIDE_BUCKET_LIMIT
WIDE_BUCKET_LIMIT = 600


def _bucket(t: float, size: float = BUCKET_SECONDS) -> float:
    """The end of ``t``'s bucket (a tenth of a second, or ``size``), never before ``t`` (float
    division may round down)."""
    end = math.ceil(t / size) * size
    while end < t:
        end += size
    return end


@dataclass(slots=True)
class Ledger:
    """A budget's shared state: its grants still in the window as entries (time, caller, count),
    oldest first; the pacing schedule (the theoretical arrival time of the next call); the end of
    a lockout. A grant is recorded at the end of its tenth of a second (later is the safe side: it
    leaves the window no earlier than it really does). Only a reservation (a call waiting for its
    time) keeps its caller, for the queue's fairness; a call that went is anonymous (caller ""),
    and calls of one tenth share an entry. A ledger therefore stays small whatever the limit: at
    most ``limit`` entries, and past ``WIDE_BUCKET_LIMIT`` a call a minute the grants are recorded
    at the end of their second instead (about 62 entries past the window instead of 610, which
    its JSON would cost a millisecond per call to read and write, for at most 1/61 of the budget
    held a second longer), plus the waiting ones."""

    slots: list[tuple[float, str, int]] = field(default_factory=list)
    tat: float = 0.0
    locked_until: float = 0.0

    def encode(self) -> str:
        """JSON with floats as Python writes them: they read back exactly."""
        return json.dumps({"slots": [list(s) for s in self.slots], "tat": self.tat, "locked_until": self.locked_until},
                          separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes | None) -> Ledger:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(sorted((float(t), str(c), int(n)) for t, c, n in data["slots"]), float(data["tat"]),
                   float(data["locked_until"]))

    def used(self, now: float, window: float) -> int:
        """Grants that went in the last window (not counting reservations ahead)."""
        return sum(n for t, c, n in self.slots if t > now - window and not (c and t > now))

    def waiting(self, now: float) -> int:
        """Reservations: calls waiting for their time."""
        return sum(n for t, c, n in self.slots if c and t > now)

    def _compact(self, now: float, window: float) -> int:
        """Drop what left the window, forget the callers of what has gone (merging their entries);
        the number of grants still in the window."""
        kept: list[tuple[float, str, int]] = []
        total = 0
        for t, c, n in self.slots:
            if t <= now - window:
                continue
            c = c if t > now else ""
            total += n
            if kept and kept[-1][:2] == (t, c):
                n += kept.pop()[2]
            kept.append((t, c, n))
        self.slots = kept
        return total

    def _time_of(self, nth: int) -> float:
        """The recorded time of the ``nth`` oldest grant (1-based)."""
        seen = 0
        for t, _, n in self.slots:
            seen += n
            if seen >= nth:
                return t
        raise ValueError(nth)

    def _drop_oldest(self, count: int) -> None:
        while count > 0:
            t, c, n = self.slots[0]
            if n > count:
                self.slots[0] = (t, c, n - count)
                return
            self.slots.pop(0)
            count -= n

    def _add(self, at: float, caller: str, bucket: float = BUCKET_SECONDS) -> None:
        """One grant at ``at``: one more in the caller's entry for that tenth of a second (or bucket)."""
        t = _bucket(at, bucket)
        i = bisect.bisect_left(self.slots, (t, caller))
        if i < len(self.slots) and self.slots[i][:2] == (t, caller):
            self.slots[i] = (t, caller, self.slots[i][2] + 1)
        else:
            self.slots.insert(i, (t, caller, 1))


@dataclass(frozen=True, slots=True)
class Verdict:
    """``at``: the time the call may go; else ``reason`` (locked, full, fair_share) and ``retry_after``."""

    at: float | None
    reason: str = "granted"
    retry_after: float = 0.0


def plan(ledger: Ledger, *, rules: BudgetRules, now: float, caller: str) -> Verdict:
    """Decide one call and record its grant in ``ledger``. Pure; the stores run it atomically."""
    if ledger.locked_until > now:
        return Verdict(None, "locked", ledger.locked_until - now)
    # grants that must leave the window first (more than one if the limit was lowered meanwhile)
    excess = ledger._compact(now, rules.window) - rules.limit + 1
    at = max(now, ledger._time_of(excess) + rules.window) if excess > 0 else now
    at = max(at, ledger.tat - rules.tolerance)
    if at > now:
        waiting: dict[str, list[float]] = {}
        for t, c, n in ledger.slots:
            if c and t > now:
                waiting.setdefault(c, []).extend([t] * n)
        # room for one more caller than those waiting: a newcomer always finds a place
        share = max(1, math.ceil(rules.queue_places / (len(waiting.keys() | {caller}) + 1)))
        mine = waiting.get(caller, [])
        if len(mine) >= share:
            return Verdict(None, "fair_share", min(mine) - now)
    if at > now + rules.max_wait:
        return Verdict(None, "full", at - rules.max_wait - now)
    if excess > 0:
        ledger._drop_oldest(excess)
    ledger._add(at, caller if at > now else "", rules.bucket)
    ledger.tat = max(ledger.tat, at) + rules.spacing
    return Verdict(at)


class BudgetStore(Protocol):
    """Where the ledgers live; each method is atomic across every process that shares the store,
    and ``take`` reads the clock inside that atomic section."""

    async def take(self, key: str, *, rules: BudgetRules, caller: str) -> Verdict: ...

    async def lock(self, key: str, *, until: float) -> None: ...

    async def read(self, key: str) -> Ledger: ...

    async def close(self) -> None: ...


class BudgetUnavailable(Exception):
    """The store could not be reached: the call is refused (fail closed), never sent unbudgeted."""


class BudgetBusy(BudgetUnavailable):
    """The store answers, but the ledger stayed locked by others too long: refused, not an outage."""


@functools.lru_cache(maxsize=8192)
def caller_tag(caller: str) -> str:
    """A short stable tag for a caller (an API key, a dashboard user) as the ledger stores it."""
    return hashlib.blake2b(caller.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True, slots=True)
class BudgetState:
    """What the tenant page shows."""

    limit: int
    used: int
    waiting: int
    locked_for: float  # seconds left of a lockout; 0 when none


_UNAVAILABLE = (503, "budget_unavailable", "Salesmsg's request budget cannot be checked right now; try again shortly.",
                {"Retry-After": "5"})


class UpstreamBudget:
    """The per-process side: ``acquire`` before each call to Salesmsg, ``locked_out`` on its 429."""

    def __init__(self, *, settings: Settings, store: BudgetStore) -> None:
        self.rules = BudgetRules.of(settings)
        self.scope = settings.upstream_budget_scope
        self.client_id = settings.salesmsg_client_id
        self.store = store
        self._locked: dict[str, float] = {}  # lockouts this process already knows of

    @property
    def enabled(self) -> bool:
        return self.rules.limit > 0

    def key_for(self, conn: ConnectionView) -> str:
        if self.scope == "app" and conn.kind != PAT:
            return f"app:{self.client_id}"
        return f"tenant:{conn.tenant_id}"

    async def acquire(self, conn: ConnectionView, *, caller: str) -> None:
        """Return when the call may go (at once, or after a short wait); otherwise raise our 429
        (or 503 when the store cannot be reached)."""
        if not self.enabled:
            return
        key = self.key_for(conn)
        tag = caller_tag(caller)
        for _ in range(_TAKES):
            self._refuse_if_locked(key, self._locked.get(key, 0.0))
            try:
                verdict = await self.store.take(key, rules=self.rules, caller=tag)
            except BudgetUnavailable:
                self._unavailable()
            if verdict.at is None:
                if verdict.reason == "locked":
                    self._locked[key] = time.time() + verdict.retry_after
                self._refuse(verdict)
            delay = verdict.at - time.time()
            if delay > 0:
                BUDGET_QUEUED.inc()
                try:
                    await asyncio.sleep(delay)
                finally:
                    BUDGET_QUEUED.dec()
                BUDGET_WAIT_SECONDS.observe(delay)
                try:  # a lockout may have begun while this call waited
                    stored = (await self.store.read(key)).locked_until
                except BudgetUnavailable:
                    self._unavailable()
                self._refuse_if_locked(key, max(stored, self._locked.get(key, 0.0)))
            if time.time() - verdict.at <= self.rules.lateness:
                child(BUDGET_CALLS, "queued" if delay > 0 else "immediate").inc()
                return
            child(BUDGET_CALLS, "late").inc()  # the slot went by (a slow store or a busy process): take another
        self._refuse(Verdict(None, "full", 1.0))

    def _refuse_if_locked(self, key: str, locked_until: float) -> None:
        now = time.time()
        if locked_until > now:
            self._locked[key] = locked_until
            self._refuse(Verdict(None, "locked", locked_until - now))

    def _unavailable(self) -> NoReturn:
        child(BUDGET_CALLS, "refused_unavailable").inc()
        raise Refusal(*_UNAVAILABLE) from None

    def _refuse(self, verdict: Verdict) -> NoReturn:
        child(BUDGET_CALLS, f"refused_{verdict.reason}").inc()
        retry = str(max(1, math.ceil(verdict.retry_after)))
        if verdict.reason == "locked":
            raise Refusal(429, "upstream_locked_out",
                          "Salesmsg refused this organization's calls for a minute (its rate limit); nothing is sent until it ends.",
                          {"Retry-After": retry})
        raise Refusal(429, "upstream_budget_exhausted",
                      "Salesmsg's request budget for this organization is used up for now; try again after Retry-After.",
                      {"Retry-After": retry})

    def lockout_for(self, hinted: float | None) -> float:
        """How long a Salesmsg 429 locks the budget: Salesmsg's 60 s, or the ``Retry-After`` that
        something in front of it sent (at least a second, at most an hour)."""
        if hinted is None or hinted < 1:
            return self.rules.lockout
        return min(hinted, _MAX_LOCKOUT_SECONDS)

    async def locked_out(self, conn: ConnectionView, *, seconds: float) -> None:
        """Salesmsg answered 429: stop every process from calling this budget for ``seconds``."""
        if not self.enabled:
            return
        key = self.key_for(conn)
        until = time.time() + seconds
        self._locked[key] = max(until, self._locked.get(key, 0.0))
        BUDGET_LOCKOUTS.inc()
        log.warning("salesmsg rate limit: budget locked", budget=key, seconds=round(seconds, 1))
        try:
            await self.store.lock(key, until=until)
        except BudgetUnavailable:
            log.error("budget lockout not shared: the store is unreachable; this process holds it", budget=key)

    async def state(self, conn: ConnectionView) -> BudgetState | None:
        if not self.enabled:
            return None
        try:
            ledger = await self.store.read(self.key_for(conn))
        except BudgetUnavailable:
            return None
        now = time.time()
        return BudgetState(limit=self.rules.limit, used=ledger.used(now, self.rules.window), waiting=ledger.waiting(now),
                           locked_for=max(0.0, ledger.locked_until - now))

    async def close(self) -> None:
        await self.store.close()
