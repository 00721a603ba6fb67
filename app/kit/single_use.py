"""Spending a single-use row (an OAuth state, a connect link, an invitation) exactly once.

The row is marked used with one conditional UPDATE (``WHERE id = ? AND <used> IS NULL``), so of
two requests racing with the same token, in any process, exactly one gets True.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute


async def spend(session: AsyncSession, used_at: InstrumentedAttribute[Any], row_id: Any, **also: Any) -> bool:
    """Mark the row whose ``id`` is ``row_id`` as used now (and set ``also``); True if we were first."""
    model = used_at.class_
    statement = (
        update(model)
        .where(model.id == row_id, used_at.is_(None))
        .values({used_at.key: datetime.now(UTC), **also})
    )
    result = cast(CursorResult[Any], await session.execute(statement))
    return result.rowcount == 1
