"""What every command needs: settings from the environment, a runtime, and clean failures.

A command fails with one line on stderr and a non-zero exit, never a traceback: wrong settings
exit 2, an ``AppError`` (no such tenant, a weak password) exits 1 with its stable code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError

from app.audit.audit_log import Actor
from app.core.errors import AppError
from app.core.settings import InsecureSettingsError, Settings
from app.runtime import Runtime

T = TypeVar("T")

CLI_ACTOR = Actor("cli", "cli")


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings(*, check_secure: bool = True) -> Settings:
    """Settings from the environment; a clear message (not a traceback) when they are wrong."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SMC_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        fail(f"invalid settings: {problems}", 2)
    if check_secure:
        try:
            settings.check_secure()
        except InsecureSettingsError as exc:
            fail(str(exc))
    return settings


@asynccontextmanager
async def cli_runtime() -> AsyncIterator[Runtime]:
    runtime = await Runtime.start(load_settings(check_secure=False))
    try:
        yield runtime
    finally:
        await runtime.stop()


def run(fn: Callable[[Runtime], Awaitable[T]]) -> T:
    """Run one async command against the configured database; AppErrors become clean exits."""

    async def main() -> T:
        async with cli_runtime() as runtime:
            return await fn(runtime)

    try:
        return asyncio.run(main())
    except AppError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None


def emit(data: Any, as_json: bool, text: str) -> None:
    """``data`` as JSON with ``--json``, else the human line."""
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else text)
