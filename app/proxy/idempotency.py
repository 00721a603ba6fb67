"""``Idempotency-Key`` on POST: the first answer is kept per tenant and key for 24 hours.

- The first request inserts a ``pending`` record (a unique constraint decides who is first,
  across every process), calls Salesmsg, and stores the answer sealed under the tenant's data
  key (a message send's answer holds message text).
- A repeat with the same key and the same request gets the stored answer without a call to
  Salesmsg; with a different request it gets 422.
- A concurrent duplicate waits for the first to finish, then gets its answer, or 409 if it takes
  too long. If Salesmsg was never reached (connection refused), the record is dropped so the
  client may retry; if the outcome is unknown (timeout), the 504 is what is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.db import Database
from app.core.errors import Refusal
from app.core.logs import get_logger
from app.core.models import IdempotencyRecord
from app.proxy.upstream import SENDING, Answer
from app.vault.envelope import DataKey

log = get_logger(__name__)
KEY = re.compile(r"[\x21-\x7e]{1,255}")
_WAIT_SECONDS = 0.05


class IdempotencyError(Refusal):
    """The key was used for another request (422), or its first request is still running (409)."""


@dataclass(frozen=True, slots=True)
class Stored:
    status: int
    content_type: str | None
    body: bytes

    def answer(self) -> Answer:
        """The kept answer, marked as a replay."""
        headers = [(b"idempotent-replayed", b"true")]
        if self.content_type:
            headers.append((b"content-type", self.content_type.encode()))
        return Answer(self.status, headers, self.body, True)


def valid_key(value: str) -> bool:
    return bool(KEY.fullmatch(value))


def fingerprint(method: str, path: str, query: bytes, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _owner(key: str) -> str:
    return f"idempotency:{key}"


class Idempotency:
    def __init__(self, db: Database, *, ttl: timedelta, wait_seconds: float) -> None:
        self.db = db
        self.ttl = ttl
        self.wait_seconds = wait_seconds
        self._pending: set[asyncio.Future[None]] = set()

    async def begin(self, *, tenant_id: uuid.UUID, key: str, fp: str, data_key: DataKey) -> Stored | None:
        """None when this request goes first (and must call ``finish``); else the stored answer."""
        now = datetime.now(UTC)
        deadline = asyncio.get_running_loop().time() + self.wait_seconds
        while True:
            async with self.db.session() as session:
                insert = pg_insert if self.db.is_postgres else sqlite_insert
                await session.execute(
                    delete(IdempotencyRecord).where(
                        IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key,
                        IdempotencyRecord.expires_at <= now,
                    )
                )
                statement = (
                    insert(IdempotencyRecord)
                    .values(tenant_id=tenant_id, key=key, fingerprint=fp, state="pending", created_at=now, expires_at=now + self.ttl)
                    .on_conflict_do_nothing(index_elements=["tenant_id", "key"])
                    .returning(IdempotencyRecord.id)
                )
                if (await session.execute(statement)).first() is not None:
                    return None
                record = await session.scalar(
                    select(IdempotencyRecord).where(IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key)
                )
            if record is None:
                continue  # expired and removed meanwhile: try again
            if record.fingerprint != fp:
                raise IdempotencyError(422, "idempotency_key_reused", "This Idempotency-Key was used for a different request.")
            if record.state == "completed" and record.body_ct is not None and record.status_code is not None:
                body = data_key.open(record.body_ct, owner=_owner(key), field="response_body")
                return Stored(record.status_code, record.content_type, body)
            if asyncio.get_running_loop().time() > deadline:
                raise IdempotencyError(409, "idempotency_request_in_progress",
                                       "A request with this Idempotency-Key is still in progress; retry shortly.")
            await asyncio.sleep(_WAIT_SECONDS)

    async def finish(self, *, tenant_id: uuid.UUID, key: str, data_key: DataKey, status: int, content_type: str | None, body: bytes) -> None:
        async with self.db.session() as session:
            await session.execute(
                update(IdempotencyRecord)
                .where(IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key, IdempotencyRecord.state == "pending")
                .values(state="completed", status_code=status, content_type=content_type,
                        body_ct=data_key.seal(body, owner=_owner(key), field="response_body"))
                .execution_options(synchronize_session=False)
            )

    async def once(
        self, *, tenant_id: uuid.UUID, key: str, fp: str, data_key: DataKey, call: Callable[[], Awaitable[Answer]]
    ) -> tuple[Answer, bool]:
        """The answer for this key: the kept one and True on a repeat, else ``call()``'s and False."""
        stored = await self.begin(tenant_id=tenant_id, key=key, fp=fp, data_key=data_key)
        if stored is not None:
            return stored.answer(), True
        return await self.run(tenant_id=tenant_id, key=key, data_key=data_key, call=call), False

    async def run(self, *, tenant_id: uuid.UUID, key: str, data_key: DataKey, call: Callable[[], Awaitable[Answer]]) -> Answer:
        """Having gone first (``begin`` returned None): call Salesmsg and keep the answer.

        An error before anything was sent (a refused refresh, say) frees the key, and so does a
        call cancelled before it started sending (waiting in the budget's queue); a call cancelled
        later keeps it pending, since the send may have happened.
        """
        sending = SENDING.set(False)
        try:
            answer = await call()
        except asyncio.CancelledError:
            if not SENDING.get():  # cancelled while it waited (the budget's queue): nothing was sent
                await asyncio.shield(self.abandon(tenant_id=tenant_id, key=key))
            raise
        except Exception:
            await self.abandon(tenant_id=tenant_id, key=key)
            raise
        finally:
            SENDING.reset(sending)
        if not answer.reached or answer.status == 429:
            # Never sent, or refused by Salesmsg's rate limit before it handled anything: the
            # client may retry with the same key.
            await self.abandon(tenant_id=tenant_id, key=key)
            return answer
        try:
            await self.finish(tenant_id=tenant_id, key=key, data_key=data_key, status=answer.status,
                              content_type=answer.content_type, body=answer.body)
        except Exception:  # noqa: BLE001 - the database is away; Salesmsg's answer still stands
            log.warning("idempotent answer not stored yet; retrying in the background")
            self._later(self._finish_later(tenant_id=tenant_id, key=key, data_key=data_key, answer=answer))
        return answer

    def _later(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish_later(self, *, tenant_id: uuid.UUID, key: str, data_key: DataKey, answer: Answer) -> None:
        """Keep trying to store an answer Salesmsg gave while the database was away (for ~5 min)."""
        delay = 0.5
        for _ in range(40):
            await asyncio.sleep(delay)
            try:
                await self.finish(tenant_id=tenant_id, key=key, data_key=data_key, status=answer.status,
                                  content_type=answer.content_type, body=answer.body)
                return
            except Exception:  # noqa: BLE001 - still away
                delay = min(delay * 2, 10.0)
        log.error("idempotent answer could not be stored; the key stays pending until it expires")

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()

    async def abandon(self, *, tenant_id: uuid.UUID, key: str) -> None:
        """Salesmsg was never reached: forget the key so the client can retry safely."""
        async with self.db.session() as session:
            await session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key, IdempotencyRecord.state == "pending"
                )
            )


async def forget_expired(session: AsyncSession) -> None:
    """Kept answers live ``SMC_IDEMPOTENCY_TTL_HOURS``; the worker drops them after that."""
    await session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at < datetime.now(UTC)))
