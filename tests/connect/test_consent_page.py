"""The consent screen as the org admin reads it: who is asking and why, the integration's minimum
first in plain words, the rest folded by resource, PHI locked with its reason while the BAA is
missing, and a refused submission shown again with the person's choices kept."""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import unescape
from html.parser import HTMLParser

import pytest
from sqlalchemy import select

from app.audit.audit_log import ACTOR_USER, Actor
from app.connections import links, scopes
from app.core.models import OAuthState
from app.identity import sessions
from app.main import create_app
from tests.support.journeys import (
    PLAIN_USER,
    Browser,
    make_tenant,
    make_user,
    sign_baa,
)

DEFAULTS = ["conversations:read", "messages:read", "messages:write", "contacts:read", "teams:read", "users:read"]
PHI_DEFAULTS = ["conversations:read", "messages:read", "messages:write", "contacts:read"]
REASON = "needs a signed BAA; your operator records it"


@pytest.fixture
async def operator(runtime, browser):
    await make_user(runtime, "op@example.com")
    assert (await browser.login("op@example.com")).status_code == 303
    return browser


@dataclass
class Box:
    scope: str
    checked: bool
    disabled: bool
    section: str  # "minimum", or the resource of the fold holding it
    fold_open: bool


class ConsentForm(HTMLParser):
    """The checkboxes of the consent form (not the PAT form), where each one sits, and the folds."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.boxes: list[Box] = []
        self.folds: dict[str, dict] = {}  # resource -> {"open": bool, "summary": str}
        self._in_form = False
        self._section: str | None = None
        self._fold_open = False
        self._summary: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self._in_form = a.get("id") == "consent-form"
        if not self._in_form:
            return
        if a.get("id") == "minimum":
            self._section = "minimum"
        if tag == "details":
            self._fold_open = "open" in a
            self._section = None
        if tag == "summary":
            self._summary = ""
        if tag == "span" and (a.get("id") or "").startswith("fold-") and self._summary is not None:
            self._section = a["id"].removeprefix("fold-")
            self.folds[self._section] = {"open": self._fold_open, "summary": ""}
        if tag == "input" and a.get("type") == "checkbox":
            assert a.get("name") == "scope"
            self.boxes.append(Box(a["value"], "checked" in a, "disabled" in a, self._section or "?", self._fold_open))

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False
        if tag == "summary" and self._summary is not None:
            self.folds[self._section]["summary"] = " ".join(self._summary.split())
            self._summary = None

    def handle_data(self, data):
        if self._summary is not None:
            self._summary += data

    def box(self, scope: str) -> Box:
        (found,) = [b for b in self.boxes if b.scope == scope]
        return found

    @property
    def checked(self) -> list[str]:
        return [b.scope for b in self.boxes if b.checked]


def text_of(html: str) -> str:
    """The page's words with single spaces (none before a comma or a full stop)."""
    return re.sub(r" ([,.])", r"\1", " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split()))


async def test_the_minimum_comes_first_preselected_in_plain_words_and_the_rest_is_folded(runtime, operator):
    await make_tenant(runtime, "corner-bakery", hipaa=False, name="Corner Bakery")
    page = await operator.get("/t/corner-bakery/connect")
    assert page.status_code == 200
    form = ConsentForm(page.text)
    shown = text_of(page.text)

    # Who is asking, for what, and a title that reads the right way round.
    assert "Allow Salesmsg Connect to use Corner Bakery's Salesmsg account" in shown
    assert runtime.settings.integration_purpose in shown
    assert "You are signed in as op@example.com" in shown

    # The minimum first (catalogue order), each ticked, each saying what it allows.
    minimum = [b for b in form.boxes if b.section == "minimum"]
    assert [b.scope for b in minimum] == scopes.parse(DEFAULTS)
    assert form.boxes[: len(DEFAULTS)] == minimum
    assert all(b.checked and not b.disabled for b in minimum)
    for words in ("Read your conversations", "Read your messages", "Send messages on your behalf", "See your contacts"):
        assert words in shown
    assert form.checked == scopes.parse(DEFAULTS)

    # Everything else is offered once, folded by resource, closed, none ticked.
    rest = [b for b in form.boxes if b.section != "minimum"]
    assert sorted(b.scope for b in form.boxes) == sorted(scopes.TABLE_SCOPES)
    assert all(b.section == scopes.CATALOGUE[b.scope].resource and not b.fold_open for b in rest)
    assert not any(f["open"] for f in form.folds.values())
    assert form.folds["tags"]["summary"] == "Tags 0 of 2 selected"
    assert "messages" not in form.folds  # both of its scopes are in the minimum: no empty group
    assert "teams" in form.folds and form.folds["teams"]["summary"] == "Teams (inboxes) 0 of 1 selected"


async def test_every_offered_scope_is_described_in_plain_words_on_the_page(runtime, operator):
    descriptions = {name: s.plain for name, s in scopes.CATALOGUE.items()}
    assert all(text and ":" not in text for text in descriptions.values())
    assert len(set(descriptions.values())) == len(descriptions)  # no two checkboxes say the same
    await make_tenant(runtime, "corner-bakery", hipaa=False)
    shown = text_of((await operator.get("/t/corner-bakery/connect")).text)
    for name in scopes.TABLE_SCOPES:
        assert f"{descriptions[name]} {name}" in shown, name


async def test_phi_is_locked_with_the_reason_until_the_baa_is_recorded(runtime, operator):
    await make_tenant(runtime, "acme-clinic", hipaa=True, name="Acme Clinic")
    page = await operator.get("/t/acme-clinic/connect")
    form = ConsentForm(page.text)
    shown = text_of(page.text)
    assert "PHI scopes are locked" in shown and "ask your operator to record the signed BAA" in shown
    for scope in scopes.TABLE_SCOPES:
        box = form.box(scope)
        assert box.disabled == scopes.is_phi(scope), scope
        if scopes.is_phi(scope):
            assert not box.checked
            assert re.search(rf'value="{re.escape(scope)}" disabled aria-describedby="phi-locked"', page.text), scope
    assert form.checked == ["teams:read", "users:read"]
    for scope in PHI_DEFAULTS:
        assert f"{scopes.CATALOGUE[scope].plain} {scope} PHI locked: BAA required · {REASON}" in shown
    assert form.folds["conversations"]["summary"] == "Conversations PHI 0 of 1 selected locked: BAA required"
    assert "locked" not in form.folds["tags"]["summary"]

    await sign_baa(runtime, "acme-clinic")
    page = await operator.get("/t/acme-clinic/connect")
    form = ConsentForm(page.text)
    assert "PHI scopes are locked" not in page.text and REASON not in page.text
    assert not any(b.disabled for b in form.boxes)
    assert form.checked == scopes.parse(DEFAULTS)
    assert "locked" not in form.folds["conversations"]["summary"]


async def test_a_forged_phi_scope_is_refused_and_the_page_keeps_the_choices_with_its_group_open(runtime, operator, upstream):
    await make_tenant(runtime, "acme-clinic", hipaa=True)
    # The person unticked users:read and added tags:write; a forged form adds conversations:write.
    refused = await operator.start_connect("acme-clinic", ["teams:read", "tags:write", "conversations:write"])
    assert refused.status_code == 403
    assert 'data-code="baa_required"' in refused.text and "location" not in refused.headers
    async with runtime.db.session() as session:
        assert (await session.scalars(select(OAuthState))).first() is None
    assert upstream.controls.counter("token.authorization_code") == 0

    form = ConsentForm(refused.text)
    assert form.checked == ["teams:read", "tags:write"]  # kept as chosen; the locked one stays unticked
    assert form.box("conversations:write").disabled
    assert form.folds["conversations"]["open"]  # the group holding the refused scope
    assert not form.folds["tags"]["open"]
    assert form.folds["tags"]["summary"] == "Tags 1 of 2 selected"


async def test_an_empty_choice_is_refused_with_nothing_ticked_again(runtime, operator):
    await make_tenant(runtime, "corner-bakery", hipaa=False)
    refused = await operator.start_connect("corner-bakery", [])
    assert refused.status_code == 422 and 'data-code="no_scope"' in refused.text
    assert "Choose at least one scope." in text_of(refused.text)
    assert ConsentForm(refused.text).checked == []


async def test_a_connect_link_session_says_who_sent_the_link(runtime, live_app, upstream):
    tenant = await make_tenant(runtime, "linked", hipaa=False, name="Linked Org")
    async with runtime.db.session() as session:
        link, _ = await links.create_connect_link(session, tenant=tenant, hours=1, actor=Actor(ACTOR_USER, "sender@example.com"))
        token, _ = await sessions.start(session, runtime.settings, link_tenant_id=tenant.id, link_id=link.id)
    visitor = Browser(live_app, upstream.url)
    try:
        visitor.app_client.cookies.set(sessions.session_cookie_name(runtime.settings), token)
        page = await visitor.get("/t/linked/connect")
    finally:
        await visitor.close()
    assert page.status_code == 200
    shown = text_of(page.text)
    assert "Allow Salesmsg Connect to use Linked Org's Salesmsg account" in shown
    assert "This connect link was sent by sender@example.com, who runs Salesmsg Connect." in shown
    assert "signed in as" not in shown


async def test_the_integration_name_and_purpose_come_from_the_settings(connected_settings, upstream):
    changed = connected_settings.model_copy(update={"integration_name": "Clinic Reminders", "integration_purpose": "Sends appointment reminders."})
    application = create_app(changed, configure_logs=False)
    async with application.router.lifespan_context(application):
        runtime = application.state.runtime
        admin_browser = Browser(application, upstream.url)
        try:
            tenant = await make_tenant(runtime, "acme-clinic", hipaa=False, name="Acme Clinic")
            await make_user(runtime, "admin@acme.example", role="org_admin", tenant=tenant)
            assert (await admin_browser.login("admin@acme.example")).status_code == 303
            shown = text_of((await admin_browser.get("/t/acme-clinic/connect")).text)
        finally:
            await admin_browser.close()
    assert "Allow Clinic Reminders to use Acme Clinic's Salesmsg account" in shown
    assert "Sends appointment reminders." in shown
    assert "You are signed in as admin@acme.example" in shown
    assert "What Clinic Reminders needs" in shown


async def test_the_connected_page_says_what_was_granted_in_plain_words(runtime, operator):
    await make_tenant(runtime, "corner-bakery", hipaa=False, name="Corner Bakery")
    assert (await operator.connect("corner-bakery", ["teams:read", "messages:write"], user_id=PLAIN_USER)).status_code == 303
    page = await operator.get("/t/corner-bakery/connected")
    shown = text_of(page.text)
    assert "Corner Bakery is connected" in shown
    assert "Salesmsg Connect can now use Corner Bakery's Salesmsg account" in shown
    assert "Send messages on your behalf messages:write PHI" in shown
    assert "See your teams (inboxes) teams:read" in shown
    assert "users:read" not in shown


async def test_a_refused_token_reopens_the_token_form(runtime, operator):
    await make_tenant(runtime, "pat-org", hipaa=False)
    closed = await operator.get("/t/pat-org/connect")
    assert '<details class="card" id="pat-connect">' in closed.text
    bad = await operator.post_form("/t/pat-org/connect/pat", [("token", "not-a-real-token-value"), ("scope", "teams:read")],
                                   csrf_from="/t/pat-org/connect")
    assert bad.status_code in (400, 401, 422)
    assert '<details class="card" id="pat-connect" open>' in bad.text
