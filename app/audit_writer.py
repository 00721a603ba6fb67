"""Batched audit writes for the proxy's hot path.

A proxied PHI call must be audited without paying an audit transaction (and the chain lock) per
request. Records go into a bounded in-process queue that one task flushes every few
milliseconds in a single transaction. ``stop()`` drains it; a crash loses at most the last
flush interval of proxy access records (documented in SECURITY.md). Changes made through the
dashboard, the API or the CLI (BAA, connections, keys) are audited in their own transaction.
"""

from __future__ import annotations

import asyncio
import contextlib

from app import audit
from app.audit import AuditRecord
from app.db import Database
from app.logs import get_logger

log = get_logger(__name__)


class AuditWriter:
    def __init__(self, db: Database, *, interval: float = 0.05, max_batch: int = 500, max_queue: int = 100_000) -> None:
        self.db = db
        self.interval = interval
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._buffer: list[AuditRecord] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def add(self, record: AuditRecord) -> None:
        if len(self._buffer) >= self.max_queue:
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

    async def flush(self) -> None:
        """Write everything queued now, in batches (also called by tests and at shutdown)."""
        async with self._lock:
            while self._buffer:
                batch, self._buffer = self._buffer[: self.max_batch], self._buffer[self.max_batch :]
                await self._write(batch)

    async def _write(self, batch: list[AuditRecord]) -> None:
        for attempt in range(3):
            try:
                async with self.db.session() as session:
                    await audit.append(session, batch)
                return
            except Exception:  # noqa: BLE001 - retried, then logged; never crash the writer
                if attempt == 2:
                    log.exception("audit batch lost", records=len(batch))
                    return
                await asyncio.sleep(0.2 * (attempt + 1))

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
