"""Our app served by uvicorn on a loopback port in a background thread (its own event loop)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import uvicorn

from app.core.http_server import uvicorn_options
from app.core.settings import Settings
from app.main import create_app
from tests.support.tcp_proxy import free_port


class ServedApp:
    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.app = create_app(settings, configure_logs=False)
        # the server settings `salesmsg-connect serve` uses (bounded heads, keep-alive), on asyncio
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, lifespan="on", **uvicorn_options(settings))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServedApp":
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError("the app did not start")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
