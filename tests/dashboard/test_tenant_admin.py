"""The tenant page as an operator uses it: edit, delete with the typed slug, which Salesmsg org and
user were connected and by whom, the org warnings (changed, shared) and the connection history."""

from __future__ import annotations

import re
import uuid

import pytest
from sqlalchemy import func, select

from app.connections import events, store
from app.core.models import AuditEntry, Connection, ConnectionEvent, Tenant, TenantKey
from app.web.tenant_pages import connected_by_words
from tests.support.journeys import (
    HIPAA_ORG,
    HIPAA_USER,
    PLAIN_ORG,
    PLAIN_OTHER_USER,
    PLAIN_USER,
    auth,
    connected_tenant,
    csrf_of,
    make_api_key,
    make_tenant,
    make_user,
)

# No PHI scope: a plain tenant may connect any emulator org with these, HIPAA or not.
PROFILE_SCOPES = ["teams:read", "users:read", "organizations:read"]


@pytest.fixture
async def operator(runtime, browser):
    await make_user(runtime, "op@example.com")
    assert (await browser.login("op@example.com")).status_code == 303
    return browser


async def _tenant(runtime, slug: str) -> Tenant | None:
    async with runtime.db.session() as session:
        return await session.scalar(select(Tenant).where(Tenant.slug == slug))


async def _audit(runtime, action: str) -> list[AuditEntry]:
    async with runtime.db.session() as session:
        return list((await session.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.id))).all())


async def _events(runtime, tenant_id, type_: str) -> list[ConnectionEvent]:
    async with runtime.db.session() as session:
        query = select(ConnectionEvent).where(ConnectionEvent.tenant_id == tenant_id, ConnectionEvent.type == type_)
        return list((await session.scalars(query.order_by(ConnectionEvent.id))).all())


def _text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


# -- edit -------------------------------------------------------------------------------------


async def test_operator_renames_and_sets_the_webhook_and_sees_the_secret_once(runtime, operator):
    await make_tenant(runtime, "acme", name="Acme")
    answer = await operator.post_form("/t/acme/edit", {"name": "Acme  Clinic", "webhook_url": "https://hooks.example.com/smc"},
                                      csrf_from="/t/acme")
    assert answer.status_code == 200, answer.text[:300]
    secret = re.search(r'id="webhook-secret-value" type="text" readonly value="(whsec_[^"]+)"', answer.text)
    assert secret, "the new signing secret is shown on the answer"
    tenant = await _tenant(runtime, "acme")
    assert tenant.name == "Acme Clinic" and tenant.webhook_url == "https://hooks.example.com/smc"
    assert [a.target for a in await _audit(runtime, "tenant.rename")] == ["acme"]
    assert len(await _audit(runtime, "webhook.set")) == 1

    page = await operator.get("/t/acme")
    assert "Acme Clinic" in page.text and "https://hooks.example.com/smc" in page.text
    assert secret.group(1) not in page.text  # shown once only

    # saving again without touching the URL keeps the secret (no new one, no new audit row)
    again = await operator.post_form("/t/acme/edit", {"name": "Acme Clinic", "webhook_url": "https://hooks.example.com/smc"},
                                     csrf_from="/t/acme")
    assert again.status_code == 303 and again.headers["location"] == "/t/acme?notice=saved"
    assert len(await _audit(runtime, "webhook.set")) == 1

    cleared = await operator.post_form("/t/acme/edit", {"name": "Acme Clinic", "webhook_url": ""}, csrf_from="/t/acme")
    assert cleared.status_code == 303
    assert (await _tenant(runtime, "acme")).webhook_url is None
    assert len(await _audit(runtime, "webhook.clear")) == 1


@pytest.mark.parametrize(("name", "webhook_url", "message"), [
    ("", "", "A name is 1-200 printable characters."),
    ("New name", "ftp://hooks.example.com", "A webhook URL is an absolute http(s) URL without credentials."),
    ("New name", "https://user:pw@hooks.example.com/x", "A webhook URL is an absolute http(s) URL without credentials."),
])
async def test_a_bad_edit_changes_nothing_and_says_why(runtime, operator, name, webhook_url, message):
    await make_tenant(runtime, "acme", name="Acme")
    answer = await operator.post_form("/t/acme/edit", {"name": name, "webhook_url": webhook_url}, csrf_from="/t/acme")
    assert answer.status_code == 422
    assert message in answer.text and 'id="edit-tenant" open' in answer.text
    tenant = await _tenant(runtime, "acme")
    assert tenant.name == "Acme" and tenant.webhook_url is None
    assert await _audit(runtime, "tenant.rename") == [] and await _audit(runtime, "webhook.set") == []


