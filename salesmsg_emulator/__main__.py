"""``python -m salesmsg_emulator --host 127.0.0.1 --port 8100 --config FILE``: run the emulator."""

from __future__ import annotations

import argparse
from pathlib import Path

from salesmsg_emulator.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m salesmsg_emulator", description="Run the Salesmsg emulator.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8100, help="port to bind (default 8100)")
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON config; built-in default if omitted")
    args = parser.parse_args(argv)
    serve(host=args.host, port=args.port, config_path=args.config)


if __name__ == "__main__":
    main()
