"""The dashboard's conversation, thread, send and contacts pages against the emulator."""

from __future__ import annotations

import re

import httpx
import pytest
from sqlalchemy import func, select, update

from app.audit.audit_log import Actor
from app.connections import transitions
from app.core.models import AuditEntry, Connection
from tests.support.journeys import (
    HIPAA_USER,
    PLAIN_OTHER_USER,
    PLAIN_USER,
    Browser,
    connected_tenant,
    csrf_of,
    make_tenant,
    make_user,
)


@pytest.fixture
async def bakery(runtime, browser):
    return await connected_tenant(runtime, browser, "corner-bakery")


def conversation_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'href="/t/corner-bakery/conversations/(\d+)"', html)]


async def test_operator_lists_filters_searches_and_pages_conversations(runtime, browser, bakery):
    page = await browser.get("/t/corner-bakery/conversations")
    assert page.status_code == 200
    open_ids = conversation_ids(page.text)
    assert open_ids
    closed = await browser.get("/t/corner-bakery/conversations?filter=closed")
    assert closed.status_code == 200 and set(conversation_ids(closed.text)).isdisjoint(open_ids)
    for name in ("unread", "assigned", "unassigned"):
        assert (await browser.get(f"/t/corner-bakery/conversations?filter={name}")).status_code == 200
    bad = await browser.get("/t/corner-bakery/conversations?filter=all;drop")
    assert bad.status_code == 422
    first = re.search(r'<strong>([^<]+)</strong>', page.text.split('id="conversation-list"')[1]).group(1)
    found = await browser.get(f"/t/corner-bakery/conversations?q={first.split()[0]}")
    assert first in found.text


async def test_thread_send_and_double_submit_sends_once(runtime, browser, bakery, upstream):
    conversation = conversation_ids((await browser.get("/t/corner-bakery/conversations")).text)[0]
    thread = await browser.get(f"/t/corner-bakery/conversations/{conversation}")
    assert thread.status_code == 200 and 'id="send-form"' in thread.text
    form_key = re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', thread.text).group(1)
    form = {"csrf_token": csrf_of(thread.text), "idempotency_key": form_key, "message": "See you at 9, Casey"}
    url = f"/t/corner-bakery/conversations/{conversation}/send"
    first = await browser.app_client.post(url, data=form)
    second = await browser.app_client.post(url, data=form)  # the same rendered form, submitted twice
    assert first.status_code == second.status_code == 303
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 1
    after = await browser.get(first.headers["location"])
    assert after.text.count("See you at 9, Casey") == 1 and "Message sent." in after.text
    # sent through the connection, which acts as the member who connected it: shown by name
    assert re.search(r'<div class="msg outbound" id="latest">See you at 9, Casey<span class="meta"><span class="sender">Casey Placeholder'
                     r'</span> · [^<]+<span class="badge warn">(queued|sent)</span>', after.text)


async def test_long_or_empty_messages_are_refused_and_the_text_kept(runtime, browser, bakery, upstream):
    conversation = conversation_ids((await browser.get("/t/corner-bakery/conversations")).text)[0]
    thread = await browser.get(f"/t/corner-bakery/conversations/{conversation}")
    key = re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', thread.text).group(1)
    text = "x" * 1601
    answer = await browser.app_client.post(f"/t/corner-bakery/conversations/{conversation}/send",
                                           data={"csrf_token": csrf_of(thread.text), "idempotency_key": key, "message": text})
    assert answer.status_code == 422 and "at most 1600 characters" in answer.text and text in answer.text
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 0


async def test_upstream_script_is_rendered_as_text(runtime, browser, bakery, upstream):
    conversation = conversation_ids((await browser.get("/t/corner-bakery/conversations")).text)[0]
    upstream.controls.inject_inbound(conversation, "<script>alert(1)</script>")
    thread = await browser.get(f"/t/corner-bakery/conversations/{conversation}")
    assert "<script>alert(1)</script>" not in thread.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in thread.text
    listing = await browser.get("/t/corner-bakery/conversations?filter=unread")
    assert "<script>alert(1)</script>" not in listing.text


