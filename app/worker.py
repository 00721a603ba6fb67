"""Background work: proactive refresh sweeps, webhook deliveries, clean-up of expired rows.

Runs inside ``serve`` when ``SMC_RUN_WORKER`` is true, or alone as ``salesmsg-connect worker``.
Any number of workers may run: each sweep leases its batch (``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import asyncio
import contextlib

from app.connections import authorize
from app.connections.refresh import Refresher, refresh_due
from app.connections.webhooks import WebhookSender
from app.core.logs import get_logger
from app.identity import people, sessions
from app.proxy import idempotency

log = get_logger(__name__)


class Worker:
    def __init__(self, *, refresher: Refresher, webhooks: WebhookSender) -> None:
        self.refresher = refresher
        self.webhooks = webhooks
        self.settings = refresher.settings
        self.db = refresher.db
        self._tasks: list[asyncio.Task[None]] = []

    async def sweep(self) -> dict[str, int]:
        """Refresh everything due now, batch after batch."""
        total = {"leased": 0, "refreshed": 0, "failed": 0}
        while True:
            counts = await refresh_due(
                self.refresher, batch=self.settings.worker_batch_size, concurrency=self.settings.worker_concurrency
            )
            for name, value in counts.items():
                total[name] += value
            if counts["leased"] < self.settings.worker_batch_size:
                return total

    async def clean_up(self) -> None:
        """Rows that have served their time: OAuth states, browser sessions, kept answers, sign-in attempts."""
        async with self.db.session() as session:
            await authorize.forget_expired_states(session)
            await sessions.purge_expired(session)
            await idempotency.forget_expired(session)
            await people.forget_old_attempts(session)

    async def _loop(self, name: str, interval: float, step) -> None:
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed round is logged and retried next round
                log.exception("worker round failed", loop=name)
            await asyncio.sleep(interval)

    def start(self) -> None:
        loops = [
            ("refresh", self.settings.worker_interval_seconds, self.sweep),
            ("webhooks", 2.0, self.webhooks.deliver_due),
            ("clean-up", 600.0, self.clean_up),
        ]
        self._tasks = [asyncio.get_running_loop().create_task(self._loop(n, i, s), name=f"worker-{n}") for n, i, s in loops]
        log.info("worker started", owner=self.refresher.owner)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
