"""Helpers of the fault and load tests: real `serve` processes, polling, row checks, measuring.

Small on purpose: a served process that is always stopped, polling instead of sleeping, and
one check of a connection row that every fault test ends with (tokens open with the vault, the
version matches the refreshes recorded, no refresh token lost).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from sqlalchemy import select, update

from app.connections import store
from app.core.models import Connection, ConnectionEvent
from app.core.settings import Settings
from app.vault import tenant_keys
from tests.support.emulator_controls import EmulatorControls
from tests.support.journeys import CLIENT_ID, CLIENT_SECRET, auth
from tests.support.processes import Served, clean_env
from tests.support.tcp_proxy import TcpFaultProxy, free_port

T = TypeVar("T")

# The proxy's own error codes for a 5xx, as the README's proxy table and app/proxy/upstream.py document them.
OUR_5XX = {
    502: {"upstream_unavailable"},
    503: {"refresh_unavailable", "service_unavailable"},
    504: {"upstream_timeout"},
}



def proxy_url(slug: str, path: str) -> str:
    return f"/api/v1/tenants/{slug}/proxy/{path}"


def error_code(response: httpx.Response) -> str | None:
    """Our JSON error code, or None when the body is not ours (a relayed Salesmsg answer)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


def assert_documented_5xx(response: httpx.Response, *, allowed: set[int] = {502, 503, 504}) -> str:  # noqa: B006
    """A 5xx of ours: a documented status and code, a JSON body, never a stack trace."""
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    code = error_code(response)
    assert code in OUR_5XX[response.status_code], (response.status_code, response.text[:300])
    assert "Traceback" not in response.text and "sqlalchemy" not in response.text.lower()
    return code


# -- waiting ---------------------------------------------------------------------------------