async def test_hipaa_flag_is_changed_from_the_page_and_audited(runtime, operator):
    await make_tenant(runtime, "acme")
    page = await operator.get("/t/acme")
    # turning HIPAA off is behind an in-page confirmation, not the browser's confirm()
    assert "data-confirm" not in page.text and 'id="hipaa-off"' in page.text
    off = await operator.post_form("/t/acme/hipaa", {"hipaa": "off"}, csrf_from="/t/acme")
    assert off.status_code == 303 and off.headers["location"] == "/t/acme?notice=hipaa_off"
    assert (await _tenant(runtime, "acme")).hipaa is False
    assert [a.details for a in await _audit(runtime, "tenant.hipaa")] == [{"hipaa": False}]
    on = await operator.post_form("/t/acme/hipaa", {"hipaa": "on"}, csrf_from="/t/acme")
    assert on.status_code == 303 and (await _tenant(runtime, "acme")).hipaa is True


async def test_forms_without_the_csrf_token_are_refused_and_change_nothing(runtime, operator):
    await make_tenant(runtime, "acme", name="Acme")
    for path, data in [("/t/acme/edit", {"name": "Hijacked", "webhook_url": "https://evil.example/x"}),
                       ("/t/acme/delete", {"confirm_slug": "acme"}),
                       ("/t/acme/hipaa", {"hipaa": "off"})]:
        answer = await operator.app_client.post(path, data=data)
        assert answer.status_code == 403 and "csrf_failed" in answer.text, path
    tenant = await _tenant(runtime, "acme")
    assert tenant is not None and tenant.name == "Acme" and tenant.webhook_url is None and tenant.hipaa is True


async def test_an_org_admin_cannot_edit_or_delete_their_tenant(runtime, browser):
    tenant = await make_tenant(runtime, "acme", name="Acme")
    await make_user(runtime, "admin@acme.example", role="org_admin", tenant=tenant)
    await browser.login("admin@acme.example")
    page = await browser.get("/t/acme")
    assert page.status_code == 200 and 'action="/t/acme/delete"' not in page.text and 'action="/t/acme/edit"' not in page.text
    for path, data in [("/t/acme/edit", {"name": "Renamed"}), ("/t/acme/delete", {"confirm_slug": "acme"})]:
        answer = await browser.post_form(path, data, csrf_from="/t/acme")
        assert answer.status_code == 403 and "operator_only" in answer.text
    assert (await _tenant(runtime, "acme")).name == "Acme"


# -- delete -----------------------------------------------------------------------------------


async def test_delete_needs_the_typed_slug_and_shreds_the_tokens(runtime, operator):
    tenant = await connected_tenant(runtime, operator, "corner-bakery", scopes=PROFILE_SCOPES)
    keep = await make_tenant(runtime, "other-shop")

    for typed in ["", "corner", "other-shop", "Corner Bakery"]:
        refused = await operator.post_form("/t/corner-bakery/delete", {"confirm_slug": typed}, csrf_from="/t/corner-bakery")
        assert refused.status_code == 422, typed
        assert "Type the tenant&#39;s slug, corner-bakery, to confirm." in refused.text
        assert 'id="delete-tenant" open' in refused.text
    assert await _tenant(runtime, "corner-bakery") is not None
    assert await _audit(runtime, "tenant.delete") == []

    deleted = await operator.post_form("/t/corner-bakery/delete", {"confirm_slug": " Corner-Bakery "}, csrf_from="/t/corner-bakery")
    assert deleted.status_code == 303 and deleted.headers["location"] == "/tenants?notice=deleted"
    listing = await operator.get("/tenants?notice=deleted")
    assert "Tenant deleted." in listing.text and "/t/corner-bakery" not in listing.text
    assert (await operator.get("/t/corner-bakery")).status_code == 404
    async with runtime.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(TenantKey).where(TenantKey.tenant_id == tenant.id)) == 0
        assert await session.scalar(select(func.count()).select_from(Connection).where(Connection.tenant_id == tenant.id)) == 0
        assert await session.get(Tenant, keep.id) is not None
    assert [a.target for a in await _audit(runtime, "tenant.delete")] == ["corner-bakery"]


