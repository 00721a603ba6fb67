"""Build and run the emulator.

- ``create_emulator_app(config)``: the ASGI app (Starlette), state on ``app.state.emulator``.
- ``serve(host, port, config_path)``: run it in the foreground with uvicorn (the CLI).
- ``EmulatorServer``: run it on a loopback port in a background thread, for tests and the demo::

      with EmulatorServer(load_config(None)) as emulator:
          httpx.get(emulator.api_base + "/conversations", headers=...)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from salesmsg_emulator import api, controls, oauth
from salesmsg_emulator.api.guard import API_PREFIX, error_response
from salesmsg_emulator.config import (
    ConfigError,
    EmulatorConfig,
    default_config,
    load_config,
)
from salesmsg_emulator.middleware import EmulatorMiddleware, is_api_path
from salesmsg_emulator.runtime import Emulator

logger = logging.getLogger("salesmsg_emulator")


async def _index(request: Request) -> Response:
    return JSONResponse({"service": "Salesmsg emulator", "api_base": API_PREFIX, "authorize": "/auth/oauth",
                         "health": "/_emulator/health"})  # fmt: skip


async def _http_error(request: Request, exc: Exception) -> Response:
    """404/405 of the router: JSON (or the HTML page with ``html_errors``) for the API, plain text elsewhere."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    message = "Not Found" if exc.status_code == 404 else str(exc.detail)
    if is_api_path(path):
        return error_response(request.app.state.emulator, exc.status_code, {"message": message}, exc.headers)
    if path.startswith(API_PREFIX) or path.startswith("/_emulator"):
        return JSONResponse({"message": message}, exc.status_code, exc.headers)
    return PlainTextResponse(message, exc.status_code, exc.headers)


def create_emulator_app(config: EmulatorConfig | None = None) -> Starlette:
    """The emulator as an ASGI app, with fresh state from ``config`` (the built-in default when None)."""
    emulator = Emulator(config or default_config())
    routes = [Route("/", _index, methods=["GET"]), *oauth.routes(), *api.routes(), *controls.routes()]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(EmulatorMiddleware, emulator=emulator, routes=routes)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.emulator = emulator
    return app


def serve(host: str = "127.0.0.1", port: int = 8100, config_path: Path | None = None) -> None:
    """Run the emulator in the foreground until interrupted (``salesmsg-connect emulator``)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    logger.setLevel(logging.INFO)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_emulator_app(config)
    base = f"http://{host}:{port}"
    logger.info("Salesmsg emulator at %s (API %s%s, authorize %s/auth/oauth)", base, base, API_PREFIX, base)
    logger.info("OAuth client id(s): %s; controls %s; config %s", ", ".join(c.client_id for c in config.clients),
                "on" if config.controls_enabled else "off", config_path or "built-in default")  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=config.keepalive_seconds)


class EmulatorServer:
    """The emulator on a loopback port, served by uvicorn in a background thread with its own event loop.

    ``port=0`` picks a free port. ``start()`` returns when the server answers;
    ``stop()`` shuts it down and joins the thread. Usable as a context manager.
    """

    def __init__(self, config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or default_config()
        self.host = host
        self._requested_port = port
        self.app = create_emulator_app(self.config)
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def emulator(self) -> Emulator:
        """The running instance's state (in-process access, for debugging)."""
        emulator: Emulator = self.app.state.emulator
        return emulator

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator was never started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return self.url + API_PREFIX

    @property
    def authorize_url(self) -> str:
        return self.url + "/auth/oauth"

    @property
    def token_url(self) -> str:
        return self.url + oauth.TOKEN_PATH

    @property
    def refresh_url(self) -> str:
        return self.url + oauth.REFRESH_PATH

    @property
    def pat_refresh_url(self) -> str:
        return self.url + oauth.PAT_REFRESH_PATH

    def start(self, timeout: float = 10.0) -> EmulatorServer:
        if self._thread is not None:
            raise RuntimeError("already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when it is set,
        # and without it every response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self._socket = sock
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, log_level=None, access_log=False, lifespan="on",
                                loop="asyncio", timeout_graceful_shutdown=2,
                                timeout_keep_alive=self.config.keepalive_seconds)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"salesmsg-emulator-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the emulator failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the emulator did not start in time")
            time.sleep(0.01)
        return self

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as exc:  # reported by start(); a thread must not die silently
            self._error = exc

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._thread = None
        self._server = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