def poll(check: Callable[[], T], *, timeout: float = 30, interval: float = 0.1, what: str = "condition") -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def apoll(check: Callable[[], Awaitable[T]], *, timeout: float = 30, interval: float = 0.1, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def counter_at_least(controls: EmulatorControls, name: str, value: int, *, timeout: float = 30) -> int:
    """Wait (without blocking the loop) until the emulator's counter reaches ``value``."""
    return await apoll(lambda: asyncio.to_thread(lambda: controls.counter(name) >= value and controls.counter(name)),
                       timeout=timeout, what=f"emulator counter {name} >= {value}")


async def cut_once_at_salesmsg(request: Awaitable[T], controls: EmulatorControls, counter: str, link: Any) -> T:
    """Send ``request``; once Salesmsg has it (and holds it, by the latency the test set), take
    ``link`` (a fault proxy: Salesmsg's or the database's) down, and return the answer."""
    call = asyncio.ensure_future(request)
    await counter_at_least(controls, counter, 1)
    link.down()
    return await call


async def connected_key(runtime, browser, upstream, slug: str) -> str:
    """Connect ``slug`` through the real OAuth flow; an API key for it; counters from zero."""
    from tests.support.journeys import connected_tenant, make_api_key

    await connected_tenant(runtime, browser, slug)
    key = await make_api_key(runtime, tenants=[slug])
    upstream.controls.reset_counters()
    return key


async def first_conversation(client: httpx.AsyncClient, key: str, slug: str) -> int:
    response = await client.get(proxy_url(slug, "conversations?limit=1"), headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()[0]["id"]


# -- processes -------------------------------------------------------------------------------


def serve_env(settings: Settings, *, database_url: str | None = None, api_base: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `serve` process wired to this test's database and emulator."""
    return clean_env(**{
        "SMC_DATABASE_URL": database_url or settings.database_url,
        "SMC_SALESMSG_API_BASE": api_base or settings.salesmsg_api_base,
        "SMC_SALESMSG_AUTHORIZE_URL": settings.salesmsg_authorize_url,
        "SMC_SALESMSG_CLIENT_ID": CLIENT_ID,
        "SMC_SALESMSG_CLIENT_SECRET": CLIENT_SECRET,
        "SMC_PUBLIC_URL": settings.public_url,
        "SMC_LOG_FORMAT": "json",
        "SMC_RATE_LIMIT_PER_KEY": "1000000/minute",
        "SMC_RATE_LIMIT_PER_TENANT": "1000000/minute",
        "SMC_UPSTREAM_BUDGET_PER_MINUTE": "1000000",
        **extra,  # any of the above, overridden
    })


@dataclass
class Process:
    served: Served
    base: str

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def pid(self) -> int:
        return self.served.proc.pid

    def log(self) -> str:
        return self.served.log()


@contextmanager
def serving(env: dict[str, str], log_dir: Path, *, workers: int = 1, name: str = "serve", ready: str = "/healthz",
            timeout: float = 90) -> Iterator[Process]:
    """A `salesmsg-connect serve` process; stopped (SIGTERM, then SIGKILL) however the block ends."""
    port = free_port()
    args = ["serve", "--port", str(port)] + (["--workers", str(workers)] if workers > 1 else [])
    served = Served(*args, env=env, log_path=log_dir / f"{name}-{port}.log")
    try:
        process = Process(served, f"http://127.0.0.1:{port}")
        served.wait_for(process.url(ready), timeout=timeout)
        yield process
    finally:
        served.stop()


# -- the connection row ----------------------------------------------------------------------


async def expire_everywhere(runtime, upstream, tenant_id, *, org_id: int = 3) -> None:
    """The stored access token is past its expiry here and at Salesmsg: the next call refreshes."""
    async with runtime.db.session() as session:
        await session.execute(
            update(Connection).where(Connection.tenant_id == tenant_id)
            .values(access_expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )
    upstream.controls.expire_tokens(org_id=org_id)


@dataclass
class RowCheck:
    conn: Connection
    access_token: str
    refresh_token: str | None
    events: list[str]


async def check_row(runtime, tenant_id) -> RowCheck:
    """The connection row is whole: both tokens open with the vault (a torn or mixed row does
    not), its version is 1 plus the refreshes recorded (the row and its event commit together),
    and no lease is left behind by a finished refresh."""
    async with runtime.db.session() as session:
        conn = await store.get_connection(session, tenant_id)
        assert conn is not None
        key = await tenant_keys.load_data_key(session, runtime.data_keys, tenant_id)
        events = list((await session.scalars(
            select(ConnectionEvent.type).where(ConnectionEvent.tenant_id == tenant_id).order_by(ConnectionEvent.id)
        )).all())
    access = store.open_access_token(conn, key)
    refresh = store.open_refresh_token(conn, key)
    assert conn.version == 1 + events.count("refreshed"), (conn.version, events)
    if conn.kind == "oauth":
        assert refresh, "an OAuth connection lost its refresh token"
    return RowCheck(conn, access, refresh, events)


def token_works(upstream, access_token: str) -> bool:
    """Salesmsg itself accepts the access token (not through our proxy)."""
    response = httpx.get(upstream.api_base + "/users/me", headers=auth(access_token), timeout=10, trust_env=False)
    return response.status_code == 200


# -- how a connection settles -----------------------------------------------------------------


def only_grant(upstream) -> dict:
    """The one grant of our client at the emulator's org 3 (one connect per test)."""
    grants = upstream.controls.grants(org_id=3, client_id=CLIENT_ID)
    assert len(grants) == 1, grants
    return grants[0]


async def settle(http: httpx.AsyncClient, url: str, key: str, *, timeout: float = 90) -> httpx.Response:
    """Call until the connection settles: 200 (usable) or 409 needs_reauth; 503 meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        response = await http.get(url, headers=auth(key))
        if response.status_code == 200 or (response.status_code == 409 and error_code(response) == "connection_needs_reauth"):
            return response
        assert_documented_5xx(response, allowed={503})
        assert time.monotonic() < deadline, "the connection never settled"
        await asyncio.sleep(0.25)


async def assert_settled_truthfully(runtime, upstream, tenant_id, final: httpx.Response, connection: dict, events: list[str]) -> str:
    """Usable, or flagged with an event, and in agreement with what Salesmsg did to the grant."""
    row = await check_row(runtime, tenant_id)
    grant = only_grant(upstream)
    if grant["revoked"]:
        assert final.status_code == 409, "Salesmsg revoked the grant but we still call it active"
        assert connection["needs_reauth"] and connection["status"] == "needs_reauth"
        assert connection["last_error"] == "invalid_grant"
        assert "needs_reauth" in events
        assert row.conn.lease_owner is None
        return "needs_reauth"
    assert final.status_code == 200
    assert connection["status"] == "active" and not connection["needs_reauth"]
    assert token_works(upstream, row.access_token)
    return "usable"


# -- measuring -------------------------------------------------------------------------------


class CountingProxy(TcpFaultProxy):
    """The suite's TCP fault proxy, also counting the client connections open at once."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        super().__init__(target_host, target_port, port)
        self.active = 0
        self.max_active = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await super()._handle(reader, writer)
        finally:
            self.active -= 1

    def reset_max(self) -> None:
        self.max_active = self.active


_ANSWERED = re.compile(r"token\.refresh\.(\d{3}|dropped)")


class EmulatorRefreshesInFlight:
    """Samples, at the emulator, refresh requests that arrived and are not answered yet."""

    def __init__(self, url: str, *, interval: float = 0.05) -> None:
        self.controls = EmulatorControls(url)
        self.interval = interval
        self.max_in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                counters = self.controls.counters()
            except httpx.HTTPError:
                self._stop.wait(self.interval)
                continue
            answered = sum(v for k, v in counters.items() if _ANSWERED.fullmatch(k))
            self.max_in_flight = max(self.max_in_flight, counters.get("token.refresh", 0) - answered)
            self._stop.wait(self.interval)

    def __enter__(self) -> "EmulatorRefreshesInFlight":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.controls.close()


class RefusingPostgres(TcpFaultProxy):
    """The TCP fault proxy in front of PostgreSQL, which can also answer new connections the way a
    PostgreSQL that is restarting (57P03) or full (53300) does: a FATAL ErrorResponse at startup."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        super().__init__(target_host, target_port, port)
        self.refuse_with: tuple[str, str] | None = None  # (SQLSTATE, message)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse_with is None:
            await super()._handle(reader, writer)
            return
        code, message = self.refuse_with
        try:
            while True:  # SSLRequest / GSSENCRequest get "N" (no), then the StartupMessage comes
                length = int.from_bytes(await reader.readexactly(4), "big")
                payload = await reader.readexactly(length - 4)
                if length == 8 and int.from_bytes(payload, "big") in (80877103, 80877104):
                    writer.write(b"N")
                    await writer.drain()
                    continue
                break
            fields = b"".join(kind + value.encode() + b"\0" for kind, value in
                              ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message)))
            body = fields + b"\0"
            writer.write(b"E" + (len(body) + 4).to_bytes(4, "big") + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