# -- who and which org ------------------------------------------------------------------------


async def test_the_page_names_the_salesmsg_org_and_user_and_who_connected(runtime, operator, client_for):
    tenant = await connected_tenant(runtime, operator, "corner-bakery", scopes=PROFILE_SCOPES)
    page = _text((await operator.get("/t/corner-bakery")).text)
    assert f"Salesmsg org Corner Bakery (id {PLAIN_ORG} )" in page
    assert f"Salesmsg user casey@corner-bakery.example (id {PLAIN_USER} )" in page
    assert "by op@example.com" in page
    assert "Check which Salesmsg org" not in page  # no warning on a first connect
    async with runtime.db.session() as session:
        conn = await store.get_connection(session, tenant.id)
    assert (conn.salesmsg_org, conn.salesmsg_org_id, conn.salesmsg_user_id) == ("Corner Bakery", str(PLAIN_ORG), str(PLAIN_USER))

    key = await make_api_key(runtime, tenants=["corner-bakery"])
    body = (await client_for.get("/api/v1/tenants/corner-bakery/connection", headers=auth(key))).json()
    assert body["salesmsg_org"] == "Corner Bakery" and body["salesmsg_org_id"] == str(PLAIN_ORG)
    assert body["salesmsg_user"] == "casey@corner-bakery.example" and body["salesmsg_user_id"] == str(PLAIN_USER)


async def test_a_personal_access_token_connect_reads_the_same_profile(runtime, operator):
    from tests.support.journeys import PAT, connect_pat

    tenant = await make_tenant(runtime, "corner-bakery", hipaa=False)
    await connect_pat(runtime, tenant, PAT, ["teams:read", "users:read"])
    async with runtime.db.session() as session:
        conn = await store.get_connection(session, tenant.id)
    assert (conn.salesmsg_user, conn.salesmsg_user_id) == ("casey@corner-bakery.example", str(PLAIN_USER))
    assert (conn.salesmsg_org, conn.salesmsg_org_id) == ("Corner Bakery", str(PLAIN_ORG))
    page = _text((await operator.get("/t/corner-bakery")).text)
    assert "Personal access token" in page and "by the system (no person signed in)" in page


async def test_without_the_profile_scopes_the_org_is_shown_as_unknown(runtime, operator):
    await connected_tenant(runtime, operator, "corner-bakery", scopes=["teams:read"])
    page = _text((await operator.get("/t/corner-bakery")).text)
    assert "Salesmsg org not known" in page and "Salesmsg user not known" in page


async def test_a_connect_through_a_link_names_who_sent_the_link(runtime, operator, live_app, upstream):
    from app.audit.audit_log import Actor
    from app.connections import links
    from tests.support.journeys import Browser

    tenant = await make_tenant(runtime, "corner-bakery", hipaa=False)
    async with runtime.db.session() as session:
        _, token = await links.create_connect_link(session, tenant=tenant, hours=1, actor=Actor("user", "op@example.com"))
    admin = Browser(live_app, upstream.url)
    try:
        opened = await admin.get(f"/connect/{token}")
        assert opened.status_code == 303, opened.text[:300]
        assert (await admin.connect("corner-bakery", PROFILE_SCOPES, user_id=PLAIN_USER)).status_code == 303
    finally:
        await admin.close()
    page = _text((await operator.get("/t/corner-bakery")).text)
    assert "by the admin who opened a connect link sent by op@example.com" in page
    async with runtime.db.session() as session:
        connected_by = (await store.get_connection(session, tenant.id)).connected_by
    assert connected_by not in page  # the raw actor id means nothing to a reader