async def test_with_salesmsg_failing_every_page_shows_a_banner_and_no_500(runtime, browser, bakery, upstream):
    conversation = conversation_ids((await browser.get("/t/corner-bakery/conversations")).text)[0]
    upstream.controls.fail_next(10_000, status=500, path_prefix="/pub/v2.2/")
    try:
        for path in ("/t/corner-bakery/conversations", f"/t/corner-bakery/conversations/{conversation}",
                     "/t/corner-bakery/contacts", "/t/corner-bakery", "/tenants"):
            page = await browser.get(path)
            assert page.status_code < 500, path
            if "/conversations" in path or "/contacts" in path:
                assert 'id="problem-banner"' in page.text and "Salesmsg" in page.text, path
        upstream.controls.reset_faults()
        upstream.controls.drop_next(10_000, path_prefix="/pub/v2.2/")
        page = await browser.get("/t/corner-bakery/conversations")
        assert page.status_code == 200 and 'id="problem-banner"' in page.text
    finally:
        upstream.controls.reset_faults()


async def test_needs_reauth_shows_a_reconnect_call_to_action(runtime, browser, bakery):
    async with runtime.db.session() as session:
        await session.execute(update(Connection).where(Connection.tenant_id == bakery.id).values(status="needs_reauth"))
    page = await browser.get("/t/corner-bakery/conversations")
    assert page.status_code == 200
    assert "connection needs to be made again" in page.text and 'href="/t/corner-bakery/connect"' in page.text
    overview = await browser.get("/t/corner-bakery")
    assert "Reconnect" in overview.text


async def test_hipaa_without_baa_is_locked_with_no_data_and_audited(runtime, browser, upstream):
    upstream.controls.set_client_baa("connect-client", True)
    await connected_tenant(runtime, browser, "acme-clinic", hipaa=True, baa=True, user_id=HIPAA_USER)
    open_page = await browser.get("/t/acme-clinic/conversations")
    assert 'id="conversation-list"' in open_page.text
    await browser.post_form("/t/acme-clinic/baa/revoke", {"confirm": "yes"}, csrf_from="/t/acme-clinic")
    before = upstream.controls.counters()
    for path in ("/t/acme-clinic/conversations", "/t/acme-clinic/contacts", "/t/acme-clinic/conversations/5001"):
        page = await browser.get(path)
        assert page.status_code == 200 and "Protected health information is locked" in page.text
        assert 'id="conversation-list"' not in page.text and 'id="thread"' not in page.text
    after = upstream.controls.counters()
    assert {k: v for k, v in after.items() if k.startswith("api.")} == {k: v for k, v in before.items() if k.startswith("api.")}
    async with runtime.db.session() as session:
        outcomes = (await session.scalars(
            select(AuditEntry.outcome).where(AuditEntry.action == "dashboard.phi_access").order_by(AuditEntry.id)
        )).all()
    assert outcomes[0] == "success" and outcomes[-3:] == ["denied", "denied", "denied"]


async def test_org_admin_sees_only_their_own_tenant(runtime, live_app, upstream, browser):
    bakery = await connected_tenant(runtime, browser, "corner-bakery")
    await connected_tenant(runtime, browser, "other-org", user_id=PLAIN_USER)
    await make_user(runtime, "admin@bakery.example", role="org_admin", tenant=bakery)
    admin = Browser(live_app, upstream.url)
    try:
        assert (await admin.login("admin@bakery.example")).headers["location"] == "/"
        assert (await admin.get("/")).headers["location"] == "/org"
        assert (await admin.get("/org")).headers["location"] == "/t/corner-bakery"
        assert (await admin.get("/t/corner-bakery/conversations")).status_code == 200
        assert (await admin.get("/t/corner-bakery/contacts")).status_code == 200
        for path in ("/t/other-org", "/t/other-org/conversations", "/t/other-org/contacts", "/t/other-org/connect"):
            assert (await admin.get(path)).status_code == 404, path
        assert (await admin.get("/tenants")).status_code == 403
        assert (await admin.get("/audit")).status_code == 403
        page = await admin.get("/t/corner-bakery")
        assert 'id="baa"' not in page.text and 'id="api-keys"' not in page.text
    finally:
        await admin.close()


async def test_contacts_page_lists_and_searches(runtime, browser, bakery, upstream):
    upstream.controls.reset_counters()
    page = await browser.get("/t/corner-bakery/contacts")
    assert page.status_code == 200 and page.text.count("<tr>") > 5
    name = re.search(r"<td>([A-Z][a-z]+ [A-Za-z]+)</td>", page.text).group(1)
    found = await browser.get(f"/t/corner-bakery/contacts?search={name.split()[0]}")
    assert name in found.text
    others = set(CONTACT_NAME.findall(page.text)) - set(CONTACT_NAME.findall(found.text))
    assert others  # the search narrowed the list
    # listed through the current endpoint, not the deprecated GET /contacts
    assert upstream.controls.counter("api.POST /contacts/list") == 2 and upstream.controls.counter("api.GET /contacts") == 0


