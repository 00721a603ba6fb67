"""FastAPI dependencies shared by the pages and the JSON API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One unit of work per request: committed when the route returns, before the response."""
    runtime: Runtime = request.app.state.runtime
    async with runtime.db.session() as session:
        yield session


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
RequestIdDep = Annotated[str, Depends(request_id)]
