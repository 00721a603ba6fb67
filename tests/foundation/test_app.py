"""The app's edges: probes, the error contract, security headers, request ids."""

from __future__ import annotations

import pytest
from fastapi import APIRouter

from app.core.settings import Settings
from app.main import create_app


async def test_healthz_answers_ok(client):
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_ok_when_the_database_is_migrated_to_head(client):
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"]["database"] == "ok"


async def test_readyz_is_503_when_the_database_is_unreachable(settings):
    broken = settings.model_copy(
        update={"database_url": "postgresql+asyncpg://nobody@127.0.0.1:9/none"}
    )
    app = create_app(broken, configure_logs=False)
    import httpx

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            ready = await client.get("/readyz")
            alive = await client.get("/healthz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "unreachable"
    assert alive.status_code == 200


async def test_readyz_is_503_when_the_schema_is_behind(settings, tmp_path):
    empty = settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{tmp_path}/empty.db"})
    app = create_app(empty, configure_logs=False)
    import httpx

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["migrations"] == "behind"


async def test_api_errors_are_json_with_a_stable_code(client):
    response = await client.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": {"code": "not_found", "message": "Nothing was found here."}}


async def test_browser_errors_are_an_html_page(client):
    response = await client.get("/no-such-page")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "Not found" in response.text
    assert response.headers["x-request-id"] in response.text


@pytest.fixture
async def crashing_client(settings):
    """An app with one route that fails unexpectedly, as a bug would."""
    import httpx

    app = create_app(settings, configure_logs=False)
    router = APIRouter()

    @router.get("/api/v1/boom")
    async def boom_api():
        raise RuntimeError("secret internals: password=hunter2")

    @router.get("/boom")
    async def boom_page():
        raise RuntimeError("secret internals: password=hunter2")

    app.include_router(router)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


async def test_unexpected_errors_are_500_without_internals(crashing_client):
    api = await crashing_client.get("/api/v1/boom")
    page = await crashing_client.get("/boom")
    assert api.status_code == 500
    assert api.json()["error"]["code"] == "internal_error"
    assert page.status_code == 500
    for response in (api, page):
        assert "hunter2" not in response.text
        assert "Traceback" not in response.text
        assert "RuntimeError" not in response.text
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_security_headers_on_every_response(client):
    for path in ("/healthz", "/no-such-page", "/api/v1/nothing"):
        response = await client.get(path)
        csp = response.headers["content-security-policy"]
        assert "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "strict-transport-security" not in response.headers


async def test_hsts_when_served_over_https(settings):
    import httpx

    app = create_app(settings.model_copy(update={"public_url": "https://connect.example.com"}), configure_logs=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://t") as client:
            response = await client.get("/healthz")
    assert response.headers["strict-transport-security"].startswith("max-age=")


async def test_request_id_is_kept_when_safe_and_replaced_when_not(client):
    kept = await client.get("/healthz", headers={"X-Request-ID": "abc-123_DEF.456"})
    assert kept.headers["x-request-id"] == "abc-123_DEF.456"
    forged = await client.get("/healthz", headers={"X-Request-ID": "bad id <script> with spaces"})
    assert forged.headers["x-request-id"] != "bad id <script> with spaces"
    assert len(forged.headers["x-request-id"]) == 16
    fresh = await client.get("/healthz")
    assert fresh.headers["x-request-id"] != (await client.get("/healthz")).headers["x-request-id"]


def test_settings_are_not_built_at_import_time(monkeypatch):
    monkeypatch.setenv("SMC_ENV", "production")
    import importlib

    import app.main

    importlib.reload(app.main)  # importing must not read or check the environment
    with pytest.raises(Exception) as info:
        app.main.create_app(Settings(_env_file=None))
    assert "SMC_SESSION_SECRET" in str(info.value)


def test_only_an_unavailable_database_is_a_503_not_a_bad_query_that_names_a_connection():
    from sqlalchemy.exc import (
        DBAPIError,
        IntegrityError,
        InterfaceError,
        OperationalError,
    )
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from app.core.errors import is_database_unavailable

    class DriverError(Exception):
        def __init__(self, message: str, sqlstate: str | None = None) -> None:
            super().__init__(message)
            self.sqlstate = sqlstate

    def dbapi(kind, message, sqlstate=None):
        return kind("SELECT 1", None, DriverError(message, sqlstate))

    assert is_database_unavailable(dbapi(DBAPIError, "the database system is starting up", "57P03"))
    assert is_database_unavailable(dbapi(DBAPIError, "sorry, too many clients already", "53300"))
    assert is_database_unavailable(dbapi(DBAPIError, "terminating connection due to administrator command", "57P01"))
    assert is_database_unavailable(dbapi(InterfaceError, "connection is closed"))
    assert is_database_unavailable(dbapi(OperationalError, "database is locked"))
    assert is_database_unavailable(ConnectionRefusedError())
    assert is_database_unavailable(PoolTimeout("QueuePool limit of size 10 overflow 10 reached"))
    dup = 'duplicate key value violates unique constraint "uq_connections_tenant_id"'
    assert not is_database_unavailable(dbapi(IntegrityError, dup, "23505"))
    assert not is_database_unavailable(dbapi(IntegrityError, "connection_id may not be null"))
    assert not is_database_unavailable(dbapi(DBAPIError, 'relation "connections" does not exist', "42P01"))
    assert not is_database_unavailable(ValueError("connect"))
