"""Batched audit writes for the proxy's hot path.

A proxied PHI call must be audited without paying an audit transaction (and the chain lock) per
request. Records go into a bounded in-process queue that one task flushes at most
200 ms after the first record, in a single transaction; while the database is away the records stay queued and are
retried. ``stop()`` drains it; a crash loses at most what is still queued (documented in
SECURITY.md). Changes made through the
dashboard, the API or the CLI (BAA, connections, keys) are audited in their own transaction.
"""

from __future__ import annotations

import asyncio
import contextlib

from app.audit import audit_log
from app.audit.audit_log import AuditRecord
from app.core.db import Database
from app.core.logs import get_logger

log = get_logger(__name__)


class AuditWriter:
    def __init__(self, db: Database, *, interval: float = 0.2, max_batch: int = 1000, max_queue: int = 100_000) -> None:
        self.db = db
        self.interval = interval
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._buffer: list[AuditRecord] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def full(self) -> bool:
        """The queue is at its bound (the database takes no writes for a long while): PHI calls
        are refused rather than served unaudited."""
        return len(self._buffer) >= self.max_queue

    def add(self, record: AuditRecord) -> None:
        if self.full:
            log.error("audit queue full: record dropped", action=record.action)
            return
        self._buffer.append(record)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            if not self._stopping:
                await asyncio.sleep(self.interval)
            self._wake.clear()
            await self.flush()

    async def flush(self, *, attempts: int | None = None) -> None:
        """Write everything queued now, in batches (also called by tests and at shutdown).

        A batch that cannot be written (the database is away) stays queued and is retried with
        backoff; ``attempts`` bounds the retries (at shutdown), None retries until it is written.
        """
        async with self._lock:
            delay = 0.2
            tries = 0
            while self._buffer:
                batch = self._buffer[: self.max_batch]
                try:
                    async with self.db.session() as session:
                        await audit_log.append_batch(session, batch)
                except Exception:  # noqa: BLE001 - kept and retried; never crash the writer
                    tries += 1
                    if attempts is not None and tries >= attempts:
                        log.error("audit records not written at shutdown", records=len(self._buffer))
                        return
                    log.warning("audit batch not written yet; retrying", records=len(batch), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                del self._buffer[: len(batch)]
                delay = 0.2

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
            except asyncio.TimeoutError:  # stuck retrying against an absent database
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        await self.flush(attempts=5)
