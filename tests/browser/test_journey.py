"""The whole journey in a real browser: an operator sets up a HIPAA tenant, its admin connects it
through a connect link once the BAA is on record, the operator answers a conversation, then
disconnects. Screenshots of the main pages land in var/screenshots/."""

from __future__ import annotations

import asyncio
import re

import pytest
from playwright.async_api import Page, expect

from tests.browser.pages import (
    NARROW,
    WIDE,
    approve_at_salesmsg,
    assert_accessible,
    create_tenant,
    horizontal_overflow,
    login,
    scope_box,
    screenshot,
)
from tests.support.journeys import HIPAA_USER

pytestmark = pytest.mark.browser

PHI_WANTED = ["conversations:read", "conversations:write", "messages:read", "messages:write", "contacts:read"]
REPLY = "Booked: Thursday at 9:00 with the front desk. Reply C to cancel."


async def _tenant_page(page: Page, slug: str) -> None:
    await page.goto(f"/t/{slug}")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Acme Clinic")


async def test_operator_and_org_admin_connect_a_hipaa_tenant_then_message_and_disconnect(open_context, stack):
    operator = await open_context(WIDE)
    op = operator.page

    # The operator signs in and creates a tenant: HIPAA is the default.
    await login(op)
    await create_tenant(op, "Corner Bakery", "corner-bakery", hipaa=False)
    await create_tenant(op, "Acme Clinic", "acme-clinic")
    await expect(op.locator("#baa")).to_contain_text("No BAA on record")
    await expect(op.locator("#connection")).to_contain_text("not connected")
    await assert_accessible(op)

    # A connect link, shown once, from the tenant's links page.
    await op.get_by_role("link", name="Connect links and invitations").click()
    await expect(op).to_have_url(re.compile(r"/t/acme-clinic/links$"))
    await assert_accessible(op)
    await op.get_by_role("button", name="Create connect link").click()
    await expect(op.get_by_role("heading", level=1)).to_have_text("Connect link")
    await assert_accessible(op)
    link = await op.get_by_label("Copy it now").input_value()
    assert re.fullmatch(rf"{re.escape(stack.url)}/connect/\S+", link), link

    # The org admin (no account, a browser of their own) opens it: PHI scopes are locked, with the reason.
    admin = await open_context(WIDE)
    ad = admin.page
    await ad.goto(link)
    await expect(ad).to_have_url(re.compile(r"/t/acme-clinic/connect$"))
    await expect(ad.get_by_role("heading", level=1)).to_have_text("Allow Salesmsg Connect to use Acme Clinic's Salesmsg account")
    locked = ad.locator("#phi-locked")
    await expect(locked).to_be_visible()
    await expect(locked).to_contain_text("PHI scopes are locked")
    await expect(locked).to_contain_text("no signed Business Associate Agreement (BAA) is on record")
    for scope in PHI_WANTED:
        box = scope_box(ad, scope)
        await expect(box).to_be_disabled()
        await expect(box).not_to_be_checked()
        await expect(box).to_have_accessible_description(re.compile("PHI scopes are locked"))
    await expect(scope_box(ad, "teams:read")).to_be_enabled()
    await expect(ad.locator("#consent-form")).to_contain_text("locked: BAA required")
    await assert_accessible(ad)
    await screenshot(ad, "consent-phi-locked-1440", docs="consent", docs_height=900)

    # Back as the operator: record the BAA on the tenant page.
    await _tenant_page(op, "acme-clinic")
    baa = op.locator("#baa")
    await baa.get_by_label("Agreement reference").fill("BAA-2026-0142")
    await baa.get_by_label("Note (optional)").fill("Countersigned copy in the contracts drive")
    await baa.get_by_label(re.compile(r"The BAA between Salesmsg and this integration, covering Acme Clinic, is signed")).check()
    await baa.get_by_role("button", name="Record BAA as signed").click()
    await expect(op.get_by_role("status")).to_contain_text("BAA recorded as signed")
    await expect(baa).to_contain_text("BAA-2026-0142")
    await expect(op.locator("main")).to_contain_text("BAA signed")
    await assert_accessible(op)

    # The org admin reloads: the PHI scopes are open; they tick what the integration needs.
    await ad.reload()
    await expect(ad.locator("#phi-locked")).to_have_count(0)
    await expect(ad.locator("#consent-form")).not_to_contain_text("locked: BAA required")
    for scope in PHI_WANTED:
        box = scope_box(ad, scope)
        await expect(box).to_be_enabled()
        await box.check()
        await expect(box).to_be_checked()
    await assert_accessible(ad)
    await screenshot(ad, "consent-1440")
    await ad.get_by_role("button", name="Continue to Salesmsg").click()

    # At Salesmsg (the emulator): sign in as the HIPAA org's user and approve.
    await expect(ad.locator("#scopes")).to_contain_text("conversations:write")
    await approve_at_salesmsg(ad, HIPAA_USER)

    # Back on our "connected" page, with the PHI scopes granted.
    await expect(ad).to_have_url(re.compile(r"/t/acme-clinic/connected$"))
    await expect(ad.get_by_role("heading", level=1)).to_have_text("Acme Clinic is connected")
    granted = ad.locator("main ul")
    for scope in PHI_WANTED:
        await expect(granted).to_contain_text(scope)
    await expect(ad.locator("main")).to_contain_text("You can close this window.")
    await assert_accessible(ad)
    await screenshot(ad, "connected-1440")

    # The operator sees it connected in the tenants list, then reads the tenant's conversations.
    await op.get_by_role("navigation", name="Main").get_by_role("link", name="Tenants").click()
    row = op.locator("#tenants-table tbody tr", has_text="Acme Clinic")
    await expect(row).to_contain_text("active")
    await expect(row).to_contain_text("BAA signed")
    await expect(op.locator("#tenants-table tbody tr", has_text="Corner Bakery")).to_contain_text("not HIPAA")
    await assert_accessible(op)
    await screenshot(op, "tenants-1440", docs="tenants")
    await row.get_by_role("link", name="Acme Clinic").click()
    await expect(op.locator("#connection")).to_contain_text("active")
    await assert_accessible(op)
    await screenshot(op, "tenant-1440")
    await op.get_by_role("navigation", name="Acme Clinic").get_by_role("link", name="Conversations").click()
    await expect(op).to_have_url(re.compile(r"/t/acme-clinic/conversations$"))
    await assert_accessible(op)
    first = op.locator("#conversation-list a").first
    contact = (await first.locator("strong").inner_text()).strip()
    await first.click()
    await expect(op).to_have_url(re.compile(r"/t/acme-clinic/conversations/\d+$"))
    await expect(op.get_by_role("heading", level=2).first).to_have_text(contact)
    await assert_accessible(op)

    # Send a message with the form; it shows in the thread with its delivery status.
    await op.get_by_label("Message").fill(REPLY)
    await expect(op.locator("#message-count")).to_have_text(f"{len(REPLY)} / 1600")
    await op.get_by_role("button", name="Send").click()
    await expect(op).to_have_url(re.compile(r"\?notice=sent#latest$"))
    await expect(op.get_by_role("status")).to_have_text("Message sent.")
    latest = op.locator("#thread #latest")
    await expect(latest).to_contain_text(REPLY)
    await expect(latest.locator(".sender")).to_have_text("Avery Testwell")  # the member the connection acts as
    await expect(latest.locator(".badge")).to_have_text(re.compile(r"^(queued|sent|delivered)$"))
    # The emulator moves it to "delivered" within a second; a reload shows the new status.
    for _ in range(40):
        if (await latest.locator(".badge").inner_text()).strip() == "delivered":
            break
        await asyncio.sleep(0.25)
        await op.reload()
    await expect(latest.locator(".badge")).to_have_text("delivered")
    assert (await op.locator("#thread").inner_text()).count(REPLY) == 1
    await assert_accessible(op)
    await screenshot(op, "conversation-1440", docs="conversation")
    await op.set_viewport_size({"width": NARROW, "height": 812})
    assert await horizontal_overflow(op) == []
    await screenshot(op, "conversation-375")
    await op.set_viewport_size({"width": WIDE, "height": 900})

    # Disconnect, confirmed in the page (no browser dialog); the tenant shows not connected.
    await op.get_by_role("navigation", name="Acme Clinic").get_by_role("link", name="Overview").click()
    disconnect = op.get_by_role("button", name="Disconnect Acme Clinic")
    await expect(disconnect).to_be_hidden()
    await op.locator("#connection").get_by_text("Disconnect…").click()
    await assert_accessible(op)
    await disconnect.click()
    await expect(op).to_have_url(re.compile(r"/t/acme-clinic\?notice=disconnected$"))
    await expect(op.get_by_role("status")).to_contain_text("Disconnected.")
    await expect(op.locator("#connection h2")).to_contain_text("not connected")
    await expect(op.get_by_role("button", name=re.compile("^Disconnect"))).to_have_count(0)
    await assert_accessible(op)
    # its inbox now says so, once, with no filters
    await op.get_by_role("navigation", name="Acme Clinic").get_by_role("link", name="Conversations").click()
    await expect(op.locator("#not-connected")).to_contain_text("Acme Clinic is not connected to Salesmsg")
    await expect(op.get_by_role("search")).to_have_count(0)
    await assert_accessible(op)
    await op.goto("/tenants")
    await expect(op.locator("#tenants-table tbody tr", has_text="Acme Clinic")).to_contain_text("not connected")
    await assert_accessible(op)

    assert operator.dialogs == admin.dialogs == []
    operator.assert_clean()
    admin.assert_clean()