def test_who_connected_is_said_in_words_never_as_a_session_id():
    conn = Connection(connected_by="9ba970039fdf09be")
    link = AuditEntry(actor_type="connect_link", actor_id="9ba970039fdf09be", details={"link_sent_by": "op@example.com"})
    assert connected_by_words(conn, link) == "the admin who opened a connect link sent by op@example.com"
    assert connected_by_words(conn, AuditEntry(actor_type="connect_link", actor_id="9ba970039fdf09be", details={})) == \
        "the admin who opened a connect link"
    assert connected_by_words(conn, None) == "the admin who opened a connect link"
    user = Connection(connected_by="op@example.com")
    assert connected_by_words(user, AuditEntry(actor_type="user", actor_id="op@example.com", details={})) == "op@example.com"
    assert connected_by_words(Connection(connected_by="system"), None) == "the system (no person signed in)"


async def test_reconnecting_as_another_salesmsg_org_warns_and_is_recorded(runtime, operator):
    tenant = await connected_tenant(runtime, operator, "corner-bakery", scopes=PROFILE_SCOPES, user_id=PLAIN_USER)
    disconnected = await operator.post_form("/t/corner-bakery/disconnect", {}, csrf_from="/t/corner-bakery")
    assert disconnected.status_code == 303
    # the org stays on the row across the disconnect, so the next connect is compared with it
    answer = await operator.connect("corner-bakery", PROFILE_SCOPES, user_id=HIPAA_USER)
    assert answer.status_code == 303  # never blocked: an operator decides

    changed = await _events(runtime, tenant.id, "org_changed")
    assert len(changed) == 1
    assert changed[0].payload["data"] == {"from": {"id": str(PLAIN_ORG), "name": "Corner Bakery"},
                                          "to": {"id": str(HIPAA_ORG), "name": "Acme Clinic"}}
    connects = await _audit(runtime, "connection.connect")
    assert connects[-1].details["org_changed"] == {"from": str(PLAIN_ORG), "to": str(HIPAA_ORG)}
    assert "org_changed" not in connects[0].details

    page = _text((await operator.get("/t/corner-bakery")).text)
    assert "Check which Salesmsg org this tenant reaches" in page
    assert f"was connected to Corner Bakery (id {PLAIN_ORG}) before" in page and f"reaches Acme Clinic (id {HIPAA_ORG})" in page
    assert f"Salesmsg org changed warning from Corner Bakery (id {PLAIN_ORG}) to Acme Clinic (id {HIPAA_ORG})" in page

    # reconnecting to the same org again: no new warning, and the banner belongs to the past connect
    again = await operator.connect("corner-bakery", PROFILE_SCOPES, user_id=HIPAA_USER)
    assert again.status_code == 303
    assert len(await _events(runtime, tenant.id, "org_changed")) == 1
    assert "Check which Salesmsg org" not in (await operator.get("/t/corner-bakery")).text


async def test_two_tenants_on_one_salesmsg_org_are_both_warned(runtime, operator):
    first = await connected_tenant(runtime, operator, "bakery-north", scopes=PROFILE_SCOPES, user_id=PLAIN_USER)
    second = await connected_tenant(runtime, operator, "bakery-south", scopes=PROFILE_SCOPES, user_id=PLAIN_OTHER_USER)
    assert await _events(runtime, first.id, "org_shared") == []
    shared = await _events(runtime, second.id, "org_shared")
    # the event (sent to the tenant's webhook, listed by its API) counts the others but names none
    assert [e.payload["data"] for e in shared] == [{"org": {"id": str(PLAIN_ORG), "name": "Corner Bakery"}, "other_tenants": 1}]
    assert (await _audit(runtime, "connection.connect"))[-1].details["org_shared"] == ["bakery-north"]

    south = await operator.get("/t/bakery-south")
    assert 'id="org-shared"' in south.text and 'href="/t/bakery-north"' in south.text
    # the operator's history row names the other tenant, from the audit row
    assert "Salesmsg org shared warning Corner Bakery (id " + str(PLAIN_ORG) + ") is also connected to bakery-north" in _text(south.text)
    north = await operator.get("/t/bakery-north")
    assert 'id="org-shared"' in north.text and 'href="/t/bakery-south"' in north.text

    # once the first lets go, neither page warns any more
    assert (await operator.post_form("/t/bakery-north/disconnect", {}, csrf_from="/t/bakery-north")).status_code == 303
    assert 'id="org-shared"' not in (await operator.get("/t/bakery-south")).text
    assert 'id="org-shared"' not in (await operator.get("/t/bakery-north")).text


