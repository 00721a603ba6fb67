"""The operator's audit page and its export: names instead of ids, filters by actor and period,
paging that keeps the filters, a JSON-lines export of the same rows that is itself audited, and
one audit event per page view of a thread."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from app.audit import audit_log
from app.audit.audit_log import ACTOR_API_KEY, ACTOR_LINK, ACTOR_USER, Actor, AuditRecord
from app.core.models import ApiKey, AuditEntry, ConnectLink, User
from app.tenants import registry
from tests.support.journeys import Browser, connected_tenant, make_api_key, make_tenant, make_user

OPERATOR = "olive@example.com"
ROW = re.compile(r'<tr id="entry-(\d+)">')
DAY = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def entry_ids(html: str) -> list[int]:
    return [int(i) for i in ROW.findall(html)]


def link(html: str, rel: str) -> str | None:
    found = re.search(rf'<a href="([^"]+)" rel="{rel}">', html)
    return found.group(1).replace("&amp;", "&") if found else None


async def add_rows(runtime, records: list[AuditRecord]) -> list[int]:
    async with runtime.db.session() as session:
        return [row.id for row in await audit_log.append(session, records)]


@pytest.fixture
async def operator(runtime, browser):
    await make_user(runtime, OPERATOR)
    async with runtime.db.session() as session:
        await session.execute(update(User).where(User.email == OPERATOR).values(name="Olive Operator"))
    assert (await browser.login(OPERATOR)).status_code == 303
    return browser


@pytest.fixture
async def alpha(runtime):
    return await make_tenant(runtime, "alpha", name="Alpha Dental")


async def test_rows_show_names_words_and_fields_never_ids_or_reprs(runtime, operator, alpha):
    await make_api_key(runtime, name="billing-service")
    async with runtime.db.session() as session:
        key = await session.scalar(select(ApiKey).where(ApiKey.name == "billing-service"))
        link_row = ConnectLink(token_hash="x" * 64, tenant_id=alpha.id, created_by=OPERATOR,
                               expires_at=datetime.now(UTC) + timedelta(hours=1))
        session.add(link_row)
        await session.flush()
        link_id = str(link_row.id)
    await add_rows(runtime, [
        AuditRecord("baa.sign", Actor(ACTOR_USER, OPERATOR), tenant_id=alpha.id, target="alpha",
                    details={"reference": "BAA-1", "tenants": ["alpha", "beta"], "limits": {"per_minute": 60}}),
        AuditRecord("proxy.phi_access", Actor(ACTOR_API_KEY, str(key.id)), tenant_id=alpha.id, outcome="denied",
                    details={"scope": "messages:read", "status": 403}),
        AuditRecord("connect_link.redeem", Actor(ACTOR_LINK, link_id)),  # no tenant on the row: found through the link
        AuditRecord("made.up_action", Actor.system()),
    ])
    page = await operator.get("/audit")
    assert page.status_code == 200
    table = page.text.split('id="audit-table"')[1]
    assert "Olive Operator" in table and OPERATOR in table
    assert "API key billing-service" in table and key.prefix in table and str(key.id) not in table
    assert "Connect link for Alpha Dental" in table and link_id not in table
    assert "System (background worker)" in table
    assert '<a href="/t/alpha" title="Alpha Dental">alpha</a>' in table
    assert "BAA recorded as signed" in table and "<code>made.up_action</code>" in table
    assert '<span class="badge bad">denied</span>' in table
    assert "<dt>tenants</dt><dd>alpha, beta</dd>" in table and "<dt>limits</dt><dd>per_minute 60</dd>" in table
    assert "[&#39;" not in table and "{&#39;" not in table and "['" not in table
    # a compact UTC time that carries its full value
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT[\d:.]+\+00:00" title="[^"]+ UTC \(entry \d+\)">'
                     r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d</time>", table)


async def test_actor_and_period_filters(runtime, operator, alpha):
    await make_api_key(runtime, name="billing-service")
    await make_user(runtime, "sam@example.com")
    async with runtime.db.session() as session:
        key = await session.scalar(select(ApiKey).where(ApiKey.name == "billing-service"))
    by_key = await add_rows(runtime, [AuditRecord("proxy.phi_access", Actor(ACTOR_API_KEY, str(key.id)), at=DAY)])
    by_sam = await add_rows(runtime, [AuditRecord("tenant.rename", Actor(ACTOR_USER, "sam@example.com"),
                                                  at=DAY + timedelta(days=2))])
    earlier = await add_rows(runtime, [AuditRecord("tenant.rename", Actor(ACTOR_USER, "sam@example.com"),
                                                   at=DAY - timedelta(days=5))])

    async def shown(query: str) -> list[int]:
        page = await operator.get(f"/audit?{query}")
        assert page.status_code == 200, page.text
        return entry_ids(page.text)

    assert await shown("actor=BILLING") == by_key  # a key's name, any case
    assert await shown(f"actor={key.prefix}") == by_key
    assert await shown("actor=sam%40") == earlier + by_sam  # the start of an e-mail; newest (highest id) first
    async with runtime.db.session() as session:
        by_system = (await session.scalars(
            select(AuditEntry.id).where(AuditEntry.actor_type == "system").order_by(AuditEntry.id.desc()))).all()
    assert by_system and await shown("actor=system") == by_system  # an actor type
    assert await shown("from=2026-03-10&to=2026-03-12") == by_sam + by_key  # "to" is inclusive
    assert await shown("from=2026-03-11") == [i for i in await shown("") if i not in by_key + earlier]
    assert await shown("actor=sam&to=2026-03-10") == earlier
    for bad in ("from=2026-13-01", "from=2026-03-12&to=2026-03-10", "tenant=no-such-tenant"):
        page = await operator.get(f"/audit?{bad}")
        assert page.status_code == 422 and 'id="audit-problem"' in page.text and not entry_ids(page.text), bad


async def test_paging_older_and_newer_keeps_the_filters(runtime, operator, alpha):
    ours = await add_rows(runtime, [AuditRecord("test.paging", Actor.system(), tenant_id=alpha.id, at=DAY)
                                    for _ in range(120)])
    await add_rows(runtime, [AuditRecord("other.row", Actor.system(), tenant_id=alpha.id, at=DAY)])
    query = "tenant=alpha&action=test.&outcome=success&from=2026-03-10&to=2026-03-10"
    first = await operator.get(f"/audit?{query}")
    assert entry_ids(first.text) == ours[::-1][:50] and link(first.text, "prev") is None
    older = link(first.text, "next")
    assert older and older.startswith(f"/audit?{query}&before=")
    second = await operator.get(older)
    assert entry_ids(second.text) == ours[::-1][50:100]
    third = await operator.get(link(second.text, "next"))
    assert entry_ids(third.text) == ours[::-1][100:] and link(third.text, "next") is None
    newer = link(third.text, "prev")
    assert newer and newer.startswith(f"/audit?{query}&after=")
    back = await operator.get(newer)
    assert entry_ids(back.text) == ours[::-1][50:100]
    top = await operator.get(link(back.text, "prev"))
    assert entry_ids(top.text) == ours[::-1][:50] and link(top.text, "prev") is None


async def test_export_downloads_the_filtered_rows_as_json_lines_and_is_audited(runtime, operator, alpha):
    await make_tenant(runtime, "beta")
    wanted = await add_rows(runtime, [AuditRecord("test.export", Actor(ACTOR_USER, OPERATOR), tenant_id=alpha.id, at=DAY)
                                      for _ in range(3)])
    await add_rows(runtime, [AuditRecord("test.export", Actor(ACTOR_USER, OPERATOR), tenant_id=alpha.id,
                                         at=DAY + timedelta(days=3))])
    query = "tenant=alpha&actor=olive&action=test.&outcome=&from=2026-03-10&to=2026-03-11"
    page = await operator.get(f"/audit?{query}")
    assert sorted(entry_ids(page.text)) == wanted
    answer = await operator.get(f"/audit/export?{query}")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    assert re.fullmatch(r'attachment; filename="audit-\d{8}T\d{6}Z\.jsonl"', answer.headers["content-disposition"])
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert [line["id"] for line in lines] == wanted  # the page's rows, oldest first
    assert {line["action"] for line in lines} == {"test.export"} and all(line["hash"] for line in lines)
    async with runtime.db.session() as session:
        exports = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "audit.export"))).all()
    assert len(exports) == 1
    assert exports[0].actor_id == OPERATOR and exports[0].tenant_id == alpha.id
    assert exports[0].details == {"tenant": "alpha", "actor": "olive", "action": "test.", "from": "2026-03-10", "to": "2026-03-11"}
    # a filter that is not valid downloads nothing and says why
    bad = await operator.get("/audit/export?from=yesterday")
    assert bad.status_code == 422 and "content-disposition" not in bad.headers and 'id="audit-problem"' in bad.text


async def test_only_operators_see_or_export_the_log(runtime, live_app, upstream, alpha):
    await make_user(runtime, "admin@alpha.example", role="org_admin", tenant=alpha)
    admin = Browser(live_app, upstream.url)
    anonymous = Browser(live_app, upstream.url)
    try:
        await admin.login("admin@alpha.example")
        for path in ("/audit", "/audit/export", "/audit/export?tenant=alpha"):
            answer = await admin.get(path)
            assert answer.status_code == 403 and "content-disposition" not in answer.headers, path
            answer = await anonymous.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login?"), path
    finally:
        await admin.close()
        await anonymous.close()
    async with runtime.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "audit.export")) == 0


async def test_a_thread_view_is_one_audit_event_carrying_both_calls(runtime, operator, upstream):
    await connected_tenant(runtime, operator, "corner-bakery")
    listing = await operator.get("/t/corner-bakery/conversations")
    conversation = int(re.search(r'href="/t/corner-bakery/conversations/(\d+)"', listing.text).group(1))
    async with runtime.db.session() as session:
        last = await session.scalar(select(func.max(AuditEntry.id)))
    upstream.controls.reset_counters()
    thread = await operator.get(f"/t/corner-bakery/conversations/{conversation}")
    assert thread.status_code == 200 and 'id="thread"' in thread.text
    # the page did make both calls upstream...
    assert upstream.controls.counter("api.GET /conversations/{id}") == 1
    assert upstream.controls.counter("api.GET /conversations/{id}/messages") == 1
    async with runtime.db.session() as session:
        written = (await session.scalars(select(AuditEntry).where(AuditEntry.id > last))).all()
    # ...and wrote one audit row for the view, naming both
    assert len(written) == 1
    entry = written[0]
    assert (entry.action, entry.outcome, entry.target) == ("dashboard.phi_access", "success", "GET /conversations/{id}")
    assert entry.details == {
        "scope": ["conversations:read", "messages:read"],
        "calls": [{"call": "GET /conversations/{id}", "scope": "conversations:read", "status": 200},
                  {"call": "GET /conversations/{id}/messages", "scope": "messages:read", "status": 200}],
    }
    async with runtime.db.session() as session:
        assert (await audit_log.verify_chain(session)).ok
    # and the audit page shows it as one readable row
    page = await operator.get("/audit?action=dashboard.")
    assert "<dt>calls</dt><dd>call GET /conversations/{id}, scope conversations:read, status 200; " in page.text


async def test_a_thread_salesmsg_refuses_is_one_failed_event(runtime, operator, upstream):
    await connected_tenant(runtime, operator, "corner-bakery")
    async with runtime.db.session() as session:
        last = await session.scalar(select(func.max(AuditEntry.id)))
        tenant = await registry.get_tenant(session, "corner-bakery")
    thread = await operator.get("/t/corner-bakery/conversations/999999")
    assert thread.status_code == 200 and 'id="problem-banner"' in thread.text
    async with runtime.db.session() as session:
        written = (await session.scalars(select(AuditEntry).where(AuditEntry.id > last))).all()
    assert [(e.action, e.outcome, e.tenant_id, e.details.get("status")) for e in written] == [
        ("dashboard.phi_access", "failure", tenant.id, 404)]


def test_details_are_compact_text():
    fields = audit_log.detail_fields({"read_only": True, "tenants": ["a", "b"], "nested": {"x": [1, 2]}, "none": None})
    assert fields == [("read only", "yes"), ("tenants", "a, b"), ("nested", "x 1, 2"), ("none", "—")]
    assert audit_log.action_words("baa.sign") == "BAA recorded as signed" and audit_log.action_words("x.y") is None


async def test_names_are_read_once_per_kind_however_many_actors_a_page_has(runtime, operator, alpha):
    from sqlalchemy import event

    async def statements_for_page() -> int:
        seen: list[str] = []

        def count(_conn, _cursor, statement, *_args) -> None:
            if statement.lstrip().upper().startswith("SELECT"):  # not a session's last-seen touch
                seen.append(statement)

        event.listen(runtime.db.engine.sync_engine, "before_cursor_execute", count)
        try:
            assert (await operator.get("/audit")).status_code == 200
        finally:
            event.remove(runtime.db.engine.sync_engine, "before_cursor_execute", count)
        return len(seen)

    async def add_actors(n: int, tag: str) -> None:
        records = []
        for i in range(n):
            email = f"{tag}{i}@example.com"
            await make_user(runtime, email)
            await make_api_key(runtime, name=f"{tag}-key-{i}")
            async with runtime.db.session() as session:
                key = await session.scalar(select(ApiKey).where(ApiKey.name == f"{tag}-key-{i}"))
            records += [AuditRecord("tenant.rename", Actor(ACTOR_USER, email), tenant_id=alpha.id),
                        AuditRecord("proxy.phi_access", Actor(ACTOR_API_KEY, str(key.id)), tenant_id=alpha.id),
                        AuditRecord("connect_link.redeem", Actor(ACTOR_LINK, str(uuid.uuid4())), tenant_id=alpha.id)]
        await add_rows(runtime, records)

    await add_actors(2, "few")
    few = await statements_for_page()
    await add_actors(16, "many")  # a full page of distinct people, keys and links
    page = await operator.get("/audit")
    assert "API key many-key-15" in page.text and "many15@example.com" in page.text
    assert await statements_for_page() == few


async def test_revoking_an_api_key_twice_or_without_the_form_token_changes_nothing(runtime, operator):
    await make_api_key(runtime, name="billing-service")
    page = await operator.get("/api-keys")
    assert "data-confirm" not in page.text and 'class="two-step' in page.text
    key_id = re.search(r'action="/api-keys/([0-9a-f-]{36})/revoke"', page.text).group(1)
    forged = await operator.app_client.post(f"/api-keys/{key_id}/revoke", data={})
    assert forged.status_code == 403 and "csrf_failed" in forged.text
    first = await operator.post_form(f"/api-keys/{key_id}/revoke", {}, csrf_from="/api-keys")
    assert first.status_code == 303
    again = await operator.post_form(f"/api-keys/{key_id}/revoke", {}, csrf_from="/api-keys")
    assert again.status_code == 409 and "api_key_revoked" in again.text and '<a href="/audit">Audit log</a>' in again.text
    unknown = await operator.post_form(f"/api-keys/{uuid.uuid4()}/revoke", {}, csrf_from="/api-keys")
    assert unknown.status_code == 404 and "api_key_not_found" in unknown.text
    async with runtime.db.session() as session:
        revokes = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "api_key.revoke"))).all()
    assert len(revokes) == 1 and revokes[0].actor_id == OPERATOR
