"""The `salesmsg-connect` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from app import __version__
from app.cli.admin import api_key_cli, audit_cli, keys_cli, tenant_cli, user_cli
from app.cli.environment import fail, load_settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="Salesmsg Connect")
db_cli = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
cli.add_typer(db_cli, name="db")


cli.add_typer(tenant_cli, name="tenant")
cli.add_typer(user_cli, name="user")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(audit_cli, name="audit")
cli.add_typer(api_key_cli, name="api-key")


@cli.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
    migrate: Annotated[bool, typer.Option(help="Upgrade the database to head before serving")] = False,
) -> None:
    """Serve the app with uvicorn (uvloop, httptools with bounded request heads)."""
    settings = load_settings()
    if migrate:
        from app.core.migrate import upgrade

        upgrade(settings.database_url)
    if settings.is_sqlite and workers > 1:
        fail("SQLite serves one process; use PostgreSQL for several workers")
    import uvicorn

    from app.core.http_server import uvicorn_options

    uvicorn.run(
        "app.main:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        **uvicorn_options(settings),
    )


@db_cli.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision")] = "head") -> None:
    """Upgrade the schema (default: to head)."""
    from app.core.migrate import upgrade

    settings = load_settings(check_secure=False)
    upgrade(settings.database_url, revision)
    typer.echo(f"database at {revision}")


@db_cli.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base")]) -> None:
    """Downgrade the schema."""
    from app.core.migrate import downgrade

    settings = load_settings(check_secure=False)
    downgrade(settings.database_url, revision)
    typer.echo(f"database at {revision}")


@db_cli.command("current")
def db_current() -> None:
    """Print the schema revision of the database and the head of this code."""
    import asyncio

    from app.core.db import create_engine
    from app.core.migrate import current_revision, head_revision

    settings = load_settings(check_secure=False)

    async def _current() -> str | None:
        engine = create_engine(settings)
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    typer.echo(f"current: {asyncio.run(_current())}\nhead: {head_revision()}")


@cli.command()
def worker() -> None:
    """Run the background worker alone: proactive refresh, webhook deliveries, clean-up."""
    import asyncio
    import signal

    from app.core import tracing
    from app.core.logs import configure_logging
    from app.runtime import Runtime

    settings = load_settings()
    traced = tracing.start(settings)  # the refresh sweep's spans, when an OTLP endpoint is configured
    configure_logging(level=settings.log_level, json_output=settings.log_format == "json" or (settings.log_format == "auto" and settings.is_production),
                      trace_ids=traced)

    async def main() -> None:
        runtime = await Runtime.start(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runtime.start_worker()
        try:
            await stop.wait()
        finally:
            await runtime.stop()
            await tracing.flush_soon()

    asyncio.run(main())


@cli.command()
def demo(
    port: Annotated[int, typer.Option(help="Port of the app")] = 8000,
    emulator_port: Annotated[int, typer.Option(help="Port of the Salesmsg emulator")] = 8100,
) -> None:
    """Run the demo: the app, the emulator and the worker on 127.0.0.1, seeded (fresh each run)."""
    from app.cli.demo import run_demo

    run_demo(port=port, emulator_port=emulator_port)


@cli.command()
def emulator(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8100,
    config: Annotated[Optional[Path], typer.Option(help="YAML or JSON config file; the built-in default when omitted")] = None,
) -> None:
    """Run the local Salesmsg emulator (OAuth2 server and Public API)."""
    from salesmsg_emulator.server import serve as serve_emulator

    serve_emulator(host=host, port=port, config_path=config)




def main() -> None:
    cli()
