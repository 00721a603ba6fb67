"""Connect links and invitations that survive mail scanners: opening spends nothing, a completed
connection (or an accepted invitation) does; operators list, revoke and re-issue them."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from app.audit.audit_log import Actor
from app.connections import links, store, transitions
from app.core.errors import Gone, ValidationFailed
from app.core.models import AuditEntry, ConnectLink, Invitation, User, WebSession
from app.identity import invitations, sessions
from app.kit.tokens import token_hash
from tests.security.test_attacks import table_counts
from tests.support.journeys import (
    PAT,
    PLAIN_USER,
    Browser,
    auth,
    csrf_of,
    make_api_key,
    make_tenant,
    make_user,
)

BASIC = ["teams:read", "users:read"]
ORIGIN = "http://127.0.0.1:8000"
LINK = re.compile(r'value="http://127\.0\.0\.1:8000(/connect/smc_link_[^"]+)"')
INVITE = re.compile(r'value="http://127\.0\.0\.1:8000(/invite/smc_inv_[^"]+)"')


@pytest.fixture
async def operator(runtime, browser):
    await make_user(runtime, "op@example.com")
    assert (await browser.login("op@example.com")).status_code == 303
    return browser


@pytest.fixture
async def people(live_app, upstream):
    """``await people()``: another browser (a scanner, an org admin), each with its own cookies."""
    opened: list[Browser] = []

    async def _open() -> Browser:
        person = Browser(live_app, upstream.url)
        opened.append(person)
        return person

    yield _open
    for person in opened:
        await person.close()


async def _new_link(operator: Browser, slug: str) -> str:
    shown = await operator.post_form(f"/t/{slug}/connect-links", {}, csrf_from=f"/t/{slug}/links")
    assert shown.status_code == 200, shown.text
    assert f'href="/t/{slug}/links"' in shown.text  # the shown-once page leads back to the list
    return LINK.search(shown.text).group(1)


async def _link(runtime, path: str) -> ConnectLink:
    async with runtime.db.session() as session:
        return await session.scalar(select(ConnectLink).where(ConnectLink.token_hash == token_hash(path.rsplit("/", 1)[1])))


async def _connection(runtime, tenant_id):
    async with runtime.db.session() as session:
        return await store.get_connection(session, tenant_id)


async def _actions(runtime, prefix: str) -> list[tuple[str, dict]]:
    async with runtime.db.session() as session:
        rows = await session.scalars(select(AuditEntry).where(AuditEntry.action.like(prefix + "%")).order_by(AuditEntry.id))
        return [(row.action, row.details) for row in rows]


async def _link_sessions(runtime, link_id) -> int:
    async with runtime.db.session() as session:
        return await session.scalar(select(func.count()).select_from(WebSession).where(WebSession.link_id == link_id))


def _refused(answer, status: int, code: str) -> None:
    assert answer.status_code == status, (answer.status_code, answer.text[:500])
    assert code in answer.text
    assert "for a new link" in answer.text  # tells the person what to do


async def test_a_scanner_opens_the_link_first_and_the_person_connects_later(runtime, operator, people, upstream):
    tenant = await make_tenant(runtime, "scanned", hipaa=False)
    path = await _new_link(operator, "scanned")

    scanner = await people()
    opened = await scanner.get(path)
    assert opened.status_code == 303 and opened.headers["location"] == "/t/scanned/connect"
    assert (await scanner.get("/t/scanned/connect")).status_code == 200  # a preview renders the consent page
    link = await _link(runtime, path)
    assert link.used_at is None and link.open_count == 1 and link.first_opened_at is not None

    person = await people()
    assert (await person.get(path)).status_code == 303
    answer = await person.connect("scanned", BASIC, user_id=PLAIN_USER)
    assert answer.status_code == 303 and answer.headers["location"] == "/t/scanned/connected"
    assert (await person.get("/t/scanned/connected")).status_code == 200
    conn = await _connection(runtime, tenant.id)
    assert conn.status == "active" and set(conn.scopes.split()) == set(BASIC)

    link = await _link(runtime, path)
    assert link.used_at is not None and link.open_count == 2 and link.first_opened_at < link.used_at
    assert [a for a, _ in await _actions(runtime, "connect_link.")] == [
        "connect_link.create", "connect_link.open", "connect_link.open", "connect_link.use"]
    assert [d["open_count"] for a, d in await _actions(runtime, "connect_link.open")] == [1, 2]

    # Spent: the link opens for nobody any more, and the scanner's session cannot use it either.
    _refused(await (await people()).get(path), 410, "connect_link_used")
    _refused(await scanner.get("/t/scanned/connect"), 410, "connect_link_used")
    # The operator's list says so.
    listing = await operator.get("/t/scanned/links")
    assert listing.status_code == 200
    assert re.search(r'data-state="used"', listing.text) and "opened 2 times" in listing.text


async def test_a_second_completion_through_the_link_is_refused_and_changes_nothing(runtime, operator, people, upstream):
    tenant = await make_tenant(runtime, "twice", hipaa=False)
    path = await _new_link(operator, "twice")
    first, second = await people(), await people()
    for person in (first, second):
        assert (await person.get(path)).status_code == 303
    started_first = await first.start_connect("twice", BASIC)
    started_second = await second.start_connect("twice", BASIC)
    assert started_first.status_code == started_second.status_code == 303
    callback_first = await first.approve_at_emulator(started_first.headers["location"], user_id=PLAIN_USER)
    callback_second = await second.approve_at_emulator(started_second.headers["location"], user_id=PLAIN_USER)

    assert (await first.follow_callback(callback_first)).status_code == 303
    version = (await _connection(runtime, tenant.id)).version
    _refused(await second.follow_callback(callback_second), 410, "connect_link_used")
    assert (await _connection(runtime, tenant.id)).version == version
    assert upstream.controls.counter("token.authorization_code") == 1  # refused before the code was exchanged
    # The person who connected still sees the result; the other browser no longer reaches the consent page.
    assert (await first.get("/t/twice/connected")).status_code == 200
    _refused(await second.get("/t/twice/connect"), 410, "connect_link_used")
    assert len([a for a, _ in await _actions(runtime, "connect_link.use")]) == 1


async def test_a_personal_access_token_through_the_link_spends_it_too(runtime, operator, people, upstream):
    tenant = await make_tenant(runtime, "pat-link", hipaa=False)
    path = await _new_link(operator, "pat-link")
    person, other = await people(), await people()
    for browser in (person, other):
        assert (await browser.get(path)).status_code == 303
    other_csrf = csrf_of((await other.get("/t/pat-link/connect")).text)  # the other browser has the form open too
    form = [("token", PAT), ("scope", "conversations:read"), ("scope", "teams:read")]
    answer = await person.post_form("/t/pat-link/connect/pat", form, csrf_from="/t/pat-link/connect")
    assert answer.status_code == 303 and answer.headers["location"] == "/t/pat-link/connected"
    assert (await _connection(runtime, tenant.id)).kind == "pat"
    assert (await _link(runtime, path)).used_at is not None
    version = (await _connection(runtime, tenant.id)).version

    refused = await other.app_client.post("/t/pat-link/connect/pat", data={"csrf_token": other_csrf, "token": PAT,
                                                                           "scope": "teams:read"})
    _refused(refused, 410, "connect_link_used")
    assert (await _connection(runtime, tenant.id)).version == version


async def test_spending_a_link_twice_is_refused_in_the_same_transaction(runtime):
    """The race the page check cannot see: the second spend raises, so its connection rolls back."""
    tenant = await make_tenant(runtime, "raced", hipaa=False)
    async with runtime.db.session() as session:
        link, _ = await links.create_connect_link(session, tenant=tenant, hours=1, actor=Actor.system())
        rows = [WebSession(id=f"s{i}" * 8, link_tenant_id=tenant.id, link_id=link.id, csrf_token="c",
                           expires_at=datetime.now(UTC) + timedelta(hours=1)) for i in range(2)]
        session.add_all(rows)
    async with runtime.db.session() as session:
        one, two = [await session.get(WebSession, row.id) for row in rows]
        assert (await links.spend_for_session(session, one)).id == link.id
        assert one.link_id == link.id  # the browser that connected stays tied to the (now spent) link
    with pytest.raises(Gone) as refused:
        async with runtime.db.session() as session:
            tenant_row = await session.get(type(tenant), tenant.id)
            tenant_row.name = "written by the losing connection"
            two = await session.get(WebSession, rows[1].id)
            await links.spend_for_session(session, two)
    assert refused.value.code == "connect_link_used"
    async with runtime.db.session() as session:
        assert (await session.get(type(tenant), tenant.id)).name != "written by the losing connection"


async def test_the_browser_that_connected_through_a_link_keeps_only_the_connected_page(runtime, operator, people, upstream):
    """A spent link gives its browser the "connected" page and nothing else: no consent page, no new
    authorization, no PAT, even after the operator disconnects (the link cannot be revoked any more)."""
    tenant = await make_tenant(runtime, "kept", hipaa=False)
    path = await _new_link(operator, "kept")
    person = await people()
    assert (await person.get(path)).status_code == 303
    spare = await person.start_connect("kept", BASIC)  # a second authorization, started before the first completes
    assert spare.status_code == 303
    assert (await person.connect("kept", BASIC, user_id=PLAIN_USER)).status_code == 303
    link = await _link(runtime, path)
    assert link.used_at is not None and await _link_sessions(runtime, link.id) == 1
    page = await person.get("/t/kept/connected")
    assert page.status_code == 200
    token = csrf_of(page.text)
    version = (await _connection(runtime, tenant.id)).version

    _refused(await person.get("/t/kept/connect"), 410, "connect_link_used")
    started = await person.app_client.post("/t/kept/connect", data={"csrf_token": token, "scope": BASIC})
    _refused(started, 410, "connect_link_used")
    exchanged = upstream.controls.counter("token.authorization_code")
    callback = await person.approve_at_emulator(spare.headers["location"], user_id=PLAIN_USER)
    _refused(await person.follow_callback(callback), 410, "connect_link_used")
    assert upstream.controls.counter("token.authorization_code") == exchanged  # refused before the code was exchanged
    assert (await _connection(runtime, tenant.id)).version == version

    # The operator disconnects: the browser cannot connect the tenant again with a token of its own.
    assert (await operator.post_form("/t/kept/disconnect", {}, csrf_from="/t/kept")).status_code == 303
    disconnected = await _connection(runtime, tenant.id)
    answer = await person.app_client.post("/t/kept/connect/pat", data={"csrf_token": token, "token": PAT,
                                                                      "scope": "teams:read"})
    _refused(answer, 410, "connect_link_used")
    after = await _connection(runtime, tenant.id)
    assert (after.status, after.version, after.kind) == (disconnected.status, disconnected.version, disconnected.kind)
    assert (await person.get("/t/kept/connected")).status_code == 200
    assert len(await _actions(runtime, "connect_link.use")) == 1


async def test_a_link_session_that_names_no_link_is_refused(runtime, people, upstream):
    """A connect-link session whose link is forgotten (link_id NULL, from before links were kept) has no rights."""
    tenant = await make_tenant(runtime, "orphan", hipaa=False)
    async with runtime.db.session() as session:
        cookie, row = await sessions.start(session, runtime.settings, link_tenant_id=tenant.id)
    person = await people()
    person.app_client.cookies.set(sessions.session_cookie_name(runtime.settings), cookie)
    for url in ("/t/orphan/connect", "/t/orphan/connected"):
        _refused(await person.get(url), 410, "connect_link_used")
    for url, form in (("/t/orphan/connect", {"scope": BASIC}), ("/t/orphan/connect/pat", {"token": PAT, "scope": "teams:read"})):
        _refused(await person.app_client.post(url, data={"csrf_token": row.csrf_token, **form}), 410, "connect_link_used")
    assert await _connection(runtime, tenant.id) is None
    assert upstream.controls.counter("token.authorization_code") == 0


async def test_concurrent_callbacks_through_one_link_connect_once(runtime, operator, people, upstream, requires_postgres,
                                                                 monkeypatch):
    """Two browsers of one link finish at once with no connection yet: one connects, the other is
    refused cleanly (never a 500 from the second insert)."""
    tenant = await make_tenant(runtime, "racing", hipaa=False)
    path = await _new_link(operator, "racing")
    browsers, callbacks = [await people(), await people()], []
    for person in browsers:
        assert (await person.get(path)).status_code == 303
        started = await person.start_connect("racing", BASIC)
        assert started.status_code == 303
        callbacks.append(await person.approve_at_emulator(started.headers["location"], user_id=PLAIN_USER))

    # The worst interleaving, every time: both callbacks find no connection before either writes one.
    both_looked = asyncio.Barrier(2)
    looked_up = transitions.get_connection

    async def look_together(session, tenant_id):
        found = await looked_up(session, tenant_id)
        async with asyncio.timeout(10):
            await both_looked.wait()
        return found

    monkeypatch.setattr(transitions, "get_connection", look_together)
    answers = await asyncio.gather(*(person.follow_callback(url) for person, url in zip(browsers, callbacks, strict=True)))
    monkeypatch.undo()
    assert sorted(a.status_code for a in answers) == [303, 410], [(a.status_code, a.text[:300]) for a in answers]
    winner = next(a for a in answers if a.status_code == 303)
    assert winner.headers["location"] == "/t/racing/connected"
    _refused(next(a for a in answers if a.status_code == 410), 410, "connect_link_used")
    conn = await _connection(runtime, tenant.id)
    assert conn.status == "active" and conn.version == 1
    assert len(await _actions(runtime, "connect_link.use")) == 1
    # The link is spent for both browsers.
    for person in browsers:
        _refused(await person.get("/t/racing/connect"), 410, "connect_link_used")


async def test_a_revoked_link_is_refused_and_its_sessions_end(runtime, operator, people, upstream):
    tenant = await make_tenant(runtime, "revoked", hipaa=False)
    path = await _new_link(operator, "revoked")
    person = await people()
    assert (await person.get(path)).status_code == 303
    started = await person.start_connect("revoked", BASIC)
    assert started.status_code == 303
    link = await _link(runtime, path)
    assert await _link_sessions(runtime, link.id) == 1

    page = await operator.get("/t/revoked/links")
    assert f"/t/revoked/connect-links/{link.id}/revoke" in page.text
    done = await operator.app_client.post(f"/t/revoked/connect-links/{link.id}/revoke", data={"csrf_token": csrf_of(page.text)})
    assert done.status_code == 303 and done.headers["location"] == "/t/revoked/links?notice=link_revoked"
    listing = await operator.get(done.headers["location"])
    assert "Connect link revoked" in listing.text and 'data-state="revoked"' in listing.text

    assert await _link_sessions(runtime, link.id) == 0
    consent = await person.get("/t/revoked/connect")
    assert consent.status_code == 303 and consent.headers["location"].startswith("/login")  # the session ended
    callback = await person.approve_at_emulator(started.headers["location"], user_id=PLAIN_USER)
    assert 400 <= (await person.follow_callback(callback)).status_code < 500
    assert await _connection(runtime, tenant.id) is None
    assert upstream.controls.counter("token.authorization_code") == 0
    _refused(await (await people()).get(path), 410, "connect_link_revoked")
    assert [d["link"] for _, d in await _actions(runtime, "connect_link.revoke")] == [str(link.id)]

    # Revoking again changes nothing and writes no second audit row.
    again = await operator.post_form(f"/t/revoked/connect-links/{link.id}/revoke", {}, csrf_from="/t/revoked/links")
    assert again.status_code == 303
    assert len(await _actions(runtime, "connect_link.revoke")) == 1


async def test_an_expired_link_is_refused_even_to_a_browser_that_opened_it(runtime, operator, people, upstream):
    tenant = await make_tenant(runtime, "expired", hipaa=False)
    path = await _new_link(operator, "expired")
    person = await people()
    assert (await person.get(path)).status_code == 303
    started = await person.start_connect("expired", BASIC)
    link = await _link(runtime, path)
    async with runtime.db.session() as session:
        await session.execute(update(ConnectLink).where(ConnectLink.id == link.id)
                              .values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))

    _refused(await (await people()).get(path), 410, "connect_link_expired")
    _refused(await person.get("/t/expired/connect"), 410, "connect_link_expired")
    callback = await person.approve_at_emulator(started.headers["location"], user_id=PLAIN_USER)
    _refused(await person.follow_callback(callback), 410, "connect_link_expired")
    assert await _connection(runtime, tenant.id) is None
    assert 'data-state="expired"' in (await operator.get("/t/expired/links")).text


async def test_a_link_that_is_not_ours_is_404(runtime, people):
    visitor = await people()
    for path in ("/connect/smc_link_" + "x" * 43, "/connect/nothing", "/connect/" + "smc_link_" + "y" * 300):
        answer = await visitor.get(path)
        assert answer.status_code == 404 and "connect_link_invalid" in answer.text, path
        assert "smc_session" not in answer.headers.get("set-cookie", "")


async def test_reissue_gives_a_working_link_and_refuses_the_old_one(runtime, operator, people, upstream):
    tenant = await make_tenant(runtime, "again", hipaa=False)
    old_path = await _new_link(operator, "again")
    scanner = await people()
    assert (await scanner.get(old_path)).status_code == 303
    old = await _link(runtime, old_path)

    shown = await operator.post_form(f"/t/again/connect-links/{old.id}/reissue", {}, csrf_from="/t/again/links")
    assert shown.status_code == 200 and "New connect link" in shown.text and 'href="/t/again/links"' in shown.text
    new_path = LINK.search(shown.text).group(1)
    assert new_path != old_path

    _refused(await (await people()).get(old_path), 410, "connect_link_revoked")
    assert await _link_sessions(runtime, old.id) == 0  # re-issuing revoked the old link's sessions too
    assert (await scanner.get("/t/again/connect")).headers["location"].startswith("/login")
    person = await people()
    assert (await person.get(new_path)).status_code == 303
    assert (await person.connect("again", BASIC, user_id=PLAIN_USER)).status_code == 303
    assert (await _connection(runtime, tenant.id)).status == "active"
    reissued = await _actions(runtime, "connect_link.reissue")
    assert len(reissued) == 1 and reissued[0][1]["replaces"] == str(old.id) and reissued[0][1]["revoked"] is True


async def test_revoking_a_used_link_is_refused_with_a_message(runtime, operator, people, upstream):
    await make_tenant(runtime, "usedup", hipaa=False)
    path = await _new_link(operator, "usedup")
    person = await people()
    await person.get(path)
    assert (await person.connect("usedup", BASIC, user_id=PLAIN_USER)).status_code == 303
    link = await _link(runtime, path)
    answer = await operator.post_form(f"/t/usedup/connect-links/{link.id}/revoke", {}, csrf_from="/t/usedup/links")
    assert answer.status_code == 409 and "already used" in answer.text and "connect_link_used" in answer.text
    assert (await _link(runtime, path)).revoked_at is None


async def test_the_links_page_is_for_operators_only(runtime, operator, people):
    tenant = await make_tenant(runtime, "private", hipaa=False)
    path = await _new_link(operator, "private")
    await make_user(runtime, "admin@private.example", role="org_admin", tenant=tenant)
    admin = await people()
    await admin.login("admin@private.example")
    assert (await admin.get("/t/private/links")).status_code in (403, 404)
    link = await _link(runtime, path)
    token = csrf_of((await admin.get("/t/private")).text)
    refused = await admin.app_client.post(f"/t/private/connect-links/{link.id}/revoke", data={"csrf_token": token})
    assert refused.status_code in (403, 404)
    visitor = await people()
    await visitor.get(path)
    assert (await visitor.get("/t/private/links")).status_code in (303, 403, 404)
    assert (await _link(runtime, path)).revoked_at is None


async def test_missing_csrf_is_refused_and_changes_nothing(runtime, operator):
    tenant = await make_tenant(runtime, "guarded", hipaa=False)
    path = await _new_link(operator, "guarded")
    link = await _link(runtime, path)
    async with runtime.db.session() as session:
        invitation, _ = await invitations.invite(session, role="org_admin", tenant=tenant, email="x@guarded.example",
                                                 hours=1, actor=Actor.system())
    before = await table_counts(runtime)
    for url in (f"/t/guarded/connect-links/{link.id}/revoke", f"/t/guarded/connect-links/{link.id}/reissue",
                "/t/guarded/connect-links", "/t/guarded/invitations", f"/invitations/{invitation.id}/revoke",
                f"/invitations/{invitation.id}/reissue"):
        answer = await operator.app_client.post(url, data={"email": "y@guarded.example", "back": "/t/guarded/links"})
        assert answer.status_code == 403 and "csrf_failed" in answer.text, url
    assert await table_counts(runtime) == before
    assert (await _link(runtime, path)).revoked_at is None


async def test_bad_ids_are_4xx_and_change_nothing(runtime, operator):
    await make_tenant(runtime, "other-org", hipaa=False)
    await make_tenant(runtime, "mine", hipaa=False)
    foreign = await _link(runtime, await _new_link(operator, "other-org"))
    before = await table_counts(runtime)
    token = csrf_of((await operator.get("/t/mine/links")).text)
    for url, status in ((f"/t/mine/connect-links/{foreign.id}/revoke", 404), (f"/t/mine/connect-links/{foreign.id}/reissue", 404),
                        ("/t/mine/connect-links/not-a-uuid/revoke", 422), ("/invitations/not-a-uuid/revoke", 422),
                        ("/invitations/00000000-0000-0000-0000-000000000000/reissue", 404)):
        answer = await operator.app_client.post(url, data={"csrf_token": token})
        assert answer.status_code == status, (url, answer.status_code)
    assert await table_counts(runtime) == before


async def test_the_api_lists_revokes_and_reissues_links(runtime, client_for, people):
    await make_tenant(runtime, "api-org", hipaa=False)
    await make_tenant(runtime, "elsewhere", hipaa=False)
    key = await make_api_key(runtime, tenants=["api-org"])
    created = await client_for.post("/api/v1/tenants/api-org/connect-links", headers=auth(key))
    assert created.status_code == 201
    first = created.json()
    scanner = await people()
    assert (await scanner.get(first["url"].removeprefix(ORIGIN))).status_code == 303

    listed = await client_for.get("/api/v1/tenants/api-org/connect-links", headers=auth(key))
    assert listed.status_code == 200
    [row] = listed.json()["data"]
    assert row["id"] == first["id"] and row["state"] == "opened" and row["open_count"] == 1 and row["first_opened_at"]
    assert "url" not in row and "smc_link_" not in listed.text

    revoked = await client_for.post(f"/api/v1/tenants/api-org/connect-links/{first['id']}/revoke", headers=auth(key))
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked" and revoked.json()["revoked_by"]
    assert (await scanner.get("/t/api-org/connect")).status_code == 303  # its session ended
    assert (await client_for.post(f"/api/v1/tenants/api-org/connect-links/{first['id']}/revoke", headers=auth(key))).status_code == 200

    reissued = await client_for.post(f"/api/v1/tenants/api-org/connect-links/{first['id']}/reissue", headers=auth(key))
    assert reissued.status_code == 201
    body = reissued.json()
    assert body["replaces"] == first["id"] and body["url"].startswith(ORIGIN + "/connect/smc_link_") and body["url"] != first["url"]
    assert (await (await people()).get(body["url"].removeprefix(ORIGIN))).status_code == 303
    states = {r["id"]: r["state"] for r in (await client_for.get("/api/v1/tenants/api-org/connect-links", headers=auth(key))).json()["data"]}
    assert states == {first["id"]: "revoked", body["id"]: "opened"}

    # The create endpoint's rules: a read-only key may not, a key for another tenant finds nothing.
    read_only = await make_api_key(runtime, tenants=["api-org"], read_only=True, name="ro")
    other = await make_api_key(runtime, tenants=["elsewhere"], name="other")
    for method, url in (("GET", "/api/v1/tenants/api-org/connect-links"),
                        ("POST", f"/api/v1/tenants/api-org/connect-links/{body['id']}/revoke"),
                        ("POST", f"/api/v1/tenants/api-org/connect-links/{body['id']}/reissue")):
        assert (await client_for.request(method, url, headers=auth(read_only))).json()["error"]["code"] == "read_only_key"
        assert (await client_for.request(method, url, headers=auth(other))).status_code == 404
    unknown = await client_for.post("/api/v1/tenants/api-org/connect-links/00000000-0000-0000-0000-000000000000/revoke",
                                    headers=auth(key))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "connect_link_not_found"
    assert [a for a, _ in await _actions(runtime, "connect_link.re")] == ["connect_link.revoke", "connect_link.reissue"]


async def _invite(operator: Browser, slug: str, email: str) -> str:
    shown = await operator.post_form(f"/t/{slug}/invitations", {"email": email}, csrf_from=f"/t/{slug}/links")
    assert shown.status_code == 200, shown.text
    assert f'href="/t/{slug}/links"' in shown.text
    return INVITE.search(shown.text).group(1)


async def _invitation(runtime, path: str) -> Invitation:
    async with runtime.db.session() as session:
        return await session.scalar(select(Invitation).where(Invitation.token_hash == token_hash(path.rsplit("/", 1)[1])))


async def _accept(person: Browser, path: str, password: str = "a long enough password"):
    page = await person.get(path)
    assert page.status_code == 200, page.text
    return await person.app_client.post(path, data={"csrf_token": csrf_of(page.text), "name": "New Person",
                                                     "password": password, "confirm": password})


async def test_invitations_open_without_spending_and_are_revoked_and_reissued(runtime, operator, people):
    tenant = await make_tenant(runtime, "invites", hipaa=False)
    path = await _invite(operator, "invites", "new@invites.example")
    scanner = await people()
    page = await scanner.get(path)
    assert page.status_code == 200 and "new@invites.example" in page.text and "Invites" in page.text
    invitation = await _invitation(runtime, path)
    assert invitation.accepted_at is None
    listing = await operator.get("/t/invites/links")
    assert f'id="invitation-{invitation.id}" data-state="outstanding"' in listing.text

    # Revoke from the list: the link stops working, with a page that says why.
    done = await operator.app_client.post(f"/invitations/{invitation.id}/revoke", data={
        "csrf_token": csrf_of(listing.text), "back": "/t/invites/links?notice=invitation_revoked"})
    assert done.status_code == 303 and done.headers["location"] == "/t/invites/links?notice=invitation_revoked"
    assert "Invitation revoked" in (await operator.get(done.headers["location"])).text
    refused = await scanner.get(path)
    assert refused.status_code == 410 and "invitation_revoked" in refused.text and "new invitation" in refused.text
    posted = await scanner.app_client.post(path, data={"csrf_token": csrf_of(page.text), "name": "x",
                                                       "password": "a long enough password", "confirm": "a long enough password"})
    assert posted.status_code == 410 and "invitation_revoked" in posted.text
    async with runtime.db.session() as session:
        assert await session.scalar(select(User).where(User.email == "new@invites.example")) is None

    # Re-issue: a new link for the same person works; the old one stays refused.
    shown = await operator.post_form(f"/invitations/{invitation.id}/reissue", {"back": "https://evil.example/"},
                                     csrf_from="/t/invites/links")
    assert shown.status_code == 200 and 'href="/t/invites/links"' in shown.text  # "back" is a local path or the default
    new_path = INVITE.search(shown.text).group(1)
    assert (await scanner.get(path)).status_code == 410
    person = await people()
    accepted = await _accept(person, new_path)
    assert accepted.status_code == 303 and accepted.headers["location"] == "/org"
    async with runtime.db.session() as session:
        user = await session.scalar(select(User).where(User.email == "new@invites.example"))
    assert user.role == "org_admin" and user.tenant_id == tenant.id
    used = await (await people()).get(new_path)
    assert used.status_code == 410 and "invitation_used" in used.text
    assert [a for a, _ in await _actions(runtime, "invitation.")] == ["invitation.create", "invitation.revoke", "invitation.reissue"]
    # An accepted invitation cannot be revoked or re-issued.
    new = await _invitation(runtime, new_path)
    answer = await operator.post_form(f"/invitations/{new.id}/revoke", {}, csrf_from="/t/invites/links")
    assert answer.status_code == 409 and "invitation_used" in answer.text


async def test_a_bad_invitation_email_is_shown_on_the_links_page(runtime, operator):
    await make_tenant(runtime, "typo", hipaa=False)
    before = await table_counts(runtime)
    answer = await operator.post_form("/t/typo/invitations", {"email": "not an email"}, csrf_from="/t/typo/links")
    assert answer.status_code == 422 and "Enter a valid email address." in answer.text and "Connect links and invitations" in answer.text
    assert await table_counts(runtime) == before


async def test_an_operator_invitation_makes_an_operator(runtime, operator, people):
    async with runtime.db.session() as session:
        invitation, token = await invitations.invite(session, role="operator", tenant=None, email="ops2@example.com",
                                                     hours=1, actor=Actor("user", "op@example.com"))
    async with runtime.db.session() as session:
        listed = await invitations.outstanding(session, role="operator")
        assert [i.id for i in listed] == [invitation.id] and listed[0].tenant_id is None
        assert await invitations.outstanding(session, role="org_admin") == []
    page = await (await people()).get(f"/invite/{token}")
    assert page.status_code == 200 and "as an operator" in page.text

    # Re-issue from the People page's form: back goes to /people by default; the new link works.
    shown = await operator.post_form(f"/invitations/{invitation.id}/reissue", {}, csrf_from="/tenants")
    assert shown.status_code == 200 and 'href="/people"' in shown.text
    new_path = INVITE.search(shown.text).group(1)
    person = await people()
    accepted = await _accept(person, new_path)
    assert accepted.status_code == 303 and accepted.headers["location"] == "/tenants"
    async with runtime.db.session() as session:
        user = await session.scalar(select(User).where(User.email == "ops2@example.com"))
        assert user.role == "operator" and user.tenant_id is None
        assert await invitations.outstanding(session, role="operator") == []
        closed = await invitations.outstanding(session, role="operator", include_closed=True)
        assert [invitations.state_of(i) for i in closed] == ["accepted", "revoked"]
    assert (await person.get("/tenants")).status_code == 200
    assert (await (await people()).get(f"/invite/{token}")).status_code == 410

    async with runtime.db.session() as session:
        other, _ = await invitations.invite(session, role="operator", tenant=None, email="ops3@example.com", hours=1,
                                            actor=Actor.system())
    revoked = await operator.post_form(f"/invitations/{other.id}/revoke", {"back": "/people"}, csrf_from="/tenants")
    assert revoked.status_code == 303 and revoked.headers["location"] == "/people"


async def test_invite_checks_the_role_against_the_tenant(runtime):
    tenant = await make_tenant(runtime, "roles", hipaa=False)
    async with runtime.db.session() as session:
        for role, with_tenant, code in (("operator", tenant, "invalid_role"), ("org_admin", None, "tenant_required"),
                                        ("root", None, "invalid_role")):
            with pytest.raises(ValidationFailed) as refused:
                await invitations.invite(session, role=role, tenant=with_tenant, email="r@roles.example", hours=1,
                                         actor=Actor.system())
            assert refused.value.code == code
