"""Focused browser checks: text from Salesmsg never runs as code, the main pages keep to the CSP
and fit 375 px and 1440 px, every control has a name, and the key controls work by keyboard."""

from __future__ import annotations

import asyncio
import re

import pytest
from playwright.async_api import Page, expect

from tests.browser.pages import (
    NARROW,
    WIDE,
    Watch,
    accessibility_violations,
    assert_accessible,
    connect,
    create_tenant,
    first_conversation,
    focus_ring,
    form_controls_without_label,
    horizontal_overflow,
    is_focused,
    login,
    scope_box,
    screenshot,
    tab_to,
    unnamed_controls,
)
from tests.support.journeys import PASSWORD, PLAIN_USER

pytestmark = pytest.mark.browser

SCRIPT = "<script>alert(1)</script>"
HANDLER = '<img src=x onerror="alert(2)">'


async def _operator_with_bakery(open_context, width: int = WIDE) -> Watch:
    """An operator signed in, with Corner Bakery (not HIPAA) created and connected through Salesmsg."""
    operator = await open_context(width)
    await login(operator.page)
    await create_tenant(operator.page, "Corner Bakery", "corner-bakery", hipaa=False)
    await connect(operator.page, "corner-bakery", PLAIN_USER)
    return operator


async def test_markup_sent_from_salesmsg_shows_as_text_and_never_runs(open_context, stack):
    operator = await _operator_with_bakery(open_context)
    page = operator.page
    conversation = await first_conversation(page, "corner-bakery")
    stack.emulator.controls.inject_inbound(conversation, SCRIPT)
    stack.emulator.controls.inject_inbound(conversation, HANDLER)

    await page.reload()
    thread = page.locator("#thread")
    await expect(thread.locator(".msg.inbound", has_text=SCRIPT)).to_have_count(1)
    await expect(page.locator("#latest")).to_contain_text(HANDLER)
    await expect(thread.locator("script, img")).to_have_count(0)
    await assert_accessible(page)
    # The conversation list's preview shows the latest message, as text too.
    await page.goto("/t/corner-bakery/conversations?filter=unread")
    await expect(page.locator("#conversation-list .preview", has_text=HANDLER)).to_have_count(1)
    await expect(page.locator("#conversation-list").locator("script, img")).to_have_count(0)
    await assert_accessible(page)
    await asyncio.sleep(0.3)  # an onerror handler, had it been parsed, would have fired by now

    assert operator.dialogs == []
    operator.assert_clean()  # an inline script the escaping missed would also show as a CSP violation


async def _check_page(page: Page, path: str, width: int, problems: list[str]) -> None:
    overflow = await horizontal_overflow(page)
    if overflow:
        problems.append(f"{path} at {width}px overflows: {overflow}")
    unnamed = await unnamed_controls(page)
    if unnamed:
        problems.append(f"{path} at {width}px has controls without an accessible name: {unnamed}")
    unlabelled = await form_controls_without_label(page)
    if unlabelled:
        problems.append(f"{path} has form controls without a label: {unlabelled}")
    violations = await accessibility_violations(page)  # assert_accessible, collected with the rest
    if violations:
        problems.append(f"{path} at {width}px, axe-core: {violations}")


