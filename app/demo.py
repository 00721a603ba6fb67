"""`make demo`: the SQLite default, migrated, served on 127.0.0.1."""

from __future__ import annotations

import os

import typer

from app.migrate import upgrade
from app.settings import Settings


def run_demo(*, port: int = 8000) -> None:
    os.environ.setdefault("SMC_PUBLIC_URL", f"http://127.0.0.1:{port}")
    settings = Settings()
    if settings.is_production:
        raise typer.BadParameter("the demo runs in development only (unset SMC_ENV)")
    upgrade(settings.database_url)
    typer.echo(f"Salesmsg Connect demo: {settings.public_url}/")
    from app.cli import _run_uvicorn

    _run_uvicorn(host="127.0.0.1", port=port, workers=1)
