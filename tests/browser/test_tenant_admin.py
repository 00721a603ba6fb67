"""The tenants list and a tenant's page in the browser: the slug suggested from the name, a tenant
edited and deleted with the typed confirmation (no confirm() dialog anywhere), the Salesmsg org
warnings, and both pages accessible (axe-core) and fitting at 1440 and 375 px."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Page, expect

from tests.browser.pages import (
    NARROW,
    WIDE,
    assert_accessible,
    connect,
    create_tenant,
    form_controls_without_label,
    horizontal_overflow,
    login,
    screenshot,
    unnamed_controls,
)
from tests.support.journeys import HIPAA_USER, PLAIN_OTHER_USER, PLAIN_USER

pytestmark = pytest.mark.browser


async def _fits_and_is_accessible(page: Page, where: str) -> None:
    assert await horizontal_overflow(page) == [], where
    assert await unnamed_controls(page) == [], where
    assert await form_controls_without_label(page) == [], where
    await assert_accessible(page)


async def test_the_slug_is_suggested_from_the_name_until_it_is_edited(open_context, stack):
    operator = await open_context(WIDE)
    page = operator.page
    await login(page)
    form = page.locator("#new-tenant")
    name, slug = form.get_by_label("Organization name"), form.get_by_label("Slug")
    await name.fill("Café Zoë & Sons, Ltd.")
    await expect(slug).to_have_value("cafe-zoe-sons-ltd")
    await slug.fill("zoe-cafe")
    await name.fill("Café Zoë")
    await expect(slug).to_have_value("zoe-cafe")  # the person's own slug stands
    await form.get_by_role("button", name="Create tenant").click()
    await expect(page).to_have_url(re.compile(r"/t/zoe-cafe\?notice=created$"))
    await expect(page.get_by_role("heading", level=1)).to_have_text("Café Zoë")
    assert operator.dialogs == []
    operator.assert_clean()


async def test_a_tenant_is_edited_then_deleted_with_the_typed_slug(open_context, stack):
    operator = await open_context(WIDE)
    page = operator.page
    await login(page)
    await create_tenant(page, "Bright Dental", "bright-dental")

    settings = page.locator("#settings")
    await settings.get_by_text("Edit name and webhook").click()
    await settings.get_by_label("Organization name").fill("Bright Dental Group")
    await settings.get_by_label("Webhook URL (optional)").fill("https://hooks.example.com/bright")
    await settings.get_by_role("button", name="Save changes").click()
    await expect(page.get_by_role("status")).to_have_text("Tenant saved.")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Bright Dental Group")
    await expect(page.locator("#webhook-secret-value")).to_have_value(re.compile(r"^whsec_\S{20,}$"))
    await expect(page.locator("#webhook-url")).to_have_text("https://hooks.example.com/bright")
    await _fits_and_is_accessible(page, "tenant page with the webhook secret")

    # HIPAA off: a second step in the page says what it means before it happens.
    await page.reload()
    await expect(page.locator("#webhook-secret-value")).to_have_count(0)  # shown once
    baa = page.locator("#baa")
    await expect(baa.get_by_role("button", name="Mark Bright Dental Group as not HIPAA")).to_be_hidden()
    await baa.get_by_text("Mark as not HIPAA…").click()
    await expect(baa.locator("#hipaa-off")).to_contain_text("Only do this if the organization handles no protected health information")
    await baa.get_by_role("button", name="Mark Bright Dental Group as not HIPAA").click()
    await expect(page.get_by_role("status")).to_have_text("HIPAA is off for this tenant.")
    await expect(page.locator("#hipaa-state")).to_have_text("no")

    # Delete: the button waits for the slug; the page says what is lost.
    danger = page.locator("#delete-tenant")
    await danger.get_by_text("Delete tenant…").click()
    await expect(danger).to_contain_text("cannot be undone")
    button = danger.get_by_role("button", name="Delete Bright Dental Group for good")
    await expect(button).to_be_disabled()
    await danger.get_by_label("Type bright-dental to confirm").fill("bright")
    await expect(button).to_be_disabled()
    await _fits_and_is_accessible(page, "tenant page, delete opened")
    await danger.get_by_label("Type bright-dental to confirm").fill("bright-dental")
    await expect(button).to_be_enabled()
    await button.click()
    await expect(page).to_have_url(re.compile(r"/tenants\?notice=deleted$"))
    await expect(page.get_by_role("status")).to_contain_text("Tenant deleted.")
    await expect(page.locator("#tenants-table")).not_to_contain_text("Bright Dental")
    assert operator.dialogs == []
    operator.assert_clean()


async def test_org_warnings_show_and_both_pages_pass_axe_at_both_widths(open_context, stack):
    operator = await open_context(WIDE)
    page = operator.page
    await login(page)
    await create_tenant(page, "Bakery North", "bakery-north", hipaa=False)
    await connect(page, "bakery-north", PLAIN_USER)
    await create_tenant(page, "Bakery South", "bakery-south", hipaa=False)
    await connect(page, "bakery-south", PLAIN_OTHER_USER)  # the same Salesmsg org as Bakery North

    await page.goto("/t/bakery-south")
    connection = page.locator("#connection")
    await expect(connection.locator("#salesmsg-org")).to_have_text(re.compile(r"^Corner Bakery \(id 3\)$"))
    await expect(connection.locator("#salesmsg-user")).to_contain_text("drew@corner-bakery.example")
    await expect(connection.locator("#connected-by")).to_contain_text(f"by {'operator@example.com'}")
    warning = page.locator("#org-warning")
    await expect(warning).to_contain_text("The same Salesmsg org is also connected to Bakery North")
    await expect(page.locator("#events-table")).to_contain_text("Salesmsg org shared")

    # Bakery North reconnects as a member of another org: the change is flagged, not blocked.
    await connect(page, "bakery-north", HIPAA_USER)
    await page.goto("/t/bakery-north")
    await expect(page.locator("#org-changed")).to_contain_text("was connected to Corner Bakery (id 3) before")
    await expect(page.locator("#org-changed")).to_contain_text("reaches Acme Clinic (id 1)")
    await expect(page.locator("#events-table")).to_contain_text("Salesmsg org changed")
    await expect(page.locator("#links-link")).to_have_attribute("href", "/t/bakery-north/links")

    for width in (WIDE, NARROW):
        await page.set_viewport_size({"width": width, "height": 900 if width == WIDE else 812})
        for path in ("/tenants", "/t/bakery-north", "/t/bakery-south"):
            await page.goto(path)
            await _fits_and_is_accessible(page, f"{path} at {width}")
            docs = "tenant" if (path, width) == ("/t/bakery-north", WIDE) else None  # the org-change warning
            await screenshot(page, f"tenant-admin/{path.strip('/').replace('/', '_')}-{width}", docs=docs, docs_height=1200)
        # the disconnect confirmation, opened, is part of the page too
        await page.locator("#disconnect-confirm").get_by_text("Disconnect…").click()
        await expect(page.get_by_role("button", name="Disconnect Bakery South")).to_be_visible()
        await _fits_and_is_accessible(page, f"disconnect opened at {width}")

    await page.get_by_role("button", name="Disconnect Bakery South").click()
    await expect(page).to_have_url(re.compile(r"/t/bakery-south\?notice=disconnected$"))
    await expect(page.locator("#connection h2")).to_contain_text("not connected")
    assert operator.dialogs == []
    operator.assert_clean()