async def test_main_pages_fit_375_and_1440_name_their_controls_and_keep_to_the_csp(open_context, stack):
    operator = await _operator_with_bakery(open_context)
    page = operator.page
    await create_tenant(page, "Acme Clinic", "acme-clinic")  # HIPAA, no BAA: the locked states
    conversation = await first_conversation(page, "corner-bakery")
    anonymous = await open_context(NARROW, 812)
    operator.expected_errors.add("/t/no-such-tenant")  # the 404 page is one of the pages checked

    pages = [
        "/tenants", "/t/corner-bakery", "/t/corner-bakery/connect", "/t/corner-bakery/connected",
        "/t/corner-bakery/conversations", f"/t/corner-bakery/conversations/{conversation}", "/t/corner-bakery/contacts",
        "/t/acme-clinic", "/t/acme-clinic/connect", "/t/acme-clinic/conversations", "/t/acme-clinic/contacts",
        "/audit", "/api-keys", "/t/no-such-tenant",
    ]
    problems: list[str] = []
    for width in (NARROW, WIDE):
        for watch in (operator, anonymous):
            await watch.page.set_viewport_size({"width": width, "height": 812 if width == NARROW else 900})
        await anonymous.page.goto("/login")
        await _check_page(anonymous.page, "/login", width, problems)
        for path in pages:
            answer = await page.goto(path)
            assert answer is not None and answer.status == (404 if "no-such" in path else 200), path
            await _check_page(page, path, width, problems)
            if width == NARROW:
                await screenshot(page, "375/" + re.sub(r"\d+", "thread", path.strip("/").replace("/", "_")))
        # Pages that answer a form: a connect link and an API key, each shown once.
        await page.goto("/t/corner-bakery/links")
        await _check_page(page, "/t/corner-bakery/links", width, problems)
        await page.get_by_role("button", name="Create connect link").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text("Connect link")
        await _check_page(page, "connect link (shown once)", width, problems)
        await page.goto("/api-keys")
        await page.get_by_label("Name").fill(f"reporting-{width}")
        await page.get_by_role("button", name="Create key").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text(f"API key “reporting-{width}”")
        await _check_page(page, "API key (shown once)", width, problems)
        if width == NARROW:
            await page.goto("/tenants")
            await screenshot(page, "tenants-375")

    assert problems == []
    assert operator.dialogs == anonymous.dialogs == []
    operator.assert_clean()
    anonymous.assert_clean()


