"""The consent screen in a real browser: it says who is asking and what each permission allows,
the minimum is ticked and in view, the rest opens group by group, a PHI permission stays locked
with its reason while the BAA is missing, and what is ticked is what Salesmsg is asked for."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.browser.pages import (
    NARROW,
    OPERATOR_EMAIL,
    WIDE,
    approve_at_salesmsg,
    assert_accessible,
    create_tenant,
    focus_ring,
    horizontal_overflow,
    is_focused,
    login,
    scope_box,
    screenshot,
    tab_to,
)
from tests.support.journeys import PLAIN_USER

pytestmark = pytest.mark.browser

MINIMUM = ["contacts:read", "conversations:read", "messages:read", "messages:write", "teams:read", "users:read"]


async def test_an_extra_scope_from_a_folded_group_reaches_salesmsg_and_the_connected_page(open_context):
    person = await open_context(WIDE)
    page = person.page
    await login(page)
    await create_tenant(page, "Corner Bakery", "corner-bakery", hipaa=False)
    await page.goto("/t/corner-bakery/connect")

    # Who is asking, and for what.
    await expect(page.get_by_role("heading", level=1)).to_have_text("Allow Salesmsg Connect to use Corner Bakery's Salesmsg account")
    await expect(page.locator("#who-asks")).to_contain_text(f"You are signed in as {OPERATOR_EMAIL}")
    # The minimum is in view, ticked, named in plain words; the rest is folded away.
    for scope in MINIMUM:
        await expect(scope_box(page, scope)).to_be_visible()
        await expect(scope_box(page, scope)).to_be_checked()
    await expect(page.get_by_role("checkbox", name=re.compile(r"^Send messages on your behalf messages:write"))).to_be_checked()
    tags_write = scope_box(page, "tags:write")
    await expect(tags_write).to_be_hidden()
    await expect(page.locator("#more details[open]")).to_have_count(0)
    await assert_accessible(page)

    # Open the Tags group, tick "Create and change your tags": its count follows.
    tags = page.locator("#more details", has=page.locator("summary", has_text="Tags"))
    await tags.locator("summary").click()
    await expect(tags_write).to_be_visible()
    await expect(tags.locator("summary")).to_contain_text("0 of 2 selected")
    await page.get_by_role("checkbox", name=re.compile(r"^Create and change your tags tags:write")).check()
    await expect(tags.locator("summary")).to_contain_text("1 of 2 selected")
    await assert_accessible(page)
    await screenshot(page, "consent-folded-1440")

    # Salesmsg (the emulator) is asked for exactly what is ticked.
    await page.get_by_role("button", name="Continue to Salesmsg").click()
    requested = page.locator("#scopes")
    await expect(requested).to_contain_text("tags:write")
    for scope in MINIMUM:
        await expect(requested).to_contain_text(scope)
    await expect(requested).not_to_contain_text("tags:read")
    await approve_at_salesmsg(page, PLAIN_USER)

    # The connected page says what was granted, in the same words.
    await expect(page).to_have_url(re.compile(r"/t/corner-bakery/connected$"))
    granted = page.locator("main ul")
    await expect(granted).to_contain_text("Create and change your tags")
    await expect(granted).to_contain_text("Send messages on your behalf")
    await assert_accessible(page)
    person.assert_clean()


async def test_phi_is_locked_with_its_reason_and_the_page_fits_a_phone(open_context):
    person = await open_context(NARROW, 800)
    page = person.page
    await login(page)
    await create_tenant(page, "Acme Clinic", "acme-clinic")
    await page.goto("/t/acme-clinic/connect")
    await expect(page.locator("#phi-locked")).to_contain_text("PHI scopes are locked")

    # A PHI permission of the minimum: locked, unticked, its reason beside it and in its description.
    read = scope_box(page, "conversations:read")
    await expect(read).to_be_disabled()
    await expect(read).not_to_be_checked()
    await expect(read).to_have_accessible_description(re.compile("PHI scopes are locked"))
    row = page.locator("#minimum label", has=page.locator('input[value="conversations:read"]'))
    await expect(row).to_contain_text("needs a signed BAA; your operator records it")

    # A folded PHI group says it is locked before it is opened, and stays locked once open.
    conversations = page.locator("#more details", has=page.locator("summary", has_text="Conversations"))
    await expect(conversations.locator("summary")).to_contain_text("locked: BAA required")
    await conversations.locator("summary").click()
    await expect(scope_box(page, "conversations:write")).to_be_visible()
    await expect(scope_box(page, "conversations:write")).to_be_disabled()
    await expect(scope_box(page, "teams:read")).to_be_enabled()
    assert await horizontal_overflow(page) == []
    await assert_accessible(page)
    await screenshot(page, "consent-phi-locked-375")
    person.assert_clean()


async def test_the_consent_screen_works_from_the_keyboard(open_context):
    person = await open_context(WIDE)
    page, keyboard = person.page, person.page.keyboard
    await login(page)
    await create_tenant(page, "Corner Bakery", "corner-bakery", hipaa=False)
    await page.goto("/t/corner-bakery/connect")

    # A group's summary is in the tab order; Enter opens it; its checkboxes follow; Space ticks.
    summary = page.locator("#more summary", has_text="Tags")
    await tab_to(page, summary, limit=40)
    assert await focus_ring(summary)
    await keyboard.press("Enter")
    await expect(page.locator("#more details[open]")).to_have_count(1)
    tags_read = scope_box(page, "tags:read")
    await keyboard.press("Tab")
    assert await is_focused(tags_read)
    assert await focus_ring(tags_read)
    await keyboard.press("Space")
    await expect(tags_read).to_be_checked()
    await expect(summary).to_contain_text("1 of 2 selected")

    # On to the button, and Enter sends the choice to Salesmsg.
    await tab_to(page, page.get_by_role("button", name="Continue to Salesmsg"), limit=60)
    await keyboard.press("Enter")
    await expect(page.locator("#scopes")).to_contain_text("tags:read")
    person.assert_clean()
