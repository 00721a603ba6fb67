"""Browser sessions: cookie flags, idle timeout, absolute lifetime, connect links spent once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import update

from app.core.models import WebSession
from app.main import create_app
from tests.support.journeys import PASSWORD, csrf_of, make_user


def _set_cookie_header(response: httpx.Response, name: str) -> str:
    return next(v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith(name + "="))


async def test_cookie_is_httponly_and_samesite_lax(runtime, browser):
    await make_user(runtime, "op@example.com")
    answer = await browser.login("op@example.com")
    cookie = _set_cookie_header(answer, "smc_session").lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie


async def test_under_https_the_cookie_is_secure_and_host_prefixed(settings):
    app = create_app(settings.model_copy(update={"public_url": "https://connect.example.com"}), configure_logs=False)
    async with app.router.lifespan_context(app):
        from tests.support.journeys import make_user as mk

        await mk(app.state.runtime, "op@example.com")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://connect.example.com") as client:
            page = await client.get("/login")
            assert "__Host-smc_csrf=" in page.headers["set-cookie"] and "secure" in page.headers["set-cookie"].lower()
            answer = await client.post("/login", data={"csrf_token": csrf_of(page.text), "email": "op@example.com", "password": PASSWORD})
            cookie = _set_cookie_header(answer, "__Host-smc_session").lower()
    assert "secure" in cookie and "httponly" in cookie and "domain" not in cookie
    assert "strict-transport-security" in answer.headers


async def test_sessions_end_after_idle_time_and_absolute_lifetime(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    assert (await browser.get("/tenants")).status_code == 200
    idle = runtime.settings.session_idle_minutes
    async with runtime.db.session() as session:
        await session.execute(update(WebSession).values(last_seen_at=datetime.now(UTC) - timedelta(minutes=idle + 1)))
    gone = await browser.get("/tenants")
    assert gone.status_code == 303 and gone.headers["location"].startswith("/login")
    await browser.login("op@example.com")
    async with runtime.db.session() as session:
        await session.execute(update(WebSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert (await browser.get("/tenants")).status_code == 303


async def test_activity_keeps_a_session_alive(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    idle = runtime.settings.session_idle_minutes
    async with runtime.db.session() as session:
        await session.execute(update(WebSession).values(last_seen_at=datetime.now(UTC) - timedelta(minutes=idle - 1)))
    assert (await browser.get("/tenants")).status_code == 200  # touched: the idle clock restarts
    assert (await browser.get("/tenants")).status_code == 200
