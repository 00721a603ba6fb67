"""The `salesmsg-connect` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from app import __version__

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="Salesmsg Connect")


@cli.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@cli.command()
def emulator(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8100,
    config: Annotated[Optional[Path], typer.Option(help="YAML or JSON config file; the built-in default when omitted")] = None,
) -> None:
    """Run the local Salesmsg emulator (OAuth2 server and Public API)."""
    from app.emulator.server import serve

    serve(host=host, port=port, config_path=config)


def main() -> None:
    cli()
