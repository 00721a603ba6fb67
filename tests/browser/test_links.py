"""Connect links in a real browser: a link a mail scanner opened first still connects the person
later; a revoked or an expired link shows a page that says so and what to do; the operator's list of
links and invitations (with its two-step revoke, no confirm() dialog) passes axe-core."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page, expect
from sqlalchemy import update

from app.core.models import ConnectLink
from app.kit.tokens import token_hash
from app.runtime import Runtime
from tests.browser.pages import (
    NARROW,
    WIDE,
    assert_accessible,
    connect,
    create_tenant,
    horizontal_overflow,
    login,
    screenshot,
)
from tests.support.journeys import PLAIN_USER

pytestmark = pytest.mark.browser


async def _new_link(page: Page, slug: str) -> str:
    """Create a connect link from the links page; returns the URL shown once, back on the list."""
    await page.goto(f"/t/{slug}/links")
    await page.locator("#new-link").get_by_role("button", name="Create connect link").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Connect link")
    url = await page.get_by_label("Copy it now").input_value()
    await page.get_by_role("link", name="Back to connect links and invitations").click()
    await expect(page).to_have_url(re.compile(rf"/t/{slug}/links$"))
    return url


def _newest(page: Page):
    """The list's newest connect link (rows are newest first; the list never shows a link's URL)."""
    return page.locator("#links tbody tr").first


async def test_a_link_a_scanner_opened_first_still_connects_in_the_browser(open_context, stack):
    operator = await open_context(WIDE)
    op = operator.page
    await login(op)
    await create_tenant(op, "Corner Bakery", "corner-bakery", hipaa=False)
    link = await _new_link(op, "corner-bakery")
    assert re.fullmatch(rf"{re.escape(stack.url)}/connect/smc_link_\S+", link), link
    await expect(_newest(op)).to_contain_text("outstanding")

    # A mail scanner fetches the link (a plain GET, no browser, no cookies kept) before the person does.
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as scanner:
        fetched = await scanner.get(link)
        assert fetched.status_code == 303 and fetched.headers["location"] == "/t/corner-bakery/connect"
        preview = await scanner.get(stack.url + "/t/corner-bakery/connect")  # with the cookie it was given
        assert preview.status_code == 200
    await op.reload()
    await expect(_newest(op)).to_contain_text("opened 1 time")

    # The person opens it later in their browser and connects.
    admin = await open_context(WIDE)
    ad = admin.page
    await ad.goto(link)
    await expect(ad).to_have_url(re.compile(r"/t/corner-bakery/connect$"))
    await connect(ad, "corner-bakery", PLAIN_USER)

    # The list shows it used; the link now opens for nobody.
    await op.reload()
    row = _newest(op)
    await expect(row).to_have_attribute("data-state", "used")
    await expect(row).to_contain_text("opened 2 times")
    await expect(row.get_by_role("group")).to_have_count(0)  # no revoke disclosure for a used link
    late = await open_context(WIDE)
    late.expected_errors.add(urlsplit(link).path)
    answer = await late.page.goto(link)
    assert answer is not None and answer.status == 410
    await expect(late.page.get_by_role("heading", level=1)).to_have_text("Link already used")

    for watch in (operator, admin, late):
        assert watch.dialogs == []
        watch.assert_clean()


async def test_revoked_and_expired_links_show_a_clear_page_and_the_list_is_accessible(open_context, stack):
    operator = await open_context(WIDE)
    op = operator.page
    await login(op)
    await create_tenant(op, "Acme Clinic", "acme-clinic")
    expiring = await _new_link(op, "acme-clinic")
    revoking = await _new_link(op, "acme-clinic")

    # Invite an org admin from the same page: the invitation is listed too.
    form = op.locator("#new-invitation")
    await form.get_by_label("Email address").fill("not an email")
    await form.get_by_label("Email address").evaluate("(el) => el.type = 'text'")  # let the server judge it
    operator.expected_errors.add("/t/acme-clinic/invitations")
    await form.get_by_role("button", name="Invite").click()
    await expect(op.get_by_role("alert")).to_contain_text("Enter a valid email address.")
    await op.locator("#new-invitation").get_by_label("Email address").fill("admin@acme-clinic.example")
    await op.locator("#new-invitation").get_by_role("button", name="Invite").click()
    await expect(op.get_by_role("heading", level=1)).to_have_text("Invitation for admin@acme-clinic.example")
    await op.get_by_role("link", name="Back to connect links and invitations").click()
    await expect(op.locator("#invitations tbody tr")).to_contain_text("outstanding")

    # A person opens the soon-expiring link (their session waits on the consent page).
    person = await open_context(WIDE)
    await person.page.goto(expiring)
    await expect(person.page).to_have_url(re.compile(r"/t/acme-clinic/connect$"))

    # The list, wide and narrow, passes axe-core, with the revoke disclosure open too.
    await op.goto("/t/acme-clinic/links")
    await expect(op.get_by_role("heading", level=1)).to_have_text("Connect links and invitations")
    await assert_accessible(op)
    newest = op.locator("#links tbody tr").first
    await newest.locator("summary").click()
    revoke = newest.get_by_role("button", name=re.compile(r"^Revoke link "))
    await expect(revoke).to_be_visible()
    await expect(newest).to_contain_text("stops working at once")
    await assert_accessible(op)
    await screenshot(op, "links-1440", docs="links", docs_height=900)
    await op.set_viewport_size({"width": NARROW, "height": 812})
    overflow = await horizontal_overflow(op)
    assert overflow == [], "\n".join(overflow)
    await assert_accessible(op)
    await op.set_viewport_size({"width": WIDE, "height": 900})

    # Second step: the real button revokes it, no browser dialog.
    await revoke.click()
    await expect(op).to_have_url(re.compile(r"/t/acme-clinic/links\?notice=link_revoked$"))
    await expect(op.get_by_role("status")).to_contain_text("Connect link revoked")
    await expect(op.locator("#links tbody tr").first).to_have_attribute("data-state", "revoked")

    visitor = await open_context(NARROW)
    visitor.expected_errors.update({urlsplit(revoking).path, urlsplit(expiring).path})
    answer = await visitor.page.goto(revoking)
    assert answer is not None and answer.status == 410
    await expect(visitor.page.get_by_role("heading", level=1)).to_have_text("Link revoked")
    await expect(visitor.page.locator("main")).to_contain_text("Ask the person who sent it for a new link.")
    await assert_accessible(visitor.page)
    assert await horizontal_overflow(visitor.page) == []

    # Expire the other link in the database: new openers and the person already on it are refused.
    runtime = await Runtime.start(stack.settings)
    try:
        async with runtime.db.session() as session:
            await session.execute(update(ConnectLink)
                                  .where(ConnectLink.token_hash == token_hash(expiring.rsplit("/", 1)[1]))
                                  .values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    finally:
        await runtime.stop()
    answer = await visitor.page.goto(expiring)
    assert answer is not None and answer.status == 410
    await expect(visitor.page.get_by_role("heading", level=1)).to_have_text("Link expired")
    await expect(visitor.page.locator("main")).to_contain_text("Ask the person who sent it for a new link.")
    person.expected_errors.add("/t/acme-clinic/connect")
    await person.page.reload()
    await expect(person.page.get_by_role("heading", level=1)).to_have_text("Link expired")
    await expect(person.page.get_by_role("button", name="Continue to Salesmsg")).to_have_count(0)
    await op.reload()
    await expect(op.locator("#links tbody tr").nth(1)).to_have_attribute("data-state", "expired")

    for watch in (operator, person, visitor):
        assert watch.dialogs == []
        watch.assert_clean()