async def test_contacts_page_pages(runtime, browser, bakery, upstream):
    first = await browser.get("/t/corner-bakery/contacts")
    assert 'rel="next"' not in first.text  # 12 contacts, 20 a page
    upstream.controls.reset_counters()
    second = await browser.get("/t/corner-bakery/contacts?page=2")
    assert second.status_code == 200 and not CONTACT_NAME.findall(second.text) and "No contacts" in second.text


async def test_contacts_page_works_for_a_grant_salesmsg_refuses_the_listing_for(runtime, browser, upstream):
    """Public v2.3 clients tag POST /contacts/list contacts:write: a contacts:read grant is listed
    through GET /contacts at once, without a refused call spending Salesmsg's budget."""
    upstream.controls.update_settings(contacts_list_scope="contacts:write")
    await connected_tenant(runtime, browser, "corner-bakery", scopes=["contacts:read", "conversations:read", "users:read"])
    upstream.controls.reset_counters()
    page = await browser.get("/t/corner-bakery/contacts")
    assert page.status_code == 200 and 'id="problem-banner"' not in page.text
    assert len(CONTACT_NAME.findall(page.text)) == 12
    assert upstream.controls.counter("api.POST /contacts/list") == 0 and upstream.controls.counter("api.GET /contacts.200") == 1


async def test_a_listing_salesmsg_refuses_for_scope_falls_back_to_the_deprecated_endpoint(runtime, browser, bakery, upstream):
    upstream.controls.reset_counters()
    upstream.controls.fail_next(1, status=403, path_prefix="/pub/v2.2/contacts/list",
                                body={"error": "insufficient_scope", "message": "The access token does not have the required scope."})
    page = await browser.get("/t/corner-bakery/contacts")
    assert page.status_code == 200 and 'id="problem-banner"' not in page.text
    assert len(CONTACT_NAME.findall(page.text)) == 12
    assert upstream.controls.counter("api.POST /contacts/list.403") == 1 and upstream.controls.counter("api.GET /contacts.200") == 1


THREAD_ENTRY = re.compile(r'<div class="msg (outbound|inbound)"[^>]*>([^<]*)<span class="meta"><span class="sender">([^<]+)</span>')
CONTACT_NAME = re.compile(r"<tr>\s*<td>([^<]+)</td>")


async def test_the_thread_names_who_sent_each_message(runtime, browser, bakery, upstream):
    conversation = conversation_ids((await browser.get("/t/corner-bakery/conversations")).text)[0]
    # another member of the org answers from Salesmsg's own app, then the contact writes back
    token = upstream.controls.issue_pat(PLAIN_OTHER_USER, ["messages:write"])
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        sent = await http.post(f"{upstream.api_base}/conversations/{conversation}/send",
                               headers={"Authorization": f"Bearer {token}"}, json={"message": "Drew here, from the app"})
    assert sent.status_code == 201, sent.text
    upstream.controls.inject_inbound(conversation, "Thanks Drew")
    thread = await browser.get(f"/t/corner-bakery/conversations/{conversation}")
    contact = re.search(r"<h2>([^<]+)</h2>", thread.text).group(1)
    entries = THREAD_ENTRY.findall(thread.text)
    assert entries[-2:] == [("outbound", "Drew here, from the app", "Drew Sample"), ("inbound", "Thanks Drew", contact)]
    assert {sender for side, _, sender in entries if side == "inbound"} == {contact}


async def test_seeded_threads_show_each_member_and_automations(runtime, browser, bakery, upstream):
    ids: set[int] = set()
    for name in ("open", "closed"):
        ids |= set(conversation_ids((await browser.get(f"/t/corner-bakery/conversations?filter={name}")).text))
    outbound: set[str] = set()
    for conversation in sorted(ids):
        page = await browser.get(f"/t/corner-bakery/conversations/{conversation}")
        outbound |= {sender for side, _, sender in THREAD_ENTRY.findall(page.text) if side == "outbound"}
    # messages carry no direction: the side and the name come from user, automated and the times
    assert {"Casey Placeholder", "Drew Sample", "Automated"} <= outbound
    assert "You" not in outbound and "Contact" not in outbound


def shows_only_the_not_connected_state(html: str, slug: str) -> bool:
    return (html.count('id="not-connected"') == 1 and f'href="/t/{slug}/connect"' in html and "is not connected" in html
            and 'role="search"' not in html and 'class="card' not in html and 'id="problem-banner"' not in html
            and 'id="phi-locked"' not in html)


