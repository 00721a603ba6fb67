"""When each API key was last used, recorded to the minute without a write per request."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from app.core.db import GRANTS_UNAFFECTED, Database
from app.core.logs import get_logger
from app.core.models import ApiKey

log = get_logger(__name__)
_RESOLUTION = timedelta(seconds=60)


class UsageRecorder:
    def __init__(self, db: Database, *, interval: float = 5.0) -> None:
        self.db = db
        self.interval = interval
        self._pending: dict[uuid.UUID, datetime] = {}
        self._written: dict[uuid.UUID, datetime] = {}  # what this process recorded (a cached grant's is older)
        self._task: asyncio.Task[None] | None = None

    def touch(self, key_id: uuid.UUID, last_used_at: datetime | None) -> None:
        now = datetime.now(UTC)
        written = self._written.get(key_id)
        if written is not None and (last_used_at is None or written > last_used_at):
            last_used_at = written
        if last_used_at is None or now - last_used_at >= _RESOLUTION:
            self._pending[key_id] = now

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            async with self.db.session() as session:
                for key_id, when in pending.items():
                    await session.execute(
                        update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when)
                        .execution_options(synchronize_session=False, **{GRANTS_UNAFFECTED: True})
                    )
            if len(self._written) > 100_000:
                self._written.clear()
            self._written.update(pending)
        except Exception:  # noqa: BLE001 - last-use times are advisory; never fail a request for them
            log.warning("could not record API key use", keys=len(pending))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="key-usage")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