async def test_the_key_controls_work_by_keyboard_alone(open_context, stack):
    person = await open_context(WIDE)
    page = person.page
    keyboard = page.keyboard

    # Sign in: the e-mail field has the focus on arrival; Tab, type, Enter.
    await page.goto("/login")
    email, password = page.get_by_label("Email"), page.get_by_label("Password")
    assert await is_focused(email)
    await assert_accessible(page)
    assert await is_focused(email)
    await keyboard.type("operator@example.com")
    await keyboard.press("Tab")
    assert await is_focused(password)
    await keyboard.type(PASSWORD)
    await keyboard.press("Enter")
    await expect(page).to_have_url(re.compile(r"/tenants$"))
    await assert_accessible(page)

    # The first Tab shows the skip link; Enter moves the focus to the content.
    skip = page.get_by_role("link", name="Skip to content")
    assert await tab_to(page, skip) == 1
    box = await skip.bounding_box()
    assert box is not None and box["x"] >= 0 and box["y"] >= 0, box
    assert await focus_ring(skip)
    await keyboard.press("Enter")
    assert await is_focused(page.locator("main#main"))

    # Create a tenant from the keyboard; the browser itself refuses a slug the server would refuse.
    name, slug = page.get_by_label("Organization name"), page.get_by_label("Slug")
    await tab_to(page, name)
    assert await focus_ring(name)
    await keyboard.type("Keyboard Clinic")
    await keyboard.press("Tab")
    assert await is_focused(slug)
    await keyboard.type("Keyboard Clinic")
    await keyboard.press("Tab")
    assert await is_focused(page.get_by_label("HIPAA"))
    await expect(page.get_by_label("HIPAA")).to_have_value("on")
    create = page.get_by_role("button", name="Create tenant")
    await keyboard.press("Tab")
    assert await is_focused(create)
    assert await focus_ring(create)
    await keyboard.press("Enter")
    assert await slug.evaluate("(el) => el.validity.patternMismatch"), "the slug pattern did not apply"
    await expect(page).to_have_url(re.compile(r"/tenants(#main)?$"))
    await slug.focus()
    await keyboard.press("ControlOrMeta+A")
    await keyboard.type("keyboard-clinic")
    await keyboard.press("Enter")
    await expect(page).to_have_url(re.compile(r"/t/keyboard-clinic\?notice=created$"))
    await assert_accessible(page)

    # The BAA form: reference, the confirmation checkbox (Space ticks it), the button.
    reference = page.get_by_label("Agreement reference")
    await tab_to(page, reference)
    await keyboard.type("BAA-KEY-0001")
    confirm = page.get_by_label(re.compile("The BAA between Salesmsg and this integration"))
    await tab_to(page, confirm, limit=5)
    assert await focus_ring(confirm)
    await keyboard.press("Space")
    await expect(confirm).to_be_checked()
    await keyboard.press("Tab")
    assert await is_focused(page.get_by_role("button", name="Record BAA as signed"))
    await keyboard.press("Enter")
    await expect(page.get_by_role("status")).to_contain_text("BAA recorded as signed")
    await assert_accessible(page)

    # The consent screen: a folded group opens with Enter; its scopes are checkboxes in the tab
    # order; Space ticks; the button is reachable.
    await page.goto("/t/keyboard-clinic/connect")
    await assert_accessible(page)
    group = page.locator("#consent-form details", has=page.locator("summary", has_text="Tags")).locator("summary")
    await tab_to(page, group, limit=80)
    await keyboard.press("Enter")
    tags = scope_box(page, "tags:read")
    await tab_to(page, tags, limit=5)
    assert await focus_ring(tags)
    await keyboard.press("Space")
    await expect(tags).to_be_checked()
    await tab_to(page, page.get_by_role("button", name="Continue to Salesmsg"), limit=150)

    # A conversation: write and send from the keyboard.
    await create_tenant(page, "Corner Bakery", "corner-bakery", hipaa=False)
    await connect(page, "corner-bakery", PLAIN_USER)
    await first_conversation(page, "corner-bakery")
    await assert_accessible(page)
    message = page.get_by_label("Message")
    await tab_to(page, message)
    await keyboard.type("Sent without a mouse.")
    await keyboard.press("Tab")
    assert await is_focused(page.get_by_role("button", name="Send"))
    await keyboard.press("Enter")
    await expect(page.get_by_role("status")).to_have_text("Message sent.")
    await expect(page.locator("#latest")).to_contain_text("Sent without a mouse.")
    await assert_accessible(page)

    person.assert_clean()


async def test_an_api_key_is_revoked_after_a_confirmation_in_the_page(open_context, stack):
    operator = await open_context(WIDE)
    page = operator.page
    await login(page)
    for name in ("billing-service", "reporting"):
        await page.goto("/api-keys")
        await page.get_by_label("Name").fill(name)
        await page.get_by_role("button", name="Create key").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text(f"API key “{name}”")
        await assert_accessible(page)
    await page.get_by_role("link", name="Done").click()
    await expect(page).to_have_url(re.compile(r"/api-keys$"))
    await assert_accessible(page)
    row = page.locator("#keys-table tbody tr", has_text="billing-service")
    confirm = row.get_by_role("button", name="Revoke billing-service")
    await expect(confirm).to_be_hidden()  # the first step only opens the explanation
    await row.get_by_text("Revoke…").click()
    await expect(confirm).to_be_visible()
    await expect(row).to_contain_text("fail at once")
    await assert_accessible(page)
    await confirm.click()
    await expect(page).to_have_url(re.compile(r"/api-keys$"))
    await expect(page.locator("#keys-table tbody tr", has_text="billing-service")).to_contain_text("revoked")
    await expect(page.locator("#keys-table tbody tr", has_text="reporting")).to_contain_text("read-write")
    await expect(page.locator("#keys-table tbody tr", has_text="billing-service").get_by_text("Revoke…")).to_have_count(0)
    await assert_accessible(page)
    assert operator.dialogs == []
    operator.assert_clean()