async def test_not_connected_tenant_pages_invite_to_connect(runtime, browser, upstream):
    await make_tenant(runtime, "fresh", hipaa=False)
    await make_user(runtime, "op2@example.com")
    await browser.login("op2@example.com")
    before = upstream.controls.counters()
    for path in ("/t/fresh/conversations", "/t/fresh/contacts", "/t/fresh/conversations/5001"):
        page = await browser.get(path)
        assert page.status_code == 200 and shows_only_the_not_connected_state(page.text, "fresh"), path
        assert "ask your operator" not in page.text  # an operator is the one to connect it
    assert {k: v for k, v in upstream.controls.counters().items() if k.startswith("api.")} == \
        {k: v for k, v in before.items() if k.startswith("api.")}


async def test_a_disconnected_tenant_shows_the_same_state_to_its_org_admin(runtime, live_app, upstream, browser, bakery):
    async with runtime.db.session() as session:
        await transitions.disconnected(session, tenant=bakery, actor=Actor.system())
    async with runtime.db.session() as session:
        assert (await session.scalar(select(Connection.status).where(Connection.tenant_id == bakery.id))) == "disconnected"
    await make_user(runtime, "admin@bakery.example", role="org_admin", tenant=bakery)
    admin = Browser(live_app, upstream.url)
    try:
        await admin.login("admin@bakery.example")
        for path in ("/t/corner-bakery/conversations", "/t/corner-bakery/contacts"):
            page = await admin.get(path)
            assert page.status_code == 200 and shows_only_the_not_connected_state(page.text, "corner-bakery"), path
            assert "ask your operator" in page.text
    finally:
        await admin.close()


async def test_error_pages_keep_the_navigation_of_who_is_signed_in(runtime, live_app, upstream, browser, bakery):
    await make_user(runtime, "admin@bakery.example", role="org_admin", tenant=bakery)
    admin = Browser(live_app, upstream.url)
    anonymous = Browser(live_app, upstream.url)
    try:
        await admin.login("admin@bakery.example")
        for path in ("/t/no-such-org/conversations", "/no/such/page", "/tenants"):
            page = await admin.get(path)
            assert page.status_code in (403, 404), path
            assert 'role="alert"' in page.text and '<nav aria-label="Main">' in page.text, path
            assert '<a href="/org">My organization</a>' in page.text and 'href="/audit"' not in page.text, path
            assert "admin@bakery.example" in page.text and 'action="/logout"' in page.text, path
        operator_page = await browser.get("/t/no-such-org")
        assert operator_page.status_code == 404 and '<a href="/audit">Audit log</a>' in operator_page.text
        bad_query = await browser.get("/t/corner-bakery/conversations?filter=everything")
        assert bad_query.status_code == 422 and '<a href="/audit">Audit log</a>' in bad_query.text
        nobody = await anonymous.get("/no/such/page")
        assert nobody.status_code == 404 and '<nav aria-label="Main">' not in nobody.text
        assert (await admin.get("/api/v1/tenants")).headers["content-type"].startswith("application/json")
    finally:
        await admin.close()
        await anonymous.close()


async def test_a_locked_send_is_refused_with_one_audit_row(runtime, browser, upstream):
    upstream.controls.set_client_baa("connect-client", True)
    await connected_tenant(runtime, browser, "acme-clinic", hipaa=True, baa=True, user_id=HIPAA_USER)
    listing = await browser.get("/t/acme-clinic/conversations")
    conversation = int(re.search(r'href="/t/acme-clinic/conversations/(\d+)"', listing.text).group(1))
    thread = await browser.get(f"/t/acme-clinic/conversations/{conversation}")
    form = {"csrf_token": csrf_of(thread.text), "message": "hello",
            "idempotency_key": re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', thread.text).group(1)}
    await browser.post_form("/t/acme-clinic/baa/revoke", {"confirm": "yes"}, csrf_from="/t/acme-clinic")
    async with runtime.db.session() as session:
        last = await session.scalar(select(func.max(AuditEntry.id)))
    answer = await browser.app_client.post(f"/t/acme-clinic/conversations/{conversation}/send", data=form)
    assert answer.status_code == 403 and "Protected health information is locked" in answer.text
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 0
    async with runtime.db.session() as session:
        written = (await session.scalars(select(AuditEntry).where(AuditEntry.id > last))).all()
    assert [(e.action, e.outcome, e.target, e.details) for e in written] == [
        ("dashboard.phi_access", "denied", "POST /conversations/{id}/send", {"decision": "baa_required"})]