async def test_an_org_admin_and_a_tenant_key_never_learn_which_other_tenant_shares_the_org(runtime, operator, live_app,
                                                                                           upstream, client_for):
    from tests.support.journeys import Browser

    await connected_tenant(runtime, operator, "bakery-north", scopes=PROFILE_SCOPES, user_id=PLAIN_USER)
    south = await connected_tenant(runtime, operator, "bakery-south", scopes=PROFILE_SCOPES, user_id=PLAIN_OTHER_USER)
    await make_user(runtime, "admin@south.example", role="org_admin", tenant=south)
    admin = Browser(live_app, upstream.url)
    try:
        assert (await admin.login("admin@south.example")).status_code == 303
        page = await admin.get("/t/bakery-south")
    finally:
        await admin.close()
    assert page.status_code == 200
    text = _text(page.text)
    assert "bakery-north" not in page.text.lower()  # neither the slug nor the name (Bakery-North)
    assert 'id="org-shared"' not in page.text
    assert "This Salesmsg org is also connected elsewhere in this gateway; your operator has been told." in text
    assert f"Salesmsg org shared warning Corner Bakery (id {PLAIN_ORG}) is also connected to another tenant" in text

    key = await make_api_key(runtime, tenants=["bakery-south"])
    listed = await client_for.get("/api/v1/tenants/bakery-south/events", headers=auth(key))
    assert listed.status_code == 200
    assert "bakery-north" not in listed.text.lower()
    shared = [e for e in listed.json()["data"] if e["type"] == "org_shared"]
    assert len(shared) == 1
    one = await client_for.get(f"/api/v1/tenants/bakery-south/events/{shared[0]['id']}", headers=auth(key))
    assert one.status_code == 200 and "bakery-north" not in one.text.lower()

    # the operator still sees who shares it
    seen = await operator.get("/t/bakery-south")
    assert 'href="/t/bakery-north"' in seen.text and "is also connected to bakery-north" in _text(seen.text)


# -- history ----------------------------------------------------------------------------------


async def test_the_connection_history_is_readable_and_pages_to_older_events(runtime, operator):
    tenant = await connected_tenant(runtime, operator, "corner-bakery", scopes=PROFILE_SCOPES)
    async with runtime.db.session() as session:
        conn = await store.get_connection(session, tenant.id)
        await events.emit(session, tenant_id=tenant.id, connection_id=conn.id, type="refresh_failed",
                          data={"reason": "upstream_503", "failures": 1})
        for n in range(20):
            await events.emit(session, tenant_id=tenant.id, connection_id=conn.id, type="refreshed",
                              data={"expires_at": None, "rotated": n % 2 == 0})
    first = await operator.get("/t/corner-bakery")
    text = _text(first.text)
    assert "Token refreshed a new access token, and Salesmsg rotated the refresh token" in text
    assert "Refresh failed" not in text  # older than the first page
    older = re.search(r'href="(/t/corner-bakery\?events_before=\d+)#events" rel="next"', first.text)
    assert older, "an 'Older events' link"
    second = await operator.get(older.group(1))
    text = _text(second.text)
    assert "Refresh failed warning upstream_503; 1 in a row" in text
    assert "Connected OAuth2, 3 scopes, through a signed-in person" in text
    assert 'rel="next"' not in second.text and "Newest events" in text
    bad = await operator.get("/t/corner-bakery?events_before=abc")
    assert bad.status_code == 422 and "Traceback" not in bad.text


async def test_the_tenants_page_offers_the_new_tenant_form_before_the_list(runtime, operator):
    await make_tenant(runtime, "acme")
    page = (await operator.get("/tenants")).text
    assert page.index('id="new-tenant"') < page.index('id="tenants-table"')
    assert 'data-slug-from="tenant-name"' in page and '<script src="/static/tenants.js" defer></script>' in page
    created = await operator.post_form("/tenants", {"name": "Bright Dental", "slug": "bright-dental", "hipaa": "off"})
    assert created.status_code == 303 and created.headers["location"] == "/t/bright-dental?notice=created"
    clash = await operator.post_form("/tenants", {"name": "Acme again", "slug": "acme"})
    assert clash.status_code == 409 and 'id="create-error"' in clash.text and 'value="Acme again"' in clash.text
    assert csrf_of(clash.text)
    assert uuid.UUID(str((await _tenant(runtime, "bright-dental")).id))
