"""The demo journey with logs at DEBUG: no token, PAT, secret, API key or message body leaks anywhere."""

from __future__ import annotations

import io
import re

from sqlalchemy import text

from app.connections import store
from app.core.logs import configure_logging
from app.tenants.registry import get_tenant
from app.vault import tenant_keys
from tests.support.journeys import (
    CLIENT_SECRET,
    PASSWORD,
    PAT,
    connected_tenant,
    csrf_of,
    make_api_key,
)

BODY_API = "Lab results are ready, Ms Example (API send 7731)"
BODY_DASH = "Your appointment moved to 3pm (dashboard send 9182)"


async def _tokens(runtime, slug: str) -> list[str]:
    async with runtime.db.session() as session:
        tenant = await get_tenant(session, slug)
        conn = await store.get_connection(session, tenant.id)
        key = await tenant_keys.load_data_key(session, runtime.data_keys, tenant.id)
        found = [store.open_access_token(conn, key)]
        refresh = store.open_refresh_token(conn, key)
        return found + ([refresh] if refresh else [])


async def _rows(runtime, table: str) -> str:
    async with runtime.db.session() as session:
        return "\n".join(repr(tuple(r)) for r in (await session.execute(text(f"SELECT * FROM {table}"))).all())


async def test_no_secret_in_logs_error_pages_audit_rows_or_events(runtime, browser, client_for, upstream):
    stream = io.StringIO()
    configure_logging(level="DEBUG", json_output=True, stream=stream)
    error_pages: list[str] = []
    secrets: set[str] = {PASSWORD, CLIENT_SECRET, PAT, BODY_API, BODY_DASH}
    try:
        await connected_tenant(runtime, browser, "hygiene")
        secrets.update(await _tokens(runtime, "hygiene"))
        ok = await browser.post_form("/t/hygiene/connect/pat", [("token", PAT), ("scope", "conversations:read"), ("scope", "teams:read")],
                                     csrf_from="/t/hygiene/connect")
        assert ok.status_code == 303
        await browser.connect("hygiene", ["conversations:read", "messages:read", "messages:write", "contacts:read",
                                          "teams:read", "users:read"], user_id=301)
        secrets.update(await _tokens(runtime, "hygiene"))
        key = await make_api_key(runtime, tenants=["hygiene"])
        secrets.add(key)
        auth = {"Authorization": f"Bearer {key}"}
        conversations = await client_for.get("/api/v1/tenants/hygiene/proxy/conversations?limit=2", headers=auth)
        conversation = conversations.json()[0]["id"]
        sent = await client_for.post(f"/api/v1/tenants/hygiene/proxy/conversations/{conversation}/send", headers=auth,
                                     json={"message": BODY_API})
        assert sent.status_code == 201
        thread = await browser.get(f"/t/hygiene/conversations/{conversation}")
        form_key = re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', thread.text).group(1)
        posted = await browser.app_client.post(f"/t/hygiene/conversations/{conversation}/send",
                                               data={"csrf_token": csrf_of(thread.text), "idempotency_key": form_key, "message": BODY_DASH})
        assert posted.status_code == 303
        upstream.controls.expire_tokens(org_id=3)  # a 401 upstream: forced refresh, new tokens
        assert (await client_for.get("/api/v1/tenants/hygiene/proxy/teams", headers=auth)).status_code == 200
        secrets.update(await _tokens(runtime, "hygiene"))
        ops = await make_api_key(runtime, operator=True, name="ops")
        secrets.add(ops)
        hooked = await client_for.patch("/api/v1/tenants/hygiene", headers={"Authorization": f"Bearer {ops}"},
                                        json={"webhook_url": "http://127.0.0.1:9/hook"})
        secrets.add(hooked.json()["webhook_secret"])
        for response in [
            await client_for.get("/api/v1/tenants/hygiene/proxy/conversations", headers={"Authorization": f"Bearer {key}x"}),
            await client_for.get(f"/api/v1/tenants/hygiene/proxy/conversations?api_key={key}", headers=auth),
            await client_for.get("/api/v1/tenants/other/proxy/conversations", headers=auth),
            await browser.get(f"/oauth/callback?state=forged&code={key}"),
            await browser.app_client.post("/login", data={"csrf_token": "bad", "email": "op", "password": PASSWORD}),
            await client_for.post("/api/v1/tenants", headers={"Authorization": f"Bearer {ops}"}, json={"slug": key, "name": PASSWORD}),
        ]:
            assert response.status_code >= 400
            error_pages.append(response.text)
        await browser.post_form("/t/hygiene/disconnect", {}, csrf_from="/t/hygiene")
        await runtime.audit_writer.flush()
    finally:
        configure_logging(level="INFO", json_output=False)
    logs = stream.getvalue()
    assert logs.count("\n") > 50  # DEBUG really was on
    haystacks = {
        "logs": logs,
        "error pages": "\n".join(error_pages),
        "audit rows": await _rows(runtime, "audit_log"),
        "event payloads": await _rows(runtime, "connection_events"),
        "webhook deliveries": await _rows(runtime, "webhook_deliveries"),
    }
    assert len(secrets) >= 10
    for where, haystack in haystacks.items():
        for secret in secrets:
            if secret in haystack:
                line = next(l for l in haystack.splitlines() if secret in l)
                raise AssertionError(f"a secret ({secret[:6]}…) appears in {where}: {line[:300]}")
