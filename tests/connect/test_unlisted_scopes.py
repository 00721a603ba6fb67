"""calls:read, recordings:read and recordings:write: in Salesmsg's PHI list, not in its scope table.

By default they are never offered on the consent screen, requested at authorize, preselected as a
default nor accepted for a personal access token (asking Salesmsg for a scope it does not know may
fail the whole authorization). ``SMC_OFFER_UNLISTED_PHI_SCOPES=true`` offers them. A grant that
holds them is PHI either way.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import select

from app.audit.audit_log import Actor
from app.connections import store
from app.core.models import AuditEntry, OAuthState
from app.main import create_app
from app.runtime import Runtime
from app.tenants import baa
from app.tenants.registry import get_tenant
from tests.support.journeys import (
    HIPAA_USER,
    PAT,
    PLAIN_USER,
    Browser,
    auth,
    make_api_key,
    make_tenant,
    make_user,
    query_of,
    sign_baa,
)

UNLISTED = ("calls:read", "recordings:read", "recordings:write")
DEFAULTS = "teams:read users:read calls:read recordings:read"


@asynccontextmanager
async def app_with(settings, upstream, **changes) -> AsyncIterator[tuple[Runtime, Browser]]:
    """The app wired to the emulator with ``changes`` to its settings, and a signed-in operator."""
    application = create_app(settings.model_copy(update={"default_scopes": DEFAULTS, **changes}), configure_logs=False)
    async with application.router.lifespan_context(application):
        runtime: Runtime = application.state.runtime
        browser = Browser(application, upstream.url)
        try:
            await make_user(runtime, "op@example.com")
            assert (await browser.login("op@example.com")).status_code == 303
            yield runtime, browser
        finally:
            await browser.close()


def offered_on(html: str) -> set[str]:
    return set(re.findall(r'name="scope" value="([^"]+)"', html))


def checked_on(html: str) -> set[str]:
    return set(re.findall(r'name="scope" value="([^"]+)"\s+checked', html))


async def test_by_default_the_consent_page_and_authorize_url_never_carry_them(connected_settings, upstream):
    async with app_with(connected_settings, upstream) as (runtime, browser):
        await make_tenant(runtime, "corner-bakery", hipaa=False)
        consent = await browser.get("/t/corner-bakery/connect")
        assert consent.status_code == 200
        offered = offered_on(consent.text)
        assert {"teams:read", "contacts:read", "call-history:read", "messages:write"} <= offered
        assert offered.isdisjoint(UNLISTED)  # neither in the OAuth form nor in the PAT form
        assert len(offered) == 62
        assert checked_on(consent.text) == {"teams:read", "users:read"}  # the unlisted defaults are dropped

        started = await browser.start_connect("corner-bakery", ["teams:read", "users:read"])
        assert started.status_code == 303
        assert query_of(started.headers["location"])["scope"] == "teams:read users:read"

        for scope in UNLISTED:  # a tampered form
            refused = await browser.start_connect("corner-bakery", ["teams:read", scope])
            assert refused.status_code == 422 and 'data-code="scope_not_offered"' in refused.text, scope
            assert "location" not in refused.headers
            assert offered_on(refused.text).isdisjoint(UNLISTED)
        async with runtime.db.session() as session:
            states = (await session.scalars(select(OAuthState.scopes))).all()
        assert states == ["teams:read users:read"]


async def test_by_default_a_pat_cannot_claim_them(connected_settings, upstream):
    async with app_with(connected_settings, upstream) as (runtime, browser):
        tenant = await make_tenant(runtime, "pat-org", hipaa=False)
        refused = await browser.post_form("/t/pat-org/connect/pat", [("token", PAT), ("scope", "teams:read"), ("scope", "calls:read")],
                                          csrf_from="/t/pat-org/connect")
        assert refused.status_code == 422 and "Not offered" in refused.text
        async with runtime.db.session() as session:
            assert await store.get_connection(session, tenant.id) is None


async def test_with_the_setting_on_they_are_offered_requested_and_granted(connected_settings, upstream):
    async with app_with(connected_settings, upstream, offer_unlisted_phi_scopes=True) as (runtime, browser):
        tenant = await make_tenant(runtime, "corner-bakery", hipaa=False)
        consent = await browser.get("/t/corner-bakery/connect")
        assert set(UNLISTED) <= offered_on(consent.text) and len(offered_on(consent.text)) == 65
        assert checked_on(consent.text) == {"teams:read", "users:read", "calls:read", "recordings:read"}

        scopes = ["teams:read", "calls:read", "recordings:read", "recordings:write"]
        started = await browser.start_connect("corner-bakery", scopes)
        assert started.status_code == 303
        assert query_of(started.headers["location"])["scope"] == "calls:read recordings:read recordings:write teams:read"
        callback = await browser.approve_at_emulator(started.headers["location"], user_id=PLAIN_USER)
        assert (await browser.follow_callback(callback)).status_code == 303
        async with runtime.db.session() as session:
            conn = await store.get_connection(session, tenant.id)
        assert conn is not None and set(conn.scopes.split()) == set(scopes)


async def test_a_grant_holding_them_is_phi_gated_and_audited(connected_settings, upstream):
    upstream.controls.set_client_baa("connect-client", True)
    async with app_with(connected_settings, upstream, offer_unlisted_phi_scopes=True) as (runtime, browser):
        await make_tenant(runtime, "acme-clinic", hipaa=True)
        consent = await browser.get("/t/acme-clinic/connect")
        for scope in UNLISTED:  # PHI: locked on a HIPAA tenant without a BAA
            assert re.search(rf'value="{scope}"[^>]*disabled', consent.text), scope
        refused = await browser.start_connect("acme-clinic", ["teams:read", "recordings:read"])
        assert refused.status_code == 403 and 'data-code="baa_required"' in refused.text

        await sign_baa(runtime, "acme-clinic")
        connected = await browser.connect("acme-clinic", ["teams:read", "calls:read", "recordings:read"], user_id=HIPAA_USER)
        assert connected.status_code == 303
        async with runtime.db.session() as session:
            tenant = await get_tenant(session, "acme-clinic")
            await baa.revoke(session, tenant, reason="test", actor=Actor.system())
        key = await make_api_key(runtime, tenants=["acme-clinic"])
        before = upstream.controls.counters()
        for path in ("calls", "recordings/9001"):
            denied = await browser.app_client.get(f"/api/v1/tenants/acme-clinic/proxy/{path}", headers=auth(key))
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "baa_required", path
        assert upstream.controls.counters() == before  # nothing reached Salesmsg
        page = await browser.get("/t/acme-clinic")
        assert re.search(r"<code>calls:read</code> <span class=\"badge phi\">PHI</span> <span class=\"badge bad\">blocked: no BAA", page.text)
        await runtime.audit_writer.flush()
        async with runtime.db.session() as session:
            rows = (await session.scalars(
                select(AuditEntry).where(AuditEntry.action == "proxy.phi_access").order_by(AuditEntry.id)
            )).all()
        assert [(r.target, r.outcome, r.details["scope"]) for r in rows] == [
            ("GET /calls", "denied", "calls:read"), ("GET /recordings/{id}", "denied", "recordings:read"),
        ]
