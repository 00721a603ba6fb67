"""Browser tests: Debian's Chromium, driven by Playwright's async API, against the real app.

Each test gets its own stack: a loopback socket bound first (so its port is known), an emulator
whose OAuth client (BAA signed) registers ``http://127.0.0.1:<port>/oauth/callback``, the app's
settings with ``public_url`` at that port, an operator seeded in the test database, and the app
served by uvicorn on that socket in a background thread. One Chromium runs for the whole session;
every test opens fresh contexts (one per person) and closes them.

Chromium is ``/usr/bin/chromium`` (``./scripts/ensure-chromium.sh`` installs it; ``make test`` runs
it first). Playwright's own browser download is never used.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import uvicorn
from playwright.async_api import Browser, async_playwright, expect

from app.core.settings import Settings
from app.main import create_app
from app.runtime import Runtime
from salesmsg_emulator.config import EmulatorConfig
from tests.browser.pages import OPERATOR_EMAIL, Watch
from tests.support.emulator_controls import ControlledEmulator
from tests.support.journeys import CLIENT_ID, CLIENT_SECRET, emulator_config, make_user

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# Auto-waiting assertions: generous enough for a loaded CI machine, short enough to fail fast.
expect.set_options(timeout=10_000)


@pytest.fixture(scope="session")
async def chromium() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run ./scripts/ensure-chromium.sh (make test does) to install Debian's chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class ServedOnSocket:
    """The app served by uvicorn on an already-bound loopback socket, in a thread with its own loop.

    ``tests/support/served.py``'s ServedApp picks its port when it builds the app, but the app's
    settings (``public_url``, hence the OAuth redirect URI the emulator must know) need the port
    first; binding the socket up front also leaves no window for another process to take the port.
    """

    def __init__(self, settings: Settings, sock: socket.socket) -> None:
        self.sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(settings, configure_logs=False), log_config=None, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"browser-app-{self.port}", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc

    async def start(self, timeout: float = 20) -> None:
        self.thread.start()
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"the app failed to start: {self.error!r}")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the app did not start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 15)
        if self.thread.is_alive():
            self.server.force_exit = True
            await asyncio.to_thread(self.thread.join, 5)
        self.sock.close()


def _loopback_socket() -> socket.socket:
    # IPPROTO_TCP so asyncio sets TCP_NODELAY on accepted sockets (no 40 ms delayed-ACK stalls).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def browser_emulator_config(app_url: str) -> EmulatorConfig:
    """The suite's emulator (orgs, users, fast message states) with our client knowing this app's callback."""
    config = emulator_config(baa_signed=True)
    client = config.clients[0].model_copy(update={"redirect_uris": [f"{app_url}/oauth/callback"]})
    return config.model_copy(update={"clients": [client]})


@dataclass
class Stack:
    url: str
    settings: Settings
    emulator: ControlledEmulator


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    sock = _loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    emulator = await asyncio.to_thread(ControlledEmulator(browser_emulator_config(url)).start)
    try:
        app_settings = settings.model_copy(update={
            "public_url": url,
            "salesmsg_api_base": emulator.api_base,
            "salesmsg_authorize_url": emulator.authorize_url,
            "salesmsg_client_id": CLIENT_ID,
            "salesmsg_client_secret": CLIENT_SECRET,
        })
        runtime = await Runtime.start(app_settings)
        try:
            await make_user(runtime, OPERATOR_EMAIL, role="operator")
        finally:
            await runtime.stop()
        served = ServedOnSocket(app_settings, sock)
        await served.start()
        try:
            yield Stack(url=url, settings=app_settings, emulator=emulator)
        finally:
            await served.stop()
    finally:
        sock.close()
        await asyncio.to_thread(emulator.stop)


@pytest.fixture
async def open_context(chromium: Browser, stack: Stack):
    """``await open_context(width)``: a fresh browser context (a person) with a Watch on it; all closed after."""
    opened: list = []

    async def _open(width: int = 1440, height: int = 900) -> Watch:
        context = await chromium.new_context(base_url=stack.url, viewport={"width": width, "height": height},
                                             device_scale_factor=1, locale="en-US", timezone_id="UTC")
        context.set_default_timeout(15_000)
        context.set_default_navigation_timeout(20_000)
        watch = await Watch.attach(context)
        opened.append(context)
        return watch

    yield _open
    for context in opened:
        await context.close()
